//! Strict decoding of command and event payloads, in one streaming pass.
//!
//! serde_json on its own reads payloads loosely: a derived struct also
//! accepts a JSON array (its fields by position), and a repeated key is
//! either an error or, in maps and ignored fields, silently overwritten. Here
//! serde_json's deserializer is wrapped so that every struct the type asks
//! for (the variant's fields and every struct nested in them) must be a JSON
//! object, and no object anywhere in the payload, ignored parts included,
//! repeats a key. Sequences the type declares (`Vec`, tuples, tuple variants)
//! still read arrays.
//!
//! The wrappers keep serde_json's error type, so a refusal cannot carry its
//! own structure through serde: it is recorded in [`Violations`] where it is
//! found, each enclosing object and array adds its key or index while the
//! error unwinds, and [`decode_variant`] reports the recorded refusal.
//!
//! Limitation: values serde buffers before it knows their type (untagged and
//! internally tagged enums, `#[serde(flatten)]` fields) are checked for
//! repeated keys while buffered, but serde then reads structs from its buffer
//! without this wrapper, so arrays are not refused there.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Unexpected, VariantAccess,
    Visitor,
};
use serde_json::de::StrRead;

/// Why a payload could not be decoded.
#[derive(Debug)]
pub(super) enum DecodeError {
    /// Well-formed JSON in a shape the strict rules refuse.
    Shape(Violation),
    /// serde_json's verdict: malformed JSON, or a value the type rejects.
    Json(serde_json::Error),
}

/// Decode the enum value `variant` whose JSON payload is `payload`, as the
/// host sends it: the variant name apart from its payload.
///
/// Unit variants take `{}` (what the SDK writes for them) or `null`.
pub(super) fn decode_variant<T: DeserializeOwned>(variant: &str, payload: &str) -> Result<T, DecodeError> {
    let violations = Violations::default();
    let mut json = serde_json::Deserializer::from_str(payload);
    let decoded = T::deserialize(VariantPayload { variant, payload: &mut json, violations: &violations })
        .and_then(|value| json.end().map(|()| value));
    decoded.map_err(|error| match violations.pending.into_inner() {
        Some(violation) => DecodeError::Shape(violation),
        None => DecodeError::Json(error),
    })
}

/// A strict rule a payload broke, and where.
#[derive(Debug)]
pub(super) struct Violation {
    problem: Problem,
    /// The place in the payload, innermost segment first (it is built while
    /// the error unwinds).
    path: Vec<Segment>,
}

#[derive(Debug)]
enum Problem {
    /// A struct was expected and the payload has an array.
    ArrayForStruct,
    /// An object repeats a key; the path ends at that key.
    DuplicateKey,
    /// A value inside the payload does not fit its type (serde's message).
    Data(String),
}

#[derive(Debug)]
enum Segment {
    /// An object's key (or an enum's variant name, which is one in JSON).
    Key(String),
    /// An array's index.
    Index(usize),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = PathDisplay(&self.path);
        match &self.problem {
            Problem::DuplicateKey => write!(f, "duplicate field `{path}`"),
            Problem::Data(message) => write!(f, "{path}: {message}"),
            Problem::ArrayForStruct if self.path.is_empty() => {
                f.write_str("expected a JSON object with named fields, got an array")
            }
            Problem::ArrayForStruct => write!(f, "expected a JSON object with named fields at `{path}`, got an array"),
        }
    }
}

/// A path (stored innermost first) written outermost first: `items[0].sku`.
struct PathDisplay<'a>(&'a [Segment]);

impl fmt::Display for PathDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (depth, segment) in self.0.iter().rev().enumerate() {
            match segment {
                Segment::Key(key) if depth == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// The violation an error is unwinding with, shared by all the wrappers of
/// one decode.
#[derive(Default)]
struct Violations {
    pending: RefCell<Option<Violation>>,
}

impl Violations {
    /// Record a violation found at the current value and return the error
    /// that unwinds from it.
    fn raise<E: de::Error>(&self, problem: Problem, path: Vec<Segment>) -> E {
        let violation = Violation { problem, path };
        let error = E::custom(&violation);
        *self.pending.borrow_mut() = Some(violation);
        error
    }

    /// Pass `result` through; when it is an error, add the place of the
    /// value it came from to the violation it unwinds with — or, for an
    /// error of the data itself (a wrong type, a missing field inside a
    /// nested value), start one, so the message names the field's path.
    fn locate<T, E: fmt::Display>(
        &self,
        result: Result<T, E>,
        segment: impl FnOnce() -> Option<Segment>,
    ) -> Result<T, E> {
        if let Err(error) = &result
            && let Some(segment) = segment()
        {
            let mut pending = self.pending.borrow_mut();
            match pending.as_mut() {
                Some(violation) => violation.path.push(segment),
                None => *pending = Some(Violation { problem: Problem::Data(error.to_string()), path: vec![segment] }),
            }
        }
        result
    }
}

fn key_segment(key: Option<Cow<'_, str>>) -> Option<Segment> {
    key.map(|key| Segment::Key(key.into_owned()))
}

/// The top-level deserializer: the variant name comes from the host, apart
/// from the JSON payload.
struct VariantPayload<'a, 'de> {
    variant: &'a str,
    payload: &'a mut serde_json::Deserializer<StrRead<'de>>,
    violations: &'a Violations,
}

impl<'a, 'de> VariantPayload<'a, 'de> {
    fn strict_payload(self) -> Strict<'a, &'a mut serde_json::Deserializer<StrRead<'de>>> {
        Strict { inner: self.payload, violations: self.violations }
    }
}

impl<'de> Deserializer<'de> for VariantPayload<'_, 'de> {
    type Error = serde_json::Error;

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom(
            "commands and events must be enums in serde's default (externally tagged) representation",
        ))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl<'de> EnumAccess<'de> for VariantPayload<'_, 'de> {
    type Error = serde_json::Error;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Self::Error> {
        let variant = seed.deserialize(de::value::StrDeserializer::<Self::Error>::new(self.variant))?;
        Ok((variant, self))
    }
}

impl<'de> VariantAccess<'de> for VariantPayload<'_, 'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        self.payload.deserialize_any(NoFields)
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, Self::Error> {
        seed.deserialize(self.strict_payload())
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Self::Error> {
        self.strict_payload().deserialize_tuple(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.strict_payload().deserialize_struct("", fields, visitor)
    }
}

/// The payload of a unit variant: `{}` or `null`.
struct NoFields;

impl<'de> Visitor<'de> for NoFields {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`{}` or `null` (the variant has no fields)")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        match map.next_key::<de::IgnoredAny>()? {
            None => Ok(()),
            Some(_) => Err(de::Error::invalid_value(Unexpected::Map, &self)),
        }
    }
}

/// Forwards `deserialize_*` methods to `self.inner`, with the visitor
/// wrapped by `self.split`.
macro_rules! forward_deserialize_methods {
    ($($method:ident($($arg:ident: $type:ty),*))*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $type,)* visitor: V) -> Result<V::Value, Self::Error> {
            let (inner, visitor) = self.split(visitor);
            inner.$method($($arg,)* visitor)
        }
    )*};
}

/// Forwards `visit_*` methods that take a plain value to `self.inner`.
macro_rules! forward_visit_methods {
    ($($method:ident($type:ty))*) => {$(
        fn $method<E: de::Error>(self, value: $type) -> Result<Self::Value, E> {
            self.inner.$method(value)
        }
    )*};
}

/// A deserializer whose every value, at any depth, obeys the strict rules.
struct Strict<'v, D> {
    inner: D,
    violations: &'v Violations,
}

impl<'v, D> Strict<'v, D> {
    fn split<V>(self, visitor: V) -> (D, StrictVisitor<'v, V>) {
        (self.inner, StrictVisitor { inner: visitor, violations: self.violations, expects_struct: false })
    }
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<'_, D> {
    type Error = D::Error;

    forward_deserialize_methods! {
        deserialize_any() deserialize_bool() deserialize_i8() deserialize_i16() deserialize_i32() deserialize_i64()
        deserialize_i128() deserialize_u8() deserialize_u16() deserialize_u32() deserialize_u64() deserialize_u128()
        deserialize_f32() deserialize_f64() deserialize_char() deserialize_str() deserialize_string()
        deserialize_bytes() deserialize_byte_buf() deserialize_option() deserialize_unit()
        deserialize_unit_struct(name: &'static str) deserialize_newtype_struct(name: &'static str)
        deserialize_seq() deserialize_tuple(len: usize) deserialize_tuple_struct(name: &'static str, len: usize)
        deserialize_map() deserialize_enum(name: &'static str, variants: &'static [&'static str])
        deserialize_identifier()
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let (inner, mut visitor) = self.split(visitor);
        visitor.expects_struct = true;
        inner.deserialize_struct(name, fields, visitor)
    }

    /// Ignored values are still read through, so that objects inside them
    /// are checked for repeated keys too.
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        let (inner, visitor) = self.split(visitor);
        inner.deserialize_any(visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// Wraps the visitor of a [`Strict`] value, so nested values stay strict.
struct StrictVisitor<'v, V> {
    inner: V,
    violations: &'v Violations,
    /// The type asked for a struct: an array is refused.
    expects_struct: bool,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for StrictVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit_methods! {
        visit_bool(bool) visit_i8(i8) visit_i16(i16) visit_i32(i32) visit_i64(i64) visit_i128(i128)
        visit_u8(u8) visit_u16(u16) visit_u32(u32) visit_u64(u64) visit_u128(u128) visit_f32(f32) visit_f64(f64)
        visit_char(char) visit_str(&str) visit_borrowed_str(&'de str) visit_string(String)
        visit_bytes(&[u8]) visit_borrowed_bytes(&'de [u8]) visit_byte_buf(Vec<u8>)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_some(Strict { inner: deserializer, violations: self.violations })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_newtype_struct(Strict { inner: deserializer, violations: self.violations })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        if self.expects_struct {
            return Err(self.violations.raise(Problem::ArrayForStruct, Vec::new()));
        }
        self.inner.visit_seq(StrictSeq { inner: seq, violations: self.violations, next_index: 0 })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_map(StrictMap {
            inner: map,
            violations: self.violations,
            seen: SeenKeys::default(),
            current_key: None,
        })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_enum(StrictEnum { inner: data, violations: self.violations })
    }
}

/// Feeds a seed a [`Strict`] deserializer.
struct StrictSeed<'v, S> {
    inner: S,
    violations: &'v Violations,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for StrictSeed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Strict { inner: deserializer, violations: self.violations })
    }
}

/// An array's elements, each strict, located by index.
struct StrictSeq<'v, A> {
    inner: A,
    violations: &'v Violations,
    next_index: usize,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for StrictSeq<'_, A> {
    type Error = A::Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, A::Error> {
        let index = self.next_index;
        self.next_index += 1;
        let element = self.inner.next_element_seed(StrictSeed { inner: seed, violations: self.violations });
        self.violations.locate(element, || Some(Segment::Index(index)))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

/// An object's entries: keys must not repeat, values are strict and located
/// by key.
struct StrictMap<'v, 'de, A> {
    inner: A,
    violations: &'v Violations,
    /// Every key read so far.
    seen: SeenKeys<'de>,
    /// The key whose value is read next.
    current_key: Option<Cow<'de, str>>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for StrictMap<'_, 'de, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        let mut key = None;
        let decoded = self.inner.next_key_seed(CapturingSeed { inner: seed, captured: &mut key })?;
        if let Some(key) = &key
            && !self.seen.insert(key.clone())
        {
            return Err(self.violations.raise(Problem::DuplicateKey, vec![Segment::Key(key.to_string())]));
        }
        self.current_key = key;
        Ok(decoded)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        let value = self.inner.next_value_seed(StrictSeed { inner: seed, violations: self.violations });
        self.violations.locate(value, || key_segment(self.current_key.take()))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

/// How many keys of an object are kept without allocating: most objects
/// have no more.
const INLINE_KEYS: usize = 8;

/// The keys of one object, kept to refuse repeats.
#[derive(Default)]
struct SeenKeys<'de> {
    /// The first keys, in order.
    first: [Option<Cow<'de, str>>; INLINE_KEYS],
    /// Any further keys.
    more: BTreeSet<Cow<'de, str>>,
}

impl<'de> SeenKeys<'de> {
    /// Add `key`; false when it was already there.
    fn insert(&mut self, key: Cow<'de, str>) -> bool {
        for slot in &mut self.first {
            match slot {
                Some(seen) if *seen == key => return false,
                Some(_) => {}
                None => {
                    *slot = Some(key);
                    return true;
                }
            }
        }
        self.more.insert(key)
    }
}

/// A nested enum value: its payload is strict, located by variant name.
struct StrictEnum<'v, A> {
    inner: A,
    violations: &'v Violations,
}

impl<'v, 'de, A: EnumAccess<'de>> EnumAccess<'de> for StrictEnum<'v, A> {
    type Error = A::Error;
    type Variant = StrictVariant<'v, 'de, A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self::Variant), A::Error> {
        let mut name = None;
        let (decoded, variant) = self.inner.variant_seed(CapturingSeed { inner: seed, captured: &mut name })?;
        Ok((decoded, StrictVariant { inner: variant, violations: self.violations, name }))
    }
}

struct StrictVariant<'v, 'de, A> {
    inner: A,
    violations: &'v Violations,
    name: Option<Cow<'de, str>>,
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for StrictVariant<'_, 'de, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, A::Error> {
        let Self { inner, violations, name } = self;
        let payload = inner.newtype_variant_seed(StrictSeed { inner: seed, violations });
        violations.locate(payload, || key_segment(name))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let Self { inner, violations, name } = self;
        let payload = inner.tuple_variant(len, StrictVisitor { inner: visitor, violations, expects_struct: false });
        violations.locate(payload, || key_segment(name))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let Self { inner, violations, name } = self;
        let payload = inner.struct_variant(fields, StrictVisitor { inner: visitor, violations, expects_struct: true });
        violations.locate(payload, || key_segment(name))
    }
}

/// Reads a map key or variant name through to `inner`, keeping its text in
/// `captured`. Keys serde_json reads as numbers or booleans are kept as
/// written back, so `{"1": …, "1": …}` repeats a key whatever the key type.
struct CapturingSeed<'c, 'de, S> {
    inner: S,
    captured: &'c mut Option<Cow<'de, str>>,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for CapturingSeed<'_, 'de, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Capturing { inner: deserializer, captured: self.captured })
    }
}

struct Capturing<'c, 'de, D> {
    inner: D,
    captured: &'c mut Option<Cow<'de, str>>,
}

impl<'c, 'de, D> Capturing<'c, 'de, D> {
    fn split<V>(self, visitor: V) -> (D, CapturingVisitor<'c, 'de, V>) {
        (self.inner, CapturingVisitor { inner: visitor, captured: self.captured })
    }
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Capturing<'_, 'de, D> {
    type Error = D::Error;

    forward_deserialize_methods! {
        deserialize_any() deserialize_bool() deserialize_i8() deserialize_i16() deserialize_i32() deserialize_i64()
        deserialize_i128() deserialize_u8() deserialize_u16() deserialize_u32() deserialize_u64() deserialize_u128()
        deserialize_f32() deserialize_f64() deserialize_char() deserialize_str() deserialize_string()
        deserialize_bytes() deserialize_byte_buf() deserialize_option() deserialize_unit()
        deserialize_unit_struct(name: &'static str) deserialize_newtype_struct(name: &'static str)
        deserialize_seq() deserialize_tuple(len: usize) deserialize_tuple_struct(name: &'static str, len: usize)
        deserialize_map() deserialize_struct(name: &'static str, fields: &'static [&'static str])
        deserialize_enum(name: &'static str, variants: &'static [&'static str])
        deserialize_identifier() deserialize_ignored_any()
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// Keeps the text of the key it visits.
struct CapturingVisitor<'c, 'de, V> {
    inner: V,
    captured: &'c mut Option<Cow<'de, str>>,
}

/// `visit_*` methods that keep their value's text, then forward.
macro_rules! capture_visit_methods {
    ($($method:ident($type:ty))*) => {$(
        fn $method<E: de::Error>(self, value: $type) -> Result<Self::Value, E> {
            *self.captured = Some(Cow::Owned(value.to_string()));
            self.inner.$method(value)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for CapturingVisitor<'_, 'de, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Self::Value, E> {
        *self.captured = Some(Cow::Borrowed(value));
        self.inner.visit_borrowed_str(value)
    }

    capture_visit_methods! {
        visit_bool(bool) visit_i8(i8) visit_i16(i16) visit_i32(i32) visit_i64(i64) visit_i128(i128)
        visit_u8(u8) visit_u16(u16) visit_u32(u32) visit_u64(u64) visit_u128(u128) visit_f32(f32) visit_f64(f64)
        visit_char(char) visit_str(&str) visit_string(String)
    }

    forward_visit_methods! {
        visit_bytes(&[u8]) visit_borrowed_bytes(&'de [u8]) visit_byte_buf(Vec<u8>)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_some(Capturing { inner: deserializer, captured: self.captured })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_newtype_struct(Capturing { inner: deserializer, captured: self.captured })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_map(map)
    }

    /// An enum used as a key (`BTreeMap<Status, _>`): keep its variant name.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_enum(CapturingEnum { inner: data, captured: self.captured })
    }
}

struct CapturingEnum<'c, 'de, A> {
    inner: A,
    captured: &'c mut Option<Cow<'de, str>>,
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for CapturingEnum<'_, 'de, A> {
    type Error = A::Error;
    type Variant = A::Variant;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, A::Variant), A::Error> {
        self.inner.variant_seed(CapturingSeed { inner: seed, captured: self.captured })
    }
}
