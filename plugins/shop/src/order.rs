//! The `order` aggregate: what a customer ordered, whether it is paid, and
//! how it ended.
//!
//! ```text
//! PLACED ──(stock reserved)──► RESERVED ──(paid, confirmed)──► CONFIRMED
//!    └──────────────┴──(cancelled: no stock, no payment, customer)──► CANCELLED
//! ```
//!
//! The `order_fulfilment` saga (`fulfilment.rs`) reserves the stock, marks
//! the order RESERVED, and confirms or cancels it. The customer pays with
//! `PayOrder` (the exact total, once) at any time before the order ends.
//!
//! **Refunds are the order's own rule**, decided where the payment and the
//! cancellation meet, under the aggregate's lock: cancelling a paid order
//! refunds the payment (`OrderCancelled` then `OrderRefunded`), and a
//! payment that arrives after the order was cancelled is taken and refunded
//! at once (`OrderRefunded`) instead of being refused. So whichever of the
//! payment and the cancellation comes first, the money goes back, and no
//! saga has to stay alive waiting for late payments.

use std::collections::BTreeSet;

use orchestrix_guest::{Aggregate, DomainError};
use serde::{Deserialize, Serialize};

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    /// The `inventory` aggregate that holds its stock.
    pub sku: String,
    pub qty: u64,
    /// Unit price.
    pub price_cents: u64,
}

/// Where an order is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Never placed: every command but `PlaceOrder` is refused.
    #[default]
    New,
    /// Placed; its stock is being reserved.
    Placed,
    /// Its stock is reserved; it waits for the payment.
    Reserved,
    /// Paid and confirmed: the stock leaves the warehouse.
    Confirmed,
    /// Cancelled (see `cancel_reason`); any payment is refunded.
    Cancelled,
}

impl OrderStatus {
    /// The name used on the wire and in messages.
    pub fn name(self) -> &'static str {
        match self {
            OrderStatus::New => "NEW",
            OrderStatus::Placed => "PLACED",
            OrderStatus::Reserved => "RESERVED",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }
}

/// The folded state of one order.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub status: OrderStatus,
    pub customer: String,
    pub items: Vec<OrderLine>,
    pub total_cents: u64,
    /// How long the order waits for its payment once its stock is reserved.
    pub payment_timeout_ms: u64,
    /// Whether the shop holds the order's payment.
    pub paid: bool,
    /// Everything paid back so far.
    pub refunded_cents: u64,
    /// Why it was cancelled, once CANCELLED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
}

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum OrderCommand {
    PlaceOrder {
        customer: String,
        items: Vec<OrderLine>,
        payment_timeout_ms: u64,
    },
    /// Record that every line's stock is reserved (sent by the saga).
    MarkOrderReserved {},
    /// The customer pays the total.
    PayOrder {
        amount_cents: u64,
    },
    /// Confirm a reserved, paid order (sent by the saga).
    ConfirmOrder {},
    CancelOrder {
        reason: String,
    },
}

/// What happens to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    OrderPlaced {
        customer: String,
        items: Vec<OrderLine>,
        payment_timeout_ms: u64,
        total_cents: u64,
    },
    OrderReserved {},
    OrderPaid {
        amount_cents: u64,
    },
    OrderConfirmed {},
    OrderCancelled {
        reason: String,
    },
    /// Money paid back to the customer: a cancelled order's payment, or a
    /// payment that came after the cancellation.
    OrderRefunded {
        amount_cents: u64,
    },
}

/// Check the lines and add up their total.
fn total_of(items: &[OrderLine]) -> Result<u64, DomainError> {
    if items.is_empty() {
        return Err(DomainError::invalid("an order needs at least one line"));
    }
    let mut skus = BTreeSet::new();
    let mut total: u64 = 0;
    for line in items {
        if line.sku.trim().is_empty() {
            return Err(DomainError::invalid("every line needs a sku"));
        }
        if !skus.insert(line.sku.as_str()) {
            return Err(DomainError::invalid(format!("sku {} is on two lines: one line per sku", line.sku)));
        }
        if line.qty == 0 {
            return Err(DomainError::invalid(format!("qty of {} must be greater than zero", line.sku)));
        }
        total = line
            .qty
            .checked_mul(line.price_cents)
            .and_then(|amount| total.checked_add(amount))
            .ok_or_else(|| DomainError::invalid("the order total overflows"))?;
    }
    Ok(total)
}

impl Order {
    fn require(&self, wanted: &[OrderStatus], action: &str) -> Result<(), DomainError> {
        match self.status {
            OrderStatus::New => Err(DomainError::rejected("order does not exist")),
            status if wanted.contains(&status) => Ok(()),
            status => {
                let wanted: Vec<&str> = wanted.iter().map(|s| s.name()).collect();
                Err(DomainError::rejected(format!(
                    "cannot {action}: order is {}, must be {}",
                    status.name(),
                    wanted.join(" or ")
                )))
            }
        }
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    const STATE_VERSION: Option<u32> = Some(1);

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
        use OrderCommand::*;
        use OrderEvent::*;
        use OrderStatus::{Cancelled, Placed, Reserved};
        match command {
            PlaceOrder { customer, items, payment_timeout_ms } => {
                if self.status != OrderStatus::New {
                    return Err(DomainError::rejected("order already exists"));
                }
                if customer.trim().is_empty() {
                    return Err(DomainError::invalid("customer must not be empty"));
                }
                if payment_timeout_ms == 0 {
                    return Err(DomainError::invalid("payment_timeout_ms must be greater than zero"));
                }
                let total_cents = total_of(&items)?;
                Ok(vec![OrderPlaced { customer, items, payment_timeout_ms, total_cents }])
            }
            MarkOrderReserved {} => {
                self.require(&[Placed], "mark reserved")?;
                Ok(vec![OrderReserved {}])
            }
            PayOrder { amount_cents } => {
                if amount_cents == 0 {
                    return Err(DomainError::invalid("amount_cents must be greater than zero"));
                }
                if self.status == Cancelled {
                    return Ok(vec![OrderRefunded { amount_cents }]);
                }
                self.require(&[Placed, Reserved], "pay")?;
                if self.paid {
                    return Err(DomainError::rejected("order is already paid"));
                }
                if amount_cents != self.total_cents {
                    return Err(DomainError::rejected(format!(
                        "payment of {amount_cents} cents does not match the order total of {} cents",
                        self.total_cents
                    )));
                }
                Ok(vec![OrderPaid { amount_cents }])
            }
            ConfirmOrder {} => {
                self.require(&[Reserved], "confirm")?;
                if !self.paid {
                    return Err(DomainError::rejected("cannot confirm: order is not paid"));
                }
                Ok(vec![OrderConfirmed {}])
            }
            CancelOrder { reason } => {
                if reason.trim().is_empty() {
                    return Err(DomainError::invalid("a cancellation needs a reason"));
                }
                self.require(&[Placed, Reserved], "cancel")?;
                let mut events = vec![OrderCancelled { reason }];
                if self.paid {
                    events.push(OrderRefunded { amount_cents: self.total_cents });
                }
                Ok(events)
            }
        }
    }

    fn apply(&mut self, event: OrderEvent) {
        match event {
            OrderEvent::OrderPlaced { customer, items, payment_timeout_ms, total_cents } => {
                self.status = OrderStatus::Placed;
                self.customer = customer;
                self.items = items;
                self.payment_timeout_ms = payment_timeout_ms;
                self.total_cents = total_cents;
            }
            OrderEvent::OrderReserved {} => self.status = OrderStatus::Reserved,
            OrderEvent::OrderPaid { .. } => self.paid = true,
            OrderEvent::OrderConfirmed {} => self.status = OrderStatus::Confirmed,
            OrderEvent::OrderCancelled { reason } => {
                self.status = OrderStatus::Cancelled;
                self.cancel_reason = Some(reason);
            }
            OrderEvent::OrderRefunded { amount_cents } => {
                self.paid = false;
                self.refunded_cents = self.refunded_cents.saturating_add(amount_cents);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::OrderCommand::*;
    use super::OrderEvent::*;
    use super::*;
    use orchestrix_guest::testing::given;
    use serde_json::json;

    fn line(sku: &str, qty: u64, price_cents: u64) -> OrderLine {
        OrderLine { sku: sku.into(), qty, price_cents }
    }

    fn placed() -> OrderEvent {
        OrderPlaced {
            customer: "ada".into(),
            items: vec![line("apple", 2, 150), line("pear", 1, 300)],
            payment_timeout_ms: 30_000,
            total_cents: 600,
        }
    }

    fn cancelled(reason: &str) -> OrderEvent {
        OrderCancelled { reason: reason.into() }
    }

    #[test]
    fn places_an_order_with_its_total() {
        given::<Order>([])
            .when(PlaceOrder {
                customer: "ada".into(),
                items: vec![line("apple", 2, 150), line("pear", 1, 300)],
                payment_timeout_ms: 30_000,
            })
            .then_expect_events([placed()]);
        given::<Order>([placed()])
            .when(PlaceOrder { customer: "ada".into(), items: vec![line("apple", 1, 1)], payment_timeout_ms: 1 })
            .then_expect_rejection("already exists");
    }

    #[test]
    fn refuses_malformed_orders() {
        let place = |items: Vec<OrderLine>, payment_timeout_ms| {
            given::<Order>([]).when(PlaceOrder { customer: "ada".into(), items, payment_timeout_ms })
        };
        place(vec![], 1).then_expect_invalid("at least one line");
        place(vec![line("apple", 1, 1), line("apple", 2, 1)], 1).then_expect_invalid("sku apple is on two lines");
        place(vec![line("apple", 0, 1)], 1).then_expect_invalid("qty of apple");
        place(vec![line(" ", 1, 1)], 1).then_expect_invalid("needs a sku");
        place(vec![line("apple", 2, u64::MAX)], 1).then_expect_invalid("overflows");
        place(vec![line("apple", 1, 1)], 0).then_expect_invalid("payment_timeout_ms");
        given::<Order>([])
            .when_raw("PlaceOrder", r#"{"customer": "ada", "items": [{"sku": "apple", "qty": -1, "price_cents": 1}], "payment_timeout_ms": 1}"#)
            .then_expect_invalid("PlaceOrder");
    }

    #[test]
    fn takes_the_exact_total_once() {
        given::<Order>([placed()])
            .when(PayOrder { amount_cents: 600 })
            .then_expect_events([OrderPaid { amount_cents: 600 }]);
        given::<Order>([placed(), OrderReserved {}])
            .when(PayOrder { amount_cents: 600 })
            .then_expect_events([OrderPaid { amount_cents: 600 }]);
        given::<Order>([placed()])
            .when(PayOrder { amount_cents: 599 })
            .then_expect_rejection("payment of 599 cents does not match the order total of 600 cents");
        given::<Order>([placed(), OrderPaid { amount_cents: 600 }])
            .when(PayOrder { amount_cents: 600 })
            .then_expect_rejection("already paid");
        given::<Order>([]).when(PayOrder { amount_cents: 600 }).then_expect_rejection("does not exist");
    }

    #[test]
    fn confirms_only_a_reserved_paid_order() {
        let reserved_and_paid = [placed(), OrderReserved {}, OrderPaid { amount_cents: 600 }];
        given::<Order>(reserved_and_paid.clone()).when(ConfirmOrder {}).then_expect_events([OrderConfirmed {}]);
        given::<Order>([placed(), OrderReserved {}]).when(ConfirmOrder {}).then_expect_rejection("not paid");
        given::<Order>([placed(), OrderPaid { amount_cents: 600 }])
            .when(ConfirmOrder {})
            .then_expect_rejection("order is PLACED, must be RESERVED");
        given::<Order>([placed()]).when(MarkOrderReserved {}).then_expect_events([OrderReserved {}]);
        given::<Order>([placed(), cancelled("x")]).when(MarkOrderReserved {}).then_expect_rejection("CANCELLED");
    }

    #[test]
    fn cancelling_a_paid_order_refunds_it() {
        given::<Order>([placed(), OrderReserved {}])
            .when(CancelOrder { reason: "no payment".into() })
            .then_expect_events([cancelled("no payment")]);
        given::<Order>([placed(), OrderReserved {}, OrderPaid { amount_cents: 600 }])
            .when(CancelOrder { reason: "no payment".into() })
            .then_expect_events([cancelled("no payment"), OrderRefunded { amount_cents: 600 }]);
        let confirmed = [placed(), OrderReserved {}, OrderPaid { amount_cents: 600 }, OrderConfirmed {}];
        given::<Order>(confirmed)
            .when(CancelOrder { reason: "late".into() })
            .then_expect_rejection("order is CONFIRMED");
        given::<Order>([placed(), cancelled("x")])
            .when(CancelOrder { reason: "again".into() })
            .then_expect_rejection("order is CANCELLED");
        given::<Order>([placed()]).when(CancelOrder { reason: " ".into() }).then_expect_invalid("needs a reason");
    }

    #[test]
    fn a_payment_after_cancellation_is_refunded_not_refused() {
        given::<Order>([placed(), cancelled("out of stock")])
            .when(PayOrder { amount_cents: 600 })
            .then_expect_events([OrderRefunded { amount_cents: 600 }]);
    }

    #[test]
    fn state_shows_the_status_and_the_cancel_reason() {
        assert_eq!(given::<Order>([placed()]).state_json()["status"], "PLACED");
        assert_eq!(given::<Order>([placed(), OrderReserved {}]).state_json()["status"], "RESERVED");
        let confirmed = [placed(), OrderReserved {}, OrderPaid { amount_cents: 600 }, OrderConfirmed {}];
        let state = given::<Order>(confirmed).state_json();
        assert_eq!((state["status"].clone(), state["paid"].clone()), (json!("CONFIRMED"), json!(true)));
        assert!(state.get("cancel_reason").is_none(), "{state}");
        let state = given::<Order>([
            placed(),
            OrderPaid { amount_cents: 600 },
            cancelled("no stock"),
            OrderRefunded { amount_cents: 600 },
        ])
        .state_json();
        assert_eq!(
            (
                state["status"].clone(),
                state["cancel_reason"].clone(),
                state["paid"].clone(),
                state["refunded_cents"].clone()
            ),
            (json!("CANCELLED"), json!("no stock"), json!(false), json!(600))
        );
    }
}
