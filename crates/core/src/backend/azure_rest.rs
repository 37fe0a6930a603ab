//! The `azure_rest` backend: a caller's request becomes one request to an Azure REST API, with
//! the identity's token, and Azure's answer comes back (headers from an allow-list, errors
//! passed or mapped, long-running operations followed through the gateway).
//!
//! The URL is fixed at build time except for whole path segments and whole query values, which
//! are percent-encoded here: a caller value can neither change the scheme, host or port nor add
//! a path level (`/`, `\`, `.` and `..` as a segment are refused). Every request then passes
//! the outgoing gate like any other backend's.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{send_retried, BackendRequest, Verdict};
use crate::pipeline::{Answer, AnswerBody, Cx, Io, Limit, OutBody, Reply, SendError};
use crate::policy::prepared::{PreparedOperation, PreparedRest, RestBodyPlan};

use crate::policy::ErrorMode;
use crate::problem::Problem;
use crate::template::{render_var, RenderContext, Template, Var};
use crate::time::Utc;

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
// The URL

/// A URL template, parsed at build time: a fixed origin, path segments and query values that
/// are either fixed or one whole variable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestUrl {
    /// `scheme://host[:port]`, as written.
    pub origin: String,
    pub host: String,
    pub segments: Vec<UrlPart>,
    pub query: Vec<(String, UrlPart)>,
    /// The URL ended with `/`.
    pub trailing_slash: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UrlPart {
    /// Fixed text, already valid in its place.
    Fixed(String),
    Var(Var),
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether fixed text is valid in a path segment or query part as it is (RFC 3986 pchar,
/// `%XX` escapes included, plus `/` and `?` in query values).
fn is_fixed_text(text: &str, query: bool) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
            continue;
        }
        let ok = is_unreserved(b)
            || b"!$'()*+,;:@".contains(&b)
            || (query && matches!(b, b'/' | b'?'))
            || (!query && matches!(b, b'=' | b'&'));
        if !ok {
            return false;
        }
        i += 1;
    }
    true
}

fn part(text: &str, query: bool, what: &str) -> Result<UrlPart, String> {
    if text.contains(['{', '}']) {
        let template = Template::parse(text)?;
        return match template.parts.as_slice() {
            [crate::template::Part::Var(var)] => {
                if matches!(var, Var::Body | Var::BodyBase64) {
                    Err(format!("no {var} in the URL (it may only be used in a body template)"))
                } else {
                    Ok(UrlPart::Var(var.clone()))
                }
            }
            _ => Err(format!(
                "a {what} that is fixed text or one whole variable such as {{path.name}}, got \"{text}\""
            )),
        };
    }
    if !is_fixed_text(text, query) {
        return Err(format!(
            "a {what} of URL characters (percent-encode others), got \"{text}\""
        ));
    }
    Ok(UrlPart::Fixed(text.to_owned()))
}

impl RestUrl {
    /// Parses a URL template. The error says what was expected.
    pub fn parse(url: &str) -> Result<RestUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("an absolute https:// URL, got \"{url}\""))?;
        if !matches!(scheme, "https" | "http") {
            return Err(format!("an https:// URL, got \"{url}\""));
        }
        if url.contains('#') {
            return Err(format!("a URL without a fragment ('#'), got \"{url}\""));
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if authority.contains(['{', '}']) {
            return Err(format!(
                "a URL whose host is fixed: template variables may fill path segments and query values only, got \"{url}\""
            ));
        }
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split_once(']').map(|(h, _)| h),
            None => Some(authority.rsplit_once(':').map_or(authority, |(h, _)| h)),
        }
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        })
        .ok_or_else(|| {
            format!("a URL with a plain host name or address and no user info, got \"{url}\"")
        })?;
        let after = &rest[authority_end..];
        let (path, query) = after.split_once('?').unwrap_or((after, ""));
        let mut segments = Vec::new();
        let trailing_slash = path.len() > 1 && path.ends_with('/');
        let inner = path.trim_start_matches('/');
        let inner = inner.strip_suffix('/').unwrap_or(inner);
        if !inner.is_empty() {
            for segment in inner.split('/') {
                if segment.is_empty() || segment == "." || segment == ".." {
                    return Err(format!(
                        "a path without empty, '.' or '..' segments, got \"{path}\""
                    ));
                }
                segments.push(part(segment, false, "path segment")?);
            }
        }
        let mut pairs = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name.contains(['{', '}']) || !is_fixed_text(name, true) || name.is_empty() {
                return Err(format!(
                    "query parameter names that are fixed text, got \"{name}\""
                ));
            }
            if name.eq_ignore_ascii_case("api-version") {
                return Err(
                    "no api-version in the URL: set \"api_version\" (it is pinned and checked)"
                        .to_owned(),
                );
            }
            pairs.push((name.to_owned(), part(value, true, "query value")?));
        }
        Ok(RestUrl {
            origin: format!("{scheme}://{authority}"),
            host: host.to_ascii_lowercase(),
            segments,
            query: pairs,
            trailing_slash,
        })
    }

    /// The variables the URL uses.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.segments
            .iter()
            .chain(self.query.iter().map(|(_, p)| p))
            .filter_map(|p| match p {
                UrlPart::Var(v) => Some(v),
                UrlPart::Fixed(_) => None,
            })
    }

    /// The URL's shape for people: `{path.site}` where a caller value goes.
    pub fn shape(&self) -> String {
        let mut out = self.origin.clone();
        for segment in &self.segments {
            out.push('/');
            match segment {
                UrlPart::Fixed(t) => out.push_str(t),
                UrlPart::Var(v) => out.push_str(&v.to_string()),
            }
        }
        if self.trailing_slash {
            out.push('/');
        }
        for (i, (name, value)) in self.query.iter().enumerate() {
            out.push(if i == 0 { '?' } else { '&' });
            out.push_str(name);
            out.push('=');
            match value {
                UrlPart::Fixed(t) => out.push_str(t),
                UrlPart::Var(v) => out.push_str(&v.to_string()),
            }
        }
        out
    }

    /// The URL for one request: every caller value percent-encoded; a path value that is
    /// empty, `.` or `..`, or holds `/` or `\`, is refused (it would change the path's shape).
    pub fn render(
        &self,
        ctx: &RenderContext,
        extra_query: &[(&str, &str)],
    ) -> Result<String, Problem> {
        let mut out = self.origin.clone();
        for segment in &self.segments {
            out.push('/');
            match segment {
                UrlPart::Fixed(t) => out.push_str(t),
                UrlPart::Var(var) => {
                    let value = render_var(var, ctx).map_err(|m| missing(&m))?;
                    if value.is_empty()
                        || value == "."
                        || value == ".."
                        || value.contains(['/', '\\'])
                    {
                        return Err(bad_path_value(var));
                    }
                    percent_encode(&value, &mut out);
                }
            }
        }
        if self.trailing_slash {
            out.push('/');
        }
        let mut first = true;
        let mut sep = |out: &mut String| {
            out.push(if first { '?' } else { '&' });
            first = false;
        };
        for (name, value) in &self.query {
            sep(&mut out);
            out.push_str(name);
            out.push('=');
            match value {
                UrlPart::Fixed(t) => out.push_str(t),
                UrlPart::Var(var) => {
                    let value = render_var(var, ctx).map_err(|m| missing(&m))?;
                    percent_encode(&value, &mut out);
                }
            }
        }
        for (name, value) in extra_query {
            sep(&mut out);
            percent_encode(name, &mut out);
            out.push('=');
            percent_encode(value, &mut out);
        }
        Ok(out)
    }
}

/// Percent-encodes every byte but RFC 3986's unreserved characters.
pub fn percent_encode(value: &str, out: &mut String) {
    crate::encoding::push_percent_encoded(out, value);
}

/// A route whose operations are followed, with none of its identity's secrets set.
fn no_handle_key(secrets: &[String]) -> Problem {
    Problem::new(
        500,
        "gateway-misconfigured",
        "Gateway is misconfigured",
        format!("This route hands out links to follow Azure's operations, sealed with a key from its identity's credential, but none of the Worker secrets it may use ({}) is set; nothing was sent. The operator should set one with `wrangler secret put`.", secrets.join(", ")),
    )
}

fn missing(what: &str) -> Problem {
    Problem::new(
        400,
        "missing-request-value",
        "The request lacks a value this route needs",
        format!("This route builds its Azure request from the request, but {what}."),
    )
}

fn bad_path_value(var: &Var) -> Problem {
    Problem::new(
        400,
        "bad-path-value",
        "A value cannot be used as a path segment",
        format!("The value of {var} fills one segment of the Azure URL: it must not be empty, '.' or '..', nor contain '/' or '\\'. Nothing was sent."),
    )
}

// ---------------------------------------------------------------------------------------------
// Bodies built from templates

/// How a body template's values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyFormat {
    Json,
    Xml,
}

impl BodyFormat {
    /// The format of a media type, when a template can build it.
    pub fn of(content_type: &str) -> Option<BodyFormat> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence == "application/json" || essence.ends_with("+json") {
            Some(BodyFormat::Json)
        } else if essence == "application/xml" || essence == "text/xml" || essence.ends_with("+xml")
        {
            Some(BodyFormat::Xml)
        } else {
            None
        }
    }

    /// Writes `value` escaped for a string in this format (a JSON string's inside, XML text or
    /// an attribute value); XML refuses a character it cannot carry even escaped.
    pub fn escape(self, value: &str, out: &mut String) -> Result<(), (usize, char)> {
        match self {
            BodyFormat::Json => {
                crate::encoding::push_json_str_inner(out, value);
                Ok(())
            }
            BodyFormat::Xml => crate::encoding::xml_escape(value, out),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Phases 7, 9 and 10

/// What [`build`] decided.
pub struct Plan<B> {
    request: BackendRequest,
    body: PlanBody<B>,
    /// The key of operation handles, when the route's operations can be followed.
    handle_key: Option<[u8; 32]>,
    /// A fresh UUID for a handle's nonce (empty when no handle can be made).
    nonce_seed: String,
    now_ms: f64,
    /// For an operation being followed: the route that started it (handles name it).
    issuer: Option<String>,
    /// For an operation being followed: the JSON pointers of its answer the caller sees (the
    /// `azure_operation` route's), applied to every successful answer.
    shape: Option<Vec<String>>,
    /// The answer's text when the backend's reply was read here (projection).
    projected: std::cell::RefCell<Option<String>>,
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
            Err(crate::pipeline::BodyError::TooLarge(seen)) if built_first => {
                return Err(built_too_large(seen, limit))
            }
            Err(crate::pipeline::BodyError::TooLarge(seen)) => {
                return Err(too_large(seen, rest.max_body_bytes))
            }
            Err(crate::pipeline::BodyError::Unreadable(why)) => {
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
    let url = rest.url.render(&values, &extra)?;
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
    // The handle key comes from whichever of the identity's secrets is set (during a rotation,
    // perhaps only the next one): a route that follows operations must be able to hand one
    // out, so with none set nothing is sent.
    let handle_key = match &rest.operation_path {
        Some(_) => match rest.handle_secrets.iter().find_map(|s| io.secret(s)) {
            Some(secret) => Some(operation_key(&secret)),
            None => return Err(no_handle_key(&rest.handle_secrets)),
        },
        None => None,
    };
    Ok(Plan {
        request,
        body,
        nonce_seed: if handle_key.is_some() {
            io.uuid()
        } else {
            String::new()
        },
        handle_key,
        now_ms: now,
        issuer: None,
        shape: None,
        projected: std::cell::RefCell::new(None),
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
    bearer: &super::Bearer<'_>,
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
    // A followed operation's answer is always shaped; a route's own answer is projected when
    // it is the resource (200, 201): a 202 starts an operation, and its body is not.
    let pointers = match &plan.shape {
        Some(shape) if (200..300).contains(&reply.status) => shape.as_slice(),
        None if !rest.project.is_empty() && matches!(reply.status, 200 | 201) => {
            rest.project.as_slice()
        }
        _ => return Ok(reply),
    };
    let is_json = reply
        .header("content-type")
        .is_some_and(|ct| BodyFormat::of(ct) == Some(BodyFormat::Json));
    let limit = rest.max_answer_bytes;
    let text = match reply.body {
        Some(body) => match io.text(body, limit).await {
            Ok(text) => text,
            Err(crate::pipeline::BodyError::TooLarge(seen)) => {
                cx.log.backend_detail = Some(format!(
                    "an answer of at least {seen} bytes, over max_answer_bytes ({limit}): not read"
                ));
                return Err(answer_too_large(limit));
            }
            Err(crate::pipeline::BodyError::Unreadable(why)) => {
                cx.log.backend_detail =
                    Some(super::log_detail(&format!("the answer broke off: {why}")));
                return Err(answer_unreadable("Azure's answer broke off before its end"));
            }
        },
        None => String::new(),
    };
    let projected = if text.is_empty() {
        // Nothing to project (an empty 200, 201 or 204).
        String::new()
    } else {
        match serde_json::from_str::<Value>(&text) {
            Ok(value) if is_json => project(&value, pointers).to_string(),
            _ => {
                return Err(answer_unreadable(
                    "Azure answered something that is not JSON",
                ))
            }
        }
    };
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
                let handle = operation_handle(key, route, azure, plan.now_ms, &plan.nonce_seed);
                headers.push(("location", path.replace("{operation}", &handle)));
            }
        }
    }
    let projected = plan.projected.borrow_mut().take();
    let body = match (projected, reply.body) {
        (Some(text), _) if text.is_empty() => AnswerBody::Empty,
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
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))?;
        Some(body[start..start + end].to_owned())
    };
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
    let mut out = Value::Object(serde_json::Map::new());
    for pointer in pointers {
        let Some(found) = value.pointer(pointer) else {
            continue;
        };
        let tokens: Vec<String> = pointer
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
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
        if tokens.is_empty() {
            return found.clone();
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Long-running operations

/// The key of a route's operation handles: derived from the identity's own secret, so it is the
/// same in every isolate and needs no configuration of its own.
pub fn operation_key(secret: &str) -> [u8; 32] {
    let mut input = b"azure-edge-gateway operation handle v1\n".to_vec();
    input.extend_from_slice(secret.as_bytes());
    crate::sha256::sha256(&input)
}

/// XORs `data` with a keystream of HMAC-SHA256(key, nonce ‖ counter) blocks: encryption and
/// decryption alike (a stream cipher with HMAC as its pseudorandom function).
fn keystream_xor(key: &[u8; 32], nonce: &[u8], data: &mut [u8]) {
    let enc = crate::sha256::hmac_sha256(key, b"encrypt");
    for (counter, chunk) in data.chunks_mut(32).enumerate() {
        let mut input = nonce.to_vec();
        input.extend_from_slice(&(counter as u32).to_be_bytes());
        let block = crate::sha256::hmac_sha256(&enc, &input);
        for (byte, k) in chunk.iter_mut().zip(block) {
            *byte ^= k;
        }
    }
}

fn handle_mac(key: &[u8; 32], sealed: &[u8]) -> [u8; 32] {
    crate::sha256::hmac_sha256(&crate::sha256::hmac_sha256(key, b"sign"), sealed)
}

/// An encrypted, signed, expiring handle of Azure's operation URL, issued by `route`:
/// `base64url(nonce ‖ ciphertext of "expiry \n route \n url") . base64url(HMAC)`. The caller
/// learns nothing of Azure's URL from it and cannot change it. `seed` makes the nonce (a fresh
/// UUID).
pub fn operation_handle(key: &[u8; 32], route: &str, url: &str, now_ms: f64, seed: &str) -> String {
    let expires = ((now_ms / 1000.0) + OPERATION_HANDLE_TTL_S).floor() as u64;
    let nonce = &crate::sha256::sha256(format!("{seed}\n{}", now_ms.to_bits()).as_bytes())[..16];
    let mut sealed = nonce.to_vec();
    let start = sealed.len();
    sealed.extend_from_slice(format!("{expires}\n{route}\n{url}").as_bytes());
    keystream_xor(key, nonce, &mut sealed[start..]);
    format!(
        "{}.{}",
        crate::encoding::base64url(&sealed),
        crate::encoding::base64url(&handle_mac(key, &sealed))
    )
}

/// A handle's route and URL, when one of `keys` made it and it has not expired.
pub fn open_handle(handle: &str, keys: &[[u8; 32]], now_ms: f64) -> Option<(String, String)> {
    let (sealed, mac) = handle.split_once('.')?;
    let sealed = crate::encoding::base64_decode(sealed)?;
    let mac = crate::encoding::base64_decode(mac)?;
    if sealed.len() < 16 {
        return None;
    }
    let key = keys
        .iter()
        .find(|key| crate::sha256::equal_in_constant_time(&handle_mac(key, &sealed), &mac))?;
    let (nonce, ciphertext) = sealed.split_at(16);
    let mut plain = ciphertext.to_vec();
    keystream_xor(key, nonce, &mut plain);
    let text = String::from_utf8(plain).ok()?;
    let mut parts = text.splitn(3, '\n');
    let expires: u64 = parts.next()?.parse().ok()?;
    let route = parts.next()?.to_owned();
    let url = parts.next()?.to_owned();
    (expires as f64 * 1000.0 >= now_ms).then_some((route, url))
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
        let keys: Vec<[u8; 32]> = rest
            .handle_secrets
            .iter()
            .filter_map(|s| io.secret(s))
            .map(|s| operation_key(&s))
            .collect();
        let Some((name, url)) = open_handle(handle, &keys, now) else {
            continue;
        };
        if name != route.name || !same_origin(&url, &rest.url.origin) {
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
            handle_key: keys.first().copied(),
            nonce_seed: io.uuid(),
            now_ms: now,
            issuer: Some(route.name.clone()),
            shape: Some(op.project.clone()),
            projected: std::cell::RefCell::new(None),
        };
        return Ok((rest, plan));
    }
    Err(bad_handle())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_render(url: &RestUrl, params: &[(&str, &str)]) -> Result<String, Problem> {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let header = |_: &str| None;
        let uuid = || "u".to_owned();
        let ctx = RenderContext {
            path: &params,
            query: &[],
            header: &header,
            request_id: "r",
            uuid: &uuid,
            now_ms: 0.0,
            jwt: None,
            body: None,
        };
        url.render(&ctx, &[("api-version", "2022-09-01")])
    }

    #[test]
    fn caller_values_fill_whole_segments_encoded_and_never_change_the_shape() {
        let url = RestUrl::parse(
            "https://management.azure.com/subscriptions/{path.sub}/sites/{path.site}/restart?x={path.q}",
        )
        .unwrap();
        assert_eq!(
            ctx_render(&url, &[("sub", "s1"), ("site", "a b?#%2F"), ("q", "1&y=2")]).unwrap(),
            "https://management.azure.com/subscriptions/s1/sites/a%20b%3F%23%252F/restart?x=1%26y%3D2&api-version=2022-09-01"
        );
        for bad in ["a/b", "..", ".", "", "a\\b"] {
            let p = ctx_render(&url, &[("sub", "s"), ("site", bad), ("q", "")]).unwrap_err();
            assert_eq!(p.kind, "bad-path-value", "{bad:?}");
        }
    }

    #[test]
    fn url_templates_keep_the_host_fixed() {
        let err = |u| RestUrl::parse(u).unwrap_err();
        assert!(err("https://{path.h}.vault.azure.net/secrets").contains("host is fixed"));
        assert!(err("https://management.azure.com/a{path.x}").contains("one whole variable"));
        assert!(err("https://management.azure.com/a/../b").contains("'..'"));
        assert!(err("https://management.azure.com/a?api-version=1").contains("api_version"));
        assert!(err("https://management.azure.com/a#f").contains("fragment"));
        assert!(err("https://management.azure.com/{body}").contains("body template"));
        let ok =
            RestUrl::parse("https://graph.microsoft.com/v1.0/users/{jwt.oid}?$select=id").unwrap();
        assert_eq!(ok.host, "graph.microsoft.com");
        assert_eq!(
            ok.shape(),
            "https://graph.microsoft.com/v1.0/users/{jwt.oid}?$select=id"
        );
    }

    #[test]
    fn handles_are_signed_bound_to_their_route_and_expire() {
        let key = operation_key("s3cret");
        let url = "https://management.azure.com/subscriptions/s/providers/Microsoft.Web/locations/westeurope/operationResults/1?api-version=2022-09-01";
        let h = operation_handle(&key, "restart", url, 1_000_000.0, "seed-1");
        // Nothing of Azure's URL can be read from the handle.
        let (sealed, _) = h.split_once('.').unwrap();
        let bytes = crate::encoding::base64_decode(sealed).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("management"));
        assert!(!bytes.windows(9).any(|w| w == b"westeurop"));
        assert_ne!(
            h,
            operation_handle(&key, "restart", url, 1_000_000.0, "seed-2")
        );
        assert_eq!(
            open_handle(&h, &[key], 1_000_000.0),
            Some(("restart".to_owned(), url.to_owned()))
        );
        assert_eq!(
            open_handle(&h, &[operation_key("other")], 1_000_000.0),
            None
        );
        let later = 1_000_000.0 + (OPERATION_HANDLE_TTL_S + 2.0) * 1000.0;
        assert_eq!(open_handle(&h, &[key], later), None);
        // A flipped bit in the ciphertext, or a forged one with the old signature.
        let (sealed, mac) = h.split_once('.').unwrap();
        let mut bytes = crate::encoding::base64_decode(sealed).unwrap();
        bytes[20] ^= 1;
        let flipped = format!("{}.{mac}", crate::encoding::base64url(&bytes));
        assert_eq!(open_handle(&flipped, &[key], 1_000_000.0), None);
        let forged = format!(
            "{}.{mac}",
            crate::encoding::base64url(b"0123456789abcdef99999999999\nrestart\nhttps://x")
        );
        assert_eq!(open_handle(&forged, &[key], 1_000_000.0), None);
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

    #[test]
    fn template_values_are_escaped_for_their_format() {
        let mut out = String::new();
        BodyFormat::Json.escape("a\"b\\\n", &mut out).unwrap();
        assert_eq!(out, "a\\\"b\\\\\\n");
        out.clear();
        BodyFormat::Xml.escape("<a & 'b'>", &mut out).unwrap();
        assert_eq!(out, "&lt;a &amp; &apos;b&apos;&gt;");
        assert_eq!(
            BodyFormat::Xml.escape("ok\u{1b}", &mut out),
            Err((2, '\u{1b}'))
        );
        assert_eq!(
            BodyFormat::of("application/json; charset=utf-8"),
            Some(BodyFormat::Json)
        );
        assert_eq!(
            BodyFormat::of("application/atom+xml"),
            Some(BodyFormat::Xml)
        );
        assert_eq!(BodyFormat::of("text/plain"), None);
    }
}
