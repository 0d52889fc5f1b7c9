//! Builds the wasm the integration tests load — the example plugins and the
//! test fixtures — from source, the way wasmtime's `test-programs` does.
//! Nothing wasm is committed. The artifacts land in `target/wasm-build`
//! (shared with `cargo xtask`), and their directory is handed to the tests
//! as `ORCHESTRIX_TEST_WASM_DIR`.

use std::path::PathBuf;
use std::process::Command;

/// Packages compiled to `wasm32-wasip2` for the tests.
const WASM_PACKAGES: &[&str] = &["bank", "fixture-other-world"];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir.parent().expect("tests/ lives in the workspace root").to_path_buf();
    let target_dir = workspace.join("target").join("wasm-build");

    for watched in ["wit", "guest-sdk/src", "guest-sdk/Cargo.toml", "plugins", "tests/fixtures", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&workspace)
        .args(["build", "--target", "wasm32-wasip2", "--profile", "wasm", "--target-dir"])
        .arg(&target_dir);
    for package in WASM_PACKAGES {
        build.args(["-p", package]);
    }
    // Flags meant for the host build must not leak into the wasm build.
    for variable in
        ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_TARGET_DIR", "RUSTC_WORKSPACE_WRAPPER"]
    {
        build.env_remove(variable);
    }
    let status = build.status().expect("cannot run cargo to build the wasm fixtures");
    if !status.success() {
        panic!(
            "building the wasm plugins and fixtures failed ({status}). Is the target installed? \
             `rustup target add wasm32-wasip2` (`cargo xtask test` does it for you)"
        );
    }
    println!("cargo:rustc-env=ORCHESTRIX_TEST_WASM_DIR={}", target_dir.join("wasm32-wasip2").join("wasm").display());
}
