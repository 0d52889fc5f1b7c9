//! The shop example module: orders that reserve stock, wait for payment,
//! and are confirmed or cancelled.
//!
//! - `inventory` (`inventory.rs`): the stock of one SKU — added, reserved
//!   per order, released or committed.
//! - `order` (`order.rs`): what a customer ordered, its payment, and how it
//!   ended (PLACED → RESERVED → CONFIRMED, or CANCELLED with a reason); it
//!   refunds a payment that meets a cancellation, whichever comes first.
//! - `order_fulfilment` (`fulfilment.rs`): the saga that reserves every
//!   line, waits for the payment with a durable timer, and confirms the
//!   order and commits its stock, or cancels it and releases the stock.
//!
//! Amounts are integer cents, quantities whole units.

mod fulfilment;
mod inventory;
mod order;

use orchestrix_guest::{Module, ModuleBuilder};

pub use fulfilment::{FulfilmentPhase, LineProgress, LineStock, OrderFulfilment, PAYMENT_TIMER};
pub use inventory::{Inventory, InventoryCommand, InventoryEvent};
pub use order::{Order, OrderCommand, OrderEvent, OrderLine, OrderStatus};

/// The `shop` module.
pub struct Shop;

impl Module for Shop {
    const NAME: &'static str = "shop";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn register(module: &mut ModuleBuilder) {
        module.aggregate::<Inventory>().aggregate::<Order>().saga::<OrderFulfilment>();
    }
}

orchestrix_guest::export!(Shop);
