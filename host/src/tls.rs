//! TLS for the API (`--tls-cert`, `--tls-key`): rustls with ring, HTTP/1.1.
//! The certificate and key are re-read when either file changes (checked
//! every second), so a renewed certificate takes effect for new
//! connections without a restart and without dropping open ones; a file
//! that does not load keeps the previous certificate, and says why in the
//! log. With `--tls-client-ca`, clients may present a
//! certificate that CA issued; its subject's common name names the token
//! whose scopes the client gets (see `http::access`).

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

    /// The rustls configuration of the API's listener; with `client_ca`,
    /// client certificates issued by it are asked for (not required: a
    /// client may authenticate with a bearer token instead).
    pub fn server_config(self: &Arc<Self>, client_ca: Option<&Path>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        crate::http_client::install_tls_provider();
        let builder = rustls::ServerConfig::builder();
        let mut config = match client_ca {
            None => builder.with_no_client_auth().with_cert_resolver(self.clone()),
            Some(file) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(file)
                    .map_err(|e| TlsError(format!("cannot read {}: {e}", file.display())))?
                {
                    let cert = cert.map_err(|e| TlsError(format!("{}: {e}", file.display())))?;
                    roots.add(cert).map_err(|e| TlsError(format!("{}: {e}", file.display())))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError(format!("{}: {e}", file.display())))?;
                builder.with_client_cert_verifier(verifier).with_cert_resolver(self.clone())
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
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

/// The common name (CN) of a DER certificate's subject, if it has one.
pub fn subject_common_name(der: &[u8]) -> Option<String> {
    let (certificate, _) = element(der, 0x30)?;
    let (mut tbs, _) = element(certificate, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = skip(tbs)?; // version
    }
    for _ in 0..4 {
        tbs = skip(tbs)?; // serial number, signature algorithm, issuer, validity
    }
    let (mut names, _) = element(tbs, 0x30)?;
    while !names.is_empty() {
        let (mut set, rest) = element(names, 0x31)?;
        while !set.is_empty() {
            let (attribute, next) = element(set, 0x30)?;
            let (oid, value) = element(attribute, 0x06)?;
            if oid == [0x55, 0x04, 0x03] {
                let (text, _) = element(value, *value.first()?)?;
                return String::from_utf8(text.to_vec()).ok();
            }
            set = next;
        }
        names = rest;
    }
    None
}

/// The content of the DER element at the start of `input` if its tag is
/// `tag`, and what follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let first = *input.get(1)?;
    let (length, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let length = input.get(2..2 + count)?.iter().fold(0usize, |n, byte| (n << 8) | usize::from(*byte));
        (length, 2 + count)
    };
    let end = header.checked_add(length)?;
    Some((input.get(header..end)?, input.get(end..)?))
}

/// What follows the DER element at the start of `input`.
fn skip(input: &[u8]) -> Option<&[u8]> {
    element(input, *input.first()?).map(|(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_certificate_subject_s_common_name_is_read() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Orchestrix");
        params.distinguished_name.push(rcgen::DnType::CommonName, "ops-team");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(super::subject_common_name(cert.der()).as_deref(), Some("ops-team"));
        assert_eq!(super::subject_common_name(b"\x30\x03\x02\x01"), None);
    }
}
