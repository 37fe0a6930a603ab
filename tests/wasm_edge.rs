//! The edge's conversions, run as wasm under Node with real `worker` types:
//! `cargo test --target wasm32-unknown-unknown --test wasm_edge` (scripts/test runs it).
#![cfg(target_arch = "wasm32")]

use azure_edge_gateway::edge::{new_request_id, problem_response};
use azure_edge_gateway::problem::Problem;
use wasm_bindgen_test::wasm_bindgen_test;

#[wasm_bindgen_test]
async fn a_problem_becomes_an_rfc9457_response_with_its_headers() {
    let problem = Problem::method_not_allowed("PUT", "GET, POST");
    let mut response = problem_response(&problem, "/orders/1", "req-42").unwrap();
    assert_eq!(response.status_code(), 405);
    let header = |name: &str| response.headers().get(name).unwrap();
    assert_eq!(
        header("content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(header("allow").as_deref(), Some("GET, POST"));
    assert_eq!(header("x-request-id").as_deref(), Some("req-42"));
    assert_eq!(header("cache-control").as_deref(), Some("no-store"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], 405);
    assert_eq!(body["instance"], "/orders/1");
    assert_eq!(body["request_id"], "req-42");
}

#[wasm_bindgen_test]
fn generated_request_ids_are_unique_uuids() {
    let (a, b) = (new_request_id(), new_request_id());
    assert_ne!(a, b);
    assert_eq!(a.len(), 36);
    assert_eq!(
        azure_edge_gateway::pipeline::request_id(Some(&a)),
        Some(a.as_str())
    );
}
