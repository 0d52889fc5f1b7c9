//! The `tracing` suite: the `commands` load at 64 clients with trace export
//! off, then on — every span sampled and exported over OTLP/HTTP to a
//! receiver in this process that decodes each export with the
//! `opentelemetry-proto` types, as a collector would. Each side runs in a
//! bench process of its own (the export is process-wide, set up from the
//! `OTEL_*` variables before anything runs), on the same machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;

use crate::{Backend, BenchArgs, Mode, median_by};

/// Spans and export requests the receiver decoded.
#[derive(Default)]
struct Received {
    spans: AtomicU64,
    requests: AtomicU64,
}

async fn receiver() -> Result<(String, Arc<Received>)> {
    let received = Arc::new(Received::default());
    let counts = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let counts = counts.clone();
            async move {
                let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                    return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                };
                let spans: usize =
                    request.resource_spans.iter().flat_map(|r| r.scope_spans.iter()).map(|s| s.spans.len()).sum();
                counts.spans.fetch_add(spans as u64, Ordering::Relaxed);
                counts.requests.fetch_add(1, Ordering::Relaxed);
                (axum::http::StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, received))
}

pub async fn trace_export(args: &BenchArgs, backend: Backend) -> Result<()> {
    let (url, received) = receiver().await?;
    println!(
        "bench tracing: 64-client commands, export off vs on (always_on sampler, OTLP/HTTP protobuf to {url}), \
         alternating, {} runs each, store {}",
        args.runs,
        crate::describe(args, backend)
    );
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for run in 1..=args.runs {
        for export in [false, true] {
            let throughput = one_process(args, backend, export.then_some(url.as_str())).await?;
            let label = if export { "on " } else { "off" };
            println!("  run={run} export {label} {throughput:>9.0} cmd/s");
            if export { on.push(throughput) } else { off.push(throughput) }
        }
    }
    let (off, on) = (median_by(off, |v| *v), median_by(on, |v| *v));
    println!(
        "median tracing export off {off:.0} cmd/s, on {on:.0} cmd/s ({:+.1}%); receiver decoded {} spans in {} \
         exports",
        (on / off - 1.0) * 100.0,
        received.spans.load(Ordering::Relaxed),
        received.requests.load(Ordering::Relaxed)
    );
    Ok(())
}

/// One run of the `commands` suite at 64 clients in a bench process of its
/// own, exporting to `otlp` when given. Returns its throughput.
async fn one_process(args: &BenchArgs, backend: Backend, otlp: Option<&str>) -> Result<f64> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?);
    child
        .args(["--suites", "commands", "--clients", "64", "--runs", "1"])
        .args(["--stores", if backend == Backend::Sqlite { "sqlite" } else { "postgres" }])
        .args(["--mode", if args.mode == Mode::Http { "http" } else { "pipeline" }])
        .arg("--plugins")
        .arg(&args.host.plugins)
        .args(["--seconds", &args.seconds.to_string(), "--accounts", &args.accounts.to_string()])
        .args(args.host.no_fsync.then_some("--no-fsync"))
        .envs(args.postgres_url.iter().map(|url| ("DATABASE_URL", url)))
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    match otlp {
        Some(url) => child.env("OTEL_EXPORTER_OTLP_ENDPOINT", url).env("OTEL_TRACES_SAMPLER", "always_on"),
        None => child.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
    };
    let output = child.output().await.context("running the commands suite")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("the commands suite failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    }
    for line in stdout.lines() {
        if let Some(dropped) = line.trim().strip_prefix("trace spans dropped so far: queue_full ") {
            println!("    dropped spans: queue_full {dropped}");
        }
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("median ")?.split_whitespace().rev().nth(5)?.parse::<f64>().ok())
        .context("no median in the commands suite's output")
}
