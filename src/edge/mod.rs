//! The edge: the only code that names `worker` types. It turns a `worker::Request` into the
//! core's inputs, asks the core what to do, performs the I/O, and writes the log line.

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
    let content_length = match op {
        BlobOp::Write => Some(content_length(req)?),
        _ => None,
    };

    let (policy, obtained) =
        backend_token(&backend.identity, backend.audience(), env, ctx, log).await?;

    let content_type = req.headers().get("content-type").ok().flatten();
    let call_time = now();
    log.token_ttl_s = Some((obtained.token.expires_at - call_time) / 1000.0);
    let info = blob::BodyInfo {
        content_type: content_type.as_deref(),
        content_length,
    };
    let request = blob::request(
        backend,
        policy.cloud,
        op,
        &encoded,
        &obtained.token.access_token,
        call_time,
        info,
    );
    let body = match op {
        BlobOp::Write => req.inner().body().map(JsValue::from),
        _ => None,
    };
    let mut response = http::send(
        request.method,
        &request.url,
        &request.headers,
        body,
        BACKEND_TIMEOUT_MS,
    )
    .await
    .map_err(|e| {
        Problem::new(
            503,
            "backend-unavailable",
            "Blob Storage is unavailable",
            format!("The call to Blob Storage {e}; try again later."),
        )
        .with_header("retry-after", "5")
    })?;
    let status = response.status_code();
    log.backend_status = Some(status);
    let header = |name: &str| response.headers().get(name).ok().flatten();
    match (op, status) {
        (BlobOp::Write, 201) => {
            let body = blob::created_body(&backend.container, &name, header("etag").as_deref());
            let mut created = Response::ok(body).map_err(internal)?.with_status(201);
            created
                .headers_mut()
                .set("content-type", "application/json")
                .map_err(internal)?;
            Ok(created)
        }
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
        _ => {
            let code = header("x-ms-error-code");
            // Drain the error body; it is not passed on.
            let _ = response.text().await;
            let (problem, evict) =
                blob::map_error(op, status, code.as_deref(), &backend.container, &name);
            if evict {
                tokens::evict(&obtained.key, &obtained.token.access_token);
            }
            Err(problem)
        }
    }
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
    let declared = req
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(length) = declared.filter(|&l| l > limit) {
        return Err(sb::too_large(length, limit));
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
    use futures_util::StreamExt;
    let unreadable = |e: worker::Error| {
        Problem::new(
            400,
            "bad-body",
            "The request body could not be read",
            format!("Reading the body failed: {e}"),
        )
    };
    let mut req = req.clone().map_err(internal)?;
    let mut body = Vec::new();
    if req.inner().body().is_none() {
        return Ok(body);
    }
    let mut stream = req.stream().map_err(unreadable)?;
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.map_err(unreadable)?);
        if body.len() > limit {
            return Err(sb::too_large(body.len(), limit));
        }
    }
    Ok(body)
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

/// The caller's `Content-Length`: Put Blob needs the length before the body.
fn content_length(req: &Request) -> std::result::Result<u64, Problem> {
    req.headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            Problem::new(
                411,
                "length-required",
                "Content-Length required",
                "This route needs the body's length up front; send a Content-Length header.",
            )
        })
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
