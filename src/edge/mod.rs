//! The edge: the only code that touches JavaScript. It reads the request once, lets the core's
//! driver ([`crate::pipeline::Gateway::handle`]) run every phase, performs the I/O the driver
//! asks for through `edge.js` (one call each, as a rule), and writes the answer and the log line.

mod crypto;
mod tokens;

use std::cell::OnceCell;

use serde_json::Value;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use worker::js_sys::{Promise, Uint8Array};
use worker::wasm_bindgen_futures::JsFuture;

use crate::backend::BackendRequest;
use crate::identity::TokenKey;
use crate::pipeline::{
    Answer, AnswerBody, BodyError, Gateway, Grant, Io, Limit, NoToken, OutBody, Reply, RequestHead,
    SendError,
};
use crate::policy::prepared::{Prepared, TokenTarget};
use crate::policy::JwtAlgorithm;
use crate::problem::Problem;

/// The policy, compiled and checked by build.rs when the worker was built.
const PREPARED: &str = include_str!(concat!(env!("OUT_DIR"), "/prepared.json"));

thread_local! {
    /// Loaded once per isolate, on the first request, and kept for the isolate's life (an
    /// isolate runs one thread).
    static GATEWAY: OnceCell<Option<&'static Gateway>> = const { OnceCell::new() };
}

#[wasm_bindgen(module = "/src/edge/edge.js")]
extern "C" {
    fn begin(request: &JsValue, env: &JsValue, ctx: &JsValue) -> JsValue;
    fn head(c: &JsValue) -> String;
    fn secret(c: &JsValue, name: &str) -> Option<String>;
    #[wasm_bindgen(js_name = rateLimit)]
    fn rate_limit(c: &JsValue, binding: &str, key: &str) -> Promise;
    #[wasm_bindgen(js_name = waitUntil)]
    fn wait_until(c: &JsValue, promise: &Promise);
    #[wasm_bindgen(js_name = readBody)]
    fn read_body(c: &JsValue, limit: f64) -> Promise;
    #[wasm_bindgen(js_name = nextBlock)]
    fn next_block(c: &JsValue, size: u32, limit: f64) -> Promise;
    #[wasm_bindgen(catch)]
    #[allow(clippy::too_many_arguments)]
    fn send(
        c: &JsValue,
        url: &str,
        method: &str,
        headers: &str,
        body: &JsValue,
        length: f64,
        deadline_ms: f64,
        idle_ms: f64,
    ) -> Result<Promise, JsValue>;
    fn text(c: &JsValue, id: u32) -> Promise;
    fn respond(
        c: &JsValue,
        status: u16,
        headers: &str,
        text: Option<String>,
        stream: i32,
    ) -> JsValue;
    #[wasm_bindgen(js_name = verify)]
    fn verify_signature(alg: &str, jwk: &str, data: &[u8], signature: &[u8]) -> Promise;
    #[wasm_bindgen(catch, js_name = fetchText)]
    fn fetch_text(
        url: &str,
        method: &str,
        headers: &str,
        body: Option<String>,
        deadline_ms: f64,
    ) -> Result<Promise, JsValue>;
    fn sleep(ms: f64) -> Promise;
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = crypto, js_name = randomUUID)]
    fn random_uuid() -> String;
    #[wasm_bindgen(js_namespace = console, js_name = log)]
    fn console_log(line: &str);
    #[wasm_bindgen(js_namespace = Date, js_name = now)]
    fn date_now() -> f64;
    #[wasm_bindgen(js_namespace = Math, js_name = random)]
    fn math_random() -> f64;
}

/// A fresh request id: a random UUID from the runtime's WebCrypto.
pub fn new_request_id() -> String {
    random_uuid()
}

pub(crate) fn now() -> f64 {
    date_now()
}

pub(crate) fn random() -> f64 {
    math_random()
}

#[worker::event(start)]
fn start() {
    // A panic is written to the log with its message and location instead of a bare trap.
    console_error_panic_hook::set_once();
}

fn gateway() -> Option<&'static Gateway> {
    GATEWAY.with(|cell| {
        *cell.get_or_init(|| match Prepared::load(PREPARED) {
            Ok(prepared) => Some(&*Box::leak(Box::new(Gateway::new(prepared)))),
            Err(e) => {
                // Impossible for a worker built by build.rs: it wrote this text.
                let line = serde_json::json!({
                    "level": "error",
                    "message": "the compiled policy does not load; rebuild the worker",
                    "error": e,
                });
                console_log(&line.to_string());
                None
            }
        })
    })
}

/// The worker's fetch handler, called by the entry module for every request.
#[wasm_bindgen]
pub fn fetch(request: JsValue, env: JsValue, ctx: JsValue) -> Promise {
    worker::wasm_bindgen_futures::future_to_promise(handle(request, env, ctx))
}

async fn handle(request: JsValue, env: JsValue, ctx: JsValue) -> Result<JsValue, JsValue> {
    let edge = Edge {
        c: begin(&request, &env, &ctx),
    };
    let head = edge.head();
    let (answer, line) = match gateway() {
        Some(gateway) => gateway.handle(&head, &edge).await,
        None => {
            let problem = Problem::internal("the compiled policy does not load");
            let request_id = new_request_id();
            let answer = Answer {
                status: 500,
                headers: vec![
                    ("content-type", crate::problem::CONTENT_TYPE.to_owned()),
                    ("x-request-id", request_id.clone()),
                ],
                body: AnswerBody::Text(problem.body(&head.path, &request_id)),
            };
            (answer, String::new())
        }
    };
    let response = edge.respond(answer);
    if !line.is_empty() {
        console_log(&line);
    }
    Ok(response)
}

/// One request's I/O: the JavaScript context `edge.js` made for it.
pub struct Edge {
    c: JsValue,
}

impl Edge {
    /// The edge of a JavaScript `Request` (with no env or execution context: for tests).
    pub fn for_request(request: &JsValue) -> Edge {
        Edge {
            c: begin(request, &JsValue::UNDEFINED, &JsValue::UNDEFINED),
        }
    }

    /// The request's head, read in one call.
    pub fn head(&self) -> RequestHead {
        RequestHead::from_wire(&head(&self.c)).unwrap_or_default()
    }

    /// The JavaScript `Response` of an answer, built in one call.
    pub fn respond(&self, answer: Answer<u32>) -> JsValue {
        self.to_response(answer)
    }

    fn to_response(&self, answer: Answer<u32>) -> JsValue {
        let mut headers = String::new();
        for (name, value) in &answer.headers {
            push_header(&mut headers, name, value);
        }
        let (text, stream) = match answer.body {
            AnswerBody::Empty => (None, -1),
            AnswerBody::Text(text) => (Some(text), -1),
            AnswerBody::Stream(id) => (None, id as i32),
        };
        respond(&self.c, answer.status, &headers, text, stream)
    }
}

/// Headers travel to `edge.js` as one string, `name\nvalue\n…`: a header value never holds
/// a line break (the outgoing gate refuses one; the runtime's own headers cannot have one).
fn push_header(out: &mut String, name: &str, value: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(name);
    out.push('\n');
    out.push_str(value);
}

fn is_timeout(e: &JsValue) -> bool {
    worker::js_sys::Reflect::get(e, &"name".into())
        .ok()
        .and_then(|n| n.as_string())
        .is_some_and(|n| n == "TimeoutError")
}

fn describe(e: &JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<worker::js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| "a network error".to_owned())
}

/// A body read by `edge.js`: bytes, none, or (a number) the bytes seen past the limit.
fn body_result(value: Result<JsValue, JsValue>) -> Result<Option<(JsValue, u64)>, BodyError> {
    match value {
        Err(e) => Err(BodyError::Unreadable(describe(&e))),
        Ok(v) if v.is_null() || v.is_undefined() => Ok(None),
        Ok(v) => match v.as_f64() {
            Some(seen) => Err(BodyError::TooLarge(seen as u64)),
            None => {
                let length = v
                    .dyn_ref::<Uint8Array>()
                    .map_or(0, |bytes| bytes.length() as u64);
                Ok(Some((v, length)))
            }
        },
    }
}

impl Io for Edge {
    type Bytes = JsValue;
    type Stream = u32;

    fn now(&self) -> f64 {
        now()
    }

    fn uuid(&self) -> String {
        random_uuid()
    }

    fn random(&self) -> f64 {
        random()
    }

    fn secret(&self, name: &str) -> Option<String> {
        secret(&self.c, name)
    }

    async fn rate_limit(&self, binding: &str, key: &str) -> Result<bool, bool> {
        let outcome = JsFuture::from(rate_limit(&self.c, binding, key))
            .await
            .ok()
            .and_then(|v| v.as_f64());
        match outcome {
            Some(1.0) => Ok(true),
            Some(0.0) => Ok(false),
            Some(-1.0) => Err(true),
            _ => Err(false),
        }
    }

    async fn fetch_jwks(&self, url: &str) -> Result<String, &'static str> {
        let promise = fetch_text(
            url,
            "GET",
            "accept\napplication/json",
            None,
            JWKS_TIMEOUT_MS,
        )
        .map_err(|_| "the key set URL could not be reached")?;
        let summary = match JsFuture::from(promise).await {
            Ok(summary) => summary.as_string().unwrap_or_default(),
            Err(e) if is_timeout(&e) => return Err("the key set URL timed out"),
            Err(_) => return Err("the key set URL could not be reached"),
        };
        let (status, _, body): (u16, Option<String>, String) =
            serde_json::from_str(&summary).map_err(|_| "the key set could not be read")?;
        if !(200..300).contains(&status) {
            return Err("the key set URL answered with an error");
        }
        Ok(body)
    }

    async fn verify(&self, alg: JwtAlgorithm, jwk: &Value, data: &[u8], signature: &[u8]) -> bool {
        let alg = crate::inbound::jwt::alg_name(alg);
        JsFuture::from(verify_signature(alg, &jwk.to_string(), data, signature))
            .await
            .ok()
            .and_then(|v| v.as_bool())
            == Some(true)
    }

    async fn token(&self, target: &TokenTarget) -> Result<Grant, NoToken> {
        tokens::obtain(target, &self.c).await
    }

    fn evict_token(&self, key: &TokenKey, access_token: &str) {
        tokens::evict(key, access_token);
    }

    async fn read_body(&self, limit: u64) -> Result<Option<(JsValue, u64)>, BodyError> {
        body_result(JsFuture::from(read_body(&self.c, limit as f64)).await)
    }

    fn bytes(&self, body: &JsValue) -> Vec<u8> {
        body.dyn_ref::<Uint8Array>()
            .map(Uint8Array::to_vec)
            .unwrap_or_default()
    }

    async fn next_block(
        &self,
        block_bytes: u32,
        limit: u64,
    ) -> Result<Option<(JsValue, u64)>, BodyError> {
        body_result(JsFuture::from(next_block(&self.c, block_bytes, limit as f64)).await)
    }

    async fn send(
        &self,
        request: &BackendRequest,
        token: Option<&str>,
        body: OutBody<'_, JsValue>,
        limit: Limit,
    ) -> Result<Reply<u32>, SendError> {
        crate::backend::check(request).map_err(SendError::Unsendable)?;
        let mut headers = String::new();
        for (name, value) in &request.headers {
            push_header(&mut headers, name, value);
        }
        if let Some(token) = token {
            push_header(&mut headers, "authorization", &format!("Bearer {token}"));
        }
        let (body, length) = match body {
            OutBody::None => (JsValue::NULL, -1.0),
            OutBody::Bytes(bytes) => (bytes.clone(), -1.0),
            OutBody::Text(text) => (JsValue::from_str(text), -1.0),
            OutBody::CallerStream { length } => (JsValue::TRUE, length as f64),
        };
        let (deadline, idle) = match limit {
            Limit::Deadline(ms) => (ms, 0.0),
            Limit::Idle(ms) => (0.0, ms),
        };
        let promise = send(
            &self.c,
            &request.url,
            request.method,
            &headers,
            &body,
            length,
            deadline,
            idle,
        )
        .map_err(|e| SendError::Network(describe(&e)))?;
        let summary = match JsFuture::from(promise).await {
            Ok(summary) => summary.as_string().unwrap_or_default(),
            Err(e) if is_timeout(&e) => return Err(SendError::Timeout),
            Err(e) => return Err(SendError::Network(describe(&e))),
        };
        let (id, status, flat): (u32, u16, Vec<String>) = serde_json::from_str(&summary)
            .map_err(|_| SendError::Network("an unreadable reply".into()))?;
        let headers = flat
            .chunks_exact(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect();
        Ok(Reply {
            status,
            headers,
            body: Some(id),
        })
    }

    async fn text(&self, body: u32) -> String {
        JsFuture::from(text(&self.c, body))
            .await
            .ok()
            .and_then(|v| v.as_string())
            .unwrap_or_default()
    }

    async fn sleep(&self, ms: f64) {
        let _ = JsFuture::from(sleep(ms)).await;
    }
}

/// Time limit of one key set fetch, in milliseconds.
const JWKS_TIMEOUT_MS: f64 = 5_000.0;
