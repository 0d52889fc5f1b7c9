//! The `money_transfer` saga: moves the money of a `transfer` between two
//! accounts, compensating when the target refuses it.
//!
//! One instance per transfer (its id), started by `TransferInitiated`:
//!
//! 1. withdraw the amount from `from` (request `withdraw`);
//! 2. when that is accepted, deposit it to `to` (`deposit`); when it is
//!    refused (insufficient funds, account not ACTIVE…), fail the transfer,
//!    not refunded — no money moved;
//! 3. when the deposit is accepted, complete the transfer (`complete`); when
//!    it is refused (target closed, suspended or never opened), deposit the
//!    amount back to `from` (`refund-1`), then fail the transfer, refunded.
//!    A refused refund is retried every minute (`refund-2`, …) until it is
//!    accepted: withdrawn money is never abandoned;
//! 4. once the transfer has recorded its end (`complete` or `fail`), the
//!    instance is done.
//!
//! Money is only ever in one place: after a withdrawal it is in flight until
//! the deposit or the refund, so the sum of all balances is the same before
//! a transfer starts and after it ends. An operator's cancel stops a
//! transfer whose withdrawal is still in flight (the money goes back once it
//! is out); after that it is too late and the transfer runs its course.

use std::time::Duration;

use orchestrix_guest::{CommandResult, DomainError, Envelope, Reaction, Saga, SagaInput, Timestamp, log};
use serde::{Deserialize, Serialize};

use crate::transfer::{Transfer, TransferCommand, TransferEvent};
use crate::{Account, AccountCommand};

/// How long after a refused refund it is tried again.
pub const REFUND_RETRY: Duration = Duration::from_secs(60);

/// The timer that retries a refused refund.
const RETRY_REFUND: &str = "retry-refund";

/// Where a transfer's money is.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferStep {
    /// Not started.
    #[default]
    Starting,
    /// Withdrawal from `from` sent.
    Withdrawing,
    /// Withdrawn; deposit to `to` sent.
    Depositing,
    /// Withdrawn, not deposited; the refund to `from` is under way (`reason`
    /// is why the transfer fails).
    Refunding { reason: String },
    /// The money is settled; the transfer's end (`complete` or `fail`) is
    /// being recorded.
    Recording,
}

/// One transfer's progress.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyTransfer {
    pub transfer_id: String,
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub step: TransferStep,
    /// Refunds sent so far (each under its own request id).
    pub refunds_sent: u32,
    /// An operator's cancel that came while the withdrawal was in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
}

impl MoneyTransfer {
    fn deposit(&self, request_id: String, account: &str, reaction: &mut Reaction) -> Result<(), DomainError> {
        reaction.send::<Account>(request_id, account, &AccountCommand::DepositMoney { amount: self.amount })
    }

    /// Send the withdrawn money back to `from`, under a new request id.
    fn send_refund(&mut self, reaction: &mut Reaction) -> Result<(), DomainError> {
        self.refunds_sent += 1;
        self.deposit(format!("refund-{}", self.refunds_sent), &self.from, reaction)
    }

    /// Start sending the money back; the transfer then fails for `reason`.
    fn refund(&mut self, reason: String, reaction: &mut Reaction) -> Result<(), DomainError> {
        self.send_refund(reaction)?;
        self.step = TransferStep::Refunding { reason };
        Ok(())
    }

    fn complete(&mut self, reaction: &mut Reaction) -> Result<(), DomainError> {
        reaction.send::<Transfer>("complete", &self.transfer_id, &TransferCommand::CompleteTransfer {})?;
        self.step = TransferStep::Recording;
        Ok(())
    }

    fn fail(&mut self, reason: String, refunded: bool, reaction: &mut Reaction) -> Result<(), DomainError> {
        reaction.send::<Transfer>("fail", &self.transfer_id, &TransferCommand::FailTransfer { reason, refunded })?;
        self.step = TransferStep::Recording;
        Ok(())
    }

    /// One command is in flight at a time, so an outcome answers the
    /// current step's command.
    fn on_outcome(
        &mut self,
        request_id: &str,
        result: CommandResult,
        reaction: &mut Reaction,
    ) -> Result<(), DomainError> {
        match (&self.step, result) {
            (TransferStep::Withdrawing, CommandResult::Accepted { .. }) => match self.cancel_reason.clone() {
                Some(reason) => self.refund(format!("cancelled by operator: {reason}"), reaction),
                None => {
                    self.deposit("deposit".to_owned(), &self.to, reaction)?;
                    self.step = TransferStep::Depositing;
                    Ok(())
                }
            },
            (TransferStep::Withdrawing, CommandResult::Rejected { reason, .. }) => {
                self.fail(format!("withdrawal from {} refused: {reason}", self.from), false, reaction)
            }
            (TransferStep::Depositing, CommandResult::Accepted { .. }) => self.complete(reaction),
            (TransferStep::Depositing, CommandResult::Rejected { reason, .. }) => {
                self.refund(format!("deposit to {} refused: {reason}", self.to), reaction)
            }
            (TransferStep::Refunding { reason }, CommandResult::Accepted { .. }) => {
                let reason = reason.clone();
                self.fail(reason, true, reaction)
            }
            (TransferStep::Refunding { .. }, CommandResult::Rejected { reason, code }) => {
                log::warn(
                    "refund refused; retrying",
                    &[("transfer", &self.transfer_id), ("account", &self.from), ("code", &code), ("reason", &reason)],
                );
                reaction.set_timer(RETRY_REFUND, REFUND_RETRY);
                Ok(())
            }
            // The transfer's end is recorded (or was already: nothing else
            // ends a transfer, so a refusal means it is ended too).
            (TransferStep::Recording, _) => {
                reaction.complete();
                Ok(())
            }
            (TransferStep::Starting, _) => {
                Err(DomainError::invalid(format!("outcome of `{request_id}` before the transfer started")))
            }
        }
    }
}

impl Saga for MoneyTransfer {
    const NAME: &'static str = "money_transfer";
    const STARTED_BY: &'static [&'static str] = &["TransferInitiated"];
    type Event = TransferEvent;

    /// Only the initiation concerns the saga (it records the end itself).
    fn correlate(event: &Envelope<TransferEvent>) -> Vec<String> {
        match event.event {
            TransferEvent::TransferInitiated { .. } => vec![event.aggregate_id.clone()],
            TransferEvent::TransferCompleted {} | TransferEvent::TransferFailed { .. } => Vec::new(),
        }
    }

    fn react(
        &mut self,
        input: SagaInput<TransferEvent>,
        _now: Timestamp,
        reaction: &mut Reaction,
    ) -> Result<(), DomainError> {
        match input {
            SagaInput::Event(Envelope {
                aggregate_id,
                event: TransferEvent::TransferInitiated { from, to, amount },
                ..
            }) if self.step == TransferStep::Starting => {
                *self = MoneyTransfer { transfer_id: aggregate_id, from, to, amount, ..MoneyTransfer::default() };
                reaction.send::<Account>("withdraw", &self.from, &AccountCommand::WithdrawMoney { amount })?;
                self.step = TransferStep::Withdrawing;
                Ok(())
            }
            SagaInput::Event(_) => Ok(()),
            SagaInput::Outcome { request_id, result } => self.on_outcome(&request_id, result, reaction),
            SagaInput::Timer { name } if name == RETRY_REFUND => self.send_refund(reaction),
            SagaInput::Timer { name } => Err(DomainError::invalid(format!("unknown timer `{name}`"))),
            SagaInput::Cancelled { reason } if self.step == TransferStep::Withdrawing => {
                self.cancel_reason = Some(reason);
                Ok(())
            }
            SagaInput::Cancelled { reason } => {
                log::info(
                    "cancel ignored: the money has left the source account",
                    &[("transfer", &self.transfer_id), ("reason", &reason)],
                );
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrix_guest::testing::{SagaFixture, command, event, saga};

    const TRANSFER: &str = "t-1";

    fn initiated() -> SagaInput<TransferEvent> {
        event(
            "transfer",
            TRANSFER,
            TransferEvent::TransferInitiated { from: "alice".into(), to: "bob".into(), amount: 300 },
        )
    }

    fn accepted(request_id: &str) -> SagaInput<TransferEvent> {
        SagaInput::accepted(request_id, 2)
    }

    fn rejected(request_id: &str, reason: &str) -> SagaInput<TransferEvent> {
        SagaInput::rejected(request_id, reason, 422)
    }

    fn started() -> SagaFixture<MoneyTransfer> {
        saga::<MoneyTransfer>().given([initiated()])
    }

    #[test]
    fn correlates_each_transfer_by_its_id_and_only_its_initiation() {
        let fixture = saga::<MoneyTransfer>();
        let envelope = |event| orchestrix_guest::testing::envelope("transfer", TRANSFER, event);
        assert_eq!(
            fixture.correlate(envelope(TransferEvent::TransferInitiated {
                from: "a".into(),
                to: "b".into(),
                amount: 1
            })),
            [TRANSFER]
        );
        assert!(fixture.correlate(envelope(TransferEvent::TransferCompleted {})).is_empty());
    }

    #[test]
    fn withdraws_then_deposits_then_completes() {
        saga::<MoneyTransfer>()
            .when(initiated())
            .then_expect_commands([command::<Account>(
                "withdraw",
                "alice",
                AccountCommand::WithdrawMoney { amount: 300 },
            )])
            .then_expect_running();
        started().when(accepted("withdraw")).then_expect_commands([command::<Account>(
            "deposit",
            "bob",
            AccountCommand::DepositMoney { amount: 300 },
        )]);
        started()
            .given([accepted("withdraw")])
            .when(accepted("deposit"))
            .then_expect_commands([command::<Transfer>("complete", TRANSFER, TransferCommand::CompleteTransfer {})])
            .then_expect_running();
        started()
            .given([accepted("withdraw"), accepted("deposit")])
            .when(accepted("complete"))
            .then_expect_commands([])
            .then_expect_timers([])
            .then_expect_done();
    }

    #[test]
    fn a_refused_withdrawal_fails_the_transfer_without_refund() {
        started()
            .when(rejected("withdraw", "insufficient funds: balance 100, requested 300"))
            .then_expect_commands([command::<Transfer>(
                "fail",
                TRANSFER,
                TransferCommand::FailTransfer {
                    reason: "withdrawal from alice refused: insufficient funds: balance 100, requested 300".into(),
                    refunded: false,
                },
            )])
            .then_expect_running();
        started().given([rejected("withdraw", "insufficient funds")]).when(accepted("fail")).then_expect_done();
    }

    #[test]
    fn a_refused_deposit_is_compensated_by_a_refund_then_fails_the_transfer() {
        let deposit_refused = rejected("deposit", "account does not exist");
        started().given([accepted("withdraw")]).when(deposit_refused.clone()).then_expect_commands([
            command::<Account>("refund-1", "alice", AccountCommand::DepositMoney { amount: 300 }),
        ]);
        started()
            .given([accepted("withdraw"), deposit_refused.clone()])
            .when(accepted("refund-1"))
            .then_expect_commands([command::<Transfer>(
                "fail",
                TRANSFER,
                TransferCommand::FailTransfer {
                    reason: "deposit to bob refused: account does not exist".into(),
                    refunded: true,
                },
            )]);
        started()
            .given([accepted("withdraw"), deposit_refused, accepted("refund-1")])
            .when(accepted("fail"))
            .then_expect_done();
    }

    #[test]
    fn a_refused_refund_is_retried_until_it_is_accepted() {
        let refunding = || {
            started()
                .given([accepted("withdraw"), rejected("deposit", "cannot deposit: account is CLOSED, must be ACTIVE")])
        };
        refunding()
            .when(rejected("refund-1", "cannot deposit: account is SUSPENDED, must be ACTIVE"))
            .then_expect_commands([])
            .then_expect_timers([("retry-refund", REFUND_RETRY)])
            .then_expect_running();
        refunding()
            .given([rejected("refund-1", "suspended")])
            .when(SagaInput::timer("retry-refund"))
            .then_expect_commands([command::<Account>(
                "refund-2",
                "alice",
                AccountCommand::DepositMoney { amount: 300 },
            )]);
        refunding()
            .given([rejected("refund-1", "suspended"), SagaInput::timer("retry-refund")])
            .when(accepted("refund-2"))
            .then_expect_commands([command::<Transfer>(
                "fail",
                TRANSFER,
                TransferCommand::FailTransfer {
                    reason: "deposit to bob refused: cannot deposit: account is CLOSED, must be ACTIVE".into(),
                    refunded: true,
                },
            )]);
    }

    #[test]
    fn an_operator_cancel_during_the_withdrawal_sends_the_money_back() {
        started().when(SagaInput::cancelled("fraud check")).then_expect_commands([]).then_expect_running();
        started().given([SagaInput::cancelled("fraud check")]).when(accepted("withdraw")).then_expect_commands([
            command::<Account>("refund-1", "alice", AccountCommand::DepositMoney { amount: 300 }),
        ]);
        started()
            .given([SagaInput::cancelled("fraud check"), accepted("withdraw")])
            .when(accepted("refund-1"))
            .then_expect_commands([command::<Transfer>(
                "fail",
                TRANSFER,
                TransferCommand::FailTransfer { reason: "cancelled by operator: fraud check".into(), refunded: true },
            )]);
        // A refused withdrawal moved nothing: there is nothing to send back.
        started()
            .given([SagaInput::cancelled("fraud check")])
            .when(rejected("withdraw", "account is SUSPENDED"))
            .then_expect_commands([command::<Transfer>(
                "fail",
                TRANSFER,
                TransferCommand::FailTransfer {
                    reason: "withdrawal from alice refused: account is SUSPENDED".into(),
                    refunded: false,
                },
            )]);
    }

    #[test]
    fn a_cancel_after_the_money_left_is_too_late() {
        started()
            .given([accepted("withdraw")])
            .when(SagaInput::cancelled("changed my mind"))
            .then_expect_commands([])
            .then_expect_running();
        started()
            .given([accepted("withdraw"), SagaInput::cancelled("changed my mind")])
            .when(accepted("deposit"))
            .then_expect_commands([command::<Transfer>("complete", TRANSFER, TransferCommand::CompleteTransfer {})]);
    }
}
