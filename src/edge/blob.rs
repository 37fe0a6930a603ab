//! Blob routes at the edge: name, token, then Put Blob (the caller's stream passed through),
//! Put Block + Put Block List (one block in memory), or Get Blob streamed back.

use worker::{Context, Env, Request, Response};

use super::{
    backend_token, body, cloud, declared_length, http, internal, new_request_id, now, render,
    tokens, unreadable, Caller, BACKEND_TIMEOUT_MS,
};
use crate::backend::blob::{self, BlobOp};
use crate::backend::BackendRequest;
use crate::pipeline::LogLine;
use crate::policy::{BlobBackend, Policy};
use crate::problem::Problem;
use wasm_bindgen::JsValue;

/// A blob route: build the name, get a token, call Blob Storage, map its answer.
pub(super) async fn call(
    req: &Request,
    env: &Env,
    ctx: &Context,
    log: &mut LogLine<'_>,
    backend: &'static BlobBackend,
    caller: &Caller<'_>,
) -> std::result::Result<Response, Problem> {
    let params = caller.params;
    let op = BlobOp::for_method(log.method)
        .ok_or_else(|| Problem::method_not_allowed(log.method, "GET, HEAD, PUT, POST"))?;
    let name = render(&backend.blob, req, caller, log.request_id)?;
    let encoded = blob::encode_blob_name(&name)?;
    let cloud = cloud();
    // Checked before a token is fetched: names, metadata, the declared size, and (through the
    // outgoing gate) every header that carries a caller's value.
    let caller_type = req.headers().get("content-type").ok().flatten();
    let mut metadata = Vec::new();
    if op == BlobOp::Write {
        for (meta, text) in &backend.metadata {
            metadata.push((meta.clone(), render(text, req, caller, log.request_id)?));
        }
        blob::check_metadata(&metadata)?;
    }
    let info = blob::BodyInfo {
        content_type: caller_type.as_deref(),
        content_length: None,
        metadata: &metadata,
    };
    let upload = match op {
        BlobOp::Write => Some(blob::upload_for(backend, declared_length(req))?),
        _ => None,
    };
    // The request that carries the caller's values: for blocks, the commit (Put Block List)
    // that ends the upload, built now so that it is checked before the first block is sent.
    let first = match upload {
        Some(blob::Upload::Blocks) => {
            blob::put_block_list_request(backend, cloud, &encoded, now(), &[], info).0
        }
        Some(blob::Upload::Single { length }) => {
            let info = blob::BodyInfo {
                content_length: Some(length),
                ..info
            };
            blob::request(backend, cloud, op, &encoded, now(), info)
        }
        None => blob::request(backend, cloud, op, &encoded, now(), info),
    };
    crate::backend::check(&first)?;

    let (policy, obtained) =
        backend_token(&backend.identity, backend.audience(), env, ctx, log).await?;
    log.token_ttl_s = Some((obtained.token.expires_at - now()) / 1000.0);
    let call = BlobCall {
        backend,
        cloud,
        encoded: &encoded,
        name: &name,
        obtained: &obtained,
    };

    let mut response = match upload {
        Some(blob::Upload::Blocks) => {
            return call
                .write_blocks(req, info, caller.max_body, log)
                .await
                .map(|etag| created(policy, backend, &name, params, etag))?
        }
        // The caller's stream goes straight through: not replayable, so no retry (503 instead).
        Some(blob::Upload::Single { length }) => {
            let body = match req.inner().body() {
                Some(stream) => http::Body::Stream {
                    stream: JsValue::from(stream),
                    length: Some(length),
                },
                None => http::Body::Bytes(JsValue::from_str("")),
            };
            call.send_once(&first, body, log).await?
        }
        None => call.send_once(&first, http::Body::None, log).await?,
    };
    let status = response.status_code();
    let header = |name: &str| response.headers().get(name).ok().flatten();
    match (op, status) {
        (BlobOp::Write, 201) => created(policy, backend, &name, params, header("etag")),
        (BlobOp::Read | BlobOp::Head, 200) => {
            let headers = worker::Headers::new();
            for name in ["content-type", "content-length", "etag", "last-modified"] {
                if let Some(value) = header(name) {
                    headers.set(name, &value).map_err(internal)?;
                }
            }
            let builder = Response::builder().with_status(200).with_headers(headers);
            Ok(match response.body() {
                worker::ResponseBody::Stream(stream) if op == BlobOp::Read => {
                    builder.stream(stream.clone())
                }
                _ => builder.empty(),
            })
        }
        _ => Err(call.failure(op, &mut response).await),
    }
}

/// One blob and the token it is written or read with.
struct BlobCall<'a> {
    backend: &'a BlobBackend,
    cloud: crate::policy::Cloud,
    encoded: &'a str,
    name: &'a str,
    obtained: &'a tokens::Obtained,
}

impl BlobCall<'_> {
    /// One call, not retried: a read, or a write of the caller's own stream. A streamed body
    /// (either way) is cut off only when no bytes move for the route's idle time limit, so a
    /// slow large transfer that keeps moving completes.
    async fn send_once(
        &self,
        request: &BackendRequest,
        body: http::Body,
        log: &mut LogLine<'_>,
    ) -> std::result::Result<Response, Problem> {
        let limit = match request.method {
            "HEAD" => http::Limit::Deadline(BACKEND_TIMEOUT_MS),
            _ => http::Limit::Idle(self.backend.idle_timeout_ms()),
        };
        let token = &self.obtained.token.access_token;
        let response = http::send(request, Some(token), body, limit)
            .await
            .map_err(|e| match e {
                http::SendError::Unsendable(problem) => problem,
                http::SendError::Timeout => blob_timeout(self.backend.idle_timeout_ms()),
                e => blob_unavailable(&format!("could not be reached ({e})"), None),
            })?;
        log.backend_status = Some(response.status_code());
        Ok(response)
    }

    /// The problem for a failed call; a 401 also evicts the token.
    async fn failure(&self, op: BlobOp, response: &mut Response) -> Problem {
        let code = response.headers().get("x-ms-error-code").ok().flatten();
        // Drain the error body; it is not passed on.
        let _ = response.text().await;
        let (problem, evict) = blob::map_error(
            op,
            response.status_code(),
            code.as_deref(),
            &self.backend.container,
            self.name,
        );
        if evict {
            tokens::evict(&self.obtained.key, &self.obtained.token.access_token);
        }
        problem
    }

    /// Put Block per block of the body as it arrives (one block in memory), each retried on
    /// 429/5xx/network errors, then Put Block List. Any failure leaves nothing committed.
    async fn write_blocks(
        &self,
        req: &Request,
        info: blob::BodyInfo<'_>,
        inbound_limit: Option<u64>,
        log: &mut LogLine<'_>,
    ) -> std::result::Result<Option<String>, Problem> {
        let limit = self
            .backend
            .max_body_bytes()
            .min(inbound_limit.unwrap_or(u64::MAX));
        let mut buffer = blob::BlockBuffer::new(self.backend.block_bytes());
        // This upload's own block ids: another upload of the same name cannot touch them.
        let prefix = blob::upload_prefix(&new_request_id());
        let mut ids: Vec<String> = Vec::new();
        let mut total: u64 = 0;
        let mut reader = body::BodyReader::new(req);
        loop {
            let chunk = match reader.as_mut() {
                Some(r) => r.next().await.map_err(unreadable)?,
                None => None,
            };
            let blocks = match &chunk {
                Some(chunk) => {
                    total += chunk.len() as u64;
                    if total > limit {
                        return Err(blob::body_too_large(total, limit));
                    }
                    buffer.push(chunk)
                }
                None => std::mem::replace(&mut buffer, blob::BlockBuffer::new(1))
                    .finish()
                    .into_iter()
                    .collect(),
            };
            for block in blocks {
                let id = blob::block_id(&prefix, ids.len() as u32);
                let request = blob::put_block_request(
                    self.backend,
                    self.cloud,
                    self.encoded,
                    now(),
                    &id,
                    block.len(),
                );
                self.send_retried(&request, &block, BlobOp::Write, log)
                    .await?;
                ids.push(id);
            }
            if chunk.is_none() {
                break;
            }
        }
        let (request, list) =
            blob::put_block_list_request(self.backend, self.cloud, self.encoded, now(), &ids, info);
        let response = self
            .send_retried(&request, list.as_bytes(), BlobOp::Write, log)
            .await?;
        Ok(response.headers().get("etag").ok().flatten())
    }

    /// Sends a body held in memory, retrying what a retry can fix within the retry policy.
    async fn send_retried(
        &self,
        request: &BackendRequest,
        body: &[u8],
        op: BlobOp,
        log: &mut LogLine<'_>,
    ) -> std::result::Result<Response, Problem> {
        let judge = async |mut response: Response| {
            let status = response.status_code();
            log.backend_status = Some(status);
            if (200..300).contains(&status) {
                return http::Verdict::Done(response);
            }
            if status == 429 || status >= 500 {
                let _ = response.text().await;
                return http::Verdict::Retry(http::retry_after(&response));
            }
            http::Verdict::Fail(self.failure(op, &mut response).await)
        };
        let token = &self.obtained.token.access_token;
        http::send_retried(
            request,
            token,
            body,
            BACKEND_TIMEOUT_MS,
            judge,
            blob_unavailable,
        )
        .await
    }
}

/// A streamed transfer that stopped moving.
fn blob_timeout(idle_ms: f64) -> Problem {
    Problem::new(
        504,
        "backend-timeout",
        "The transfer stalled",
        format!("No bytes moved between the caller and Blob Storage for {} ms, so the transfer was stopped; a write was not committed. Try again.", idle_ms as u64),
    )
}

fn blob_unavailable(why: &str, retry_after: Option<u64>) -> Problem {
    Problem::new(
        503,
        "backend-unavailable",
        "Blob Storage is unavailable",
        format!("Blob Storage {why}; nothing was committed. Try again later."),
    )
    .with_header("retry-after", retry_after.unwrap_or(5).max(1).to_string())
}

/// The caller's 201, with a `Location` on the route that reads this blob back, if there is one.
fn created(
    policy: &Policy,
    backend: &BlobBackend,
    name: &str,
    params: &[(String, String)],
    etag: Option<String>,
) -> std::result::Result<Response, Problem> {
    let body = blob::created_body(&backend.container, name, etag.as_deref());
    let mut created = Response::ok(body).map_err(internal)?.with_status(201);
    created
        .headers_mut()
        .set("content-type", "application/json")
        .map_err(internal)?;
    if let Some(location) = blob::read_location(&policy.routes, backend, params) {
        created
            .headers_mut()
            .set("location", &location)
            .map_err(internal)?;
    }
    Ok(created)
}
