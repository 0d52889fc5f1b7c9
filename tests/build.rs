//! Builds the wasm the integration tests load — the example plugins and the
//! test fixtures — from source, the way wasmtime's `test-programs` does.
//! Nothing wasm is committed. The artifacts land in `target/wasm-build`
//! (shared with `cargo xtask`), and their directory is handed to the tests
//! as `ORCHESTRIX_TEST_WASM_DIR`.

use std::path::PathBuf;
use std::process::Command;

/// Packages compiled to `wasm32-wasip2` for the tests.
const WASM_PACKAGES: &[&str] = &["bank", "fixture-other-world", "fixture-counter", "fixture-hazard"];

/// Extra builds of one fixture with features: (package, features, name the
/// `.wasm` is copied to).
const VARIANTS: &[(&str, &str, &str)] =
    &[("fixture-counter", "v2", "counter_v2"), ("fixture-counter", "v3", "counter_v3")];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir.parent().expect("tests/ lives in the workspace root").to_path_buf();
    let target_dir = workspace.join("target").join("wasm-build");

    for watched in ["wit", "guest-sdk/src", "guest-sdk/Cargo.toml", "plugins", "tests/fixtures", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }

    let wasm_dir = target_dir.join("wasm32-wasip2").join("wasm");
    let mut packages = Vec::new();
    for package in WASM_PACKAGES {
        packages.extend(["-p", package]);
    }
    wasm_build(&workspace, &target_dir, &packages);
    // The default build of a variant package is v1: keep it under its own name.
    copy(&wasm_dir, "fixture_counter", "counter_v1");
    for (package, features, name) in VARIANTS {
        wasm_build(&workspace, &target_dir, &["-p", package, "--features", features]);
        copy(&wasm_dir, &package.replace('-', "_"), name);
    }
    println!("cargo:rustc-env=ORCHESTRIX_TEST_WASM_DIR={}", target_dir.join("wasm32-wasip2").join("wasm").display());
}

fn wasm_build(workspace: &std::path::Path, target_dir: &std::path::Path, args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(workspace)
        .args(["build", "--target", "wasm32-wasip2", "--profile", "wasm", "--target-dir"])
        .arg(target_dir)
        .args(args);
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
}

fn copy(wasm_dir: &std::path::Path, from: &str, to: &str) {
    std::fs::copy(wasm_dir.join(format!("{from}.wasm")), wasm_dir.join(format!("{to}.wasm")))
        .unwrap_or_else(|e| panic!("copying {from}.wasm to {to}.wasm: {e}"));
}
