//! The edge: the only code that names `worker` types. It turns a `worker::Request` into the
//! core's inputs, asks the core what to do, performs the I/O, and writes the log line.

mod body;
mod crypto;
mod http;
mod tokens;

use std::sync::OnceLock;

use wasm_bindgen::prelude::*;
use worker::{console_log, event, Context, Env, Request, Response, Result};

use crate::backend::blob::{self, BlobOp};
use crate::backend::service_bus as sb;
use crate::pipeline::{self, Gateway, LogLine};
use crate::policy::{Backend, BlobBackend, Policy, Route, ServiceBusBackend};
use crate::problem::{self, Problem};
use crate::retry::RetryPolicy;
use crate::template::{RenderContext, Template};

/// The policy, bundled at build time by `build.rs`.
const POLICY: &str = include_str!(concat!(env!("OUT_DIR"), "/policy.json"));

/// Time limit of one backend call, in milliseconds.
const BACKEND_TIMEOUT_MS: f64 = 30_000.0;

/// Loaded once per isolate, on the first request.
static GATEWAY: OnceLock<Gateway> = OnceLock::new();

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = crypto, js_name = randomUUID)]
    fn random_uuid() -> String;
}

/// A fresh request id: a random UUID from the runtime's WebCrypto.
pub fn new_request_id() -> String {
    random_uuid()
}

fn now() -> f64 {
    js_sys::Date::now()
}

fn random() -> f64 {
    js_sys::Math::random()
}

#[event(start)]
fn start() {
    // A panic is written to the log with its message and location instead of a bare trap.
    console_error_panic_hook::set_once();
}

fn gateway() -> &'static Gateway {
    GATEWAY.get_or_init(|| {
        let gateway = Gateway::load(POLICY);
        if let Some(errors) = gateway.policy_errors() {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            let line = serde_json::json!({
                "level": "error",
                "message": "policy.json is invalid: every request is refused with 500 until it is fixed and redeployed",
                "errors": errors,
            });
            console_log!("{line}");
        }
        gateway
    })
}

#[event(fetch)]
async fn fetch(req: Request, env: Env, ctx: Context) -> Result<Response> {
    let started = now();
    let method = req.inner().method();
    let path = req.path();
    let caller_id = req.headers().get("x-request-id").ok().flatten();
    let request_id = match pipeline::request_id(caller_id.as_deref()) {
        Some(id) => id.to_owned(),
        None => new_request_id(),
    };
    let mut log = LogLine {
        request_id: &request_id,
        method: &method,
        path: &path,
        ..LogLine::default()
    };

    let mut response = match handle(&req, &env, &ctx, &mut log).await {
        Ok(response) => response,
        Err(problem) => {
            log.problem = Some(problem.kind);
            problem_response(&problem, &path, &request_id)?
        }
    };
    response.headers_mut().set("x-request-id", &request_id)?;
    log.status = response.status_code();
    log.duration_ms = now() - started;
    console_log!("{}", log.to_json());
    Ok(response)
}

/// The stages of one request: route, inbound checks, backend.
async fn handle<'r>(
    req: &Request,
    env: &Env,
    ctx: &Context,
    log: &mut LogLine<'r>,
) -> std::result::Result<Response, Problem> {
    let matched = gateway().route(log.method, log.path)?;
    let route: &'static Route = matched.route;
    log.route = Some(&route.name);
    if let Some(check) = route.inbound.as_ref().and_then(|i| i.api_key.as_ref()) {
        let presented = req.headers().get(&check.header).ok().flatten();
        let secret = |name: &str| env.secret(name).ok().map(|s| s.to_string());
        log.api_key = Some(pipeline::check_api_key(
            check,
            presented.as_deref(),
            secret,
        )?);
    }
    match &route.backend {
        Backend::Blob(backend) => blob_call(req, env, ctx, log, backend, &matched.params).await,
        Backend::ServiceBus(backend) => {
            service_bus_send(req, env, ctx, log, backend, &matched.params).await
        }
    }
}

/// A blob route: build the name, get a token, call Blob Storage, map its answer.
async fn blob_call(
    req: &Request,
    env: &Env,
    ctx: &Context,
    log: &mut LogLine<'_>,
    backend: &'static BlobBackend,
    params: &[(String, String)],
) -> std::result::Result<Response, Problem> {
    let op = BlobOp::for_method(log.method)
        .ok_or_else(|| Problem::method_not_allowed(log.method, "GET, HEAD, PUT, POST"))?;
    let name = render(&backend.blob, req, params, log.request_id)?;
    let encoded = blob::encode_blob_name(&name)?;
    // Checked before a token is fetched: names, metadata, the declared size.
    let (upload, metadata) = match op {
        BlobOp::Write => {
            let mut metadata = Vec::with_capacity(backend.metadata.len());
            for (meta, text) in &backend.metadata {
                metadata.push((meta.clone(), render(text, req, params, log.request_id)?));
            }
            blob::check_metadata(&metadata)?;
            (
                Some(blob::upload_for(backend, declared_length(req))?),
                metadata,
            )
        }
        _ => (None, Vec::new()),
    };
    let (policy, obtained) =
        backend_token(&backend.identity, backend.audience(), env, ctx, log).await?;
    log.token_ttl_s = Some((obtained.token.expires_at - now()) / 1000.0);
    let caller_type = req.headers().get("content-type").ok().flatten();
    let info = blob::BodyInfo {
        content_type: caller_type.as_deref(),
        content_length: None,
        metadata: &metadata,
    };
    let call = BlobCall {
        backend,
        cloud: policy.cloud,
        encoded: &encoded,
        name: &name,
        obtained: &obtained,
    };

    let mut response = match upload {
        Some(blob::Upload::Blocks) => {
            return call
                .write_blocks(req, info, log)
                .await
                .map(|etag| created(policy, backend, &name, params, etag))?
        }
        Some(blob::Upload::Single { length }) => {
            let info = blob::BodyInfo {
                content_length: Some(length),
                ..info
            };
            let request = blob::request(
                backend,
                policy.cloud,
                op,
                &encoded,
                &obtained.token.access_token,
                now(),
                info,
            );
            // The caller's stream goes straight through: not replayable, so no retry (503 instead).
            call.send(&request, req.inner().body().map(JsValue::from), log)
                .await?
        }
        None => {
            let request = blob::request(
                backend,
                policy.cloud,
                op,
                &encoded,
                &obtained.token.access_token,
                now(),
                info,
            );
            call.send(&request, None, log).await?
        }
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
    async fn send(
        &self,
        request: &crate::backend::BackendRequest,
        body: Option<JsValue>,
        log: &mut LogLine<'_>,
    ) -> std::result::Result<Response, Problem> {
        let response = http::send(
            request.method,
            &request.url,
            &request.headers,
            body,
            BACKEND_TIMEOUT_MS,
        )
        .await
        .map_err(|e| blob_unavailable(&format!("could not be reached ({e})"), None))?;
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
        log: &mut LogLine<'_>,
    ) -> std::result::Result<Option<String>, Problem> {
        let limit = self.backend.max_body_bytes();
        let mut buffer = blob::BlockBuffer::new(self.backend.block_bytes());
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
                let id = blob::block_id(ids.len() as u32);
                let request = blob::put_block_request(
                    self.backend,
                    self.cloud,
                    self.encoded,
                    &self.obtained.token.access_token,
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
        let (request, list) = blob::put_block_list_request(
            self.backend,
            self.cloud,
            self.encoded,
            &self.obtained.token.access_token,
            now(),
            &ids,
            info,
        );
        let response = self
            .send_retried(&request, list.as_bytes(), BlobOp::Write, log)
            .await?;
        Ok(response.headers().get("etag").ok().flatten())
    }

    /// Sends a body held in memory, retrying what a retry can fix within the retry policy.
    async fn send_retried(
        &self,
        request: &crate::backend::BackendRequest,
        body: &[u8],
        op: BlobOp,
        log: &mut LogLine<'_>,
    ) -> std::result::Result<Response, Problem> {
        let retry = RetryPolicy::default();
        let started = now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let payload = js_sys::Uint8Array::from(body);
            let (retry_after, why) = match http::send(
                request.method,
                &request.url,
                &request.headers,
                Some(payload.into()),
                BACKEND_TIMEOUT_MS,
            )
            .await
            {
                Ok(mut response) => {
                    let status = response.status_code();
                    log.backend_status = Some(status);
                    if (200..300).contains(&status) {
                        return Ok(response);
                    }
                    if !(status == 429 || status >= 500) {
                        return Err(self.failure(op, &mut response).await);
                    }
                    let retry_after = crate::retry::parse_retry_after_secs(
                        response
                            .headers()
                            .get("retry-after")
                            .ok()
                            .flatten()
                            .as_deref(),
                    );
                    let _ = response.text().await;
                    (retry_after, format!("answered {status}"))
                }
                Err(e) => (None, format!("could not be reached ({e})")),
            };
            match retry.next_delay(
                attempts,
                now() - started,
                retry_after.map(|s| s as f64 * 1000.0),
                random(),
            ) {
                Some(delay) => {
                    worker::Delay::from(std::time::Duration::from_millis(delay as u64)).await
                }
                None => return Err(blob_unavailable(&why, retry_after)),
            }
        }
    }
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

/// A Service Bus route: build the message (or batch), get a token, send with retries that
/// reuse the same `MessageId`, map the answer. Bodies are read whole: they are bounded by the
/// message size limit, and a retry must send the same bytes.
async fn service_bus_send(
    req: &Request,
    env: &Env,
    ctx: &Context,
    log: &mut LogLine<'_>,
    backend: &'static ServiceBusBackend,
    params: &[(String, String)],
) -> std::result::Result<Response, Problem> {
    let limit = backend.max_message_bytes();
    if let Some(length) = declared_length(req).filter(|&l| l > limit as u64) {
        return Err(sb::too_large(length as usize, limit));
    }
    let body = read_capped(req, limit).await?;
    let header = |name: &str| req.headers().get(name).ok().flatten();
    let (idempotency_key, traceparent) = (header("idempotency-key"), header("traceparent"));
    let defaults = sb::Defaults {
        idempotency_key: idempotency_key.as_deref(),
        traceparent: traceparent.as_deref(),
        request_id: log.request_id,
    };
    let query = query_pairs(req);
    let values = RenderContext {
        path: params,
        query: &query,
        header: &header,
        request_id: log.request_id,
        uuid: &new_request_id,
        now_ms: now(),
    };

    // Everything is checked before a token is fetched.
    let (payload, ids, props) = if backend.batch {
        let (batch, ids) = sb::batch_body(&body, backend.message.as_ref(), &values, &defaults)?;
        if batch.len() > limit {
            return Err(sb::too_large(batch.len(), limit));
        }
        (batch.into_bytes(), ids, None)
    } else {
        let props = sb::properties(backend.message.as_ref(), &values, &defaults, None)?;
        let size = sb::message_size(body.len(), &props);
        if size > limit {
            return Err(sb::too_large(size, limit));
        }
        let id = props.message_id().to_owned();
        (body, vec![id], Some(props))
    };
    let content_type =
        header("content-type").unwrap_or_else(|| "application/octet-stream".to_owned());

    let (policy, obtained) =
        backend_token(&backend.identity, backend.audience(), env, ctx, log).await?;
    let base = backend.base_url(policy.cloud);
    let request = match &props {
        Some(props) => sb::single_request(
            backend,
            &base,
            &obtained.token.access_token,
            &content_type,
            props,
        ),
        None => sb::batch_request(backend, &base, &obtained.token.access_token),
    };

    let retry = RetryPolicy::default();
    let started = now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        log.token_ttl_s = Some((obtained.token.expires_at - now()) / 1000.0);
        let body = js_sys::Uint8Array::from(payload.as_slice());
        let (retry_after, why) = match http::send(
            request.method,
            &request.url,
            &request.headers,
            Some(body.into()),
            BACKEND_TIMEOUT_MS,
        )
        .await
        {
            Ok(mut response) => {
                let status = response.status_code();
                log.backend_status = Some(status);
                let retry_after = crate::retry::parse_retry_after_secs(
                    response
                        .headers()
                        .get("retry-after")
                        .ok()
                        .flatten()
                        .as_deref(),
                );
                let text = response.text().await.unwrap_or_default();
                match sb::map_response(status, retry_after, &text, backend.entity()) {
                    sb::SendOutcome::Accepted => {
                        let body = sb::accepted_body(backend.entity(), &ids, backend.batch);
                        let mut accepted = Response::ok(body).map_err(internal)?.with_status(202);
                        accepted
                            .headers_mut()
                            .set("content-type", "application/json")
                            .map_err(internal)?;
                        return Ok(accepted);
                    }
                    sb::SendOutcome::Failed { problem, evict } => {
                        if evict {
                            tokens::evict(&obtained.key, &obtained.token.access_token);
                        }
                        return Err(problem);
                    }
                    sb::SendOutcome::Retry { retry_after_secs } => {
                        (retry_after_secs, format!("answered {status}"))
                    }
                }
            }
            // The same MessageId goes out again, so a send that did arrive is dropped as a
            // duplicate by an entity with duplicate detection.
            Err(e) => (None, format!("could not be reached ({e})")),
        };
        match retry.next_delay(
            attempts,
            now() - started,
            retry_after.map(|s| s as f64 * 1000.0),
            random(),
        ) {
            Some(delay) => {
                worker::Delay::from(std::time::Duration::from_millis(delay as u64)).await
            }
            None => return Err(sb::unavailable(retry_after, &why)),
        }
    }
}

/// The whole body, refused with 413 as soon as it passes `limit` bytes (a body without
/// `Content-Length` is never read further than that).
async fn read_capped(req: &Request, limit: usize) -> std::result::Result<Vec<u8>, Problem> {
    let mut body = Vec::new();
    let Some(mut reader) = body::BodyReader::new(req) else {
        return Ok(body);
    };
    while let Some(chunk) = reader.next().await.map_err(unreadable)? {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            return Err(sb::too_large(body.len(), limit));
        }
    }
    Ok(body)
}

fn unreadable(e: String) -> Problem {
    Problem::new(
        400,
        "bad-body",
        "The request body could not be read",
        format!("Reading the body failed: {e}"),
    )
}

/// The token for a backend's identity and audience, with what the log line says about it.
async fn backend_token(
    name: &'static str,
    audience: &str,
    env: &Env,
    ctx: &Context,
    log: &mut LogLine<'_>,
) -> std::result::Result<(&'static Policy, tokens::Obtained), Problem> {
    let policy = gateway()
        .policy()
        .ok_or_else(|| Problem::policy_invalid(0))?;
    let identity = policy
        .identities
        .get(name)
        .ok_or_else(|| Problem::policy_invalid(1))?;
    log.identity = Some(name);
    let obtained = tokens::obtain(name, identity, policy.cloud, audience, env, ctx)
        .await
        .map_err(|e| {
            log.token_error = Some(tokens::describe(&e));
            Problem::from_token_error(name, &e)
        })?;
    log.token = Some(obtained.source.as_str());
    log.idp_ms = obtained.idp_ms;
    Ok((policy, obtained))
}

/// The query string's pairs. Parsed by hand: `req.url()` would pull the whole `url` crate
/// (IDNA tables) into the wasm.
fn query_pairs(req: &Request) -> Vec<(String, String)> {
    let url = req.inner().url();
    crate::encoding::query_pairs(url.split_once('?').map(|(_, q)| q).unwrap_or_default())
}

fn internal(e: worker::Error) -> Problem {
    Problem::new(
        500,
        "internal-error",
        "Internal error",
        format!("The gateway failed to build the response: {e}"),
    )
}

/// The caller's `Content-Length`, when it sent a valid one.
fn declared_length(req: &Request) -> Option<u64> {
    req.headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.trim().parse().ok())
}

/// Fills a template from this request.
fn render(
    text: &str,
    req: &Request,
    params: &[(String, String)],
    request_id: &str,
) -> std::result::Result<String, Problem> {
    let template = Template::parse(text).map_err(|_| Problem::policy_invalid(1))?;
    let query = query_pairs(req);
    let header = |name: &str| req.headers().get(name).ok().flatten();
    let ctx = RenderContext {
        path: params,
        query: &query,
        header: &header,
        request_id,
        uuid: &new_request_id,
        now_ms: now(),
    };
    template.render(&ctx).map_err(|missing| {
        Problem::new(
            400,
            "missing-request-value",
            "The request lacks a value this route needs",
            format!("This route builds a name from the request, but {missing}."),
        )
    })
}

/// Renders a problem as an RFC 9457 response with the status's headers.
pub fn problem_response(problem: &Problem, instance: &str, request_id: &str) -> Result<Response> {
    let mut response =
        Response::ok(problem.body(instance, request_id))?.with_status(problem.status);
    let headers = response.headers_mut();
    headers.set("content-type", problem::CONTENT_TYPE)?;
    headers.set("x-request-id", request_id)?;
    headers.set("cache-control", "no-store")?;
    for (name, value) in &problem.headers {
        headers.set(name, value)?;
    }
    Ok(response)
}
