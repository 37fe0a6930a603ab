//! `policy.json`: its model, and how it becomes what the worker runs.
//!
//! At build time (the `compile` feature: build.rs and the `policy` tool), [`load`] reads and
//! validates a policy, reporting every problem at once, each as a JSON path and what was
//! expected there, because a user fixing a policy before a deploy wants the whole list:
//!
//! 1. JSON syntax (the only stage that stops early: nothing can be read past broken syntax);
//! 2. shape, per route and per identity ([`read`]);
//! 3. meaning ([`validate`]): names, references, hosts, templates, overlaps, protection;
//!
//! then [`compile`] turns the valid policy into the prepared form the worker embeds:
//! templates parsed, CIDRs, path matchers, URLs, token keys and key digests resolved. The
//! worker only loads that ([`prepared::Prepared::load`]); no validation runs in the wasm.

pub mod cloud;
mod messaging;
pub mod model;
#[cfg(feature = "compile")]
mod prepare;
pub mod prepared;
#[cfg(feature = "compile")]
mod read;
mod resolve;
#[cfg(feature = "compile")]
pub mod schema;
#[cfg(feature = "compile")]
pub mod validate;

use std::fmt;

pub use cloud::{SERVICE_BUS_AUDIENCE, STORAGE_AUDIENCE};
pub use model::*;
#[cfg(feature = "compile")]
pub use prepare::compile;
#[cfg(feature = "compile")]
pub use read::load;

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

/// What an error says instead of a value that may be a secret.
#[cfg(feature = "compile")]
const NOT_SHOWN: &str = "not shown: it may be a secret";

/// A string that may be a secret, described without its content (for an error's message).
#[cfg(feature = "compile")]
fn hidden_string(s: &str) -> String {
    format!("a string of {} characters ({NOT_SHOWN})", s.chars().count())
}

/// The report of an invalid policy, exactly as `policy check` prints it (and build.rs, which
/// refuses to build a worker from such a policy): each error on its line, then the count.
pub fn report(file: &str, errors: &[PolicyError]) -> String {
    let mut out = String::new();
    for e in errors {
        out.push_str(&format!("{file}: {e}\n"));
    }
    out.push_str(&format!("{file}: {} error(s)\n", errors.len()));
    out
}
