//! The edge: the only code that names `worker` types. It turns a `worker::Request` into the
//! core's inputs, asks the core what to do, performs the I/O, and writes the log line.

mod blob;
mod body;
mod crypto;
mod http;
mod jwt;
mod service_bus;
mod tokens;

use std::sync::OnceLock;

use wasm_bindgen::prelude::*;
use worker::{console_log, event, Context, Env, Request, Response, Result};

use crate::inbound;
use crate::pipeline::{self, Gateway, LogLine};
use crate::policy::{Backend, Policy, Route};
use crate::problem::{self, Problem};
use crate::template::{RenderContext, Template};

/// The policy, bundled at build time by `build.rs`.
const POLICY: &str = include_str!(concat!(env!("OUT_DIR"), "/policy.json"));

/// Time limit of one backend call, in milliseconds.
pub(crate) const BACKEND_TIMEOUT_MS: f64 = 30_000.0;

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

pub(crate) fn now() -> f64 {
    js_sys::Date::now()
}

pub(crate) fn random() -> f64 {
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

    let mut cors = Vec::new();
    let outcome = handle(&req, &env, &ctx, &mut log, &mut cors).await;
    // Whatever happens from here on, the request writes its one log line before it returns.
    let response = answer(outcome, &cors, &path, &request_id, &mut log);
    log.status = match &response {
        Ok(response) => response.status_code(),
        Err(_) => 500,
    };
    log.duration_ms = now() - started;
    console_log!("{}", log.to_json());
    response
}

/// The caller's response: the route's answer or its problem, with the request id and CORS
/// headers. When even that cannot be built, a bare 500 problem; the error only if that fails too.
fn answer(
    outcome: std::result::Result<Response, Problem>,
    cors: &[(&'static str, String)],
    path: &str,
    request_id: &str,
    log: &mut LogLine<'_>,
) -> Result<Response> {
    let decorate = |mut response: Response| -> Result<Response> {
        response.headers_mut().set("x-request-id", request_id)?;
        for (name, value) in cors {
            response.headers_mut().set(name, value)?;
        }
        Ok(response)
    };
    let built = match outcome {
        Ok(response) => decorate(response),
        Err(problem) => {
            log.problem = Some(problem.kind);
            problem_response(&problem, path, request_id).and_then(decorate)
        }
    };
    built.or_else(|e| {
        let problem = internal(e);
        log.problem = Some(problem.kind);
        problem_response(&problem, path, request_id)
    })
}

/// The stages of one request: CORS preflight, route, inbound checks (cheap ones, credentials,
/// rate limit), backend. `cors` receives the CORS headers every answer of the route carries.
async fn handle<'r>(
    req: &Request,
    env: &Env,
    ctx: &Context,
    log: &mut LogLine<'r>,
    cors_headers: &mut Vec<(&'static str, String)>,
) -> std::result::Result<Response, Problem> {
    let header = |name: &str| req.headers().get(name).ok().flatten();
    let origin = header("origin");
    if log.method == "OPTIONS" {
        if let Some(requested) = header("access-control-request-method") {
            return preflight(
                log,
                &requested,
                origin.as_deref(),
                header("access-control-request-headers").as_deref(),
            );
        }
    }
    let matched = gateway().route(log.method, log.path)?;
    let route: &'static Route = matched.route;
    let inbound = matched.inbound;
    log.route = Some(&route.name);
    if let Some(cors) = &inbound.cors {
        *cors_headers = inbound::cors::response_headers(cors, origin.as_deref());
    }

    // Cheap checks first: address, size, content type, required headers.
    let content_length = declared_length(req);
    let (client_ip, content_type) = (header("cf-connecting-ip"), header("content-type"));
    let facts = inbound::RequestFacts {
        client_ip: client_ip.as_deref(),
        content_length,
        has_body: req.inner().body().is_some() && content_length != Some(0),
        content_type: content_type.as_deref(),
        header: &header,
    };
    inbound::check_request(inbound, &facts)?;
    // Then credentials.
    if let Some(check) = &inbound.api_key {
        let secret = |name: &str| env.secret(name).ok().map(|s| s.to_string());
        log.api_key = Some(inbound::api_key::check(
            check,
            header(&check.header.to_ascii_lowercase()).as_deref(),
            secret,
        )?);
    }
    let claims = match &inbound.jwt {
        Some(check) => {
            Some(jwt::validate_request(check, header("authorization").as_deref(), now()).await?)
        }
        None => None,
    };
    // Then the rate limit, counted per route and caller.
    if let Some(limit) = &inbound.rate_limit {
        let subject = claims
            .as_ref()
            .and_then(|c| c.get("sub"))
            .and_then(|s| s.as_str());
        let who =
            inbound::rate_limit_subject(limit.key, log.api_key, subject, client_ip.as_deref())?;
        rate_limit(env, limit, &format!("{}:{who}", route.name)).await?;
    }

    let caller = Caller {
        params: &matched.params,
        claims: claims.as_ref(),
        max_body: inbound.max_body_bytes,
    };
    match &route.backend {
        Backend::Blob(backend) => blob::call(req, env, ctx, log, backend, &caller).await,
        Backend::ServiceBus(backend) => {
            service_bus::send(req, env, ctx, log, backend, &caller).await
        }
    }
}

/// What the inbound stage learnt about the caller, for the backend stage.
pub(crate) struct Caller<'a> {
    pub(crate) params: &'a [(String, String)],
    pub(crate) claims: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// The route's inbound body limit, which also bounds bodies read without a length.
    pub(crate) max_body: Option<u64>,
}

/// A CORS preflight: answered here, for the route the browser means to call, with no backend.
fn preflight(
    log: &mut LogLine<'_>,
    requested: &str,
    origin: Option<&str>,
    headers: Option<&str>,
) -> std::result::Result<Response, Problem> {
    let matched = gateway().preflight_route(requested, log.path)?;
    log.route = Some(&matched.route.name);
    let cors = matched.inbound.cors.as_ref().ok_or_else(|| {
        Problem::new(
            403,
            "cors-rejected",
            "Cross-origin request not allowed",
            "This route does not accept cross-origin requests from browsers.",
        )
    })?;
    let allowed =
        inbound::cors::preflight(cors, &matched.route.methods, origin, requested, headers)?;
    let mut response = Response::empty().map_err(internal)?.with_status(204);
    for (name, value) in allowed {
        response.headers_mut().set(name, &value).map_err(internal)?;
    }
    Ok(response)
}

/// Counts this request against a Cloudflare rate-limiting binding; 429 when over.
async fn rate_limit(
    env: &Env,
    limit: &crate::policy::RateLimit,
    key: &str,
) -> std::result::Result<(), Problem> {
    let binding = env.rate_limiter(&limit.binding).map_err(|_| {
        Problem::new(
            500,
            "gateway-misconfigured",
            "Gateway is misconfigured",
            "The rate-limiting binding this route names is not declared in wrangler.toml; the operator should add it and redeploy.",
        )
    })?;
    let outcome = binding.limit(key.to_owned()).await.map_err(|_| {
        Problem::new(
            503,
            "rate-limit-unavailable",
            "Rate limiting is unavailable",
            "The rate limiter did not answer; try again shortly.",
        )
        .with_header("retry-after", "1")
    })?;
    if outcome.success {
        return Ok(());
    }
    Err(Problem::new(
        429,
        "rate-limited",
        "Too many requests",
        format!("This route allows {} requests per {} seconds for each caller; retry after the time in Retry-After.", limit.limit, limit.period_seconds),
    )
    .with_header("retry-after", limit.period_seconds.to_string()))
}

/// The policy's cloud (the policy is valid whenever a backend runs).
pub(crate) fn cloud() -> crate::policy::Cloud {
    gateway()
        .policy()
        .map_or(crate::policy::Cloud::Public, |p| p.cloud)
}

/// The token for a backend's identity and audience, with what the log line says about it.
pub(crate) async fn backend_token(
    name: &'static str,
    audience: &str,
    env: &Env,
    ctx: &Context,
    log: &mut LogLine<'_>,
) -> std::result::Result<(&'static Policy, tokens::Obtained), Problem> {
    let policy = gateway()
        .policy()
        .ok_or_else(|| Problem::internal("a backend call without a valid policy"))?;
    let identity = policy
        .identities
        .get(name)
        .ok_or_else(|| Problem::internal("a backend names an identity the policy lacks"))?;
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

/// A body that could not be read.
pub(crate) fn unreadable(e: String) -> Problem {
    Problem::new(
        400,
        "bad-body",
        "The request body could not be read",
        format!("Reading the body failed: {e}"),
    )
}

/// The query string's pairs. Parsed by hand: `req.url()` would pull the whole `url` crate
/// (IDNA tables) into the wasm.
pub(crate) fn query_pairs(req: &Request) -> Vec<(String, String)> {
    let url = req.inner().url();
    crate::encoding::query_pairs(url.split_once('?').map(|(_, q)| q).unwrap_or_default())
}

pub(crate) fn internal(e: worker::Error) -> Problem {
    Problem::internal(&format!("building the response failed ({e})"))
}

/// The caller's `Content-Length`, when it sent a valid one.
pub(crate) fn declared_length(req: &Request) -> Option<u64> {
    req.headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.trim().parse().ok())
}

/// Fills a template from this request.
pub(crate) fn render(
    text: &str,
    req: &Request,
    caller: &Caller<'_>,
    request_id: &str,
) -> std::result::Result<String, Problem> {
    let template = Template::parse(text)
        .map_err(|_| Problem::internal("a template that passed validation did not parse"))?;
    let query = query_pairs(req);
    let header = |name: &str| req.headers().get(name).ok().flatten();
    let ctx = RenderContext {
        path: caller.params,
        query: &query,
        header: &header,
        request_id,
        uuid: &new_request_id,
        now_ms: now(),
        jwt: caller.claims,
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
