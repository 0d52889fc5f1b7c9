//! The `security` suite: the 64-client HTTP deposit load with
//! authentication off, with a bearer token on every request, and with a
//! token over TLS — the three alternating, run after run, so they share the
//! machine's conditions — reporting the medians and what each costs against
//! the open API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchestrix_host::auth::Scope;
use orchestrix_host::runtime::Runtime;
use orchestrix_host::tls::{ReloadingCert, TlsFiles};

use crate::commands::{HttpSecurity, RunOptions, RunResult, one_run};
use crate::{Backend, BenchArgs, describe, median_by};

pub async fn security(args: &BenchArgs, backend: Backend) -> Result<()> {
    let clients = 64;
    println!(
        "bench security: HTTP deposits, {clients} connections, {} accounts, {} s per run, {} runs each of open / token / \
         token over TLS, alternating, store {}",
        args.accounts,
        args.seconds,
        args.runs,
        describe(args, backend)
    );
    let kinds = [HttpSecurity::Open, HttpSecurity::Token, HttpSecurity::TokenOverTls];
    let mut results: Vec<Vec<RunResult>> = kinds.iter().map(|_| Vec::new()).collect();
    for run in 1..=args.runs {
        for (index, kind) in kinds.iter().enumerate() {
            let options = RunOptions { http: Some(*kind), ..RunOptions::default() };
            let result = one_run(args, backend, clients, options).await?;
            println!(
                "  {kind:<12?} run={run} {:>9.0} cmd/s  p50={:.2} ms  p99={:.2} ms",
                result.throughput(),
                result.percentile(0.50),
                result.percentile(0.99)
            );
            results[index].push(result);
        }
    }
    let medians: Vec<RunResult> = results.into_iter().map(|runs| median_by(runs, RunResult::throughput)).collect();
    let open = medians[0].throughput();
    for (kind, median) in kinds.iter().zip(&medians) {
        println!(
            "median {} {kind:<12?} {:>9.0} cmd/s  p50={:.2} ms  p99={:.2} ms  ({:+.1}% against open)",
            describe(args, backend),
            median.throughput(),
            median.percentile(0.50),
            median.percentile(0.99),
            (median.throughput() / open - 1.0) * 100.0
        );
    }
    Ok(())
}

/// A `command` token of `runtime`'s store, once the host honours it.
pub async fn token_for(runtime: &Runtime) -> Result<String> {
    let store = runtime.commands.store();
    let name = format!("bench-{}", uuid::Uuid::now_v7());
    let token = orchestrix_host::auth::tokens::create(store.as_ref(), &name, &[Scope::Command(None)], None).await?;
    let header: axum::http::HeaderValue = format!("Bearer {token}").parse()?;
    let started = Instant::now();
    while runtime.auth.authenticate(Some(&header)).is_err() {
        if started.elapsed() > Duration::from_secs(5) {
            bail!("the host never honoured the bench's token");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(token)
}

/// A self-signed certificate for 127.0.0.1, loaded as the API's, and the
/// certificate for the clients to trust.
pub fn test_certificate() -> Result<(Arc<ReloadingCert>, reqwest::Certificate)> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?.self_signed(&key)?;
    let dir = std::env::temp_dir().join(format!("orchestrix-bench-tls-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    let files = TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    let loaded = ReloadingCert::load(files).context("loading the bench's certificate")?;
    std::fs::remove_dir_all(&dir)?;
    Ok((loaded, reqwest::Certificate::from_pem(cert.pem().as_bytes())?))
}
