//! Tidy checks run as ordinary tests (`cargo test -p xtask`), as
//! rust-analyzer does: every Rust source file opens with a `//!` doc, the
//! host's modules depend on each other in one direction only, and the
//! SDK's packaged copy of the contract is the contract.
//!
//! Layers of `orchestrix-host`, each allowed to use the ones below it:
//!
//! | layer | modules |
//! |---|---|
//! | wiring | `runtime`, `main`, `cli` |
//! | edges | `http`, `server` |
//! | processes | `sagas` (sends commands through the pipeline) |
//! | services | `pipeline`, `projections`, `whatif`, `bus`, `cluster` (not each other); `auth` (tokens in the `store`) |
//! | runtime parts | `sandbox` (may read the `store`), `cloudevents` (the wire form of stored events), `store` |
//! | leaves | `limits`, `metrics`, `sse`, `leases`, `http_client`, `egress`; `tls` (the API's certificate; rustls's provider from `http_client`); `telemetry` (trace context and export, counts drops in `metrics`, builds its exporter after `http_client`'s TLS set-up) |

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Every `.rs` file under `dir`, skipping build output.
fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && !name.to_string_lossy().starts_with('.') {
                rust_files(&path, found);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The top-level host module a source file belongs to (`store` for
/// `host/src/store/group.rs`, `http` for `host/src/http.rs`).
fn host_module(relative: &Path) -> String {
    let first = relative.components().next().expect("a file").as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// Host modules a module may name with `crate::…`.
fn allowed(module: &str) -> Option<&'static [&'static str]> {
    Some(match module {
        "limits" | "metrics" | "sse" | "leases" | "http_client" | "egress" => &[],
        "telemetry" => &["metrics", "http_client"],
        "tls" => &["http_client"],
        "store" => &["limits", "metrics", "sse", "telemetry"],
        "cloudevents" => &["store", "telemetry"],
        "sandbox" => &["limits", "metrics", "telemetry", "cloudevents", "sse", "store", "leases"],
        "pipeline" | "projections" | "whatif" => {
            &["limits", "metrics", "telemetry", "cloudevents", "sse", "store", "sandbox"]
        }
        "bus" => &["limits", "metrics", "telemetry", "cloudevents", "sse", "store", "leases", "http_client", "egress"],
        "auth" => &["limits", "metrics", "store", "http_client"],
        "cluster" => &["limits", "metrics", "telemetry", "store", "sandbox", "leases"],
        "sagas" => &["limits", "metrics", "telemetry", "cloudevents", "sse", "store", "sandbox", "pipeline", "leases"],
        "http" | "server" => &[
            "limits",
            "metrics",
            "telemetry",
            "cloudevents",
            "sse",
            "store",
            "sandbox",
            "pipeline",
            "projections",
            "whatif",
            "sagas",
            "bus",
            "cluster",
            "leases",
            "http_client",
            "auth",
            "egress",
            "tls",
            "http",
            "server",
        ],
        // Wiring may use everything.
        "runtime" | "lib" | "main" | "cli" => return None,
        other => panic!("host module `{other}` has no layer: add it to xtask/src/tidy.rs"),
    })
}

#[test]
fn every_source_file_starts_with_a_module_doc() {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in ["host", "guest-sdk", "plugins", "tests", "xtask", "bench", "testkit"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 40, "found only {} files", files.len());
    let undocumented: Vec<String> = files
        .iter()
        .filter(|file| !std::fs::read_to_string(file).unwrap_or_default().starts_with("//!"))
        .map(|file| file.strip_prefix(&root).unwrap_or(file).display().to_string())
        .collect();
    assert!(undocumented.is_empty(), "files without a leading `//!` doc: {undocumented:#?}");
}

#[test]
fn host_modules_depend_downwards_only() {
    let src = workspace_root().join("host/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under host/src");
        let module = host_module(relative);
        let Some(allowed) = allowed(&module) else { continue };
        let text = std::fs::read_to_string(file).expect("readable source");
        for (line_number, line) in text.lines().enumerate() {
            for (at, _) in line.match_indices("crate::") {
                let used: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used != module && !used.is_empty() && !allowed.contains(&used.as_str()) {
                    violations.push(format!(
                        "host/src/{}:{}: `{module}` uses `crate::{used}`",
                        relative.display(),
                        line_number + 1
                    ));
                }
            }
        }
    }
    assert!(violations.is_empty(), "dependencies against the layering:\n{}", violations.join("\n"));
}

#[test]
fn the_layering_check_sees_a_violation() {
    // The check reads `crate::` paths; a service naming the HTTP layer breaks it.
    let allowed = allowed("pipeline").unwrap();
    assert!(!allowed.contains(&"http"));
    assert_eq!(host_module(Path::new("store/group.rs")), "store");
    assert_eq!(host_module(Path::new("http.rs")), "http");
}

/// Every reqwest client is built by `orchestrix_host::http_client`, which
/// installs the TLS provider first (reqwest has none of its own here, so a
/// client built elsewhere panics at run time).
#[test]
fn reqwest_clients_are_built_in_one_place() {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in ["host", "tests", "bench", "testkit"] {
        rust_files(&root.join(dir), &mut files);
    }
    let pattern = ["reqwest::Client::", "new()"].concat();
    let builder = ["reqwest::Client::", "builder()"].concat();
    let offenders: Vec<String> = files
        .iter()
        .filter(|file| !file.ends_with("host/src/http_client.rs"))
        .filter(|file| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            text.contains(&pattern) || text.contains(&builder)
        })
        .map(|file| file.strip_prefix(&root).unwrap_or(file).display().to_string())
        .collect();
    assert!(offenders.is_empty(), "build reqwest clients with orchestrix_host::http_client: {offenders:?}");
}

#[test]
fn the_sdk_packages_the_contract_itself() {
    let root = workspace_root();
    let contract = std::fs::read(root.join("wit/domain.wit")).expect("wit/domain.wit");
    let copy = std::fs::read(root.join("guest-sdk/wit/domain.wit")).expect("guest-sdk/wit/domain.wit");
    assert!(
        contract == copy,
        "guest-sdk/wit/domain.wit differs from wit/domain.wit, the source of truth: copy it over \
         (`cp wit/domain.wit guest-sdk/wit/`)"
    );
}
