//! The JSON Schema of `policy.json`, generated from the types in [`super::model`].
//!
//! Only the native build generates it (the worker never needs it, so schemars adds nothing to
//! the wasm). `policy schema > policy.schema.json` writes the checked-in copy, and a test
//! fails when that copy is stale.

use super::model::Policy;

/// The schema as pretty-printed JSON, with a trailing newline.
pub fn policy_schema_json() -> String {
    let mut schema = schemars::schema_for!(Policy);
    schema.insert("title".to_owned(), "azure-edge-gateway policy".into());
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
