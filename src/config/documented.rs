//! The configuration reference (docs/configuration.md, also mailtls.toml(5)) documents
//! exactly the keys the parser accepts: a key added to the parser without docs, or a
//! documented key the parser does not know, fails here.
//!
//! The accepted keys come from the parser's own serde structs: a recording deserializer
//! walks `RawConfig`, answering every `deserialize_struct` with each of the field names
//! serde asks for (the `deny_unknown_fields` list, so nothing is guessed) and noting the
//! path of each. serde-reflection would do the walk, but it answers structs with a
//! sequence, which toml's `Spanned` cannot take; hence this small hand-written one.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::Deserialize;

use super::RawConfig;

/// The reference, as the docs and the man page generator read it.
const REFERENCE: &str = include_str!("../../docs/configuration.md");

/// toml's `Spanned<T>` is a struct of these fields; only `value` is a real key.
const SPANNED_PREFIX: &str = "$__serde_spanned_private_";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";

#[derive(Debug)]
struct Stop(String);

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Stop(msg.to_string())
    }
}

/// Every key path the parser accepts, e.g. `tls.certificates[].cert`.
fn accepted_paths() -> BTreeSet<String> {
    let seen = RefCell::new(BTreeSet::new());
    if let Err(e) = RawConfig::deserialize(Recorder { path: "", seen: &seen }) {
        panic!("walking the config structs failed: {e}");
    }
    seen.into_inner()
}

/// The keys that hold a value rather than a table: paths no other path extends.
fn accepted_keys() -> BTreeSet<String> {
    let all = accepted_paths();
    all.iter()
        .filter(|p| !all.iter().any(|q| q.starts_with(&format!("{p}.")) || q.starts_with(&format!("{p}[]."))))
        .cloned()
        .collect()
}

#[derive(Clone, Copy)]
struct Recorder<'a> {
    path: &'a str,
    seen: &'a RefCell<BTreeSet<String>>,
}

/// Hands out one sample of everything: each field once, each sequence with one element.
struct Fields<'a> {
    recorder: Recorder<'a>,
    fields: std::slice::Iter<'static, &'static str>,
    current: Option<String>,
}

impl<'de, 'a> de::MapAccess<'de> for Fields<'a> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Stop> {
        let Some(field) = self.fields.next() else { return Ok(None) };
        self.current = Some(if *field == SPANNED_VALUE {
            self.recorder.path.to_owned()
        } else if field.starts_with(SPANNED_PREFIX) {
            String::new()
        } else if self.recorder.path.is_empty() {
            (*field).to_owned()
        } else {
            format!("{}.{field}", self.recorder.path)
        });
        seed.deserialize(de::value::BorrowedStrDeserializer::new(field)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        let path = self.current.take().unwrap_or_default();
        // A `Spanned` value lives at its container's path, already noted (or a sequence's).
        if !path.is_empty() && path != self.recorder.path {
            self.recorder.seen.borrow_mut().insert(path.clone());
        }
        seed.deserialize(Recorder { path: &path, seen: self.recorder.seen })
    }
}

struct One<'a> {
    recorder: Option<Recorder<'a>>,
}

impl<'de> de::SeqAccess<'de> for One<'_> {
    type Error = Stop;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Stop> {
        let Some(r) = self.recorder.take() else { return Ok(None) };
        let path = format!("{}[]", r.path);
        seed.deserialize(Recorder { path: &path, seen: r.seen }).map(Some)
    }
}

/// An enum answers with its first variant, as a unit variant.
struct FirstVariant(&'static str);

impl<'de> de::EnumAccess<'de> for FirstVariant {
    type Error = Stop;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Stop> {
        let name: de::value::StrDeserializer<'_, Stop> = self.0.into_deserializer();
        Ok((seed.deserialize(name)?, self))
    }
}

impl<'de> de::VariantAccess<'de> for FirstVariant {
    type Error = Stop;

    fn unit_variant(self) -> Result<(), Stop> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _: T) -> Result<T::Value, Stop> {
        Err(Stop("newtype variants are not config values".into()))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, Stop> {
        Err(Stop("tuple variants are not config values".into()))
    }
    fn struct_variant<V: Visitor<'de>>(self, _: &'static [&'static str], _: V) -> Result<V::Value, Stop> {
        Err(Stop("struct variants are not config values".into()))
    }
}

macro_rules! answer {
    ($($method:ident => $visit:ident($value:expr);)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
            visitor.$visit($value)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Recorder<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop(format!("{}: self-describing values cannot be walked", self.path)))
    }

    answer! {
        deserialize_bool => visit_bool(false);
        deserialize_i8 => visit_i64(1);
        deserialize_i16 => visit_i64(1);
        deserialize_i32 => visit_i64(1);
        deserialize_i64 => visit_i64(1);
        deserialize_u8 => visit_u64(1);
        deserialize_u16 => visit_u64(1);
        deserialize_u32 => visit_u64(1);
        deserialize_u64 => visit_u64(1);
        deserialize_f32 => visit_f64(1.0);
        deserialize_f64 => visit_f64(1.0);
        deserialize_char => visit_char('x');
        deserialize_str => visit_str("x");
        deserialize_string => visit_str("x");
        deserialize_identifier => visit_str("x");
        deserialize_bytes => visit_bytes(b"x");
        deserialize_byte_buf => visit_bytes(b"x");
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_seq(One { recorder: Some(self) })
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Stop> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_map<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop(format!("{}: free-form tables cannot be walked", self.path)))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_map(Fields { recorder: self, fields: fields.iter(), current: None })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        let first =
            variants.first().ok_or_else(|| Stop(format!("{}: an enum without variants", self.path)))?;
        visitor.visit_enum(FirstVariant(first))
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_unit()
    }
}

/// The keys the reference documents: its `### \`key\`` headings.
fn documented_keys() -> Vec<String> {
    REFERENCE.lines().filter_map(|l| l.strip_prefix("### `")?.strip_suffix('`')).map(str::to_owned).collect()
}

/// Each key's entry: the text from its heading to the next heading.
fn entries() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in REFERENCE.lines() {
        if let Some(key) = line.strip_prefix("### `").and_then(|l| l.strip_suffix('`')) {
            out.push((key.to_owned(), String::new()));
        } else if line.starts_with('#') {
            out.push((String::new(), String::new()));
        } else if let Some((_, text)) = out.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    out.retain(|(key, _)| !key.is_empty());
    out
}

#[test]
fn the_walk_finds_the_parsers_keys_nested_and_in_arrays() {
    // A guard on the walker itself: it must see through Option, Spanned, Vec and nesting.
    let keys = accepted_keys();
    for key in ["hostname", "admin.listen", "tls.certificates[].self_signed", "listeners[].listen"] {
        assert!(keys.contains(key), "{key} missing from {keys:?}");
    }
    assert!(!keys.contains("tls"), "tables are not keys: {keys:?}");
    assert!(keys.iter().all(|k| !k.contains("spanned")), "{keys:?}");
}

#[test]
fn every_key_the_parser_accepts_is_documented_and_nothing_else() {
    let accepted = accepted_keys();
    let documented = documented_keys();
    let documented_set: BTreeSet<String> = documented.iter().cloned().collect();
    assert_eq!(documented.len(), documented_set.len(), "a key is documented twice: {documented:?}");
    let undocumented: Vec<_> = accepted.difference(&documented_set).collect();
    let unknown: Vec<_> = documented_set.difference(&accepted).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/configuration.md is out of step with src/config.rs: \
         accepted but undocumented {undocumented:?}; documented but unknown to the parser {unknown:?}"
    );
}

#[test]
fn every_documented_key_says_its_default_or_that_it_is_required() {
    for (key, text) in entries() {
        let first = text.trim_start();
        assert!(
            first.starts_with("Default: ") || first.starts_with("Required"),
            "{key}: its entry must open with `Default: ...` or `Required...`, found {first:?}"
        );
    }
}

#[test]
fn the_references_example_is_a_valid_config() {
    let start = REFERENCE.find("```toml\n").expect("an example") + "```toml\n".len();
    let end = start + REFERENCE[start..].find("```").expect("closed");
    let parsed = super::parse(std::path::Path::new("/etc/mailtls/mailtls.toml"), &REFERENCE[start..end]);
    assert!(parsed.is_ok(), "{:?}", parsed.err());
}
