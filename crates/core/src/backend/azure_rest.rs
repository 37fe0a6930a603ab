//! The `azure_rest` backend: a caller's request becomes one request to an Azure REST API, with
//! the identity's token, and Azure's answer comes back (headers from an allow-list, errors
//! passed or mapped, long-running operations followed through the gateway).
//!
//! The URL is fixed at build time except for whole path segments and whole query values, which
//! are percent-encoded ([`url`]): a caller value can neither change the scheme, host or port nor add
//! a path level (`/`, `\`, `.` and `..` as a segment are refused). Every request then passes
//! the outgoing gate like any other backend's.

use serde_json::Value;

use super::{send_retried, Verdict};
use crate::exchange::{
    Answer, AnswerBody, Backend, BackendRequest, Bearer, Cx, Io, Limit, OutBody, Reply, SendError,
};
use crate::policy::prepared::{PreparedOperation, PreparedRest, RestBodyPlan};

use crate::crypto::{HandleKey, NONCE_LEN};
use crate::policy::{ErrorMode, ResponseBody};
use crate::problem::Problem;
use crate::template::{render_var, BodyFormat, RenderContext, Template, Var};
use crate::time::Utc;
use url::missing;

pub mod url;

/// Default largest caller body held whole (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// Default time limit of one call.
pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;
/// Reply headers every `azure_rest` route passes back.
pub const DEFAULT_RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "etag",
    "last-modified",
    "retry-after",
    "x-ms-request-id",
];
/// Reply headers the gateway itself rewrites or must never pass.
pub const GATEWAY_REPLY_HEADERS: &[&str] = &[
    "location",
    "azure-asyncoperation",
    "operation-location",
    "set-cookie",
    "www-authenticate",
    "content-length",
    "transfer-encoding",
    "connection",
];
/// Request headers a route may neither set nor pass: HTTP's own, the token, and what the
/// gateway sets (the API version, the date, the body's type and length).
pub const RESERVED_REQUEST_HEADERS: &[&str] = &[
    "authorization",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-authorization",
    "x-ms-version",
    "x-ms-date",
    "cookie",
];
/// How long an operation handle the gateway hands out stays valid.
pub const OPERATION_HANDLE_TTL_S: f64 = 24.0 * 3600.0;
/// How long a next-page link the gateway hands out stays valid.
pub const PAGE_HANDLE_TTL_S: f64 = 3600.0;
/// The query parameter of the gateway's next-page links (`?page={handle}`).
pub const PAGE_PARAMETER: &str = "page";
/// Default largest answer read to pass on a part of it (`max_answer_bytes`).
pub const DEFAULT_MAX_ANSWER_BYTES: u32 = 64 * 1024;
/// The largest `max_answer_bytes` a route may set: an answer read is held three times over for a
/// moment (its bytes here and in the wasm, and what is parsed of it), and 16 answers of 1 MB read
/// at once grew workerd by about 70 MB (bench/results/memory-answers.md).
pub const MAX_ANSWER_BYTES_LIMIT: u32 = 1024 * 1024;
/// The largest `max_built_body_bytes` a route may set, and the most its default may be: a built
/// body is held while it is sent (and the runtime copies it to send it), and 16 bodies of 1.4 MB
/// built at once grew workerd by about 90 MB (bench/results/memory-answers.md).
pub const MAX_BUILT_BODY_BYTES_LIMIT: u64 = 2 * 1024 * 1024;

/// The default `max_built_body_bytes` of a route reading bodies of up to `max_body_bytes`: a third
/// more, and 64 KiB for the template's own text. `{body_base64}` of a body at the limit fits
/// (base64 is a third longer), and so does `{body}` that escaping makes up to a third longer;
/// `{body}` written twice does not.
pub fn default_max_built_body_bytes(max_body_bytes: u64) -> u64 {
    (max_body_bytes + max_body_bytes.div_ceil(3) + 64 * 1024).min(MAX_BUILT_BODY_BYTES_LIMIT)
}
/// What a followed operation's answer shows by default: its status, its error's code and
/// message, and its times.
pub const OPERATION_FIELDS: &[&str] = &[
    "/status",
    "/error/code",
    "/error/message",
    "/startTime",
    "/endTime",
];

// ---------------------------------------------------------------------------------------------
// The URL ([`url`]: parsed at build time, rendered per request)

/// A route whose operations are followed, with none of its identity's secrets set.
fn no_handle_key(secrets: &[String]) -> Problem {
    Problem::new(
        500,
        "gateway-misconfigured",
        "Gateway is misconfigured",
        format!("This route hands out links to follow Azure's operations or pages, sealed with a key from its identity's credential, but none of the Worker secrets it may use ({}) is set; nothing was sent. The operator should set one with `wrangler secret put`.", secrets.join(", ")),
    )
}

// ---------------------------------------------------------------------------------------------
// Phases 7, 9 and 10

/// What [`build`] decided.
pub struct Plan<B> {
    request: BackendRequest,
    body: PlanBody<B>,
    /// The key of operation handles, when the route's operations can be followed.
    handle_key: Option<HandleKey>,
    /// A handle's nonce, from the platform's CSPRNG (zeros when no handle can be made).
    nonce: [u8; NONCE_LEN],
    now_ms: f64,
    /// For an operation being followed: the route that started it (handles name it).
    issuer: Option<String>,
    /// For an operation being followed: the JSON pointers of its answer the caller sees (the
    /// `azure_operation` route's), applied to every successful answer.
    shape: Option<Vec<String>>,
    /// The answer's text when the backend's reply was read here (projection).
    projected: std::cell::RefCell<Option<String>>,
    /// On a route that pages its lists: the caller's path, which the next-page link is on
    /// and which its handle is bound to.
    page_path: Option<String>,
    /// The next-page link the answer hands out (also as `Link: <…>; rel="next"`).
    next: std::cell::RefCell<Option<String>>,
    /// The text read and rewritten is Azure's XML (a Storage list), not JSON.
    xml: std::cell::Cell<bool>,
}

impl<B> Plan<B> {
    /// The call (its URL names the resource).
    pub fn request(&self) -> &BackendRequest {
        &self.request
    }
}

enum PlanBody<B> {
    None,
    Held(B),
    Text(String),
    Stream(u64),
}

/// Phase 7: the URL, headers and body from the request; the outgoing gate.
pub async fn build<I: Io>(
    rest: &PreparedRest,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Plan<I::Bytes>, Problem> {
    let head = cx.head;
    let method = match rest.method {
        Some(m) => m.as_str(),
        None => crate::policy::Method::parse(&head.method)
            .map(|m| m.as_str())
            .unwrap_or("GET"),
    };
    // An allowed query parameter given more than once (in any case) is refused: which one Azure
    // reads would be Azure's choice, not the route's.
    for allowed in &rest.query {
        let given = cx
            .query
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(allowed))
            .count();
        if given > 1 {
            return Err(Problem::new(
                400,
                "repeated-query-parameter",
                "A query parameter is given more than once",
                format!("The query parameter {allowed} is given {given} times (names compare without regard to case); give it once. Nothing was sent."),
            ));
        }
    }
    // The body first: a template may need it, and a body too large is refused before anything.
    let mut held = None;
    let mut bytes = None;
    let needs_body_text = rest
        .body
        .vars()
        .iter()
        .any(|v| matches!(v, Var::Body | Var::BodyBase64));
    let has_body = head.has_body && head.content_length() != Some(0);
    if has_body && (matches!(rest.body, RestBodyPlan::Caller) || needs_body_text) {
        // A body a template writes is in what it builds at least once, whole: it is never read
        // past what the template may build.
        let built_first = needs_body_text && rest.max_built_body_bytes < rest.max_body_bytes;
        let limit = if built_first {
            rest.max_built_body_bytes
        } else {
            rest.max_body_bytes
        };
        match io.read_body(limit).await {
            Ok(Some((body, _))) => {
                if needs_body_text {
                    bytes = Some(io.bytes(&body));
                }
                held = Some(body);
            }
            Ok(None) => {}
            Err(crate::exchange::BodyError::TooLarge(seen)) if built_first => {
                return Err(built_too_large(seen, limit))
            }
            Err(crate::exchange::BodyError::TooLarge(seen)) => {
                return Err(too_large(seen, rest.max_body_bytes))
            }
            Err(crate::exchange::BodyError::Unreadable(why)) => {
                return Err(super::unreadable(&why))
            }
        }
    }
    let now = io.now();
    let header = |name: &str| head.header(name).map(str::to_owned);
    let uuid = || io.uuid();
    let mut values = cx.render_context(&header, &uuid, now);
    values.body = bytes.as_deref();
    // The query: the route's own, the pinned api-version, then what the caller may pass.
    let mut extra: Vec<(&str, &str)> = Vec::new();
    if let crate::policy::prepared::ApiVersion::Query(v) = &rest.api_version {
        extra.push(("api-version", v));
    }
    for (name, value) in &cx.query {
        if rest.query.iter().any(|allowed| allowed == name) {
            extra.push((name, value));
        }
    }
    let mut url = rest.url.render(&values, &extra)?;
    // The handle keys come from whichever of the identity's secrets are set (during a rotation,
    // perhaps only the next one): a route that hands out links must be able to seal them, so
    // with none set nothing is sent. Links are sealed with the first and opened with any.
    let keys: Vec<HandleKey> = if rest.operation_path.is_some() || rest.pages {
        let keys = handle_keys(rest, io);
        if keys.is_empty() {
            return Err(no_handle_key(&rest.handle_secrets));
        }
        keys
    } else {
        Vec::new()
    };
    // A next page: Azure's URL from the handle, on this route and this path only, and for the
    // resource this request names.
    let page_path = rest.pages.then(|| head.path.clone());
    if let Some(path) = &page_path {
        let mut given = cx.query.iter().filter(|(n, _)| n == PAGE_PARAMETER);
        if let Some((_, handle)) = given.next() {
            let route = cx.route.map(|r| r.name.as_str()).unwrap_or_default();
            let next = open_url(handle, &keys, &page_binding(route, path), now)
                .filter(|next| same_origin(next, &rest.url.origin) && same_path(next, &url))
                .filter(|_| given.next().is_none());
            url = next.ok_or_else(page_not_found)?;
        }
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    if let crate::policy::prepared::ApiVersion::Header(v) = &rest.api_version {
        headers.push(("x-ms-version".into(), v.clone()));
        headers.push(("x-ms-date".into(), Utc::from_millis(now).http_date()));
    }
    for (name, template) in &rest.headers {
        let value = template.render(&values).map_err(|m| missing(&m))?;
        headers.push((name.clone(), value));
    }
    for name in &rest.request_headers {
        if let Some(value) = head.header(name) {
            headers.push((name.clone(), value.to_owned()));
        }
    }
    let body = match &rest.body {
        RestBodyPlan::None => PlanBody::None,
        RestBodyPlan::Caller => match held.take() {
            Some(body) => {
                if let Some(ct) = head.header("content-type") {
                    headers.push(("content-type".into(), ct.to_owned()));
                }
                PlanBody::Held(body)
            }
            None => PlanBody::None,
        },
        RestBodyPlan::Stream => {
            if !head.has_body || head.content_length() == Some(0) {
                PlanBody::None
            } else {
                let length = head.content_length().ok_or_else(length_required)?;
                if length > rest.max_body_bytes {
                    return Err(too_large(length, rest.max_body_bytes));
                }
                if let Some(ct) = head.header("content-type") {
                    headers.push(("content-type".into(), ct.to_owned()));
                }
                PlanBody::Stream(length)
            }
        }
        RestBodyPlan::Template {
            content_type,
            format,
            template,
        } => {
            let text = render_within(template, &values, Some(*format), rest.max_built_body_bytes)?;
            headers.push(("content-type".into(), content_type.clone()));
            PlanBody::Text(text)
        }
        RestBodyPlan::Json { skeleton, leaves } => {
            let limit = rest.max_built_body_bytes;
            let mut document: Value = serde_json::from_str(skeleton).unwrap_or(Value::Null);
            // A value is at least as long in the document as it is (escaping never shortens
            // it): a body past the limit is refused before the next value is built.
            let mut at_least = skeleton.len() as u64;
            for (pointer, template) in leaves {
                let value = render_within(template, &values, None, limit.saturating_sub(at_least))?;
                at_least += value.len() as u64;
                if let Some(slot) = document.pointer_mut(pointer) {
                    *slot = Value::String(value);
                }
            }
            headers.push(("content-type".into(), "application/json".to_owned()));
            PlanBody::Text(json_within(&document, limit)?)
        }
    };
    let request = BackendRequest {
        method,
        url,
        headers,
        reply_headers: rest.reply_headers.clone(),
    };
    super::check(&request)?;
    // What a template built goes to the edge, which holds it from here on, and lets go of the
    // caller's body it was built from; the wasm's copy of that body is dropped first.
    drop(bytes);
    let body = match body {
        PlanBody::Text(text) => PlanBody::Held(
            io.keep_text(text, held.as_ref())
                .await
                .ok_or_else(|| Problem::internal("the edge did not take the body it built"))?,
        ),
        other => other,
    };
    let handle_key = keys.into_iter().next();
    Ok(Plan {
        request,
        body,
        nonce: if handle_key.is_some() {
            fresh_nonce(io)
        } else {
            [0; NONCE_LEN]
        },
        handle_key,
        now_ms: now,
        issuer: None,
        shape: None,
        projected: std::cell::RefCell::new(None),
        page_path,
        next: std::cell::RefCell::new(None),
        xml: std::cell::Cell::new(false),
    })
}

fn too_large(seen: u64, limit: u64) -> Problem {
    Problem::new(
        413,
        "body-too-large",
        "Request body too large",
        format!("This route accepts bodies of at most {limit} bytes; this one has at least {seen}. Nothing was sent."),
    )
}

fn length_required() -> Problem {
    Problem::new(
        411,
        "length-required",
        "Content-Length required",
        "This route streams the body to Azure, which needs its length: send Content-Length (not chunked encoding).",
    )
}

/// Fills a body template, each value escaped for `format` (none: as it is, for a JSON body's
/// strings, which the serializer escapes), into at most `limit` bytes. Building stops as soon as
/// the body would pass the limit, before the value that passes it is written whole: a template
/// that writes `{body}` six times never holds six bodies. The caller's body is written from its
/// bytes (`{body}` checked as UTF-8, `{body_base64}` encoded straight into the body), without a
/// copy of its own per use.
fn render_within(
    template: &Template,
    values: &RenderContext,
    format: Option<BodyFormat>,
    limit: u64,
) -> Result<String, Problem> {
    use crate::template::Part;
    let body = values.body.unwrap_or_default();
    // What the body is at least: literals, and each value as it is (escaping never shortens).
    let mut at_least = 0u64;
    for part in &template.parts {
        at_least += match part {
            Part::Literal(l) => l.len(),
            Part::Var(Var::Body) => body.len(),
            Part::Var(Var::BodyBase64) => crate::encoding::base64_len(body.len()),
            Part::Var(_) => 0,
        } as u64;
    }
    if at_least > limit {
        return Err(built_too_large(at_least, limit));
    }
    let mut out = String::with_capacity(at_least as usize + 64);
    for part in &template.parts {
        match part {
            Part::Literal(l) => out.push_str(l),
            Part::Var(Var::BodyBase64) => {
                if values.body.is_none() {
                    return Err(missing("the request has no body"));
                }
                // Base64 needs no escaping in JSON or XML.
                crate::encoding::push_base64(&mut out, body);
            }
            Part::Var(Var::Body) => {
                let text = match values.body.map(std::str::from_utf8) {
                    Some(Ok(text)) => text,
                    Some(Err(_)) => return Err(missing("the body is not UTF-8 text")),
                    None => return Err(missing("the request has no body")),
                };
                push_within(text, format, &mut out, limit)?;
            }
            Part::Var(var) => {
                let value = render_var(var, values).map_err(|m| missing(&m))?;
                push_within(&value, format, &mut out, limit)?;
            }
        }
        if out.len() as u64 > limit {
            return Err(built_too_large(out.len() as u64, limit));
        }
    }
    Ok(out)
}

/// Writes `value` escaped for `format` into `out` in pieces of 64 KiB, stopping as soon as `out`
/// passes `limit` (escaping may make a value up to six times longer).
fn push_within(
    value: &str,
    format: Option<BodyFormat>,
    out: &mut String,
    limit: u64,
) -> Result<(), Problem> {
    const PIECE: usize = 64 * 1024;
    let mut rest = value;
    while !rest.is_empty() {
        let mut cut = rest.len().min(PIECE);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        match format {
            Some(format) => format.escape(piece, out).map_err(|_| not_xml())?,
            None => out.push_str(piece),
        }
        if out.len() as u64 > limit {
            return Err(built_too_large(out.len() as u64, limit));
        }
        rest = tail;
    }
    Ok(())
}

/// A JSON document as text of at most `limit` bytes: the writing stops as it passes the limit.
fn json_within(document: &Value, limit: u64) -> Result<String, Problem> {
    struct Capped {
        out: Vec<u8>,
        limit: u64,
    }
    impl std::io::Write for Capped {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if (self.out.len() + buf.len()) as u64 > self.limit {
                return Err(std::io::Error::other("over the limit"));
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut capped = Capped {
        out: Vec::new(),
        limit,
    };
    match serde_json::to_writer(&mut capped, document) {
        // serde_json writes UTF-8.
        Ok(()) => String::from_utf8(capped.out).map_err(|_| Problem::internal("a JSON body")),
        Err(_) => Err(built_too_large(capped.out.len() as u64 + 1, limit)),
    }
}

fn not_xml() -> Problem {
    Problem::new(
        400,
        "bad-body",
        "The request body cannot be sent as XML",
        "A value this route writes into an XML body holds control characters XML cannot carry; remove them. Nothing was sent.",
    )
}

/// The body a template builds from the request is over the route's `max_built_body_bytes`.
fn built_too_large(at_least: u64, limit: u64) -> Problem {
    Problem::new(
        413,
        "body-too-large",
        "Request body too large",
        format!("This route builds the body it sends to Azure from the request, and that body may be at most {limit} bytes (max_built_body_bytes); from this request it would be at least {at_least}. Send a smaller body. Nothing was sent."),
    )
}

/// Whether sending a request with this method twice does it once (RFC 9110 §9.2.2).
pub fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS")
}

/// Phase 9: the call (retried where that is safe); Azure's errors mapped here when the route
/// maps them.
pub async fn send<I: Io>(
    rest: &PreparedRest,
    plan: &Plan<I::Bytes>,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    let request = &plan.request;
    let timeout = f64::from(rest.timeout_ms);
    let limit = if request.method == "GET" || matches!(plan.body, PlanBody::Stream(_)) {
        Limit::Idle(timeout)
    } else {
        Limit::Deadline(timeout)
    };
    let body = match &plan.body {
        PlanBody::None => OutBody::None,
        PlanBody::Held(b) => OutBody::Bytes(b),
        PlanBody::Text(t) => OutBody::Text(t),
        PlanBody::Stream(length) => OutBody::CallerStream { length: *length },
    };
    // A call is sent again after a 5xx, a timeout or a lost connection only when doing so
    // cannot do it twice: reads and idempotent writes (PUT, DELETE) with a body the edge holds.
    // POST and PATCH only on 429 (a throttled call was not processed); a timeout or a lost
    // connection is the caller's `backend-outcome-unknown`. The caller's stream is never sent
    // twice.
    let reply = if !matches!(plan.body, PlanBody::Stream(_)) {
        let method_idempotent = idempotent(request.method);
        let resend = if method_idempotent {
            super::Resend::Safe
        } else {
            super::Resend::OnlyIfRefused
        };
        send_retried(
            io,
            request,
            bearer,
            body,
            limit,
            &mut cx.log,
            (resend, "the Azure API"),
            async |reply: Reply<I::Stream>, _| {
                let status = reply.status;
                let retry = status == 429 || (method_idempotent && status >= 500);
                if retry {
                    let after = crate::retry::parse_retry_after_secs(reply.header("retry-after"));
                    super::drain(io, reply.body).await;
                    Verdict::Retry(after)
                } else {
                    Verdict::Done(reply)
                }
            },
            unavailable,
        )
        .await?
    } else {
        match super::send_renewing(io, request, bearer, body, limit, &mut cx.log).await? {
            Ok(reply) => {
                cx.log.backend_status = Some(reply.status);
                reply
            }
            Err(SendError::Unsendable(problem)) => return Err(problem),
            Err(SendError::Timeout) => return Err(timed_out()),
            Err(e) => return Err(unavailable(&format!("could not be reached ({e})"), None)),
        }
    };
    if reply.status == 401 {
        bearer.evict(io);
    }
    finish(rest, plan, reply, cx, io).await
}

/// Azure's reply, read here when the route maps errors or projects answers (and always for a
/// followed operation, whose answer is shaped).
async fn finish<I: Io, B>(
    rest: &PreparedRest,
    plan: &Plan<B>,
    reply: Reply<I::Stream>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    if reply.status >= 400 {
        if rest.errors == ErrorMode::Pass {
            return Ok(reply);
        }
        let header_code = reply.header("x-ms-error-code").map(str::to_owned);
        let retry_after = crate::retry::parse_retry_after_secs(reply.header("retry-after"));
        let (code, message) = match super::answer_text(io, reply.body).await {
            Ok(text) => azure_error(&text, header_code.as_deref()),
            Err(unread) => (header_code, Some(unread)),
        };
        cx.log.backend_detail = message.map(|m| super::log_detail(&m));
        return Err(mapped_error(reply.status, code.as_deref(), retry_after));
    }
    // A route that answers without Azure's body: status and headers only.
    if rest.response_body == ResponseBody::None && plan.shape.is_none() {
        super::drain(io, reply.body).await;
        *plan.projected.borrow_mut() = Some(String::new());
        return Ok(Reply {
            status: reply.status,
            headers: reply.headers,
            body: None,
        });
    }
    // A followed operation's answer is always shaped; a route's own answer is projected when
    // it is the resource (200, 201): a 202 starts an operation, and its body is not. A page of
    // a list (200) is read for its continuation.
    let own = matches!(reply.status, 200 | 201)
        && (!rest.project.is_empty() || !rest.project_items.is_empty());
    let page = reply.status == 200 && plan.page_path.is_some();
    let pointers = match &plan.shape {
        Some(shape) if (200..300).contains(&reply.status) => shape.as_slice(),
        None if own || page => rest.project.as_slice(),
        _ => return Ok(reply),
    };
    let format = reply.header("content-type").and_then(BodyFormat::of);
    let is_json = format == Some(BodyFormat::Json);
    let limit = rest.max_answer_bytes;
    let text = match reply.body {
        Some(body) => match io.text(body, limit).await {
            Ok(text) => text,
            Err(crate::exchange::BodyError::TooLarge(seen)) => {
                cx.log.backend_detail = Some(format!(
                    "an answer of at least {seen} bytes, over max_answer_bytes ({limit}): not read"
                ));
                return Err(answer_too_large(limit));
            }
            Err(crate::exchange::BodyError::Unreadable(why)) => {
                cx.log.backend_detail =
                    Some(super::log_detail(&format!("the answer broke off: {why}")));
                return Err(answer_unreadable("Azure's answer broke off before its end"));
            }
        },
        None => String::new(),
    };
    // Azure's continuation, sealed into a link on this route; one to another list or host is
    // not followed (and not shown).
    let route: &str = cx.route.map(|r| r.name.as_str()).unwrap_or_default();
    let dropped = std::cell::Cell::new(false);
    let link = |next: &str| -> Option<String> {
        let (path, key) = (plan.page_path.as_ref()?, plan.handle_key.as_ref()?);
        if !(same_origin(next, &rest.url.origin) && same_path(next, &plan.request.url)) {
            dropped.set(true);
            return None;
        }
        let binding = page_binding(route, path);
        let handle = seal_url(
            key,
            &binding,
            next,
            plan.now_ms,
            PAGE_HANDLE_TTL_S,
            &plan.nonce,
        );
        Some(format!("{path}?{PAGE_PARAMETER}={handle}"))
    };
    let projected = if text.is_empty() {
        // Nothing to project (an empty 200, 201 or 204).
        String::new()
    } else if page
        && format == Some(BodyFormat::Xml)
        && plan.shape.is_none()
        && rest.project.is_empty()
    {
        // A Storage list: its `<NextMarker>` becomes the link.
        let (xml, next) = storage_page(&text, &plan.request.url, link);
        *plan.next.borrow_mut() = next;
        plan.xml.set(true);
        xml
    } else {
        match serde_json::from_str::<Value>(&text) {
            Ok(value) if is_json && plan.shape.is_some() => project(&value, pointers).to_string(),
            Ok(value) if is_json => {
                let (shaped, next) = shape_answer(value, pointers, &rest.project_items, page, link);
                *plan.next.borrow_mut() = next;
                shaped.to_string()
            }
            _ => {
                return Err(answer_unreadable(
                    "Azure answered something that is not JSON",
                ))
            }
        }
    };
    if dropped.get() {
        cx.log.backend_detail =
            Some("Azure's continuation names another list or host: not followed, not shown".into());
    }
    *plan.projected.borrow_mut() = Some(projected);
    Ok(Reply {
        status: reply.status,
        headers: reply.headers,
        body: None,
    })
}

/// Azure's answer is over what the route reads (`max_answer_bytes`).
fn answer_too_large(limit: u32) -> Problem {
    Problem::new(
        502,
        "backend-answer-too-large",
        "Azure's answer is too large to pass on",
        format!("This route passes on only parts of Azure's answer, which it reads up to {limit} bytes (max_answer_bytes); Azure answered more, so the gateway stopped reading it and nothing of it is passed on."),
    )
}

fn answer_unreadable(what: &str) -> Problem {
    Problem::new(
        502,
        "backend-answer-unreadable",
        "Azure's answer could not be projected",
        format!("This route passes on only parts of Azure's JSON answer, but {what}; nothing of it is passed on."),
    )
}

/// Phase 10: status, allowed headers and body; a long-running operation's URL as a gateway
/// URL the caller can follow.
pub fn answer<B, S>(
    rest: &PreparedRest,
    plan: &Plan<B>,
    reply: Reply<S>,
    cx: &Cx<'_>,
) -> Answer<S> {
    let key = plan.handle_key.as_ref();
    let mut headers: Vec<(&'static str, String)> = Vec::new();
    for (name, value) in &reply.headers {
        if let Some(allowed) = rest.response_headers.iter().find(|h| *h == name) {
            if name == "retry-after" {
                // Azure's wait, within what a caller is told (an HTTP-date is not passed).
                if let Some(secs) = crate::retry::parse_retry_after_secs(Some(value)) {
                    let secs = crate::retry::caller_retry_after(Some(secs));
                    headers.push(("retry-after", secs.to_string()));
                }
                continue;
            }
            headers.push((leak_name(allowed), value.clone()));
        }
    }
    if (200..300).contains(&reply.status) {
        if let (Some(path), Some(key)) = (&rest.operation_path, key) {
            let azure = reply
                .header("azure-asyncoperation")
                .or_else(|| reply.header("location"));
            if let Some(azure) = azure.filter(|u| same_origin(u, &rest.url.origin)) {
                let route = match &plan.issuer {
                    Some(issuer) => issuer.as_str(),
                    None => cx.route.map(|r| r.name.as_str()).unwrap_or_default(),
                };
                let handle = operation_handle(key, route, azure, plan.now_ms, &plan.nonce);
                headers.push(("location", path.replace("{operation}", &handle)));
            }
        }
    }
    if let Some(next) = plan.next.borrow_mut().take() {
        headers.push(("link", format!("<{next}>; rel=\"next\"")));
    }
    if rest.response_body == ResponseBody::None && plan.shape.is_none() {
        headers.retain(|(n, _)| *n != "content-type");
    }
    let projected = plan.projected.borrow_mut().take();
    let body = match (projected, reply.body) {
        (Some(text), _) if text.is_empty() => AnswerBody::Empty,
        (Some(text), _) if plan.xml.get() => AnswerBody::Text(text),
        (Some(text), _) => {
            headers.retain(|(n, _)| *n != "content-type");
            headers.push(("content-type", "application/json".to_owned()));
            AnswerBody::Text(text)
        }
        (None, Some(stream)) => AnswerBody::Stream(stream),
        (None, None) => AnswerBody::Empty,
    };
    Answer {
        status: reply.status,
        headers,
        body,
    }
}

impl Backend for PreparedRest {
    type Plan<B> = Plan<B>;

    async fn build<I: Io>(&self, cx: &mut Cx<'_>, io: &I) -> Result<Self::Plan<I::Bytes>, Problem> {
        build(self, cx, io).await
    }

    async fn send<I: Io>(
        &self,
        plan: &Self::Plan<I::Bytes>,
        bearer: &Bearer<'_>,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Reply<I::Stream>, Problem> {
        send(self, plan, bearer, cx, io).await
    }

    fn answer<B, S>(&self, plan: &Self::Plan<B>, reply: Reply<S>, cx: &Cx<'_>) -> Answer<S> {
        answer(self, plan, reply, cx)
    }

    fn request<'p, B>(&self, plan: &'p Self::Plan<B>) -> &'p BackendRequest {
        plan.request()
    }
}

/// Answer header names are `&'static str`; the allowed names come from the policy, loaded once
/// per isolate, so each distinct name is interned once and never freed.
fn leak_name(name: &str) -> &'static str {
    thread_local! {
        static NAMES: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    NAMES.with(|names| {
        if let Some(known) = names.borrow().iter().find(|n| **n == name) {
            return *known;
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        names.borrow_mut().push(leaked);
        leaked
    })
}

fn same_origin(url: &str, origin: &str) -> bool {
    url.len() > origin.len()
        && url[..origin.len()].eq_ignore_ascii_case(origin)
        && url.as_bytes()[origin.len()] == b'/'
}

/// Azure's error code and message from an error body (Resource Manager's and most services'
/// `{"error": {"code", "message"}}`, Storage's `<Error><Code>`), or the `x-ms-error-code` header.
pub fn azure_error(body: &str, header_code: Option<&str>) -> (Option<String>, Option<String>) {
    if let Ok(Value::Object(root)) = serde_json::from_str::<Value>(body) {
        let error = root
            .get("error")
            .and_then(Value::as_object)
            .unwrap_or(&root);
        let text = |k: &str| {
            error
                .get(k)
                .or_else(|| {
                    error.get(
                        &k[..1]
                            .to_ascii_uppercase()
                            .chars()
                            .chain(k[1..].chars())
                            .collect::<String>(),
                    )
                })
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let code = text("code");
        if code.is_some() {
            return (code, text("message"));
        }
    }
    let tag = |name: &str| crate::encoding::xml_element(body, name).map(str::to_owned);
    if let Some(code) = tag("Code") {
        return (Some(code), tag("Message"));
    }
    (header_code.map(str::to_owned), None)
}

/// The caller's problem for Azure's error answer: the status when it is about the caller's
/// request, 502 when it is about the gateway's identity or Azure itself; Azure's error code (a
/// name such as `ResourceNotFound`, never its message) named in the detail.
pub fn mapped_error(status: u16, code: Option<&str>, retry_after: Option<u64>) -> Problem {
    let code_text = code
        .filter(|c| {
            c.len() <= 100
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        })
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    let mut problem = match status {
        401 | 403 => Problem::new(
            502,
            "backend-auth",
            "Azure refused the gateway's identity",
            format!("Azure answered {status}{code_text}: the gateway's identity may not do this. The operator must grant it access; the reason is in the gateway's log under this request id."),
        ),
        // Not retried here (a POST that may have been processed is not sent twice): the
        // caller decides, after Retry-After.
        429 | 503 => return unavailable(&format!("answered {status}{code_text}"), retry_after),
        400 | 404 | 405 | 409 | 411 | 412 | 413 | 415 | 416 | 422 => Problem::new(
            status,
            "azure-rejected",
            "Azure refused the request",
            format!("Azure answered {status}{code_text}; Azure's message is in the gateway's log under this request id. Change the request (its path values, query or body) and try again."),
        ),
        _ => Problem::new(
            502,
            "backend-error",
            "Azure failed the request",
            format!("Azure answered {status}{code_text}; the reason is in the gateway's log under this request id."),
        ),
    };
    if let Some(code) = code.filter(|c| !code_text.is_empty() && !c.is_empty()) {
        problem = problem.with_extension("azure_error_code", Value::from(code));
    }
    problem
}

fn unavailable(why: &str, retry_after: Option<u64>) -> Problem {
    Problem::new(
        503,
        "backend-unavailable",
        "Azure is unavailable",
        format!("The Azure API {why}; try again later."),
    )
    .with_header(
        "retry-after",
        crate::retry::caller_retry_after(retry_after).to_string(),
    )
}

fn timed_out() -> Problem {
    Problem::new(
        504,
        "backend-timeout",
        "Azure did not answer in time",
        "The Azure API did not answer within the route's time limit; nothing was retried (the body was streamed).",
    )
}

/// Keeps only the values at `pointers` of `value`, nested as they were (array elements by
/// index become members named by the index).
pub fn project(value: &Value, pointers: &[String]) -> Value {
    project_parsed(value, &parse_pointers(pointers))
}

/// JSON pointers (RFC 6901) split into their unescaped tokens: once for a list's every element.
fn parse_pointers(pointers: &[String]) -> Vec<Vec<String>> {
    pointers
        .iter()
        .map(|pointer| {
            pointer
                .split('/')
                .skip(1)
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect()
        })
        .collect()
}

/// The value at a parsed pointer, as `Value::pointer` finds it (an array index is digits, with
/// no leading zero).
fn at_tokens<'v>(value: &'v Value, tokens: &[String]) -> Option<&'v Value> {
    tokens.iter().try_fold(value, |at, token| match at {
        Value::Object(map) => map.get(token),
        Value::Array(list) => {
            let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
            let canonical = token == "0" || !token.starts_with('0');
            if !(digits && canonical) {
                return None;
            }
            list.get(token.parse::<usize>().ok()?)
        }
        _ => None,
    })
}

/// [`project`] with its pointers parsed.
fn project_parsed(value: &Value, pointers: &[Vec<String>]) -> Value {
    let mut out = Value::Object(serde_json::Map::new());
    for tokens in pointers {
        let Some(found) = at_tokens(value, tokens) else {
            continue;
        };
        if tokens.is_empty() {
            return found.clone();
        }
        let mut at = &mut out;
        for (i, token) in tokens.iter().enumerate() {
            let Value::Object(map) = at else { break };
            if i + 1 == tokens.len() {
                map.insert(token.clone(), found.clone());
                break;
            }
            at = map
                .entry(token.clone())
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Long-running operations

/// A handle's nonce: 24 bytes from the platform's CSPRNG (`crypto.getRandomValues`).
fn fresh_nonce<I: Io>(io: &I) -> [u8; NONCE_LEN] {
    let mut nonce = [0; NONCE_LEN];
    io.fill_random(&mut nonce);
    nonce
}

/// The key of a route's operation handles: derived (HKDF) from the identity's own credential,
/// so it is the same in every isolate and needs no configuration of its own.
///
/// Derived once per isolate for each credential (HKDF is a dozen SHA-256 blocks: work for an
/// isolate's start, not for each request that seals or opens a handle). An isolate has a few
/// credentials at most; a new one past [`HANDLE_KEYS_KEPT`] replaces the oldest.
pub fn operation_key(credential: &str) -> HandleKey {
    thread_local! {
        static DERIVED: std::cell::RefCell<Vec<(String, HandleKey)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    DERIVED.with(|derived| {
        if let Some((_, key)) = derived.borrow().iter().find(|(c, _)| c == credential) {
            return key.clone();
        }
        let key = HandleKey::derive(credential);
        let mut derived = derived.borrow_mut();
        if derived.len() >= HANDLE_KEYS_KEPT {
            derived.remove(0);
        }
        derived.push((credential.to_owned(), key.clone()));
        key
    })
}

/// How many credentials' handle keys an isolate keeps derived.
const HANDLE_KEYS_KEPT: usize = 8;

/// The keys of a route's handles, one per identity secret that is set (the first seals).
fn handle_keys<I: Io>(rest: &PreparedRest, io: &I) -> Vec<HandleKey> {
    rest.handle_secrets
        .iter()
        .filter_map(|s| io.secret(s))
        .map(|s| operation_key(&s))
        .collect()
}

/// What a route's operation handles are bound to (the AEAD's associated data): a handle opens
/// only as an operation of the route that issued it.
fn operation_binding(route: &str) -> String {
    format!("operation\n{route}")
}

/// A sealed handle of an Azure URL, expiring `ttl_s` after `now_ms` and bound to `binding` (see
/// [`crate::crypto::seal`]): the caller learns nothing of Azure's URL from it, cannot change it,
/// and cannot use it where another binding is expected. `nonce` comes from the platform's
/// CSPRNG. Operation and page handles are both this, with their own bindings.
pub fn seal_url(
    key: &HandleKey,
    binding: &str,
    url: &str,
    now_ms: f64,
    ttl_s: f64,
    nonce: &[u8; NONCE_LEN],
) -> String {
    let expires = ((now_ms / 1000.0) + ttl_s).floor() as u64;
    let plain = format!("{expires}\n{url}");
    crate::crypto::seal(key, binding, plain.as_bytes(), nonce)
}

/// A handle's Azure URL, when one of `keys` sealed it for `binding` and it has not expired.
pub fn open_url(handle: &str, keys: &[HandleKey], binding: &str, now_ms: f64) -> Option<String> {
    let plain = crate::crypto::open(keys, binding, handle)?;
    let text = String::from_utf8(plain).ok()?;
    let (expires, url) = text.split_once('\n')?;
    let expires: u64 = expires.parse().ok()?;
    (expires as f64 * 1000.0 >= now_ms).then(|| url.to_owned())
}

/// A sealed, expiring handle of Azure's operation URL, issued by `route`.
pub fn operation_handle(
    key: &HandleKey,
    route: &str,
    url: &str,
    now_ms: f64,
    nonce: &[u8; NONCE_LEN],
) -> String {
    let binding = operation_binding(route);
    seal_url(key, &binding, url, now_ms, OPERATION_HANDLE_TTL_S, nonce)
}

/// An operation handle's Azure URL, when it was issued by `route` and has not expired.
pub fn open_handle(handle: &str, keys: &[HandleKey], route: &str, now_ms: f64) -> Option<String> {
    open_url(handle, keys, &operation_binding(route), now_ms)
}

/// What a route's next-page handles are bound to: the route, and the caller's path the list
/// was asked on (so a link opens only for the same resource, on the same route).
fn page_binding(route: &str, path: &str) -> String {
    format!("page\n{route}\n{path}")
}

/// Whether `next` asks for the same resource as `url` (Azure's paths compare without case).
fn same_path(next: &str, url: &str) -> bool {
    let path = |u: &str| -> String {
        let rest = u.split_once("://").map_or(u, |(_, r)| r);
        let at = rest.find('/').unwrap_or(rest.len());
        let path = rest[at..].split(['?', '#']).next().unwrap_or_default();
        if path.is_empty() { "/" } else { path }.to_owned()
    };
    path(next).eq_ignore_ascii_case(&path(url))
}

fn page_not_found() -> Problem {
    Problem::new(
        404,
        "page-not-found",
        "No such page",
        format!("This next-page link is not one this gateway issued for this route and path, or it has expired (links last {} minutes). List again from the first page. Nothing was sent.", PAGE_HANDLE_TTL_S as u32 / 60),
    )
}

/// A JSON answer as the caller sees it: what `pointers` keep of it (all of it when there are
/// none and no `items`), its `/value` list with what `items` keep of each element, and (on a
/// page of a list) Azure's `nextLink` / `@odata.nextLink` replaced by `link` of it, or dropped
/// when `link` gives none. Also returns the link handed out.
pub fn shape_answer(
    value: Value,
    pointers: &[String],
    items: &[String],
    page: bool,
    link: impl FnOnce(&str) -> Option<String>,
) -> (Value, Option<String>) {
    const CONTINUATIONS: [&str; 2] = ["nextLink", "@odata.nextLink"];
    let continuation = CONTINUATIONS.iter().find_map(|field| {
        let next = value.get(*field)?.as_str()?;
        Some((*field, next.to_owned()))
    });
    // What `items` keep of each element of `/value`, their pointers parsed once for all.
    let kept_items = match value.get("value") {
        Some(Value::Array(list)) if !items.is_empty() => {
            let items = parse_pointers(items);
            Some(list.iter().map(|e| project_parsed(e, &items)).collect())
        }
        _ => None,
    };
    let mut out = if !pointers.is_empty() {
        project(&value, pointers)
    } else if !items.is_empty() {
        Value::Object(serde_json::Map::new())
    } else {
        value
    };
    if let Value::Object(map) = &mut out {
        if page {
            for field in CONTINUATIONS {
                map.remove(field);
            }
        }
        if let Some(kept) = kept_items {
            map.insert("value".into(), Value::Array(kept));
        }
    }
    let mut handed = None;
    if let (true, Some((field, next)), Value::Object(map)) = (page, continuation, &mut out) {
        if let Some(link) = link(&next) {
            map.insert(field.into(), Value::String(link.clone()));
            handed = Some(link);
        }
    }
    (out, handed)
}

/// A Storage list answer (`<EnumerationResults>`) with its `<NextMarker>` replaced by `link` of
/// the request's URL asking from that marker (emptied when `link` gives none), and the link.
pub fn storage_page(
    xml: &str,
    request_url: &str,
    link: impl FnOnce(&str) -> Option<String>,
) -> (String, Option<String>) {
    let Some(inner) = crate::encoding::xml_element(xml, "NextMarker") else {
        return (xml.to_owned(), None);
    };
    let start = inner.as_ptr() as usize - xml.as_ptr() as usize;
    let end = start + inner.len();
    let marker = inner.trim();
    if marker.is_empty() {
        return (xml.to_owned(), None);
    }
    // Storage escapes the marker as XML text; the URL carries it percent-encoded.
    let marker = marker
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    let (base, query) = request_url.split_once('?').unwrap_or((request_url, ""));
    // The service root is `https://host/`: a URL without a path gets its `/`.
    let rooted = base
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.contains('/'));
    let mut next = format!("{base}{}?", if rooted { "/" } else { "" });
    for pair in query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("marker="))
    {
        next.push_str(pair);
        next.push('&');
    }
    next.push_str("marker=");
    crate::encoding::push_percent_encoded(&mut next, &marker);
    let handed = link(&next);
    let mut out = String::with_capacity(xml.len());
    out.push_str(&xml[..start]);
    if let Some(link) = &handed {
        // A link is a path and a base64url handle: nothing in it needs escaping but `&`.
        out.push_str(&link.replace('&', "&amp;"));
    }
    out.push_str(&xml[end..]);
    (out, handed)
}

fn bad_handle() -> Problem {
    Problem::new(
        404,
        "operation-not-found",
        "No such operation",
        "This operation handle is not one this gateway issued, or it has expired (handles last 24 hours). Start the operation again to get a new one.",
    )
}

/// Phase 7 of an `azure_operation` route: the handle checked against the keys of the routes
/// it follows; the GET of Azure's operation URL, asked as the route that started it.
pub fn build_operation<'p, I: Io>(
    op: &PreparedOperation,
    routes: &'p [crate::policy::prepared::PreparedRoute],
    cx: &Cx<'_>,
    io: &I,
) -> Result<(&'p PreparedRest, Plan<I::Bytes>), Problem> {
    let handle = cx
        .params
        .iter()
        .find(|(k, _)| k == "operation")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let now = io.now();
    for &issuer in &op.of {
        let Some(route) = routes.get(issuer) else {
            continue;
        };
        let crate::policy::prepared::PreparedBackend::AzureRest(rest) = &route.backend else {
            continue;
        };
        let keys = handle_keys(rest, io);
        let Some(url) = open_handle(handle, &keys, &route.name, now) else {
            continue;
        };
        if !same_origin(&url, &rest.url.origin) {
            continue;
        }
        let request = BackendRequest {
            method: "GET",
            url,
            headers: Vec::new(),
            reply_headers: rest.reply_headers.clone(),
        };
        super::check(&request).map_err(|_| bad_handle())?;
        let plan = Plan {
            request,
            body: PlanBody::None,
            nonce: fresh_nonce(io),
            handle_key: keys.into_iter().next(),
            now_ms: now,
            issuer: Some(route.name.clone()),
            shape: Some(op.project.clone()),
            projected: std::cell::RefCell::new(None),
            page_path: None,
            next: std::cell::RefCell::new(None),
            xml: std::cell::Cell::new(false),
        };
        return Ok((rest, plan));
    }
    Err(bad_handle())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_sealed_bound_to_their_route_and_expire() {
        let key = operation_key("s3cret");
        let url = "https://management.azure.com/subscriptions/s/providers/Microsoft.Web/locations/westeurope/operationResults/1?api-version=2022-09-01";
        let h = operation_handle(&key, "restart", url, 1_000_000.0, &[1; NONCE_LEN]);
        // Nothing of Azure's URL can be read from the handle.
        let bytes = crate::encoding::base64_decode(&h).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("management"));
        assert!(!bytes.windows(9).any(|w| w == b"westeurop"));
        assert_ne!(
            h,
            operation_handle(&key, "restart", url, 1_000_000.0, &[2; NONCE_LEN])
        );
        let keys = std::slice::from_ref(&key);
        assert_eq!(
            open_handle(&h, keys, "restart", 1_000_000.0).as_deref(),
            Some(url)
        );
        // Another identity's key, another route, after the expiry, a flipped bit: closed.
        assert_eq!(
            open_handle(&h, &[operation_key("other")], "restart", 1_000_000.0),
            None
        );
        assert_eq!(open_handle(&h, keys, "stop", 1_000_000.0), None);
        let later = 1_000_000.0 + (OPERATION_HANDLE_TTL_S + 2.0) * 1000.0;
        assert_eq!(open_handle(&h, keys, "restart", later), None);
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        let flipped = crate::encoding::base64url(&flipped);
        assert_eq!(open_handle(&flipped, keys, "restart", 1_000_000.0), None);
        // The format before this one (ciphertext.mac, v1) no longer opens.
        let v1 = "MDEyMzQ1Njc4OWFiY2RlZg.AAAA";
        assert_eq!(open_handle(v1, keys, "restart", 1_000_000.0), None);
    }

    #[test]
    fn parsed_pointers_find_what_value_pointer_finds() {
        let value = serde_json::json!({ "a": [10, {"b~c": 1, "d/e": 2}], "": 3, "0": 4 });
        for pointer in [
            "",
            "/a",
            "/a/0",
            "/a/1/b~0c",
            "/a/1/d~1e",
            "/a/01",
            "/a/+1",
            "/a/2",
            "/a/-",
            "/a/",
            "/",
            "/0",
            "/x/y",
            "/a/1/b~c",
        ] {
            let parsed = parse_pointers(&[pointer.to_owned()]);
            assert_eq!(
                at_tokens(&value, &parsed[0]),
                value.pointer(pointer),
                "{pointer:?}"
            );
        }
    }

    #[test]
    fn projection_keeps_only_the_chosen_pointers() {
        let v: Value = serde_json::json!({"name": "s", "properties": {"state": "Running", "secret": "x"}, "tags": {"a/b": 1}});
        let p = project(
            &v,
            &[
                "/name".into(),
                "/properties/state".into(),
                "/tags/a~1b".into(),
                "/missing".into(),
            ],
        );
        assert_eq!(
            p,
            serde_json::json!({"name": "s", "properties": {"state": "Running"}, "tags": {"a/b": 1}})
        );
    }

    #[test]
    fn azure_errors_are_read_from_json_xml_or_the_header() {
        let (code, msg) = azure_error(
            r#"{"error":{"code":"ResourceNotFound","message":"The Resource 'x' was not found."}}"#,
            None,
        );
        assert_eq!(code.as_deref(), Some("ResourceNotFound"));
        assert!(msg.unwrap().contains("not found"));
        let (code, _) = azure_error(
            "<?xml version=\"1.0\"?><Error><Code>QueueNotFound</Code><Message>m</Message></Error>",
            None,
        );
        assert_eq!(code.as_deref(), Some("QueueNotFound"));
        assert_eq!(azure_error("", Some("Busy")).0.as_deref(), Some("Busy"));
        let p = mapped_error(404, Some("ResourceNotFound"), None);
        assert_eq!((p.status, p.kind), (404, "azure-rejected"));
        assert!(p.detail.contains("(ResourceNotFound)"));
        assert_eq!(
            mapped_error(403, Some("AuthorizationFailed"), None).status,
            502
        );
        let busy = mapped_error(503, None, Some(7));
        assert_eq!(
            (busy.status, busy.headers.clone()),
            (503, vec![("retry-after", "7".to_owned())])
        );
        // A code that is not a plain name is not repeated.
        assert!(!mapped_error(400, Some("<script>"), None)
            .detail
            .contains("script"));
    }
}
