//! Blob Storage: Put Blob, Get Blob and Get Blob Properties with a bearer token.
//!
//! Blob names built from caller input are checked before anything is sent: no `.`/`..`
//! segments, no backslashes or control characters, at most 1024 characters. Each `/`-separated
//! segment is then percent-encoded, so the name Azure stores is exactly the rendered one.

use serde_json::json;

use super::Verdict;
use crate::exchange::{
    Answer, AnswerBody, Backend, BackendRequest, Bearer, BodyError, Cx, Io, Limit, OutBody, Reply,
    StoredPlan,
};
use crate::policy::prepared::{BlobSettings, PreparedBlob};
use crate::policy::BlobBackend;
use crate::problem::Problem;
use crate::routing::{PathTemplate, Segment};
use crate::time::Utc;

/// The REST version sent on every call (OAuth needs 2017-11-09 or later).
pub const API_VERSION: &str = "2021-08-06";

/// What a request asks of a blob route, by its method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOp {
    Write,
    Read,
    Head,
}

impl BlobOp {
    pub fn for_method(method: &str) -> Option<BlobOp> {
        match method {
            "PUT" | "POST" => Some(BlobOp::Write),
            "GET" => Some(BlobOp::Read),
            "HEAD" => Some(BlobOp::Head),
            _ => None,
        }
    }
}

/// A template of the route could not be filled from the request (`missing` says what lacked).
pub fn missing_value(missing: String) -> Problem {
    Problem::new(
        400,
        "missing-request-value",
        "The request lacks a value this route needs",
        format!("This route builds a name from the request, but {missing}."),
    )
}

/// Checks a rendered blob name and percent-encodes it for the URL path.
pub fn encode_blob_name(name: &str) -> Result<String, Problem> {
    let bad = |why: &str| {
        Problem::new(
            400,
            "bad-blob-name",
            "The blob name built from this request is not allowed",
            format!("The blob name built from the request {why}; change the path, query or headers it is built from."),
        )
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.chars().count() > 1024 {
        return Err(bad("is longer than 1024 characters (Azure's limit)"));
    }
    if name.split('/').count() > MAX_NAME_SEGMENTS {
        return Err(bad(&format!(
            "has more than {MAX_NAME_SEGMENTS} path segments (Azure's limit)"
        )));
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return Err(bad("contains a control character or a backslash"));
    }
    if name.starts_with('/')
        || name
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(bad("has an empty, '.' or '..' segment"));
    }
    Ok(name
        .split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/"))
}

fn encode_segment(seg: &str) -> String {
    let mut out = String::with_capacity(seg.len());
    crate::encoding::push_percent_encoded(&mut out, seg);
    out
}

/// What a write stores besides the bytes: its content type and metadata, and the body's
/// length when the caller said it.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyInfo<'a> {
    pub content_type: Option<&'a str>,
    pub content_length: Option<u64>,
    pub metadata: &'a [(String, String)],
}

pub const DEFAULT_MAX_BODY_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_SINGLE_PUT_MAX_BYTES: u64 = 32 * 1024 * 1024;
/// The default block: each upload in blocks holds one block in memory, so 16 uploads at once
/// hold 16 of them (measured on workerd, 16 × 50 MiB: +77 MB of RSS in 1 MiB blocks, +170 MB in
/// 4 MiB; smaller blocks saved nothing more and were slower).
pub const DEFAULT_BLOCK_BYTES: u32 = 1024 * 1024;
/// The largest block the policy allows (one is held in memory).
pub const MAX_BLOCK_BYTES: u32 = 100 * 1024 * 1024;
const BLOCK_STEP: u64 = 64 * 1024;
pub const DEFAULT_IDLE_TIMEOUT_MS: u32 = 30_000;

impl BlobBackend {
    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES)
    }

    pub fn single_put_max_bytes(&self) -> u64 {
        self.single_put_max_bytes
            .unwrap_or(DEFAULT_SINGLE_PUT_MAX_BYTES)
    }

    /// `block_bytes`, or by default 1 MiB, or, when `max_body_bytes` needs more than 50,000 of
    /// those, the smallest multiple of 64 KiB that holds it in 50,000 blocks (at most
    /// [`MAX_BLOCK_BYTES`]), so the defaults always satisfy Azure's limit per blob.
    pub fn block_bytes(&self) -> u32 {
        self.block_bytes.unwrap_or_else(|| {
            let needed = self
                .max_body_bytes()
                .div_ceil(MAX_BLOCKS)
                .div_ceil(BLOCK_STEP)
                * BLOCK_STEP;
            let needed =
                u32::try_from(needed.min(u64::from(MAX_BLOCK_BYTES))).unwrap_or(MAX_BLOCK_BYTES);
            needed.max(DEFAULT_BLOCK_BYTES)
        })
    }

    pub fn idle_timeout_ms(&self) -> u32 {
        self.idle_timeout_ms.unwrap_or(DEFAULT_IDLE_TIMEOUT_MS)
    }
}

/// How a write's body goes to Azure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// One Put Blob, the caller's stream passed through untouched.
    Single { length: u64 },
    /// Put Block calls of at most `block_bytes`, then Put Block List.
    Blocks,
}

/// Chooses the upload, or refuses a body whose declared length is over the route's limit.
pub fn upload_for(backend: &BlobSettings, content_length: Option<u64>) -> Result<Upload, Problem> {
    match content_length {
        Some(length) if length > backend.max_body_bytes() => {
            Err(body_too_large(length, backend.max_body_bytes()))
        }
        Some(length) if length <= backend.single_put_max_bytes() => Ok(Upload::Single { length }),
        _ => Ok(Upload::Blocks),
    }
}

pub fn body_too_large(size: u64, limit: u64) -> Problem {
    Problem::new(
        413,
        "body-too-large",
        "Request body too large",
        format!("The body is {size} bytes or more; this route accepts at most {limit}. Nothing was committed."),
    )
}

/// The prefix of one upload's block ids: 32 hex digits from the upload's random UUID.
///
/// Azure keeps uncommitted blocks per blob *name*, not per upload: with ids that were the same
/// for every upload of a name (`block-00000000`, …), a second caller writing the same name could
/// replace a block of the first caller's upload before it was committed. Each upload's ids start
/// with its own random prefix, and its commit lists only its own ids.
pub fn upload_prefix(uuid: &str) -> String {
    let hex: String = uuid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(32)
        .collect();
    format!("{hex:0>32}")
}

/// Block ids must all have the same length within a blob: base64 of the upload's prefix and a
/// fixed-width counter (at most [`MAX_BLOCKS`] blocks, so six digits always suffice).
pub fn block_id(prefix: &str, index: u32) -> String {
    crate::encoding::base64(format!("{prefix}-{index:06}").as_bytes())
}

/// Azure's limit of committed blocks in one blob.
pub const MAX_BLOCKS: u64 = 50_000;
/// Azure's limit on a blob name's path segments.
pub const MAX_NAME_SEGMENTS: usize = 254;
/// Azure's limit on a blob's metadata: names and values together, in bytes.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

/// `PUT …?comp=block&blockid=…` with one block.
pub fn put_block_request(
    container_url: &str,
    encoded_name: &str,
    now_ms: f64,
    id: &str,
    length: usize,
) -> BackendRequest {
    let mut r = base_request(container_url, encoded_name, now_ms);
    r.url.push_str(&format!(
        "?comp=block&blockid={}",
        crate::encoding::form_encode(id)
    ));
    r.headers
        .push(("content-length".into(), length.to_string()));
    r.method = "PUT";
    r
}

/// `PUT …?comp=blocklist`: commits the blocks as the blob, with its content type, metadata and
/// create-only condition. The body is [`block_list_body`].
pub fn put_block_list_request(
    backend: &BlobSettings,
    container_url: &str,
    encoded_name: &str,
    now_ms: f64,
    ids: &[String],
    info: BodyInfo,
) -> (BackendRequest, String) {
    let body = block_list_body(ids);
    let mut r = base_request(container_url, encoded_name, now_ms);
    r.url.push_str("?comp=blocklist");
    r.method = "PUT";
    r.headers
        .push(("content-type".into(), "application/xml".into()));
    r.headers
        .push(("content-length".into(), body.len().to_string()));
    r.headers.push((
        "x-ms-blob-content-type".into(),
        content_type(backend, info).to_owned(),
    ));
    push_write_headers(&mut r, backend, info);
    (r, body)
}

pub fn block_list_body(ids: &[String]) -> String {
    let mut body = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>");
    for id in ids {
        body.push_str(&format!("<Latest>{id}</Latest>"));
    }
    body.push_str("</BlockList>");
    body
}

fn content_type<'a>(backend: &'a BlobSettings, info: BodyInfo<'a>) -> &'a str {
    backend
        .content_type
        .as_deref()
        .or(info.content_type)
        .unwrap_or("application/octet-stream")
}

fn push_write_headers(r: &mut BackendRequest, backend: &BlobSettings, info: BodyInfo) {
    for (name, value) in info.metadata {
        r.headers.push((format!("x-ms-meta-{name}"), value.clone()));
    }
    if !backend.overwrite {
        r.headers.push(("if-none-match".into(), "*".into()));
    }
}

fn base_request(container_url: &str, encoded_name: &str, now_ms: f64) -> BackendRequest {
    BackendRequest {
        method: "GET",
        url: format!("{container_url}/{encoded_name}"),
        headers: vec![
            ("x-ms-version".into(), API_VERSION.to_owned()),
            ("x-ms-date".into(), Utc::from_millis(now_ms).http_date()),
        ],
        ..Default::default()
    }
}

/// Metadata Azure will store: at most [`MAX_METADATA_BYTES`] of names and values together.
/// (That each value can travel as a header is the outgoing gate's job, [`super::check`].)
pub fn check_metadata(metadata: &[(String, String)]) -> Result<(), Problem> {
    let total: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_METADATA_BYTES {
        return Err(Problem::new(
            400,
            "metadata-too-large",
            "Blob metadata built from this request is too large",
            format!("The metadata built from the request takes {total} bytes (names and values); Azure allows at most {MAX_METADATA_BYTES} (8 KB) per blob. Send shorter values; nothing was written."),
        ));
    }
    Ok(())
}

/// The request for `op` on the blob `encoded_name`; the edge streams a write's body.
pub fn request(
    backend: &BlobSettings,
    container_url: &str,
    op: BlobOp,
    encoded_name: &str,
    now_ms: f64,
    info: BodyInfo,
) -> BackendRequest {
    let mut r = base_request(container_url, encoded_name, now_ms);
    match op {
        BlobOp::Write => {
            r.method = "PUT";
            r.headers
                .push(("x-ms-blob-type".into(), "BlockBlob".into()));
            r.headers.push((
                "content-type".into(),
                content_type(backend, info).to_owned(),
            ));
            if let Some(len) = info.content_length {
                r.headers.push(("content-length".into(), len.to_string()));
            }
            push_write_headers(&mut r, backend, info);
        }
        BlobOp::Read => r.method = "GET",
        BlobOp::Head => r.method = "HEAD",
    }
    r
}

/// The path of the first route among `readers` (the GET routes on the same container and
/// name template, found when the policy was compiled) whose parameters the write had: a
/// write's `Location`.
pub fn read_location(readers: &[PathTemplate], params: &[(String, String)]) -> Option<String> {
    readers.iter().find_map(|template| {
        let mut path = String::new();
        for segment in &template.segments {
            path.push('/');
            match segment {
                Segment::Literal(l) => path.push_str(&encode_segment(l)),
                Segment::Param(p) => {
                    path.push_str(&encode_segment(&params.iter().find(|(k, _)| k == p)?.1))
                }
            }
        }
        Some(if path.is_empty() {
            "/".to_owned()
        } else {
            path
        })
    })
}

/// Time limit of one call whose body is held in memory (a block, the commit), per attempt.
pub const CALL_TIMEOUT_MS: f64 = 30_000.0;

/// What [`build`] decided.
pub struct Plan<B> {
    /// A single Put Blob's body, read whole, on a route that stores requests Azure cannot take
    /// (so it can be sent again, and stored); otherwise the caller's stream goes through.
    held: Option<B>,
    op: BlobOp,
    /// The rendered name, and as it goes in the URL.
    name: String,
    encoded: String,
    upload: Option<Upload>,
    /// The request that carries the caller's values: the read, the single Put Blob, or (for a
    /// block upload) the commit that ends it, checked by the outgoing gate before anything of
    /// the call is sent.
    first: BackendRequest,
    content_type: Option<String>,
    metadata: Vec<(String, String)>,
}

impl<B> Plan<B> {
    /// The request that carries the caller's values (its URL names the blob).
    pub fn request(&self) -> &BackendRequest {
        &self.first
    }
}

/// Phase 7: the blob name and metadata from the request, Azure's limits, the upload's shape,
/// and the outgoing gate: all before a token is fetched.
pub async fn build<I: Io>(
    b: &PreparedBlob,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Plan<I::Bytes>, Problem> {
    let head = cx.head;
    let op = BlobOp::for_method(&head.method)
        .ok_or_else(|| Problem::method_not_allowed(&head.method, "GET, HEAD, PUT, POST"))?;
    let header = |name: &str| head.header(name).map(str::to_owned);
    let uuid = || io.uuid();
    let now = io.now();
    let values = cx.render_context(&header, &uuid, now);
    let name = b.name.render(&values).map_err(missing_value)?;
    let encoded = encode_blob_name(&name)?;
    let mut metadata = Vec::new();
    if op == BlobOp::Write {
        for (meta, template) in &b.metadata {
            metadata.push((
                meta.clone(),
                template.render(&values).map_err(missing_value)?,
            ));
        }
        check_metadata(&metadata)?;
    }
    let content_type = head.header("content-type").map(str::to_owned);
    let upload = match op {
        BlobOp::Write => Some(upload_for(&b.config, head.content_length())?),
        _ => None,
    };
    let info = BodyInfo {
        content_type: content_type.as_deref(),
        content_length: None,
        metadata: &metadata,
    };
    let url = &b.container_url;
    let first = match upload {
        Some(Upload::Blocks) => put_block_list_request(&b.config, url, &encoded, now, &[], info).0,
        Some(Upload::Single { length }) => {
            let info = BodyInfo {
                content_length: Some(length),
                ..info
            };
            request(&b.config, url, op, &encoded, now, info)
        }
        None => request(&b.config, url, op, &encoded, now, info),
    };
    super::check(&first)?;
    // A route that stores requests holds a small body whole: it can then be sent again, and
    // stored when Azure cannot take it.
    let mut held = None;
    if let Some(Upload::Single { length }) = upload {
        let stores = cx.route.is_some_and(|r| r.store.is_some());
        if stores && length <= crate::store::MAX_STORED_BODY_BYTES as u64 {
            match io.read_body(length).await {
                Ok(Some((body, _))) => held = Some(body),
                Ok(None) => {}
                Err(BodyError::TooLarge(seen)) => return Err(body_too_large(seen, length)),
                Err(BodyError::Unreadable(why)) => return Err(super::unreadable(&why)),
            }
        }
    }
    Ok(Plan {
        held,
        op,
        name,
        encoded,
        upload,
        first,
        content_type,
        metadata,
    })
}

/// Phase 9: the read, the single streamed Put Blob (not replayable: no retry), or the blocks
/// and their commit (each retried). No streamed transfer has a whole-transfer limit: a read is
/// timed on progress, a single Put Blob by its length (the edge's `send`).
pub async fn send<I: Io>(
    b: &PreparedBlob,
    plan: &Plan<I::Bytes>,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    if let Some(held) = &plan.held {
        let deadline = Limit::Deadline(CALL_TIMEOUT_MS);
        let body = OutBody::Bytes(held);
        return retried(b, plan, &plan.first, bearer, body, deadline, cx, io).await;
    }
    let idle = Limit::Idle(b.config.idle_timeout_ms());
    let (body, limit, ok) = match (plan.op, plan.upload) {
        (_, Some(Upload::Blocks)) => return write_blocks(b, plan, bearer, cx, io).await,
        (_, Some(Upload::Single { length })) => (OutBody::CallerStream { length }, idle, 201),
        (BlobOp::Head, None) => (OutBody::None, Limit::Deadline(CALL_TIMEOUT_MS), 200),
        (_, None) => (OutBody::None, idle, 200),
    };
    // A read is sent again once with a fresh token after a 401; the caller's stream is not.
    let reply = super::send_renewing(io, &plan.first, bearer, body, limit, &mut cx.log).await?;
    let reply = reply.map_err(|e| match e {
        crate::exchange::SendError::Unsendable(problem) => problem,
        crate::exchange::SendError::Timeout => stalled(b.config.idle_timeout_ms()),
        e => unavailable(&format!("could not be reached ({e})"), None),
    })?;
    cx.log.backend_status = Some(reply.status);
    if reply.status == ok {
        return Ok(reply);
    }
    Err(failure(b, plan, reply, bearer, io).await)
}

/// Put Block for each block of the body as it arrives (the edge holds one block at a time, as
/// its own buffer), each retried on 429/5xx/network errors, then Put Block List. Any failure
/// leaves nothing committed. Block ids carry this upload's own random prefix.
async fn write_blocks<I: Io>(
    b: &PreparedBlob,
    plan: &Plan<I::Bytes>,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    let limit = b
        .config
        .max_body_bytes()
        .min(cx.max_body().unwrap_or(u64::MAX));
    let prefix = upload_prefix(&io.uuid());
    let mut ids: Vec<String> = Vec::new();
    let deadline = Limit::Deadline(CALL_TIMEOUT_MS);
    loop {
        let (block, length) = match io.next_block(b.config.block_bytes(), limit).await {
            Ok(Some(block)) => block,
            Ok(None) => break,
            Err(BodyError::TooLarge(seen)) => return Err(body_too_large(seen, limit)),
            Err(BodyError::Unreadable(why)) => return Err(super::unreadable(&why)),
        };
        let id = block_id(&prefix, ids.len() as u32);
        let request = put_block_request(
            &b.container_url,
            &plan.encoded,
            io.now(),
            &id,
            length as usize,
        );
        let body = OutBody::Bytes(&block);
        retried(b, plan, &request, bearer, body, deadline, cx, io).await?;
        ids.push(id);
    }
    let info = BodyInfo {
        content_type: plan.content_type.as_deref(),
        content_length: None,
        metadata: &plan.metadata,
    };
    let (request, list) = put_block_list_request(
        &b.config,
        &b.container_url,
        &plan.encoded,
        io.now(),
        &ids,
        info,
    );
    retried(
        b,
        plan,
        &request,
        bearer,
        OutBody::Text(&list),
        deadline,
        cx,
        io,
    )
    .await
}

/// One call with a body held in memory, retried where a retry can help.
#[allow(clippy::too_many_arguments)]
async fn retried<I: Io>(
    b: &PreparedBlob,
    plan: &Plan<I::Bytes>,
    request: &BackendRequest,
    bearer: &Bearer<'_>,
    body: OutBody<'_, I::Bytes>,
    limit: Limit,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    super::send_retried(
        io,
        request,
        bearer,
        body,
        limit,
        &mut cx.log,
        // PUTs with a body the edge holds: sending one twice writes the same bytes again (or,
        // create-only, is refused).
        (super::Resend::Safe, "Blob Storage"),
        async |reply: Reply<I::Stream>, earlier_unknown| {
            if (200..300).contains(&reply.status) {
                return Verdict::Done(reply);
            }
            if earlier_unknown && reply.status == 409 && request.header("if-none-match") == Some("*")
            {
                // A create-only write sent again after an attempt whose answer was lost: the
                // blob that is there now is most likely that attempt's own. Neither "created"
                // nor "someone else's": say what is known.
                super::drain(io, reply.body).await;
                return Verdict::Fail {
                    problem: super::outcome_unknown(
                        "Blob Storage",
                        &format!("an attempt's answer was lost, and sent again the create-only write of '{}' found the blob already there (most likely that attempt's own write)", plan.name),
                        false,
                    ),
                    detail: Some("outcome unknown: 409 after an attempt whose answer was lost".to_owned()),
                };
            }
            if reply.status == 429 || reply.status >= 500 {
                let retry_after = crate::retry::parse_retry_after_secs(reply.header("retry-after"));
                super::drain(io, reply.body).await;
                return Verdict::Retry(retry_after);
            }
            Verdict::Fail {
                problem: failure(b, plan, reply, bearer, io).await,
                detail: None,
            }
        },
        unavailable,
    )
    .await
}

/// The problem for a failed call; a 401 also evicts the token. Azure's error body is drained,
/// not passed on.
async fn failure<I: Io>(
    b: &PreparedBlob,
    plan: &Plan<I::Bytes>,
    reply: Reply<I::Stream>,
    bearer: &Bearer<'_>,
    io: &I,
) -> Problem {
    let code = reply.header("x-ms-error-code").map(str::to_owned);
    let status = reply.status;
    super::drain(io, reply.body).await;
    let (problem, evict) = map_error(
        plan.op,
        status,
        code.as_deref(),
        &b.config.container,
        &plan.name,
    );
    if evict {
        bearer.evict(io);
    }
    problem
}

/// Store-and-forward: a single Put Blob whose body is held (create-only, so a second delivery
/// is refused by Azure, not written twice).
pub fn stored<B>(plan: &Plan<B>) -> Option<crate::exchange::StoredPlan<'_, B>> {
    let held = plan.held.as_ref()?;
    Some(crate::exchange::StoredPlan {
        request: &plan.first,
        body: OutBody::Bytes(held),
        ids: vec![plan.name.clone()],
    })
}

/// Store-and-forward's delivery: the stored write, when it is one route `route` (over `b`)
/// makes today: a create-only (`If-None-Match: *`) `PUT` of a block blob in its container, of a
/// name its template can make, with only the headers such a write carries (its metadata's by
/// name, its content type when the route fixes one). The gateway's own headers (`x-ms-version`,
/// `x-ms-date`) are made anew for the time it is sent. Otherwise why not.
pub fn stored_request(
    b: &PreparedBlob,
    route: &str,
    stored: &crate::store::Stored,
    now_ms: f64,
) -> Result<BackendRequest, String> {
    use crate::store::shown;
    if b.config.overwrite {
        return Err(format!(
            "route \"{route}\" overwrites blobs, so it cannot take a stored write (a second delivery could overwrite a newer one)"
        ));
    }
    let method = stored.method_is("PUT", route)?;
    let outside = || {
        format!(
            "its URL is {}, not a blob in route \"{route}\"'s container {}",
            shown(&stored.url),
            b.container_url
        )
    };
    let encoded = stored
        .url
        .strip_prefix(b.container_url.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        .ok_or_else(outside)?;
    // The name as the gateway writes it in a URL (each segment percent-encoded, nothing else: no
    // query, no other encoding of the same name).
    let name = crate::encoding::percent_decode(encoded)
        .filter(|name| encode_blob_name(name).is_ok_and(|again| again == encoded))
        .ok_or_else(outside)?;
    if !b.name.could_render(&name) {
        return Err(format!(
            "its blob name {} is not one route \"{route}\"'s name template \"{}\" makes",
            shown(&name),
            b.name
        ));
    }
    let allowed = |header: &str| {
        matches!(
            header,
            "x-ms-version"
                | "x-ms-date"
                | "x-ms-blob-type"
                | "content-type"
                | "content-length"
                | "if-none-match"
        ) || header.strip_prefix("x-ms-meta-").is_some_and(|meta| {
            b.metadata
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case(meta))
        })
    };
    let mut headers = stored.headers_within(&allowed, route)?;
    if stored.header("if-none-match") != Some("*") {
        return Err("it is not create-only (no If-None-Match: *), so a second delivery could overwrite the blob".to_owned());
    }
    if stored.header("x-ms-blob-type") != Some("BlockBlob") {
        return Err(format!(
            "its x-ms-blob-type is not BlockBlob, which route \"{route}\" writes"
        ));
    }
    if let Some(fixed) = &b.config.content_type {
        if stored.header("content-type") != Some(fixed.as_str()) {
            return Err(format!(
                "its Content-Type is not {}, which route \"{route}\" sets",
                shown(fixed)
            ));
        }
    }
    headers.retain(|(name, _)| {
        !name.eq_ignore_ascii_case("x-ms-version") && !name.eq_ignore_ascii_case("x-ms-date")
    });
    let own = base_request(&b.container_url, encoded, now_ms);
    let mut all = own.headers;
    all.extend(headers);
    Ok(BackendRequest {
        method,
        url: own.url,
        headers: all,
        ..Default::default()
    })
}

/// The caller's 202 for a stored write.
pub fn queued<B, S>(b: &PreparedBlob, plan: &Plan<B>) -> Answer<S> {
    Answer::json(
        202,
        serde_json::json!({"status": "queued", "container": b.config.container, "blob": plan.name})
            .to_string(),
    )
}

/// Phase 10: 201 with the blob's name, ETag and `Location`; a read streamed back; a HEAD's
/// properties.
pub fn answer<B, S>(b: &PreparedBlob, plan: &Plan<B>, reply: Reply<S>, cx: &Cx<'_>) -> Answer<S> {
    if plan.op == BlobOp::Write {
        let mut answer = Answer::json(
            201,
            created_body(&b.config.container, &plan.name, reply.header("etag")),
        );
        if let Some(location) = read_location(&b.readers, &cx.params) {
            answer.headers.push(("location", location));
        }
        return answer;
    }
    let mut headers = Vec::new();
    for name in ["content-type", "content-length", "etag", "last-modified"] {
        if let Some(value) = reply.header(name) {
            headers.push((name, value.to_owned()));
        }
    }
    let body = match (plan.op, reply.body) {
        (BlobOp::Read, Some(stream)) => AnswerBody::Stream(stream),
        _ => AnswerBody::Empty,
    };
    Answer {
        status: 200,
        headers,
        body,
    }
}

/// A streamed transfer that stopped making progress.
fn stalled(idle_ms: f64) -> Problem {
    Problem::new(
        504,
        "backend-timeout",
        "The transfer stalled",
        format!("The transfer between the caller and Blob Storage made no progress in the time allowed (a read: {} ms without bytes; an upload: that plus its length at 64 KiB/s), so it was stopped and nothing was committed. Try again.", idle_ms as u64),
    )
}

fn unavailable(why: &str, retry_after: Option<u64>) -> Problem {
    Problem::new(
        503,
        "backend-unavailable",
        "Blob Storage is unavailable",
        format!("Blob Storage {why}; nothing was committed. Try again later."),
    )
    .with_header(
        "retry-after",
        crate::retry::caller_retry_after(retry_after).to_string(),
    )
}

/// The caller's answer to a successful write.
pub fn created_body(container: &str, blob: &str, etag: Option<&str>) -> String {
    json!({ "container": container, "blob": blob, "etag": etag }).to_string()
}

/// What a failed call means for the caller, and whether the token must be evicted (401).
pub fn map_error(
    op: BlobOp,
    status: u16,
    error_code: Option<&str>,
    container: &str,
    blob: &str,
) -> (Problem, bool) {
    // Azure's error codes are identifiers; anything else is not passed on.
    let code: String = error_code
        .unwrap_or("unknown")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect();
    let problem = match (status, code.as_str()) {
        (404, "ContainerNotFound") => Problem::new(
            502,
            "backend-container-not-found",
            "The storage container does not exist",
            format!("Blob Storage has no container '{container}'; the operator should create it or fix the route's container."),
        ),
        (404, _) if op != BlobOp::Write => Problem::new(404, "blob-not-found", "No such blob", format!("There is no blob '{blob}' in '{container}'.")),
        (409, "BlobAlreadyExists") => Problem::new(
            409,
            "blob-already-exists",
            "The blob already exists",
            format!("A blob named '{blob}' already exists and this route only creates; use another name."),
        ),
        (401 | 403, _) => Problem::new(
            502,
            "backend-authorization-failed",
            "Blob Storage refused the gateway's identity",
            format!("Blob Storage answered {status} ({code}): the identity's token is not accepted or lacks a data role (for example Storage Blob Data Contributor) on the container; the operator should check the identity's audience and role assignment."),
        ),
        (413, _) => Problem::new(413, "body-too-large", "Request body too large", "Blob Storage refused the body as too large."),
        (500..=599, _) => Problem::new(
            503,
            "backend-unavailable",
            "Blob Storage is unavailable",
            format!("Blob Storage answered {status} ({code}); try again later."),
        )
        .with_header("retry-after", "5"),
        _ => Problem::new(
            502,
            "backend-error",
            "Blob Storage refused the request",
            format!("Blob Storage answered {status} ({code})."),
        ),
    };
    (
        problem.with_extension("backend_status", json!(status)),
        status == 401,
    )
}

impl Backend for PreparedBlob {
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

    fn stored<'p, B>(&self, plan: &'p Self::Plan<B>) -> Option<StoredPlan<'p, B>> {
        stored(plan)
    }

    fn queued<B, S>(&self, plan: &Self::Plan<B>) -> Answer<S> {
        queued(self, plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(overwrite: bool) -> BlobSettings {
        BlobSettings::from(&BlobBackend {
            account: Some("acct".into()),
            endpoint: None,
            container: "uploads".into(),
            blob: "{path.name}".into(),
            content_type: None,
            metadata: Default::default(),
            max_body_bytes: Some(1000),
            single_put_max_bytes: Some(100),
            block_bytes: Some(64 * 1024),
            idle_timeout_ms: None,
            overwrite,
            identity: "gw".into(),
            audience: None,
        })
    }

    #[test]
    fn names_from_callers_are_checked_then_encoded() {
        assert_eq!(
            encode_blob_name("a/b c/ü.txt").unwrap(),
            "a/b%20c/%C3%BC.txt"
        );
        assert_eq!(encode_blob_name("a%2Fb?#").unwrap(), "a%252Fb%3F%23");
        for bad in [
            "",
            "../etc/passwd",
            "a/../b",
            "a/./b",
            "/abs",
            "a//b",
            "a\\b",
            "a\u{0}b",
            "tab\tname",
        ] {
            assert_eq!(encode_blob_name(bad).unwrap_err().status, 400, "{bad:?}");
        }
        assert!(encode_blob_name(&"x".repeat(1025)).is_err());
        assert!(encode_blob_name(&"x".repeat(1024)).is_ok());
        assert!(encode_blob_name(&["s"; 254].join("/")).is_ok());
        let deep = encode_blob_name(&["s"; 255].join("/")).unwrap_err();
        assert!(deep.detail.contains("254"), "{}", deep.detail);
    }

    #[test]
    fn requests_pin_the_version_and_date_and_create_only_by_default() {
        let r = request(
            &backend(false),
            "https://acct.blob.core.windows.net/uploads",
            BlobOp::Write,
            "a/b.txt",
            784_111_777_000.0,
            BodyInfo {
                content_type: Some("text/plain"),
                content_length: Some(5),
                metadata: &[],
            },
        );
        assert_eq!(
            (r.method, r.url.as_str()),
            ("PUT", "https://acct.blob.core.windows.net/uploads/a/b.txt")
        );
        assert_eq!(
            r.header("authorization"),
            None,
            "the edge adds the token when it sends"
        );
        assert_eq!(r.header("x-ms-version"), Some(API_VERSION));
        assert!(
            API_VERSION >= "2017-11-09",
            "OAuth needs 2017-11-09 or later"
        );
        assert_eq!(r.header("x-ms-date"), Some("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(r.header("x-ms-blob-type"), Some("BlockBlob"));
        assert_eq!(r.header("content-length"), Some("5"));
        assert_eq!(r.header("if-none-match"), Some("*"));
        let over = request(
            &backend(true),
            "https://acct.blob.core.chinacloudapi.cn/uploads",
            BlobOp::Write,
            "x",
            0.0,
            BodyInfo {
                content_type: None,
                content_length: Some(0),
                metadata: &[],
            },
        );
        assert_eq!(over.header("if-none-match"), None);
        assert_eq!(
            over.header("content-type"),
            Some("application/octet-stream")
        );
        assert!(over
            .url
            .starts_with("https://acct.blob.core.chinacloudapi.cn/"));
        let read = request(
            &backend(false),
            "https://acct.blob.core.windows.net/uploads",
            BlobOp::Read,
            "x",
            0.0,
            BodyInfo {
                content_type: None,
                content_length: None,
                metadata: &[],
            },
        );
        assert_eq!((read.method, read.header("x-ms-blob-type")), ("GET", None));
    }

    #[test]
    fn the_upload_follows_the_declared_length() {
        let b = backend(false);
        assert_eq!(
            upload_for(&b, Some(100)),
            Ok(Upload::Single { length: 100 })
        );
        assert_eq!(upload_for(&b, Some(101)), Ok(Upload::Blocks));
        assert_eq!(upload_for(&b, None), Ok(Upload::Blocks));
        let p = upload_for(&b, Some(1001)).unwrap_err();
        assert_eq!((p.status, p.kind), (413, "body-too-large"));
    }

    #[test]
    fn block_ids_have_one_length_and_the_list_commits_them_in_order() {
        let prefix = upload_prefix("0af76519-16cd-43dd-8448-eb211c80319c");
        assert_eq!(prefix, "0af7651916cd43dd8448eb211c80319c");
        let ids: Vec<String> = [0, 9, 10, 49_999]
            .into_iter()
            .map(|i| block_id(&prefix, i))
            .collect();
        assert!(ids.iter().all(|id| id.len() == ids[0].len()));
        assert_eq!(
            crate::encoding::base64_decode(&ids[3]).unwrap(),
            b"0af7651916cd43dd8448eb211c80319c-049999"
        );
        // Azure: at most 64 bytes before encoding.
        assert!(crate::encoding::base64_decode(&ids[3]).unwrap().len() <= 64);
        // Two uploads of the same name never share an id, whatever their block numbers.
        let other = upload_prefix("7c9e6679-7425-40de-944b-e07fc1f90ae7");
        assert!(ids
            .iter()
            .all(|id| (0..50_000).all(|i| *id != block_id(&other, i))));
        assert_eq!(
            block_list_body(&ids[..2]),
            format!("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList><Latest>{}</Latest><Latest>{}</Latest></BlockList>", ids[0], ids[1])
        );
        let r = put_block_request(
            "https://acct.blob.core.windows.net/uploads",
            "a.bin",
            0.0,
            &ids[0],
            300,
        );
        assert_eq!(
            r.url,
            format!(
                "https://acct.blob.core.windows.net/uploads/a.bin?comp=block&blockid={}",
                crate::encoding::form_encode(&ids[0])
            )
        );
        assert_eq!(r.header("content-length"), Some("300"));
        let meta = [("tenant".to_owned(), "contoso".to_owned())];
        let info = BodyInfo {
            content_type: Some("image/png"),
            content_length: None,
            metadata: &meta,
        };
        let (list, body) = put_block_list_request(
            &backend(false),
            "https://acct.blob.core.windows.net/uploads",
            "a.bin",
            0.0,
            &ids,
            info,
        );
        assert!(list.url.ends_with("/uploads/a.bin?comp=blocklist"));
        assert_eq!(list.header("x-ms-blob-content-type"), Some("image/png"));
        assert_eq!(list.header("x-ms-meta-tenant"), Some("contoso"));
        assert_eq!(list.header("if-none-match"), Some("*"));
        assert_eq!(
            list.header("content-length"),
            Some(body.len().to_string().as_str())
        );
    }

    #[test]
    fn a_fixed_content_type_wins_and_metadata_travels_as_headers() {
        let mut b = backend(true);
        b.content_type = Some("application/json".into());
        let meta = [("source".to_owned(), "edge".to_owned())];
        let info = BodyInfo {
            content_type: Some("text/plain"),
            content_length: Some(2),
            metadata: &meta,
        };
        let r = request(
            &b,
            "https://acct.blob.core.windows.net/uploads",
            BlobOp::Write,
            "x",
            0.0,
            info,
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-ms-meta-source"), Some("edge"));
        assert!(check_metadata(&[("a".into(), "ok".into())]).is_ok());
        // Names and values count together against Azure's 8 KB.
        let at_limit = [("note".to_owned(), "x".repeat(MAX_METADATA_BYTES - 4))];
        assert!(check_metadata(&at_limit).is_ok());
        let over = [
            ("note".to_owned(), "x".repeat(MAX_METADATA_BYTES - 4)),
            ("b".to_owned(), String::new()),
        ];
        let p = check_metadata(&over).unwrap_err();
        assert_eq!((p.status, p.kind), (400, "metadata-too-large"));
        assert!(p.detail.contains("8192"), "{}", p.detail);
        // A non-ASCII value is the outgoing gate's to refuse, naming the metadata.
        let r = request(
            &b,
            "https://acct.blob.core.windows.net/uploads",
            BlobOp::Write,
            "x",
            0.0,
            BodyInfo {
                metadata: &[("a".into(), "nö".into())],
                ..info
            },
        );
        let p = crate::backend::check(&r).unwrap_err();
        assert_eq!(p.status, 400);
        assert!(p.detail.contains("metadata value a"), "{}", p.detail);
    }

    #[test]
    fn the_read_route_of_a_written_blob_is_its_location() {
        let readers = vec![
            PathTemplate::parse("/by-tenant/{tenant}/{name}").unwrap(),
            PathTemplate::parse("/read/{name}").unwrap(),
        ];
        let params = vec![("name".to_owned(), "a b.txt".to_owned())];
        // The first reader needs a parameter the write did not have: the next one is used.
        assert_eq!(
            read_location(&readers, &params),
            Some("/read/a%20b.txt".to_owned())
        );
        assert_eq!(read_location(&readers[..1], &params), None);
        assert_eq!(read_location(&[], &params), None, "no route reads it back");
    }

    #[test]
    fn errors_map_to_what_the_caller_can_act_on() {
        let map = |op, status, code| map_error(op, status, Some(code), "uploads", "a.txt");
        assert_eq!(map(BlobOp::Write, 409, "BlobAlreadyExists").0.status, 409);
        let (p, _) = map(BlobOp::Write, 404, "ContainerNotFound");
        assert_eq!((p.status, p.kind), (502, "backend-container-not-found"));
        assert!(p.detail.contains("'uploads'"));
        assert_eq!(map(BlobOp::Read, 404, "BlobNotFound").0.status, 404);
        let (p, evict) = map(BlobOp::Write, 401, "InvalidAuthenticationInfo");
        assert_eq!((p.status, evict), (502, true));
        let (p, evict) = map(BlobOp::Write, 403, "AuthorizationPermissionMismatch");
        assert_eq!((p.status, evict), (502, false));
        assert!(p.detail.contains("AuthorizationPermissionMismatch"));
        // Only an identifier is passed on from Azure's error code header.
        let (p, _) = map(BlobOp::Write, 400, "Bad\r\n<script>");
        assert!(p.detail.contains("(Badscript)"), "{}", p.detail);
        let (p, _) = map(BlobOp::Write, 503, "ServerBusy");
        assert_eq!((p.status, p.headers[0].0), (503, "retry-after"));
    }
}
