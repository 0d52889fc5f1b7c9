//! What a request may name, the same on every store and checked before a
//! command joins a group commit, so one client's oversized or malformed id
//! is that client's 400 and never a failure of the batch it would have
//! joined (PostgreSQL refuses index entries over ~2.7 KB and any NUL
//! character; SQLite takes both — the host holds both stores to one rule).
//!
//! | what | rule |
//! |---|---|
//! | aggregate id | 1–256 bytes of UTF-8, no control characters (NUL included) |
//! | `Idempotency-Key`, `X-Correlation-ID` | at most 256 bytes, no control characters |
//! | document keys, collection names, query values | no NUL |
//! | command bodies | no NUL in any string (`\u0000`), key or value |

/// Longest aggregate id, idempotency key or correlation id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Which part of a request broke a limit, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidInput {
    /// The request's part, as the API names it (`aggregate_id`,
    /// `idempotency_key`, …).
    pub field: &'static str,
    pub reason: String,
}

/// Check an identifier against [`MAX_ID_BYTES`] and the character rule.
pub fn check_id(field: &'static str, value: &str) -> Result<(), InvalidInput> {
    let refuse = |reason: String| Err(InvalidInput { field, reason });
    if value.is_empty() {
        return refuse("must not be empty".into());
    }
    if value.len() > MAX_ID_BYTES {
        return refuse(format!("is {} bytes long; the limit is {MAX_ID_BYTES}", value.len()));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return refuse(format!("contains the control character {:?}, which is not allowed", c));
    }
    Ok(())
}

/// Refuse a NUL character in free text (keys and filter values).
pub fn check_no_nul(field: &'static str, value: &str) -> Result<(), InvalidInput> {
    if value.contains('\0') {
        return Err(InvalidInput { field, reason: "contains a NUL character, which is not allowed".into() });
    }
    Ok(())
}

/// Whether JSON text holds a NUL character: raw, or escaped as `\u0000`
/// (and not merely an escaped backslash followed by the text `u0000`).
pub fn json_has_nul(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            0 => return true,
            b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                if bytes.get(i + 2..i + 6) == Some(b"0000") {
                    return true;
                }
                i += 6;
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::{MAX_ID_BYTES, check_id, json_has_nul};

    #[test]
    fn escaped_and_raw_nul_are_found_but_an_escaped_backslash_is_not() {
        assert!(json_has_nul(r#"{"owner":"\u0000"}"#));
        assert!(json_has_nul("{\"owner\":\"a\0b\"}"));
        assert!(!json_has_nul(r#"{"owner":"\\u0000"}"#));
        assert!(json_has_nul(r#"{"owner":"\\\u0000"}"#));
        assert!(!json_has_nul(r#"{"owner":"\u00e9 \n"}"#));
    }

    #[test]
    fn ids_are_bounded_and_printable() {
        assert!(check_id("aggregate_id", "acc-1").is_ok());
        assert!(check_id("aggregate_id", &"é".repeat(MAX_ID_BYTES / 2)).is_ok());
        assert_eq!(check_id("aggregate_id", &"x".repeat(MAX_ID_BYTES + 1)).unwrap_err().field, "aggregate_id");
        assert!(check_id("aggregate_id", "a\0b").is_err());
        assert!(check_id("aggregate_id", "a\nb").is_err());
        assert!(check_id("aggregate_id", "").is_err());
    }
}
