//! Outbound HTTP for the edge: one request with a time limit (`AbortSignal.timeout`).

use worker::wasm_bindgen::prelude::*;
use worker::wasm_bindgen::JsValue;
use worker::{Fetch, Headers, Method, Request, RequestInit, Response};

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = AbortSignal, js_name = timeout)]
    fn abort_signal_timeout(ms: u32) -> worker::web_sys::AbortSignal;
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    Timeout,
    Network(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Timeout => f.write_str("timed out"),
            SendError::Network(e) => write!(f, "failed: {e}"),
        }
    }
}

/// Sends `method url` with `headers` and an optional body (a string or a stream), aborting
/// after `timeout_ms`.
pub async fn send<H: AsRef<str>>(
    method: &str,
    url: &str,
    headers: &[(H, String)],
    body: Option<JsValue>,
    timeout_ms: f64,
) -> Result<Response, SendError> {
    let h = Headers::new();
    for (name, value) in headers {
        h.set(name.as_ref(), value)
            .map_err(|e| SendError::Network(e.to_string()))?;
    }
    let mut init = RequestInit::new();
    init.with_method(Method::from(method.to_owned()))
        .with_headers(h)
        .with_body(body);
    let request =
        Request::new_with_init(url, &init).map_err(|e| SendError::Network(e.to_string()))?;
    let signal: worker::AbortSignal = abort_signal_timeout(timeout_ms.max(1.0) as u32).into();
    match Fetch::Request(request).send_with_signal(&signal).await {
        Ok(response) => Ok(response),
        Err(_) if signal.aborted() => Err(SendError::Timeout),
        Err(e) => Err(SendError::Network(e.to_string())),
    }
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
    Fail(crate::problem::Problem),
    /// Worth another attempt (429, 5xx), after at least this many seconds if given.
    Retry(Option<u64>),
}

/// Sends a body held in memory (so every attempt carries the same bytes) until `judge` says
/// done or failed. Network errors, timeouts and [`Verdict::Retry`] are retried within the
/// [`crate::retry::RetryPolicy`], honouring `Retry-After`; then `unavailable(why, retry_after)`.
pub async fn send_retried<T>(
    request: &crate::backend::BackendRequest,
    body: &[u8],
    timeout_ms: f64,
    mut judge: impl AsyncFnMut(Response) -> Verdict<T>,
    unavailable: impl Fn(&str, Option<u64>) -> crate::problem::Problem,
) -> Result<T, crate::problem::Problem> {
    let retry = crate::retry::RetryPolicy::default();
    let started = super::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let payload = worker::js_sys::Uint8Array::from(body);
        let (retry_after, why) = match send(
            request.method,
            &request.url,
            &request.headers,
            Some(payload.into()),
            timeout_ms,
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
