//! Scopes (what a token may do) and needs (what a route asks for). Every
//! route of the API declares its [`Need`] where it is registered
//! (`http::access::Routes`); nothing else decides who may call it.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Read everything: aggregate state and streams, the feed, projections,
    /// modules, sagas, the cluster view.
    Read,
    /// Send commands to every aggregate type (`None`) or to one.
    Command(Option<String>),
    /// Operator actions: modules, projections, sagas, subscriptions.
    Operate,
    /// Everything, including tokens, the audit log and what-if runs.
    Admin,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Read => f.write_str("read"),
            Scope::Command(None) => f.write_str("command"),
            Scope::Command(Some(aggregate_type)) => write!(f, "command:{aggregate_type}"),
            Scope::Operate => f.write_str("operate"),
            Scope::Admin => f.write_str("admin"),
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A scope that is none of the known ones.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown scope `{0}` (known: read, command, command:TYPE, operate, admin)")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(text: &str) -> Result<Self, UnknownScope> {
        match text {
            "read" => Ok(Scope::Read),
            "command" => Ok(Scope::Command(None)),
            "operate" => Ok(Scope::Operate),
            "admin" => Ok(Scope::Admin),
            _ => match text.strip_prefix("command:") {
                Some(aggregate_type)
                    if !aggregate_type.is_empty()
                        && aggregate_type.len() <= 128
                        && aggregate_type.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) =>
                {
                    Ok(Scope::Command(Some(aggregate_type.to_owned())))
                }
                _ => Err(UnknownScope(text.to_owned())),
            },
        }
    }
}

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    /// Anyone (the probes).
    Open,
    /// `read`.
    Read,
    /// `command`, or `command:TYPE` for the route's aggregate type.
    Command,
    /// `operate`.
    Operate,
    /// `admin`.
    Admin,
    /// `/metrics`: anyone from a loopback address, `read` from elsewhere.
    Metrics,
}

impl Need {
    /// The narrowest scope that satisfies this need (for
    /// [`Need::Command`], of `aggregate_type`), to name in a 403.
    pub fn scope_name(self, aggregate_type: Option<&str>) -> String {
        match (self, aggregate_type) {
            (Need::Command, Some(aggregate_type)) => format!("command:{aggregate_type}"),
            (Need::Command, None) => "command".into(),
            (Need::Read | Need::Metrics, _) => "read".into(),
            (Need::Operate, _) => "operate".into(),
            (Need::Admin, _) => "admin".into(),
            (Need::Open, _) => "none".into(),
        }
    }

    /// Whether an action on this route is an operator's, recorded in the
    /// audit log.
    pub fn is_audited(self) -> bool {
        matches!(self, Need::Operate | Need::Admin)
    }
}

/// Whether `scopes` satisfy `need` (`aggregate_type`: the route's, for
/// [`Need::Command`]). `admin` satisfies every need.
pub fn allows(scopes: &[Scope], need: Need, aggregate_type: Option<&str>) -> bool {
    need == Need::Open
        || scopes.iter().any(|scope| match (scope, need) {
            (Scope::Admin, _) => true,
            (Scope::Read, Need::Read | Need::Metrics) => true,
            (Scope::Command(None), Need::Command) => true,
            (Scope::Command(Some(only)), Need::Command) => aggregate_type == Some(only.as_str()),
            (Scope::Operate, Need::Operate) => true,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_through_text() {
        for text in ["read", "command", "command:account", "operate", "admin"] {
            assert_eq!(text.parse::<Scope>().expect(text).to_string(), text);
        }
        for bad in ["", "write", "command:", "command:a b", "Admin"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
    }

    #[test]
    fn command_scopes_narrow_to_their_type() {
        let account = [Scope::Command(Some("account".into()))];
        assert!(allows(&account, Need::Command, Some("account")));
        assert!(!allows(&account, Need::Command, Some("order")));
        assert!(!allows(&account, Need::Read, None));
        assert!(allows(&[Scope::Command(None)], Need::Command, Some("order")));
        assert!(allows(&[Scope::Admin], Need::Operate, None));
        assert!(!allows(&[Scope::Operate], Need::Admin, None));
        assert!(!allows(&[Scope::Read], Need::Operate, None));
        assert!(allows(&[], Need::Open, None));
    }
}
