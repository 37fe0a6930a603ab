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
mod init;
mod tokens;

use std::cell::{Cell, OnceCell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use js_sys::Promise;
use serde_json::{json, Value};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use crate::exchange::{
    Answer, AnswerBody, BackendRequest, BodyError, Grant, Io, Limit, NoToken, OutBody, Reply,
    RequestHead, SendError,
};
use crate::fasthash::FastMap;
use crate::identity::TokenKey;
use crate::pipeline::Gateway;
use crate::policy::prepared::{Prepared, TokenTarget};
use crate::policy::JwtAlgorithm;

/// The policy, compiled and checked by build.rs when the worker was built.
const PREPARED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/prepared.bin"));

#[wasm_bindgen(module = "/src/edge/edge.js")]
extern "C" {
    /// The one import whose arguments need no conversion (wasm-bindgen imports such a function
    /// straight from the module, and lists each one under the module's name in the imports
    /// object: several of them would be duplicate keys, which esbuild warns about on every
    /// build). `kind` picks the function: see the `EDGE_*` constants.
    fn edge(kind: u32, a: &JsValue, b: &JsValue, c: &JsValue) -> JsValue;
    /// A task's waker: resume it in a microtask.
    fn schedule(task: u32);
    /// The per-request context `drive` keeps for a task (request, env, ctx, bodies, replies).
    #[wasm_bindgen(js_name = contextOf)]
    fn context_of(task: u32) -> JsValue;
    fn secret(c: &JsValue, name: &str) -> Option<String>;
    #[wasm_bindgen(js_name = bufferBytes)]
    fn buffer_bytes(c: &JsValue, id: u32) -> Vec<u8>;
    /// The bytes of a large answer `text` kept, which `drive` lets go of.
    #[wasm_bindgen(js_name = takeBytes)]
    fn take_bytes(c: &JsValue, id: u32) -> Vec<u8>;
    #[wasm_bindgen(catch, js_name = fetchText)]
    fn fetch_text(
        url: &str,
        method: &str,
        headers: &str,
        body: Option<String>,
        deadline_ms: f64,
        limit: u32,
    ) -> Result<Promise, JsValue>;
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
    /// The platform's CSPRNG (one crossing; only when a handle is sealed).
    #[wasm_bindgen(js_namespace = crypto, js_name = getRandomValues)]
    fn get_random_values(out: &mut [u8]);
    #[wasm_bindgen(js_namespace = console, js_name = log)]
    fn console_log(line: &str);
    #[wasm_bindgen(js_namespace = Date, js_name = now)]
    fn date_now() -> f64;
    #[wasm_bindgen(js_namespace = Math, js_name = random)]
    fn math_random() -> f64;
}

/// [`edge`]: runs one request (reads its head, steps its task through every op, builds the
/// answer: a `Response`, or a promise of one when the request needed I/O).
const EDGE_DRIVE: u32 = 0;
/// [`edge`]: delivers a batch of stored requests, each as a task, and acknowledges or retries
/// each (a promise).
const EDGE_CONSUME: u32 = 1;
/// [`edge`]: runs a promise past the response (`ctx.waitUntil` of a request's context).
const EDGE_WAIT_UNTIL: u32 = 2;
/// [`edge`]: a promise that resolves after the milliseconds given.
const EDGE_SLEEP: u32 = 3;
/// [`edge`]: hands over the stepper, once per isolate.
const EDGE_SET_STEPPER: u32 = 4;

/// Runs a promise past the response (a token refreshed ahead of expiry).
fn wait_until(c: &JsValue, promise: &Promise) {
    edge(EDGE_WAIT_UNTIL, c, promise, &JsValue::UNDEFINED);
}

/// Resolves after `ms` milliseconds.
fn sleep(ms: f64) -> Promise {
    edge(
        EDGE_SLEEP,
        &JsValue::from_f64(ms),
        &JsValue::UNDEFINED,
        &JsValue::UNDEFINED,
    )
    .unchecked_into()
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

/// The one entry point `drive` steps tasks through: `(kind, task, now, payload) -> op`.
type Stepper = Closure<dyn FnMut(u32, u32, f64, Option<String>) -> String>;

thread_local! {
    /// Loaded once per isolate, on the first request, and kept for the isolate's life (an
    /// isolate runs one thread).
    static GATEWAY: OnceCell<Option<&'static Gateway>> = const { OnceCell::new() };
    /// The requests in flight, by task id.
    static TASKS: RefCell<FastMap<u32, Task>> = RefCell::new(FastMap::default());
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

/// The worker's fetch handler, called by the entry module for every request: the `Response`,
/// or a promise of it (the runtime takes either).
#[wasm_bindgen]
pub fn fetch(request: JsValue, env: JsValue, ctx: JsValue) -> JsValue {
    ensure_stepper();
    edge(EDGE_DRIVE, &request, &env, &ctx)
}

/// The worker's queue handler: store-and-forward's deliveries (the entry module calls it with
/// each batch of the queue this worker consumes).
#[wasm_bindgen]
pub fn queue(batch: JsValue, env: JsValue, ctx: JsValue) -> Promise {
    ensure_stepper();
    edge(EDGE_CONSUME, &batch, &env, &ctx).unchecked_into()
}

fn ensure_stepper() {
    STEPPER.with(|cell| {
        cell.get_or_init(|| {
            // The panic hook (the message and location on the console, not a bare trap) is set
            // when the module starts (init.rs).
            let stepper = Stepper::new(step);
            edge(
                EDGE_SET_STEPPER,
                stepper.as_ref(),
                &JsValue::UNDEFINED,
                &JsValue::UNDEFINED,
            );
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
    /// Its waker, made once (it schedules the task by id).
    waker: Waker,
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

/// Starts task `id`: its future, made over the task's I/O.
fn start(
    id: u32,
    uuid: Option<String>,
    make: impl FnOnce(Edge) -> Pin<Box<dyn Future<Output = String>>>,
) {
    let slot = Rc::new(Slot::default());
    let io = Edge {
        task: id,
        slot: slot.clone(),
        c: OnceCell::new(),
        uuid: RefCell::new(uuid),
        hold: Cell::new(false),
    };
    let future = make(io);
    let waker = Waker::from(Arc::new(TaskWaker(id)));
    TASKS.with(|t| {
        t.borrow_mut().insert(
            id,
            Task {
                future,
                slot,
                waker,
            },
        )
    });
}

struct TaskWaker(u32);

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        schedule(self.0);
    }
}

/// The stepper: `(0, task, now, uuid\nhead)` starts task `task` (`drive` numbers them) with a
/// fresh UUID (the request's first [`Io::uuid`], often its id, without a call out of the wasm)
/// and the request's head ([`RequestHead::from_wire`]); `(1, task, now, result)` resumes it with an
/// op's result, or with nothing after a wake; `(2, task, …)` drops a task `drive` gave up on;
/// `(3, task, now, delivery)` starts the delivery of a stored request (`consume`).
/// Answers the next op ([`Op`]), `wait` while the task awaits a JavaScript promise of its own,
/// or the final `done` op ([`done`]).
fn step(kind: u32, task: u32, now: f64, payload: Option<String>) -> String {
    if kind == 0 {
        let id = task;
        let (uuid, head) = payload
            .as_deref()
            .and_then(|p| p.split_once('\n'))
            .unwrap_or_default();
        let head = RequestHead::from_wire(head).unwrap_or_default();
        let uuid = (uuid.len() == 36).then(|| uuid.to_owned());
        start(id, uuid, |io| {
            Box::pin(async move {
                match gateway() {
                    Some(gateway) => {
                        let (answer, line) = gateway.handle(&head, &io).await;
                        done(answer, &line)
                    }
                    None => done_internal(io.task, "the compiled policy does not load"),
                }
            })
        });
    }
    if kind == 3 {
        // A delivery: attempt, body kind, buffer id, stored request (JSON, one line), text body.
        let id = task;
        let mut fields = payload.as_deref().unwrap_or_default().splitn(5, '\n');
        let attempt = fields.next().and_then(|a| a.parse().ok()).unwrap_or(1u32);
        let kind = fields.next().unwrap_or_default().to_owned();
        let buffer = fields.next().and_then(|b| b.parse().ok()).unwrap_or(0u32);
        let stored = fields.next().unwrap_or_default().to_owned();
        let text = fields.next().unwrap_or_default();
        let body = match kind.as_str() {
            "buffer" => Delivery::Buffer(buffer),
            "text" => Delivery::Text(text.to_owned()),
            _ => Delivery::None,
        };
        start(id, None, |io| {
            Box::pin(async move {
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
                // seconds in retry-after, 410 acknowledge (it is on the dead-letter queue with
                // its reason; logged as an error).
                let (status, headers) = match outcome {
                    crate::store::Delivered::Yes => (200, Vec::new()),
                    crate::store::Delivered::Later(secs) => {
                        (503, vec![("retry-after", secs.to_string())])
                    }
                    crate::store::Delivered::DeadLettered => (410, Vec::new()),
                };
                let answer = Answer {
                    status,
                    headers,
                    body: AnswerBody::Empty,
                };
                done(answer, &line)
            })
        });
    }
    if kind == 2 {
        TASKS.with(|t| t.borrow_mut().remove(&task));
        return String::new();
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
    let mut cx = Context::from_waker(&current.waker);
    match current.future.as_mut().poll(&mut cx) {
        Poll::Ready(done) => done,
        Poll::Pending => {
            let op = current
                .slot
                .op
                .borrow_mut()
                .take()
                .unwrap_or_else(|| "wait".to_owned());
            TASKS.with(|t| t.borrow_mut().insert(task, current));
            op
        }
    }
}

/// The final op: `done`, the status, `1` when a text body follows (else `0`), the id of the
/// reply to stream (or nothing), the number of headers and each header's name and value, the
/// log line and, to the end, the text body. The text body is the only field that may hold a
/// line break: it comes last, as it is.
fn done(answer: Answer<u32>, line: &str) -> String {
    let (text, stream) = match answer.body {
        AnswerBody::Empty => (None, None),
        AnswerBody::Text(text) => (Some(text), None),
        AnswerBody::Stream(id) => (None, Some(id)),
    };
    let room = 64 + line.len() + text.as_ref().map_or(0, String::len) + fields_len(&answer.headers);
    let mut op = Op::with_room("done", room);
    op.int(answer.status)
        .int(u8::from(text.is_some()))
        .field(&stream.map(|id| id.to_string()).unwrap_or_default())
        .int(answer.headers.len() as u64);
    for (name, value) in &answer.headers {
        op.field(name).field(value);
    }
    op.field(line).field(text.as_deref().unwrap_or_default());
    op.0
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

/// Headers as one string, `name\nvalue\n…`, for `fetchText` (token requests): a header value
/// never holds a line break (the outgoing gate refuses one).
fn push_header(out: &mut String, name: &str, value: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(name);
    out.push('\n');
    out.push_str(value);
}

/// The bytes headers take as an op's fields (each name and value after a line break).
fn fields_len<N: AsRef<str>, V: AsRef<str>>(headers: &[(N, V)]) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 2)
        .sum()
}

/// An op for `drive`: its kind, then its fields, each after a line break. A field never holds
/// a line break, except an op's last field where its comment says so (`drive` takes the rest
/// of the string as that field): header names and values cannot (the outgoing gate refuses
/// them, and the runtime's own headers cannot have one), nor URLs, numbers and ids.
struct Op(String);

impl Op {
    fn new(kind: &str) -> Op {
        Op::with_room(kind, 32)
    }

    /// An op with room for about `room` more bytes of fields (a send, the final op): one
    /// allocation instead of one per doubling.
    fn with_room(kind: &str, room: usize) -> Op {
        let mut op = String::with_capacity(kind.len() + room);
        op.push_str(kind);
        Op(op)
    }

    fn field(&mut self, value: &str) -> &mut Op {
        self.0.push('\n');
        self.0.push_str(value);
        self
    }

    fn int(&mut self, value: impl Into<u64>) -> &mut Op {
        use std::fmt::Write;
        self.0.push('\n');
        let _ = write!(self.0, "{}", value.into());
        self
    }

    fn num(&mut self, value: f64) -> &mut Op {
        use std::fmt::Write;
        self.0.push('\n');
        // As whole numbers (milliseconds and lengths; a fraction of a millisecond of delay is
        // rounded up): no float formatting in the wasm (about 15 KB of it).
        let _ = write!(self.0, "{}", value.ceil() as i64);
        self
    }
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
    /// A fresh UUID `drive` handed over with the head, for the first [`Io::uuid`].
    uuid: RefCell<Option<String>>,
    /// [`Io::hold`] was asked: the next send tells `drive` to keep the request running past
    /// its caller (`sendh` instead of `send`: no call of its own).
    hold: Cell<bool>,
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
    /// Hands `op` to `drive` and waits for its result: a string, whose form each op's caller
    /// reads.
    async fn ask(&self, op: Op) -> String {
        *self.slot.result.borrow_mut() = None;
        *self.slot.op.borrow_mut() = Some(op.0);
        Ask(&self.slot).await
    }

    fn c(&self) -> &JsValue {
        self.c.get_or_init(|| context_of(self.task))
    }

    /// A body `drive` read: `none`, `{id}\n{length}` (the bytes stay in JavaScript under the
    /// id), `seen\n{n}` past the limit, `error\n{what}`.
    fn body(result: &str) -> Result<Option<(u32, u64)>, BodyError> {
        let (first, rest) = result.split_once('\n').unwrap_or((result, ""));
        match first {
            "seen" => Err(BodyError::TooLarge(rest.parse().unwrap_or(u64::MAX))),
            "error" => Err(BodyError::Unreadable(rest.to_owned())),
            _ => match (first.parse(), rest.parse()) {
                (Ok(id), Ok(length)) => Ok(Some((id, length))),
                _ => Ok(None),
            },
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
        self.uuid.borrow_mut().take().unwrap_or_else(random_uuid)
    }

    fn random(&self) -> f64 {
        random()
    }

    fn fill_random(&self, out: &mut [u8]) {
        get_random_values(out);
    }

    fn secret(&self, name: &str) -> Option<String> {
        secret(self.c(), name)
    }

    async fn rate_limit(&self, binding: &str, key: &str) -> Result<bool, bool> {
        // The key last: it holds a caller's value (a token's subject).
        let mut op = Op::new("rate");
        op.field(binding).field(key);
        match self.ask(op).await.as_str() {
            "1" => Ok(true),
            "0" => Ok(false),
            "-1" => Err(true),
            _ => Err(false),
        }
    }

    async fn fetch_jwks(&self, url: &str, limit: u32) -> Result<String, &'static str> {
        let mut op = Op::new("jwks");
        op.field(url).num(JWKS_TIMEOUT_MS).int(limit);
        // `{status}\n{body}`, `over\n{bytes seen}`, or `error\n{what}`.
        let result = self.ask(op).await;
        let (first, body) = result.split_once('\n').unwrap_or((&result, ""));
        match first {
            "over" => Err("the key set URL answered more than a key set may be"),
            "error" if body == "timeout" => Err("the key set URL timed out"),
            "error" => Err("the key set URL could not be reached"),
            status => match status.parse::<u16>() {
                Ok(status) if (200..300).contains(&status) => Ok(body.to_owned()),
                Ok(_) => Err("the key set URL answered with an error"),
                Err(_) => Err("the key set URL could not be reached"),
            },
        }
    }

    async fn verify(&self, alg: JwtAlgorithm, jwk: &Value, data: &[u8], signature: &[u8]) -> bool {
        let b64 = crate::encoding::base64url;
        let mut op = Op::new("verify");
        // The key last (JSON, which serde writes without a line break; last all the same).
        op.field(crate::inbound::jwt::alg_name(alg))
            .field(&b64(data))
            .field(&b64(signature))
            .field(&jwk.to_string());
        self.ask(op).await == "1"
    }

    async fn token(&self, target: &TokenTarget) -> Result<Grant, NoToken> {
        tokens::obtain(target, &|| self.c().clone(), &|| self.slot.now.get()).await
    }

    fn evict_token(&self, key: &TokenKey, access_token: &str) {
        tokens::evict(key, access_token);
    }

    async fn read_body(&self, limit: u64) -> Result<Option<(u32, u64)>, BodyError> {
        let mut op = Op::new("read");
        op.int(limit);
        Edge::body(&self.ask(op).await)
    }

    fn bytes(&self, body: &u32) -> Vec<u8> {
        buffer_bytes(self.c(), *body)
    }

    /// `keep`, the id of the buffer to let go of (or nothing) and, to the end, the text (the
    /// fields written in front of the text in its own string: no copy of it when it has the
    /// room, as a template's body has). The result: `{id}\n{length}` of what `drive` keeps
    /// under the id.
    async fn keep_text(&self, text: String, release: Option<&u32>) -> Option<u32> {
        let mut op = text;
        op.insert_str(
            0,
            &release.map_or_else(|| "keep\n\n".to_owned(), |id| format!("keep\n{id}\n")),
        );
        let result = self.ask(Op(op)).await;
        result.split_once('\n').and_then(|(id, _)| id.parse().ok())
    }

    async fn next_block(
        &self,
        block_bytes: u32,
        limit: u64,
    ) -> Result<Option<(u32, u64)>, BodyError> {
        let mut op = Op::new("block");
        op.int(block_bytes).int(limit);
        Edge::body(&self.ask(op).await)
    }

    /// `send`, the URL, the method, the body's kind (`none`, `buffer`, `text` or `caller`), the
    /// buffer's id (or nothing), the caller's body's length (or -1), the deadline and idle
    /// limits in ms (0: none), the number of headers and each name and value, and, to the end,
    /// a text body (which may hold line breaks). The result: `{reply id}\n{status}` and the
    /// headers the core reads (`\n{name}\n{value}` each), or `error\n{timeout | what failed}`.
    async fn send(
        &self,
        request: &BackendRequest,
        token: Option<&str>,
        body: OutBody<'_, u32>,
        limit: Limit,
    ) -> Result<Reply<u32>, SendError> {
        crate::backend::check(request).map_err(SendError::Unsendable)?;
        let (kind, id, length, text) = match body {
            OutBody::None => ("none", None, -1.0, ""),
            OutBody::Bytes(id) => ("buffer", Some(*id), -1.0, ""),
            OutBody::Text(text) => ("text", None, -1.0, text),
            OutBody::CallerStream { length } => ("caller", None, length as f64, ""),
        };
        let (deadline, idle) = match limit {
            Limit::Deadline(ms) => (ms, 0.0),
            Limit::Idle(ms) => (0.0, ms),
        };
        let room = 128
            + request.url.len()
            + text.len()
            + token.map_or(0, |t| t.len() + 24)
            + fields_len(&request.headers);
        let kind_of_op = if self.hold.replace(false) {
            "sendh"
        } else {
            "send"
        };
        let mut op = Op::with_room(kind_of_op, room);
        op.field(&request.url)
            .field(request.method)
            .field(kind)
            .field("");
        if let Some(id) = id {
            use std::fmt::Write;
            let _ = write!(op.0, "{id}");
        }
        op.num(length)
            .num(deadline)
            .num(idle)
            .field(&request.reply_headers.join(","))
            .int((request.headers.len() + usize::from(token.is_some())) as u64);
        for (name, value) in &request.headers {
            op.field(name).field(value);
        }
        if let Some(token) = token {
            op.field("authorization");
            op.0.push_str("\nBearer ");
            op.0.push_str(token);
        }
        op.field(text);
        let result = self.ask(op).await;
        let mut fields = result.split('\n');
        let (Some(first), Some(second)) = (fields.next(), fields.next()) else {
            return Err(SendError::Network("an unreadable reply".into()));
        };
        if first == "error" {
            // What failed is the rest of the string (a message may hold line breaks).
            return Err(match result.split_once('\n').map_or("", |(_, what)| what) {
                "timeout" => SendError::Timeout,
                other => SendError::Network(other.to_owned()),
            });
        }
        let (Ok(id), Ok(status)) = (first.parse::<u32>(), second.parse::<u16>()) else {
            return Err(SendError::Network("an unreadable reply".into()));
        };
        let mut headers = Vec::new();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            headers.push((name.to_owned(), value.to_owned()));
        }
        Ok(Reply {
            status,
            headers,
            body: Some(id),
        })
    }

    /// `text`, the reply's id, the limit. The result: `text\n{the text}` (a small answer),
    /// `bytes\n{id}` (a larger one, whose bytes are taken in one call: no string of it is made
    /// on either side), `over\n{bytes seen}` (the edge stopped reading past the limit and
    /// cancelled the body), or `error\n{what}`.
    async fn text(&self, body: u32, limit: u32) -> Result<String, BodyError> {
        let mut op = Op::new("text");
        op.int(body).int(limit);
        let mut result = self.ask(op).await;
        match result.split_once('\n') {
            Some(("text", _)) => {
                // The text is the rest: drop the tag in place rather than copy the text.
                result.drain(..5);
                Ok(result)
            }
            Some(("bytes", id)) => {
                let id = id.parse().unwrap_or(u32::MAX);
                let bytes = take_bytes(self.c(), id);
                // As the runtime's text(): invalid UTF-8 replaced (a copy only then).
                Ok(match String::from_utf8(bytes) {
                    Ok(text) => text,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                })
            }
            Some(("over", seen)) => Err(BodyError::TooLarge(seen.parse().unwrap_or(u64::MAX))),
            Some(("error", why)) => Err(BodyError::Unreadable(why.to_owned())),
            _ => Err(BodyError::Unreadable("an unreadable result".to_owned())),
        }
    }

    async fn sleep(&self, ms: f64) {
        let mut op = Op::new("sleep");
        op.num(ms);
        self.ask(op).await;
    }

    fn hold(&self) {
        self.hold.set(true);
    }

    async fn enqueue(
        &self,
        binding: &str,
        stored: &str,
        body: OutBody<'_, u32>,
        max_body: usize,
    ) -> Result<(), String> {
        let (kind, id, text) = match body {
            OutBody::Bytes(id) => ("buffer", id.to_string(), ""),
            OutBody::Text(text) => ("text", String::new(), text),
            _ => ("none", String::new(), ""),
        };
        let mut op = Op::new("enqueue");
        op.field(binding)
            .int(max_body as u64)
            .field(kind)
            .field(&id)
            .field(stored)
            .field(text);
        let result = self.ask(op).await;
        match result.split_once('\n') {
            None if result == "1" => Ok(()),
            Some(("error", why)) => Err(why.to_owned()),
            _ => Err("the queue did not answer".to_owned()),
        }
    }

    async fn dead_letter(&self, binding: &str, why: &str) -> Result<(), String> {
        let mut op = Op::new("deadletter");
        op.field(binding).field(why);
        let result = self.ask(op).await;
        match result.split_once('\n') {
            None if result == "1" => Ok(()),
            Some(("error", why)) => Err(why.to_owned()),
            _ => Err("the dead-letter queue did not answer".to_owned()),
        }
    }
}

/// Time limit of one key set fetch, in milliseconds.
const JWKS_TIMEOUT_MS: f64 = 5_000.0;

fn is_timeout(e: &JsValue) -> bool {
    js_sys::Reflect::get(e, &"name".into())
        .ok()
        .and_then(|n| n.as_string())
        .is_some_and(|n| n == "TimeoutError")
}

fn describe(e: &JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| "a network error".to_owned())
}
