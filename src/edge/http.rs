//! Outbound HTTP for the edge: one call into `net.js` per request (headers as one array), with
//! a deadline for whole calls or an idle limit for streamed ones, watched on the JavaScript side.
//!
//! Every request passes the core's outgoing gate ([`crate::backend::check`]) here too: the
//! backends run it before a token is fetched, and this is the backstop for anything else.

use worker::js_sys::{Array, Promise};
use worker::wasm_bindgen::prelude::*;
use worker::wasm_bindgen::JsCast;
use worker::wasm_bindgen::JsValue;
use worker::wasm_bindgen_futures::JsFuture;
use worker::Response;

use crate::backend::BackendRequest;
use crate::problem::Problem;

#[wasm_bindgen(module = "/src/edge/net.js")]
extern "C" {
    #[wasm_bindgen(catch, js_name = send)]
    fn net_send(
        url: &str,
        method: &str,
        headers: Array,
        body: JsValue,
        length: f64,
        deadline_ms: f64,
        idle_ms: f64,
    ) -> Result<Promise, JsValue>;
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    Timeout,
    Network(String),
    /// The outgoing gate refused a header or the URL: nothing was sent.
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

/// How long a call may take.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// The whole call, answer body included when it is read whole.
    Deadline(f64),
    /// A streamed call: cut off only when no bytes move for this long.
    Idle(f64),
}

/// A body to send: nothing, bytes held in memory, or a stream (with its length, if known).
pub enum Body {
    None,
    Bytes(JsValue),
    Stream {
        stream: JsValue,
        length: Option<u64>,
    },
}

/// Sends `request`, with `Authorization: Bearer {token}` when a token is given.
pub async fn send(
    request: &BackendRequest,
    token: Option<&str>,
    body: Body,
    limit: Limit,
) -> Result<Response, SendError> {
    crate::backend::check(request).map_err(SendError::Unsendable)?;
    let headers = Array::new();
    for (name, value) in &request.headers {
        headers.push(&Array::of2(&name.into(), &value.into()));
    }
    if let Some(token) = token {
        headers.push(&Array::of2(
            &"authorization".into(),
            &format!("Bearer {token}").into(),
        ));
    }
    let (body, length) = match body {
        Body::None => (JsValue::NULL, -1.0),
        Body::Bytes(bytes) => (bytes, -1.0),
        Body::Stream { stream, length } => (stream, length.map_or(-1.0, |l| l as f64)),
    };
    let (deadline, idle) = match limit {
        Limit::Deadline(ms) => (ms, 0.0),
        Limit::Idle(ms) => (0.0, ms),
    };
    let sent = match net_send(
        &request.url,
        request.method,
        headers,
        body,
        length,
        deadline,
        idle,
    ) {
        Ok(promise) => JsFuture::from(promise).await,
        Err(e) => Err(e),
    };
    match sent {
        Ok(response) => response
            .dyn_into::<worker::web_sys::Response>()
            .map(Response::from)
            .map_err(|_| {
                SendError::Network("fetch answered something that is not a Response".into())
            }),
        Err(e) if is_timeout(&e) => Err(SendError::Timeout),
        Err(e) => Err(SendError::Network(describe(&e))),
    }
}

fn is_timeout(e: &JsValue) -> bool {
    worker::js_sys::Reflect::get(e, &"name".into())
        .ok()
        .and_then(|n| n.as_string())
        .is_some_and(|n| n == "TimeoutError")
}

fn describe(e: &JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<worker::js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| "a network error".to_owned())
}

/// The `Retry-After` of an answer, in seconds, when it gave one.
pub fn retry_after(response: &Response) -> Option<u64> {
    crate::retry::parse_retry_after_secs(
        response
            .headers()
            .get("retry-after")
            .ok()
            .flatten()
            .as_deref(),
    )
}

/// What one backend answer means to [`send_retried`].
pub enum Verdict<T> {
    Done(T),
    Fail(Problem),
    /// Worth another attempt (429, 5xx), after at least this many seconds if given.
    Retry(Option<u64>),
}

/// Sends a body held in memory (so every attempt carries the same bytes) until `judge` says
/// done or failed. Network errors, timeouts and [`Verdict::Retry`] are retried within the
/// [`crate::retry::RetryPolicy`], honouring `Retry-After`; then `unavailable(why, retry_after)`.
pub async fn send_retried<T>(
    request: &BackendRequest,
    token: &str,
    body: &[u8],
    timeout_ms: f64,
    mut judge: impl AsyncFnMut(Response) -> Verdict<T>,
    unavailable: impl Fn(&str, Option<u64>) -> Problem,
) -> Result<T, Problem> {
    let retry = crate::retry::RetryPolicy::default();
    let started = super::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let payload = worker::js_sys::Uint8Array::from(body);
        let (retry_after, why) = match send(
            request,
            Some(token),
            Body::Bytes(payload.into()),
            Limit::Deadline(timeout_ms),
        )
        .await
        {
            Ok(response) => {
                let status = response.status_code();
                match judge(response).await {
                    Verdict::Done(t) => return Ok(t),
                    Verdict::Fail(problem) => return Err(problem),
                    Verdict::Retry(retry_after) => (retry_after, format!("answered {status}")),
                }
            }
            // Refused before sending: the same bytes would be refused again.
            Err(SendError::Unsendable(problem)) => return Err(problem),
            Err(e) => (None, format!("could not be reached ({e})")),
        };
        let wait = retry.next_delay(
            attempts,
            super::now() - started,
            retry_after.map(|s| s as f64 * 1000.0),
            super::random(),
        );
        match wait {
            Some(delay) => {
                worker::Delay::from(std::time::Duration::from_millis(delay as u64)).await
            }
            None => return Err(unavailable(&why, retry_after)),
        }
    }
}
