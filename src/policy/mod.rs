//! `policy.json`: reading it into types, then checking it as a whole.
//!
//! [`load`] is the one entry point. It reports every problem it can find at once, each as a
//! JSON path and what was expected there, because a user fixing a policy before a deploy wants
//! the whole list, not one error per round trip:
//!
//! 1. JSON syntax (the only stage that stops early: nothing can be read past broken syntax);
//! 2. shape, per route and per identity, so a broken route does not hide the next one; an
//!    unknown field is reported and skipped so the rest of that object is still read;
//! 3. meaning ([`validate`]): names, references, hosts, templates, overlaps, protection.

pub mod model;
mod resolve;
#[cfg(not(target_arch = "wasm32"))]
pub mod schema;
pub mod validate;

use std::collections::BTreeSet;
use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use model::*;

/// One thing wrong with a policy: where (a JSON path such as `routes[2].backend.blob.container`)
/// and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub path: String,
    pub message: String,
}

impl PolicyError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

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

    let mut policy: Policy = match read(root, "", &mut errors) {
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
            }
        }
    };

    let mut unreadable_identities = BTreeSet::new();
    for (name, value) in identities {
        let path = format!("identities.{name}");
        match read(value, &path, &mut errors) {
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
        if let Some(route) = read(value, &format!("routes[{i}]"), &mut errors) {
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

/// Reads one value as `T`, recording errors under `prefix`. A bad member is reported and
/// removed, then reading is retried, so one mistake does not hide the rest of the object:
/// always for unknown fields, and for the top level's own members (which have defaults).
/// A member that was removed and turns out to be required is not reported a second time.
fn read<T: DeserializeOwned>(
    mut value: Value,
    prefix: &str,
    errors: &mut Vec<PolicyError>,
) -> Option<T> {
    let mut removed = Vec::new();
    // Each retry removes one member, so this ends; the bound is a guard, not a limit in practice.
    for _ in 0..64 {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) => return Some(t),
            Err(err) => err,
        };
        let path = join_path(prefix, &err);
        if removed.contains(&path) {
            return None;
        }
        let inner = err.inner().to_string();
        errors.push(PolicyError::new(&path, explain_serde(&inner)));
        let removable = inner.starts_with("unknown field")
            || (prefix.is_empty() && err.path().iter().count() == 1);
        if removable && remove_at(&mut value, err.path()) {
            removed.push(path);
            continue;
        }
        return None;
    }
    None
}

fn join_path(prefix: &str, err: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let mut path = String::from(prefix);
    for seg in err.path().iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key }
            | serde_path_to_error::Segment::Enum { variant: key } => push_key(&mut path, key),
            serde_path_to_error::Segment::Unknown => path.push_str(".?"),
        }
    }
    // serde names a missing field in its message; put it in the path instead.
    if let Some(field) = between(&err.inner().to_string(), "missing field `", "`") {
        push_key(&mut path, field);
    }
    if path.is_empty() {
        "(top level)".to_owned()
    } else {
        path
    }
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
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

/// Rewrites serde's messages into this project's "expected …, got …" form.
fn explain_serde(msg: &str) -> String {
    let msg = strip_position(msg);
    if let Some(field) = between(&msg, "unknown field `", "`") {
        let expected = msg
            .split_once("expected ")
            .map(|(_, e)| e.replace('`', ""))
            .unwrap_or_else(|| "no fields".to_owned());
        return format!("not a known field (\"{field}\"); expected {expected}");
    }
    if let Some(variant) = between(&msg, "unknown variant `", "`") {
        let expected = msg
            .split_once("expected ")
            .map(|(_, e)| e.replace('`', ""))
            .unwrap_or_default();
        return format!("{expected}, got \"{variant}\"");
    }
    if msg.starts_with("missing field") {
        return "required, but missing".to_owned();
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!("{expected}, got {got}");
        }
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!("{expected}, got {got}");
        }
    }
    msg
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

/// serde_json appends " at line L column C"; paths say where, so drop it.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}
