//! Distributed tracing: W3C trace context on requests and events, spans for
//! the work of a request, a command, a projection batch and a saga
//! reaction, and their export over OTLP.
//!
//! Spans are `tracing` spans with the target [`TARGET`] (plus the
//! pipeline's `command` span, which the logs show too). The log output
//! never shows them, and with no exporter configured no layer enables them,
//! so each costs one disabled-callsite check. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! set, [`Export::from_env`] builds an OpenTelemetry tracer whose finished
//! spans go through a bounded queue to one background thread that batches
//! and exports them; a full queue drops spans (counted in
//! `orchestrix_trace_spans_dropped_total`) and never blocks the caller.
//!
//! Every event keeps the [`TraceContext`] of the work that produced it (the
//! CloudEvents distributed-tracing extension), so whatever consumes it later
//! continues or links to that trace.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use parking_lot::{Condvar, Mutex};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::{LookupSpan, Registry};

use crate::metrics;

/// The `tracing` target of spans that exist for tracing only.
pub const TARGET: &str = "orchestrix::trace";

/// Most links one span carries (a group commit or a projection batch links
/// to the work of up to this many of its inputs).
pub const MAX_LINKS: usize = 128;

/// The W3C trace context of one piece of work: a `traceparent` (version
/// `00`, validated) and, optionally, a `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

impl TraceContext {
    /// A `traceparent` header (and its `tracestate`), or `None` when the
    /// header is not valid W3C trace context — then, as the
    /// recommendation says, the host starts a new trace rather than refusing the
    /// request. A `tracestate` that does not parse is dropped alone.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let lower_hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let valid = lower_hex(version, 2)
            && version != "ff"
            && (version != "00" || parts.next().is_none())
            && lower_hex(trace_id, 32)
            && trace_id.bytes().any(|b| b != b'0')
            && lower_hex(span_id, 16)
            && span_id.bytes().any(|b| b != b'0')
            && lower_hex(flags, 2);
        if !valid {
            return None;
        }
        let tracestate = tracestate
            .map(str::trim)
            .filter(|state| !state.is_empty() && state.len() <= 512)
            .and_then(|state| TraceState::from_str(state).ok())
            .map(|state| state.header())
            .filter(|header| !header.is_empty());
        Some(Self { traceparent: format!("00-{trace_id}-{span_id}-{flags}"), tracestate })
    }

    /// A context as stored with an event (validated when it was parsed).
    pub fn from_stored(traceparent: Option<String>, tracestate: Option<String>) -> Option<Self> {
        traceparent.filter(|t| t.len() == 55).map(|traceparent| Self { traceparent, tracestate })
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The span id, 16 lowercase hex digits.
    pub fn span_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    fn span_context(&self) -> SpanContext {
        let flags = u8::from_str_radix(&self.traceparent[53..55], 16).unwrap_or_default();
        SpanContext::new(
            TraceId::from_hex(self.trace_id()).unwrap_or(TraceId::INVALID),
            SpanId::from_hex(self.span_id()).unwrap_or(SpanId::INVALID),
            TraceFlags::new(flags),
            true,
            self.tracestate.as_deref().and_then(|s| TraceState::from_str(s).ok()).unwrap_or_default(),
        )
    }

    fn of_span_context(context: &SpanContext) -> Option<Self> {
        if !context.is_valid() {
            return None;
        }
        let tracestate = Some(context.trace_state().header()).filter(|state| !state.is_empty());
        Some(Self {
            traceparent: format!(
                "00-{}-{}-{:02x}",
                context.trace_id(),
                context.span_id(),
                context.trace_flags().to_u8()
            ),
            tracestate,
        })
    }

    /// The context of `span` as exported, when tracing is on and `span` is
    /// one of its spans.
    pub fn of_span(span: &Span) -> Option<Self> {
        if !is_exporting() || span.is_disabled() {
            return None;
        }
        let context = span.context();
        let otel_span = context.span();
        Self::of_span_context(otel_span.span_context())
    }
}

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported (an [`Export`] was built): work done only for
/// traces is skipped when they are not.
pub fn is_exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Make `span` a child of `parent` (a context from outside this process, or
/// stored with an event). A no-op when tracing is off.
pub fn continue_trace(span: &Span, parent: Option<&TraceContext>) {
    if !is_exporting() || span.is_disabled() {
        return;
    }
    if let Some(parent) = parent {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.span_context()));
    }
}

/// Link `span` to the work in `contexts` (each distinct span once, at most
/// [`MAX_LINKS`]). A no-op when tracing is off.
pub fn link_to<'a>(span: &Span, contexts: impl IntoIterator<Item = &'a TraceContext>) {
    if !is_exporting() || span.is_disabled() {
        return;
    }
    let mut linked: Vec<&str> = Vec::new();
    for context in contexts {
        if linked.len() == MAX_LINKS {
            break;
        }
        if !linked.contains(&context.traceparent()) {
            linked.push(context.traceparent());
            span.add_link(context.span_context());
        }
    }
}

/// Mark `span` failed, with the class of failure as `error.type`.
pub fn record_error(span: &Span, kind: &'static str) {
    if !is_exporting() || span.is_disabled() {
        return;
    }
    span.set_status(opentelemetry::trace::Status::error(kind));
    span.set_attribute("error.type", kind);
}

/// The trace and span id of the current span, when tracing is on.
pub fn current_ids() -> Option<(String, String)> {
    TraceContext::of_span(&Span::current()).map(|c| (c.trace_id().to_owned(), c.span_id().to_owned()))
}

/// A log line formatter that adds `trace_id` and `span_id` to the JSON
/// object of a line written in a traced span.
struct JsonWithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for JsonWithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = current_ids() else { return self.0.format_event(ctx, writer, event) };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.trim_end().strip_suffix('}') {
            Some(object) => writeln!(writer, r#"{object},"trace_id":"{trace_id}","span_id":"{span_id}"}}"#),
            None => writer.write_str(&line),
        }
    }
}

/// Install the process's `tracing` subscriber: logs on stderr, filtered by
/// `ORCHESTRIX_LOG` (an `EnvFilter`; `default_level` when unset), as text
/// — coloured only when stderr is a terminal — or, with
/// `ORCHESTRIX_LOG_FORMAT=json`, as one JSON object per line (with
/// `trace_id` and `span_id` when written in a traced span); and, with an
/// `export`, spans to OpenTelemetry. Spans of [`TARGET`] never reach the log.
pub fn install_subscriber(default_level: &str, export: Option<&Export>) -> Result<(), TelemetryError> {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORCHESTRIX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let not_trace_only = tracing_subscriber::filter::filter_fn(|metadata| metadata.target() != TARGET);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match std::env::var("ORCHESTRIX_LOG_FORMAT").as_deref() {
        Ok("json") => logs
            .event_format(JsonWithTraceIds(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_filter(filter.and(not_trace_only))
            .boxed(),
        Ok("text") | Err(std::env::VarError::NotPresent) => {
            logs.with_ansi(std::io::stderr().is_terminal()).with_filter(filter.and(not_trace_only)).boxed()
        }
        Ok(other) => {
            return Err(TelemetryError::Setting {
                name: "ORCHESTRIX_LOG_FORMAT",
                value: other.to_owned(),
                reason: "`text` or `json`",
            });
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(TelemetryError::Setting {
                name: "ORCHESTRIX_LOG_FORMAT",
                value: String::new(),
                reason: "`text` or `json`",
            });
        }
    };
    let mut layers = vec![logs];
    layers.extend(export.map(Export::layer));
    tracing_subscriber::registry().with(layers).try_init().map_err(|e| TelemetryError::Install(e.to_string()))
}

/// Why the OpenTelemetry settings in the environment cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{name}={value}: {reason}")]
    Setting { name: &'static str, value: String, reason: &'static str },
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("cannot install the log subscriber: {0}")]
    Install(String),
}

/// The OTLP trace export, configured from the standard `OTEL_*` variables.
pub struct Export {
    provider: SdkTracerProvider,
    /// Where spans go, for the operator.
    pub endpoint: String,
}

/// The settings [`Export::from_env`] reads, resolved.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    endpoint: String,
    /// Whether `endpoint` is a signal URL (`…_TRACES_ENDPOINT`, used as
    /// is) or a base URL (`/v1/traces` appended).
    signal_endpoint: bool,
    protocol: Protocol,
    sampler: SamplerSetting,
    service_name: String,
    queue: usize,
    batch: usize,
    delay: Duration,
}

#[derive(Debug, Clone, PartialEq)]
enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBased(Box<SamplerSetting>),
}

impl SamplerSetting {
    fn sampler(&self) -> Sampler {
        match self {
            SamplerSetting::AlwaysOn => Sampler::AlwaysOn,
            SamplerSetting::AlwaysOff => Sampler::AlwaysOff,
            SamplerSetting::Ratio(ratio) => Sampler::TraceIdRatioBased(*ratio),
            SamplerSetting::ParentBased(root) => Sampler::ParentBased(Box::new(root.sampler())),
        }
    }
}

impl Settings {
    /// `None` when nothing asks for export: no endpoint, or
    /// `OTEL_SDK_DISABLED=true`, or `OTEL_TRACES_EXPORTER=none`.
    fn read(var: impl Fn(&'static str) -> Option<String>) -> Result<Option<Self>, TelemetryError> {
        let set = |name: &'static str| var(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match set("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(TelemetryError::Setting {
                    name: "OTEL_TRACES_EXPORTER",
                    value: other.to_owned(),
                    reason: "the host exports traces with `otlp` (or `none`)",
                });
            }
        }
        let (endpoint, signal_endpoint) =
            match (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), set("OTEL_EXPORTER_OTLP_ENDPOINT")) {
                (Some(url), _) => (url, true),
                (None, Some(url)) => (url, false),
                (None, None) => return Ok(None),
            };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(TelemetryError::Setting {
                name: if signal_endpoint {
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                } else {
                    "OTEL_EXPORTER_OTLP_ENDPOINT"
                },
                value: endpoint,
                reason: "an http:// or https:// URL, e.g. http://127.0.0.1:4318",
            });
        }
        let protocol_name = if set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").is_some() {
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        } else {
            "OTEL_EXPORTER_OTLP_PROTOCOL"
        };
        let protocol = match set(protocol_name).as_deref() {
            None | Some("http/protobuf") => Protocol::HttpBinary,
            Some("http/json") => Protocol::HttpJson,
            Some(other) => {
                return Err(TelemetryError::Setting {
                    name: protocol_name,
                    value: other.to_owned(),
                    reason: "the host exports over HTTP: `http/protobuf` (the default) or `http/json` — \
                             a collector's OTLP/HTTP port is 4318; gRPC is not built in",
                });
            }
        };
        let sampler = sampler_setting(set("OTEL_TRACES_SAMPLER"), set("OTEL_TRACES_SAMPLER_ARG"))?;
        let number = |name: &'static str, default: u64| -> Result<u64, TelemetryError> {
            match set(name) {
                None => Ok(default),
                Some(value) => value.parse::<u64>().ok().filter(|n| *n > 0).ok_or(TelemetryError::Setting {
                    name,
                    value,
                    reason: "a positive whole number",
                }),
            }
        };
        let queue = number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)? as usize;
        let batch = (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)? as usize).min(queue);
        let delay = Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)?);
        let service_name = set("OTEL_SERVICE_NAME").unwrap_or_else(|| "orchestrix".to_owned());
        Ok(Some(Settings { endpoint, signal_endpoint, protocol, sampler, service_name, queue, batch, delay }))
    }
}

fn sampler_setting(name: Option<String>, arg: Option<String>) -> Result<SamplerSetting, TelemetryError> {
    let ratio = || -> Result<f64, TelemetryError> {
        match &arg {
            None => Ok(1.0),
            Some(value) => {
                value.parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r)).ok_or_else(|| TelemetryError::Setting {
                    name: "OTEL_TRACES_SAMPLER_ARG",
                    value: value.clone(),
                    reason: "a sampling ratio from 0 to 1",
                })
            }
        }
    };
    let parent_based = |root| SamplerSetting::ParentBased(Box::new(root));
    Ok(match name.as_deref() {
        None | Some("parentbased_always_on") => parent_based(SamplerSetting::AlwaysOn),
        Some("always_on") => SamplerSetting::AlwaysOn,
        Some("always_off") => SamplerSetting::AlwaysOff,
        Some("traceidratio") => SamplerSetting::Ratio(ratio()?),
        Some("parentbased_always_off") => parent_based(SamplerSetting::AlwaysOff),
        Some("parentbased_traceidratio") => parent_based(SamplerSetting::Ratio(ratio()?)),
        Some(other) => {
            return Err(TelemetryError::Setting {
                name: "OTEL_TRACES_SAMPLER",
                value: other.to_owned(),
                reason: "one of always_on, always_off, traceidratio, parentbased_always_on, \
                         parentbased_always_off, parentbased_traceidratio",
            });
        }
    })
}

impl Export {
    /// The export the `OTEL_*` variables ask for, or `None` when they ask
    /// for none. Call it outside an async runtime (the HTTP client it
    /// builds runs its own).
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        let Some(settings) = Settings::read(|name| std::env::var(name).ok())? else { return Ok(None) };
        let endpoint = if settings.signal_endpoint {
            settings.endpoint.clone()
        } else {
            format!("{}/v1/traces", settings.endpoint.trim_end_matches('/'))
        };
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        // The exporter builds its own reqwest client.
        crate::http_client::install_tls_provider();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .with_protocol(settings.protocol)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        exporter.set_resource(&resource);
        let processor = BoundedExport::start(exporter, settings.queue, settings.batch, settings.delay);
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(settings.sampler.sampler())
            .with_max_links_per_span(MAX_LINKS as u32)
            .with_span_processor(processor)
            .build();
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(Self { provider, endpoint }))
    }

    /// The `tracing` layer that turns the host's spans into OpenTelemetry
    /// spans: those of [`TARGET`], and the host's own info-level spans and
    /// events (events become span events).
    pub fn layer(&self) -> Box<dyn Layer<Registry> + Send + Sync> {
        let tracer = self.provider.tracer("orchestrix");
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_level(false)
            .with_target(false)
            .with_context_activation(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.target() == TARGET
                    || (metadata.target().starts_with("orchestrix_host") && *metadata.level() <= tracing::Level::INFO)
            }))
            .boxed()
    }

    /// Export what is queued, then stop.
    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}

/// A span processor that never blocks: finished spans go into a bounded
/// buffer (dropped, and counted, when it is full); one thread takes the
/// buffer whole and exports it, woken once a batch has gathered or every
/// `delay` — never once per span.
#[derive(Debug)]
struct BoundedExport {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    buffer: Mutex<Buffer>,
    wake: Condvar,
    capacity: usize,
    batch: usize,
}

#[derive(Debug, Default)]
struct Buffer {
    spans: Vec<SpanData>,
    /// Callers waiting for everything buffered before them to be exported.
    flushed: Vec<SyncSender<()>>,
    /// Set by a shutdown: export what is left, then stop.
    shutdown: Option<SyncSender<()>>,
}

impl BoundedExport {
    fn start<E: SpanExporter + 'static>(exporter: E, capacity: usize, batch: usize, delay: Duration) -> Self {
        let shared = Arc::new(Shared { buffer: Mutex::default(), wake: Condvar::new(), capacity, batch });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(exporter, &worker, delay))
            .expect("a thread for the span export");
        Self { shared }
    }

    /// Ask the export thread for something and wait for its answer (at
    /// most `timeout`).
    fn request(&self, ask: impl FnOnce(&mut Buffer, SyncSender<()>), timeout: Duration) -> OTelSdkResult {
        let (done, answered) = std::sync::mpsc::sync_channel(1);
        ask(&mut self.shared.buffer.lock(), done);
        self.shared.wake.notify_one();
        answered.recv_timeout(timeout).map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for BoundedExport {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let mut buffer = self.shared.buffer.lock();
        if buffer.spans.len() >= self.shared.capacity || buffer.shutdown.is_some() {
            drop(buffer);
            metrics::trace_spans_dropped().with_label_values(&["queue_full"]).inc();
            return;
        }
        buffer.spans.push(span);
        let batch_ready = buffer.spans.len() == self.shared.batch;
        drop(buffer);
        if batch_ready {
            self.shared.wake.notify_one();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.request(|buffer, done| buffer.flushed.push(done), Duration::from_secs(10))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.request(|buffer, done| buffer.shutdown = Some(done), timeout)
    }
}

fn export_loop<E: SpanExporter>(exporter: E, shared: &Shared, delay: Duration) {
    let mut failing = false;
    loop {
        let (spans, flushed, shutdown) = {
            let mut buffer = shared.buffer.lock();
            let deadline = Instant::now() + delay;
            while buffer.spans.len() < shared.batch
                && buffer.flushed.is_empty()
                && buffer.shutdown.is_none()
                && !shared.wake.wait_until(&mut buffer, deadline).timed_out()
            {}
            let spans = std::mem::take(&mut buffer.spans);
            (spans, std::mem::take(&mut buffer.flushed), buffer.shutdown.take())
        };
        let mut spans = spans.into_iter().peekable();
        while spans.peek().is_some() {
            let batch: Vec<SpanData> = spans.by_ref().take(shared.batch).collect();
            let count = batch.len() as u64;
            match futures_executor::block_on(exporter.export(batch)) {
                Ok(()) if failing => {
                    tracing::info!("trace export works again");
                    failing = false;
                }
                Ok(()) => {}
                Err(error) => {
                    metrics::trace_spans_dropped().with_label_values(&["export_failed"]).inc_by(count);
                    if !failing {
                        tracing::warn!(%error, "trace export failed; spans are dropped until it works again");
                    }
                    failing = true;
                }
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
        if let Some(done) = shutdown {
            let _ = exporter.shutdown();
            let _ = done.send(());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn parses_and_renders_w3c_trace_context() {
        let context = TraceContext::parse(PARENT, Some("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")).expect("valid");
        assert_eq!(context.traceparent(), PARENT);
        assert_eq!(context.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(context.span_id(), "b7ad6b7169203331");
        assert_eq!(context.tracestate(), Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
        let round_trip = TraceContext::of_span_context(&context.span_context()).expect("valid");
        assert_eq!(round_trip, context);
        // A future version is read by the version-00 layout.
        let future = TraceContext::parse("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what", None);
        assert_eq!(future.expect("valid").traceparent(), PARENT);
    }

    #[test]
    fn refuses_what_w3c_calls_invalid() {
        for invalid in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319-cb7ad6b7169203331-01",
        ] {
            assert_eq!(TraceContext::parse(invalid, None), None, "{invalid}");
        }
        let bad_state = TraceContext::parse(PARENT, Some("not a list member")).expect("traceparent valid");
        assert_eq!(bad_state.tracestate(), None);
    }

    fn settings(vars: &[(&'static str, &str)]) -> Result<Option<Settings>, TelemetryError> {
        Settings::read(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned()))
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        assert_eq!(settings(&[]).unwrap(), None);
        assert_eq!(settings(&[("OTEL_SERVICE_NAME", "x"), ("OTEL_TRACES_SAMPLER", "always_on")]).unwrap(), None);
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        assert_eq!(settings(&[base, ("OTEL_SDK_DISABLED", "true")]).unwrap(), None);
        assert_eq!(settings(&[base, ("OTEL_TRACES_EXPORTER", "none")]).unwrap(), None);
        let on = settings(&[base]).unwrap().expect("on");
        assert_eq!(on.protocol, Protocol::HttpBinary);
        assert_eq!(on.sampler, SamplerSetting::ParentBased(Box::new(SamplerSetting::AlwaysOn)));
        assert_eq!(on.service_name, "orchestrix");
        assert!(!on.signal_endpoint);
    }

    #[test]
    fn reads_the_standard_variables_and_refuses_what_it_cannot_do() {
        let on = settings(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/v1/traces"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_SERVICE_NAME", "payments"),
        ])
        .unwrap()
        .expect("on");
        assert!(on.signal_endpoint);
        assert_eq!(on.protocol, Protocol::HttpJson);
        assert_eq!(on.sampler, SamplerSetting::ParentBased(Box::new(SamplerSetting::Ratio(0.25))));
        assert_eq!(on.service_name, "payments");
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        for (name, value) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ] {
            let error = settings(&[base, (name, value)]).expect_err(name).to_string();
            assert!(error.starts_with(&format!("{name}={value}: ")), "{error}");
        }
        let error = settings(&[base, ("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "2")])
            .expect_err("ratio above 1");
        assert!(error.to_string().contains("OTEL_TRACES_SAMPLER_ARG=2"), "{error}");
        let error = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4318")]).expect_err("no scheme");
        assert!(error.to_string().contains("http://"), "{error}");
    }
}
