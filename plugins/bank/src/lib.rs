//! The banking example module: the `account` aggregate (here), two
//! projections of it (`account_summaries`, `status_totals`; see
//! `projections.rs`), and money transfers between accounts — the `transfer`
//! aggregate (`transfer.rs`) and the `money_transfer` saga that moves the
//! money and compensates (`money_transfer.rs`).
//!
//! Amounts are integer cents. An account is opened once, takes deposits and
//! withdrawals while ACTIVE (never overdrawn), can be suspended and
//! reactivated, and is closed for good once its balance is zero. A deposit
//! to an account that is not ACTIVE (never opened, suspended, closed) is
//! rejected — which is what sends a transfer's money back.

mod money_transfer;
mod projections;
mod transfer;

use orchestrix_guest::{Aggregate, DomainError, Module, ModuleBuilder};
use serde::{Deserialize, Serialize};

pub use money_transfer::{MoneyTransfer, REFUND_RETRY, TransferStep};
pub use projections::{AccountSummaries, AccountSummary, StatusTotal, StatusTotals};
pub use transfer::{Transfer, TransferCommand, TransferEvent, TransferStatus};

/// Lifecycle of an account.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Never opened: every command but `OpenAccount` is refused.
    #[default]
    New,
    Active,
    Suspended,
    Closed,
}

impl Status {
    /// The name used on the wire and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Status::New => "NEW",
            Status::Active => "ACTIVE",
            Status::Suspended => "SUSPENDED",
            Status::Closed => "CLOSED",
        }
    }
}

/// The folded state of one account.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub status: Status,
    pub owner: String,
    pub balance: i64,
}

/// What can be asked of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum AccountCommand {
    OpenAccount { owner: String, initial_balance: i64 },
    DepositMoney { amount: i64 },
    WithdrawMoney { amount: i64 },
    SuspendAccount { reason: String },
    ReactivateAccount {},
    CloseAccount {},
}

/// What happens to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    AccountOpened { owner: String, initial_balance: i64 },
    MoneyDeposited { amount: i64 },
    MoneyWithdrawn { amount: i64 },
    AccountSuspended { reason: String },
    AccountReactivated {},
    AccountClosed {},
}

fn positive(amount: i64) -> Result<(), DomainError> {
    if amount > 0 {
        Ok(())
    } else {
        Err(DomainError::invalid(format!("amount must be greater than zero, got {amount}")))
    }
}

impl Account {
    fn require(&self, wanted: Status, action: &str) -> Result<(), DomainError> {
        match self.status {
            Status::New => Err(DomainError::rejected("account does not exist")),
            status if status == wanted => Ok(()),
            status => Err(DomainError::rejected(format!(
                "cannot {action}: account is {}, must be {}",
                status.name(),
                wanted.name()
            ))),
        }
    }
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    const STATE_VERSION: Option<u32> = Some(1);

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, DomainError> {
        use AccountCommand::*;
        use AccountEvent::*;
        let event = match command {
            OpenAccount { owner, initial_balance } => {
                if self.status != Status::New {
                    return Err(DomainError::rejected("account already exists"));
                }
                if owner.trim().is_empty() {
                    return Err(DomainError::invalid("owner must not be empty"));
                }
                if initial_balance < 0 {
                    return Err(DomainError::rejected(format!(
                        "initial balance must not be negative, got {initial_balance}"
                    )));
                }
                AccountOpened { owner, initial_balance }
            }
            DepositMoney { amount } => {
                self.require(Status::Active, "deposit")?;
                positive(amount)?;
                if self.balance.checked_add(amount).is_none() {
                    return Err(DomainError::rejected("deposit would overflow the balance"));
                }
                MoneyDeposited { amount }
            }
            WithdrawMoney { amount } => {
                self.require(Status::Active, "withdraw")?;
                positive(amount)?;
                if self.balance < amount {
                    return Err(DomainError::rejected_with(
                        "insufficient_funds",
                        format!("insufficient funds: balance {}, requested {amount}", self.balance),
                    ));
                }
                MoneyWithdrawn { amount }
            }
            SuspendAccount { reason } => {
                self.require(Status::Active, "suspend")?;
                AccountSuspended { reason }
            }
            ReactivateAccount {} => {
                self.require(Status::Suspended, "reactivate")?;
                AccountReactivated {}
            }
            CloseAccount {} => {
                self.require(Status::Active, "close")?;
                if self.balance != 0 {
                    return Err(DomainError::rejected(format!(
                        "cannot close: balance is {}, must be zero",
                        self.balance
                    )));
                }
                AccountClosed {}
            }
        };
        Ok(vec![event])
    }

    fn apply(&mut self, event: AccountEvent) {
        match event {
            AccountEvent::AccountOpened { owner, initial_balance } => {
                self.status = Status::Active;
                self.owner = owner;
                self.balance = initial_balance;
            }
            AccountEvent::MoneyDeposited { amount } => self.balance += amount,
            AccountEvent::MoneyWithdrawn { amount } => self.balance -= amount,
            AccountEvent::AccountSuspended { .. } => self.status = Status::Suspended,
            AccountEvent::AccountReactivated {} => self.status = Status::Active,
            AccountEvent::AccountClosed {} => self.status = Status::Closed,
        }
    }
}

/// The `bank` module.
pub struct Bank;

impl Module for Bank {
    const NAME: &'static str = "bank";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn register(module: &mut ModuleBuilder) {
        module
            .aggregate::<Account>()
            .aggregate::<Transfer>()
            .projection::<AccountSummaries>()
            .projection::<StatusTotals>()
            .saga::<MoneyTransfer>();
    }
}

orchestrix_guest::export!(Bank);

#[cfg(test)]
mod tests {
    use super::AccountCommand::*;
    use super::AccountEvent::*;
    use super::*;
    use orchestrix_guest::testing::given;

    fn opened(balance: i64) -> AccountEvent {
        AccountOpened { owner: "Ada".into(), initial_balance: balance }
    }

    #[test]
    fn opens_with_zero_or_positive_balance() {
        given::<Account>([])
            .when(OpenAccount { owner: "Ada".into(), initial_balance: 0 })
            .then_expect_events([opened(0)]);
        given::<Account>([])
            .when(OpenAccount { owner: "Ada".into(), initial_balance: 500 })
            .then_expect_events([opened(500)]);
    }

    #[test]
    fn refuses_negative_initial_balance_and_second_open() {
        given::<Account>([])
            .when(OpenAccount { owner: "Ada".into(), initial_balance: -1 })
            .then_expect_rejection("negative");
        given::<Account>([opened(0)])
            .when(OpenAccount { owner: "Bob".into(), initial_balance: 0 })
            .then_expect_rejection("already exists");
    }

    #[test]
    fn deposits_and_withdraws_while_active() {
        given::<Account>([opened(100)])
            .when(DepositMoney { amount: 50 })
            .then_expect_events([MoneyDeposited { amount: 50 }]);
        given::<Account>([opened(100), MoneyDeposited { amount: 50 }])
            .when(WithdrawMoney { amount: 150 })
            .then_expect_events([MoneyWithdrawn { amount: 150 }]);
    }

    #[test]
    fn a_day_of_an_account_in_chained_commands() {
        given::<Account>([])
            .when(OpenAccount { owner: "Ada".into(), initial_balance: 100 })
            .when(DepositMoney { amount: 50 })
            .then_expect_events([MoneyDeposited { amount: 50 }])
            .when(WithdrawMoney { amount: 30 })
            .then_expect_state(serde_json::json!({"status": "ACTIVE", "owner": "Ada", "balance": 120}))
            .when(WithdrawMoney { amount: 500 })
            .then_expect_rejection_code("insufficient_funds");
    }

    #[test]
    fn amounts_must_be_positive() {
        for amount in [0, -5] {
            given::<Account>([opened(100)]).when(DepositMoney { amount }).then_expect_invalid("greater than zero");
            given::<Account>([opened(100)]).when(WithdrawMoney { amount }).then_expect_invalid("greater than zero");
        }
    }

    #[test]
    fn never_overdraws() {
        given::<Account>([opened(100), MoneyWithdrawn { amount: 60 }])
            .when(WithdrawMoney { amount: 41 })
            .then_expect_rejection("insufficient funds");
    }

    #[test]
    fn money_moves_only_while_active() {
        let suspended = [opened(100), AccountSuspended { reason: "audit".into() }];
        given::<Account>(suspended.clone()).when(DepositMoney { amount: 1 }).then_expect_rejection("SUSPENDED");
        given::<Account>(suspended).when(WithdrawMoney { amount: 1 }).then_expect_rejection("SUSPENDED");
    }

    #[test]
    fn suspends_only_active_and_reactivates_only_suspended() {
        given::<Account>([opened(0)])
            .when(SuspendAccount { reason: "audit".into() })
            .then_expect_events([AccountSuspended { reason: "audit".into() }]);
        given::<Account>([opened(0), AccountSuspended { reason: "audit".into() }])
            .when(SuspendAccount { reason: "again".into() })
            .then_expect_rejection("must be ACTIVE");
        given::<Account>([opened(0)]).when(ReactivateAccount {}).then_expect_rejection("must be SUSPENDED");
        given::<Account>([opened(0), AccountSuspended { reason: "audit".into() }])
            .when(ReactivateAccount {})
            .then_expect_events([AccountReactivated {}]);
    }

    #[test]
    fn closes_only_active_with_zero_balance_and_stays_closed() {
        given::<Account>([opened(10)]).when(CloseAccount {}).then_expect_rejection("must be zero");
        given::<Account>([opened(0), AccountSuspended { reason: "x".into() }])
            .when(CloseAccount {})
            .then_expect_rejection("must be ACTIVE");
        given::<Account>([opened(0)]).when(CloseAccount {}).then_expect_events([AccountClosed {}]);
        let closed = [opened(0), AccountClosed {}];
        for command in [
            DepositMoney { amount: 1 },
            WithdrawMoney { amount: 1 },
            SuspendAccount { reason: "x".into() },
            ReactivateAccount {},
            CloseAccount {},
            OpenAccount { owner: "Ada".into(), initial_balance: 0 },
        ] {
            assert!(given::<Account>(closed.clone()).when(command).result().is_err());
        }
    }

    #[test]
    fn never_opened_accounts_refuse_everything_but_open() {
        for command in [
            DepositMoney { amount: 1 },
            WithdrawMoney { amount: 1 },
            SuspendAccount { reason: "x".into() },
            ReactivateAccount {},
            CloseAccount {},
        ] {
            given::<Account>([]).when(command).then_expect_rejection("does not exist");
        }
    }

    #[test]
    fn deposits_to_accounts_that_are_not_active_are_rejected() {
        // Rejected (422), not invalid: a transfer's deposit refused so is
        // compensated by a refund.
        given::<Account>([]).when(DepositMoney { amount: 1 }).then_expect_rejection("account does not exist");
        given::<Account>([opened(0), AccountSuspended { reason: "audit".into() }])
            .when(DepositMoney { amount: 1 })
            .then_expect_rejection("cannot deposit: account is SUSPENDED, must be ACTIVE");
        given::<Account>([opened(0), AccountClosed {}])
            .when(DepositMoney { amount: 1 })
            .then_expect_rejection("cannot deposit: account is CLOSED, must be ACTIVE");
    }

    #[test]
    fn wire_format_matches_the_documented_bodies() {
        given::<Account>([])
            .when_raw("OpenAccount", r#"{"owner": "Ada", "initial_balance": 7}"#)
            .then_expect_events([opened(7)]);
        given::<Account>([opened(0)])
            .when_raw("DepositMoney", r#"{"amount": "ten"}"#)
            .then_expect_invalid("DepositMoney");
        given::<Account>([opened(0)]).when_raw("ReactivateAccount", "{}").then_expect_rejection("must be SUSPENDED");
        assert_eq!(
            given::<Account>([opened(7), MoneyDeposited { amount: 3 }]).state_json(),
            serde_json::json!({"status": "ACTIVE", "owner": "Ada", "balance": 10})
        );
    }
}
