//! `new`: scaffold a module crate of its own, outside any workspace — an
//! aggregate with one command and one event, a projection, native tests, a
//! release profile that gives a small `.wasm`, and a README with the build
//! and deploy lines.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct NewArgs {
    /// The crate's name (lowercase letters, digits, `-`, `_`); also the module's name (with `_` for `-`).
    name: String,
    /// The aggregate type to start with (lowercase letters, digits, `_`).
    #[arg(long, default_value = "item")]
    aggregate: String,
    /// Depend on the SDK at this path (a checkout's `guest-sdk`).
    #[arg(long, conflicts_with = "sdk_version")]
    sdk_path: Option<PathBuf>,
    /// Depend on this version of the SDK from the registry [default: this host's version].
    #[arg(long)]
    sdk_version: Option<String>,
    /// Where to create the crate's folder [default: the current directory].
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

const CARGO_TOML: &str = r#"[package]
name = "{crate}"
version = "0.1.0"
edition = "2024"

[lib]
# cdylib: the .wasm component the host loads; rlib: the same code as a
# native library, so `cargo test` runs the domain logic without wasm.
crate-type = ["cdylib", "rlib"]

[dependencies]
orchestrix-guest = {sdk}
serde = { version = "1", features = ["derive"] }

[dev-dependencies]
serde_json = "1"

# A small .wasm: no debug info, stripped, optimised across crates.
[profile.release]
opt-level = 3
debug = false
strip = true
lto = true
codegen-units = 1
panic = "abort"

# A crate of its own, even inside another workspace's folder.
[workspace]
"#;

const LIB_RS: &str = r#"//! The `{module}` module: the `{aggregate}` aggregate and its read model,
//! `{aggregate}_names`.

mod projection;

use orchestrix_guest::{Aggregate, DomainError, Module, ModuleBuilder};
use serde::{Deserialize, Serialize};

pub use projection::{Type}Names;

/// A {aggregate}: named once, when it is created.
#[derive(Default, Serialize, Deserialize)]
pub struct {Type} {
    name: Option<String>,
}

/// What a {aggregate} can be asked to do: `POST /v1/aggregates/{aggregate}/{id}/commands/Create`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum {Type}Command {
    Create { name: String },
}

/// What can happen to a {aggregate}.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum {Type}Event {
    Created { name: String },
}

impl Aggregate for {Type} {
    const TYPE: &'static str = "{aggregate}";
    type Command = {Type}Command;
    type Event = {Type}Event;

    fn handle(&self, command: {Type}Command) -> Result<Vec<{Type}Event>, DomainError> {
        match command {
            {Type}Command::Create { name } if name.trim().is_empty() => {
                Err(DomainError::invalid("name must not be empty"))
            }
            {Type}Command::Create { .. } if self.name.is_some() => {
                Err(DomainError::rejected("the {aggregate} already exists"))
            }
            {Type}Command::Create { name } => Ok(vec![{Type}Event::Created { name }]),
        }
    }

    fn apply(&mut self, event: {Type}Event) {
        match event {
            {Type}Event::Created { name } => self.name = Some(name),
        }
    }
}

/// The module: what it registers is what the host serves.
pub struct {Module};

impl Module for {Module} {
    const NAME: &'static str = "{module}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn register(module: &mut ModuleBuilder) {
        module.aggregate::<{Type}>().projection::<{Type}Names>();
    }
}

orchestrix_guest::export!({Module});

#[cfg(test)]
mod tests {
    use orchestrix_guest::testing::given;

    use super::*;

    #[test]
    fn a_{aggregate}_is_created_once_with_a_name() {
        given::<{Type}>([])
            .when({Type}Command::Create { name: "first".into() })
            .then_expect_events([{Type}Event::Created { name: "first".into() }])
            .then_expect_state(serde_json::json!({"name": "first"}));
        given::<{Type}>([{Type}Event::Created { name: "first".into() }])
            .when({Type}Command::Create { name: "again".into() })
            .then_expect_rejection("already exists");
        given::<{Type}>([]).when({Type}Command::Create { name: " ".into() }).then_expect_invalid("must not be empty");
    }
}
"#;

const PROJECTION_RS: &str = r#"//! `{aggregate}_names`: one document per {aggregate} in the collection
//! `{aggregate}s` (key: its id) — `GET /v1/projections/{aggregate}_names/{aggregate}s/{id}`.

use orchestrix_guest::{DocumentKey, Documents, DomainError, Envelope, Projection};
use serde::{Deserialize, Serialize};

use crate::{Type}Event;

/// `{aggregate}s/<id>`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct {Type}Name {
    pub name: String,
}

/// The names of every {aggregate}.
#[derive(Default)]
pub struct {Type}Names;

impl Projection for {Type}Names {
    const NAME: &'static str = "{aggregate}_names";
    type Event = {Type}Event;

    fn touches(&self, event: &Envelope<{Type}Event>) -> Vec<DocumentKey> {
        vec![DocumentKey::new("{aggregate}s", &event.aggregate_id)]
    }

    fn project(&self, event: &Envelope<{Type}Event>, documents: &mut Documents) -> Result<(), DomainError> {
        match &event.event {
            {Type}Event::Created { name } => {
                documents.upsert("{aggregate}s", &event.aggregate_id, &{Type}Name { name: name.clone() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use orchestrix_guest::testing::projection;
    use serde_json::json;

    use super::*;

    #[test]
    fn every_{aggregate}_has_its_name() {
        projection::<{Type}Names>()
            .given("{aggregate}", "a", [{Type}Event::Created { name: "first".into() }])
            .given("{aggregate}", "b", [{Type}Event::Created { name: "second".into() }])
            .then_expect_collection("{aggregate}s", [("a", json!({"name": "first"})), ("b", json!({"name": "second"}))]);
    }
}
"#;

const README_MD: &str = r#"# {crate}

An [Orchestrix](https://github.com/orchestrix) module: the `{aggregate}`
aggregate (`src/lib.rs`) and the `{aggregate}_names` read model
(`src/projection.rs`).

```sh
cargo test                                          # the domain logic, natively
rustup target add wasm32-wasip2                     # once
cargo build --target wasm32-wasip2 --release        # target/wasm32-wasip2/release/{file}.wasm
orchestrix dev                                      # build, serve, rebuild and hot-swap on every change
orchestrix deploy target/wasm32-wasip2/release/{file}.wasm --plugins /srv/orchestrix/plugins
curl -X POST http://127.0.0.1:7070/v1/aggregates/{aggregate}/a1/commands/Create -d '{"name": "first"}'
curl http://127.0.0.1:7070/v1/projections/{aggregate}_names/{aggregate}s/a1
```

On every new build the host checks it before serving it: the contract
version, the manifest, and a replay of recent stored history through the new
`apply`; a build that fails stays unserved and the previous one keeps
serving (`orchestrix modules` lists the reason).
"#;

/// `Some` CamelCase of a snake_case name.
fn camel(name: &str) -> String {
    name.split(['_', '-'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|first| first.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

fn valid(name: &str, extra: &[char]) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || extra.contains(&c))
}

pub fn new(args: NewArgs) -> Result<()> {
    if !valid(&args.name, &['-']) {
        bail!(
            "`{}` is not a crate name here: use lowercase letters, digits, `-` and `_`, starting with a letter",
            args.name
        );
    }
    if !valid(&args.aggregate, &[]) {
        bail!("`{}` is not an aggregate type here: use lowercase letters, digits and `_`", args.aggregate);
    }
    let root = args.dir.join(&args.name);
    if root.exists() {
        bail!("{} exists already", root.display());
    }
    let sdk = match (&args.sdk_path, &args.sdk_version) {
        (Some(path), _) => {
            let path = std::fs::canonicalize(path).with_context(|| format!("the SDK at {}", path.display()))?;
            if !path.join("Cargo.toml").is_file() {
                bail!("{} holds no Cargo.toml: pass the SDK's folder (guest-sdk)", path.display());
            }
            format!("{{ path = {:?} }}", path.display().to_string())
        }
        (None, Some(version)) => format!("{version:?}"),
        (None, None) => format!("\"{}\"", env!("CARGO_PKG_VERSION")),
    };
    let module = args.name.replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("{crate}", &args.name)
            .replace("{file}", &module)
            .replace("{module}", &module)
            .replace("{Module}", &camel(&module))
            .replace("{Type}", &camel(&args.aggregate))
            .replace("{aggregate}", &args.aggregate)
            .replace("{sdk}", &sdk)
    };
    std::fs::create_dir_all(root.join("src")).with_context(|| format!("creating {}", root.display()))?;
    for (file, template) in [
        ("Cargo.toml", CARGO_TOML),
        ("src/lib.rs", LIB_RS),
        ("src/projection.rs", PROJECTION_RS),
        ("README.md", README_MD),
        (".gitignore", "/target\n"),
    ] {
        std::fs::write(root.join(file), fill(template)).with_context(|| format!("writing {file}"))?;
    }
    println!("created {} (module `{module}`, aggregate `{}`)", root.display(), args.aggregate);
    println!("  cd {} && cargo test && orchestrix dev", root.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_types() {
        assert_eq!(camel("order_line"), "OrderLine");
        assert_eq!(camel("shop-demo"), "ShopDemo");
        assert!(valid("shop-demo", &['-']) && !valid("Shop", &['-']) && !valid("9lives", &[]) && !valid("a-b", &[]));
    }
}
