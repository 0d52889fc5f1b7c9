//! The `order_fulfilment` saga: reserves an order's stock, waits for the
//! payment, and confirms the order or cancels it.
//!
//! One instance per order (its id), started by `OrderPlaced`:
//!
//! 1. reserve every line at its SKU's `inventory` (`reserve:<sku>`);
//! 2. once every reservation is answered: if one was refused, release the
//!    others (`release:<sku>`) and cancel the order with a reason naming the
//!    SKU's stock (`cancel`); if all were accepted, mark the order RESERVED
//!    (`mark-reserved`) and wait for the payment with the durable timer
//!    `payment`, due `payment_timeout_ms` later;
//! 3. when `OrderPaid` comes (before or after the stock is reserved) and the
//!    order is marked RESERVED, confirm it (`confirm`), and once that is
//!    accepted commit every line's stock (`commit:<sku>`): done when all
//!    commits are answered;
//! 4. when the timer fires first, release the stock and cancel the order;
//!    when the order is cancelled by someone else (`OrderCancelled`, or a
//!    refused `mark-reserved` or `confirm`), release the stock. Done once
//!    every release and the cancel are answered.
//!
//! An operator's cancel cancels an order whose payment is not yet confirmed;
//! later it is too late. A payment that comes after the cancellation is not
//! this saga's business: the order aggregate refunds it (`OrderRefunded`).

use std::time::Duration;

use orchestrix_guest::{CommandResult, DomainError, Envelope, Reaction, Saga, SagaInput, Timestamp, log};
use serde::{Deserialize, Serialize};

use crate::inventory::{Inventory, InventoryCommand};
use crate::order::{Order, OrderCommand, OrderEvent};

/// The timer that waits for the payment.
pub const PAYMENT_TIMER: &str = "payment";

/// Where one line's stock is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LineStock {
    /// Reservation sent.
    Reserving,
    Reserved,
    /// The inventory refused the reservation, for this reason.
    Unavailable {
        reason: String,
    },
    /// Release sent.
    Releasing,
    Released,
    /// Commit sent.
    Committing,
    Committed,
}

/// One order line and its stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineProgress {
    pub sku: String,
    pub qty: u64,
    pub stock: LineStock,
}

/// Where the order is, as far as the saga knows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FulfilmentPhase {
    /// Not started.
    #[default]
    Starting,
    /// Waiting for every reservation's answer.
    Reserving,
    /// Stock reserved; waiting for the payment (and the order's RESERVED mark).
    AwaitingPayment,
    /// Confirmation sent.
    Confirming,
    /// Confirmed; stock commits sent.
    Committing,
    /// The order is (being) cancelled; its stock is being released.
    Cancelling,
}

/// One order's fulfilment.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderFulfilment {
    pub order_id: String,
    pub lines: Vec<LineProgress>,
    pub payment_timeout_ms: u64,
    pub phase: FulfilmentPhase,
    /// `OrderPaid` was seen.
    pub paid: bool,
    /// The order accepted `mark-reserved` (it is RESERVED, so it can be
    /// confirmed).
    pub marked_reserved: bool,
    /// When the payment is due, once the stock is reserved and the order
    /// is not paid yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_due: Option<Timestamp>,
    /// The saga's `cancel` was sent and its outcome has not come back.
    pub cancel_awaited: bool,
}

fn reserve_id(sku: &str) -> String {
    format!("reserve:{sku}")
}

impl OrderFulfilment {
    fn line_mut(&mut self, sku: &str) -> Result<&mut LineProgress, DomainError> {
        self.lines
            .iter_mut()
            .find(|line| line.sku == sku)
            .ok_or_else(|| DomainError::invalid(format!("order {} has no line for sku {sku}", self.order_id)))
    }

    fn release(order_id: &str, line: &mut LineProgress, reaction: &mut Reaction) -> Result<(), DomainError> {
        let command = InventoryCommand::ReleaseStock { order_id: order_id.to_owned() };
        reaction.send::<Inventory>(format!("release:{}", line.sku), &line.sku, &command)?;
        line.stock = LineStock::Releasing;
        Ok(())
    }

    fn start(&mut self, order_id: String, event: OrderEvent, reaction: &mut Reaction) -> Result<(), DomainError> {
        let OrderEvent::OrderPlaced { items, payment_timeout_ms, .. } = event else {
            return Err(DomainError::invalid("an order fulfilment starts with `OrderPlaced`"));
        };
        self.order_id = order_id;
        self.payment_timeout_ms = payment_timeout_ms;
        self.phase = FulfilmentPhase::Reserving;
        self.lines = items
            .into_iter()
            .map(|item| LineProgress { sku: item.sku, qty: item.qty, stock: LineStock::Reserving })
            .collect();
        for line in &mut self.lines {
            let command = InventoryCommand::ReserveStock { order_id: self.order_id.clone(), qty: line.qty };
            reaction.send::<Inventory>(reserve_id(&line.sku), &line.sku, &command)?;
        }
        Ok(())
    }

    /// Every reservation is answered: go on, or cancel for want of stock.
    fn reservations_answered(&mut self, now: Timestamp, reaction: &mut Reaction) -> Result<(), DomainError> {
        let unavailable = self.lines.iter().find_map(|line| match &line.stock {
            LineStock::Unavailable { reason } => Some(format!("could not reserve stock of {}: {reason}", line.sku)),
            _ => None,
        });
        if let Some(reason) = unavailable {
            return self.cancel(reason, true, reaction);
        }
        reaction.send::<Order>("mark-reserved", &self.order_id, &OrderCommand::MarkOrderReserved {})?;
        self.phase = FulfilmentPhase::AwaitingPayment;
        if !self.paid {
            let timeout = Duration::from_millis(self.payment_timeout_ms);
            self.payment_due = Some(now + timeout);
            reaction.set_timer(PAYMENT_TIMER, timeout);
        }
        Ok(())
    }

    fn confirm_if_ready(&mut self, reaction: &mut Reaction) -> Result<(), DomainError> {
        if self.phase == FulfilmentPhase::AwaitingPayment && self.paid && self.marked_reserved {
            reaction.send::<Order>("confirm", &self.order_id, &OrderCommand::ConfirmOrder {})?;
            self.phase = FulfilmentPhase::Confirming;
        }
        Ok(())
    }

    /// Cancel the order (unless it is being cancelled already): release
    /// the stock reserved so far — reservations still unanswered are
    /// released when they are accepted — and, when `send_cancel`, tell the
    /// order why.
    fn cancel(&mut self, reason: String, send_cancel: bool, reaction: &mut Reaction) -> Result<(), DomainError> {
        if self.phase == FulfilmentPhase::Cancelling {
            return Ok(());
        }
        self.phase = FulfilmentPhase::Cancelling;
        if self.payment_due.take().is_some() {
            reaction.cancel_timer(PAYMENT_TIMER);
        }
        for line in self.lines.iter_mut().filter(|line| line.stock == LineStock::Reserved) {
            Self::release(&self.order_id, line, reaction)?;
        }
        if send_cancel {
            reaction.send::<Order>("cancel", &self.order_id, &OrderCommand::CancelOrder { reason })?;
            self.cancel_awaited = true;
        }
        self.finish_if_settled(reaction);
        Ok(())
    }

    /// Done once the order is settled: every line's stock committed, or,
    /// when cancelling, every reservation and release answered and the
    /// saga's own `cancel` too. (A `mark-reserved` still in flight then is
    /// refused by the cancelled order; its outcome is not needed.)
    fn finish_if_settled(&self, reaction: &mut Reaction) {
        let settled = match self.phase {
            FulfilmentPhase::Committing => self.lines.iter().all(|line| line.stock == LineStock::Committed),
            FulfilmentPhase::Cancelling => {
                !self.cancel_awaited
                    && self.lines.iter().all(|line| !matches!(line.stock, LineStock::Reserving | LineStock::Releasing))
            }
            _ => false,
        };
        if settled {
            reaction.complete();
        }
    }

    fn on_outcome(
        &mut self,
        request_id: &str,
        result: CommandResult,
        now: Timestamp,
        reaction: &mut Reaction,
    ) -> Result<(), DomainError> {
        match request_id.split_once(':') {
            Some(("reserve", sku)) => {
                let cancelling = self.phase == FulfilmentPhase::Cancelling;
                let order_id = self.order_id.clone();
                let line = self.line_mut(sku)?;
                match result {
                    CommandResult::Accepted { .. } if cancelling => {
                        line.stock = LineStock::Reserved;
                        Self::release(&order_id, line, reaction)?;
                    }
                    CommandResult::Accepted { .. } => line.stock = LineStock::Reserved,
                    CommandResult::Rejected { reason, .. } => line.stock = LineStock::Unavailable { reason },
                }
                let all_answered = self.lines.iter().all(|line| line.stock != LineStock::Reserving);
                if self.phase == FulfilmentPhase::Reserving && all_answered {
                    self.reservations_answered(now, reaction)?;
                }
            }
            // Refused only when there is nothing to release or commit: the
            // line is settled either way.
            Some(("release", sku)) => self.line_mut(sku)?.stock = LineStock::Released,
            Some(("commit", sku)) => {
                if let CommandResult::Rejected { reason, code } = &result {
                    log::warn(
                        "stock commit refused",
                        &[("order", &self.order_id), ("sku", &sku), ("code", code), ("reason", reason)],
                    );
                }
                self.line_mut(sku)?.stock = LineStock::Committed;
            }
            _ => match (request_id, result) {
                ("mark-reserved", CommandResult::Accepted { .. }) => {
                    self.marked_reserved = true;
                    self.confirm_if_ready(reaction)?;
                }
                ("confirm", CommandResult::Accepted { .. }) => {
                    self.phase = FulfilmentPhase::Committing;
                    for line in &mut self.lines {
                        let command = InventoryCommand::CommitStock { order_id: self.order_id.clone() };
                        reaction.send::<Inventory>(format!("commit:{}", line.sku), &line.sku, &command)?;
                        line.stock = LineStock::Committing;
                    }
                }
                // Only a cancellation stops an order from being marked or
                // confirmed.
                ("mark-reserved" | "confirm", CommandResult::Rejected { reason, .. }) => {
                    self.cancel(format!("order was cancelled: {reason}"), false, reaction)?;
                }
                ("cancel", _) => self.cancel_awaited = false,
                (other, _) => return Err(DomainError::invalid(format!("unexpected outcome of `{other}`"))),
            },
        }
        self.finish_if_settled(reaction);
        Ok(())
    }
}

impl Saga for OrderFulfilment {
    const NAME: &'static str = "order_fulfilment";
    const STARTED_BY: &'static [&'static str] = &["OrderPlaced"];
    type Event = OrderEvent;

    /// The placement, the payment and a cancellation concern the saga; the
    /// rest it caused itself.
    fn correlate(event: &Envelope<OrderEvent>) -> Vec<String> {
        match event.event {
            OrderEvent::OrderPlaced { .. } | OrderEvent::OrderPaid { .. } | OrderEvent::OrderCancelled { .. } => {
                vec![event.aggregate_id.clone()]
            }
            OrderEvent::OrderReserved {} | OrderEvent::OrderConfirmed {} | OrderEvent::OrderRefunded { .. } => {
                Vec::new()
            }
        }
    }

    fn react(
        &mut self,
        input: SagaInput<OrderEvent>,
        now: Timestamp,
        reaction: &mut Reaction,
    ) -> Result<(), DomainError> {
        match input {
            SagaInput::Event(envelope) if self.phase == FulfilmentPhase::Starting => {
                self.start(envelope.aggregate_id, envelope.event, reaction)
            }
            SagaInput::Event(envelope) => match envelope.event {
                OrderEvent::OrderPaid { .. } => {
                    self.paid = true;
                    if self.payment_due.take().is_some() {
                        reaction.cancel_timer(PAYMENT_TIMER);
                    }
                    self.confirm_if_ready(reaction)
                }
                OrderEvent::OrderCancelled { reason } => self.cancel(reason, false, reaction),
                _ => Ok(()),
            },
            SagaInput::Outcome { request_id, result } => self.on_outcome(&request_id, result, now, reaction),
            SagaInput::Timer { name } if name == PAYMENT_TIMER => match self.payment_due.take() {
                Some(due) if self.phase == FulfilmentPhase::AwaitingPayment => {
                    let reason = format!("no payment within {} ms (due {due})", self.payment_timeout_ms);
                    self.cancel(reason, true, reaction)
                }
                _ => Ok(()),
            },
            SagaInput::Timer { name } => Err(DomainError::invalid(format!("unknown timer `{name}`"))),
            SagaInput::Cancelled { reason } => match self.phase {
                FulfilmentPhase::Starting | FulfilmentPhase::Reserving | FulfilmentPhase::AwaitingPayment => {
                    self.cancel(format!("cancelled by operator: {reason}"), true, reaction)
                }
                FulfilmentPhase::Confirming | FulfilmentPhase::Committing | FulfilmentPhase::Cancelling => {
                    log::info(
                        "cancel ignored: the order is already settling",
                        &[("order", &self.order_id), ("reason", &reason)],
                    );
                    Ok(())
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::OrderLine;
    use orchestrix_guest::CommandRequest;
    use orchestrix_guest::testing::{START, SagaFixture, command, envelope, event, saga};

    const ORDER: &str = "o-1";
    const TIMEOUT: Duration = Duration::from_secs(30);

    fn placed() -> SagaInput<OrderEvent> {
        event(
            "order",
            ORDER,
            OrderEvent::OrderPlaced {
                customer: "ada".into(),
                items: vec![
                    OrderLine { sku: "apple".into(), qty: 2, price_cents: 150 },
                    OrderLine { sku: "pear".into(), qty: 1, price_cents: 300 },
                ],
                payment_timeout_ms: 30_000,
                total_cents: 600,
            },
        )
    }

    fn paid() -> SagaInput<OrderEvent> {
        event("order", ORDER, OrderEvent::OrderPaid { amount_cents: 600 })
    }

    fn accepted(request_id: &str) -> SagaInput<OrderEvent> {
        SagaInput::accepted(request_id, 1)
    }

    fn out_of_stock(request_id: &str) -> SagaInput<OrderEvent> {
        SagaInput::rejected(request_id, "insufficient stock: available 0, requested 1", 422)
    }

    fn reserve(sku: &str, qty: u64) -> CommandRequest {
        command::<Inventory>(
            &format!("reserve:{sku}"),
            sku,
            InventoryCommand::ReserveStock { order_id: ORDER.into(), qty },
        )
    }

    fn release(sku: &str) -> CommandRequest {
        command::<Inventory>(&format!("release:{sku}"), sku, InventoryCommand::ReleaseStock { order_id: ORDER.into() })
    }

    fn commit(sku: &str) -> CommandRequest {
        command::<Inventory>(&format!("commit:{sku}"), sku, InventoryCommand::CommitStock { order_id: ORDER.into() })
    }

    fn to_order(request_id: &str, order_command: OrderCommand) -> CommandRequest {
        command::<Order>(request_id, ORDER, order_command)
    }

    /// Every line reserved, the order marked RESERVED: waiting for payment.
    fn awaiting_payment() -> SagaFixture<OrderFulfilment> {
        saga::<OrderFulfilment>().given([
            placed(),
            accepted("reserve:apple"),
            accepted("reserve:pear"),
            accepted("mark-reserved"),
        ])
    }

    #[test]
    fn correlates_placement_payment_and_cancellation_to_the_order() {
        let fixture = saga::<OrderFulfilment>();
        assert_eq!(fixture.correlate(envelope("order", ORDER, OrderEvent::OrderPaid { amount_cents: 1 })), [ORDER]);
        let cancelled = OrderEvent::OrderCancelled { reason: "x".into() };
        assert_eq!(fixture.correlate(envelope("order", ORDER, cancelled)), [ORDER]);
        assert!(fixture.correlate(envelope("order", ORDER, OrderEvent::OrderConfirmed {})).is_empty());
    }

    #[test]
    fn reserves_every_line_then_waits_for_payment_then_confirms_and_commits() {
        saga::<OrderFulfilment>()
            .when(placed())
            .then_expect_commands([reserve("apple", 2), reserve("pear", 1)])
            .then_expect_timers([]);
        saga::<OrderFulfilment>()
            .given([placed()])
            .when(accepted("reserve:apple"))
            .then_expect_commands([])
            .then_expect_timers([]);
        saga::<OrderFulfilment>()
            .given([placed(), accepted("reserve:apple")])
            .when(accepted("reserve:pear"))
            .then_expect_commands([to_order("mark-reserved", OrderCommand::MarkOrderReserved {})])
            .then_expect_timers([(PAYMENT_TIMER, TIMEOUT)])
            .then_expect_running();
        awaiting_payment()
            .when(paid())
            .then_expect_commands([to_order("confirm", OrderCommand::ConfirmOrder {})])
            .then_expect_cancelled_timers([PAYMENT_TIMER]);
        awaiting_payment()
            .given([paid()])
            .when(accepted("confirm"))
            .then_expect_commands([commit("apple"), commit("pear")])
            .then_expect_running();
        awaiting_payment()
            .given([paid(), accepted("confirm"), accepted("commit:apple")])
            .when(accepted("commit:pear"))
            .then_expect_commands([])
            .then_expect_done();
    }

    #[test]
    fn the_state_tracks_every_line_and_the_payment_deadline() {
        let line = |sku: &str, qty, stock| LineProgress { sku: sku.into(), qty, stock };
        saga::<OrderFulfilment>()
            .given([placed(), accepted("reserve:apple")])
            .after(Duration::from_secs(5))
            .when(accepted("reserve:pear"))
            .then_expect_state(OrderFulfilment {
                order_id: ORDER.into(),
                lines: vec![line("apple", 2, LineStock::Reserved), line("pear", 1, LineStock::Reserved)],
                payment_timeout_ms: 30_000,
                phase: FulfilmentPhase::AwaitingPayment,
                paid: false,
                marked_reserved: false,
                payment_due: Some(START + Duration::from_secs(35)),
                cancel_awaited: false,
            });
    }

    #[test]
    fn a_refused_reservation_releases_the_others_and_cancels_for_want_of_stock() {
        saga::<OrderFulfilment>()
            .given([placed(), accepted("reserve:apple")])
            .when(out_of_stock("reserve:pear"))
            .then_expect_commands([
                release("apple"),
                to_order(
                    "cancel",
                    OrderCommand::CancelOrder {
                        reason: "could not reserve stock of pear: insufficient stock: available 0, requested 1".into(),
                    },
                ),
            ])
            .then_expect_timers([])
            .then_expect_running();
        // Every reservation refused: nothing to release.
        saga::<OrderFulfilment>()
            .given([placed(), out_of_stock("reserve:apple")])
            .when(out_of_stock("reserve:pear"))
            .then_expect_commands([to_order(
                "cancel",
                OrderCommand::CancelOrder {
                    reason: "could not reserve stock of apple: insufficient stock: available 0, requested 1".into(),
                },
            )]);
        saga::<OrderFulfilment>()
            .given([placed(), accepted("reserve:apple"), out_of_stock("reserve:pear"), accepted("release:apple")])
            .when(accepted("cancel"))
            .then_expect_done();
    }

    #[test]
    fn no_payment_in_time_cancels_the_order_and_releases_its_stock() {
        awaiting_payment()
            .when(SagaInput::timer(PAYMENT_TIMER))
            .then_expect_commands([
                release("apple"),
                release("pear"),
                to_order(
                    "cancel",
                    OrderCommand::CancelOrder {
                        reason: "no payment within 30000 ms (due 2026-01-01T00:00:30.000Z)".into(),
                    },
                ),
            ])
            .then_expect_cancelled_timers([])
            .then_expect_running();
        awaiting_payment()
            .given([SagaInput::timer(PAYMENT_TIMER), accepted("release:apple"), accepted("cancel")])
            .when(accepted("release:pear"))
            .then_expect_done();
    }

    #[test]
    fn a_payment_after_the_cancellation_is_left_to_the_order_which_refunds_it() {
        // The timer won the race: the saga cancelled; the order, already
        // paid, refunds (see order.rs); the late `OrderPaid` changes nothing.
        awaiting_payment()
            .given([SagaInput::timer(PAYMENT_TIMER)])
            .when(paid())
            .then_expect_commands([])
            .then_expect_cancelled_timers([])
            .then_expect_running();
    }

    #[test]
    fn a_payment_before_the_stock_is_reserved_confirms_once_it_is() {
        saga::<OrderFulfilment>()
            .given([placed(), paid(), accepted("reserve:apple")])
            .when(accepted("reserve:pear"))
            .then_expect_commands([to_order("mark-reserved", OrderCommand::MarkOrderReserved {})])
            .then_expect_timers([]);
        saga::<OrderFulfilment>()
            .given([placed(), paid(), accepted("reserve:apple"), accepted("reserve:pear")])
            .when(accepted("mark-reserved"))
            .then_expect_commands([to_order("confirm", OrderCommand::ConfirmOrder {})]);
        // Paid while the RESERVED mark is in flight: confirm once it lands.
        saga::<OrderFulfilment>()
            .given([placed(), accepted("reserve:apple"), accepted("reserve:pear"), paid()])
            .when(accepted("mark-reserved"))
            .then_expect_commands([to_order("confirm", OrderCommand::ConfirmOrder {})]);
    }

    #[test]
    fn an_order_cancelled_by_someone_else_gets_its_stock_released() {
        let cancelled =
            event("order", ORDER, OrderEvent::OrderCancelled { reason: "customer changed their mind".into() });
        awaiting_payment()
            .when(cancelled.clone())
            .then_expect_commands([release("apple"), release("pear")])
            .then_expect_cancelled_timers([PAYMENT_TIMER]);
        awaiting_payment()
            .given([cancelled, accepted("release:apple")])
            .when(accepted("release:pear"))
            .then_expect_done();
        // Found out through a refused confirmation.
        awaiting_payment()
            .given([paid()])
            .when(SagaInput::rejected("confirm", "cannot confirm: order is CANCELLED, must be RESERVED", 422))
            .then_expect_commands([release("apple"), release("pear")]);
    }

    #[test]
    fn an_operator_cancel_releases_what_is_reserved_and_what_gets_reserved_later() {
        saga::<OrderFulfilment>()
            .given([placed(), accepted("reserve:apple")])
            .when(SagaInput::cancelled("suspected fraud"))
            .then_expect_commands([
                release("apple"),
                to_order(
                    "cancel",
                    OrderCommand::CancelOrder { reason: "cancelled by operator: suspected fraud".into() },
                ),
            ]);
        saga::<OrderFulfilment>()
            .given([placed(), accepted("reserve:apple"), SagaInput::cancelled("suspected fraud")])
            .when(accepted("reserve:pear"))
            .then_expect_commands([release("pear")]);
        // Once the payment is being confirmed it is too late.
        awaiting_payment().given([paid()]).when(SagaInput::cancelled("too late")).then_expect_commands([]);
    }
}
