//! The life of one request, as plain data: match the route, run the inbound checks, and say
//! what to do next. The edge performs the I/O; this module decides.
//!
//! Stages, in order (each a function below):
//! 1. [`request_id`]: keep the caller's `x-request-id` when it is sane, else the edge makes one;
//! 2. [`Gateway::route`]: method and path to a route, or 404 / 405 with `Allow`;
//! 3. [`check_api_key`]: the route's inbound protection;
//! 4. backend: building and sending the Azure request (later stages).
//!
//! A policy that fails validation turns every request into a 500 at stage 2: nothing is
//! forwarded by a gateway whose rules are not what its operator meant.

use serde_json::{json, Value};

use crate::policy::{self, ApiKeyCheck, Policy, PolicyError, Route};
use crate::problem::Problem;
use crate::routing::{RouteMatch, Router};

/// A loaded policy, or the reasons it could not be loaded. Built once per isolate.
pub struct Gateway {
    state: Result<(Policy, Router), Vec<PolicyError>>,
}

/// A request that matched a route.
#[derive(Debug)]
pub struct Matched<'g> {
    pub route: &'g Route,
    pub params: Vec<(String, String)>,
}

impl Gateway {
    pub fn load(policy_text: &str) -> Gateway {
        Gateway {
            state: policy::load(policy_text).map(|p| {
                let router = Router::new(&p.routes);
                (p, router)
            }),
        }
    }

    /// The policy, when it is valid.
    pub fn policy(&self) -> Option<&Policy> {
        self.state.as_ref().ok().map(|(p, _)| p)
    }

    /// The validation errors of an invalid policy, for the log.
    pub fn policy_errors(&self) -> Option<&[PolicyError]> {
        self.state.as_ref().err().map(Vec::as_slice)
    }

    /// Stage 2: the route for a method and a raw path (without query string).
    pub fn route(&self, method: &str, raw_path: &str) -> Result<Matched<'_>, Problem> {
        let (policy, router) = match &self.state {
            Ok(state) => state,
            Err(errors) => return Err(Problem::policy_invalid(errors.len())),
        };
        match router.find(method, raw_path) {
            RouteMatch::Found { route, params } => match policy.routes.get(route) {
                Some(route) => Ok(Matched { route, params }),
                None => Err(Problem::not_found(raw_path)),
            },
            RouteMatch::MethodNotAllowed { allow } => {
                let allow: Vec<&str> = allow.iter().map(|m| m.as_str()).collect();
                Err(Problem::method_not_allowed(method, &allow.join(", ")))
            }
            RouteMatch::NotFound => Err(Problem::not_found(raw_path)),
            RouteMatch::BadPath => Err(Problem::bad_path()),
        }
    }
}

/// Stage 1: the caller's request id, when it is one we can safely echo and log: 1 to 128
/// characters of letters, digits and `-._:`. Anything else is replaced by a generated id.
pub fn request_id(header: Option<&str>) -> Option<&str> {
    header.filter(|id| {
        (1..=128).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    })
}

/// Stage 3: the API key check. `presented` is the header's value; `secret` looks up a Worker
/// secret by name. Every configured key is compared, in constant time, whatever matched
/// first, so timing says nothing about which key (or how much of one) was right.
/// On success, the name of the key (for the log line, never the key).
pub fn check_api_key<'c>(
    check: &'c ApiKeyCheck,
    presented: Option<&str>,
    secret: impl Fn(&str) -> Option<String>,
) -> Result<&'c str, Problem> {
    let challenge = format!("ApiKey header=\"{}\"", check.header);
    let Some(presented) = presented else {
        return Err(Problem::new(
            401,
            "api-key-missing",
            "API key required",
            format!(
                "This route needs an API key in the {} header.",
                check.header
            ),
        )
        .with_header("www-authenticate", challenge));
    };
    let mut matched = None;
    let mut configured = 0;
    for key in &check.keys {
        let Some(value) = secret(&key.secret) else {
            continue;
        };
        configured += 1;
        if constant_time_eq(value.as_bytes(), presented.as_bytes()) && matched.is_none() {
            matched = Some(key.name.as_str());
        }
    }
    if configured == 0 {
        return Err(Problem::new(
            500,
            "gateway-misconfigured",
            "Gateway is misconfigured",
            "None of the Worker secrets holding this route's API keys is set, so no caller can be let in; the operator should set them with `wrangler secret put`.",
        ));
    }
    matched.ok_or_else(|| {
        Problem::new(
            401,
            "api-key-invalid",
            "API key not accepted",
            format!(
                "The key in the {} header is not one this route accepts.",
                check.header
            ),
        )
        .with_header("www-authenticate", challenge)
    })
}

/// Compares two byte strings without an early exit on the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    diff == 0
}

/// The one JSON log line every request writes.
#[derive(Debug, Default)]
pub struct LogLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    /// Path without the query string (queries may carry things not meant for logs).
    pub path: &'a str,
    pub route: Option<&'a str>,
    pub status: u16,
    pub duration_ms: f64,
    pub problem: Option<&'a str>,
    pub api_key: Option<&'a str>,
    /// The identity whose token was used, where the token came from (`cache`, `fetched`, …),
    /// the time this request spent on the identity provider, and how many seconds the token
    /// still had to live when it was sent.
    pub identity: Option<&'a str>,
    pub token: Option<&'a str>,
    pub idp_ms: Option<f64>,
    pub token_ttl_s: Option<f64>,
    /// Why no token could be had (never a secret).
    pub token_error: Option<String>,
    pub backend_status: Option<u16>,
}

impl LogLine<'_> {
    pub fn to_json(&self) -> String {
        let mut line = json!({
            "level": if self.status >= 500 { "error" } else { "info" },
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "duration_ms": self.duration_ms,
        });
        if let Value::Object(map) = &mut line {
            if let Some(kind) = self.problem {
                map.insert("problem".into(), json!(kind));
            }
            let optional = [
                ("api_key", self.api_key.map(Value::from)),
                ("identity", self.identity.map(Value::from)),
                ("token", self.token.map(Value::from)),
                ("idp_ms", self.idp_ms.map(Value::from)),
                (
                    "token_ttl_s",
                    self.token_ttl_s.map(|s| Value::from(s.floor())),
                ),
                ("token_error", self.token_error.clone().map(Value::from)),
                ("backend_status", self.backend_status.map(Value::from)),
            ];
            for (name, value) in optional {
                if let Some(value) = value {
                    map.insert(name.into(), value);
                }
            }
        }
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ApiKey;

    fn check() -> ApiKeyCheck {
        ApiKeyCheck {
            header: "x-api-key".into(),
            keys: vec![
                ApiKey {
                    name: "old".into(),
                    secret: "KEY_OLD".into(),
                },
                ApiKey {
                    name: "new".into(),
                    secret: "KEY_NEW".into(),
                },
            ],
        }
    }

    fn secrets(name: &str) -> Option<String> {
        match name {
            "KEY_OLD" => Some("s3cret-old".into()),
            "KEY_NEW" => Some("s3cret-new".into()),
            _ => None,
        }
    }

    #[test]
    fn api_key_names_the_key_that_matched() {
        assert_eq!(
            check_api_key(&check(), Some("s3cret-new"), secrets),
            Ok("new")
        );
        assert_eq!(
            check_api_key(&check(), Some("s3cret-old"), secrets),
            Ok("old")
        );
    }

    #[test]
    fn api_key_rejections_challenge_and_never_echo_the_key() {
        let missing = check_api_key(&check(), None, secrets).unwrap_err();
        assert_eq!((missing.status, missing.kind), (401, "api-key-missing"));
        assert_eq!(missing.headers[0].0, "www-authenticate");
        let wrong = check_api_key(&check(), Some("s3cret-ol"), secrets).unwrap_err();
        assert_eq!((wrong.status, wrong.kind), (401, "api-key-invalid"));
        assert!(!wrong.body("/", "r").contains("s3cret"));
    }

    #[test]
    fn api_key_without_any_configured_secret_is_a_500_not_an_open_door() {
        let p = check_api_key(&check(), Some(""), |_| None).unwrap_err();
        assert_eq!(p.status, 500);
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn request_id_keeps_sane_ids_only() {
        assert_eq!(
            request_id(Some("0af7651916cd43dd8448eb211c80319c")),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(request_id(Some("a b")), None);
        assert_eq!(request_id(Some("")), None);
        assert_eq!(request_id(Some("x\n{\"forged\":1}")), None);
        assert_eq!(request_id(Some(&"a".repeat(129))), None);
        assert_eq!(request_id(None), None);
    }
}
