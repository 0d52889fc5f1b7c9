//! Wire encoding of typed commands and events.
//!
//! Commands and events are ordinary serde enums in their default, externally
//! tagged representation: the variant name is the command or event type and
//! its fields are the JSON payload. This module splits such a value into
//! `(type, payload)` for the wire, joins them back, and reads the list of
//! variant names (for the manifest) straight from the `Deserialize` impl.

use std::cell::Cell;
use std::fmt;

use serde::Serialize;
use serde::de::{self, DeserializeOwned, Visitor};
use serde_json::Value;

use crate::DomainError;

/// The variant names of a serde enum, read from its `Deserialize` impl.
///
/// # Panics
/// When `T` is not an externally tagged enum (serde's default). The manifest
/// needs the names, so this is a programming error surfaced by the first
/// `cargo test` of the module.
pub(crate) fn variant_names<T: DeserializeOwned>() -> Vec<String> {
    let found = Cell::new(None);
    let _ = T::deserialize(VariantNameProbe { found: &found });
    match found.get() {
        Some(names) => names.iter().map(|name| (*name).to_owned()).collect(),
        None => panic!(
            "`{}` must be an enum with serde's default (externally tagged) representation: \
             its variant names are the command or event types",
            std::any::type_name::<T>()
        ),
    }
}

/// Encode a typed enum value as `(variant name, JSON payload)`.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<(String, String), DomainError> {
    let json = serde_json::to_value(value).map_err(|e| DomainError::Invalid(format!("cannot serialize: {e}")))?;
    match json {
        // Unit variants serialize as a bare string; their payload is `{}`.
        Value::String(name) => Ok((name, "{}".to_owned())),
        Value::Object(map) if map.len() == 1 => {
            let (name, payload) = map.into_iter().next().expect("one entry");
            Ok((name, payload.to_string()))
        }
        other => Err(DomainError::Invalid(format!(
            "`{}` is not an externally tagged enum value: {other}",
            std::any::type_name::<T>()
        ))),
    }
}

/// Decode `(variant name, JSON payload)` into a typed enum value.
pub(crate) fn decode<T: DeserializeOwned>(name: &str, payload: &str) -> Result<T, DomainError> {
    // Fast path: parse `{"<name>": <payload>}` in one pass. It can only
    // succeed when `payload` is exactly one JSON value of the variant.
    let tagged = format!("{{{}:{payload}}}", Value::String(name.to_owned()));
    if let Ok(value) = serde_json::from_str(&tagged) {
        return Ok(value);
    }
    // Unit variants, and precise errors.
    let body: Value = serde_json::from_str(payload)
        .map_err(|e| DomainError::Invalid(format!("`{name}` payload is not valid JSON: {e}")))?;
    let unit_candidate = matches!(&body, Value::Object(map) if map.is_empty()) || body.is_null();
    let tagged = Value::Object([(name.to_owned(), body)].into_iter().collect());
    match serde_json::from_value(tagged) {
        Ok(value) => Ok(value),
        Err(first_error) => {
            if unit_candidate && let Ok(value) = serde_json::from_value(Value::String(name.to_owned())) {
                return Ok(value);
            }
            Err(DomainError::Invalid(format!("invalid `{name}`: {first_error}")))
        }
    }
}

/// Decode a state blob (JSON bytes); the empty blob is the initial state.
pub(crate) fn decode_state<S: DeserializeOwned + Default>(state: &[u8]) -> Result<S, DomainError> {
    if state.is_empty() {
        return Ok(S::default());
    }
    serde_json::from_slice(state).map_err(|e| DomainError::Invalid(format!("state blob is not readable: {e}")))
}

/// Encode a state value as its blob.
pub(crate) fn encode_state<S: Serialize>(state: &S) -> Result<Vec<u8>, DomainError> {
    serde_json::to_vec(state).map_err(|e| DomainError::Invalid(format!("cannot serialize state: {e}")))
}

/// A deserializer that only answers `deserialize_enum`, recording the names.
struct VariantNameProbe<'a> {
    found: &'a Cell<Option<&'static [&'static str]>>,
}

#[derive(Debug)]
struct ProbeDone;

impl fmt::Display for ProbeDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("variant name probe")
    }
}

impl std::error::Error for ProbeDone {}

impl de::Error for ProbeDone {
    fn custom<M: fmt::Display>(_msg: M) -> Self {
        ProbeDone
    }
}

impl<'de> de::Deserializer<'de> for VariantNameProbe<'_> {
    type Error = ProbeDone;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeDone> {
        self.found.set(Some(variants));
        Err(ProbeDone)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Sample {
        Opened { owner: String },
        Touched {},
        Unit,
    }

    #[test]
    fn reads_variant_names() {
        assert_eq!(variant_names::<Sample>(), ["Opened", "Touched", "Unit"]);
    }

    #[test]
    #[should_panic(expected = "externally tagged")]
    fn rejects_non_enums() {
        variant_names::<String>();
    }

    #[test]
    fn round_trips_every_variant_shape() {
        for value in [Sample::Opened { owner: "ann".into() }, Sample::Touched {}, Sample::Unit] {
            let (name, payload) = encode(&value).unwrap();
            assert_eq!(decode::<Sample>(&name, &payload).unwrap(), value);
        }
        assert_eq!(encode(&Sample::Unit).unwrap(), ("Unit".into(), "{}".into()));
    }

    #[test]
    fn bad_payloads_are_invalid_not_panics() {
        assert!(matches!(decode::<Sample>("Opened", "{"), Err(DomainError::Invalid(_))));
        assert!(matches!(decode::<Sample>("Opened", "{}"), Err(DomainError::Invalid(_))));
        assert!(matches!(decode::<Sample>("Nope", "{}"), Err(DomainError::Invalid(_))));
    }
}
