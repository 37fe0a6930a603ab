//! JWT validation at the edge: the isolate's [`JwksCache`], the key set fetch, and WebCrypto
//! signature checks. The decisions are the core's ([`crate::inbound::jwt`]); this file only
//! performs the I/O they call for, in the order [`jwt::validate`] runs them.

use std::cell::RefCell;

use serde_json::{Map, Value};
use worker::js_sys::{Array, Object, Promise, Reflect, Uint8Array, JSON};
use worker::wasm_bindgen::prelude::*;
use worker::wasm_bindgen::JsValue;
use worker::wasm_bindgen_futures::JsFuture;

use super::http;
use crate::inbound::jwt::{self, JwksCache, JwksLookup, Parsed};
use crate::policy::{JwtAlgorithm, JwtCheck};
use crate::problem::Problem;

/// Time limit of one key set fetch, in milliseconds.
const JWKS_TIMEOUT_MS: f64 = 5_000.0;

thread_local! {
    static CACHE: RefCell<JwksCache> = RefCell::new(JwksCache::new());
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(catch, js_namespace = ["crypto", "subtle"], js_name = importKey)]
    fn subtle_import_jwk(
        format: &str,
        key: &JsValue,
        algorithm: &JsValue,
        extractable: bool,
        usages: &Array,
    ) -> Result<Promise, JsValue>;
    #[wasm_bindgen(catch, js_namespace = ["crypto", "subtle"], js_name = verify)]
    fn subtle_verify(
        algorithm: &JsValue,
        key: &JsValue,
        signature: &Uint8Array,
        data: &Uint8Array,
    ) -> Result<Promise, JsValue>;
}

/// The claims of the request's bearer token, if it passes `check` at `now_ms`.
pub async fn validate_request(
    check: &JwtCheck,
    authorization: Option<&str>,
    now_ms: f64,
) -> Result<Map<String, Value>, Problem> {
    let token = jwt::bearer_token(authorization)?;
    let parsed = jwt::parse(token, check)?;
    let jwk = key_for(check, &parsed, now_ms).await?;
    if !verify(
        parsed.alg,
        &jwt::public_jwk(&jwk),
        &parsed.signing_input,
        &parsed.signature,
    )
    .await
    {
        return Err(jwt::bad_signature());
    }
    jwt::check_claims(&parsed.claims, check, now_ms)?;
    Ok(parsed.claims)
}

/// What the cache answered, taken out of its borrow (no borrow lives across an await).
enum Cached {
    Key(Option<Value>),
    Fetch,
    Failed,
}

/// The key that may verify `parsed`: from the cached key set, from a fetched one, or (for a
/// `kid` the cached set lacks, at most once a minute) from a set fetched again.
async fn key_for(check: &JwtCheck, parsed: &Parsed, now_ms: f64) -> Result<Value, Problem> {
    let cached = CACHE.with(|c| match c.borrow().lookup(check, now_ms) {
        JwksLookup::Fresh(jwks) => Cached::Key(jwt::select_key(jwks, parsed).cloned()),
        JwksLookup::Missing | JwksLookup::Expired => Cached::Fetch,
        JwksLookup::Failed => Cached::Failed,
    });
    let found = match cached {
        Cached::Key(found) => found,
        Cached::Failed => return Err(jwt::jwks_unavailable("a recent fetch failed")),
        // Just fetched (by this request or the one it waited for): a second fetch would find
        // the same keys.
        Cached::Fetch => {
            let jwks = fetch_once(check).await?;
            return jwt::select_key(&jwks, parsed)
                .cloned()
                .ok_or_else(jwt::no_key);
        }
    };
    if let Some(jwk) = found {
        return Ok(jwk);
    }
    let may_refetch = CACHE.with(|c| c.borrow_mut().may_refetch_for_unknown_kid(check, now_ms));
    if !may_refetch {
        return Err(jwt::no_key());
    }
    let jwks = fetch(check, now_ms).await?;
    jwt::select_key(&jwks, parsed)
        .cloned()
        .ok_or_else(jwt::no_key)
}

/// The key set of `check` when the cache has none fresh: fetched by this request if no other is
/// fetching it, else the other's result, read from the cache when it lands (single flight: a
/// burst on an empty cache fetches the key set once).
async fn fetch_once(check: &JwtCheck) -> Result<Value, Problem> {
    enum Next {
        Use(Value),
        Lead,
        Wait,
        Failed,
    }
    let started = super::now();
    loop {
        let now_ms = super::now();
        let next = CACHE.with(|c| {
            let mut cache = c.borrow_mut();
            let next = match cache.lookup(check, now_ms) {
                JwksLookup::Fresh(jwks) => Next::Use(jwks.clone()),
                JwksLookup::Failed => Next::Failed,
                JwksLookup::Missing | JwksLookup::Expired => Next::Wait,
            };
            match next {
                Next::Wait if cache.claim_fetch(check, now_ms) => Next::Lead,
                next => next,
            }
        });
        match next {
            Next::Use(jwks) => return Ok(jwks),
            Next::Lead => return fetch(check, now_ms).await,
            Next::Failed => return Err(jwt::jwks_unavailable("a recent fetch failed")),
            Next::Wait if now_ms - started > jwt::JWKS_LEADER_TIMEOUT_MS => {
                return Err(jwt::jwks_unavailable("the key set fetch took too long"))
            }
            Next::Wait => worker::Delay::from(std::time::Duration::from_millis(5)).await,
        }
    }
}

/// Fetches the key set of `check` and records the outcome in the cache.
async fn fetch(check: &JwtCheck, now_ms: f64) -> Result<Value, Problem> {
    let result = fetch_jwks(&check.jwks_url).await;
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        match &result {
            Ok(jwks) => cache.store(check, jwks.clone(), now_ms),
            Err(_) => cache.fail(check, now_ms),
        }
    });
    result.map_err(jwt::jwks_unavailable)
}

/// One GET of a JWKS URL; the error says what went wrong in words safe for a caller.
async fn fetch_jwks(url: &str) -> Result<Value, &'static str> {
    let request = crate::backend::BackendRequest {
        method: "GET",
        url: url.to_owned(),
        headers: vec![("accept".into(), "application/json".into())],
    };
    let limit = http::Limit::Deadline(JWKS_TIMEOUT_MS);
    let mut response = match http::send(&request, None, http::Body::None, limit).await {
        Ok(response) => response,
        Err(http::SendError::Timeout) => return Err("the key set URL timed out"),
        Err(_) => return Err("the key set URL could not be reached"),
    };
    if !(200..300).contains(&response.status_code()) {
        return Err("the key set URL answered with an error");
    }
    let body = response
        .text()
        .await
        .map_err(|_| "the key set could not be read")?;
    jwt::parse_jwks(&body).ok_or("the key set URL answered something that is not a key set")
}

/// A plain JS object from name/value pairs.
fn object(members: &[(&str, JsValue)]) -> Result<Object, JsValue> {
    let object = Object::new();
    for (name, value) in members {
        Reflect::set(&object, &JsValue::from_str(name), value)?;
    }
    Ok(object)
}

/// WebCrypto's import and verify parameters for `alg`.
fn algorithms(alg: JwtAlgorithm) -> Result<(Object, Object), JsValue> {
    let s = JsValue::from_str;
    Ok(match alg {
        JwtAlgorithm::RS256 => {
            let rs = object(&[("name", s("RSASSA-PKCS1-v1_5")), ("hash", s("SHA-256"))])?;
            (rs.clone(), rs)
        }
        JwtAlgorithm::PS256 => (
            object(&[("name", s("RSA-PSS")), ("hash", s("SHA-256"))])?,
            object(&[
                ("name", s("RSA-PSS")),
                ("saltLength", JsValue::from_f64(32.0)),
            ])?,
        ),
        JwtAlgorithm::ES256 => (
            object(&[("name", s("ECDSA")), ("namedCurve", s("P-256"))])?,
            object(&[("name", s("ECDSA")), ("hash", s("SHA-256"))])?,
        ),
    })
}

/// Whether `signature` over `data` verifies with the public `jwk` under `alg`. A key
/// WebCrypto will not import counts as a failed verification.
async fn verify(alg: JwtAlgorithm, jwk: &Value, data: &[u8], signature: &[u8]) -> bool {
    verify_js(alg, jwk, data, signature).await.unwrap_or(false)
}

async fn verify_js(
    alg: JwtAlgorithm,
    jwk: &Value,
    data: &[u8],
    signature: &[u8],
) -> Result<bool, JsValue> {
    let (import, params) = algorithms(alg)?;
    let key_data = JSON::parse(&jwk.to_string())?;
    let usages = Array::of1(&JsValue::from_str("verify"));
    let key = JsFuture::from(subtle_import_jwk(
        "jwk", &key_data, &import, false, &usages,
    )?)
    .await?;
    let verified = JsFuture::from(subtle_verify(
        &params,
        &key,
        &Uint8Array::from(signature),
        &Uint8Array::from(data),
    )?)
    .await?;
    Ok(verified.as_bool() == Some(true))
}
