//! Builds the wasm the integration tests load from source, the way
//! wasmtime's `test-programs` does; nothing wasm is committed.
//!
//! Every package in `plugins/*` (the example modules) and `tests/fixtures/*`
//! is built for `wasm32-wasip2` — once with its default features, and once
//! more per feature in its `[features]` (a fixture's versions: `counter`'s
//! `v2`, `v3`). Each build is an artifact, named after the library and the
//! feature (`bank`, `fixture_counter`, `fixture_counter_v2`) and copied to
//! `OUT_DIR/wasm/<artifact>.wasm`. `OUT_DIR/fixtures.rs`, included by
//! `tests/integration/fixtures.rs`, has one constant per artifact, its
//! absolute path (`BANK`, `FIXTURE_COUNTER_V2`), and `foreach_fixture!`,
//! which expands a macro once per artifact: the tests use it to refuse to
//! compile while an artifact has no test.
//!
//! Cargo builds them in `target/wasm-build` (shared with `cargo xtask`);
//! the tests keep precompiled modules in `target/wasm-build/precompiled`
//! (`ORCHESTRIX_TEST_PRECOMPILED_DIR`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Directories whose every subdirectory is a package to build.
const SOURCES: &[&str] = &["plugins", "tests/fixtures"];

/// One wasm file the tests may load.
struct Artifact {
    /// `fixture_counter_v2`: the library's name, and the feature if any.
    name: String,
    /// The package's directory, relative to the workspace (`tests/fixtures/counter`).
    source: String,
    package: String,
    library: String,
    feature: Option<String>,
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir.parent().expect("tests/ lives in the workspace root").to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = workspace.join("target").join("wasm-build");

    for watched in ["wit", "guest-sdk/src", "guest-sdk/Cargo.toml", "Cargo.lock"].iter().chain(SOURCES) {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }

    let artifacts = discover(&workspace);
    let built = target_dir.join("wasm32-wasip2").join("wasm");
    let copies = out_dir.join("wasm");
    std::fs::create_dir_all(&copies).expect("OUT_DIR is writable");
    // Every default build in one cargo run, then one run per feature (each
    // overwrites the library's file, so every build is copied right away).
    let defaults: Vec<&Artifact> = artifacts.iter().filter(|a| a.feature.is_none()).collect();
    let mut packages = Vec::new();
    for artifact in &defaults {
        packages.extend(["-p", artifact.package.as_str()]);
    }
    wasm_build(&workspace, &target_dir, &packages);
    for artifact in &defaults {
        copy(&built, artifact, &copies);
    }
    for artifact in artifacts.iter().filter(|a| a.feature.is_some()) {
        let feature = artifact.feature.as_deref().expect("a variant");
        wasm_build(&workspace, &target_dir, &["-p", &artifact.package, "--features", feature]);
        copy(&built, artifact, &copies);
    }

    std::fs::write(out_dir.join("fixtures.rs"), generate(&artifacts, &copies)).expect("OUT_DIR is writable");
    println!("cargo:rustc-env=ORCHESTRIX_TEST_PRECOMPILED_DIR={}", target_dir.join("precompiled").display());
}

/// The artifacts of every package under [`SOURCES`], sorted by name.
fn discover(workspace: &Path) -> Vec<Artifact> {
    let mut artifacts = Vec::new();
    for source in SOURCES {
        let entries = std::fs::read_dir(workspace.join(source)).unwrap_or_else(|e| panic!("reading {source}: {e}"));
        for entry in entries {
            let dir = entry.expect("a directory entry").path();
            let manifest = dir.join("Cargo.toml");
            if !manifest.is_file() {
                continue;
            }
            let relative = dir.strip_prefix(workspace).expect("under the workspace").display().to_string();
            let text = std::fs::read_to_string(&manifest).unwrap_or_else(|e| panic!("reading {relative}: {e}"));
            let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{relative}/Cargo.toml: {e}"));
            let package = table["package"]["name"].as_str().expect("[package] name").to_owned();
            let lib = table.get("lib").and_then(toml::Value::as_table);
            let cdylib = lib
                .and_then(|lib| lib.get("crate-type"))
                .and_then(toml::Value::as_array)
                .is_some_and(|types| types.iter().any(|t| t.as_str() == Some("cdylib")));
            assert!(cdylib, "{relative}: a wasm module needs `[lib] crate-type = [\"cdylib\"]`");
            let library = lib
                .and_then(|lib| lib.get("name"))
                .and_then(toml::Value::as_str)
                .map_or_else(|| package.replace('-', "_"), str::to_owned);
            let features = table.get("features").and_then(toml::Value::as_table);
            let variants = features.into_iter().flat_map(|f| f.keys()).filter(|f| *f != "default");
            for feature in std::iter::once(None).chain(variants.map(Some)) {
                let name = match feature {
                    None => library.clone(),
                    Some(feature) => format!("{library}_{}", feature.replace('-', "_")),
                };
                assert!(
                    name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && name.starts_with(|c: char| c.is_ascii_alphabetic()),
                    "{relative}: `{name}` cannot name a constant"
                );
                artifacts.push(Artifact {
                    name,
                    source: relative.clone(),
                    package: package.clone(),
                    library: library.clone(),
                    feature: feature.cloned(),
                });
            }
        }
    }
    artifacts.sort_by(|a, b| a.name.cmp(&b.name));
    for pair in artifacts.windows(2) {
        assert!(pair[0].name != pair[1].name, "two builds are named `{}`", pair[0].name);
    }
    artifacts
}

/// `fixtures.rs`: a constant per artifact and `foreach_fixture!`.
fn generate(artifacts: &[Artifact], copies: &Path) -> String {
    let mut code = String::from("// Generated by tests/build.rs: the wasm artifacts the tests load.\n\n");
    let mut foreach = String::new();
    for artifact in artifacts {
        let constant = artifact.name.to_ascii_uppercase();
        let build = match &artifact.feature {
            None => "default features".to_owned(),
            Some(feature) => format!("feature `{feature}`"),
        };
        let path = copies.join(format!("{}.wasm", artifact.name));
        let path = path.to_str().expect("a UTF-8 OUT_DIR");
        writeln!(code, "/// `{}` (package `{}`), {build}.", artifact.source, artifact.package).unwrap();
        writeln!(code, "pub const {constant}: &str = {path:?};").unwrap();
        writeln!(foreach, "        $macro!({constant}); // {}, {build}", artifact.source).unwrap();
    }
    write!(
        code,
        "\n/// Expands `$macro!(CONSTANT)` once per artifact above.\n\
         macro_rules! foreach_fixture {{\n    ($macro:ident) => {{\n{foreach}    }};\n}}\n"
    )
    .unwrap();
    code
}

fn wasm_build(workspace: &Path, target_dir: &Path, args: &[&str]) {
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

fn copy(built: &Path, artifact: &Artifact, copies: &Path) {
    let from = built.join(format!("{}.wasm", artifact.library));
    let to = copies.join(format!("{}.wasm", artifact.name));
    std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}
