//! Reading `policy.json`: JSON syntax, then shape (per route and per identity, so a broken route
//! does not hide the next one; an unknown field is reported and skipped so the rest of that
//! object is still read), then meaning ([`super::validate`]). Native only (the `compile`
//! feature): build.rs and the `policy` tool run it; the worker loads what build.rs compiled.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::model::*;
use super::{hidden_string, validate, PolicyError, NOT_SHOWN};

/// Reads and validates a policy. `Err` holds every error found, in file order where possible.
pub fn load(text: &str) -> Result<Policy, Vec<PolicyError>> {
    let parsed = parse(text)?;
    let mut errors = parsed.errors;
    errors.extend(validate::validate(
        &parsed.policy,
        &parsed.route_positions,
        &parsed.unreadable_identities,
    ));
    if errors.is_empty() {
        Ok(parsed.policy)
    } else {
        Err(errors)
    }
}

/// What the shape stage could read. Routes that could not be read are left out of `policy`;
/// `route_positions[i]` is the index in the file of `policy.routes[i]`, so later errors still
/// name the right element.
struct Parsed {
    policy: Policy,
    route_positions: Vec<usize>,
    unreadable_identities: BTreeSet<String>,
    errors: Vec<PolicyError>,
}

fn parse(text: &str) -> Result<Parsed, Vec<PolicyError>> {
    let mut root: Value = serde_json::from_str(text).map_err(|e| {
        vec![PolicyError::new(
            format!("line {} column {}", e.line(), e.column()),
            format!("valid JSON: {}", strip_position(&e.to_string())),
        )]
    })?;
    let mut errors = Vec::new();

    // Routes and identities are read one by one; take them out of the document first.
    let routes = match root.get_mut("routes") {
        Some(Value::Array(items)) => std::mem::take(items),
        _ => Vec::new(),
    };
    let identities = match root.get_mut("identities") {
        Some(Value::Object(map)) => std::mem::take(map),
        _ => serde_json::Map::new(),
    };

    let mut policy: Policy = match read(root, &[], &mut errors) {
        Some(p) => p,
        None => {
            // The top level itself is unreadable; keep going with an empty policy so the
            // routes and identities are still checked.
            Policy {
                schema: None,
                cloud: Cloud::Public,
                local_endpoints: Vec::new(),
                inbound: None,
                identities: Default::default(),
                routes: Vec::new(),
                store_and_forward: None,
            }
        }
    };

    let mut unreadable_identities = BTreeSet::new();
    for (name, value) in identities {
        let prefix = [Seg::Key("identities".to_owned()), Seg::Key(name.clone())];
        match read(value, &prefix, &mut errors) {
            Some(identity) => {
                policy.identities.insert(name, identity);
            }
            None => {
                unreadable_identities.insert(name);
            }
        }
    }

    let mut route_positions = Vec::new();
    for (i, value) in routes.into_iter().enumerate() {
        let prefix = [Seg::Key("routes".to_owned()), Seg::Index(i)];
        if let Some(route) = read(value, &prefix, &mut errors) {
            policy.routes.push(route);
            route_positions.push(i);
        }
    }

    Ok(Parsed {
        policy,
        route_positions,
        unreadable_identities,
        errors,
    })
}

/// One step of a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
    Unknown,
}

impl Seg {
    fn of(seg: &serde_path_to_error::Segment) -> Seg {
        match seg {
            serde_path_to_error::Segment::Seq { index } => Seg::Index(*index),
            serde_path_to_error::Segment::Map { key }
            | serde_path_to_error::Segment::Enum { variant: key } => Seg::Key(key.clone()),
            serde_path_to_error::Segment::Unknown => Seg::Unknown,
        }
    }
}

/// `routes[2].backend.blob`, or `(top level)` for the empty path.
fn render_path(segs: &[Seg]) -> String {
    let mut path = String::new();
    for seg in segs {
        match seg {
            Seg::Index(index) => path.push_str(&format!("[{index}]")),
            Seg::Key(key) => push_key(&mut path, key),
            Seg::Unknown => path.push_str(".?"),
        }
    }
    if path.is_empty() {
        "(top level)".to_owned()
    } else {
        path
    }
}

fn is_secret_bearing(segs: &[Seg]) -> bool {
    is_secret_bearing_path(segs.iter().filter_map(|s| match s {
        Seg::Key(k) => Some(k.as_str()),
        _ => None,
    }))
}

/// Reads one value as `T`, recording errors under `prefix`. A bad member is reported and
/// removed, then reading is retried, so one mistake does not hide the rest of the object:
/// always for unknown fields, and for the top level's own members (which have defaults).
/// A member that was removed and turns out to be required is not reported a second time.
fn read<T: DeserializeOwned>(
    mut value: Value,
    prefix: &[Seg],
    errors: &mut Vec<PolicyError>,
) -> Option<T> {
    let mut removed: Vec<Vec<Seg>> = Vec::new();
    // Each retry removes one member, so this ends; the bound is a guard, not a limit in practice.
    for _ in 0..64 {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) => return Some(t),
            Err(err) => err,
        };
        let inner = err.inner().to_string();
        let mut segs: Vec<Seg> = prefix.to_vec();
        segs.extend(err.path().iter().map(Seg::of));
        // serde names a missing field in its message; put it in the path instead.
        if let Some(field) = inner
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'))
        {
            segs.push(Seg::Key(field.to_owned()));
        }
        if removed.contains(&segs) {
            return None;
        }
        errors.push(shape_error(&inner, &segs, node_at(&value, err.path())));
        let removable = inner.starts_with("unknown field")
            || (prefix.is_empty() && err.path().iter().count() == 1);
        if removable && remove_at(&mut value, err.path()) {
            removed.push(segs);
            continue;
        }
        return None;
    }
    None
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

/// The value a serde path points at, if it is there.
fn node_at<'v>(value: &'v Value, path: &serde_path_to_error::Path) -> Option<&'v Value> {
    let mut node = value;
    for seg in path.iter() {
        node = match (seg, node) {
            (serde_path_to_error::Segment::Seq { index }, Value::Array(a)) => a.get(*index)?,
            (
                serde_path_to_error::Segment::Map { key }
                | serde_path_to_error::Segment::Enum { variant: key },
                Value::Object(o),
            ) => o.get(key.as_str())?,
            _ => return None,
        };
    }
    Some(node)
}

/// Removes the object member that the path ends at. Returns whether something was removed.
fn remove_at(value: &mut Value, path: &serde_path_to_error::Path) -> bool {
    let segs: Vec<&serde_path_to_error::Segment> = path.iter().collect();
    let Some((last, parents)) = segs.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parents {
        node = match (seg, node) {
            (serde_path_to_error::Segment::Seq { index }, Value::Array(a)) => {
                match a.get_mut(*index) {
                    Some(n) => n,
                    None => return false,
                }
            }
            (
                serde_path_to_error::Segment::Map { key }
                | serde_path_to_error::Segment::Enum { variant: key },
                Value::Object(o),
            ) => match o.get_mut(key.as_str()) {
                Some(n) => n,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (serde_path_to_error::Segment::Map { key }, Value::Object(o)) => {
            o.remove(key.as_str()).is_some()
        }
        _ => false,
    }
}

/// A serde error, taken apart. Only `Invalid::got`, `UnknownField::field`,
/// `UnknownVariant::variant` and `Other` carry text from the file.
enum SerdeError<'a> {
    UnknownField {
        field: &'a str,
        expected: Option<String>,
    },
    UnknownVariant {
        variant: &'a str,
        expected: Option<String>,
    },
    Missing,
    /// invalid type, value or length: `got` is serde's description of the value.
    Invalid {
        got: &'a str,
        expected: &'a str,
    },
    Other(&'a str),
}

/// Parses serde's message exactly. The field or variant name is known from the path and the
/// value (`field`, `node`), so a name that itself contains "expected" or a backtick cannot
/// shift where the expected part is taken from.
fn parse_serde<'a>(
    msg: &'a str,
    field: Option<&'a str>,
    node: Option<&'a Value>,
) -> SerdeError<'a> {
    // "…, expected one of `a`, `b`" | "…, there are no fields" → the expected part, plain.
    let expected_after = |rest: &str| rest.strip_prefix("expected ").map(|e| e.replace('`', ""));
    if let Some(field) = field {
        if let Some(rest) = msg.strip_prefix(&format!("unknown field `{field}`, ")) {
            let expected = expected_after(rest);
            return SerdeError::UnknownField { field, expected };
        }
    }
    if msg.starts_with("unknown variant `") {
        // A variant is read from a string, or from the one key of an object.
        let variant = match node {
            Some(Value::String(s)) => Some(s.as_str()),
            Some(Value::Object(o)) if o.len() == 1 => o.keys().next().map(String::as_str),
            _ => None,
        };
        if let Some(variant) = variant {
            if let Some(rest) = msg.strip_prefix(&format!("unknown variant `{variant}`, ")) {
                let expected = expected_after(rest);
                return SerdeError::UnknownVariant { variant, expected };
            }
        }
        return SerdeError::Other(msg);
    }
    if msg.starts_with("missing field `") {
        return SerdeError::Missing;
    }
    for kind in ["invalid type: ", "invalid value: ", "invalid length "] {
        if let Some(rest) = msg.strip_prefix(kind) {
            // serde's expected part comes last and never contains ", expected ", so the last
            // occurrence is the separator even when the value quoted before it has one.
            if let Some((got, expected)) = rest.rsplit_once(", expected ") {
                return SerdeError::Invalid { got, expected };
            }
        }
    }
    SerdeError::Other(msg)
}

/// serde's names for shapes, in JSON's words.
fn plain_expected(expected: &str) -> String {
    if expected.starts_with("struct variant") || expected.starts_with("struct ") {
        "an object".to_owned()
    } else if expected == "map with a single key" {
        "an object with exactly one key".to_owned()
    } else if expected == "string or map" {
        "a string or an object with one key".to_owned()
    } else if expected == "a sequence" {
        "an array".to_owned()
    } else if expected == "a map" {
        "an object".to_owned()
    } else {
        expected.to_owned()
    }
}

/// A value under a secret-bearing path, described by its JSON type and size only.
fn hidden(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => hidden_string(s),
        Some(Value::Number(_)) => format!("a number ({NOT_SHOWN})"),
        Some(Value::Bool(b)) => format!("{b}"),
        Some(Value::Null) => "null".to_owned(),
        Some(Value::Array(a)) => format!("an array of {} item(s) ({NOT_SHOWN})", a.len()),
        Some(Value::Object(o)) => format!("an object of {} member(s) ({NOT_SHOWN})", o.len()),
        None => format!("a value ({NOT_SHOWN})"),
    }
}

/// The error for a value serde could not read at `segs`. Under a secret-bearing path the
/// message describes what was there by JSON type and size, never by content, and an unknown
/// field is reported at the object that holds it, since its name may be the secret.
fn shape_error(inner: &str, segs: &[Seg], node: Option<&Value>) -> PolicyError {
    let last_key = match segs.last() {
        Some(Seg::Key(k)) => Some(k.as_str()),
        _ => None,
    };
    let parsed = parse_serde(inner, last_key, node);
    let unknown_field = matches!(parsed, SerdeError::UnknownField { .. });
    // An unknown field is judged by the object holding it, not by its own (unknown) name.
    let holder = if unknown_field {
        &segs[..segs.len() - 1]
    } else {
        segs
    };
    if !is_secret_bearing(holder) {
        let message = match parsed {
            SerdeError::UnknownField { field, expected } => format!(
                "not a known field (\"{field}\"); expected {}",
                expected.unwrap_or_else(|| "no fields".to_owned())
            ),
            SerdeError::UnknownVariant { variant, expected } => format!(
                "{}, got \"{variant}\"",
                expected.unwrap_or_else(|| "no variants".to_owned())
            ),
            SerdeError::Missing => "required, but missing".to_owned(),
            SerdeError::Invalid { got, expected } => {
                format!("{}, got {got}", plain_expected(expected))
            }
            SerdeError::Other(msg) => msg.to_owned(),
        };
        return PolicyError::new(render_path(segs), message);
    }
    let message = match parsed {
        SerdeError::UnknownField { field, expected } => format!(
            "not a known field (a name of {} characters, {NOT_SHOWN}); expected {}",
            field.chars().count(),
            expected.unwrap_or_else(|| "no fields".to_owned())
        ),
        SerdeError::UnknownVariant { variant, expected } => format!(
            "{}, got {}",
            expected.unwrap_or_else(|| "no variants".to_owned()),
            match node {
                Some(Value::Object(_)) => format!(
                    "a key of {} characters ({NOT_SHOWN})",
                    variant.chars().count()
                ),
                _ => hidden_string(variant),
            }
        ),
        SerdeError::Missing => "required, but missing".to_owned(),
        SerdeError::Invalid { got, expected } => {
            let got = match (node, got) {
                // A variant named by a string alone, where its fields were expected: the path
                // ends at the variant, which is no node of the document.
                (None, "unit variant") => "the variant's name alone, without its fields".to_owned(),
                _ => hidden(node),
            };
            format!("{}, got {got}", plain_expected(expected))
        }
        SerdeError::Other(_) => format!(
            "the shape policy.schema.json describes here, got {}",
            hidden(node)
        ),
    };
    PolicyError::new(render_path(holder), message)
}

/// serde_json appends " at line L column C"; paths say where, so drop it.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}
