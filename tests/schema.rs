//! `policy.schema.json` is generated from the model; a stale checked-in copy would let an
//! editor accept what the gateway rejects, or the reverse.

use azure_edge_gateway::policy::schema::policy_schema_json;

#[test]
fn checked_in_schema_matches_the_model() {
    let checked_in = std::fs::read_to_string("policy.schema.json").unwrap_or_default();
    assert!(
        checked_in == policy_schema_json(),
        "policy.schema.json is stale: regenerate it with\n    cargo run --bin policy -- schema > policy.schema.json"
    );
}

#[test]
fn schema_rejects_unknown_fields_like_the_gateway_does() {
    let schema: serde_json::Value = serde_json::from_str(&policy_schema_json()).unwrap();
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["$defs"]["Route"]["additionalProperties"], false);
    let required = schema["required"].as_array().unwrap();
    assert_eq!(required, &[serde_json::json!("routes")]);
}

#[test]
fn policies_point_editors_at_the_schema() {
    for (file, schema) in [
        ("policy.json", "./policy.schema.json"),
        ("dev/policy.json", "../policy.schema.json"),
    ] {
        let policy: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        assert_eq!(policy["$schema"], schema, "{file}");
    }
}
