//! Read models of the bank module.
//!
//! - `account_summaries`: one document per account in collection `accounts`
//!   (key: the account id) — owner, balance, status and the number of
//!   deposits and withdrawals.
//! - `status_totals`: one document per status in collection `statuses` (key:
//!   `ACTIVE`, `SUSPENDED`, `CLOSED`) — how many accounts are in it and the
//!   money they hold. It keeps each account's last known status and balance
//!   in its own collection `accounts`, so it can move an account's money
//!   between totals when the status changes.

use orchestrix_guest::{DocumentKey, Documents, DomainError, Envelope, Projection};
use serde::{Deserialize, Serialize};

use crate::{AccountEvent, Status};

/// `accounts/<id>` of `account_summaries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSummary {
    pub owner: String,
    pub balance: i64,
    pub status: Status,
    /// Deposits and withdrawals.
    pub transactions: u64,
}

/// Per-account summaries.
#[derive(Default)]
pub struct AccountSummaries;

impl Projection for AccountSummaries {
    const NAME: &'static str = "account_summaries";
    type Event = AccountEvent;

    fn touches(&self, event: &Envelope<AccountEvent>) -> Vec<DocumentKey> {
        vec![DocumentKey::new("accounts", &event.aggregate_id)]
    }

    fn project(&self, event: &Envelope<AccountEvent>, documents: &mut Documents) -> Result<(), DomainError> {
        let id = event.aggregate_id.as_str();
        if let AccountEvent::AccountOpened { owner, initial_balance } = &event.event {
            let summary = AccountSummary {
                owner: owner.clone(),
                balance: *initial_balance,
                status: Status::Active,
                transactions: 0,
            };
            return documents.upsert("accounts", id, &summary);
        }
        let Some(mut summary) = documents.get::<AccountSummary>("accounts", id)? else {
            return Err(DomainError::Invalid(format!("account {id} has events but was never opened")));
        };
        match &event.event {
            AccountEvent::AccountOpened { .. } => unreachable!("handled above"),
            AccountEvent::MoneyDeposited { amount } => {
                summary.balance += amount;
                summary.transactions += 1;
            }
            AccountEvent::MoneyWithdrawn { amount } => {
                summary.balance -= amount;
                summary.transactions += 1;
            }
            AccountEvent::AccountSuspended { .. } => summary.status = Status::Suspended,
            AccountEvent::AccountReactivated {} => summary.status = Status::Active,
            AccountEvent::AccountClosed {} => summary.status = Status::Closed,
        }
        documents.upsert("accounts", id, &summary)
    }
}

/// `statuses/<STATUS>` of `status_totals`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusTotal {
    pub accounts: u64,
    pub balance: i64,
}

/// What `status_totals` remembers of one account.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tracked {
    status: Status,
    balance: i64,
}

/// Accounts and money by status.
#[derive(Default)]
pub struct StatusTotals;

const TRACKED_STATUSES: [Status; 3] = [Status::Active, Status::Suspended, Status::Closed];

impl StatusTotals {
    fn add(documents: &mut Documents, status: Status, accounts: i64, balance: i64) -> Result<(), DomainError> {
        let mut total = documents.get::<StatusTotal>("statuses", status.name())?.unwrap_or_default();
        total.accounts = total.accounts.saturating_add_signed(accounts);
        total.balance += balance;
        documents.upsert("statuses", status.name(), &total)
    }
}

impl Projection for StatusTotals {
    const NAME: &'static str = "status_totals";
    type Event = AccountEvent;

    fn touches(&self, event: &Envelope<AccountEvent>) -> Vec<DocumentKey> {
        let mut keys = vec![DocumentKey::new("accounts", &event.aggregate_id)];
        keys.extend(TRACKED_STATUSES.iter().map(|s| DocumentKey::new("statuses", s.name())));
        keys
    }

    fn project(&self, event: &Envelope<AccountEvent>, documents: &mut Documents) -> Result<(), DomainError> {
        let id = event.aggregate_id.as_str();
        let before = documents.get::<Tracked>("accounts", id)?;
        let after = match (&event.event, &before) {
            (AccountEvent::AccountOpened { initial_balance, .. }, _) => {
                Tracked { status: Status::Active, balance: *initial_balance }
            }
            (_, None) => return Err(DomainError::Invalid(format!("account {id} has events but was never opened"))),
            (AccountEvent::MoneyDeposited { amount }, Some(t)) => Tracked { balance: t.balance + amount, ..t.clone() },
            (AccountEvent::MoneyWithdrawn { amount }, Some(t)) => Tracked { balance: t.balance - amount, ..t.clone() },
            (AccountEvent::AccountSuspended { .. }, Some(t)) => Tracked { status: Status::Suspended, ..t.clone() },
            (AccountEvent::AccountReactivated {}, Some(t)) => Tracked { status: Status::Active, ..t.clone() },
            (AccountEvent::AccountClosed {}, Some(t)) => Tracked { status: Status::Closed, ..t.clone() },
        };
        if let Some(before) = &before {
            Self::add(documents, before.status, -1, -before.balance)?;
        }
        Self::add(documents, after.status, 1, after.balance)?;
        documents.upsert("accounts", id, &after)
    }
}

#[cfg(test)]
mod tests {
    use orchestrix_guest::testing::projection;
    use serde_json::json;

    use super::*;
    use crate::AccountEvent::*;

    fn opened(owner: &str, balance: i64) -> AccountEvent {
        AccountOpened { owner: owner.into(), initial_balance: balance }
    }

    #[test]
    fn summaries_follow_balance_status_and_transactions() {
        projection::<AccountSummaries>()
            .given("account", "a1", [opened("Ada", 100), MoneyDeposited { amount: 50 }, MoneyWithdrawn { amount: 30 }])
            .then_expect_document(
                "accounts",
                "a1",
                json!({"owner": "Ada", "balance": 120, "status": "ACTIVE", "transactions": 2}),
            )
            .given("account", "a1", [AccountSuspended { reason: "fraud check".into() }])
            .then_expect_document(
                "accounts",
                "a1",
                json!({"owner": "Ada", "balance": 120, "status": "SUSPENDED", "transactions": 2}),
            )
            .then_expect_no_document("accounts", "a2");
    }

    #[test]
    fn summaries_refuse_events_of_an_account_never_opened() {
        let error = projection::<AccountSummaries>().given_failing("account", "ghost", MoneyDeposited { amount: 1 });
        assert!(error.to_string().contains("never opened"), "{error}");
    }

    #[test]
    fn totals_move_accounts_and_money_between_statuses() {
        projection::<StatusTotals>()
            .given("account", "a1", [opened("Ada", 100)])
            .given("account", "a2", [opened("Bob", 10), MoneyDeposited { amount: 5 }])
            .then_expect_document("statuses", "ACTIVE", json!({"accounts": 2, "balance": 115}))
            .given("account", "a1", [AccountSuspended { reason: "review".into() }])
            .then_expect_document("statuses", "ACTIVE", json!({"accounts": 1, "balance": 15}))
            .then_expect_document("statuses", "SUSPENDED", json!({"accounts": 1, "balance": 100}))
            .given("account", "a2", [MoneyWithdrawn { amount: 15 }, AccountClosed {}])
            .then_expect_document("statuses", "ACTIVE", json!({"accounts": 0, "balance": 0}))
            .then_expect_document("statuses", "CLOSED", json!({"accounts": 1, "balance": 0}))
            .given("account", "a1", [AccountReactivated {}])
            .then_expect_collection(
                "statuses",
                [
                    ("ACTIVE", json!({"accounts": 1, "balance": 100})),
                    ("SUSPENDED", json!({"accounts": 0, "balance": 0})),
                    ("CLOSED", json!({"accounts": 1, "balance": 0})),
                ],
            );
    }
}
