//! Loading the plugins directory: bad files are refused one by one with a
//! clear reason, and the good modules keep serving.

use reqwest::StatusCode;
use serde_json::Value;

use crate::fixtures::{BANK, FIXTURE_OTHER_WORLD, fixture_tests, read};
use crate::support::Sandbox;

fixture_tests! { FIXTURE_OTHER_WORLD => bad_files_are_refused_while_bank_keeps_working }

fn failure_for<'a>(modules: &'a Value, file_name: &str) -> &'a str {
    modules["failures"]
        .as_array()
        .expect("failures list")
        .iter()
        .find(|f| f["file"].as_str().is_some_and(|path| path.ends_with(file_name)))
        .and_then(|f| f["reason"].as_str())
        .unwrap_or_else(|| panic!("{file_name} should have been refused: {modules}"))
}

#[tokio::test]
async fn bad_files_are_refused_while_bank_keeps_working() {
    let sandbox = Sandbox::with_bank();
    sandbox.add_plugin("garbage.wasm", b"this is not wasm at all");
    // The smallest valid core module: magic number and version 1.
    sandbox.add_plugin("core-module.wasm", b"\0asm\x01\0\0\0");
    sandbox.add_plugin("other-world.wasm", &read(FIXTURE_OTHER_WORLD));
    sandbox.add_plugin("notes.txt", b"ignored: not a .wasm file");

    let host = sandbox.start().await;
    let modules = &host.modules;
    assert!(failure_for(modules, "garbage.wasm").contains("not a WebAssembly file"));
    assert!(failure_for(modules, "core-module.wasm").contains("core WebAssembly module, not a component"));
    let other = failure_for(modules, "other-world.wasm");
    assert!(other.contains("orchestrix:domain"), "{other}");
    assert_eq!(modules["failures"].as_array().unwrap().len(), 3, "{modules}");

    let loaded: Vec<&str> =
        modules["modules"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(loaded, ["bank"]);
    let bank = &modules["modules"][0];
    assert_eq!(bank["content_hash"].as_str().unwrap().len(), 64);
    assert_eq!(bank["manifest"]["aggregates"][0]["name"], "account");
    assert!(bank["manifest"]["aggregates"][0]["command_types"].as_array().unwrap().iter().any(|c| c == "DepositMoney"));
    let projections: Vec<&str> =
        bank["manifest"]["projections"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(projections, ["account_summaries", "status_totals"]);
    assert!(
        bank["manifest"]["projections"][0]["event_types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "account.AccountClosed")
    );

    let (status, body) = host.account("ok", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    host.stop().await;
}

#[tokio::test]
async fn a_module_name_is_its_identity_not_its_file_name() {
    let sandbox = Sandbox::with_bank();
    sandbox.add_plugin("zz-bank-copy.wasm", &read(BANK));
    let host = sandbox.start().await;
    // Two files, one module: the newer file serves, the older is reported.
    let reason = failure_for(&host.modules, "/bank.wasm");
    assert!(reason.contains("module name `bank`") && reason.contains("zz-bank-copy.wasm"), "{reason}");
    let bank = &host.modules["modules"][0];
    assert!(bank["file"].as_str().unwrap().ends_with("zz-bank-copy.wasm"));
    let hash = bank["content_hash"].as_str().unwrap();
    assert_eq!(bank["build"], format!("{}+{}", bank["version"].as_str().unwrap(), &hash[..12]), "{bank}");
    let (status, _) = host.account("id", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await;
    assert_eq!(status, StatusCode::OK);
    host.stop().await;
}

#[tokio::test]
async fn precompiled_artifacts_are_cached_and_reused() {
    let sandbox = Sandbox::with_bank();
    let mut config = sandbox.config();
    config.cache_dir = sandbox.dir.path().join("precompiled");
    let host = crate::support::TestHost::start(config.clone()).await;
    host.stop().await;
    let artifacts: Vec<_> = std::fs::read_dir(&config.cache_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let hash = host_hash(&sandbox).await;
    assert!(artifacts[0].file_name().unwrap().to_string_lossy().starts_with(&hash));

    // A corrupt artifact is discarded and rebuilt, never trusted.
    std::fs::write(&artifacts[0], b"corrupt").unwrap();
    let host = crate::support::TestHost::start(config.clone()).await;
    let (status, _) = host.account("c", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await;
    assert_eq!(status, StatusCode::OK);
    host.stop().await;
    assert!(std::fs::metadata(&artifacts[0]).unwrap().len() > 1000, "artifact rewritten");
}

async fn host_hash(sandbox: &Sandbox) -> String {
    let host = sandbox.start().await;
    let hash = host.modules["modules"][0]["content_hash"].as_str().unwrap().to_owned();
    host.stop().await;
    hash
}
