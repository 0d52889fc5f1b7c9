//! Prometheus metrics of the host, rendered in the text exposition format on
//! `/metrics`. One [`Metrics`] value is shared (cheaply cloned) by the
//! pipeline, the sandbox and the store.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
    append_batch_size: Histogram,
    commit_seconds: Histogram,
    module_loads: IntCounterVec,
    module_load_step_seconds: HistogramVec,
    fuel: IntCounterVec,
    quarantines: IntCounterVec,
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
            Box::new(append_batch_size.clone()),
            Box::new(commit_seconds.clone()),
            Box::new(module_loads.clone()),
            Box::new(module_load_step_seconds.clone()),
            Box::new(fuel.clone()),
            Box::new(quarantines.clone()),
            Box::new(head_position.clone()),
            Box::new(live_streams.clone()),
            Box::new(live_streams_dropped.clone()),
            Box::new(http_connections.clone()),
            Box::new(http_connections_closed.clone()),
        ] {
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
                append_batch_size,
                commit_seconds,
                module_loads,
                module_load_step_seconds,
                fuel,
                quarantines,
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
