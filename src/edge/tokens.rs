//! Tokens at the edge: the isolate's [`TokenCache`] and the I/O it asks for.
//!
//! Waiting callers re-read the cache on their own short timer rather than being woken by the
//! leader: a caller never touches another request's I/O objects, and a leader that goes away
//! (its client hung up) only delays the others until the cache's leader timeout.

use std::cell::RefCell;

use wasm_bindgen::JsValue;
use wasm_bindgen_futures::{future_to_promise, JsFuture};

use super::{crypto, now, random};
use crate::encoding::{base64url, pem_block};
use crate::exchange::{Grant, NoToken};
use crate::identity::cache::{Lookup, TokenCache};
use crate::identity::endpoint::{
    assertion_signing_input, parse_token_response, token_summary, Proof,
};
use crate::identity::fetch::{Step, TokenFetch};
use crate::identity::{Token, TokenError, TokenKey};
use crate::policy::prepared::TokenTarget;
use crate::policy::{Credential, Identity};
use crate::problem::Problem;
use crate::retry::RetryPolicy;

thread_local! {
    static CACHE: RefCell<TokenCache> = RefCell::new(TokenCache::default());
    /// Per client (token URL and client id): the credential that worked last, tried first by the
    /// next fetch ([`TokenFetch::new`]).
    static WORKED: RefCell<std::collections::HashMap<(String, String), usize>> =
        RefCell::new(std::collections::HashMap::new());
}

/// How long a waiting caller sleeps between looks at the cache, in milliseconds.
const WAIT_POLL_MS: f64 = 5.0;

/// Where the token of a request came from, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Served from the cache.
    Cache,
    /// Served from the cache, and this request started a background refresh.
    CacheRefreshAhead,
    /// Fetched by this request (it was the leader of a miss).
    Fetched,
    /// Fetched by another request while this one waited.
    Waited,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::CacheRefreshAhead => "cache_refresh_ahead",
            Source::Fetched => "fetched",
            Source::Waited => "waited",
        }
    }
}

/// The token for `target`: from the cache, or fetched once for all callers. `c` is the
/// request's context in `edge.js` (its env holds the secrets, its ctx runs refreshes).
/// `clock` is the request's clock (the one `drive` hands the task at each step).
pub async fn obtain(
    target: &TokenTarget,
    c: &dyn Fn() -> JsValue,
    clock: &dyn Fn() -> f64,
) -> Result<Grant, NoToken> {
    let Some(identity) = super::gateway().and_then(|g| g.prepared().identity(&target.identity))
    else {
        return Err(NoToken {
            problem: Problem::internal("a backend names an identity the policy lacks"),
            log: "no such identity".into(),
        });
    };
    let key = &target.key;
    let started = clock();
    let mut waited = false;
    loop {
        let lookup = CACHE.with(|cache| cache.borrow_mut().lookup(key, clock()));
        let (token, source) = match lookup {
            Lookup::Hit {
                value: token,
                refresh: false,
            } => (
                token,
                if waited {
                    Source::Waited
                } else {
                    Source::Cache
                },
            ),
            Lookup::Hit {
                value: token,
                refresh: true,
            } => {
                let context = c();
                let (name, identity, key, c2) = (
                    target.identity.clone(),
                    identity.clone(),
                    key.clone(),
                    context.clone(),
                );
                let task = future_to_promise(async move {
                    refresh(name, identity, key, c2).await;
                    Ok(JsValue::UNDEFINED)
                });
                super::wait_until(&context, &task);
                (token, Source::CacheRefreshAhead)
            }
            Lookup::Fetch => match fetch_and_store(identity, key, &c()).await {
                Ok(token) => (token, Source::Fetched),
                Err(e) => return Err(no_token(&target.identity, &e)),
            },
            Lookup::Wait => {
                waited = true;
                let _ = JsFuture::from(super::sleep(WAIT_POLL_MS)).await;
                continue;
            }
            Lookup::Failed(error) => return Err(no_token(&target.identity, &error)),
        };
        // A fetch or a wait crossed I/O: the JavaScript clock has moved, the request's not yet.
        let idp_ms = matches!(source, Source::Fetched | Source::Waited).then(|| now() - started);
        return Ok(Grant {
            token,
            source: source.as_str(),
            idp_ms,
        });
    }
}

fn no_token(identity: &str, error: &TokenError) -> NoToken {
    NoToken {
        problem: Problem::from_token_error(identity, error),
        log: describe(error),
    }
}

/// A backend refused this token (401): drop it from the cache.
pub fn evict(key: &TokenKey, access_token: &str) -> bool {
    CACHE.with(|c| c.borrow_mut().evict(key, access_token))
}

/// The background refresh started by a hit past the refresh point; it writes its own log line.
async fn refresh(name: String, identity: Identity, key: TokenKey, c: JsValue) {
    let started = now();
    let result = fetch_and_store(&identity, &key, &c).await;
    let line = serde_json::json!({
        "level": if result.is_ok() { "info" } else { "warn" },
        "event": "token_refresh",
        "identity": name,
        "ok": result.is_ok(),
        "error": result.as_ref().err().map(describe),
        "idp_ms": now() - started,
    });
    super::console_log(&line.to_string());
}

async fn fetch_and_store(
    identity: &Identity,
    key: &TokenKey,
    c: &JsValue,
) -> Result<Token, TokenError> {
    let result = fetch(identity, key, c).await;
    CACHE.with(|c| {
        c.borrow_mut().complete(
            key,
            result.clone(),
            now(),
            identity.refresh_ahead(),
            random(),
        )
    });
    result
}

/// One fetch: credentials, retries and back-off as [`TokenFetch`] decides.
async fn fetch(identity: &Identity, key: &TokenKey, c: &JsValue) -> Result<Token, TokenError> {
    let credentials = match &identity.credential {
        Credential::ClientSecret {
            next_secret: Some(_),
            ..
        } => 2,
        _ => 1,
    };
    let client = (key.token_url.clone(), key.client_id.clone());
    let first = WORKED.with(|w| w.borrow().get(&client).copied().unwrap_or(0));
    let (mut fetch, mut step) = TokenFetch::new(credentials, first, RetryPolicy::default(), now());
    loop {
        step = match step {
            Step::Done(result) => {
                if result.is_ok() {
                    let worked = fetch.credential();
                    WORKED.with(|w| w.borrow_mut().insert(client, worked));
                }
                return result;
            }
            Step::Sleep(ms) => {
                let _ = JsFuture::from(super::sleep(ms)).await;
                fetch.resume()
            }
            Step::Send { credential } => {
                let result = attempt(identity, key, credential, c).await;
                fetch.on_result(result, now(), random())
            }
        };
    }
}

fn secret(c: &JsValue, name: &str) -> Result<String, TokenError> {
    super::secret(c, name).ok_or_else(|| TokenError::Credential {
        reason: format!("the Worker secret {name} is not set"),
    })
}

/// One token request with credential number `credential`.
async fn attempt(
    identity: &Identity,
    key: &TokenKey,
    credential: usize,
    c: &JsValue,
) -> Result<Token, TokenError> {
    let request = match &identity.credential {
        Credential::ClientSecret {
            secret: first,
            next_secret,
            auth,
        } => {
            let name = match (credential, next_secret) {
                (1, Some(next)) => next,
                _ => first,
            };
            let value = secret(c, name)?;
            identity.token_request(
                key,
                Proof::Secret {
                    value: &value,
                    auth: *auth,
                },
            )
        }
        Credential::Certificate {
            private_key_secret,
            certificate_secret,
        } => {
            let jwt = client_assertion(
                key,
                &secret(c, private_key_secret)?,
                &secret(c, certificate_secret)?,
            )
            .await?;
            identity.token_request(key, Proof::Assertion(&jwt))
        }
    };
    let sent_at = now();
    let transient = |reason: String| TokenError::Transient {
        status: None,
        retry_after_secs: None,
        reason,
    };
    let outgoing = crate::exchange::BackendRequest {
        method: "POST",
        url: request.url,
        headers: request
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        ..Default::default()
    };
    // The outgoing gate: a secret that cannot travel in a header (Basic auth) is a credential
    // problem, and is not sent.
    crate::backend::check(&outgoing).map_err(|_| TokenError::Credential {
        reason: "a credential holds characters an HTTP header cannot carry".into(),
    })?;
    let mut headers = String::new();
    for (name, value) in &outgoing.headers {
        super::push_header(&mut headers, name, value);
    }
    let promise = super::fetch_text(
        &outgoing.url,
        "POST",
        &headers,
        Some(request.body),
        identity.timeout_ms(),
        crate::identity::endpoint::MAX_TOKEN_ANSWER_BYTES,
    )
    .map_err(|e| transient(format!("the token request failed: {}", super::describe(&e))))?;
    let summary = match JsFuture::from(promise).await {
        Ok(summary) => summary.as_string().unwrap_or_default(),
        Err(e) if super::is_timeout(&e) => {
            return Err(transient("the token request timed out".into()))
        }
        Err(e) => {
            return Err(transient(format!(
                "the token request failed: {}",
                super::describe(&e)
            )))
        }
    };
    let (status, retry_after, body, over) = token_summary(&summary)
        .ok_or_else(|| transient("reading the token response failed".into()))?;
    if over {
        return Err(crate::identity::endpoint::oversized_token_response(
            status,
            retry_after.as_deref(),
        ));
    }
    parse_token_response(status, retry_after.as_deref(), &body, sent_at)
}

/// A client assertion signed with the certificate's key (RS256, `x5t` and `x5t#S256`).
async fn client_assertion(
    key: &TokenKey,
    private_key_pem: &str,
    certificate_pem: &str,
) -> Result<String, TokenError> {
    let unusable = |what: &str| TokenError::Credential {
        reason: what.to_owned(),
    };
    let private_key = pem_block(private_key_pem, "PRIVATE KEY")
        .ok_or_else(|| unusable("the private key secret holds no PEM PRIVATE KEY (PKCS#8)"))?;
    let certificate = pem_block(certificate_pem, "CERTIFICATE")
        .ok_or_else(|| unusable("the certificate secret holds no PEM CERTIFICATE"))?;
    let x5t = crypto::digest("SHA-1", &certificate)
        .await
        .map_err(|e| unusable(&e))?;
    let x5t_s256 = crypto::digest("SHA-256", &certificate)
        .await
        .map_err(|e| unusable(&e))?;
    let input = assertion_signing_input(key, now(), &super::new_request_id(), &x5t, &x5t_s256);
    let signature = crypto::sign_rs256(&private_key, input.as_bytes())
        .await
        .map_err(|e| unusable(&e))?;
    Ok(format!("{input}.{}", base64url(&signature)))
}

/// A token error for a log line: what happened, never a secret.
pub fn describe(error: &TokenError) -> String {
    match error {
        TokenError::Rejected {
            status,
            error,
            aadsts,
        } => match aadsts {
            Some(code) => format!("rejected {status} {error} AADSTS{code}"),
            None => format!("rejected {status} {error}"),
        },
        TokenError::Transient { reason, .. } => format!("unavailable: {reason}"),
        TokenError::Malformed { reason } => format!("bad response: {reason}"),
        TokenError::Credential { reason } => format!("credential: {reason}"),
    }
}
