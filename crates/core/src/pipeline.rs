//! The life of one request, in one place: the phases, in order, run by one driver over one
//! per-request context. Read [`Gateway::handle`] top to bottom:
//!
//! 1. **request id**: the caller's `x-request-id` when it is sane, else a new one;
//! 2. **preflight**: a CORS preflight is answered here, for the route the browser asks about;
//! 3. **route**: method and path to a route, or 404 / 405;
//! 4. **cheap checks**: IP, size, content type, required headers;
//! 5. **credentials**: API key, JWT;
//! 6. **rate limit**: counted per route and caller;
//! 7. **build**: the backend reads what it needs of the request and builds its request(s) as
//!    data, every caller value checked and passed through the outgoing gate;
//! 8. **token**: the identity's token for the backend's audience;
//! 9. **send**: the backend request(s), retried where a retry is safe;
//! 10. **answer**: the backend's reply as the caller's answer;
//! 11. **log**: one JSON line, whatever happened above.
//!
//! The driver decides; it performs no I/O. What it needs from outside (the clock, a secret, a
//! key set, a signature check, a rate-limit count, a token, a body, a send) it asks of an
//! [`Io`], which the edge implements with JavaScript and the tests implement with fakes: the
//! unit tests drive exactly the code production runs. Backends plug in through [`Backend`].

use std::cell::RefCell;

use serde_json::{Map, Value};

use crate::backend::{azure_rest, blob, service_bus, BackendRequest, Bearer};
use crate::breaker::{Admission, Breakers, Call, Caller, Outcome, Scope};
use crate::fasthash::FastMap;
use crate::identity::{Token, TokenKey};
use crate::inbound::{self, jwt};
use crate::policy::prepared::{Prepared, PreparedBackend, PreparedRoute, TokenTarget};
use crate::policy::JwtAlgorithm;
use crate::problem::Problem;
use crate::routing::RouteMatch;
use crate::template::RenderContext;

// ---------------------------------------------------------------------------------------------
// What the driver works on

/// The request as the edge read it, in one piece: nothing else of it is asked for later.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    pub method: String,
    /// The raw path, without the query string.
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    /// The headers, in the order they came.
    pub headers: HeaderList,
    /// Whether the request has a body stream at all.
    pub has_body: bool,
}

/// A request's headers, names lowercase, in the order they came: one string and where each name
/// and value lies in it (read once per request; two allocations, not two per header).
#[derive(Debug, Clone, Default)]
pub struct HeaderList {
    text: String,
    /// Start of the name, end of the name (the value starts one byte later), end of the value.
    at: Vec<(u32, u32, u32)>,
}

impl HeaderList {
    pub fn push(&mut self, name: &str, value: &str) {
        let start = self.text.len();
        self.text.push_str(name);
        let name_end = self.text.len();
        if let Some(added) = self.text.get_mut(start..) {
            added.make_ascii_lowercase();
        }
        self.text.push('\n');
        self.text.push_str(value);
        self.at
            .push((start as u32, name_end as u32, self.text.len() as u32));
    }

    /// The first value of a header, by lowercase name.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.at.iter().map(|&(start, name_end, end)| {
            let (start, name_end, end) = (start as usize, name_end as usize, end as usize);
            (&self.text[start..name_end], &self.text[name_end + 1..end])
        })
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

impl<N: AsRef<str>, V: AsRef<str>> FromIterator<(N, V)> for HeaderList {
    fn from_iter<T: IntoIterator<Item = (N, V)>>(pairs: T) -> HeaderList {
        let mut list = HeaderList::default();
        for (name, value) in pairs {
            list.push(name.as_ref(), value.as_ref());
        }
        list
    }
}

impl RequestHead {
    /// The first value of a header, by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The declared `Content-Length`, when it is a number.
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }

    /// Reads the edge's one-string encoding: `method\nurl\nhas_body (1 or 0)\nname\nvalue\n…`,
    /// fields in order, separated by line breaks (none of them can hold one: the runtime has
    /// serialised the URL and refuses line breaks in header names and values).
    pub fn from_wire(wire: &str) -> Option<RequestHead> {
        let mut fields = wire.split('\n');
        let method = fields.next()?;
        let url = fields.next()?;
        let has_body = match fields.next()? {
            "1" => true,
            "0" => false,
            _ => return None,
        };
        // An absolute URL: skip the scheme and authority.
        let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
        let target = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
        let target = target.split('#').next().unwrap_or(target);
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        // Room for every header at once (a little more: the head's first fields are in `wire`).
        let mut headers = HeaderList {
            text: String::with_capacity(wire.len()),
            at: Vec::with_capacity(wire.bytes().filter(|&b| b == b'\n').count() / 2),
        };
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            headers.push(name, value);
        }
        Some(RequestHead {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            headers,
            has_body,
        })
    }
}

/// A body that passed its size limit, or why it did not.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyError {
    /// More than the limit: at least this many bytes.
    TooLarge(u64),
    Unreadable(String),
}

/// What goes out with a backend request.
pub enum OutBody<'a, B> {
    None,
    /// Bytes the edge holds (a caller's body read whole, a block): the same bytes on a retry.
    Bytes(&'a B),
    Text(&'a str),
    /// The caller's own body stream, passed through untouched (not replayable).
    CallerStream {
        length: u64,
    },
}

// Only references inside: copyable whatever `B` is (a retry sends the same body again).
impl<B> Clone for OutBody<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for OutBody<'_, B> {}

/// How long a send may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// The whole call.
    Deadline(f64),
    /// A streamed call, with no whole-transfer limit: a reply streamed back is stopped when no
    /// bytes move for this long; the caller's own body going out gets this plus its length at
    /// 64 KiB/s (the edge sends it natively, without watching each chunk).
    Idle(f64),
}

/// Why a send got no reply.
#[derive(Debug, Clone)]
pub enum SendError {
    Timeout,
    Network(String),
    /// The outgoing gate refused the request: nothing was sent.
    Unsendable(Problem),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Timeout => f.write_str("timed out"),
            SendError::Network(e) => write!(f, "failed: {e}"),
            SendError::Unsendable(p) => write!(f, "was not sent: {}", p.detail),
        }
    }
}

/// A backend's reply: its status, the headers the gateway reads, and its body (held by the
/// edge; the core reads it only when it needs the text).
pub struct Reply<S> {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<S>,
}

impl<S> Reply<S> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A token for a backend call, with what the log line says about it.
#[derive(Debug, Clone)]
pub struct Grant {
    pub token: Token,
    /// `cache`, `cache_refresh_ahead`, `fetched` or `waited`.
    pub source: &'static str,
    /// Time this request spent on the identity provider.
    pub idp_ms: Option<f64>,
}

/// Why no token: the caller's problem and the log's words (never a secret).
#[derive(Debug, Clone)]
pub struct NoToken {
    pub problem: Problem,
    pub log: String,
}

/// Everything the driver needs from outside. The edge implements it with JavaScript (one
/// crossing per call, as a rule); the tests with fakes.
#[allow(async_fn_in_trait)] // single-threaded: the futures never cross threads
pub trait Io {
    /// A body the edge holds: the caller's body read whole, or a block of it.
    type Bytes;
    /// A streamed body the edge holds: a backend reply's.
    type Stream;

    fn now(&self) -> f64;
    fn uuid(&self) -> String;
    fn random(&self) -> f64;
    /// A Worker secret (the edge reads each once per isolate).
    fn secret(&self, name: &str) -> Option<String>;
    /// Counts one request against a rate-limiting binding: `Ok(true)` when allowed, `Err`
    /// when the binding is missing (`Err(true)`) or did not answer (`Err(false)`).
    async fn rate_limit(&self, binding: &str, key: &str) -> Result<bool, bool>;
    /// GET a key set URL, its answer read up to `limit` bytes (an answer past it is refused);
    /// the error is safe to tell a caller.
    async fn fetch_jwks(&self, url: &str, limit: u32) -> Result<String, &'static str>;
    /// Whether `signature` over `data` verifies with the public `jwk` under `alg`.
    async fn verify(&self, alg: JwtAlgorithm, jwk: &Value, data: &[u8], signature: &[u8]) -> bool;
    /// The token of `target`: from the isolate's cache, or fetched once for all callers.
    async fn token(&self, target: &TokenTarget) -> Result<Grant, NoToken>;
    /// A backend refused this token (401): drop it from the cache.
    fn evict_token(&self, key: &TokenKey, access_token: &str);
    /// The whole body, refused as soon as it passes `limit` bytes; `None` without a body.
    async fn read_body(&self, limit: u64) -> Result<Option<(Self::Bytes, u64)>, BodyError>;
    /// The bytes of a body the edge holds (for the few bodies the core must parse).
    fn bytes(&self, body: &Self::Bytes) -> Vec<u8>;
    /// Hands a body the core built (a template's) to the edge, which holds it from then on: the
    /// wasm's memory, which never shrinks, does not hold it while it is sent (and sent again).
    /// The edge lets go of `release` (the caller's body it was built from). `None` when the
    /// edge could not take it.
    async fn keep_text(&self, text: String, release: Option<&Self::Bytes>) -> Option<Self::Bytes>;
    /// The next `block_bytes` of the body (fewer at its end), `None` after the end; refused as
    /// soon as the body passes `limit` bytes in all.
    async fn next_block(
        &self,
        block_bytes: u32,
        limit: u64,
    ) -> Result<Option<(Self::Bytes, u64)>, BodyError>;
    /// Sends a backend request, with `Authorization: Bearer {token}` when given, after the
    /// outgoing gate ([`crate::backend::check`]).
    async fn send(
        &self,
        request: &BackendRequest,
        token: Option<&str>,
        body: OutBody<'_, Self::Bytes>,
        limit: Limit,
    ) -> Result<Reply<Self::Stream>, SendError>;
    /// A reply body's text, read only up to `limit` bytes: past it the edge stops reading and
    /// cancels the body ([`BodyError::TooLarge`], never a cut-off text), and a body that breaks
    /// off is [`BodyError::Unreadable`]. The limit is the core's, decided when the policy was
    /// built (a route's `max_answer_bytes`, or a constant for bodies read only for a log line).
    async fn text(&self, body: Self::Stream, limit: u32) -> Result<String, BodyError>;
    /// Puts a stored request (its description as JSON, and its body) on the store-and-forward
    /// queue of `binding`; refused when the body is over `max_body` bytes or the queue does not
    /// take it (the error says why, for the log).
    async fn enqueue(
        &self,
        binding: &str,
        stored: &str,
        body: OutBody<'_, Self::Bytes>,
        max_body: usize,
    ) -> Result<(), String>;
    /// Store-and-forward's consumer: puts the message being delivered, as it came off the
    /// queue, on the dead-letter queue of `binding` with `why` (a [`crate::store::DeadLetter`]
    /// as JSON) beside it; the error says why it was not taken, for the log.
    async fn dead_letter(&self, binding: &str, why: &str) -> Result<(), String>;
    async fn sleep(&self, ms: f64);
    /// This request's work must finish even if its caller goes away (others wait on its send):
    /// the edge keeps it running past the caller (`waitUntil`).
    fn hold(&self) {}
}

/// The caller's answer.
pub struct Answer<S> {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: AnswerBody<S>,
}

pub enum AnswerBody<S> {
    Empty,
    Text(String),
    /// A backend reply's body, streamed through.
    Stream(S),
}

impl<S> Answer<S> {
    pub fn json(status: u16, body: String) -> Answer<S> {
        Answer {
            status,
            headers: vec![("content-type", "application/json".to_owned())],
            body: AnswerBody::Text(body),
        }
    }

    fn problem(problem: &Problem, instance: &str, request_id: &str) -> Answer<S> {
        let mut headers = vec![
            ("content-type", crate::problem::CONTENT_TYPE.to_owned()),
            ("cache-control", "no-store".to_owned()),
        ];
        headers.extend(problem.headers.iter().cloned());
        Answer {
            status: problem.status,
            headers,
            body: AnswerBody::Text(problem.body(instance, request_id)),
        }
    }
}

/// One request's context: what each phase learnt, for the next ones and for the log line.
pub struct Cx<'r> {
    pub head: &'r RequestHead,
    pub request_id: String,
    pub route: Option<&'r PreparedRoute>,
    pub params: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    /// The name of the API key that let the caller in.
    pub api_key: Option<String>,
    /// The caller's validated JWT claims.
    pub claims: Option<Map<String, Value>>,
    pub log: LogFields,
}

impl Cx<'_> {
    /// The values templates are filled from: this request, at `now_ms`.
    pub fn render_context<'a>(
        &'a self,
        header: &'a dyn Fn(&str) -> Option<String>,
        uuid: &'a dyn Fn() -> String,
        now_ms: f64,
    ) -> RenderContext<'a> {
        RenderContext {
            path: &self.params,
            query: &self.query,
            header,
            request_id: &self.request_id,
            uuid,
            now_ms,
            jwt: self.claims.as_ref(),
            body: None,
        }
    }

    /// The route's inbound body limit, which also bounds bodies read without a length.
    pub fn max_body(&self) -> Option<u64> {
        self.route.and_then(|r| r.inbound.max_body_bytes)
    }
}

/// What the log line says beyond the request itself.
#[derive(Debug, Default, Clone)]
pub struct LogFields {
    pub problem: Option<&'static str>,
    pub identity: Option<String>,
    pub token: Option<&'static str>,
    pub idp_ms: Option<f64>,
    pub token_ttl_s: Option<f64>,
    pub token_error: Option<String>,
    pub backend_status: Option<u16>,
    /// The backend's own reason for refusing (Service Bus's `<Detail>`), for the operator: it
    /// is never copied into the caller's answer.
    pub backend_detail: Option<String>,
    /// A backend refused the token (401) and a fresh one was fetched for this request.
    pub token_renewed: bool,
    /// The circuit breakers as this request found them: `closed`, `probe`, `open`.
    pub breaker: Option<&'static str>,
    /// Which breaker refused the call, or the broadest one it probes (`caller_resource`,
    /// `caller`, `resource`, `route`, `host`).
    pub breaker_scope: Option<&'static str>,
    /// Azure's `Retry-After` on its last answer that found it unavailable (not logged).
    pub retry_after: Option<u64>,
    /// Store-and-forward: `queued`, or why the request was not stored.
    pub stored: Option<String>,
    /// A send carried the caller's own stream: its failure may be the caller's (a stalled or
    /// broken upload), so the host's breaker does not count it.
    pub caller_stream: bool,
    /// The problem the caller would have had, had the request not been stored.
    pub problem_avoided: Option<&'static str>,
    /// Group commit: the batch this request's message left in (messages, its leader's request
    /// id), when it left with others.
    pub batch: Option<(usize, String)>,
    /// The batch's outcome came from its leader's send, which its leader's breakers counted:
    /// this request's breakers say nothing of it (the batch is counted once).
    pub batch_follower: bool,
}

// ---------------------------------------------------------------------------------------------
// Backends

/// A backend: how an accepted request becomes Azure requests, and Azure's reply the caller's
/// answer. Phases 7, 9 and 10; the driver runs 8 (the token) between them.
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// What [`Backend::build`] decided: requests as data, and the body to send.
    type Plan<B>;
    /// Phase 7: read what is needed of the request, check it, build the request(s). Nothing
    /// is sent and no token is fetched before this succeeds.
    async fn build<I: Io>(&self, cx: &mut Cx<'_>, io: &I) -> Result<Self::Plan<I::Bytes>, Problem>;
    /// Phase 9: send, with the token (renewed once if a backend refuses it); the reply that
    /// ends the call.
    async fn send<I: Io>(
        &self,
        plan: &Self::Plan<I::Bytes>,
        bearer: &Bearer<'_>,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Reply<I::Stream>, Problem>;
    /// Phase 10: the caller's answer to a reply that [`Backend::send`] accepted.
    fn answer<B, S>(&self, plan: &Self::Plan<B>, reply: Reply<S>, cx: &Cx<'_>) -> Answer<S>;
    /// The request that names what the call is about: the path of its URL is the resource the
    /// circuit breakers count failures by.
    fn request<'p, B>(&self, plan: &'p Self::Plan<B>) -> &'p BackendRequest;
    /// Store-and-forward: the request as it would be stored (request, body, the ids the
    /// caller is told), when this backend's plan can be sent again later. None by default.
    fn stored<'p, B>(&self, _plan: &'p Self::Plan<B>) -> Option<StoredPlan<'p, B>> {
        None
    }
    /// The caller's 202 for a request that was stored.
    fn queued<B, S>(&self, _plan: &Self::Plan<B>) -> Answer<S> {
        Answer::json(202, r#"{"status":"queued"}"#.to_owned())
    }
}

/// What one delivery attempt came to, before the dead-letter queue is asked.
enum Tried {
    /// Azure has it.
    Delivered(String),
    /// Not now: again after this many seconds (or, after the last attempt, a dead letter).
    Later(u64, String),
    /// Never: a dead letter with this reason.
    Refused(String),
}

/// Seconds before a delivery the dead-letter queue did not take is tried again.
const DEAD_LETTER_RETRY_SECS: u64 = 10;

/// What a backend stores of a plan.
pub struct StoredPlan<'p, B> {
    pub request: &'p BackendRequest,
    pub body: OutBody<'p, B>,
    pub ids: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The gateway and its driver

/// A loaded policy and the isolate's shared state. One per isolate.
pub struct Gateway {
    prepared: Prepared,
    /// Key sets of JWT checks, by URL.
    jwks: RefCell<jwt::JwksCache>,
    /// SHA-256 of API keys held in Worker secrets, by secret name (hashed once per isolate).
    key_digests: RefCell<FastMap<String, Option<[u8; 32]>>>,
    /// The circuit breakers of backend hosts.
    breakers: RefCell<Breakers>,
}

/// A request that matched a route.
#[derive(Debug)]
pub struct Matched<'g> {
    pub route: &'g PreparedRoute,
    pub params: Vec<(String, String)>,
}

impl Gateway {
    pub fn new(prepared: Prepared) -> Gateway {
        Gateway {
            prepared,
            jwks: RefCell::new(jwt::JwksCache::new()),
            key_digests: RefCell::new(FastMap::default()),
            breakers: RefCell::new(Breakers::default()),
        }
    }

    /// Compiles `policy.json` text (as build.rs does) and loads the result: for tests and tools.
    #[cfg(feature = "compile")]
    pub fn load(text: &str) -> Result<Gateway, Vec<crate::policy::PolicyError>> {
        crate::policy::compile(text).map(Gateway::new)
    }

    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }

    /// Runs one request through every phase. Returns the caller's answer and the request's one
    /// log line.
    pub async fn handle<'r, I: Io>(
        &'r self,
        head: &'r RequestHead,
        io: &I,
    ) -> (Answer<I::Stream>, String) {
        let started = io.now();
        // 1. request id
        let request_id = match request_id(head.header("x-request-id")) {
            Some(id) => id.to_owned(),
            None => io.uuid(),
        };
        let mut cx = Cx {
            head,
            request_id,
            route: None,
            params: Vec::new(),
            query: crate::encoding::query_pairs(&head.query),
            api_key: None,
            claims: None,
            log: LogFields::default(),
        };
        let mut cors = Vec::new();
        let mut answer = match self.phases(&mut cx, &mut cors, io).await {
            Ok(answer) => answer,
            Err(problem) => {
                cx.log.problem = Some(problem.kind);
                Answer::problem(&problem, &head.path, &cx.request_id)
            }
        };
        answer.headers.push(("x-request-id", cx.request_id.clone()));
        answer.headers.extend(cors);
        // 11. log
        let line = log_line(&cx, answer.status, io.now() - started);
        (answer, line)
    }

    /// Phases 2 to 10.
    async fn phases<'r, I: Io>(
        &'r self,
        cx: &mut Cx<'r>,
        cors: &mut Vec<(&'static str, String)>,
        io: &I,
    ) -> Result<Answer<I::Stream>, Problem> {
        let head = cx.head;
        // 2. preflight
        if head.method == "OPTIONS" {
            if let Some(requested) = head.header("access-control-request-method") {
                return self.preflight(cx, requested);
            }
        }
        // 3. route
        let matched = self.route(&head.method, &head.path)?;
        let route = matched.route;
        cx.route = Some(route);
        cx.params = matched.params;
        let inbound = &route.inbound;
        if let Some(policy) = &inbound.cors {
            *cors = inbound::cors::response_headers(policy, head.header("origin"));
        }
        // 4. cheap checks
        let client_ip = head.header("cf-connecting-ip");
        let content_length = head.content_length();
        let header = |name: &str| head.header(name).map(str::to_owned);
        let facts = inbound::RequestFacts {
            client_ip,
            content_length,
            has_body: head.has_body && content_length != Some(0),
            content_type: head.header("content-type"),
            header: &header,
        };
        inbound::check_request(inbound, route.ip.as_ref(), &facts)?;
        // 5. credentials
        if let Some(check) = &route.api_key {
            let name = inbound::api_key::check(check, head.header(&check.header), |secret| {
                self.secret_digest(secret, io)
            })?;
            cx.api_key = Some(name.to_owned());
        }
        if let Some(check) = &inbound.jwt {
            cx.claims = Some(
                self.validate_jwt(check, head.header("authorization"), io)
                    .await?,
            );
        }
        // 6. rate limit
        if let Some(limit) = &inbound.rate_limit {
            let subject = cx
                .claims
                .as_ref()
                .and_then(|c| c.get("sub"))
                .and_then(Value::as_str);
            let who =
                inbound::rate_limit_subject(limit.key, cx.api_key.as_deref(), subject, client_ip)?;
            match io
                .rate_limit(&limit.binding, &format!("{}:{who}", route.name))
                .await
            {
                Ok(true) => {}
                Ok(false) => return Err(inbound::rate_limited(limit)),
                Err(missing) => return Err(inbound::rate_limit_unavailable(missing)),
            }
        }
        // 7–10: the backend, with the token in between.
        match &route.backend {
            PreparedBackend::ServiceBus(sb) => self.call(sb, &sb.token, cx, io).await,
            PreparedBackend::Blob(b) => self.call(b, &b.token, cx, io).await,
            PreparedBackend::EventHubs(eh) => self.call(eh, &eh.token, cx, io).await,
            PreparedBackend::StorageQueue(q) => self.call(q, &q.token, cx, io).await,
            PreparedBackend::AzureRest(r) => self.call(r, &r.token, cx, io).await,
            PreparedBackend::AzureOperation(op) => {
                // 7. build: the handle opened; the call is the route's that started it.
                let (rest, plan) = azure_rest::build_operation(op, &self.prepared.routes, cx, io)?;
                self.call_planned(rest, &rest.token, plan, cx, io).await
            }
        }
    }

    /// Phases 7 to 10 for one backend.
    async fn call<B: Backend, I: Io>(
        &self,
        backend: &B,
        target: &TokenTarget,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Answer<I::Stream>, Problem> {
        // 7. build
        let plan = backend.build(cx, io).await?;
        self.call_planned(backend, target, plan, cx, io).await
    }

    /// Phases 8 to 10 for a built plan.
    async fn call_planned<B: Backend, I: Io>(
        &self,
        backend: &B,
        target: &TokenTarget,
        plan: B::Plan<I::Bytes>,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Answer<I::Stream>, Problem> {
        // 8. breaker and token
        let resource = resource_of(&backend.request(&plan).url);
        let (call, admitted, grant) = match self.admit_and_grant(target, resource, cx, io).await {
            Ok(granted) => granted,
            Err((problem, true)) => return self.store(backend, &plan, problem, cx, io).await,
            Err((problem, false)) => return Err(problem),
        };
        // 9. send
        let bearer = Bearer::new(target, &grant);
        let sent = backend.send(&plan, &bearer, cx, io).await;
        let outcome = self.settle(cx, &call, admitted, sent.as_ref().err(), io);
        let reply = match sent {
            Ok(reply) => reply,
            // Unavailable: a storing route keeps it. Not an unknown outcome: Azure may have it.
            Err(problem)
                if matches!(outcome, Outcome::Failed { .. }) && problem.kind != UNKNOWN =>
            {
                return self.store(backend, &plan, problem, cx, io).await
            }
            Err(problem) => return Err(problem),
        };
        // 10. answer
        Ok(backend.answer(&plan, reply, cx))
    }

    /// Phase 8: the circuit breakers (calls recently found failing are not made: fail fast,
    /// then probes after the cool-down; see [`crate::breaker`] for who is refused on whose
    /// failures), then the identity's token. An error says whether the request may be stored
    /// (Azure or the identity provider unavailable).
    async fn admit_and_grant<I: Io>(
        &self,
        target: &TokenTarget,
        resource: &str,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<(Call, Admission, Grant), (Problem, bool)> {
        let route = cx
            .route
            .ok_or_else(|| (Problem::internal("no route"), false))?;
        let (call, admitted) = {
            let mut breakers = self.breakers.borrow_mut();
            let call = breakers.call(
                &route.name,
                &route.host,
                breaker_caller(cx),
                resource,
                || io.random(),
            );
            (call, breakers.admit(&call, &route.breaker, io.now()))
        };
        if route.breaker.failures > 0 {
            cx.log.breaker = Some(admitted.log_state());
            cx.log.breaker_scope = admitted.scope().map(|s| s.name());
        }
        if let Admission::Open { retry_in_ms, scope } = admitted {
            return Err((circuit_open(retry_in_ms, scope), true));
        }
        cx.log.identity = Some(target.identity.clone());
        match io.token(target).await {
            Ok(grant) => {
                cx.log.token = Some(grant.source);
                cx.log.idp_ms = grant.idp_ms;
                cx.log.token_ttl_s = Some((grant.token.expires_at - io.now()) / 1000.0);
                Ok((call, admitted, grant))
            }
            Err(no) => {
                self.settle(cx, &call, admitted, None, io);
                cx.log.token_error = Some(no.log);
                // The identity provider is unavailable (no token cached): may be stored. A
                // refused credential is not a reason to store anything.
                let storable = no.problem.status == 503;
                Err((no.problem, storable))
            }
        }
    }

    /// Tells the breakers how the call went (`failed`: the send's problem, if any; a call that
    /// never went out says nothing), and returns the outcome.
    fn settle<I: Io>(
        &self,
        cx: &Cx<'_>,
        call: &Call,
        admitted: Admission,
        failed: Option<&Problem>,
        io: &I,
    ) -> Outcome {
        let outcome = match failed {
            // A failed call that streamed the caller's body may be the caller's doing: a client
            // that stalls or breaks its uploads must not open a breaker, even its own.
            Some(_) if cx.log.caller_stream => Outcome::NotSent,
            // An unknown outcome whose last answer was Azure's own refusal (a create-only write
            // that found its lost attempt's blob: 409): Azure answered.
            Some(p) if p.kind == UNKNOWN && cx.log.backend_status.is_some_and(|s| s < 500) => {
                Outcome::Answered
            }
            Some(p) if matches!(p.kind, "backend-unavailable" | "backend-timeout" | UNKNOWN) => {
                Outcome::Failed {
                    retry_after_ms: asked_ms(cx.log.retry_after),
                }
            }
            Some(p) if p.kind == "unsendable-value" => Outcome::NotSent,
            _ if cx.log.token.is_none() => Outcome::NotSent,
            _ => Outcome::Answered,
        };
        if let Some(route) = cx.route {
            let counted = if cx.log.batch_follower {
                Outcome::NotSent
            } else {
                outcome
            };
            self.breakers
                .borrow_mut()
                .record(call, &route.breaker, admitted, counted, io.now());
        }
        outcome
    }

    /// Azure is unavailable for this call: a route that stores requests puts it on its queue
    /// and answers 202 `queued`; otherwise (or when it cannot be stored) `problem` stands.
    async fn store<B: Backend, I: Io>(
        &self,
        backend: &B,
        plan: &B::Plan<I::Bytes>,
        problem: Problem,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Answer<I::Stream>, Problem> {
        if cx.route.is_none_or(|r| r.store.is_none()) {
            return Err(problem);
        }
        self.enqueue(backend.stored(plan), problem, cx, io).await?;
        Ok(backend.queued(plan))
    }

    /// Puts a stored request on the route's queue; `problem` stands when it cannot be.
    async fn enqueue<I: Io>(
        &self,
        stored: Option<StoredPlan<'_, I::Bytes>>,
        problem: Problem,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<(), Problem> {
        let (Some(route), Some(stored)) = (cx.route, stored) else {
            cx.log.stored = Some(format!(
                "not stored: the body was streamed to Azure (only bodies of at most {} bytes, of known length, are held to be stored)",
                crate::store::MAX_STORED_BODY_BYTES
            ));
            return Err(problem);
        };
        let Some(binding) = &route.store else {
            return Err(problem);
        };
        let description = crate::store::Stored::new(
            &route.name,
            &cx.request_id,
            stored.request,
            stored.ids,
            io.now(),
        );
        let text = serde_json::to_string(&description).unwrap_or_default();
        match io
            .enqueue(
                binding,
                &text,
                stored.body,
                crate::store::MAX_STORED_BODY_BYTES,
            )
            .await
        {
            Ok(()) => {
                cx.log.stored = Some("queued".to_owned());
                cx.log.problem_avoided = Some(problem.kind);
                Ok(())
            }
            Err(why) => {
                cx.log.stored = Some(format!("not stored: {why}"));
                Err(problem)
            }
        }
    }

    /// Delivers one stored request (store-and-forward's consumer): the request its route sends
    /// (checked against the route as it is in the current policy), with a fresh token, through
    /// the route's circuit breaker. `attempt` counts from 1. A delivery that cannot succeed
    /// (Azure refuses it, its route is gone or changed, it is not a request its route sends, or
    /// its last attempt failed) is put on the dead-letter queue with its reason. Returns what
    /// became of it and the delivery's one log line.
    pub async fn deliver<I: Io>(
        &self,
        stored: &str,
        body: OutBody<'_, I::Bytes>,
        attempt: u32,
        io: &I,
    ) -> (crate::store::Delivered, String) {
        use crate::store::{Delivered, Stored};
        let started = io.now();
        let mut log = LogFields::default();
        let parsed: Option<Stored> = serde_json::from_str(stored).ok();
        let tried = match &parsed {
            None => Tried::Refused("it is not a stored request this gateway can read".to_owned()),
            Some(s) => self.deliver_stored(s, body, io, &mut log).await,
        };
        let last = attempt >= self.prepared.max_delivery_attempts;
        let (outcome, state, why) = match tried {
            Tried::Delivered(why) => (Delivered::Yes, "delivered", why),
            Tried::Later(secs, why) if !last => (Delivered::Later(secs), "retry", why),
            Tried::Later(_, why) => {
                let why = format!("its last attempt ({attempt}) failed: {why}");
                self.dead_letter(why, parsed.as_ref(), attempt, last, &log, io)
                    .await
            }
            Tried::Refused(why) => {
                self.dead_letter(why, parsed.as_ref(), attempt, last, &log, io)
                    .await
            }
        };
        #[derive(serde::Serialize)]
        struct Line<'a> {
            level: &'static str,
            kind: &'static str,
            request_id: Option<&'a str>,
            route: Option<&'a str>,
            ids: Option<&'a [String]>,
            attempt: u32,
            outcome: &'static str,
            reason: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            backend_status: Option<u16>,
            #[serde(skip_serializing_if = "Option::is_none")]
            backend_detail: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            breaker: Option<&'static str>,
            stored_ms: Option<f64>,
            duration_ms: f64,
        }
        let line = serde_json::to_string(&Line {
            level: match state {
                "delivered" => "info",
                "retry" => "warn",
                _ => "error",
            },
            kind: "delivery",
            request_id: parsed.as_ref().map(|s| s.request_id.as_str()),
            route: parsed.as_ref().map(|s| s.route.as_str()),
            ids: parsed.as_ref().map(|s| s.ids.as_slice()),
            attempt,
            outcome: state,
            reason: &why,
            backend_status: log.backend_status,
            backend_detail: log.backend_detail.as_deref(),
            breaker: log.breaker,
            stored_ms: parsed
                .as_ref()
                .map(|s| (started - s.stored_at).max(0.0).floor()),
            duration_ms: io.now() - started,
        })
        .unwrap_or_default();
        (outcome, line)
    }

    async fn deliver_stored<I: Io>(
        &self,
        stored: &crate::store::Stored,
        body: OutBody<'_, I::Bytes>,
        io: &I,
        log: &mut LogFields,
    ) -> Tried {
        let Some(route) = self.prepared.routes.iter().find(|r| r.name == stored.route) else {
            return Tried::Refused(format!(
                "its route {} is no longer in the policy",
                crate::store::shown(&stored.route)
            ));
        };
        // Only what the route sends today: a policy changed since, or another producer bound to
        // the queue, must not make the gateway send anything else, anywhere else.
        let request = match stored.request_for(route, io.now()) {
            Ok(request) => request,
            Err(why) => return Tried::Refused(why),
        };
        let (target, created_ok) = match &route.backend {
            PreparedBackend::ServiceBus(sb) => (&sb.token, false),
            PreparedBackend::Blob(b) => (&b.token, true),
            _ => {
                return Tried::Refused(format!(
                    "route \"{}\" is no longer a Service Bus or blob route",
                    route.name
                ))
            }
        };
        // Deliveries are the gateway's own calls: one caller, whose failures count for at most
        // half of what opens a breaker shared with the callers.
        let (call, admitted) = {
            let mut breakers = self.breakers.borrow_mut();
            let call = breakers.call(
                &route.name,
                &route.host,
                Caller::Gateway,
                resource_of(&request.url),
                || io.random(),
            );
            (call, breakers.admit(&call, &route.breaker, io.now()))
        };
        log.breaker = Some(admitted.log_state());
        log.breaker_scope = admitted.scope().map(|s| s.name());
        if let Admission::Open { retry_in_ms, scope } = admitted {
            let secs = (retry_in_ms / 1000.0).ceil().max(1.0) as u64;
            return Tried::Later(
                secs,
                format!("the backend's circuit breaker ({}) is open", scope.name()),
            );
        }
        let record = |outcome: Outcome| {
            self.breakers
                .borrow_mut()
                .record(&call, &route.breaker, admitted, outcome, io.now())
        };
        let grant = match io.token(target).await {
            Ok(grant) => grant,
            Err(no) => {
                record(Outcome::NotSent);
                return Tried::Later(10, format!("no token: {}", no.log));
            }
        };
        let bearer = Bearer::new(target, &grant);
        let limit = Limit::Deadline(30_000.0);
        let sent =
            match crate::backend::send_renewing(io, &request, &bearer, body, limit, log).await {
                Ok(sent) => sent,
                Err(problem) => {
                    record(Outcome::NotSent);
                    return Tried::Later(10, problem.detail);
                }
            };
        match sent {
            Ok(reply) => {
                let status = reply.status;
                log.backend_status = Some(status);
                let code = reply.header("x-ms-error-code").map(str::to_owned);
                let retry_after = crate::retry::parse_retry_after_secs(reply.header("retry-after"));
                if status >= 300 {
                    let text = crate::backend::answer_text(io, reply.body)
                        .await
                        .unwrap_or_else(|note| note);
                    let detail = code.unwrap_or_else(|| text.chars().take(300).collect());
                    log.backend_detail = Some(crate::backend::log_detail(&detail));
                } else {
                    crate::backend::drain(io, reply.body).await;
                }
                if (200..300).contains(&status) {
                    record(Outcome::Answered);
                    Tried::Delivered(format!("Azure answered {status}"))
                } else if created_ok && (status == 409 || status == 412) {
                    // Create-only: the name exists, written by an earlier attempt of this
                    // delivery (or, if another write took the name, by that one).
                    record(Outcome::Answered);
                    Tried::Delivered(format!(
                        "the blob exists already ({status}): written by an earlier attempt"
                    ))
                } else if status == 429 || status >= 500 {
                    record(Outcome::Failed {
                        retry_after_ms: asked_ms(retry_after),
                    });
                    Tried::Later(
                        crate::retry::caller_retry_after(retry_after),
                        format!("Azure answered {status}"),
                    )
                } else {
                    record(Outcome::Answered);
                    Tried::Refused(format!("Azure refused it ({status})"))
                }
            }
            Err(SendError::Unsendable(problem)) => {
                record(Outcome::NotSent);
                Tried::Refused(problem.detail)
            }
            Err(e) => {
                record(Outcome::Failed {
                    retry_after_ms: None,
                });
                Tried::Later(5, format!("Azure could not be reached ({e})"))
            }
        }
    }

    /// Puts a delivery that cannot succeed on the dead-letter queue with its reason; when the
    /// dead-letter queue does not take it, the message stays on the deliveries queue.
    async fn dead_letter<I: Io>(
        &self,
        why: String,
        stored: Option<&crate::store::Stored>,
        attempt: u32,
        last: bool,
        log: &LogFields,
        io: &I,
    ) -> (crate::store::Delivered, &'static str, String) {
        use crate::store::{DeadLetter, Delivered};
        let letter = DeadLetter {
            reason: why.clone(),
            route: stored.map(|s| s.route.clone()),
            request_id: stored.map(|s| s.request_id.clone()),
            ids: stored.map(|s| s.ids.clone()),
            attempts: attempt,
            at: crate::time::Utc::from_millis(io.now()).format("%Y-%m-%dT%H:%M:%SZ"),
            backend_status: log.backend_status,
            backend_detail: log.backend_detail.clone(),
        };
        let letter = serde_json::to_string(&letter).unwrap_or_default();
        match io
            .dead_letter(&self.prepared.dead_letter_binding, &letter)
            .await
        {
            Ok(()) => (Delivered::DeadLettered, "dead_lettered", why),
            // Not lost: the queue keeps it and tries it again, and after its last attempt moves
            // it to the dead-letter queue itself (without the reason, which is in this line).
            Err(not) => (
                Delivered::Later(DEAD_LETTER_RETRY_SECS),
                if last { "dead_letter_by_queue" } else { "retry" },
                format!("{why}; the dead-letter queue did not take it ({not}), so it stays on the queue"),
            ),
        }
    }

    /// Phase 3: the route for a method and a raw path (without query string).
    pub fn route(&self, method: &str, raw_path: &str) -> Result<Matched<'_>, Problem> {
        match self.prepared.router.find(method, raw_path) {
            RouteMatch::Found { route, params } => match self.prepared.routes.get(route) {
                Some(route) => Ok(Matched { route, params }),
                None => Err(Problem::not_found(raw_path)),
            },
            RouteMatch::MethodNotAllowed { allow } => {
                let allow: Vec<&str> = allow.iter().map(|m| m.as_str()).collect();
                Err(Problem::method_not_allowed(method, &allow.join(", ")))
            }
            RouteMatch::NotFound => Err(Problem::not_found(raw_path)),
            RouteMatch::BadPath => Err(Problem::bad_path()),
        }
    }

    /// The route a CORS preflight asks about (`Access-Control-Request-Method` on this path). A
    /// path the gateway has but not for that method is a CORS refusal (403 `cors-rejected`, as
    /// for any method, origin or header the route does not allow cross-origin), not a 405: the
    /// preflight itself, an OPTIONS, is what the browser sent.
    pub fn preflight_route(&self, requested: &str, raw_path: &str) -> Result<Matched<'_>, Problem> {
        self.route(requested, raw_path).map_err(|p| {
            if p.status == 405 {
                Problem::new(
                    403,
                    "cors-rejected",
                    "Cross-origin request not allowed",
                    format!("{requested} is not a method of this route, so browsers may not send it cross-origin."),
                )
            } else {
                p
            }
        })
    }

    /// Phase 2: a preflight, answered for the route the browser means to call.
    fn preflight<'r, S>(&'r self, cx: &mut Cx<'r>, requested: &str) -> Result<Answer<S>, Problem> {
        let head = cx.head;
        let matched = self.preflight_route(requested, &head.path)?;
        cx.route = Some(matched.route);
        let cors = matched.route.inbound.cors.as_ref().ok_or_else(|| {
            Problem::new(
                403,
                "cors-rejected",
                "Cross-origin request not allowed",
                "This route does not accept cross-origin requests from browsers.",
            )
        })?;
        let headers = inbound::cors::preflight(
            cors,
            &matched.route.methods,
            head.header("origin"),
            requested,
            head.header("access-control-request-headers"),
        )?;
        Ok(Answer {
            status: 204,
            headers,
            body: AnswerBody::Empty,
        })
    }

    /// The SHA-256 of the API key in a Worker secret: read and hashed once per isolate.
    fn secret_digest<I: Io>(&self, name: &str, io: &I) -> Option<[u8; 32]> {
        if let Some(known) = self.key_digests.borrow().get(name) {
            return *known;
        }
        let digest = io
            .secret(name)
            .map(|value| crate::sha256::sha256(value.as_bytes()));
        self.key_digests
            .borrow_mut()
            .insert(name.to_owned(), digest);
        digest
    }

    /// Phase 5's JWT check: parse, the key from the isolate's key sets (fetched once for all
    /// callers when missing, again at most once a minute for an unknown `kid`), the signature,
    /// the claims.
    async fn validate_jwt<I: Io>(
        &self,
        check: &crate::policy::JwtCheck,
        authorization: Option<&str>,
        io: &I,
    ) -> Result<Map<String, Value>, Problem> {
        let token = jwt::bearer_token(authorization)?;
        jwt::validate(
            token,
            check,
            io.now(),
            async |parsed: &jwt::Parsed| self.jwt_key(check, parsed, io).await,
            async |alg, jwk: &Value, input: &[u8], signature: &[u8]| {
                io.verify(alg, jwk, input, signature).await
            },
        )
        .await
    }

    async fn jwt_key<I: Io>(
        &self,
        check: &crate::policy::JwtCheck,
        parsed: &jwt::Parsed,
        io: &I,
    ) -> Result<Value, Problem> {
        enum Next {
            Found(Option<Value>),
            Lead,
            Wait,
            Failed,
        }
        let started = io.now();
        loop {
            let now = io.now();
            let next = {
                let mut cache = self.jwks.borrow_mut();
                let next = match cache.lookup(check, now) {
                    jwt::JwksLookup::Fresh(jwks) => {
                        Next::Found(jwt::select_key(jwks, parsed).cloned())
                    }
                    jwt::JwksLookup::Failed => Next::Failed,
                    jwt::JwksLookup::Missing | jwt::JwksLookup::Expired => Next::Wait,
                };
                match next {
                    Next::Wait if cache.claim_fetch(check, now) => Next::Lead,
                    next => next,
                }
            };
            match next {
                Next::Found(Some(jwk)) => return Ok(jwk),
                // The issuer may have rotated its keys: fetch again, at most once a minute.
                Next::Found(None) => {
                    if !self
                        .jwks
                        .borrow_mut()
                        .may_refetch_for_unknown_kid(check, now)
                    {
                        return Err(jwt::no_key());
                    }
                    let jwks = self.fetch_jwks(check, io).await?;
                    return jwt::select_key(&jwks, parsed)
                        .cloned()
                        .ok_or_else(jwt::no_key);
                }
                Next::Lead => {
                    let jwks = self.fetch_jwks(check, io).await?;
                    return jwt::select_key(&jwks, parsed)
                        .cloned()
                        .ok_or_else(jwt::no_key);
                }
                Next::Failed => return Err(jwt::jwks_unavailable("a recent fetch failed")),
                Next::Wait if now - started > jwt::JWKS_LEADER_TIMEOUT_MS => {
                    return Err(jwt::jwks_unavailable("the key set fetch took too long"))
                }
                // Another request is fetching the key set: look again shortly.
                Next::Wait => io.sleep(5.0).await,
            }
        }
    }

    async fn fetch_jwks<I: Io>(
        &self,
        check: &crate::policy::JwtCheck,
        io: &I,
    ) -> Result<Value, Problem> {
        let result = io
            .fetch_jwks(&check.jwks_url, jwt::MAX_JWKS_BYTES)
            .await
            .and_then(|body| {
                jwt::parse_jwks(&body)
                    .ok_or("the key set URL answered something that is not a key set")
            });
        let now = io.now();
        let mut cache = self.jwks.borrow_mut();
        match &result {
            Ok(jwks) => cache.store(check, jwks.clone(), now),
            Err(_) => cache.fail(check, now),
        }
        result.map_err(jwt::jwks_unavailable)
    }
}

impl Backend for crate::policy::prepared::PreparedServiceBus {
    type Plan<B> = service_bus::Plan<B>;

    async fn build<I: Io>(&self, cx: &mut Cx<'_>, io: &I) -> Result<Self::Plan<I::Bytes>, Problem> {
        service_bus::build(self, cx, io).await
    }

    async fn send<I: Io>(
        &self,
        plan: &Self::Plan<I::Bytes>,
        bearer: &Bearer<'_>,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Reply<I::Stream>, Problem> {
        service_bus::send(self, plan, bearer, cx, io).await
    }

    fn answer<B, S>(&self, plan: &Self::Plan<B>, _reply: Reply<S>, _cx: &Cx<'_>) -> Answer<S> {
        service_bus::answer(self, plan)
    }

    fn request<'p, B>(&self, plan: &'p Self::Plan<B>) -> &'p BackendRequest {
        plan.request()
    }

    fn stored<'p, B>(&self, plan: &'p Self::Plan<B>) -> Option<StoredPlan<'p, B>> {
        service_bus::stored(self, plan)
    }

    fn queued<B, S>(&self, plan: &Self::Plan<B>) -> Answer<S> {
        service_bus::queued(self, plan)
    }
}

impl Backend for crate::policy::prepared::PreparedBlob {
    type Plan<B> = blob::Plan<B>;

    async fn build<I: Io>(&self, cx: &mut Cx<'_>, io: &I) -> Result<Self::Plan<I::Bytes>, Problem> {
        blob::build(self, cx, io).await
    }

    async fn send<I: Io>(
        &self,
        plan: &Self::Plan<I::Bytes>,
        bearer: &Bearer<'_>,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Reply<I::Stream>, Problem> {
        blob::send(self, plan, bearer, cx, io).await
    }

    fn answer<B, S>(&self, plan: &Self::Plan<B>, reply: Reply<S>, cx: &Cx<'_>) -> Answer<S> {
        blob::answer(self, plan, reply, cx)
    }

    fn request<'p, B>(&self, plan: &'p Self::Plan<B>) -> &'p BackendRequest {
        plan.request()
    }

    fn stored<'p, B>(&self, plan: &'p Self::Plan<B>) -> Option<StoredPlan<'p, B>> {
        blob::stored(plan)
    }

    fn queued<B, S>(&self, plan: &Self::Plan<B>) -> Answer<S> {
        blob::queued(self, plan)
    }
}

impl Backend for crate::policy::prepared::PreparedRest {
    type Plan<B> = azure_rest::Plan<B>;

    async fn build<I: Io>(&self, cx: &mut Cx<'_>, io: &I) -> Result<Self::Plan<I::Bytes>, Problem> {
        azure_rest::build(self, cx, io).await
    }

    async fn send<I: Io>(
        &self,
        plan: &Self::Plan<I::Bytes>,
        bearer: &Bearer<'_>,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Reply<I::Stream>, Problem> {
        azure_rest::send(self, plan, bearer, cx, io).await
    }

    fn answer<B, S>(&self, plan: &Self::Plan<B>, reply: Reply<S>, cx: &Cx<'_>) -> Answer<S> {
        azure_rest::answer(self, plan, reply, cx)
    }

    fn request<'p, B>(&self, plan: &'p Self::Plan<B>) -> &'p BackendRequest {
        plan.request()
    }
}

/// The problem kind of a call whose outcome is unknown ([`crate::backend::outcome_unknown`]).
const UNKNOWN: &str = "backend-outcome-unknown";

/// A call not made: recent calls in `scope` found Azure unavailable.
fn circuit_open(retry_in_ms: f64, scope: Scope) -> Problem {
    let seconds = (retry_in_ms / 1000.0).ceil().max(1.0) as u64;
    let whose = match scope {
        Scope::CallerResource => "Your recent calls for this resource found Azure unavailable, so the gateway is not calling Azure for it on your behalf",
        Scope::Caller => "Your recent calls on this route found Azure unavailable for several resources, so the gateway is not calling Azure on this route on your behalf",
        Scope::Resource => "Recent calls of several callers for this resource found Azure unavailable, so the gateway is not calling Azure for it",
        Scope::Route => "Recent calls of several callers on this route found Azure unavailable, so the gateway is not calling Azure on this route",
        Scope::Host => "Recent calls of several callers found this Azure service unavailable, so the gateway is not calling it",
    };
    Problem::new(
        503,
        "backend-circuit-open",
        "Azure is unavailable",
        format!("{whose} for {seconds} s; nothing was sent. Retry after the time in Retry-After."),
    )
    .with_header("retry-after", seconds.to_string())
    .with_extension("breaker_scope", Value::from(scope.name()))
}

/// What Azure asked for, as the breakers honour it (clamped like a caller's `Retry-After`).
fn asked_ms(retry_after: Option<u64>) -> Option<f64> {
    retry_after.map(|s| crate::retry::caller_retry_after(Some(s)) as f64 * 1000.0)
}

/// The resource a backend URL names, as the breakers count it: its path, without the query.
fn resource_of(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let rest = url.get(after_scheme..).unwrap_or("");
    let path = rest.find('/').map_or("", |i| rest.get(i..).unwrap_or(""));
    path.split('?').next().unwrap_or(path)
}

/// Who is calling, as the breakers tell callers apart: the API key's name, else the token's
/// issuer and subject, else the client address.
fn breaker_caller<'c>(cx: &'c Cx<'_>) -> Caller<'c> {
    if let Some(name) = cx.api_key.as_deref() {
        return Caller::ApiKey(name);
    }
    let claim = |name: &str| {
        cx.claims
            .as_ref()
            .and_then(|c| c.get(name))
            .and_then(Value::as_str)
    };
    if let Some(subject) = claim("sub").filter(|s| !s.is_empty()) {
        return Caller::Subject {
            issuer: claim("iss").unwrap_or(""),
            subject,
        };
    }
    match cx
        .head
        .header("cf-connecting-ip")
        .filter(|ip| !ip.is_empty())
    {
        Some(ip) => Caller::Address(ip),
        None => Caller::Unknown,
    }
}

/// Phase 1: the caller's request id, when it is one we can safely echo and log: 1 to 128
/// characters of letters, digits and `-._:`. Anything else is replaced by a generated id.
pub fn request_id(header: Option<&str>) -> Option<&str> {
    header.filter(|id| {
        (1..=128).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    })
}

/// Phase 11: the one JSON log line of a request.
fn log_line(cx: &Cx<'_>, status: u16, duration_ms: f64) -> String {
    let log = &cx.log;
    let mut line = crate::encoding::JsonObject::with_capacity(256);
    line.str("level", if status >= 500 { "error" } else { "info" })
        .str("request_id", &cx.request_id)
        .str("method", &cx.head.method)
        // No query string: queries may carry things not meant for logs.
        .str("path", &cx.head.path)
        .str_or_null("route", cx.route.map(|r| r.name.as_str()))
        .uint("status", u64::from(status))
        .float("duration_ms", duration_ms)
        .opt_str("problem", log.problem)
        .opt_str("api_key", cx.api_key.as_deref())
        .opt_str("identity", log.identity.as_deref())
        .opt_str("token", log.token);
    if let Some(ms) = log.idp_ms {
        line.float("idp_ms", ms);
    }
    if let Some(ttl) = log.token_ttl_s {
        line.float("token_ttl_s", ttl.floor());
    }
    line.opt_str("token_error", log.token_error.as_deref());
    if log.token_renewed {
        line.bool("token_renewed", true);
    }
    line.opt_str("breaker", log.breaker)
        .opt_str("breaker_scope", log.breaker_scope)
        .opt_str("stored", log.stored.as_deref())
        .opt_str("unavailable", log.problem_avoided);
    if let Some(status) = log.backend_status {
        line.uint("backend_status", u64::from(status));
    }
    line.opt_str("backend_detail", log.backend_detail.as_deref());
    if let Some((size, leader)) = &log.batch {
        line.uint("batch", *size as u64).str("batch_leader", leader);
    }
    line.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log line as serde_json's derive wrote it before [`log_line`] wrote it by hand.
    fn reference_line(cx: &Cx<'_>, status: u16, duration_ms: f64) -> String {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            level: &'static str,
            request_id: &'a str,
            method: &'a str,
            path: &'a str,
            route: Option<&'a str>,
            status: u16,
            duration_ms: f64,
            #[serde(skip_serializing_if = "Option::is_none")]
            problem: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            api_key: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            identity: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            token: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            idp_ms: Option<f64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            token_ttl_s: Option<f64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            token_error: Option<&'a str>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            token_renewed: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            breaker: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            breaker_scope: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            stored: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            unavailable: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            backend_status: Option<u16>,
            #[serde(skip_serializing_if = "Option::is_none")]
            backend_detail: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            batch: Option<usize>,
            #[serde(skip_serializing_if = "Option::is_none")]
            batch_leader: Option<&'a str>,
        }
        let log = &cx.log;
        serde_json::to_string(&Line {
            level: if status >= 500 { "error" } else { "info" },
            request_id: &cx.request_id,
            method: &cx.head.method,
            path: &cx.head.path,
            route: cx.route.map(|r| r.name.as_str()),
            status,
            duration_ms,
            problem: log.problem,
            api_key: cx.api_key.as_deref(),
            identity: log.identity.as_deref(),
            token: log.token,
            idp_ms: log.idp_ms,
            token_ttl_s: log.token_ttl_s.map(f64::floor),
            token_error: log.token_error.as_deref(),
            token_renewed: log.token_renewed,
            breaker: log.breaker,
            breaker_scope: log.breaker_scope,
            stored: log.stored.as_deref(),
            unavailable: log.problem_avoided,
            backend_status: log.backend_status,
            backend_detail: log.backend_detail.as_deref(),
            batch: log.batch.as_ref().map(|(n, _)| *n),
            batch_leader: log.batch.as_ref().map(|(_, l)| l.as_str()),
        })
        .unwrap()
    }

    #[test]
    fn log_line_is_the_json_serde_wrote() {
        let strange = "a\"b\\c\nd\re\tf\u{1}\u{8}\u{c}\u{1f}\u{7f}é漢😀</script>";
        let head = RequestHead {
            method: "POST".into(),
            path: format!("/sb/{strange}"),
            ..Default::default()
        };
        let durations = [
            0.0,
            -0.0,
            1.0,
            12.0,
            2.5,
            -3.0,
            1e15,
            1e16,
            123456789.0,
            f64::NAN,
        ];
        for (i, duration) in durations.into_iter().enumerate() {
            let mut cx = Cx {
                head: &head,
                request_id: format!("req-{i}{strange}"),
                route: None,
                params: Vec::new(),
                query: Vec::new(),
                api_key: (i % 2 == 0).then(|| format!("key{strange}")),
                claims: None,
                log: LogFields::default(),
            };
            if i % 3 != 0 {
                cx.log = LogFields {
                    problem: Some("backend-unavailable"),
                    identity: Some("orders".into()),
                    token: Some("cache"),
                    idp_ms: Some(duration * 3.0),
                    token_ttl_s: Some(3599.7 + duration),
                    token_error: Some(format!("no {strange}")),
                    backend_status: Some(503),
                    backend_detail: Some(strange.into()),
                    token_renewed: i % 2 == 1,
                    breaker: Some("open"),
                    breaker_scope: Some("host"),
                    retry_after: Some(7),
                    stored: Some("queued".into()),
                    caller_stream: false,
                    problem_avoided: Some("backend-unavailable"),
                    batch: Some((i + 2, format!("leader{strange}"))),
                    batch_follower: i % 2 == 0,
                };
            }
            for status in [200, 404, 503] {
                assert_eq!(
                    log_line(&cx, status, duration),
                    reference_line(&cx, status, duration),
                    "duration {duration}, status {status}"
                );
            }
            let line: Value = serde_json::from_str(&log_line(&cx, 202, duration)).unwrap();
            assert_eq!(line["request_id"], Value::from(cx.request_id.clone()));
        }
    }

    #[test]
    fn the_head_reads_every_header_once_lowercase_first_value_first() {
        let wire = "POST\nhttps://gw.example/a%2Fb?x=1#f\n1\nX-Api-Key\nk:1\ncontent-type\napplication/json\naccept\n\nx-api-key\nsecond\nx-n\nvalé\ndangling";
        let head = RequestHead::from_wire(wire).unwrap();
        assert_eq!(
            (
                head.method.as_str(),
                head.path.as_str(),
                head.query.as_str()
            ),
            ("POST", "/a%2Fb", "x=1")
        );
        assert!(head.has_body);
        assert_eq!(head.header("x-api-key"), Some("k:1"));
        assert_eq!(
            head.header("X-Api-Key"),
            None,
            "names are looked up lowercase"
        );
        assert_eq!(head.header("content-type"), Some("application/json"));
        assert_eq!(head.header("accept"), Some(""));
        assert_eq!(head.header("x-n"), Some("valé"));
        assert_eq!(
            head.header("dangling"),
            None,
            "a name without a value is not a header"
        );
        let all: Vec<(&str, &str)> = head.headers.iter().collect();
        assert_eq!(all.len(), 5);
        assert_eq!(all[3], ("x-api-key", "second"));
        assert!(RequestHead::from_wire("GET\n/\n2").is_none());
    }

    #[test]
    fn request_id_keeps_sane_ids_only() {
        assert_eq!(
            request_id(Some("0af7651916cd43dd8448eb211c80319c")),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(request_id(Some("a b")), None);
        assert_eq!(request_id(Some("")), None);
        assert_eq!(request_id(Some("x\n{\"forged\":1}")), None);
        assert_eq!(request_id(Some(&"a".repeat(129))), None);
        assert_eq!(request_id(None), None);
    }

    #[test]
    fn the_request_head_is_read_from_one_string() {
        let wire = "POST\nhttps://gw.example.com/orders/a%2Fb?x=1&y=2#frag\n1\nContent-Type\napplication/json\nX-Api-Key\nk";
        let head = RequestHead::from_wire(wire).unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/orders/a%2Fb");
        assert_eq!(head.query, "x=1&y=2");
        assert!(head.has_body);
        assert_eq!(head.header("content-type"), Some("application/json"));
        assert_eq!(head.header("x-api-key"), Some("k"));
        let root = RequestHead::from_wire("GET\nhttp://h:8787\n0").unwrap();
        assert_eq!((root.path.as_str(), root.query.as_str()), ("/", ""));
        assert!(!root.has_body && root.headers.is_empty());
        // An empty header value is a value.
        let empty = RequestHead::from_wire("GET\nhttp://h/\n0\nx-empty\n").unwrap();
        assert_eq!(empty.header("x-empty"), Some(""));
        assert!(RequestHead::from_wire("not a head").is_none());
        assert!(RequestHead::from_wire("GET\nhttp://h/\nyes").is_none());
    }
}
