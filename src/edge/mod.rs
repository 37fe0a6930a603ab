//! The edge: the only code that names `worker` types. It turns a `worker::Request` into the
//! core's inputs, asks [`crate::pipeline`] what to do, performs it, and writes the log line.

use std::sync::OnceLock;

use wasm_bindgen::prelude::*;
use worker::{console_log, event, Context, Env, Request, Response, Result};

use crate::pipeline::{self, Gateway, LogLine};
use crate::problem::{self, Problem};

/// The policy, bundled at build time by `build.rs`.
const POLICY: &str = include_str!(concat!(env!("OUT_DIR"), "/policy.json"));

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
async fn fetch(req: Request, env: Env, _ctx: Context) -> Result<Response> {
    let started = js_sys::Date::now();
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

    let outcome = handle(&req, &env, &mut log);
    let problem = match outcome {
        Ok(p) | Err(p) => p,
    };
    log.status = problem.status;
    log.problem = Some(problem.kind);
    let response = problem_response(&problem, &path, &request_id);
    log.duration_ms = js_sys::Date::now() - started;
    console_log!("{}", log.to_json());
    response
}

/// Runs the stages for one request. Every stage so far ends in a problem: `Ok` is a request
/// that passed every check and reached a backend this build cannot forward to yet.
fn handle<'r>(
    req: &Request,
    env: &Env,
    log: &mut LogLine<'r>,
) -> std::result::Result<Problem, Problem>
where
    'static: 'r,
{
    let matched = gateway().route(log.method, log.path)?;
    log.route = Some(&matched.route.name);
    if let Some(check) = matched
        .route
        .inbound
        .as_ref()
        .and_then(|i| i.api_key.as_ref())
    {
        let presented = req.headers().get(&check.header).ok().flatten();
        let secret = |name: &str| env.secret(name).ok().map(|s| s.to_string());
        log.api_key = Some(pipeline::check_api_key(
            check,
            presented.as_deref(),
            secret,
        )?);
    }
    Ok(Problem::backend_not_available(
        &matched.route.name,
        matched.route.backend.kind(),
    ))
}

/// Renders a problem as an RFC 9457 response with `x-request-id` and the status's headers.
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
