//! The edge's JavaScript boundary, run as wasm under Node with real `Request`/`Response`
//! objects: `cargo test --target wasm32-unknown-unknown --test wasm_edge` (scripts/test runs it).
#![cfg(target_arch = "wasm32")]

use azure_edge_gateway::edge::{new_request_id, read_head, to_response};
use azure_edge_gateway::exchange::{Answer, AnswerBody};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::wasm_bindgen_test;

#[wasm_bindgen(inline_js = "
export function makeRequest(method, url, headers, body) {
  return new Request(url, { method, headers, body: body === null ? undefined : body });
}
export function status(response) { return response.status; }
export function header(response, name) { return response.headers.get(name); }
export function bodyText(response) { return response.text(); }
export function testEnv() {
  return {
    ORDERS_API_KEY: 'k-1', GATEWAY_CLIENT_SECRET: 's',
    ORDERS_RATE_LIMIT: { limit: async () => ({ success: true }) },
  };
}
export function testCtx() { return { waitUntil() {} }; }
")]
extern "C" {
    #[wasm_bindgen(js_name = makeRequest)]
    fn make_request(method: &str, url: &str, headers: &JsValue, body: Option<String>) -> JsValue;
    fn status(response: &JsValue) -> u16;
    fn header(response: &JsValue, name: &str) -> Option<String>;
    #[wasm_bindgen(js_name = bodyText)]
    fn body_text(response: &JsValue) -> js_sys::Promise;
    #[wasm_bindgen(js_name = testEnv)]
    fn test_env() -> JsValue;
    #[wasm_bindgen(js_name = testCtx)]
    fn test_ctx() -> JsValue;
}

/// The worker's own fetch handler, end to end inside Node: the driver stepped by `edge.js`,
/// through the checks to a token request that cannot succeed (no network here).
#[wasm_bindgen_test]
async fn the_fetch_handler_runs_a_request_through_every_phase() {
    let missing = make_request(
        "POST",
        "https://gw.example/orders/contoso",
        &JsValue::UNDEFINED,
        Some("{}".into()),
    );
    let response = JsFuture::from(js_sys::Promise::resolve(&azure_edge_gateway::edge::fetch(
        missing,
        test_env(),
        test_ctx(),
    )))
    .await
    .unwrap();
    assert_eq!(status(&response), 401);
    assert!(header(&response, "x-request-id").is_some());
    let headers =
        js_sys::JSON::parse(r#"{"x-api-key": "k-1", "content-type": "application/json"}"#).unwrap();
    let keyed = make_request(
        "POST",
        "https://gw.example/orders/contoso",
        &headers,
        Some("{}".into()),
    );
    let response = JsFuture::from(js_sys::Promise::resolve(&azure_edge_gateway::edge::fetch(
        keyed,
        test_env(),
        test_ctx(),
    )))
    .await
    .unwrap();
    let text = JsFuture::from(body_text(&response))
        .await
        .unwrap()
        .as_string()
        .unwrap();
    assert_eq!(status(&response), 503, "{text}");
    assert!(text.contains("identity-unavailable"), "{text}");
}

#[wasm_bindgen_test]
fn the_request_head_is_read_whole_in_one_call() {
    let headers =
        js_sys::JSON::parse(r#"{"X-Api-Key": "k", "Content-Type": "application/json"}"#).unwrap();
    let request = make_request(
        "POST",
        "https://gw.example/orders/a%2Fb?x=1&y=%20",
        &headers,
        Some("{}".into()),
    );
    let head = read_head(&request);
    assert_eq!(head.method, "POST");
    assert_eq!(head.path, "/orders/a%2Fb");
    assert_eq!(head.query, "x=1&y=%20");
    assert_eq!(head.header("x-api-key"), Some("k"));
    assert_eq!(head.header("content-type"), Some("application/json"));
    assert!(head.has_body);
    let get = make_request("GET", "https://gw.example/", &JsValue::UNDEFINED, None);
    let head = read_head(&get);
    assert_eq!((head.method.as_str(), head.path.as_str()), ("GET", "/"));
    assert!(!head.has_body);
}

#[wasm_bindgen_test]
async fn an_answer_becomes_a_response_with_its_status_headers_and_body() {
    let answer: Answer<u32> = Answer {
        status: 405,
        headers: vec![
            ("content-type", "application/problem+json".to_owned()),
            ("allow", "GET, POST".to_owned()),
            ("x-request-id", "req-42".to_owned()),
        ],
        body: AnswerBody::Text(r#"{"status":405}"#.to_owned()),
    };
    let response = to_response(answer);
    assert_eq!(status(&response), 405);
    assert_eq!(header(&response, "allow").as_deref(), Some("GET, POST"));
    assert_eq!(header(&response, "x-request-id").as_deref(), Some("req-42"));
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/problem+json")
    );
    let text = JsFuture::from(body_text(&response)).await.unwrap();
    assert_eq!(text.as_string().as_deref(), Some(r#"{"status":405}"#));
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
