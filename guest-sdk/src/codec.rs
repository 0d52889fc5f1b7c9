//! Wire encoding of typed commands and events.
//!
//! Commands and events are ordinary serde enums in their default, externally
//! tagged representation: the variant name is the command or event type and
//! its fields are the JSON payload. This module splits such a value into
//! `(type, payload)` for the wire, joins them back, and reads the list of
//! variant names (for the manifest) straight from the `Deserialize` impl.
//!
//! Joining them back is strict (see [`strict`]): a struct variant's payload,
//! and every struct inside it, must be a JSON object, and no object in the
//! payload may repeat a key.

use std::cell::Cell;
use std::fmt;

use serde::Serialize;
use serde::de::{self, DeserializeOwned, Visitor};
use serde_json::Value;

use crate::DomainError;
use strict::DecodeError;

mod strict;

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
///
/// Every failure is [`DomainError::Invalid`], naming the variant: malformed
/// JSON, a value the type rejects, or a shape the strict rules refuse, such
/// as "`DepositMoney`: expected a JSON object with named fields, got an
/// array" or "`OpenAccount`: duplicate field `owner`".
pub(crate) fn decode<T: DeserializeOwned>(name: &str, payload: &str) -> Result<T, DomainError> {
    strict::decode_variant(name, payload).map_err(|error| {
        DomainError::Invalid(match error {
            DecodeError::Shape(violation) => format!("`{name}`: {violation}"),
            DecodeError::Json(error) if error.is_data() => format!("invalid `{name}`: {error}"),
            DecodeError::Json(error) => format!("`{name}` payload is not valid JSON: {error}"),
        })
    })
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
    use std::collections::BTreeMap;

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
    fn a_value_of_the_wrong_type_is_named_by_its_path() {
        let message = |name: &str, payload: &str| match decode::<Order>(name, payload) {
            Err(DomainError::Invalid(message)) => message,
            other => panic!("expected an invalid-input error, got {other:?}"),
        };
        let nested = message("Placed", r#"{"lines": [{"sku": "a", "quantity": 1}, {"sku": "b", "quantity": "two"}]}"#);
        assert!(nested.starts_with("`Placed`: lines[1].quantity: invalid type: string \"two\""), "{nested}");
        let missing = message("Placed", r#"{"lines": [{"sku": "a"}]}"#);
        assert!(missing.starts_with("`Placed`: lines[0]: missing field `quantity`"), "{missing}");
        let top = match decode::<Account>("DepositMoney", r#"{"amount": "ten"}"#) {
            Err(DomainError::Invalid(message)) => message,
            other => panic!("{other:?}"),
        };
        assert!(top.starts_with("`DepositMoney`: amount: invalid type: string \"ten\", expected i64"), "{top}");
    }

    #[test]
    fn bad_payloads_are_invalid_not_panics() {
        assert!(matches!(decode::<Sample>("Opened", "{"), Err(DomainError::Invalid(_))));
        assert!(matches!(decode::<Sample>("Opened", "{}"), Err(DomainError::Invalid(_))));
        assert!(matches!(decode::<Sample>("Nope", "{}"), Err(DomainError::Invalid(_))));
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    enum Account {
        OpenAccount { owner: String, initial_balance: i64 },
        DepositMoney { amount: i64 },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Line {
        sku: String,
        quantity: u32,
    }

    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
    enum Size {
        Small,
        Large,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Carrier {
        Post,
        Courier { name: String },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Order {
        Placed {
            lines: Vec<Line>,
            #[serde(default)]
            gift: Option<Line>,
            #[serde(default)]
            tags: BTreeMap<String, u32>,
            #[serde(default)]
            bins: BTreeMap<u32, Size>,
            #[serde(default)]
            sizes: BTreeMap<Size, u32>,
            #[serde(default)]
            dimensions: (u32, u32),
        },
        Shipped(Vec<Line>),
        Moved(i32, i32),
        Labelled {
            carrier: Carrier,
        },
    }

    fn invalid<T: DeserializeOwned + fmt::Debug>(name: &str, payload: &str) -> String {
        match decode::<T>(name, payload) {
            Err(DomainError::Invalid(message)) => message,
            other => panic!("expected `{payload}` to be invalid, got {other:?}"),
        }
    }

    #[test]
    fn refuses_an_array_for_the_variant_fields() {
        assert_eq!(
            invalid::<Account>("DepositMoney", "[3]"),
            "`DepositMoney`: expected a JSON object with named fields, got an array"
        );
        assert_eq!(
            invalid::<Sample>("Touched", "[]"),
            "`Touched`: expected a JSON object with named fields, got an array"
        );
    }

    #[test]
    fn refuses_an_array_for_a_nested_struct() {
        assert_eq!(
            invalid::<Order>("Placed", r#"{"lines": [{"sku": "a", "quantity": 1}, ["b", 2]]}"#),
            "`Placed`: expected a JSON object with named fields at `lines[1]`, got an array"
        );
        assert_eq!(
            invalid::<Order>("Placed", r#"{"lines": [], "gift": ["b", 2]}"#),
            "`Placed`: expected a JSON object with named fields at `gift`, got an array"
        );
        assert_eq!(
            invalid::<Order>("Shipped", r#"[["b", 2]]"#),
            "`Shipped`: expected a JSON object with named fields at `[0]`, got an array"
        );
        assert_eq!(
            invalid::<Order>("Labelled", r#"{"carrier": {"Courier": ["Speedy"]}}"#),
            "`Labelled`: expected a JSON object with named fields at `carrier.Courier`, got an array"
        );
    }

    #[test]
    fn refuses_repeated_keys_at_the_top() {
        assert_eq!(
            invalid::<Account>("OpenAccount", r#"{"owner":"a","owner":"b","initial_balance":1}"#),
            "`OpenAccount`: duplicate field `owner`"
        );
        // The same key spelled with an escape is the same key.
        assert_eq!(
            invalid::<Account>("OpenAccount", r#"{"owner":"a","\u006fwner":"b","initial_balance":1}"#),
            "`OpenAccount`: duplicate field `owner`"
        );
    }

    #[test]
    fn refuses_repeated_keys_at_any_depth() {
        let cases = [
            (r#"{"lines": [{"sku": "a", "quantity": 1}, {"sku": "b", "sku": "c", "quantity": 2}]}"#, "lines[1].sku"),
            (r#"{"lines": [], "tags": {"red": 1, "red": 2}}"#, "tags.red"),
            (r#"{"lines": [], "bins": {"7": "Small", "7": "Large"}}"#, "bins.7"),
            (r#"{"lines": [], "sizes": {"Small": 1, "Small": 2}}"#, "sizes.Small"),
            // `note` is no field of `Placed`: ignored values are checked too.
            (r#"{"lines": [], "note": {"by": "ann", "by": "bob"}}"#, "note.by"),
            (r#"{"lines": [], "note": [{"x": [{"y": 1, "y": 2}]}]}"#, "note[0].x[0].y"),
        ];
        for (payload, path) in cases {
            assert_eq!(invalid::<Order>("Placed", payload), format!("`Placed`: duplicate field `{path}`"), "{payload}");
        }
        assert_eq!(
            invalid::<Order>("Labelled", r#"{"carrier": {"Courier": {"name": "a", "name": "b"}}}"#),
            "`Labelled`: duplicate field `carrier.Courier.name`"
        );
    }

    #[test]
    fn large_objects_are_checked_for_repeats_too() {
        let tags = |keys: &[usize]| {
            let entries: Vec<String> = keys.iter().map(|key| format!(r#""t{key}": {key}"#)).collect();
            format!(r#"{{"lines": [], "tags": {{{}}}}}"#, entries.join(", "))
        };
        let distinct: Vec<usize> = (0..40).collect();
        match decode::<Order>("Placed", &tags(&distinct)).unwrap() {
            Order::Placed { tags, .. } => assert_eq!(tags.len(), 40),
            other => panic!("decoded {other:?}"),
        }
        for repeated in [0, 7, 8, 39] {
            let mut keys = distinct.clone();
            keys.push(repeated);
            assert_eq!(
                invalid::<Order>("Placed", &tags(&keys)),
                format!("`Placed`: duplicate field `tags.t{repeated}`")
            );
        }
    }

    #[test]
    fn declared_sequences_still_read_arrays() {
        let line = |sku: &str, quantity| Line { sku: sku.into(), quantity };
        let placed: Order = decode(
            "Placed",
            r#"{"lines": [{"sku": "a", "quantity": 1}], "tags": {"red": 1}, "bins": {"7": "Large"},
                "sizes": {"Small": 2}, "dimensions": [3, 4], "note": [1, {"free": "text"}]}"#,
        )
        .unwrap();
        assert_eq!(
            placed,
            Order::Placed {
                lines: vec![line("a", 1)],
                gift: None,
                tags: [("red".to_owned(), 1)].into(),
                bins: [(7, Size::Large)].into(),
                sizes: [(Size::Small, 2)].into(),
                dimensions: (3, 4),
            }
        );
        assert_eq!(
            decode::<Order>("Shipped", r#"[{"sku": "b", "quantity": 2}]"#).unwrap(),
            Order::Shipped(vec![line("b", 2)])
        );
        assert_eq!(decode::<Order>("Moved", "[1, -2]").unwrap(), Order::Moved(1, -2));
        assert_eq!(
            decode::<Order>("Labelled", r#"{"carrier": {"Courier": {"name": "Speedy"}}}"#).unwrap(),
            Order::Labelled { carrier: Carrier::Courier { name: "Speedy".into() } }
        );
        assert_eq!(
            decode::<Order>("Labelled", r#"{"carrier": "Post"}"#).unwrap(),
            Order::Labelled { carrier: Carrier::Post }
        );
    }

    #[test]
    fn unknown_fields_are_ignored_unless_denied() {
        assert_eq!(
            decode::<Sample>("Opened", r#"{"owner": "ann", "extra": [1, {"a": 2}]}"#).unwrap(),
            Sample::Opened { owner: "ann".into() }
        );
        assert!(
            invalid::<Account>("DepositMoney", r#"{"amount": 1, "extra": true}"#).contains("unknown field `extra`")
        );
    }

    #[test]
    fn unit_variants_take_an_empty_object_or_null() {
        for payload in ["{}", " { } ", "null"] {
            assert_eq!(decode::<Sample>("Unit", payload).unwrap(), Sample::Unit, "{payload}");
        }
        for payload in [r#"{"a": 1}"#, "[]", "1", ""] {
            invalid::<Sample>("Unit", payload);
        }
        assert_eq!(decode::<Sample>("Touched", "{}").unwrap(), Sample::Touched {});
    }

    #[test]
    fn other_errors_name_the_variant_and_the_cause() {
        assert!(
            invalid::<Account>("DepositMoney", r#"{"amount": "ten"}"#)
                .starts_with("`DepositMoney`: amount: invalid type")
        );
        assert!(
            invalid::<Account>("DepositMoney", "3").starts_with("invalid `DepositMoney`: invalid type: integer `3`")
        );
        assert!(invalid::<Sample>("Nope", "{}").starts_with("invalid `Nope`: unknown variant `Nope`"));
        assert!(
            invalid::<Sample>("Opened", r#"{"owner": "a"} x"#)
                .starts_with("`Opened` payload is not valid JSON: trailing")
        );
        assert!(invalid::<Sample>("Opened", "{").starts_with("`Opened` payload is not valid JSON: EOF"));
        assert!(invalid::<Sample>("Opened", r#"{"owner": "a"}, "x": 1"#).contains("not valid JSON"));
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Node {
        children: Vec<Node>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Tree {
        Grown { root: Node },
    }

    #[test]
    fn deep_payloads_decode_up_to_serde_jsons_nesting_limit() {
        let nested = |depth: usize| {
            let mut node = Node { children: Vec::new() };
            for _ in 0..depth {
                node = Node { children: vec![node] };
            }
            Tree::Grown { root: node }
        };
        let (name, payload) = encode(&nested(60)).unwrap();
        assert_eq!(decode::<Tree>(&name, &payload).unwrap(), nested(60));
        let (name, payload) = encode(&nested(200)).unwrap();
        assert!(invalid::<Tree>(&name, &payload).contains("recursion limit exceeded"));
    }
}
