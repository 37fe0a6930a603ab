//! What the driver ([`crate::pipeline`]), the backends ([`crate::backend`]) and the edge
//! exchange: the request as the edge read it, a backend request and its reply, the token a
//! call carries ([`Bearer`]), the I/O the edge performs for the core ([`Io`]), the per-request
//! context ([`Cx`]) and its log fields, the caller's [`Answer`], and the [`Backend`] trait the
//! driver runs every backend through. The driver and the backends both stand on this module;
//! neither reads the other's file for these types.

use std::cell::{Cell, RefCell};

use serde_json::{Map, Value};

use crate::breaker::Caller;
use crate::identity::{Token, TokenKey};
use crate::policy::prepared::{PreparedRoute, TokenTarget};
use crate::policy::JwtAlgorithm;
use crate::problem::Problem;
use crate::template::RenderContext;

// ---------------------------------------------------------------------------------------------
// The request, and what goes to a backend and comes back

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

/// An HTTP request to a backend, without its body (the edge streams that) and without its
/// `Authorization` header (the edge adds the token when it sends).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BackendRequest {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// Reply headers (lowercase) the core reads besides the few every backend reads.
    pub reply_headers: Vec<String>,
}

// Headers may hold caller values: print the method and URL only.
impl std::fmt::Debug for BackendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl BackendRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
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

/// The token a call's requests carry. When a backend refuses it (401), the token is evicted
/// from the isolate's cache and, once per request, a fresh one is fetched (through the same
/// single-flight cache as any other) for the request to be sent again.
pub struct Bearer<'t> {
    pub target: &'t TokenTarget,
    token: RefCell<std::rc::Rc<str>>,
    renewed: Cell<bool>,
}

impl<'t> Bearer<'t> {
    pub fn new(target: &'t TokenTarget, grant: &Grant) -> Bearer<'t> {
        Bearer {
            target,
            token: RefCell::new(grant.token.access_token.clone()),
            renewed: Cell::new(false),
        }
    }

    /// The token to send now.
    pub fn token(&self) -> std::rc::Rc<str> {
        self.token.borrow().clone()
    }

    /// Whether this request already fetched a fresh token after a 401.
    pub fn renewed(&self) -> bool {
        self.renewed.get()
    }

    /// Drops the current token from the isolate's cache: a backend refused it.
    pub fn evict<I: Io>(&self, io: &I) {
        io.evict_token(&self.target.key, &self.token.borrow());
    }

    /// After a backend's 401: the refused token evicted and a fresh one fetched. Fails with the
    /// identity's problem when none can be had.
    pub(crate) async fn renew<I: Io>(&self, io: &I, log: &mut LogFields) -> Result<(), Problem> {
        self.evict(io);
        self.renewed.set(true);
        log.token_renewed = true;
        match io.token(self.target).await {
            Ok(grant) => {
                *self.token.borrow_mut() = grant.token.access_token;
                Ok(())
            }
            Err(no) => {
                log.token_error = Some(no.log);
                Err(no.problem)
            }
        }
    }
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
    /// Fills `out` from the platform's CSPRNG (`crypto.getRandomValues`): for nonces.
    fn fill_random(&self, out: &mut [u8]);
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

    pub(crate) fn problem(problem: &Problem, instance: &str, request_id: &str) -> Answer<S> {
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

    /// Who is calling, as the breakers tell callers apart: the API key's name, else the token's
    /// issuer and subject, else the client address.
    pub fn breaker_caller(&self) -> Caller<'_> {
        if let Some(name) = self.api_key.as_deref() {
            return Caller::ApiKey(name);
        }
        let claim = |name: &str| {
            self.claims
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
        match self
            .head
            .header("cf-connecting-ip")
            .filter(|ip| !ip.is_empty())
        {
            Some(ip) => Caller::Address(ip),
            None => Caller::Unknown,
        }
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
    /// A valet-key route: where its user delegation key came from (`cache`, `fetched`,
    /// `waited`, `refreshed`, `cache_refresh_failed`).
    pub key: Option<&'static str>,
    /// A valet-key route: what the URL it answered with allows.
    pub minted: Option<Minted>,
}

/// What the log line says of a minted URL: never the URL or its signature.
#[derive(Debug, Clone)]
pub struct Minted {
    pub blob: String,
    pub permission: &'static str,
    pub expires: String,
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

/// What a backend stores of a plan.
pub struct StoredPlan<'p, B> {
    pub request: &'p BackendRequest,
    pub body: OutBody<'p, B>,
    pub ids: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
