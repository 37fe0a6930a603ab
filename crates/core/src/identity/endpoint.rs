//! Token requests and responses, as data: what to POST to an identity's token endpoint, and
//! what its answer means. The edge sends; nothing here performs I/O.

use serde_json::Value;

use crate::encoding::{base64, base64url, form};
use crate::policy::{ClientAuth, Cloud, Identity, TokenEndpoint};
use crate::retry::parse_retry_after_secs;

/// The cache key of a token: endpoint, client and scope (or resource, for Entra v1).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct TokenKey {
    pub token_url: String,
    pub client_id: String,
    pub scope: String,
}

/// A request to send: method POST, a form body.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

// A token request carries a credential: never print it.
impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequest")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// How the client proves itself in one request.
pub enum Proof<'a> {
    Secret {
        value: &'a str,
        auth: ClientAuth,
    },
    /// A signed client assertion (JWT).
    Assertion(&'a str),
}

/// An access token with its expiry.
#[derive(Clone, PartialEq)]
pub struct Token {
    /// Shared: the cache hands the same token to every request (a JWT is over a kilobyte).
    pub access_token: std::rc::Rc<str>,
    /// When it was obtained and when it expires, in Unix milliseconds.
    pub obtained_at: f64,
    pub expires_at: f64,
}

impl Token {
    pub fn lifetime_ms(&self) -> f64 {
        self.expires_at - self.obtained_at
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"<redacted>")
            .field("obtained_at", &self.obtained_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why no token came back.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenError {
    /// The identity provider refused the request (4xx other than 429): a configuration
    /// problem that a retry does not fix. `error` and `aadsts` come from its body.
    Rejected {
        status: u16,
        error: String,
        aadsts: Option<u64>,
    },
    /// Throttled (429), a server error (5xx), a network failure or a timeout: worth a retry.
    Transient {
        status: Option<u16>,
        retry_after_secs: Option<u64>,
        reason: String,
    },
    /// A success status with a body that is not a usable Bearer token.
    Malformed { reason: String },
    /// A Worker secret the identity needs is not set, or holds something unusable.
    Credential { reason: String },
}

impl TokenError {
    /// Whether the credential itself was refused, so the identity's second secret (during a
    /// rotation) is worth a try: invalid or expired secret, or an assertion that failed.
    pub fn is_bad_credential(&self) -> bool {
        matches!(self, TokenError::Rejected { error, aadsts, .. }
            if error == "invalid_client" || matches!(aadsts, Some(7_000_215 | 7_000_222 | 700_027)))
    }
}

impl Identity {
    /// The token endpoint URL.
    pub fn token_url(&self, cloud: Cloud) -> String {
        match &self.token_endpoint {
            TokenEndpoint::EntraV2 { tenant, authority } => {
                format!(
                    "{}/{tenant}/oauth2/v2.0/token",
                    authority_origin(authority.as_deref(), cloud)
                )
            }
            TokenEndpoint::EntraV1 { tenant, authority } => {
                format!(
                    "{}/{tenant}/oauth2/token",
                    authority_origin(authority.as_deref(), cloud)
                )
            }
            TokenEndpoint::Url(url) => url.clone(),
        }
    }

    /// Entra v1 asks for `resource=AUDIENCE`; every other endpoint for `scope=AUDIENCE/.default`.
    pub fn scope_for(&self, audience: &str) -> String {
        match self.token_endpoint {
            TokenEndpoint::EntraV1 { .. } => audience.to_owned(),
            _ => format!("{}/.default", audience.trim_end_matches('/')),
        }
    }

    pub fn token_key(&self, cloud: Cloud, audience: &str) -> TokenKey {
        TokenKey {
            token_url: self.token_url(cloud),
            client_id: self.client_id.clone(),
            scope: self.scope_for(audience),
        }
    }

    /// The client-credentials request for `key` with this proof.
    pub fn token_request(&self, key: &TokenKey, proof: Proof) -> TokenRequest {
        let scope_field = match self.token_endpoint {
            TokenEndpoint::EntraV1 { .. } => "resource",
            _ => "scope",
        };
        let mut fields = vec![
            ("grant_type", "client_credentials"),
            (scope_field, key.scope.as_str()),
        ];
        let mut headers = vec![
            (
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            ),
            ("accept", "application/json".to_owned()),
        ];
        match proof {
            Proof::Secret {
                value,
                auth: ClientAuth::Post,
            } => {
                fields.push(("client_id", &key.client_id));
                fields.push(("client_secret", value));
            }
            Proof::Secret {
                value,
                auth: ClientAuth::Basic,
            } => {
                // RFC 6749 §2.3.1: both parts form-encoded before base64.
                let userpass = format!(
                    "{}:{}",
                    crate::encoding::form_encode(&key.client_id),
                    crate::encoding::form_encode(value)
                );
                headers.push((
                    "authorization",
                    format!("Basic {}", base64(userpass.as_bytes())),
                ));
            }
            Proof::Assertion(jwt) => {
                fields.push(("client_id", &key.client_id));
                fields.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                fields.push(("client_assertion", jwt));
            }
        }
        TokenRequest {
            url: key.token_url.clone(),
            headers,
            body: form(&fields),
        }
    }

    pub fn timeout_ms(&self) -> f64 {
        f64::from(self.timeout_ms.unwrap_or(5_000))
    }

    pub fn refresh_ahead(&self) -> f64 {
        self.refresh_ahead.unwrap_or(0.5)
    }
}

fn authority_origin(authority: Option<&str>, cloud: Cloud) -> String {
    match authority {
        Some(a) => a.trim_end_matches('/').to_owned(),
        None => format!("https://{}", cloud.authority_host()),
    }
}

/// The part of a client assertion that is signed: `base64url(header).base64url(claims)`.
/// `x5t` and `x5t_s256` are the SHA-1 and SHA-256 thumbprints of the certificate (DER).
pub fn assertion_signing_input(
    key: &TokenKey,
    now_ms: f64,
    jti: &str,
    x5t: &[u8],
    x5t_s256: &[u8],
) -> String {
    let header = serde_json::json!({
        "alg": "RS256",
        "typ": "JWT",
        "x5t": base64url(x5t),
        "x5t#S256": base64url(x5t_s256),
    });
    let now = (now_ms / 1000.0).floor() as u64;
    let claims = serde_json::json!({
        "aud": key.token_url,
        "iss": key.client_id,
        "sub": key.client_id,
        "jti": jti,
        "nbf": now,
        "iat": now,
        "exp": now + 600,
    });
    format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    )
}

/// RFC 6750's `b64token`: letters, digits, `-._~+/`, then `=` padding.
fn is_b64token(t: &str) -> bool {
    let body = t.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// Largest token endpoint answer read (Entra's are a few KB): a larger one is not read whole.
pub const MAX_TOKEN_ANSWER_BYTES: u32 = 64 * 1024;

/// edge.js's summary of the token response: `[status, retry-after or null, body, over or
/// null]` (`over`: the body was cut at its limit). Read as a `Value`, not as a tuple: see
/// [`crate::encoding::json_object`].
pub fn token_summary(summary: &str) -> Option<(u16, Option<String>, String, bool)> {
    let Value::Array(fields) = serde_json::from_str(summary).ok()? else {
        return None;
    };
    let [status, retry_after, body, over] = <[Value; 4]>::try_from(fields).ok()?;
    Some((
        u16::try_from(status.as_u64()?).ok()?,
        match retry_after {
            Value::Null => None,
            v => Some(v.as_str()?.to_owned()),
        },
        body.as_str()?.to_owned(),
        !over.is_null(),
    ))
}

/// A token endpoint's answer that was over [`MAX_TOKEN_ANSWER_BYTES`] and was not read: judged
/// by its status alone (throttled or failing: worth a retry; refused: the refusal; a success
/// that is too large to be a token answer: malformed).
pub fn oversized_token_response(status: u16, retry_after: Option<&str>) -> TokenError {
    match parse_token_response(status, retry_after, "", 0.0) {
        Err(e @ (TokenError::Transient { .. } | TokenError::Rejected { .. })) => e,
        _ => TokenError::Malformed {
            reason: format!("the answer is over {MAX_TOKEN_ANSWER_BYTES} bytes; it was not read"),
        },
    }
}

/// Reads a token endpoint's answer. `now_ms` is when the request was sent: a token's
/// lifetime counts from then, so a slow answer errs on the early side.
pub fn parse_token_response(
    status: u16,
    retry_after: Option<&str>,
    body: &str,
    now_ms: f64,
) -> Result<Token, TokenError> {
    let json: Option<Value> = serde_json::from_str(body).ok();
    if status == 429 || status >= 500 {
        return Err(TokenError::Transient {
            status: Some(status),
            retry_after_secs: parse_retry_after_secs(retry_after),
            reason: format!("the token endpoint answered {status}"),
        });
    }
    if !(200..300).contains(&status) {
        let error = json
            .as_ref()
            .and_then(|j| j["error"].as_str())
            .unwrap_or("unknown_error")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        return Err(TokenError::Rejected {
            status,
            error,
            aadsts: json.as_ref().and_then(aadsts_code),
        });
    }
    let json = json.ok_or_else(|| TokenError::Malformed {
        reason: "the body is not JSON".into(),
    })?;
    let token_type = json["token_type"].as_str().unwrap_or_default();
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Malformed {
            reason: format!("token_type is \"{token_type}\", not Bearer"),
        });
    }
    let access_token = match json["access_token"].as_str() {
        // RFC 6750's b64token: what `Authorization: Bearer …` can carry unchanged.
        Some(t) if is_b64token(t) => t.to_owned(),
        Some(t) if !t.is_empty() => {
            return Err(TokenError::Malformed {
                reason: "access_token has characters a bearer token cannot have".into(),
            })
        }
        _ => {
            return Err(TokenError::Malformed {
                reason: "no access_token".into(),
            })
        }
    };
    // Prefer expires_on (absolute) when present; else expires_in. Either may be a number or a
    // string (Entra v1 and the managed identity endpoints send strings).
    let expires_at = if let Some(on) = number(&json["expires_on"]) {
        on * 1000.0
    } else if let Some(secs) = number(&json["expires_in"]) {
        now_ms + secs * 1000.0
    } else {
        return Err(TokenError::Malformed {
            reason: "neither expires_in nor expires_on".into(),
        });
    };
    if expires_at <= now_ms {
        return Err(TokenError::Malformed {
            reason: "the token is already expired".into(),
        });
    }
    Ok(Token {
        access_token: access_token.into(),
        obtained_at: now_ms,
        expires_at,
    })
}

/// A count of seconds, as a JSON number or (Entra v1) a string of digits.
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        // Whole seconds: parsed as an integer (no float parser in the wasm for this).
        Value::String(s) => s.trim().parse::<u64>().ok().map(|n| n as f64),
        _ => None,
    }
}

/// The AADSTS code: from `error_codes`, else the `AADSTSnnn:` prefix of the description.
fn aadsts_code(json: &Value) -> Option<u64> {
    json["error_codes"]
        .get(0)
        .and_then(Value::as_u64)
        .or_else(|| {
            let desc = json["error_description"].as_str()?;
            let digits: String = desc
                .strip_prefix("AADSTS")?
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Credential;

    #[test]
    fn the_token_summary_is_read_as_edge_js_writes_it() {
        assert_eq!(
            token_summary(r#"[200,null,"{\"access_token\":\"x\"}",null]"#),
            Some((200, None, r#"{"access_token":"x"}"#.to_owned(), false))
        );
        assert_eq!(
            token_summary(r#"[429,"7","",null]"#),
            Some((429, Some("7".to_owned()), String::new(), false))
        );
        assert_eq!(
            token_summary(r#"[200,null,"",70000]"#),
            Some((200, None, String::new(), true)),
            "over the limit: the number of bytes seen"
        );
        for bad in [
            "",
            "{}",
            "[200,null,\"\"]",
            "[200,null,\"\",null,1]",
            "[70000,null,\"\",null]",
            "[-1,null,\"\",null]",
            "[200.5,null,\"\",null]",
            "[\"200\",null,\"\",null]",
            "[200,7,\"\",null]",
            "[200,null,{},null]",
        ] {
            assert_eq!(token_summary(bad), None, "{bad}");
        }
    }

    fn identity(endpoint: TokenEndpoint) -> Identity {
        Identity {
            token_endpoint: endpoint,
            client_id: "00000000-0000-0000-0000-00000000000c".into(),
            credential: Credential::ClientSecret {
                secret: "S".into(),
                next_secret: None,
                auth: ClientAuth::Post,
            },
            refresh_ahead: None,
            timeout_ms: None,
        }
    }

    #[test]
    fn entra_urls_follow_the_cloud_and_the_version() {
        let v2 = identity(TokenEndpoint::EntraV2 {
            tenant: "t".into(),
            authority: None,
        });
        assert_eq!(
            v2.token_url(Cloud::Public),
            "https://login.microsoftonline.com/t/oauth2/v2.0/token"
        );
        assert_eq!(
            v2.token_url(Cloud::UsGovernment),
            "https://login.microsoftonline.us/t/oauth2/v2.0/token"
        );
        assert_eq!(
            v2.token_url(Cloud::China),
            "https://login.chinacloudapi.cn/t/oauth2/v2.0/token"
        );
        let v1 = identity(TokenEndpoint::EntraV1 {
            tenant: "t".into(),
            authority: Some("http://127.0.0.1:8400/".into()),
        });
        assert_eq!(
            v1.token_url(Cloud::Public),
            "http://127.0.0.1:8400/t/oauth2/token"
        );
        assert_eq!(
            v2.scope_for("https://storage.azure.com/"),
            "https://storage.azure.com/.default"
        );
        assert_eq!(
            v1.scope_for("https://storage.azure.com"),
            "https://storage.azure.com"
        );
    }

    #[test]
    fn requests_carry_the_secret_in_the_form_or_as_basic() {
        let v2 = identity(TokenEndpoint::EntraV2 {
            tenant: "t".into(),
            authority: None,
        });
        let key = v2.token_key(Cloud::Public, "https://servicebus.azure.net");
        let post = v2.token_request(
            &key,
            Proof::Secret {
                value: "s~3.",
                auth: ClientAuth::Post,
            },
        );
        assert_eq!(
            post.body,
            "grant_type=client_credentials&scope=https%3A%2F%2Fservicebus.azure.net%2F.default&client_id=00000000-0000-0000-0000-00000000000c&client_secret=s%7E3."
        );
        let basic = v2.token_request(
            &key,
            Proof::Secret {
                value: "s:3",
                auth: ClientAuth::Basic,
            },
        );
        assert!(!basic.body.contains("client_secret"));
        let auth = &basic
            .headers
            .iter()
            .find(|(k, _)| *k == "authorization")
            .unwrap()
            .1;
        let decoded = crate::encoding::base64_decode(auth.strip_prefix("Basic ").unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "00000000-0000-0000-0000-00000000000c:s%3A3"
        );
        assert!(
            !format!("{post:?}").contains("s~3"),
            "Debug never shows the secret"
        );
        let v1 = identity(TokenEndpoint::EntraV1 {
            tenant: "t".into(),
            authority: None,
        });
        let key1 = v1.token_key(Cloud::Public, "https://storage.azure.com");
        assert!(v1
            .token_request(&key1, Proof::Assertion("a.b.c"))
            .body
            .starts_with(
                "grant_type=client_credentials&resource=https%3A%2F%2Fstorage.azure.com&client_id="
            ));
    }

    #[test]
    fn assertion_claims_name_the_endpoint_and_the_client() {
        let key = TokenKey {
            token_url: "https://login/t/oauth2/v2.0/token".into(),
            client_id: "c".into(),
            scope: "s".into(),
        };
        let input = assertion_signing_input(&key, 1_700_000_000_500.0, "j1", &[1, 2], &[3, 4]);
        let (h, c) = input.split_once('.').unwrap();
        let header: Value =
            serde_json::from_slice(&crate::encoding::base64_decode(h).unwrap()).unwrap();
        let claims: Value =
            serde_json::from_slice(&crate::encoding::base64_decode(c).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["x5t"], "AQI");
        assert_eq!(header["x5t#S256"], "AwQ");
        assert_eq!(claims["aud"], "https://login/t/oauth2/v2.0/token");
        assert_eq!(
            (
                claims["iss"].as_str(),
                claims["sub"].as_str(),
                claims["jti"].as_str()
            ),
            (Some("c"), Some("c"), Some("j1"))
        );
        assert_eq!(claims["nbf"], 1_700_000_000u64);
        assert_eq!(claims["exp"], 1_700_000_600u64);
    }

    #[test]
    fn responses_of_every_endpoint_shape_parse() {
        let now = 1_000_000.0;
        let v2 = parse_token_response(
            200,
            None,
            r#"{"token_type":"Bearer","expires_in":3599,"access_token":"t"}"#,
            now,
        )
        .unwrap();
        assert_eq!(v2.expires_at, now + 3_599_000.0);
        let v1 = parse_token_response(
            200,
            None,
            r#"{"token_type":"Bearer","expires_in":"3599","access_token":"t"}"#,
            now,
        )
        .unwrap();
        assert_eq!(v1.expires_at, now + 3_599_000.0);
        let on = parse_token_response(
            200,
            None,
            r#"{"token_type":"bearer","expires_on":"2000","expires_in":"1","access_token":"t"}"#,
            now,
        )
        .unwrap();
        assert_eq!(on.expires_at, 2_000_000.0, "expires_on wins");
        assert!(matches!(
            parse_token_response(
                200,
                None,
                r#"{"token_type":"mac","expires_in":1,"access_token":"t"}"#,
                now
            ),
            Err(TokenError::Malformed { .. })
        ));
        assert!(matches!(
            parse_token_response(
                200,
                None,
                r#"{"token_type":"Bearer","access_token":"t"}"#,
                now
            ),
            Err(TokenError::Malformed { .. })
        ));
        assert!(matches!(
            parse_token_response(200, None, "<html>", now),
            Err(TokenError::Malformed { .. })
        ));
        // A token that an Authorization header could not carry unchanged is not used.
        for bad in ["a b", "t\r\nx-injected: 1", "tök", "=="] {
            let body =
                format!(r#"{{"token_type":"Bearer","expires_in":60,"access_token":"{bad}"}}"#);
            assert!(
                matches!(
                    parse_token_response(200, None, &body, now),
                    Err(TokenError::Malformed { .. })
                ),
                "{bad:?}"
            );
        }
        let jwt_like =
            r#"{"token_type":"Bearer","expires_in":60,"access_token":"eyJ0.eyJz-_.c2ln+/=="}"#;
        assert!(parse_token_response(200, None, jwt_like, now).is_ok());
    }

    #[test]
    fn an_answer_too_large_to_read_is_judged_by_its_status() {
        assert!(matches!(
            oversized_token_response(200, None),
            TokenError::Malformed { reason } if reason.contains("over 65536 bytes")
        ));
        assert!(matches!(
            oversized_token_response(503, Some("7")),
            TokenError::Transient {
                status: Some(503),
                retry_after_secs: Some(7),
                ..
            }
        ));
        assert!(matches!(
            oversized_token_response(400, None),
            TokenError::Rejected { status: 400, .. }
        ));
    }

    #[test]
    fn errors_are_told_apart_and_carry_the_aadsts_code() {
        let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#;
        let rejected = parse_token_response(401, None, body, 0.0).unwrap_err();
        assert_eq!(
            rejected,
            TokenError::Rejected {
                status: 401,
                error: "invalid_client".into(),
                aadsts: Some(7_000_215)
            }
        );
        assert!(rejected.is_bad_credential());
        let scope = parse_token_response(
            400,
            None,
            r#"{"error":"invalid_scope","error_description":"AADSTS1002012: x"}"#,
            0.0,
        )
        .unwrap_err();
        assert_eq!(
            scope,
            TokenError::Rejected {
                status: 400,
                error: "invalid_scope".into(),
                aadsts: Some(1_002_012)
            }
        );
        assert!(!scope.is_bad_credential());
        let throttled = parse_token_response(429, Some("60"), "{}", 0.0).unwrap_err();
        assert!(matches!(
            throttled,
            TokenError::Transient {
                status: Some(429),
                retry_after_secs: Some(60),
                ..
            }
        ));
        assert!(matches!(
            parse_token_response(503, None, "", 0.0),
            Err(TokenError::Transient {
                status: Some(503),
                ..
            })
        ));
    }
}
