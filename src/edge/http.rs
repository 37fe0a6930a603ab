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
