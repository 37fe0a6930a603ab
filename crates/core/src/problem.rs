//! The one error type a caller ever sees: RFC 9457 `application/problem+json`.
//!
//! Every rejection the gateway makes is a [`Problem`]: a status that fits, a stable `type`
//! URI a client can switch on, a `title` per type, and a `detail` that says what to do next.
//! Details are written by the gateway, never copied from a secret, a token or a backend body.

use serde_json::{Map, Value};

pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem response, before it is rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub status: u16,
    /// Last part of the `type` URI, e.g. `route-not-found`.
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Extra headers the status calls for (`Allow`, `WWW-Authenticate`, `Retry-After`).
    pub headers: Vec<(&'static str, String)>,
    /// Extension members (RFC 9457 §3.2), e.g. the list of policy errors.
    pub extensions: Map<String, Value>,
}

impl Problem {
    pub fn new(
        status: u16,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Problem {
        Problem {
            status,
            kind,
            title,
            detail: detail.into(),
            headers: Vec::new(),
            extensions: Map::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Problem {
        self.headers.push((name, value.into()));
        self
    }

    /// An extension member; the standard members' names are not taken (they would be written twice).
    pub fn with_extension(mut self, name: &str, value: Value) -> Problem {
        const STANDARD: [&str; 6] = [
            "type",
            "title",
            "status",
            "detail",
            "instance",
            "request_id",
        ];
        if !STANDARD.contains(&name) {
            self.extensions.insert(name.to_owned(), value);
        }
        self
    }

    /// The `type` URI. A URN: stable, and no web page has to exist for it.
    pub fn type_uri(&self) -> String {
        format!("urn:azure-edge-gateway:problem:{}", self.kind)
    }

    /// The JSON body; `instance` is the request path and `request_id` lets a caller quote the
    /// log line to an operator.
    pub fn body(&self, instance: &str, request_id: &str) -> String {
        let mut body = crate::encoding::JsonObject::with_capacity(
            160 + self.detail.len() + instance.len() + request_id.len(),
        );
        body.str("type", &self.type_uri())
            .str("title", self.title)
            .uint("status", u64::from(self.status))
            .str("detail", &self.detail)
            .str("instance", instance)
            .str("request_id", request_id);
        for (name, value) in &self.extensions {
            body.json(name, value);
        }
        body.finish()
    }

    pub fn not_found(path: &str) -> Problem {
        Problem::new(
            404,
            "route-not-found",
            "No route for this path",
            format!("No route of this gateway matches the path {path}; check the URL against the routes in policy.json (`policy explain` lists them)."),
        )
    }

    pub fn method_not_allowed(method: &str, allow: &str) -> Problem {
        Problem::new(
            405,
            "method-not-allowed",
            "Method not allowed on this path",
            format!("This path does not accept {method}; it accepts {allow}."),
        )
        .with_header("allow", allow)
    }

    pub fn bad_path() -> Problem {
        Problem::new(
            400,
            "bad-path",
            "Malformed request path",
            "The path has a malformed percent-escape or is not valid UTF-8 once decoded; encode each segment as UTF-8 with %XX escapes.",
        )
    }

    /// Why no token could be had for a route's identity, as the caller's answer. The identity
    /// provider's error code and AADSTS number are named; its description is not copied.
    pub fn from_token_error(identity: &str, error: &crate::identity::TokenError) -> Problem {
        use crate::identity::TokenError;
        let ext = |p: Problem| p.with_extension("identity", Value::from(identity));
        match error {
            TokenError::Rejected { status, error, aadsts } => {
                let code = aadsts.map(|c| format!("AADSTS{c}"));
                let named = match &code {
                    Some(c) => format!("{error} ({c})"),
                    None => error.clone(),
                };
                let mut p = ext(Problem::new(
                    502,
                    "identity-rejected",
                    "The gateway's identity was refused by its token endpoint",
                    format!("The token endpoint refused identity '{identity}' with {status} {named}; nothing was forwarded. The operator should check the identity's tenant, client id, credential and audience in policy.json and its Worker secrets."),
                ))
                .with_extension("error", Value::from(error.as_str()));
                if let Some(code) = code {
                    p = p.with_extension("aadsts", Value::from(code));
                }
                p
            }
            TokenError::Transient { retry_after_secs, .. } => ext(Problem::new(
                503,
                "identity-unavailable",
                "The gateway could not get a token",
                format!("The token endpoint of identity '{identity}' is throttling or unavailable; nothing was forwarded. Retry after the time in Retry-After."),
            ))
            .with_header("retry-after", crate::retry::caller_retry_after(*retry_after_secs).to_string()),
            TokenError::Malformed { .. } => ext(Problem::new(
                502,
                "identity-bad-response",
                "The token endpoint answered something that is not a token",
                format!("The token endpoint of identity '{identity}' answered without a usable Bearer token; nothing was forwarded. The operator should check the identity's token endpoint."),
            )),
            TokenError::Credential { .. } => ext(Problem::new(
                500,
                "gateway-misconfigured",
                "Gateway is misconfigured",
                format!("A Worker secret that identity '{identity}' needs is not set or unusable; nothing was forwarded. The operator should check the log and set it with `wrangler secret put`."),
            )),
        }
    }

    /// Something the gateway itself got wrong: a state its validated policy rules out, or a
    /// response it could not build. Not the caller's fault, and not a policy error.
    pub fn internal(what: &str) -> Problem {
        Problem::new(
            500,
            "internal-error",
            "Internal error",
            format!("The gateway failed: {what}. Nothing was forwarded after the failure; please report the request id."),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_json_serde_wrote() {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            #[serde(rename = "type")]
            type_uri: String,
            title: &'a str,
            status: u16,
            detail: &'a str,
            instance: &'a str,
            request_id: &'a str,
            #[serde(flatten)]
            extensions: &'a Map<String, Value>,
        }
        let strange = "a\"b\\c\nd\u{1}é😀";
        let plain = Problem::not_found(&format!("/x/{strange}"));
        let extended = Problem::new(502, "backend-failed", "Backend failed", strange)
            .with_extension("backend_status", Value::from(503))
            .with_extension("errors", serde_json::json!([{"path": strange, "n": 1.5}]))
            .with_extension(strange, Value::Null);
        for p in [plain, extended] {
            let reference = serde_json::to_string(&Body {
                type_uri: p.type_uri(),
                title: p.title,
                status: p.status,
                detail: &p.detail,
                instance: strange,
                request_id: "req-1",
                extensions: &p.extensions,
            })
            .unwrap();
            assert_eq!(p.body(strange, "req-1"), reference);
        }
    }
    use crate::identity::TokenError;
    use serde_json::json;

    #[test]
    fn token_failures_name_the_identity_and_code_never_the_secret() {
        let rejected = TokenError::Rejected {
            status: 401,
            error: "invalid_client".into(),
            aadsts: Some(7_000_215),
        };
        let p = Problem::from_token_error("orders-writer", &rejected);
        assert_eq!((p.status, p.kind), (502, "identity-rejected"));
        let body: Value = serde_json::from_str(&p.body("/x", "r")).unwrap();
        assert_eq!(body["aadsts"], "AADSTS7000215");
        assert_eq!(body["identity"], "orders-writer");
        assert!(body["detail"]
            .as_str()
            .unwrap()
            .contains("invalid_client (AADSTS7000215)"));
        let throttled = TokenError::Transient {
            status: Some(429),
            retry_after_secs: Some(60),
            reason: String::new(),
        };
        let p = Problem::from_token_error("id", &throttled);
        assert_eq!(
            (p.status, &p.headers),
            (503, &vec![("retry-after", "60".to_owned())])
        );
        let down = TokenError::Transient {
            status: None,
            retry_after_secs: None,
            reason: String::new(),
        };
        assert_eq!(
            Problem::from_token_error("id", &down).headers,
            vec![("retry-after", "5".to_owned())]
        );
    }

    #[test]
    fn body_is_rfc9457_with_request_id_and_extensions() {
        let p = Problem::method_not_allowed("PUT", "GET, POST")
            .with_extension("route", json!("orders"))
            // A standard member's name is not taken by an extension.
            .with_extension("status", json!(200));
        let body: Value = serde_json::from_str(&p.body("/orders/1", "req-1")).unwrap();
        assert_eq!(
            body["type"],
            "urn:azure-edge-gateway:problem:method-not-allowed"
        );
        assert_eq!(body["status"], 405);
        assert_eq!(body["instance"], "/orders/1");
        assert_eq!(body["request_id"], "req-1");
        assert_eq!(body["route"], "orders");
        assert_eq!(p.headers, vec![("allow", "GET, POST".to_owned())]);
    }
}
