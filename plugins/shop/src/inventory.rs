//! The `inventory` aggregate: the stock of one SKU (the aggregate id) and
//! the units reserved for orders.
//!
//! Stock is added, reserved for an order (never more than is available),
//! and then either released back (the order is cancelled) or committed (the
//! order is confirmed: the units leave the warehouse). An order holds at
//! most one reservation per SKU.

use std::collections::BTreeMap;

use orchestrix_guest::{Aggregate, DomainError};
use serde::{Deserialize, Serialize};

/// The folded state of one SKU's stock.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Units on hand and not reserved.
    pub available: u64,
    /// Units reserved, by order id.
    pub reserved: BTreeMap<String, u64>,
}

/// What can be asked of a SKU's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum InventoryCommand {
    AddStock { qty: u64 },
    ReserveStock { order_id: String, qty: u64 },
    ReleaseStock { order_id: String },
    CommitStock { order_id: String },
}

/// What happens to a SKU's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryEvent {
    StockAdded {
        qty: u64,
    },
    StockReserved {
        order_id: String,
        qty: u64,
    },
    /// The order's reservation went back to the available stock.
    StockReleased {
        order_id: String,
        qty: u64,
    },
    /// The order's reservation left the warehouse.
    StockCommitted {
        order_id: String,
        qty: u64,
    },
}

fn positive(qty: u64) -> Result<(), DomainError> {
    if qty > 0 { Ok(()) } else { Err(DomainError::invalid("qty must be greater than zero")) }
}

fn order_named(order_id: &str) -> Result<(), DomainError> {
    if order_id.trim().is_empty() { Err(DomainError::invalid("order_id must not be empty")) } else { Ok(()) }
}

impl Inventory {
    fn reservation(&self, order_id: &str) -> Result<u64, DomainError> {
        order_named(order_id)?;
        self.reserved
            .get(order_id)
            .copied()
            .ok_or_else(|| DomainError::rejected(format!("no stock is reserved for order {order_id}")))
    }
}

impl Aggregate for Inventory {
    const TYPE: &'static str = "inventory";
    type Command = InventoryCommand;
    type Event = InventoryEvent;
    const STATE_VERSION: Option<u32> = Some(1);

    fn handle(&self, command: InventoryCommand) -> Result<Vec<InventoryEvent>, DomainError> {
        use InventoryCommand::*;
        use InventoryEvent::*;
        let event = match command {
            AddStock { qty } => {
                positive(qty)?;
                if self.available.checked_add(qty).is_none() {
                    return Err(DomainError::rejected("adding this stock would overflow the count"));
                }
                StockAdded { qty }
            }
            ReserveStock { order_id, qty } => {
                order_named(&order_id)?;
                positive(qty)?;
                if self.reserved.contains_key(&order_id) {
                    return Err(DomainError::rejected(format!("stock is already reserved for order {order_id}")));
                }
                if self.available < qty {
                    return Err(DomainError::rejected(format!(
                        "insufficient stock: available {}, requested {qty}",
                        self.available
                    )));
                }
                StockReserved { order_id, qty }
            }
            ReleaseStock { order_id } => {
                let qty = self.reservation(&order_id)?;
                StockReleased { order_id, qty }
            }
            CommitStock { order_id } => {
                let qty = self.reservation(&order_id)?;
                StockCommitted { order_id, qty }
            }
        };
        Ok(vec![event])
    }

    fn apply(&mut self, event: InventoryEvent) {
        match event {
            InventoryEvent::StockAdded { qty } => self.available = self.available.saturating_add(qty),
            InventoryEvent::StockReserved { order_id, qty } => {
                self.available = self.available.saturating_sub(qty);
                self.reserved.insert(order_id, qty);
            }
            InventoryEvent::StockReleased { order_id, qty } => {
                self.reserved.remove(&order_id);
                self.available = self.available.saturating_add(qty);
            }
            InventoryEvent::StockCommitted { order_id, .. } => {
                self.reserved.remove(&order_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InventoryCommand::*;
    use super::InventoryEvent::*;
    use super::*;
    use orchestrix_guest::testing::given;
    use serde_json::json;

    fn reserved(order_id: &str, qty: u64) -> InventoryEvent {
        StockReserved { order_id: order_id.into(), qty }
    }

    #[test]
    fn adds_stock_in_positive_quantities() {
        given::<Inventory>([]).when(AddStock { qty: 5 }).then_expect_events([StockAdded { qty: 5 }]);
        given::<Inventory>([]).when(AddStock { qty: 0 }).then_expect_invalid("greater than zero");
        given::<Inventory>([StockAdded { qty: u64::MAX }]).when(AddStock { qty: 1 }).then_expect_rejection("overflow");
    }

    #[test]
    fn reserves_only_what_is_available_once_per_order() {
        given::<Inventory>([StockAdded { qty: 5 }])
            .when(ReserveStock { order_id: "o-1".into(), qty: 5 })
            .then_expect_events([reserved("o-1", 5)]);
        given::<Inventory>([StockAdded { qty: 5 }, reserved("o-1", 3)])
            .when(ReserveStock { order_id: "o-2".into(), qty: 3 })
            .then_expect_rejection("insufficient stock: available 2, requested 3");
        given::<Inventory>([])
            .when(ReserveStock { order_id: "o-1".into(), qty: 1 })
            .then_expect_rejection("available 0");
        given::<Inventory>([StockAdded { qty: 5 }, reserved("o-1", 1)])
            .when(ReserveStock { order_id: "o-1".into(), qty: 1 })
            .then_expect_rejection("already reserved for order o-1");
        given::<Inventory>([StockAdded { qty: 5 }])
            .when(ReserveStock { order_id: "o-1".into(), qty: 0 })
            .then_expect_invalid("greater than zero");
        given::<Inventory>([StockAdded { qty: 5 }])
            .when(ReserveStock { order_id: "".into(), qty: 1 })
            .then_expect_invalid("order_id");
    }

    #[test]
    fn releases_or_commits_an_existing_reservation() {
        let history = [StockAdded { qty: 5 }, reserved("o-1", 2)];
        given::<Inventory>(history.clone())
            .when(ReleaseStock { order_id: "o-1".into() })
            .then_expect_events([StockReleased { order_id: "o-1".into(), qty: 2 }]);
        given::<Inventory>(history.clone())
            .when(CommitStock { order_id: "o-1".into() })
            .then_expect_events([StockCommitted { order_id: "o-1".into(), qty: 2 }]);
        given::<Inventory>(history.clone())
            .when(ReleaseStock { order_id: "o-2".into() })
            .then_expect_rejection("no stock is reserved for order o-2");
        given::<Inventory>([
            StockAdded { qty: 5 },
            reserved("o-1", 2),
            StockCommitted { order_id: "o-1".into(), qty: 2 },
        ])
        .when(ReleaseStock { order_id: "o-1".into() })
        .then_expect_rejection("no stock is reserved");
    }

    #[test]
    fn state_counts_available_and_reserved_units() {
        let history = [StockAdded { qty: 10 }, reserved("o-1", 2), reserved("o-2", 3)];
        assert_eq!(
            given::<Inventory>(history.clone()).state_json(),
            json!({"available": 5, "reserved": {"o-1": 2, "o-2": 3}})
        );
        let released = [history.to_vec(), vec![StockReleased { order_id: "o-1".into(), qty: 2 }]].concat();
        assert_eq!(given::<Inventory>(released).state_json(), json!({"available": 7, "reserved": {"o-2": 3}}));
        let committed = [history.to_vec(), vec![StockCommitted { order_id: "o-2".into(), qty: 3 }]].concat();
        assert_eq!(given::<Inventory>(committed).state_json(), json!({"available": 5, "reserved": {"o-1": 2}}));
    }
}
