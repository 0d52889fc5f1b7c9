//! `keys generate` and `sign`: what a module author needs for a host that
//! runs with `--trusted-keys` (see `orchestrix_host::sandbox::signing`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use orchestrix_host::sandbox::signing::{self, SecretKey};

#[derive(Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    action: KeysAction,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Make an ed25519 key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub (for the hosts' --trusted-keys).
    Generate {
        /// Path and name of the two files, e.g. `keys/team-a`.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
pub struct SignArgs {
    /// The module to sign.
    file: PathBuf,
    /// The secret key file (`orchestrix keys generate`).
    #[arg(long, env = "ORCHESTRIX_SIGNING_KEY")]
    key: PathBuf,
    /// Write the signature beside the file (`FILE.wasm.sig`) instead of into it.
    #[arg(long)]
    detached: bool,
}

pub fn keys(args: KeysArgs) -> Result<()> {
    let KeysAction::Generate { out } = args.action;
    let (secret, public) = signing::generate().map_err(anyhow::Error::msg)?;
    let (secret_file, public_file) = (out.with_extension("key"), out.with_extension("pub"));
    for file in [&secret_file, &public_file] {
        if file.exists() {
            anyhow::bail!("{} exists; not overwriting a key", file.display());
        }
    }
    write_secret(&secret_file, &secret)?;
    std::fs::write(&public_file, public).with_context(|| format!("writing {}", public_file.display()))?;
    println!("secret key: {} (keep it secret: it signs modules)", secret_file.display());
    println!("public key: {} (copy it into the hosts' --trusted-keys directory)", public_file.display());
    Ok(())
}

#[cfg(unix)]
fn write_secret(file: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("creating {}", file.display()))?;
    out.write_all(text.as_bytes()).with_context(|| format!("writing {}", file.display()))
}

#[cfg(not(unix))]
fn write_secret(file: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))
}

/// Sign in place (write to a temporary file, then rename, so a host
/// watching the directory never sees half a file).
pub fn sign(args: SignArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.key).with_context(|| format!("reading {}", args.key.display()))?;
    let key = SecretKey::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.key.display()))?;
    let wasm = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let (target, bytes) = if args.detached {
        let name = args.file.file_name().context("the module has no file name")?.to_string_lossy().into_owned();
        (args.file.with_file_name(format!("{name}.sig")), key.sign_detached(&wasm).into_bytes())
    } else {
        (args.file.clone(), key.sign_embedded(&wasm).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?)
    };
    let partial = target.with_extension("signing");
    std::fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &target).with_context(|| format!("renaming to {}", target.display()))?;
    println!("signed {} → {}", args.file.display(), target.display());
    Ok(())
}
