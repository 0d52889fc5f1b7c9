//! Outbound guard: where the host may connect when a client names the
//! destination (webhook and NATS subscriptions). A destination is checked
//! after DNS resolution — and, for webhooks, again at connect time, by the
//! resolver the HTTP client itself uses, so a name that resolves to a
//! public address when checked and to a private one when connecting
//! (rebinding) is still refused. Refused unless allowed by `--egress-allow`:
//! loopback, private (RFC 1918, IPv6 unique-local), link-local (including
//! the cloud metadata address 169.254.169.254), carrier-grade NAT,
//! unspecified, multicast and broadcast addresses. Loopback is allowed by
//! default only while the host itself listens on loopback alone.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

/// An `--egress-allow` entry: a network or a host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressAllow {
    Network(IpNet),
    Host(String),
}

impl FromStr for EgressAllow {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(network) = text.parse::<IpNet>() {
            return Ok(EgressAllow::Network(network));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(EgressAllow::Network(IpNet::from(ip)));
        }
        let valid = !text.is_empty()
            && text.len() <= 253
            && text.split('.').all(|label| {
                !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if valid {
            Ok(EgressAllow::Host(text.to_ascii_lowercase()))
        } else {
            Err(format!("`{text}` is neither a CIDR network, an IP address nor a host name"))
        }
    }
}

/// Where the host may connect.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    allow: Vec<EgressAllow>,
    allow_loopback: bool,
}

impl Default for EgressPolicy {
    /// Loopback allowed (a host on a developer's machine), nothing else
    /// internal.
    fn default() -> Self {
        Self::new(Vec::new(), true)
    }
}

impl EgressPolicy {
    /// `allow`: the `--egress-allow` entries; `allow_loopback`: whether the
    /// host listens on loopback alone.
    pub fn new(allow: Vec<EgressAllow>, allow_loopback: bool) -> Self {
        Self { allow, allow_loopback }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow.iter().any(|entry| matches!(entry, EgressAllow::Host(allowed) if *allowed == host))
    }

    /// Whether the host may connect to `ip`; the reason when not.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if self.allow.iter().any(|entry| matches!(entry, EgressAllow::Network(net) if net.contains(&ip))) {
            return Ok(());
        }
        if ip.is_loopback() && self.allow_loopback {
            return Ok(());
        }
        match internal_kind(ip) {
            None => Ok(()),
            Some(kind) => Err(format!(
                "{ip} is a {kind} address, which the host does not connect to unless allowed with --egress-allow"
            )),
        }
    }

    /// Check `host:port` as the host would connect to it: every address it
    /// resolves to must be allowed (a host name on the allow list is).
    pub async fn check_destination(&self, host: &str, port: u16) -> Result<(), String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.check_ip(ip);
        }
        if self.host_allowed(bare) {
            return Ok(());
        }
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|error| format!("cannot resolve `{bare}`: {error}"))?
            .collect();
        if addresses.is_empty() {
            return Err(format!("`{bare}` resolves to no address"));
        }
        for address in addresses {
            self.check_ip(address.ip()).map_err(|reason| format!("`{bare}` resolves to {reason}"))?;
        }
        Ok(())
    }

    /// Check a URL's host (with its scheme's default port).
    pub async fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        let host = url.host_str().ok_or_else(|| format!("`{url}` names no host"))?;
        self.check_destination(host, url.port_or_known_default().unwrap_or(80)).await
    }

    /// The check of a URL that needs no lookup: an IP literal host (which
    /// the HTTP client connects to without asking its resolver).
    pub fn check_literal(&self, url: &reqwest::Url) -> Result<(), String> {
        let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => self.check_ip(ip),
            Err(_) => Ok(()),
        }
    }
}

/// The kind of internal address `ip` is, if it is one.
fn internal_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("carrier-grade NAT")
    } else if ip.is_multicast() || ip.is_broadcast() || a >= 240 {
        Some("multicast or reserved")
    } else {
        None
    }
}

fn internal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if first & 0xfe00 == 0xfc00 {
        Some("private (unique-local)")
    } else if first & 0xffc0 == 0xfe80 || first & 0xffc0 == 0xfec0 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast or reserved")
    } else {
        None
    }
}

/// The resolver of the webhook clients: resolves as the system does, then
/// keeps only allowed addresses (none left: the connection fails with the
/// reason), so the address checked is the address connected to.
pub struct GuardedResolver(pub Arc<EgressPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if policy.host_allowed(&host) {
                return Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs);
            }
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|address| match policy.check_ip(address.ip()) {
                    Ok(()) => true,
                    Err(reason) => {
                        refused = Some(reason);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let reason = refused.unwrap_or_else(|| "no address".into());
                return Err(format!("egress refused: `{host}` resolves to {reason}").into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &EgressPolicy, ip: &str) -> bool {
        policy.check_ip(ip.parse().expect("ip")).is_err()
    }

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        let strict = EgressPolicy::new(vec![], false);
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "224.0.0.1",
        ] {
            assert!(refused(&strict, ip), "{ip}");
        }
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(!refused(&strict, ip), "{ip}");
        }
        let dev = EgressPolicy::new(vec![], true);
        assert!(!refused(&dev, "127.0.0.1") && !refused(&dev, "::1"));
        assert!(refused(&dev, "10.0.0.1"));
        let allowed = EgressPolicy::new(vec!["10.1.0.0/16".parse().unwrap(), "192.168.1.7".parse().unwrap()], false);
        assert!(!refused(&allowed, "10.1.2.3") && !refused(&allowed, "192.168.1.7"));
        assert!(refused(&allowed, "10.2.0.1") && refused(&allowed, "192.168.1.8"));
    }

    #[test]
    fn allow_entries_parse() {
        assert_eq!("10.0.0.0/8".parse::<EgressAllow>().unwrap(), EgressAllow::Network("10.0.0.0/8".parse().unwrap()));
        assert_eq!("Hooks.Internal".parse::<EgressAllow>().unwrap(), EgressAllow::Host("hooks.internal".into()));
        assert!("not a host!".parse::<EgressAllow>().is_err());
    }

    #[tokio::test]
    async fn names_are_checked_by_what_they_resolve_to() {
        let strict = EgressPolicy::new(vec![], false);
        let error = strict.check_destination("localhost", 80).await.expect_err("localhost is loopback");
        assert!(error.contains("loopback"), "{error}");
        let named = EgressPolicy::new(vec!["localhost".parse().unwrap()], false);
        named.check_destination("localhost", 80).await.expect("allowed by name");
    }
}
