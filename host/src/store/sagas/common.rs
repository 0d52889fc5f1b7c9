//! The saga SQL, written once for both backends.
//!
//! [`SagaSql`] is implemented by the two sqlx databases; each supplies only
//! the database's clock in milliseconds (`NOW_MS`) and how to count changed
//! rows. Fixed statements use `$n` placeholders, which PostgreSQL and sqlx's
//! SQLite driver both bind by number; lists are spelled out with
//! [`QueryBuilder`] in chunks that stay under SQLite's parameter limit.

use std::collections::HashMap;

use sqlx::query::Query;
use sqlx::{
    AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, QueryBuilder, Type,
};

use super::{
    CommandOutcomeWrite, Fence, FiredTimer, InputRecord, InstanceDetail, InstanceQuery, InstanceRecord, InstanceStatus,
    InstanceWrite, NewInput, NewInstance, OutboxCommand, PendingCommand, QueuedInput, ReadyInput, SagaApplied,
    SagaChange, SagaCounts, SagaRecord, SentCommand, TimerKey,
};
use crate::store::{StoreError, database_error, push_pairs_in};
use crate::telemetry::TraceContext;

/// Rows per multi-row statement (at most 13 parameters each; SQLite allows
/// 32766 per statement).
const ROWS_PER_STATEMENT: usize = 1000;

/// A database that holds sagas. The `where` clause is what the statements
/// bind and decode; both sqlx databases meet it.
pub(in crate::store) trait SagaSql: Database
where
    for<'c> &'c mut Self::Connection: Executor<'c, Database = Self>,
    for<'c> &'c Pool<Self>: Executor<'c, Database = Self>,
    Self::Arguments: IntoArguments<Self>,
    for<'q> i64: Encode<'q, Self> + Decode<'q, Self> + Type<Self>,
    for<'q> Option<i64>: Encode<'q, Self>,
    for<'q> &'q str: Encode<'q, Self>,
    for<'q> Option<&'q str>: Encode<'q, Self>,
    for<'q> &'q [u8]: Encode<'q, Self>,
    str: Type<Self>,
    [u8]: Type<Self>,
    for<'r> String: Decode<'r, Self> + Type<Self>,
    usize: ColumnIndex<Self::Row>,
    for<'r> SagaRow: FromRow<'r, Self::Row>,
    for<'r> InstanceRow: FromRow<'r, Self::Row>,
    for<'r> ReadyRow: FromRow<'r, Self::Row>,
    for<'r> CommandRow: FromRow<'r, Self::Row>,
    for<'r> (String, i64): FromRow<'r, Self::Row>,
    for<'r> (String, String, i64): FromRow<'r, Self::Row>,
    for<'r> (String, i64, Option<i64>): FromRow<'r, Self::Row>,
    for<'r> (i64, String, i64): FromRow<'r, Self::Row>,
    for<'r> (i64,): FromRow<'r, Self::Row>,
    for<'r> (Option<i64>,): FromRow<'r, Self::Row>,
{
    /// The database's clock, in milliseconds since the Unix epoch, as an
    /// SQL expression.
    const NOW_MS: &'static str;

    /// How many rows a statement changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// Run one change's statements on `connection`, inside the transaction
    /// its caller began.
    async fn apply_saga_change(
        connection: &mut Self::Connection,
        change: SagaChange,
    ) -> Result<SagaApplied, StoreError> {
        let now_ms = Self::now_ms(connection).await?;
        let mut applied = SagaApplied { now_ms, ..SagaApplied::default() };
        match change {
            SagaChange::Acquire { saga, module, owner, ttl_ms, start_position } => {
                let taken: Option<(i64, i64)> = sqlx::query_as(
                    "INSERT INTO sagas (saga, module, position, owner, epoch, lease_expires_ms, created_at_ms) \
                     VALUES ($1, $2, $3, $4, 1, $5, $6) \
                     ON CONFLICT (saga) DO UPDATE SET owner = excluded.owner, epoch = sagas.epoch + 1, \
                       module = excluded.module, lease_expires_ms = excluded.lease_expires_ms \
                     WHERE sagas.lease_expires_ms < $6 OR sagas.owner = excluded.owner \
                     RETURNING epoch, position",
                )
                .bind(saga.as_str())
                .bind(module.as_str())
                .bind(start_position as i64)
                .bind(owner.as_str())
                .bind(now_ms + ttl_ms)
                .bind(now_ms)
                .fetch_optional(&mut *connection)
                .await
                .map_err(database_error)?;
                applied.lease = taken.map(|(epoch, position)| (epoch as u64, position as u64));
            }
            SagaChange::Renew { fence, ttl_ms } => {
                let renew =
                    sqlx::query("UPDATE sagas SET lease_expires_ms = $4 WHERE saga = $1 AND owner = $2 AND epoch = $3");
                let renew = renew.bind(fence.saga.as_str()).bind(fence.owner.as_str()).bind(fence.epoch as i64);
                applied.rows = Self::execute(connection, renew.bind(now_ms + ttl_ms)).await?;
            }
            SagaChange::Release { fence } => {
                let release =
                    sqlx::query("UPDATE sagas SET lease_expires_ms = 0 WHERE saga = $1 AND owner = $2 AND epoch = $3");
                let release = release.bind(fence.saga.as_str()).bind(fence.owner.as_str()).bind(fence.epoch as i64);
                applied.rows = Self::execute(connection, release).await?;
            }
            SagaChange::Intake { fence, from, to, starts, inputs } => {
                Self::check_module(connection, &fence).await?;
                let moved = sqlx::query(
                    "UPDATE sagas SET position = $4, error = NULL \
                     WHERE saga = $1 AND owner = $2 AND epoch = $3 AND position = $5",
                );
                let moved = moved.bind(fence.saga.as_str()).bind(fence.owner.as_str()).bind(fence.epoch as i64);
                if Self::execute(connection, moved.bind(to as i64).bind(from as i64)).await? != 1 {
                    return Err(lost(&fence, &format!("its checkpoint is no longer {from}")));
                }
                Self::create_instances(connection, &fence.saga, &starts).await?;
                let inputs = Self::for_live_instances(connection, &fence.saga, inputs, |i| &i.instance).await?;
                Self::queue_inputs(connection, &fence.saga, &inputs).await?;
                applied.rows = inputs.len() as u64;
            }
            SagaChange::React { fence, consumed, instances, timers_cancelled, timers_set, commands } => {
                Self::check_fence(connection, &fence).await?;
                Self::delete_ids(connection, "saga_inbox", &consumed).await?;
                Self::write_instances(connection, &fence.saga, &instances, now_ms).await?;
                let done: Vec<&str> = instances
                    .iter()
                    .filter(|i| i.status == InstanceStatus::Done)
                    .map(|i| i.instance.as_str())
                    .collect();
                for table in ["saga_timers", "saga_inbox"] {
                    Self::delete_of_instances(connection, table, &fence.saga, &done).await?;
                }
                for timer in &timers_cancelled {
                    for statement in [
                        "DELETE FROM saga_timers WHERE saga = $1 AND instance = $2 AND name = $3",
                        "DELETE FROM saga_inbox WHERE saga = $1 AND instance = $2 AND timer = $3",
                    ] {
                        let delete = sqlx::query(statement).bind(fence.saga.as_str());
                        Self::execute(connection, delete.bind(timer.instance.as_str()).bind(timer.name.as_str()))
                            .await?;
                    }
                }
                Self::set_timers(connection, &fence.saga, &timers_set).await?;
                Self::queue_commands(connection, &fence.saga, &commands, now_ms).await?;
                applied.rows = consumed.len() as u64;
            }
            SagaChange::Outcomes { fence, outcomes } => {
                Self::check_fence(connection, &fence).await?;
                let recorded = Self::record_outcomes(connection, &outcomes, now_ms).await?;
                let recorded: Vec<CommandOutcomeWrite> =
                    outcomes.into_iter().filter(|o| recorded.contains(&(o.command_id as i64))).collect();
                let inputs: Vec<NewInput> = recorded
                    .into_iter()
                    .map(|o: CommandOutcomeWrite| NewInput {
                        instance: o.instance,
                        priority: 0,
                        input: o.input,
                        at_ms: o.at_ms,
                        timer: None,
                    })
                    .collect();
                let inputs = Self::for_live_instances(connection, &fence.saga, inputs, |i| &i.instance).await?;
                Self::queue_inputs(connection, &fence.saga, &inputs).await?;
                applied.rows = inputs.len() as u64;
            }
            SagaChange::FireTimers { fence, limit } => {
                Self::check_fence(connection, &fence).await?;
                let due: Vec<(String, String, i64)> = sqlx::query_as(
                    "SELECT instance, name, due_at_ms FROM saga_timers WHERE saga = $1 AND due_at_ms <= $2 \
                     ORDER BY due_at_ms LIMIT $3",
                )
                .bind(fence.saga.as_str())
                .bind(now_ms)
                .bind(limit as i64)
                .fetch_all(&mut *connection)
                .await
                .map_err(database_error)?;
                for chunk in due.chunks(ROWS_PER_STATEMENT) {
                    let mut delete: QueryBuilder<Self> = QueryBuilder::new("DELETE FROM saga_timers WHERE saga = ");
                    delete.push_bind(fence.saga.as_str()).push(" AND ");
                    push_pairs_in(
                        &mut delete,
                        "instance, name",
                        chunk.iter().map(|(i, n, _)| (i.as_str(), n.as_str())),
                    );
                    delete.build().execute(&mut *connection).await.map_err(database_error)?;
                }
                let inputs: Vec<NewInput> = due
                    .iter()
                    .map(|(instance, name, due_at_ms)| NewInput {
                        instance: instance.clone(),
                        priority: 0,
                        input: InputRecord::Timer { name: name.clone() }.to_json(),
                        at_ms: *due_at_ms,
                        timer: Some(name.clone()),
                    })
                    .collect();
                Self::queue_inputs(connection, &fence.saga, &inputs).await?;
                applied.fired = due
                    .into_iter()
                    .map(|(instance, name, due_at_ms)| FiredTimer { key: TimerKey { instance, name }, due_at_ms })
                    .collect();
                applied.next_due_ms =
                    sqlx::query_as::<_, (Option<i64>,)>("SELECT MIN(due_at_ms) FROM saga_timers WHERE saga = $1")
                        .bind(fence.saga.as_str())
                        .fetch_one(&mut *connection)
                        .await
                        .map_err(database_error)?
                        .0;
            }
            SagaChange::SetError { fence, error } => {
                Self::check_fence(connection, &fence).await?;
                let update = sqlx::query("UPDATE sagas SET error = $2 WHERE saga = $1");
                applied.rows =
                    Self::execute(connection, update.bind(fence.saga.as_str()).bind(error.as_deref())).await?;
            }
            SagaChange::Retry { saga, instance } => {
                applied.rows = Self::resume(connection, &saga, &instance, now_ms, "status = 'parked'").await?;
            }
            SagaChange::Skip { saga, instance } => {
                let parked: Option<(Option<i64>,)> = sqlx::query_as(
                    "SELECT parked_input FROM saga_instances WHERE saga = $1 AND instance = $2 AND status = 'parked'",
                )
                .bind(saga.as_str())
                .bind(instance.as_str())
                .fetch_optional(&mut *connection)
                .await
                .map_err(database_error)?;
                if let Some((input,)) = parked {
                    if let Some(id) = input {
                        Self::delete_ids(connection, "saga_inbox", &[id as u64]).await?;
                    }
                    applied.rows = Self::resume(connection, &saga, &instance, now_ms, "status = 'parked'").await?;
                }
            }
            SagaChange::Cancel { saga, instance, input, at_ms } => {
                let live = Self::resume(connection, &saga, &instance, now_ms, "status <> 'done'").await?;
                if live == 1 {
                    let cancel = NewInput { instance, priority: -1, input, at_ms, timer: None };
                    Self::queue_inputs(connection, &saga, &[cancel]).await?;
                }
                applied.rows = live;
            }
        }
        Ok(applied)
    }

    /// Move pending commands to their outcome, one statement per chunk;
    /// returns the ids that were still pending (the others already had one).
    async fn record_outcomes(
        connection: &mut Self::Connection,
        outcomes: &[CommandOutcomeWrite],
        now_ms: i64,
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        let mut recorded = std::collections::HashSet::with_capacity(outcomes.len());
        for chunk in outcomes.chunks(ROWS_PER_STATEMENT) {
            let mut update: QueryBuilder<Self> = QueryBuilder::new(
                "UPDATE saga_commands AS c SET status = v.column2, version = v.column3, reason = v.column4, \
                 code = v.column5, outcome_at_ms = ",
            );
            update.push_bind(now_ms).push(" FROM (");
            update.push_values(chunk, |mut row, outcome| {
                row.push_bind(outcome.command_id as i64)
                    .push_bind(if outcome.accepted.is_some() { "accepted" } else { "rejected" })
                    .push_bind(outcome.accepted.map(|v| v as i64))
                    .push_bind(outcome.reason.as_deref())
                    .push_bind(outcome.code.map(i64::from));
            });
            update.push(") AS v WHERE c.id = v.column1 AND c.status = 'pending' RETURNING id");
            let ids: Vec<(i64,)> = update.build_query_as().fetch_all(&mut *connection).await.map_err(database_error)?;
            recorded.extend(ids.into_iter().map(|(id,)| id));
        }
        Ok(recorded)
    }

    async fn now_ms(connection: &mut Self::Connection) -> Result<i64, StoreError> {
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT {}", Self::NOW_MS)))
            .fetch_one(&mut *connection)
            .await
            .map_err(database_error)
    }

    /// The fencing check: the saga's row still names this owner and epoch
    /// (on PostgreSQL the update also locks the row until the end of the
    /// transaction, so a takeover waits for this write).
    async fn check_fence(connection: &mut Self::Connection, fence: &Fence) -> Result<(), StoreError> {
        let touch = sqlx::query(
            "UPDATE sagas SET lease_expires_ms = lease_expires_ms WHERE saga = $1 AND owner = $2 AND epoch = $3",
        );
        let touch = touch.bind(fence.saga.as_str()).bind(fence.owner.as_str()).bind(fence.epoch as i64);
        if Self::execute(connection, touch).await? != 1 {
            return Err(lost(fence, "another host holds its lease now"));
        }
        Self::check_module(connection, fence).await
    }

    /// Refuse a change computed by a build whose module has a newer
    /// generation in the store.
    async fn check_module(connection: &mut Self::Connection, fence: &Fence) -> Result<(), StoreError> {
        let Some((module, generation)) = &fence.module else { return Ok(()) };
        let newer: Option<(i64,)> =
            sqlx::query_as("SELECT generation FROM module_generations WHERE name = $1 AND generation > $2")
                .bind(module.as_str())
                .bind(*generation as i64)
                .fetch_optional(&mut *connection)
                .await
                .map_err(database_error)?;
        match newer {
            Some((current,)) => Err(StoreError::StaleModule {
                module: module.clone(),
                generation: *generation,
                current: current as u64,
            }),
            None => Ok(()),
        }
    }

    /// Make an instance matching `condition` active again, with a clean
    /// slate of attempts; returns whether there was one (0 or 1).
    async fn resume(
        connection: &mut Self::Connection,
        saga: &str,
        instance: &str,
        now_ms: i64,
        condition: &str,
    ) -> Result<u64, StoreError> {
        let update = sqlx::query(AssertSqlSafe(format!(
            "UPDATE saga_instances SET status = 'active', attempts = 0, retry_at_ms = 0, parked_input = NULL, \
             updated_at_ms = $3 WHERE saga = $1 AND instance = $2 AND {condition}"
        )));
        Self::execute(connection, update.bind(saga).bind(instance).bind(now_ms)).await
    }

    async fn create_instances(
        connection: &mut Self::Connection,
        saga: &str,
        starts: &[NewInstance],
    ) -> Result<(), StoreError> {
        for chunk in starts.chunks(ROWS_PER_STATEMENT) {
            let mut insert: QueryBuilder<Self> = QueryBuilder::new(
                "INSERT INTO saga_instances (saga, instance, status, state, correlation_id, started_at_ms, updated_at_ms) ",
            );
            insert.push_values(chunk, |mut row, start| {
                row.push_bind(saga)
                    .push_bind(start.instance.as_str())
                    .push_bind("active")
                    .push_bind(&[][..])
                    .push_bind(start.correlation_id.as_str())
                    .push_bind(start.at_ms)
                    .push_bind(start.at_ms);
            });
            insert.push(" ON CONFLICT (saga, instance) DO NOTHING");
            insert.build().execute(&mut *connection).await.map_err(database_error)?;
        }
        Ok(())
    }

    /// Those of `items` whose instance exists and is not done.
    async fn for_live_instances<T: Send>(
        connection: &mut Self::Connection,
        saga: &str,
        items: Vec<T>,
        instance_of: impl Fn(&T) -> &String + Send,
    ) -> Result<Vec<T>, StoreError> {
        let mut names: Vec<&str> = items.iter().map(|i| instance_of(i).as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut live: HashMap<String, ()> = HashMap::with_capacity(names.len());
        for chunk in names.chunks(ROWS_PER_STATEMENT) {
            let mut select: QueryBuilder<Self> = QueryBuilder::new(
                "SELECT instance, CAST(0 AS BIGINT) FROM saga_instances WHERE status <> 'done' AND saga = ",
            );
            select.push_bind(saga).push(" AND instance IN (");
            let mut separated = select.separated(", ");
            for name in chunk {
                separated.push_bind(*name);
            }
            select.push(")");
            let rows: Vec<(String, i64)> =
                select.build_query_as().fetch_all(&mut *connection).await.map_err(database_error)?;
            live.extend(rows.into_iter().map(|(name, _)| (name, ())));
        }
        Ok(items.into_iter().filter(|i| live.contains_key(instance_of(i).as_str())).collect())
    }

    async fn queue_inputs(
        connection: &mut Self::Connection,
        saga: &str,
        inputs: &[NewInput],
    ) -> Result<(), StoreError> {
        for chunk in inputs.chunks(ROWS_PER_STATEMENT) {
            let mut insert: QueryBuilder<Self> =
                QueryBuilder::new("INSERT INTO saga_inbox (saga, instance, priority, input, at_ms, timer) ");
            insert.push_values(chunk, |mut row, input| {
                row.push_bind(saga)
                    .push_bind(input.instance.as_str())
                    .push_bind(input.priority)
                    .push_bind(input.input.as_str())
                    .push_bind(input.at_ms)
                    .push_bind(input.timer.as_deref());
            });
            insert.build().execute(&mut *connection).await.map_err(database_error)?;
        }
        Ok(())
    }

    async fn write_instances(
        connection: &mut Self::Connection,
        saga: &str,
        instances: &[InstanceWrite],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        for chunk in instances.chunks(ROWS_PER_STATEMENT) {
            let mut upsert: QueryBuilder<Self> = QueryBuilder::new(
                "INSERT INTO saga_instances (saga, instance, status, state, correlation_id, reactions, attempts, \
                 retry_at_ms, last_error, parked_input, started_at_ms, updated_at_ms) ",
            );
            upsert.push_values(chunk, |mut row, write| {
                row.push_bind(saga)
                    .push_bind(write.instance.as_str())
                    .push_bind(write.status.as_str())
                    .push_bind(write.state.as_slice())
                    .push_bind("")
                    .push_bind(write.reactions as i64)
                    .push_bind(i64::from(write.attempts))
                    .push_bind(now_ms + write.retry_after_ms)
                    .push_bind(write.last_error.as_deref())
                    .push_bind(write.parked_input.map(|id| id as i64))
                    .push_bind(now_ms)
                    .push_bind(now_ms);
            });
            upsert.push(
                " ON CONFLICT (saga, instance) DO UPDATE SET status = excluded.status, state = excluded.state, \
                 reactions = excluded.reactions, attempts = excluded.attempts, retry_at_ms = excluded.retry_at_ms, \
                 last_error = excluded.last_error, parked_input = excluded.parked_input, \
                 updated_at_ms = excluded.updated_at_ms",
            );
            upsert.build().execute(&mut *connection).await.map_err(database_error)?;
        }
        Ok(())
    }

    async fn set_timers(
        connection: &mut Self::Connection,
        saga: &str,
        timers: &[(TimerKey, i64)],
    ) -> Result<(), StoreError> {
        for chunk in timers.chunks(ROWS_PER_STATEMENT) {
            let mut upsert: QueryBuilder<Self> =
                QueryBuilder::new("INSERT INTO saga_timers (saga, instance, name, due_at_ms) ");
            upsert.push_values(chunk, |mut row, (key, due_at_ms)| {
                row.push_bind(saga).push_bind(key.instance.as_str()).push_bind(key.name.as_str()).push_bind(*due_at_ms);
            });
            upsert.push(" ON CONFLICT (saga, instance, name) DO UPDATE SET due_at_ms = excluded.due_at_ms");
            upsert.build().execute(&mut *connection).await.map_err(database_error)?;
        }
        Ok(())
    }

    async fn queue_commands(
        connection: &mut Self::Connection,
        saga: &str,
        commands: &[OutboxCommand],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        for chunk in commands.chunks(ROWS_PER_STATEMENT) {
            let mut insert: QueryBuilder<Self> = QueryBuilder::new(
                "INSERT INTO saga_commands (saga, instance, input_id, request_id, aggregate_type, aggregate_id, \
                 command_type, payload, idempotency_key, status, sent_at_ms, traceparent, tracestate) ",
            );
            insert.push_values(chunk, |mut row, command| {
                row.push_bind(saga)
                    .push_bind(command.instance.as_str())
                    .push_bind(command.input_id as i64)
                    .push_bind(command.request_id.as_str())
                    .push_bind(command.aggregate_type.as_str())
                    .push_bind(command.aggregate_id.as_str())
                    .push_bind(command.command_type.as_str())
                    .push_bind(command.payload.as_str())
                    .push_bind(command.idempotency_key.as_str())
                    .push_bind("pending")
                    .push_bind(now_ms)
                    .push_bind(command.trace.as_ref().map(TraceContext::traceparent))
                    .push_bind(command.trace.as_ref().and_then(TraceContext::tracestate));
            });
            insert.build().execute(&mut *connection).await.map_err(database_error)?;
        }
        Ok(())
    }

    async fn delete_ids(connection: &mut Self::Connection, table: &str, ids: &[u64]) -> Result<(), StoreError> {
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut delete: QueryBuilder<Self> = QueryBuilder::new(format!("DELETE FROM {table} WHERE id IN ("));
            let mut separated = delete.separated(", ");
            for id in chunk {
                separated.push_bind(*id as i64);
            }
            delete.push(")");
            delete.build().execute(&mut *connection).await.map_err(database_error)?;
        }
        Ok(())
    }

    async fn delete_of_instances(
        connection: &mut Self::Connection,
        table: &str,
        saga: &str,
        instances: &[&str],
    ) -> Result<(), StoreError> {
        for chunk in instances.chunks(ROWS_PER_STATEMENT) {
            let mut delete: QueryBuilder<Self> = QueryBuilder::new(format!("DELETE FROM {table} WHERE saga = "));
            delete.push_bind(saga).push(" AND instance IN (");
            let mut separated = delete.separated(", ");
            for instance in chunk {
                separated.push_bind(*instance);
            }
            delete.push(")");
            delete.build().execute(&mut *connection).await.map_err(database_error)?;
        }
        Ok(())
    }

    /// Run one statement; returns how many rows it changed.
    async fn execute(
        connection: &mut Self::Connection,
        statement: Query<'_, Self, Self::Arguments>,
    ) -> Result<u64, StoreError> {
        let result = statement.execute(&mut *connection).await.map_err(database_error)?;
        Ok(Self::rows_affected(&result))
    }

    /// Every saga's row with its counts.
    async fn saga_overview(pool: &Pool<Self>) -> Result<Vec<(SagaRecord, SagaCounts)>, StoreError> {
        let sagas: Vec<SagaRow> = sqlx::query_as(
            "SELECT saga, module, position, owner, epoch, lease_expires_ms, error FROM sagas ORDER BY saga",
        )
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        let mut counts: HashMap<String, SagaCounts> = HashMap::new();
        let by_status: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT saga, status, COUNT(*) FROM saga_instances GROUP BY saga, status")
                .fetch_all(pool)
                .await
                .map_err(database_error)?;
        for (saga, status, count) in by_status {
            let entry = counts.entry(saga).or_default();
            match InstanceStatus::parse(&status) {
                Some(InstanceStatus::Active) => entry.active = count as u64,
                Some(InstanceStatus::Parked) => entry.parked = count as u64,
                Some(InstanceStatus::Done) => entry.done = count as u64,
                None => return Err(StoreError::Corrupt(format!("saga instance status `{status}`"))),
            }
        }
        let timers: Vec<(String, i64, Option<i64>)> =
            sqlx::query_as("SELECT saga, COUNT(*), MIN(due_at_ms) FROM saga_timers GROUP BY saga")
                .fetch_all(pool)
                .await
                .map_err(database_error)?;
        for (saga, count, next_due) in timers {
            let entry = counts.entry(saga).or_default();
            entry.pending_timers = count as u64;
            entry.next_due_ms = next_due;
        }
        for (statement, is_inputs) in [
            ("SELECT saga, COUNT(*) FROM saga_inbox GROUP BY saga", true),
            ("SELECT saga, COUNT(*) FROM saga_commands WHERE status = 'pending' GROUP BY saga", false),
        ] {
            let rows: Vec<(String, i64)> = sqlx::query_as(statement).fetch_all(pool).await.map_err(database_error)?;
            for (saga, count) in rows {
                let entry = counts.entry(saga).or_default();
                if is_inputs {
                    entry.pending_inputs = count as u64;
                } else {
                    entry.pending_commands = count as u64;
                }
            }
        }
        Ok(sagas
            .into_iter()
            .map(|row| {
                let counts = counts.remove(&row.saga).unwrap_or_default();
                (row.into_record(), counts)
            })
            .collect())
    }

    /// Up to `limit` inputs ready now, in queue order, with their
    /// (active, not backing off) instances.
    async fn ready_inputs(pool: &Pool<Self>, saga: &str, limit: usize) -> Result<Vec<ReadyInput>, StoreError> {
        let rows: Vec<ReadyRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT i.id, i.instance, i.input, i.at_ms, s.state, s.correlation_id, s.reactions, s.attempts \
             FROM saga_inbox i JOIN saga_instances s ON s.saga = i.saga AND s.instance = i.instance \
             WHERE i.saga = $1 AND s.status = 'active' AND s.retry_at_ms <= {} \
             ORDER BY i.priority, i.id LIMIT $2",
            Self::NOW_MS
        )))
        .bind(saga)
        .bind(limit as i64)
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        Ok(rows.into_iter().map(ReadyRow::into_input).collect())
    }

    /// Up to `limit` commands waiting in the outbox, oldest first.
    async fn pending_commands(pool: &Pool<Self>, saga: &str, limit: usize) -> Result<Vec<PendingCommand>, StoreError> {
        let rows: Vec<CommandRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {COMMAND_COLUMNS}, s.correlation_id FROM saga_commands c \
             JOIN saga_instances s ON s.saga = c.saga AND s.instance = c.instance \
             WHERE c.saga = $1 AND c.status = 'pending' ORDER BY c.id LIMIT $2"
        )))
        .bind(saga)
        .bind(limit as i64)
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let correlation_id = row.correlation_id.clone().unwrap_or_default();
                let sent = row.into_sent();
                PendingCommand { id: sent.id, command: sent.command, correlation_id }
            })
            .collect())
    }

    /// A page of instances.
    async fn instance_page(pool: &Pool<Self>, query: &InstanceQuery) -> Result<Vec<InstanceRecord>, StoreError> {
        let mut select: QueryBuilder<Self> =
            QueryBuilder::new(format!("SELECT {INSTANCE_COLUMNS} FROM saga_instances WHERE saga = "));
        select.push_bind(query.saga.as_str());
        if let Some(status) = query.status {
            select.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(after) = &query.after {
            select.push(" AND instance > ").push_bind(after.as_str());
        }
        select.push(" ORDER BY instance LIMIT ").push_bind(query.limit as i64);
        let rows: Vec<InstanceRow> = select.build_query_as().fetch_all(pool).await.map_err(database_error)?;
        rows.into_iter().map(InstanceRow::into_record).collect()
    }

    /// One instance with its timers, commands and queued inputs.
    async fn instance_detail(
        pool: &Pool<Self>,
        saga: &str,
        instance: &str,
    ) -> Result<Option<InstanceDetail>, StoreError> {
        let row: Option<InstanceRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {INSTANCE_COLUMNS} FROM saga_instances WHERE saga = $1 AND instance = $2"
        )))
        .bind(saga)
        .bind(instance)
        .fetch_optional(pool)
        .await
        .map_err(database_error)?;
        let Some(row) = row else { return Ok(None) };
        let timers: Vec<(String, i64)> = sqlx::query_as(
            "SELECT name, due_at_ms FROM saga_timers WHERE saga = $1 AND instance = $2 ORDER BY due_at_ms, name",
        )
        .bind(saga)
        .bind(instance)
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        let commands: Vec<CommandRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {COMMAND_COLUMNS}, CAST(NULL AS TEXT) AS correlation_id FROM saga_commands c \
             WHERE c.saga = $1 AND c.instance = $2 ORDER BY c.id"
        )))
        .bind(saga)
        .bind(instance)
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        let inputs: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT id, input, at_ms FROM saga_inbox WHERE saga = $1 AND instance = $2 ORDER BY priority, id",
        )
        .bind(saga)
        .bind(instance)
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        Ok(Some(InstanceDetail {
            record: row.into_record()?,
            timers,
            commands: commands.into_iter().map(CommandRow::into_sent).collect(),
            inputs: inputs.into_iter().map(|(id, input, at_ms)| QueuedInput { id: id as u64, input, at_ms }).collect(),
        }))
    }

    /// States of up to `limit` instances that are not done, most recently
    /// changed first.
    async fn state_sample(pool: &Pool<Self>, saga: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError>
    where
        for<'r> (String, Vec<u8>): FromRow<'r, Self::Row>,
    {
        sqlx::query_as(
            "SELECT instance, state FROM saga_instances WHERE saga = $1 AND status <> 'done' \
             ORDER BY updated_at_ms DESC LIMIT $2",
        )
        .bind(saga)
        .bind(limit as i64)
        .fetch_all(pool)
        .await
        .map_err(database_error)
    }
}

fn lost(fence: &Fence, why: &str) -> StoreError {
    StoreError::LeaseLost(format!("saga `{}` (epoch {}): {why}", fence.saga, fence.epoch))
}

/// A `sagas` row.
#[derive(sqlx::FromRow)]
pub(in crate::store) struct SagaRow {
    saga: String,
    module: String,
    position: i64,
    owner: String,
    epoch: i64,
    lease_expires_ms: i64,
    error: Option<String>,
}

impl SagaRow {
    fn into_record(self) -> SagaRecord {
        SagaRecord {
            saga: self.saga,
            module: self.module,
            position: self.position as u64,
            owner: self.owner,
            epoch: self.epoch as u64,
            lease_expires_ms: self.lease_expires_ms,
            error: self.error,
        }
    }
}

const INSTANCE_COLUMNS: &str = "instance, status, state, correlation_id, reactions, attempts, retry_at_ms, \
     last_error, parked_input, started_at_ms, updated_at_ms";

/// A `saga_instances` row.
#[derive(sqlx::FromRow)]
pub(in crate::store) struct InstanceRow {
    instance: String,
    status: String,
    state: Vec<u8>,
    correlation_id: String,
    reactions: i64,
    attempts: i64,
    retry_at_ms: i64,
    last_error: Option<String>,
    parked_input: Option<i64>,
    started_at_ms: i64,
    updated_at_ms: i64,
}

impl InstanceRow {
    fn into_record(self) -> Result<InstanceRecord, StoreError> {
        let status = InstanceStatus::parse(&self.status)
            .ok_or_else(|| StoreError::Corrupt(format!("saga instance status `{}`", self.status)))?;
        Ok(InstanceRecord {
            instance: self.instance,
            status,
            state: self.state,
            correlation_id: self.correlation_id,
            reactions: self.reactions as u64,
            attempts: self.attempts as u32,
            retry_at_ms: self.retry_at_ms,
            last_error: self.last_error,
            parked_input: self.parked_input.map(|id| id as u64),
            started_at_ms: self.started_at_ms,
            updated_at_ms: self.updated_at_ms,
        })
    }
}

/// An input joined with its instance.
#[derive(sqlx::FromRow)]
pub(in crate::store) struct ReadyRow {
    id: i64,
    instance: String,
    input: String,
    at_ms: i64,
    state: Vec<u8>,
    correlation_id: String,
    reactions: i64,
    attempts: i64,
}

impl ReadyRow {
    fn into_input(self) -> ReadyInput {
        ReadyInput {
            id: self.id as u64,
            instance: self.instance,
            input: self.input,
            at_ms: self.at_ms,
            state: self.state,
            correlation_id: self.correlation_id,
            reactions: self.reactions as u64,
            attempts: self.attempts as u32,
        }
    }
}

const COMMAND_COLUMNS: &str = "c.id, c.instance, c.input_id, c.request_id, c.aggregate_type, c.aggregate_id, \
     c.command_type, c.payload, c.idempotency_key, c.status, c.version, c.reason, c.code, c.sent_at_ms, \
     c.outcome_at_ms, c.traceparent, c.tracestate";

/// A `saga_commands` row (with the instance's correlation id, where joined).
#[derive(sqlx::FromRow)]
pub(in crate::store) struct CommandRow {
    id: i64,
    instance: String,
    input_id: i64,
    request_id: String,
    aggregate_type: String,
    aggregate_id: String,
    command_type: String,
    payload: String,
    idempotency_key: String,
    status: String,
    version: Option<i64>,
    reason: Option<String>,
    code: Option<i64>,
    sent_at_ms: i64,
    outcome_at_ms: Option<i64>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    correlation_id: Option<String>,
}

impl CommandRow {
    fn into_sent(self) -> SentCommand {
        SentCommand {
            id: self.id as u64,
            command: OutboxCommand {
                instance: self.instance,
                input_id: self.input_id as u64,
                request_id: self.request_id,
                aggregate_type: self.aggregate_type,
                aggregate_id: self.aggregate_id,
                command_type: self.command_type,
                payload: self.payload,
                idempotency_key: self.idempotency_key,
                trace: TraceContext::from_stored(self.traceparent, self.tracestate),
            },
            status: self.status,
            version: self.version.map(|v| v as u64),
            reason: self.reason,
            code: self.code.map(|c| c as u16),
            sent_at_ms: self.sent_at_ms,
            outcome_at_ms: self.outcome_at_ms,
        }
    }
}
