//! Outgoing HTTP(S): every reqwest client of the host (webhooks, the CLI),
//! of its benchmarks and tests is built from [`builder`], which first
//! installs rustls's crypto provider (ring, which the NATS client uses
//! too) for the process. reqwest is built without a provider of its own,
//! so a client built any other way would panic; a tidy test keeps every
//! `reqwest::Client` construction here. The one client built elsewhere,
//! the OTLP exporter's, is built after [`install_tls_provider`].

use std::sync::Once;

/// Make ring rustls's crypto provider for this process (once; a provider
/// installed before stays).
pub fn install_tls_provider() {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A reqwest client builder, for `https://` as well as `http://`.
pub fn builder() -> reqwest::ClientBuilder {
    install_tls_provider();
    reqwest::Client::builder()
}

/// A client with reqwest's defaults.
pub fn client() -> reqwest::Client {
    builder().build().expect("a default HTTP client builds")
}

#[cfg(test)]
mod tests {
    #[test]
    fn clients_build_with_tls_available() {
        let client = super::builder().https_only(true).build();
        assert!(client.is_ok(), "{client:?}");
    }
}
