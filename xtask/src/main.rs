//! `cargo xtask`: the project's commands, needing nothing but rustup/cargo.
//!
//! - `run`   — install the wasm target, build the host and the example
//!   plugins, and serve them on embedded SQLite (`./orchestrix.db`).
//! - `test`  — formatting, clippy (`-D warnings`), every test, and
//!   `cargo package` of the SDK (it must build outside the workspace).
//! - `dist`  — `target/release/orchestrix` and `target/plugins/<name>.wasm`.
//! - `bench` — `dist` and the test fixtures some suites load
//!   (`target/bench-fixtures`), then `target/release/orchestrix-bench` on
//!   `target/plugins` (extra arguments pass through).

#[cfg(test)]
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    // `cargo xtask bench -- --clients 64` and `cargo xtask bench --clients 64` both work.
    let rest: Vec<String> = args.skip_while(|arg| arg == "--").collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match task.as_str() {
        "run" => {
            dist(&root)?;
            let mut serve = Command::new(root.join("target/release/orchestrix"));
            serve.args(["serve", "--plugins", "target/plugins"]).args(&rest);
            run(&mut serve)
        }
        "test" => test(),
        "dist" => dist(&root),
        "bench" => {
            dist(&root)?;
            bench_fixtures(&root)?;
            run(cargo().args(["build", "--release", "-p", "orchestrix-bench"]))?;
            let mut bench = Command::new(root.join("target/release/orchestrix-bench"));
            bench.args(["--plugins", "target/plugins"]).args(&rest);
            run(&mut bench)
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <task> [args]\n\n\
                 tasks:\n  \
                 run     build everything and serve the example plugins on ./orchestrix.db\n  \
                 test    fmt check, clippy -D warnings, every test\n  \
                 dist    build target/release/orchestrix and target/plugins/*.wasm\n  \
                 bench   dist, then orchestrix-bench on target/plugins (try `cargo xtask bench --help`)"
            );
            if task.is_empty() || task == "help" || task == "--help" { Ok(()) } else { bail!("unknown task `{task}`") }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(command: &mut Command) -> Result<()> {
    eprintln!("$ {}", describe(command));
    let status = command.status().with_context(|| format!("cannot start {}", describe(command)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(command));
    }
    Ok(())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program().to_string_lossy().into_owned())
        .chain(command.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Install the wasm target when rustup does not have it yet.
fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to install the wasm32-wasip2 target")?;
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|line| line.trim() == WASM_TARGET) {
        run(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    Ok(())
}

/// Package names of the example plugins (`plugins/*/Cargo.toml`).
fn plugin_packages(root: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root.join("plugins"))? {
        let manifest = entry?.path().join("Cargo.toml");
        if !manifest.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&manifest)?;
        let name = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("name = ").map(|v| v.trim_matches('"').to_owned()))
            .with_context(|| format!("no package name in {}", manifest.display()))?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}

fn test() -> Result<()> {
    ensure_wasm_target()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    run(cargo().args(["test", "--workspace"]))?;
    // The SDK is published on its own: it must package (and build) alone.
    run(cargo().args(["package", "-p", "orchestrix-guest", "--allow-dirty", "--target-dir", "target/package-check"]))
}

/// Test fixtures the benchmarks load: `counter_upcast.wasm` (the
/// `fixture-counter` build with an upcaster).
fn bench_fixtures(root: &Path) -> Result<()> {
    run(cargo().args([
        "build",
        "--target",
        WASM_TARGET,
        "--profile",
        "wasm",
        "--target-dir",
        "target/wasm-build",
        "-p",
        "fixture-counter",
        "--features",
        "upcast",
    ]))?;
    let out = root.join("target/bench-fixtures");
    std::fs::create_dir_all(&out)?;
    let from = root.join("target/wasm-build").join(WASM_TARGET).join("wasm/fixture_counter.wasm");
    std::fs::copy(&from, out.join("counter_upcast.wasm")).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

fn dist(root: &Path) -> Result<()> {
    ensure_wasm_target()?;
    let plugins = plugin_packages(root)?;
    let mut build = cargo();
    build.args(["build", "--target", WASM_TARGET, "--profile", "wasm", "--target-dir", "target/wasm-build"]);
    for name in &plugins {
        build.args(["-p", name]);
    }
    run(&mut build)?;
    run(cargo().args(["build", "--release", "-p", "orchestrix-host"]))?;
    let out = root.join("target/plugins");
    std::fs::create_dir_all(&out)?;
    for name in &plugins {
        let file = format!("{}.wasm", name.replace('-', "_"));
        let from = root.join("target/wasm-build").join(WASM_TARGET).join("wasm").join(&file);
        std::fs::copy(&from, out.join(&file)).with_context(|| format!("copying {}", from.display()))?;
    }
    eprintln!("dist: target/release/orchestrix and {} plugin(s) in target/plugins", plugins.len());
    Ok(())
}
