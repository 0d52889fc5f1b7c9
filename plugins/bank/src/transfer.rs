//! The `transfer` aggregate: a request to move money between two accounts,
//! and its outcome.
//!
//! `InitiateTransfer` records the request (PENDING); the `money_transfer`
//! saga (`money_transfer.rs`) then moves the money and records how it ended
//! with `CompleteTransfer` (COMPLETED) or `FailTransfer` (FAILED, saying
//! why and whether the withdrawn money went back). The aggregate keeps the
//! request and its outcome consistent; the accounts keep the money.

use orchestrix_guest::{Aggregate, DomainError};
use serde::{Deserialize, Serialize};

use crate::positive;

/// Where a transfer is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TransferStatus {
    /// Never initiated: every command but `InitiateTransfer` is refused.
    #[default]
    New,
    /// Initiated; the money is on its way.
    Pending,
    /// The money reached the target account.
    Completed,
    /// The money did not reach the target account.
    Failed,
}

impl TransferStatus {
    /// The name used on the wire and in messages.
    pub fn name(self) -> &'static str {
        match self {
            TransferStatus::New => "NEW",
            TransferStatus::Pending => "PENDING",
            TransferStatus::Completed => "COMPLETED",
            TransferStatus::Failed => "FAILED",
        }
    }
}

/// The folded state of one transfer (its id is the aggregate id).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub status: TransferStatus,
    /// The account the money leaves.
    pub from: String,
    /// The account the money goes to.
    pub to: String,
    /// Integer cents.
    pub amount: i64,
    /// Why it failed, once FAILED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the money withdrawn from `from` was put back, once FAILED.
    #[serde(default)]
    pub refunded: bool,
}

/// What can be asked of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum TransferCommand {
    InitiateTransfer {
        from: String,
        to: String,
        amount: i64,
    },
    /// Record that the money reached `to` (sent by the saga).
    CompleteTransfer {},
    /// Record that it did not (sent by the saga).
    FailTransfer {
        reason: String,
        refunded: bool,
    },
}

/// What happens to a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferEvent {
    TransferInitiated { from: String, to: String, amount: i64 },
    TransferCompleted {},
    TransferFailed { reason: String, refunded: bool },
}

impl Transfer {
    fn require_pending(&self, action: &str) -> Result<(), DomainError> {
        match self.status {
            TransferStatus::New => Err(DomainError::rejected("transfer does not exist")),
            TransferStatus::Pending => Ok(()),
            status => {
                Err(DomainError::rejected(format!("cannot {action}: transfer is {}, must be PENDING", status.name())))
            }
        }
    }
}

impl Aggregate for Transfer {
    const TYPE: &'static str = "transfer";
    type Command = TransferCommand;
    type Event = TransferEvent;
    const STATE_VERSION: Option<u32> = Some(1);

    fn handle(&self, command: TransferCommand) -> Result<Vec<TransferEvent>, DomainError> {
        use TransferCommand::*;
        use TransferEvent::*;
        let event = match command {
            InitiateTransfer { from, to, amount } => {
                if self.status != TransferStatus::New {
                    return Err(DomainError::rejected("transfer already exists"));
                }
                if from.trim().is_empty() || to.trim().is_empty() {
                    return Err(DomainError::invalid("`from` and `to` must name accounts"));
                }
                if from == to {
                    return Err(DomainError::invalid(format!("cannot transfer from account {from} to itself")));
                }
                positive(amount)?;
                TransferInitiated { from, to, amount }
            }
            CompleteTransfer {} => {
                self.require_pending("complete")?;
                TransferCompleted {}
            }
            FailTransfer { reason, refunded } => {
                self.require_pending("fail")?;
                if reason.trim().is_empty() {
                    return Err(DomainError::invalid("a failed transfer needs a reason"));
                }
                TransferFailed { reason, refunded }
            }
        };
        Ok(vec![event])
    }

    fn apply(&mut self, event: TransferEvent) {
        match event {
            TransferEvent::TransferInitiated { from, to, amount } => {
                self.status = TransferStatus::Pending;
                self.from = from;
                self.to = to;
                self.amount = amount;
            }
            TransferEvent::TransferCompleted {} => self.status = TransferStatus::Completed,
            TransferEvent::TransferFailed { reason, refunded } => {
                self.status = TransferStatus::Failed;
                self.reason = Some(reason);
                self.refunded = refunded;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TransferCommand::*;
    use super::TransferEvent::*;
    use super::*;
    use orchestrix_guest::testing::given;
    use serde_json::json;

    fn initiated() -> TransferEvent {
        TransferInitiated { from: "alice".into(), to: "bob".into(), amount: 300 }
    }

    #[test]
    fn initiates_once_between_two_accounts() {
        given::<Transfer>([])
            .when(InitiateTransfer { from: "alice".into(), to: "bob".into(), amount: 300 })
            .then_expect_events([initiated()]);
        given::<Transfer>([initiated()])
            .when(InitiateTransfer { from: "alice".into(), to: "bob".into(), amount: 300 })
            .then_expect_rejection("already exists");
        given::<Transfer>([])
            .when(InitiateTransfer { from: "alice".into(), to: "alice".into(), amount: 300 })
            .then_expect_invalid("to itself");
        given::<Transfer>([])
            .when(InitiateTransfer { from: " ".into(), to: "bob".into(), amount: 300 })
            .then_expect_invalid("must name accounts");
        given::<Transfer>([])
            .when(InitiateTransfer { from: "alice".into(), to: "bob".into(), amount: 0 })
            .then_expect_invalid("greater than zero");
    }

    #[test]
    fn ends_once_completed_or_failed() {
        given::<Transfer>([initiated()]).when(CompleteTransfer {}).then_expect_events([TransferCompleted {}]);
        given::<Transfer>([initiated()])
            .when(FailTransfer { reason: "target closed".into(), refunded: true })
            .then_expect_events([TransferFailed { reason: "target closed".into(), refunded: true }]);
        given::<Transfer>([initiated(), TransferCompleted {}])
            .when(FailTransfer { reason: "late".into(), refunded: false })
            .then_expect_rejection("transfer is COMPLETED, must be PENDING");
        given::<Transfer>([initiated(), TransferFailed { reason: "x".into(), refunded: false }])
            .when(CompleteTransfer {})
            .then_expect_rejection("transfer is FAILED");
        given::<Transfer>([]).when(CompleteTransfer {}).then_expect_rejection("does not exist");
        given::<Transfer>([initiated()])
            .when(FailTransfer { reason: "".into(), refunded: false })
            .then_expect_invalid("needs a reason");
    }

    #[test]
    fn state_shows_the_status_and_the_failure() {
        assert_eq!(
            given::<Transfer>([initiated()]).state_json(),
            json!({"status": "PENDING", "from": "alice", "to": "bob", "amount": 300, "refunded": false})
        );
        assert_eq!(given::<Transfer>([initiated(), TransferCompleted {}]).state_json()["status"], "COMPLETED");
        assert_eq!(
            given::<Transfer>([initiated(), TransferFailed { reason: "target closed".into(), refunded: true }])
                .state_json(),
            json!({
                "status": "FAILED", "from": "alice", "to": "bob", "amount": 300,
                "reason": "target closed", "refunded": true
            })
        );
    }
}
