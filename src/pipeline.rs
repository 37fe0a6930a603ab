//! The life of one request, as plain data: match the route, run the inbound checks, and say
//! what to do next. The edge performs the I/O; this module decides.
//!
//! Stages, in order (each a function below):
//! 1. [`request_id`]: keep the caller's `x-request-id` when it is sane, else the edge makes one;
//! 2. [`Gateway::route`]: method and path to a route, or 404 / 405 with `Allow`;
//! 3. the route's inbound checks ([`crate::inbound`]), over the policy's defaults;
//! 4. backend: building and sending the Azure request (later stages).
//!
//! A policy that fails validation turns every request into a 500 at stage 2: nothing is
//! forwarded by a gateway whose rules are not what its operator meant.

use serde_json::{json, Value};

use crate::policy::{self, Inbound, Policy, PolicyError, Route};
use crate::problem::Problem;
use crate::routing::{RouteMatch, Router};

/// A loaded policy, or the reasons it could not be loaded. Built once per isolate.
pub struct Gateway {
    state: Result<(Policy, Router, Vec<Inbound>), Vec<PolicyError>>,
}

/// A request that matched a route.
#[derive(Debug)]
pub struct Matched<'g> {
    pub route: &'g Route,
    /// The route's inbound checks over the policy's defaults.
    pub inbound: &'g Inbound,
    pub params: Vec<(String, String)>,
}

impl Gateway {
    pub fn load(policy_text: &str) -> Gateway {
        Gateway {
            state: policy::load(policy_text).map(|p| {
                let router = Router::new(&p.routes);
                let inbound = p.routes.iter().map(|r| p.effective_inbound(r)).collect();
                (p, router, inbound)
            }),
        }
    }

    /// The policy, when it is valid.
    pub fn policy(&self) -> Option<&Policy> {
        self.state.as_ref().ok().map(|(p, _, _)| p)
    }

    /// The validation errors of an invalid policy, for the log.
    pub fn policy_errors(&self) -> Option<&[PolicyError]> {
        self.state.as_ref().err().map(Vec::as_slice)
    }

    /// Stage 2: the route for a method and a raw path (without query string).
    pub fn route(&self, method: &str, raw_path: &str) -> Result<Matched<'_>, Problem> {
        let (policy, router, inbound) = match &self.state {
            Ok(state) => state,
            Err(errors) => return Err(Problem::policy_invalid(errors.len())),
        };
        match router.find(method, raw_path) {
            RouteMatch::Found { route, params } => {
                match (policy.routes.get(route), inbound.get(route)) {
                    (Some(route), Some(inbound)) => Ok(Matched {
                        route,
                        inbound,
                        params,
                    }),
                    _ => Err(Problem::not_found(raw_path)),
                }
            }
            RouteMatch::MethodNotAllowed { allow } => {
                let allow: Vec<&str> = allow.iter().map(|m| m.as_str()).collect();
                Err(Problem::method_not_allowed(method, &allow.join(", ")))
            }
            RouteMatch::NotFound => Err(Problem::not_found(raw_path)),
            RouteMatch::BadPath => Err(Problem::bad_path()),
        }
    }
}

impl Gateway {
    /// The route a CORS preflight asks about (`Access-Control-Request-Method` on this path). A
    /// path the gateway has but not for that method is a CORS refusal (403 `cors-rejected`, as
    /// for any method, origin or header the route does not allow cross-origin), not a 405: the
    /// preflight itself, an OPTIONS, is what the browser sent.
    pub fn preflight_route(&self, requested: &str, raw_path: &str) -> Result<Matched<'_>, Problem> {
        self.route(requested, raw_path).map_err(|p| {
            if p.status == 405 {
                Problem::new(
                    403,
                    "cors-rejected",
                    "Cross-origin request not allowed",
                    format!("{requested} is not a method of this route, so browsers may not send it cross-origin."),
                )
            } else {
                p
            }
        })
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
    /// The backend's own reason for refusing (Service Bus's `<Detail>`), for the operator: it is
    /// never copied into the caller's answer.
    pub backend_detail: Option<String>,
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
                (
                    "backend_detail",
                    self.backend_detail.clone().map(Value::from),
                ),
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
