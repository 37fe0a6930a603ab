//! The edge: the only code that touches JavaScript.
//!
//! JavaScript drives a request and the wasm decides, synchronously. The worker's `fetch` makes
//! one call into `edge.js` (`drive`), which reads the request's head and starts the core's
//! driver ([`crate::pipeline::Gateway::handle`]) as a task here, through one long-lived entry
//! point (the stepper). Whenever the driver needs I/O, the task stops with an *op* (read the
//! body, send this request, count this rate limit, …); `drive` performs it and resumes the task
//! with the result, until the task ends with the answer and the log line, which `drive` turns
//! into the `Response` and the console line. So a request crosses from wasm into JavaScript
//! only for what cannot wait for the next step (a fresh UUID, a Worker secret read once per
//! isolate), not once per header, await or clock read. The rare paths (a token fetch, a
//! background refresh) still await JavaScript promises directly; the task's waker resumes it.

mod crypto;
mod tokens;

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use serde_json::{json, Value};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use worker::js_sys::Promise;

use crate::backend::BackendRequest;
use crate::identity::TokenKey;
use crate::pipeline::{
    Answer, AnswerBody, BodyError, Gateway, Grant, Io, Limit, NoToken, OutBody, Reply, RequestHead,
    SendError,
};
use crate::policy::prepared::{Prepared, TokenTarget};
use crate::policy::JwtAlgorithm;

/// The policy, compiled and checked by build.rs when the worker was built.
const PREPARED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/prepared.bin"));

#[wasm_bindgen(module = "/src/edge/edge.js")]
extern "C" {
    /// Runs one request: reads its head, steps its task through every op, builds the answer.
    fn drive(request: &JsValue, env: &JsValue, ctx: &JsValue) -> Promise;
    /// Delivers a batch of stored requests, each as a task, and acknowledges or retries each.
    fn consume(batch: &JsValue, env: &JsValue, ctx: &JsValue) -> Promise;
    #[wasm_bindgen(js_name = setStepper)]
    fn set_stepper(stepper: &Stepper);
    /// A task's waker: resume it in a microtask.
    fn schedule(task: u32);
    /// The per-request context `drive` keeps for a task (request, env, ctx, bodies, replies).
    #[wasm_bindgen(js_name = contextOf)]
    fn context_of(task: u32) -> JsValue;
    fn secret(c: &JsValue, name: &str) -> Option<String>;
    #[wasm_bindgen(js_name = bufferBytes)]
    fn buffer_bytes(c: &JsValue, id: u32) -> Vec<u8>;
    #[wasm_bindgen(js_name = waitUntil)]
    fn wait_until(c: &JsValue, promise: &Promise);
    #[wasm_bindgen(catch, js_name = fetchText)]
    fn fetch_text(
        url: &str,
        method: &str,
        headers: &str,
        body: Option<String>,
        deadline_ms: f64,
    ) -> Result<Promise, JsValue>;
    fn sleep(ms: f64) -> Promise;
    /// For the wasm tests: the head `drive` would read, and the `Response` of an answer.
    #[wasm_bindgen(js_name = headOf)]
    fn head_of(request: &JsValue) -> String;
    #[wasm_bindgen(js_name = responseOf)]
    fn response_of(done: &str) -> JsValue;
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

// The `worker` crate is linked for what worker-build's entry module expects of it
// (`__worker_init_state`); its request types are not used.
use worker as _;

/// The one entry point `drive` steps tasks through: `(kind, task, now, payload) -> op`.
type Stepper = Closure<dyn FnMut(u32, u32, f64, Option<String>) -> String>;

thread_local! {
    /// Loaded once per isolate, on the first request, and kept for the isolate's life (an
    /// isolate runs one thread).
    static GATEWAY: OnceCell<Option<&'static Gateway>> = const { OnceCell::new() };
    /// The requests in flight, by task id.
    static TASKS: RefCell<HashMap<u32, Task>> = RefCell::new(HashMap::new());
    /// The one entry point `drive` steps tasks through, made once per isolate.
    static STEPPER: OnceCell<Stepper> = const { OnceCell::new() };
}

fn gateway() -> Option<&'static Gateway> {
    GATEWAY.with(|cell| {
        *cell.get_or_init(|| match Prepared::load(PREPARED) {
            Ok(prepared) => Some(&*Box::leak(Box::new(Gateway::new(prepared)))),
            Err(e) => {
                // Impossible for a worker built by build.rs: it wrote this text.
                let line = json!({
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
    ensure_stepper();
    drive(&request, &env, &ctx)
}

/// The worker's queue handler: store-and-forward's deliveries (the entry module calls it with
/// each batch of the queue this worker consumes).
#[wasm_bindgen]
pub fn queue(batch: JsValue, env: JsValue, ctx: JsValue) -> Promise {
    ensure_stepper();
    consume(&batch, &env, &ctx)
}

fn ensure_stepper() {
    STEPPER.with(|cell| {
        cell.get_or_init(|| {
            // A panic is written to the log with its message and location, not a bare trap.
            console_error_panic_hook::set_once();
            let stepper = Stepper::new(step);
            set_stepper(&stepper);
            stepper
        });
    });
}

// ---------------------------------------------------------------------------------------------
// The executor: tasks stepped by `drive`

/// One request's future and the slot through which it trades ops for results.
struct Task {
    future: Pin<Box<dyn Future<Output = String>>>,
    slot: Rc<Slot>,
}

/// What a task and `drive` exchange.
#[derive(Default)]
struct Slot {
    /// The op the task waits on, for `drive` to perform.
    op: RefCell<Option<String>>,
    /// The op's result, as `drive` handed it back.
    result: RefCell<Option<String>>,
    /// The clock, read by `drive` at each step (so the task never asks for it).
    now: Cell<f64>,
}

/// A delivery's body, as `consume` handed it over.
enum Delivery {
    Buffer(u32),
    Text(String),
    None,
}

struct TaskWaker(u32);

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        schedule(self.0);
    }
}

/// The stepper: `(0, task, now, head)` starts task `task` (`drive` numbers them) with the
/// request's head; `(1, task, now, result)` resumes it with an op's result (JSON), or with
/// nothing after a wake; `(2, task, …)` drops a task `drive` gave up on. Answers the next op
/// (JSON), `["wait"]` while the task awaits a JavaScript promise of its own, or the final
/// `["done", …]` followed by a line break and the request's log line.
fn step(kind: u32, task: u32, now: f64, payload: Option<String>) -> String {
    if kind == 0 {
        let id = task;
        let head = payload
            .as_deref()
            .and_then(RequestHead::from_wire)
            .unwrap_or_default();
        let slot = Rc::new(Slot::default());
        let io = Edge {
            task: id,
            slot: slot.clone(),
            c: OnceCell::new(),
        };
        let future: Pin<Box<dyn Future<Output = String>>> = Box::pin(async move {
            match gateway() {
                Some(gateway) => {
                    let (answer, line) = gateway.handle(&head, &io).await;
                    done(answer, &line)
                }
                None => done_internal(io.task, "the compiled policy does not load"),
            }
        });
        TASKS.with(|t| t.borrow_mut().insert(id, Task { future, slot }));
    }
    if kind == 3 {
        // A delivery: [stored request (JSON), attempt, body kind, body].
        let id = task;
        let payload: Value = payload
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or(Value::Null);
        let stored = payload
            .get(0)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let attempt = payload.get(1).and_then(Value::as_u64).unwrap_or(1) as u32;
        let body = match (payload.get(2).and_then(Value::as_str), payload.get(3)) {
            (Some("buffer"), Some(v)) => Delivery::Buffer(v.as_u64().unwrap_or(0) as u32),
            (Some("text"), Some(Value::String(t))) => Delivery::Text(t.clone()),
            _ => Delivery::None,
        };
        let slot = Rc::new(Slot::default());
        let io = Edge {
            task: id,
            slot: slot.clone(),
            c: OnceCell::new(),
        };
        let future: Pin<Box<dyn Future<Output = String>>> = Box::pin(async move {
            let Some(gateway) = gateway() else {
                return done_internal(io.task, "the compiled policy does not load");
            };
            let out = match &body {
                Delivery::Buffer(id) => OutBody::Bytes(id),
                Delivery::Text(t) => OutBody::Text(t),
                Delivery::None => OutBody::None,
            };
            let (outcome, line) = gateway.deliver(&stored, out, attempt, &io).await;
            // The outcome as the final op's status: 200 acknowledge, 503 retry after the
            // seconds in retry-after, 410 acknowledge (never deliverable; logged as an error).
            let (status, headers) = match outcome {
                crate::store::Delivered::Yes => (200, Vec::new()),
                crate::store::Delivered::Later(secs) => {
                    (503, vec![("retry-after", secs.to_string())])
                }
                crate::store::Delivered::Never => (410, Vec::new()),
            };
            let answer = Answer {
                status,
                headers,
                body: AnswerBody::Empty,
            };
            done(answer, &line)
        });
        TASKS.with(|t| t.borrow_mut().insert(id, Task { future, slot }));
    }
    if kind == 2 {
        TASKS.with(|t| t.borrow_mut().remove(&task));
        return "[]".to_owned();
    }
    let Some(mut current) = TASKS.with(|t| t.borrow_mut().remove(&task)) else {
        return done_internal(task, "a step for a request that is not in flight");
    };
    current.slot.now.set(now);
    if kind == 1 {
        if let Some(result) = payload {
            *current.slot.result.borrow_mut() = Some(result);
        }
    }
    let waker = Waker::from(Arc::new(TaskWaker(task)));
    let mut cx = Context::from_waker(&waker);
    match current.future.as_mut().poll(&mut cx) {
        Poll::Ready(done) => done,
        Poll::Pending => {
            let op = current
                .slot
                .op
                .borrow_mut()
                .take()
                .unwrap_or_else(|| "[\"wait\"]".to_owned());
            TASKS.with(|t| t.borrow_mut().insert(task, current));
            op
        }
    }
}

/// The final op: `["done", status, headers (name\nvalue\n…), has a text body, reply id to
/// stream or null]`, then on the next line the log line, then (to the end) the text body. Both
/// are passed as they are rather than escaped into strings of the op's JSON, which never holds
/// a raw line break (nor does a log line).
fn done(answer: Answer<u32>, line: &str) -> String {
    let mut headers = String::new();
    for (name, value) in &answer.headers {
        push_header(&mut headers, name, value);
    }
    let (text, stream) = match answer.body {
        AnswerBody::Empty => (None, Value::Null),
        AnswerBody::Text(text) => (Some(text), Value::Null),
        AnswerBody::Stream(id) => (None, Value::from(id)),
    };
    let mut out = json!(["done", answer.status, headers, text.is_some(), stream]).to_string();
    out.push('\n');
    out.push_str(line);
    out.push('\n');
    out.push_str(text.as_deref().unwrap_or_default());
    out
}

fn done_internal(task: u32, what: &str) -> String {
    let problem = crate::problem::Problem::internal(what);
    let request_id = new_request_id();
    let answer = Answer {
        status: 500,
        headers: vec![
            ("content-type", crate::problem::CONTENT_TYPE.to_owned()),
            ("x-request-id", request_id.clone()),
        ],
        body: AnswerBody::Text(problem.body("/", &request_id)),
    };
    let line = json!({"level": "error", "request_id": request_id, "status": 500, "problem": "internal-error", "task": task});
    done(answer, &line.to_string())
}

/// Headers travel as one string, `name\nvalue\n…`: a header value never holds a line break
/// (the outgoing gate refuses one; the runtime's own headers cannot have one).
fn push_header(out: &mut String, name: &str, value: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(name);
    out.push('\n');
    out.push_str(value);
}

/// For the wasm tests: the head of a JavaScript `Request` as `drive` reads it.
pub fn read_head(request: &JsValue) -> RequestHead {
    RequestHead::from_wire(&head_of(request)).unwrap_or_default()
}

/// For the wasm tests: the JavaScript `Response` `drive` makes of an answer.
pub fn to_response(answer: Answer<u32>) -> JsValue {
    response_of(&done(answer, ""))
}

// ---------------------------------------------------------------------------------------------
// The driver's I/O

/// One request's I/O: ops handed to `drive` through the task's slot.
struct Edge {
    task: u32,
    slot: Rc<Slot>,
    /// The request's JavaScript context, fetched only on the paths that need it.
    c: OnceCell<JsValue>,
}

/// Waits for the result of the op in the slot.
struct Ask<'a>(&'a Slot);

impl Future for Ask<'_> {
    type Output = String;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<String> {
        match self.0.result.borrow_mut().take() {
            Some(result) => Poll::Ready(result),
            None => Poll::Pending,
        }
    }
}

impl Edge {
    /// Hands `op` to `drive` and waits for its result (JSON).
    async fn ask(&self, op: Value) -> Value {
        *self.slot.result.borrow_mut() = None;
        *self.slot.op.borrow_mut() = Some(op.to_string());
        let result = Ask(&self.slot).await;
        serde_json::from_str(&result).unwrap_or(Value::Null)
    }

    fn c(&self) -> &JsValue {
        self.c.get_or_init(|| context_of(self.task))
    }

    /// A body `drive` read: `-1` none, a length (the bytes stay in JavaScript under the id the
    /// length came with), `{"seen": n}` past the limit, `{"error": …}`.
    fn body(result: Value) -> Result<Option<(u32, u64)>, BodyError> {
        if let Some(seen) = result.get("seen").and_then(Value::as_u64) {
            return Err(BodyError::TooLarge(seen));
        }
        if let Some(error) = result.get("error").and_then(Value::as_str) {
            return Err(BodyError::Unreadable(error.to_owned()));
        }
        match (
            result.get(0).and_then(Value::as_u64),
            result.get(1).and_then(Value::as_u64),
        ) {
            (Some(id), Some(length)) => Ok(Some((id as u32, length))),
            _ => Ok(None),
        }
    }
}

impl Io for Edge {
    type Bytes = u32;
    type Stream = u32;

    fn now(&self) -> f64 {
        self.slot.now.get()
    }

    fn uuid(&self) -> String {
        random_uuid()
    }

    fn random(&self) -> f64 {
        random()
    }

    fn secret(&self, name: &str) -> Option<String> {
        secret(self.c(), name)
    }

    async fn rate_limit(&self, binding: &str, key: &str) -> Result<bool, bool> {
        match self.ask(json!(["rate", binding, key])).await.as_i64() {
            Some(1) => Ok(true),
            Some(0) => Ok(false),
            Some(-1) => Err(true),
            _ => Err(false),
        }
    }

    async fn fetch_jwks(&self, url: &str) -> Result<String, &'static str> {
        let result = self.ask(json!(["jwks", url, JWKS_TIMEOUT_MS])).await;
        // [status, retry-after, body], or {error}.
        match (result.get(0).and_then(Value::as_u64), result.get(2)) {
            (Some(status), Some(Value::String(body))) if (200..300).contains(&status) => {
                Ok(body.clone())
            }
            (Some(_), _) => Err("the key set URL answered with an error"),
            _ if result.get("error").and_then(Value::as_str) == Some("timeout") => {
                Err("the key set URL timed out")
            }
            _ => Err("the key set URL could not be reached"),
        }
    }

    async fn verify(&self, alg: JwtAlgorithm, jwk: &Value, data: &[u8], signature: &[u8]) -> bool {
        let b64 = crate::encoding::base64url;
        let op = json!([
            "verify",
            crate::inbound::jwt::alg_name(alg),
            jwk.to_string(),
            b64(data),
            b64(signature)
        ]);
        self.ask(op).await.as_bool() == Some(true)
    }

    async fn token(&self, target: &TokenTarget) -> Result<Grant, NoToken> {
        tokens::obtain(target, &|| self.c().clone(), &|| self.slot.now.get()).await
    }

    fn evict_token(&self, key: &TokenKey, access_token: &str) {
        tokens::evict(key, access_token);
    }

    async fn read_body(&self, limit: u64) -> Result<Option<(u32, u64)>, BodyError> {
        Edge::body(self.ask(json!(["read", limit])).await)
    }

    fn bytes(&self, body: &u32) -> Vec<u8> {
        buffer_bytes(self.c(), *body)
    }

    async fn next_block(
        &self,
        block_bytes: u32,
        limit: u64,
    ) -> Result<Option<(u32, u64)>, BodyError> {
        Edge::body(self.ask(json!(["block", block_bytes, limit])).await)
    }

    async fn send(
        &self,
        request: &BackendRequest,
        token: Option<&str>,
        body: OutBody<'_, u32>,
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
        // The body: none, a buffer id, a string, or the caller's own stream and its length.
        let (kind, body, length) = match body {
            OutBody::None => ("none", Value::Null, -1.0),
            OutBody::Bytes(id) => ("buffer", Value::from(*id), -1.0),
            OutBody::Text(text) => ("text", Value::from(text), -1.0),
            OutBody::CallerStream { length } => ("caller", Value::Null, length as f64),
        };
        let (deadline, idle) = match limit {
            Limit::Deadline(ms) => (ms, 0.0),
            Limit::Idle(ms) => (0.0, ms),
        };
        let op = json!([
            "send",
            request.url,
            request.method,
            headers,
            kind,
            body,
            length,
            deadline,
            idle,
            request.reply_headers.join("\n")
        ]);
        let result = self.ask(op).await;
        if let Some(error) = result.get("error").and_then(Value::as_str) {
            return Err(match error {
                "timeout" => SendError::Timeout,
                other => SendError::Network(other.to_owned()),
            });
        }
        let (Some(id), Some(status), Some(flat)) = (
            result.get(0).and_then(Value::as_u64),
            result.get(1).and_then(Value::as_u64),
            result.get(2).and_then(Value::as_str),
        ) else {
            return Err(SendError::Network("an unreadable reply".into()));
        };
        let parts: Vec<&str> = if flat.is_empty() {
            Vec::new()
        } else {
            flat.split('\n').collect()
        };
        let headers = parts
            .chunks_exact(2)
            .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
            .collect();
        Ok(Reply {
            status: status as u16,
            headers,
            body: Some(id as u32),
        })
    }

    async fn text(&self, body: u32) -> String {
        match self.ask(json!(["text", body])).await {
            Value::String(text) => text,
            _ => String::new(),
        }
    }

    async fn sleep(&self, ms: f64) {
        self.ask(json!(["sleep", ms])).await;
    }

    async fn enqueue(
        &self,
        binding: &str,
        stored: &str,
        body: OutBody<'_, u32>,
        max_body: usize,
    ) -> Result<(), String> {
        let (kind, body) = match body {
            OutBody::Bytes(id) => ("buffer", Value::from(*id)),
            OutBody::Text(text) => ("text", Value::from(text)),
            _ => ("none", Value::Null),
        };
        let result = self
            .ask(json!(["enqueue", binding, stored, kind, body, max_body]))
            .await;
        match result.get("error").and_then(Value::as_str) {
            None if result.as_bool() == Some(true) => Ok(()),
            None => Err("the queue did not answer".to_owned()),
            Some(why) => Err(why.to_owned()),
        }
    }
}

/// Time limit of one key set fetch, in milliseconds.
const JWKS_TIMEOUT_MS: f64 = 5_000.0;

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
