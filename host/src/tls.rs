//! TLS for the API (`--tls-cert`, `--tls-key`): rustls with ring, HTTP/1.1.
//! The certificate and key are re-read when either file changes (checked
//! every second), so a renewed certificate takes effect for new
//! connections without a restart and without dropping open ones; a file
//! that does not load keeps the previous certificate, and says why in the
//! log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often the certificate files are checked for a change.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Where the certificate and its key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// The certificate served now, replaced when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| TlsError(format!("cannot read {}: {e}", files.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{} holds no PEM certificate", files.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError(format!("cannot read a PEM private key from {}: {e}", files.key.display())))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| TlsError(format!("{}: {e}", files.key.display())))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        TlsError(format!("{} and {} do not belong together: {e}", files.cert.display(), files.key.display()))
    })?;
    Ok(Arc::new(certified))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    /// Load the files (an error stops the start: a host that was asked
    /// for TLS does not serve without it).
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let current = load(&files)?;
        Ok(Arc::new(Self { files, current: parking_lot::RwLock::new(current) }))
    }

    /// The rustls configuration of the API's listener.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        crate::http_client::install_tls_provider();
        let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Re-read the files whenever they change, until the process ends.
    pub async fn watch(self: Arc<Self>) {
        let stamp = |files: &TlsFiles| (modified(&files.cert), modified(&files.key));
        let mut seen = stamp(&self.files);
        let mut ticker = tokio::time::interval(CHECK_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = stamp(&self.files);
            if now == seen {
                continue;
            }
            seen = now;
            match load(&self.files) {
                Ok(certified) => {
                    *self.current.write() = certified;
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(error) => {
                    tracing::warn!(%error, "the changed TLS certificate does not load; serving the previous one")
                }
            }
        }
    }
}
