//! Prometheus metrics of the host, rendered in the text exposition format on
//! `/metrics`. One [`Metrics`] value is shared (cheaply cloned) by the
//! pipeline, the sandbox and the store.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Spans the trace export dropped, by reason (`queue_full`,
/// `export_failed`). Process-wide, like the export itself; every
/// [`Metrics`] registry exports it.
pub fn trace_spans_dropped() -> &'static IntCounterVec {
    static DROPPED: std::sync::OnceLock<IntCounterVec> = std::sync::OnceLock::new();
    DROPPED.get_or_init(|| {
        let dropped = IntCounterVec::new(
            Opts::new(
                "orchestrix_trace_spans_dropped_total",
                "Trace spans not exported: queue_full (the bounded export queue was full; the work went on), \
                 export_failed (the OTLP endpoint refused or could not be reached)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        // Both reasons are exported from the start, at 0.
        for reason in ["queue_full", "export_failed"] {
            dropped.with_label_values(&[reason]);
        }
        dropped
    })
}

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    commands: IntCounterVec,
    command_seconds: HistogramVec,
    events_appended: IntCounterVec,
    snapshots: IntCounterVec,
    events_folded_per_load: Histogram,
    wasm_call_seconds: HistogramVec,
    wasm_call_failures: IntCounterVec,
    append_batch_size: Histogram,
    commit_seconds: Histogram,
    module_loads: IntCounterVec,
    module_load_step_seconds: HistogramVec,
    fuel: IntCounterVec,
    quarantines: IntCounterVec,
    quarantined: IntGaugeVec,
    module_generation: IntGaugeVec,
    cluster_hosts_behind: IntGauge,
    stale_appends: IntCounterVec,
    head_position: IntGauge,
    live_streams: IntGauge,
    live_streams_dropped: IntCounter,
    http_connections: IntGaugeVec,
    http_connections_closed: IntCounterVec,
    projection_position: IntGaugeVec,
    projection_events: IntCounterVec,
    projection_batch_seconds: HistogramVec,
    projection_failures: IntCounterVec,
    projection_parked: IntGaugeVec,
    projection_skipped: IntCounterVec,
    saga_instances: IntGaugeVec,
    saga_parked: IntGaugeVec,
    saga_timers_pending: IntGaugeVec,
    saga_lag: IntGaugeVec,
    saga_reactions: IntCounterVec,
    saga_commands: IntCounterVec,
    saga_timer_lag_seconds: HistogramVec,
    subscriptions: SubscriptionMetrics,
}

/// The outbound bus's metrics, per subscription.
struct SubscriptionMetrics {
    lag: IntGaugeVec,
    deliveries: IntCounterVec,
    failures: IntCounterVec,
    dead_lettered: IntCounterVec,
    dead_letters: IntGaugeVec,
    state: IntGaugeVec,
    failing: IntGaugeVec,
    delivering: IntGaugeVec,
    delivery_seconds: HistogramVec,
}

impl SubscriptionMetrics {
    fn new() -> Self {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["subscription"]).expect("valid metric")
        };
        Self {
            lag: gauge(
                "orchestrix_subscription_lag_events",
                "Events in the log after the subscription's checkpoint",
                &["subscription"],
            ),
            deliveries: counter(
                "orchestrix_subscription_deliveries_total",
                "Events the subscription's sink acknowledged",
            ),
            failures: counter("orchestrix_subscription_failures_total", "Failed delivery attempts"),
            dead_lettered: counter(
                "orchestrix_subscription_dead_lettered_total",
                "Events moved to the dead-letter queue after their retries",
            ),
            dead_letters: gauge(
                "orchestrix_subscription_dead_letters",
                "Entries in the subscription's dead-letter queue",
                &["subscription"],
            ),
            state: gauge(
                "orchestrix_subscription_state",
                "1 for the subscription's state (active, paused), 0 for the other",
                &["subscription", "state"],
            ),
            failing: gauge(
                "orchestrix_subscription_failing",
                "1 while this host retries a failed delivery of the subscription",
                &["subscription"],
            ),
            delivering: gauge(
                "orchestrix_subscription_delivering",
                "1 on the host holding the subscription's lease",
                &["subscription"],
            ),
            delivery_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "orchestrix_subscription_delivery_seconds",
                    "From an event's commit to its acknowledgement by the sink",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["subscription"],
            )
            .expect("valid metric"),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.lag.clone()),
            Box::new(self.deliveries.clone()),
            Box::new(self.failures.clone()),
            Box::new(self.dead_lettered.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.state.clone()),
            Box::new(self.failing.clone()),
            Box::new(self.delivering.clone()),
            Box::new(self.delivery_seconds.clone()),
        ]
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let commands = IntCounterVec::new(
            Opts::new("orchestrix_commands_total", "Commands handled, by module, command type and outcome"),
            &["module", "command", "outcome"],
        )
        .expect("valid metric");
        let command_seconds = HistogramVec::new(
            HistogramOpts::new("orchestrix_command_duration_seconds", "End-to-end command latency in the host")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["module"],
        )
        .expect("valid metric");
        let events_appended = IntCounterVec::new(
            Opts::new("orchestrix_events_appended_total", "Events durably appended, by module"),
            &["module"],
        )
        .expect("valid metric");
        let snapshots = IntCounterVec::new(
            Opts::new(
                "orchestrix_snapshots_total",
                "Snapshots of aggregate state: written, used by a load, ignored (only other code's found), \
                 dropped (the writer's queue was full), failed (the store refused or was unavailable)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        // Every outcome is exported from the start, at 0.
        for outcome in ["written", "used", "ignored", "dropped", "failed"] {
            snapshots.with_label_values(&[outcome]);
        }
        let events_folded_per_load = Histogram::with_opts(
            HistogramOpts::new(
                "orchestrix_events_folded_per_load",
                "Stored events folded to load one aggregate's state (after its snapshot, if any)",
            )
            .buckets(vec![0.0, 1.0, 10.0, 50.0, 100.0, 250.0, 1000.0, 10_000.0, 100_000.0]),
        )
        .expect("valid metric");
        let wasm_call_seconds = HistogramVec::new(
            HistogramOpts::new("orchestrix_wasm_call_duration_seconds", "Duration of guest calls")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["module", "function"],
        )
        .expect("valid metric");
        let wasm_call_failures = IntCounterVec::new(
            Opts::new(
                "orchestrix_wasm_call_failures_total",
                "Guest calls that failed, by module, function and kind: trap (a panic or other trap), deadline, \
                 memory (the memory cap), host (a WASI interface the host does not serve during calls)",
            ),
            &["module", "function", "kind"],
        )
        .expect("valid metric");
        let append_batch_size = Histogram::with_opts(
            HistogramOpts::new("orchestrix_append_batch_size", "Appends committed per group-commit transaction")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
        )
        .expect("valid metric");
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new("orchestrix_append_commit_duration_seconds", "Duration of one group-commit transaction")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let module_loads = IntCounterVec::new(
            Opts::new(
                "orchestrix_module_loads_total",
                "Module (re)loads, by module and outcome (loaded, refused, unloaded)",
            ),
            &["module", "outcome"],
        )
        .expect("valid metric");
        let module_load_step_seconds = HistogramVec::new(
            HistogramOpts::new(
                "orchestrix_module_load_step_duration_seconds",
                "Duration of each step of loading a module",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["step"],
        )
        .expect("valid metric");
        let fuel = IntCounterVec::new(
            Opts::new("orchestrix_wasm_fuel_consumed_total", "Fuel consumed by guest calls (with --fuel-metering)"),
            &["module"],
        )
        .expect("valid metric");
        let quarantines = IntCounterVec::new(
            Opts::new("orchestrix_module_quarantines_total", "Times a module was quarantined after failing calls"),
            &["module"],
        )
        .expect("valid metric");
        let quarantined = IntGaugeVec::new(
            Opts::new("orchestrix_module_quarantined", "1 while a module is quarantined, 0 while it serves"),
            &["module"],
        )
        .expect("valid metric");
        let module_generation = IntGaugeVec::new(
            Opts::new("orchestrix_module_generation", "The cluster-wide generation of the build this host serves"),
            &["module"],
        )
        .expect("valid metric");
        let cluster_hosts_behind = IntGauge::new(
            "orchestrix_cluster_hosts_behind",
            "Live hosts of the cluster serving an older generation of some module than the current one",
        )
        .expect("valid metric");
        let stale_appends = IntCounterVec::new(
            Opts::new(
                "orchestrix_stale_module_appends_total",
                "Appends the group commit refused because a newer build was activated (the command is retried)",
            ),
            &["module"],
        )
        .expect("valid metric");
        let head_position =
            IntGauge::new("orchestrix_event_head_position", "Last committed global position known to this host")
                .expect("valid metric");
        let live_streams = IntGauge::new("orchestrix_live_event_streams", "Open Server-Sent Event feed connections")
            .expect("valid metric");
        let live_streams_dropped = IntCounter::new(
            "orchestrix_live_event_streams_dropped_total",
            "Server-Sent Event feed connections closed because the client stopped reading",
        )
        .expect("valid metric");
        let http_connections = IntGaugeVec::new(
            Opts::new(
                "orchestrix_http_connections",
                "Open HTTP connections, by pool (main; reserve: beyond --max-connections, probes only)",
            ),
            &["pool"],
        )
        .expect("valid metric");
        let http_connections_closed = IntCounterVec::new(
            Opts::new(
                "orchestrix_http_connections_closed_total",
                "HTTP connections closed by the host, by reason (header_timeout, idle_timeout, evicted)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let projection_position = IntGaugeVec::new(
            Opts::new("orchestrix_projection_position", "Checkpoint (global position) of each projection copy"),
            &["projection", "copy"],
        )
        .expect("valid metric");
        let projection_events = IntCounterVec::new(
            Opts::new("orchestrix_projection_events_total", "Events projected, by projection and copy"),
            &["projection", "copy"],
        )
        .expect("valid metric");
        let projection_batch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "orchestrix_projection_batch_duration_seconds",
                "Duration of one projection batch (guest calls, document loads, commit)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["projection"],
        )
        .expect("valid metric");
        let projection_failures = IntCounterVec::new(
            Opts::new("orchestrix_projection_failures_total", "Failed projection calls and commits, by kind"),
            &["projection", "kind"],
        )
        .expect("valid metric");
        let projection_parked = IntGaugeVec::new(
            Opts::new("orchestrix_projection_parked", "1 while a projection copy is parked on a poison event"),
            &["projection", "copy"],
        )
        .expect("valid metric");
        let projection_skipped = IntCounterVec::new(
            Opts::new("orchestrix_projection_skipped_events_total", "Poison events skipped by an operator"),
            &["projection"],
        )
        .expect("valid metric");
        let saga_instances = IntGaugeVec::new(
            Opts::new("orchestrix_saga_instances", "Saga instances by status (active, parked, done)"),
            &["saga", "status"],
        )
        .expect("valid metric");
        let saga_parked = IntGaugeVec::new(
            Opts::new("orchestrix_saga_parked_instances", "Saga instances parked, waiting for an operator"),
            &["saga"],
        )
        .expect("valid metric");
        let saga_timers_pending =
            IntGaugeVec::new(Opts::new("orchestrix_saga_timers_pending", "Saga timers not yet due"), &["saga"])
                .expect("valid metric");
        let saga_lag = IntGaugeVec::new(
            Opts::new("orchestrix_saga_lag_events", "Events in the log the saga has not correlated yet"),
            &["saga"],
        )
        .expect("valid metric");
        let saga_reactions = IntCounterVec::new(
            Opts::new("orchestrix_saga_reactions_total", "Saga reactions by outcome (ok, failed, parked)"),
            &["saga", "outcome"],
        )
        .expect("valid metric");
        let saga_commands = IntCounterVec::new(
            Opts::new(
                "orchestrix_saga_commands_total",
                "Commands sagas dispatched, by outcome (accepted, rejected, retried)",
            ),
            &["saga", "outcome"],
        )
        .expect("valid metric");
        let saga_timer_lag_seconds = HistogramVec::new(
            HistogramOpts::new(
                "orchestrix_saga_timer_fire_lag_seconds",
                "From a timer's due time to its move into the instance's inbox, by the database's clock",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["saga"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(saga_instances.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(saga_parked.clone()),
            Box::new(saga_timers_pending.clone()),
            Box::new(saga_lag.clone()),
            Box::new(saga_reactions.clone()),
            Box::new(saga_commands.clone()),
            Box::new(saga_timer_lag_seconds.clone()),
            Box::new(projection_position.clone()),
            Box::new(projection_events.clone()),
            Box::new(projection_batch_seconds.clone()),
            Box::new(projection_failures.clone()),
            Box::new(projection_parked.clone()),
            Box::new(projection_skipped.clone()),
            Box::new(commands.clone()),
            Box::new(command_seconds.clone()),
            Box::new(events_appended.clone()),
            Box::new(snapshots.clone()),
            Box::new(events_folded_per_load.clone()),
            Box::new(wasm_call_seconds.clone()),
            Box::new(wasm_call_failures.clone()),
            Box::new(append_batch_size.clone()),
            Box::new(commit_seconds.clone()),
            Box::new(module_loads.clone()),
            Box::new(module_load_step_seconds.clone()),
            Box::new(fuel.clone()),
            Box::new(quarantines.clone()),
            Box::new(quarantined.clone()),
            Box::new(module_generation.clone()),
            Box::new(cluster_hosts_behind.clone()),
            Box::new(stale_appends.clone()),
            Box::new(head_position.clone()),
            Box::new(live_streams.clone()),
            Box::new(live_streams_dropped.clone()),
            Box::new(http_connections.clone()),
            Box::new(http_connections_closed.clone()),
            Box::new(trace_spans_dropped().clone()),
        ] {
            registry.register(collector).expect("metric names are unique");
        }
        let subscriptions = SubscriptionMetrics::new();
        for collector in subscriptions.collectors() {
            registry.register(collector).expect("metric names are unique");
        }
        Self {
            inner: Arc::new(Inner {
                registry,
                commands,
                command_seconds,
                events_appended,
                snapshots,
                events_folded_per_load,
                wasm_call_seconds,
                wasm_call_failures,
                append_batch_size,
                commit_seconds,
                module_loads,
                module_load_step_seconds,
                fuel,
                quarantines,
                quarantined,
                module_generation,
                cluster_hosts_behind,
                stale_appends,
                head_position,
                live_streams,
                live_streams_dropped,
                http_connections,
                http_connections_closed,
                projection_position,
                projection_events,
                projection_batch_seconds,
                projection_failures,
                projection_parked,
                projection_skipped,
                saga_instances,
                saga_parked,
                saga_timers_pending,
                saga_lag,
                saga_reactions,
                saga_commands,
                saga_timer_lag_seconds,
                subscriptions,
            }),
        }
    }

    pub fn observe_command(&self, module: &str, command: &str, outcome: &str, elapsed: Duration) {
        self.inner.commands.with_label_values(&[module, command, outcome]).inc();
        self.inner.command_seconds.with_label_values(&[module]).observe(elapsed.as_secs_f64());
    }

    pub fn observe_appended(&self, module: &str, events: usize) {
        self.inner.events_appended.with_label_values(&[module]).inc_by(events as u64);
    }

    /// A snapshot written, used, ignored, dropped or failed.
    pub fn observe_snapshots(&self, outcome: &str, count: usize) {
        self.inner.snapshots.with_label_values(&[outcome]).inc_by(count as u64);
    }

    /// Snapshots counted with `outcome` so far (for benchmarks and tests).
    pub fn snapshots_counted(&self, outcome: &str) -> u64 {
        self.inner.snapshots.with_label_values(&[outcome]).get()
    }

    /// One aggregate's state loaded by folding `events` stored events.
    pub fn observe_fold_load(&self, events: usize) {
        self.inner.events_folded_per_load.observe(events as f64);
    }

    pub fn observe_wasm_call(&self, module: &str, function: &str, elapsed: Duration) {
        self.inner.wasm_call_seconds.with_label_values(&[module, function]).observe(elapsed.as_secs_f64());
    }

    pub fn observe_batch(&self, appends: usize, commit: Duration) {
        self.inner.append_batch_size.observe(appends as f64);
        self.inner.commit_seconds.observe(commit.as_secs_f64());
    }

    /// Mean duration of one guest call of `function` in `module` so far.
    pub fn mean_wasm_call(&self, module: &str, function: &str) -> Duration {
        let histogram = self.inner.wasm_call_seconds.with_label_values(&[module, function]);
        let count = histogram.get_sample_count();
        if count == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(histogram.get_sample_sum() / count as f64)
    }

    /// Group commits so far: how many, mean appends per commit, mean commit time.
    pub fn batch_summary(&self) -> (u64, f64, Duration) {
        let count = self.inner.append_batch_size.get_sample_count();
        if count == 0 {
            return (0, 0.0, Duration::ZERO);
        }
        let mean_size = self.inner.append_batch_size.get_sample_sum() / count as f64;
        let mean_commit = Duration::from_secs_f64(self.inner.commit_seconds.get_sample_sum() / count as f64);
        (count, mean_size, mean_commit)
    }

    /// The Prometheus text exposition of every metric.
    pub fn observe_module_load(&self, module: &str, outcome: &str) {
        self.inner.module_loads.with_label_values(&[module, outcome]).inc();
    }

    pub fn observe_module_load_step(&self, step: &str, seconds: f64) {
        self.inner.module_load_step_seconds.with_label_values(&[step]).observe(seconds);
    }

    pub fn observe_fuel(&self, module: &str, fuel: u64) {
        self.inner.fuel.with_label_values(&[module]).inc_by(fuel);
    }

    pub fn observe_quarantine(&self, module: &str) {
        self.inner.quarantines.with_label_values(&[module]).inc();
        self.set_quarantined(module, true);
    }

    /// Whether `module`'s serving build takes no calls (a build starts
    /// serving, or an operator lifts a quarantine: `false`).
    pub fn set_quarantined(&self, module: &str, quarantined: bool) {
        self.inner.quarantined.with_label_values(&[module]).set(i64::from(quarantined));
    }

    /// The generation of the build this host serves for `module`.
    pub fn set_module_generation(&self, module: &str, generation: u64) {
        self.inner.module_generation.with_label_values(&[module]).set(generation as i64);
    }

    /// Live hosts serving an older generation than the cluster's current.
    pub fn set_cluster_hosts_behind(&self, hosts: usize) {
        self.inner.cluster_hosts_behind.set(hosts as i64);
    }

    /// An append refused by the generation fence (its command is retried).
    pub fn observe_stale_append(&self, module: &str) {
        self.inner.stale_appends.with_label_values(&[module]).inc();
    }

    /// A guest call that failed, by kind (`trap`, `deadline`, `memory`, `host`).
    pub fn observe_wasm_failure(&self, module: &str, function: &str, kind: &str) {
        self.inner.wasm_call_failures.with_label_values(&[module, function, kind]).inc();
    }

    pub fn set_head_position(&self, position: u64) {
        self.inner.head_position.set(position.min(i64::MAX as u64) as i64);
    }

    /// A projection copy committed `events` and moved to `position`.
    pub fn observe_projection_batch(&self, projection: &str, copy: &str, events: usize, position: u64, took: Duration) {
        self.inner.projection_events.with_label_values(&[projection, copy]).inc_by(events as u64);
        self.inner.projection_position.with_label_values(&[projection, copy]).set(position.min(i64::MAX as u64) as i64);
        self.inner.projection_batch_seconds.with_label_values(&[projection]).observe(took.as_secs_f64());
    }

    /// Batches a projection committed so far and their mean duration.
    pub fn projection_batch_summary(&self, projection: &str) -> (u64, Duration) {
        let histogram = self.inner.projection_batch_seconds.with_label_values(&[projection]);
        let count = histogram.get_sample_count();
        if count == 0 {
            return (0, Duration::ZERO);
        }
        (count, Duration::from_secs_f64(histogram.get_sample_sum() / count as f64))
    }

    /// A projection call or commit failed (`guest`, `store`).
    pub fn observe_projection_failure(&self, projection: &str, kind: &str) {
        self.inner.projection_failures.with_label_values(&[projection, kind]).inc();
    }

    pub fn set_projection_parked(&self, projection: &str, copy: &str, parked: bool) {
        self.inner.projection_parked.with_label_values(&[projection, copy]).set(i64::from(parked));
    }

    pub fn observe_projection_skip(&self, projection: &str) {
        self.inner.projection_skipped.with_label_values(&[projection]).inc();
    }

    /// Count an open live feed connection until the returned guard drops.
    pub fn live_stream_opened(&self) -> GaugeGuard {
        self.inner.live_streams.inc();
        GaugeGuard { gauge: self.inner.live_streams.clone() }
    }

    /// Count a live feed subscriber dropped for not reading.
    pub fn live_stream_dropped(&self) {
        self.inner.live_streams_dropped.inc();
    }

    /// Count an open HTTP connection of `pool` until the returned guard drops.
    pub fn http_connection_opened(&self, pool: &str) -> GaugeGuard {
        let gauge = self.inner.http_connections.with_label_values(&[pool]);
        gauge.inc();
        GaugeGuard { gauge }
    }

    /// Count an HTTP connection the host closed, and why.
    pub fn http_connection_closed(&self, reason: &str) {
        self.inner.http_connections_closed.with_label_values(&[reason]).inc();
    }

    /// A saga's instance counts, pending timers and lag, as last read.
    pub fn set_saga_gauges(&self, saga: &str, active: u64, parked: u64, done: u64, timers: u64, lag: u64) {
        let inner = &self.inner;
        for (status, count) in [("active", active), ("parked", parked), ("done", done)] {
            inner.saga_instances.with_label_values(&[saga, status]).set(count as i64);
        }
        inner.saga_parked.with_label_values(&[saga]).set(parked as i64);
        inner.saga_timers_pending.with_label_values(&[saga]).set(timers as i64);
        inner.saga_lag.with_label_values(&[saga]).set(lag as i64);
    }

    /// Events after a subscription's checkpoint.
    pub fn set_subscription_lag(&self, subscription: &str, lag: u64) {
        self.inner.subscriptions.lag.with_label_values(&[subscription]).set(lag as i64);
    }

    /// A subscription's state (`active`, `paused`).
    pub fn set_subscription_state(&self, subscription: &str, state: &str) {
        for candidate in ["active", "paused"] {
            let gauge = self.inner.subscriptions.state.with_label_values(&[subscription, candidate]);
            gauge.set(i64::from(candidate == state));
        }
    }

    /// A subscription's dead-letter queue size, as stored.
    pub fn set_subscription_dead_letters(&self, subscription: &str, dead_letters: u64) {
        self.inner.subscriptions.dead_letters.with_label_values(&[subscription]).set(dead_letters as i64);
    }

    /// Events a sink acknowledged, each with its time since commit.
    pub fn observe_subscription_delivered(&self, subscription: &str, since_commit: impl Iterator<Item = Duration>) {
        let metrics = &self.inner.subscriptions;
        let histogram = metrics.delivery_seconds.with_label_values(&[subscription]);
        let mut count = 0;
        for latency in since_commit {
            histogram.observe(latency.as_secs_f64());
            count += 1;
        }
        metrics.deliveries.with_label_values(&[subscription]).inc_by(count);
    }

    pub fn observe_subscription_failure(&self, subscription: &str) {
        self.inner.subscriptions.failures.with_label_values(&[subscription]).inc();
    }

    /// Events moved to the dead-letter queue (the queue's gauge follows at
    /// once; every reconcile sets it to the stored count).
    pub fn observe_subscription_dead_lettered(&self, subscription: &str, count: usize) {
        let metrics = &self.inner.subscriptions;
        metrics.dead_lettered.with_label_values(&[subscription]).inc_by(count as u64);
        metrics.dead_letters.with_label_values(&[subscription]).add(count as i64);
    }

    /// A dead letter delivered on an operator's retry left the queue.
    pub fn observe_subscription_redelivered(&self, subscription: &str) {
        self.inner.subscriptions.dead_letters.with_label_values(&[subscription]).dec();
    }

    pub fn set_subscription_failing(&self, subscription: &str, failing: bool) {
        self.inner.subscriptions.failing.with_label_values(&[subscription]).set(i64::from(failing));
    }

    pub fn set_subscription_delivering(&self, subscription: &str, delivering: bool) {
        self.inner.subscriptions.delivering.with_label_values(&[subscription]).set(i64::from(delivering));
    }

    /// `(count, p99 upper bound in ms)` of a subscription's commit-to-ack
    /// latency.
    pub fn subscription_delivery_p99_ms(&self, subscription: &str) -> (u64, f64) {
        use prometheus::core::Metric;
        let metric = self.inner.subscriptions.delivery_seconds.with_label_values(&[subscription]).metric();
        let histogram = metric.get_histogram();
        let total = histogram.get_sample_count();
        let rank = ((total as f64) * 0.99).ceil() as u64;
        let bound = histogram
            .get_bucket()
            .iter()
            .find(|bucket| bucket.cumulative_count() >= rank.max(1))
            .map_or(f64::INFINITY, |bucket| bucket.upper_bound() * 1000.0);
        (total, bound)
    }

    /// Drop a deleted subscription's series.
    pub fn forget_subscription(&self, subscription: &str) {
        let metrics = &self.inner.subscriptions;
        for vec in [&metrics.lag, &metrics.dead_letters, &metrics.failing, &metrics.delivering] {
            let _ = vec.remove_label_values(&[subscription]);
        }
        for state in ["active", "paused"] {
            let _ = metrics.state.remove_label_values(&[subscription, state]);
        }
        for vec in [&metrics.deliveries, &metrics.failures, &metrics.dead_lettered] {
            let _ = vec.remove_label_values(&[subscription]);
        }
        let _ = metrics.delivery_seconds.remove_label_values(&[subscription]);
    }

    pub fn observe_saga_reactions(&self, saga: &str, outcome: &str, count: usize) {
        self.inner.saga_reactions.with_label_values(&[saga, outcome]).inc_by(count as u64);
    }

    pub fn observe_saga_command(&self, saga: &str, outcome: &str) {
        self.inner.saga_commands.with_label_values(&[saga, outcome]).inc();
    }

    pub fn observe_saga_timer_lag(&self, saga: &str, lag: Duration) {
        self.inner.saga_timer_lag_seconds.with_label_values(&[saga]).observe(lag.as_secs_f64());
    }

    /// `(count, sum in seconds)` of the timer fire lag histogram of `saga`.
    pub fn saga_timer_lag_summary(&self, saga: &str) -> (u64, f64) {
        let histogram = self.inner.saga_timer_lag_seconds.with_label_values(&[saga]);
        (histogram.get_sample_count(), histogram.get_sample_sum())
    }

    /// Upper bounds of the buckets holding the 50th and 99th percentiles of
    /// the timer fire lag of `saga`, in milliseconds.
    pub fn saga_timer_lag_quantiles(&self, saga: &str) -> (f64, f64) {
        use prometheus::core::Metric;
        let metric = self.inner.saga_timer_lag_seconds.with_label_values(&[saga]).metric();
        let histogram = metric.get_histogram();
        let total = histogram.get_sample_count();
        let bound = |quantile: f64| {
            let rank = (total as f64 * quantile).ceil() as u64;
            histogram
                .get_bucket()
                .iter()
                .find(|bucket| bucket.cumulative_count() >= rank.max(1))
                .map_or(f64::INFINITY, |bucket| bucket.upper_bound() * 1000.0)
        };
        (bound(0.5), bound(0.99))
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.inner.registry.gather(), &mut buffer).expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements a gauge of open things (live streams, connections) when dropped.
pub struct GaugeGuard {
    gauge: IntGauge,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    /// Every metric this module registers has a row in README's metrics
    /// table, and every row names a metric this module registers.
    #[test]
    fn the_readme_lists_every_metric() {
        let source = include_str!("metrics.rs");
        let readme = include_str!("../../README.md");
        let quoted = |text: &'static str, open: &'static str, close: char| -> std::collections::BTreeSet<String> {
            text.split(open)
                .skip(1)
                .filter_map(|rest| rest.split(close).next())
                .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .map(|name| format!("orchestrix_{name}"))
                .collect()
        };
        let registered = quoted(source, "\"orchestrix_", '"');
        let documented = quoted(readme, "| `orchestrix_", '`');
        assert!(registered.len() > 20, "{registered:?}");
        assert_eq!(registered, documented, "README's metrics table and metrics.rs disagree");
    }

    /// The Grafana dashboard queries only metrics this module registers
    /// (a histogram by its `_bucket`, `_sum` or `_count` series).
    #[test]
    fn the_dashboard_queries_real_metrics() {
        let source = include_str!("metrics.rs");
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/grafana/orchestrix.json")).expect("the dashboard is JSON");
        let panels = dashboard["panels"].as_array().expect("panels");
        assert!(panels.len() >= 10);
        for target in panels.iter().flat_map(|panel| panel["targets"].as_array().expect("targets")) {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let names =
                expr.split(|c: char| !(c.is_ascii_lowercase() || c == '_')).filter(|w| w.starts_with("orchestrix_"));
            let mut any = false;
            for name in names {
                let metric =
                    ["_bucket", "_sum", "_count"].iter().fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
                assert!(
                    source.contains(&format!("\"{metric}\"")),
                    "the dashboard queries `{name}`, which is not registered"
                );
                any = true;
            }
            assert!(any, "a panel without an orchestrix metric: {expr}");
        }
    }
}
