//! Bearer tokens as Service Bus checks them: an Entra RS256 JWT whose `kid` is in the issuer's
//! JWKS, whose signature verifies, with `aud` the Service Bus resource (or this namespace's URL;
//! for an event hub, the Event Hubs resource or the namespace URL), `iss` under the configured
//! prefix, and now inside `nbf`..`exp` (no clock skew allowance).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rsa::{BigUint, Pkcs1v15Sign, RsaPublicKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub const SERVICEBUS_AUDIENCE: &str = "https://servicebus.azure.net";
/// Event Hubs' resource, "the same for all clouds and tenants" (Microsoft's Entra ID guide).
pub const EVENTHUBS_AUDIENCE: &str = "https://eventhubs.azure.net";
/// An unknown `kid` refetches the JWKS at most this often.
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(10);

/// Why a request's token was refused: Service Bus's error code word and a message.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthError {
    pub code: &'static str,
    pub message: String,
}

fn fail<T>(code: &'static str, message: impl Into<String>) -> Result<T, AuthError> {
    Err(AuthError {
        code,
        message: message.into(),
    })
}

/// The token out of an `Authorization` header value: exactly `Bearer <jwt>`.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let Some(value) = header else {
        return fail("MissingToken", "The authorization header was not found.");
    };
    match value.strip_prefix("Bearer ") {
        Some(token) if !token.is_empty() && !token.contains(char::is_whitespace) => Ok(token),
        _ => fail(
            "MalformedToken",
            "The credentials contained in the authorization header are not in the expected format: 'Bearer <token>'.",
        ),
    }
}

/// A JWT split and decoded, not yet verified.
#[derive(Debug, Clone)]
pub struct Jwt {
    pub kid: String,
    pub claims: Map<String, Value>,
    /// `base64url(header) + "." + base64url(payload)`: what the signature covers.
    pub signed: Vec<u8>,
    pub signature: Vec<u8>,
}

pub fn decode(token: &str) -> Result<Jwt, AuthError> {
    let malformed = |why: &str| AuthError {
        code: "MalformedToken",
        message: format!("The token is not a valid JWT: {why}."),
    };
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(malformed("it must have three parts"));
    }
    let object = |part: &str, what: &str| -> Result<Map<String, Value>, AuthError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| malformed(&format!("the {what} is not base64url")))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(malformed(&format!("the {what} is not a JSON object"))),
        }
    };
    let header = object(parts[0], "header")?;
    let claims = object(parts[1], "payload")?;
    let signature = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|_| malformed("the signature is not base64url"))?;
    match header.get("alg").and_then(Value::as_str) {
        Some("RS256") => {}
        other => {
            return fail(
                "InvalidSignature",
                format!("The token's algorithm {other:?} is not supported; RS256 is expected."),
            )
        }
    }
    let kid = match header.get("kid").and_then(Value::as_str) {
        Some(kid) if !kid.is_empty() => kid.to_string(),
        _ => return fail("InvalidSignature", "The token header has no key id (kid)."),
    };
    Ok(Jwt {
        kid,
        claims,
        signed: format!("{}.{}", parts[0], parts[1]).into_bytes(),
        signature,
    })
}

/// What the claims must say.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    /// Accepted audiences, compared with at most one trailing slash ignored.
    pub audiences: Vec<String>,
    pub issuer_prefix: String,
}

impl ClaimRules {
    /// Service Bus's resource and the namespace URL (`http://127.0.0.1:PORT`).
    pub fn for_namespace(namespace_url: &str, issuer_prefix: &str) -> Self {
        ClaimRules {
            audiences: vec![SERVICEBUS_AUDIENCE.to_string(), namespace_url.to_string()],
            issuer_prefix: issuer_prefix.to_string(),
        }
    }

    /// For an event hub: Event Hubs' resource and the namespace URL. A Service Bus token is
    /// refused (strict; not checked against Azure).
    pub fn for_event_hubs(namespace_url: &str, issuer_prefix: &str) -> Self {
        ClaimRules {
            audiences: vec![EVENTHUBS_AUDIENCE.to_string(), namespace_url.to_string()],
            issuer_prefix: issuer_prefix.to_string(),
        }
    }

    fn audience_ok(&self, aud: &str) -> bool {
        let aud = aud.strip_suffix('/').unwrap_or(aud);
        self.audiences
            .iter()
            .any(|a| a.trim_end_matches('/') == aud)
    }
}

/// Audience, then issuer, then time (`now` in Unix seconds). Strict: valid while nbf <= now < exp.
pub fn check_claims(
    claims: &Map<String, Value>,
    rules: &ClaimRules,
    now: i64,
) -> Result<(), AuthError> {
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if audiences.is_empty() {
        return fail(
            "InvalidAudience",
            "Invalid authorization token audience: the aud claim is empty.",
        );
    }
    if !audiences.iter().any(|a| rules.audience_ok(a)) {
        return fail(
            "InvalidAudience",
            format!(
                "Invalid authorization token audience '{}'; expected '{}'.",
                audiences.join(","),
                rules.audiences.first().map(String::as_str).unwrap_or("")
            ),
        );
    }
    match claims.get("iss").and_then(Value::as_str) {
        Some(iss) if iss.starts_with(&rules.issuer_prefix) => {}
        other => {
            return fail(
                "InvalidIssuer",
                format!("Token issuer '{}' is invalid.", other.unwrap_or("")),
            )
        }
    }
    let seconds = |name: &str| -> Result<Option<f64>, AuthError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| AuthError {
                code: "MalformedToken",
                message: format!("The {name} claim is not a number."),
            }),
        }
    };
    let now_f = now as f64;
    match seconds("exp")? {
        None => return fail("MalformedToken", "The token has no expiration time (exp)."),
        Some(exp) if now_f >= exp => {
            return fail(
                "ExpiredToken",
                format!(
                    "The token is expired. Expiration time: '{}', now: '{now}'.",
                    exp as i64
                ),
            )
        }
        Some(_) => {}
    }
    if let Some(nbf) = seconds("nbf")? {
        if nbf > now_f {
            return fail(
                "TokenNotYetValid",
                format!(
                    "The token is not valid before '{}', now: '{now}'.",
                    nbf as i64
                ),
            );
        }
    }
    Ok(())
}

/// RSASSA-PKCS1-v1_5 with SHA-256 over the signed part.
pub fn verify_rs256(key: &RsaPublicKey, signed: &[u8], signature: &[u8]) -> bool {
    let digest = Sha256::digest(signed);
    key.verify(Pkcs1v15Sign::new::<Sha256>(), &digest, signature)
        .is_ok()
}

/// The RSA signing keys of a JWKS document, by kid (other key types are skipped).
pub fn parse_jwks(body: &[u8]) -> Result<HashMap<String, RsaPublicKey>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no keys array")?;
    let mut out = HashMap::new();
    for jwk in keys {
        let field = |name: &str| jwk.get(name).and_then(Value::as_str);
        if field("kty") != Some("RSA") || field("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let (Some(kid), Some(n), Some(e)) = (field("kid"), field("n"), field("e")) else {
            continue;
        };
        let number = |s: &str| {
            URL_SAFE_NO_PAD
                .decode(s)
                .ok()
                .map(|b| BigUint::from_bytes_be(&b))
        };
        if let (Some(n), Some(e)) = (number(n), number(e)) {
            if let Ok(key) = RsaPublicKey::new(n, e) {
                out.insert(kid.to_string(), key);
            }
        }
    }
    Ok(out)
}

/// Keys fetched from the issuer, refetched on an unknown kid at most every `min_interval`.
pub struct JwksCache {
    url: String,
    keys: HashMap<String, RsaPublicKey>,
    last_fetch: Option<Instant>,
    min_interval: Duration,
}

impl JwksCache {
    pub fn new(url: &str, min_interval: Duration) -> Self {
        JwksCache {
            url: url.to_string(),
            keys: HashMap::new(),
            last_fetch: None,
            min_interval,
        }
    }

    /// The key for `kid`; `fetch(url)` gets the JWKS body when a refetch is due.
    /// Returns the key (if any) and a line to log when a fetch happened.
    pub fn key(
        &mut self,
        kid: &str,
        now: Instant,
        fetch: impl FnOnce(&str) -> Result<Vec<u8>, String>,
    ) -> (Option<RsaPublicKey>, Option<String>) {
        if let Some(key) = self.keys.get(kid) {
            return (Some(key.clone()), None);
        }
        if self
            .last_fetch
            .is_some_and(|t| now.duration_since(t) < self.min_interval)
        {
            return (None, None);
        }
        self.last_fetch = Some(now);
        let note = match fetch(&self.url).and_then(|body| parse_jwks(&body)) {
            Ok(keys) => {
                let note = format!("JWKS fetched from {}: {} RSA key(s)", self.url, keys.len());
                self.keys = keys;
                note
            }
            Err(e) => format!("JWKS fetch from {} failed: {e}", self.url),
        };
        (self.keys.get(kid).cloned(), Some(note))
    }
}

/// The issuer's keys, against which a request's `Authorization` header is checked.
pub struct Authenticator {
    cache: Mutex<JwksCache>,
}

impl Authenticator {
    pub fn new(jwks_url: &str) -> Self {
        Authenticator {
            cache: Mutex::new(JwksCache::new(jwks_url, JWKS_REFETCH_INTERVAL)),
        }
    }

    /// Check the header fully against `rules`; `log` receives JWKS fetch notes. On success, the
    /// token's claims.
    pub fn authenticate(
        &self,
        header: Option<&str>,
        rules: &ClaimRules,
        now_unix: i64,
        log: impl Fn(&str),
    ) -> Result<Map<String, Value>, AuthError> {
        let jwt = decode(bearer(header)?)?;
        let (key, note) = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.key(&jwt.kid, Instant::now(), |url| {
                crate::util::http_get(url, Duration::from_secs(5))
            })
        };
        if let Some(note) = note {
            log(&note);
        }
        let Some(key) = key else {
            return fail(
                "InvalidSignature",
                format!(
                    "The token's signing key '{}' is not known to the issuer.",
                    jwt.kid
                ),
            );
        };
        if !verify_rs256(&key, &jwt.signed, &jwt.signature) {
            return fail("InvalidSignature", "The token has an invalid signature.");
        }
        check_claims(&jwt.claims, rules, now_unix)?;
        Ok(jwt.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURE: &str = include_str!("testdata/rs256-token.json");

    fn fixture() -> (String, Vec<u8>) {
        let v: Value = serde_json::from_str(FIXTURE).unwrap();
        let jwks = json!({ "keys": [{ "kty": "RSA", "use": "sig", "kid": "test-key", "n": v["n"], "e": v["e"] }] });
        (
            v["jwt"].as_str().unwrap().to_string(),
            serde_json::to_vec(&jwks).unwrap(),
        )
    }

    fn rules() -> ClaimRules {
        ClaimRules::for_namespace("http://127.0.0.1:8410", "https://sts.windows.net/")
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn bearer_scheme() {
        assert_eq!(bearer(None).unwrap_err().code, "MissingToken");
        assert_eq!(
            bearer(Some("SharedAccessSignature sr=x")).unwrap_err().code,
            "MalformedToken"
        );
        assert_eq!(
            bearer(Some("bearer abc")).unwrap_err().code,
            "MalformedToken"
        );
        assert_eq!(bearer(Some("Bearer ")).unwrap_err().code, "MalformedToken");
        assert_eq!(
            bearer(Some("abc.def.ghi")).unwrap_err().code,
            "MalformedToken"
        );
        assert_eq!(bearer(Some("Bearer abc.def.ghi")).unwrap(), "abc.def.ghi");
    }

    #[test]
    fn signature_verifies_and_tampering_does_not() {
        let (jwt, jwks) = fixture();
        let keys = parse_jwks(&jwks).unwrap();
        let token = decode(&jwt).unwrap();
        assert_eq!(token.kid, "test-key");
        assert!(verify_rs256(
            &keys["test-key"],
            &token.signed,
            &token.signature
        ));

        // Same signature over a payload with one claim changed.
        let parts: Vec<&str> = jwt.split('.').collect();
        let mut payload: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        payload["aud"] = json!("https://storage.azure.com");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(payload.to_string()),
            parts[2]
        );
        let forged = decode(&forged).unwrap();
        assert!(!verify_rs256(
            &keys["test-key"],
            &forged.signed,
            &forged.signature
        ));

        let mut signature = token.signature.clone();
        signature[10] ^= 1;
        assert!(!verify_rs256(&keys["test-key"], &token.signed, &signature));
    }

    #[test]
    fn malformed_tokens() {
        assert_eq!(decode("a.b").unwrap_err().code, "MalformedToken");
        assert_eq!(decode("!!.e30.e30").unwrap_err().code, "MalformedToken");
        let enc = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "{}.{}.",
            enc(json!({"alg": "none", "kid": "k"})),
            enc(json!({}))
        );
        assert_eq!(decode(&none).unwrap_err().code, "InvalidSignature");
        let hs = format!(
            "{}.{}.AAAA",
            enc(json!({"alg": "HS256", "kid": "k"})),
            enc(json!({}))
        );
        assert_eq!(decode(&hs).unwrap_err().code, "InvalidSignature");
        let no_kid = format!("{}.{}.AAAA", enc(json!({"alg": "RS256"})), enc(json!({})));
        assert_eq!(decode(&no_kid).unwrap_err().code, "InvalidSignature");
    }

    #[test]
    fn claim_checks() {
        let r = rules();
        let good = |extra: Value| {
            let mut base = json!({"aud": "https://servicebus.azure.net", "iss": "https://sts.windows.net/t/", "nbf": 100, "exp": 200});
            for (k, v) in extra.as_object().unwrap() {
                base[k] = v.clone();
            }
            claims(base)
        };
        assert!(check_claims(&good(json!({})), &r, 150).is_ok());
        assert!(check_claims(
            &good(json!({"aud": "https://servicebus.azure.net/"})),
            &r,
            150
        )
        .is_ok());
        assert!(check_claims(&good(json!({"aud": "http://127.0.0.1:8410"})), &r, 150).is_ok());
        assert!(check_claims(
            &good(json!({"aud": ["x", "https://servicebus.azure.net"]})),
            &r,
            150
        )
        .is_ok());
        let code = |c: Map<String, Value>, now| check_claims(&c, &r, now).unwrap_err().code;
        assert_eq!(
            code(good(json!({"aud": "https://storage.azure.com"})), 150),
            "InvalidAudience"
        );
        assert_eq!(
            code(good(json!({"aud": "https://servicebus.azure.net//"})), 150),
            "InvalidAudience"
        );
        assert_eq!(code(good(json!({"aud": null})), 150), "InvalidAudience");
        assert_eq!(
            code(good(json!({"iss": "https://evil.example/t/"})), 150),
            "InvalidIssuer"
        );
        assert_eq!(code(good(json!({"iss": 5})), 150), "InvalidIssuer");
        // Strict time: exp is the first invalid second, nbf the first valid one.
        assert_eq!(code(good(json!({})), 200), "ExpiredToken");
        assert!(check_claims(&good(json!({})), &r, 199).is_ok());
        assert!(check_claims(&good(json!({})), &r, 100).is_ok());
        assert_eq!(code(good(json!({})), 99), "TokenNotYetValid");
        assert_eq!(code(good(json!({"exp": "200"})), 150), "MalformedToken");
        let hubs = ClaimRules::for_event_hubs("http://127.0.0.1:8410", "https://sts.windows.net/");
        let hub_code = |c: Map<String, Value>| check_claims(&c, &hubs, 150).unwrap_err();
        assert!(check_claims(
            &good(json!({"aud": "https://eventhubs.azure.net"})),
            &hubs,
            150
        )
        .is_ok());
        assert!(check_claims(
            &good(json!({"aud": "https://eventhubs.azure.net/"})),
            &hubs,
            150
        )
        .is_ok());
        assert!(check_claims(&good(json!({"aud": "http://127.0.0.1:8410/"})), &hubs, 150).is_ok());
        let e = hub_code(good(json!({})));
        assert_eq!(
            e.code, "InvalidAudience",
            "a Service Bus token is not an Event Hubs token"
        );
        assert!(
            e.message.contains("expected 'https://eventhubs.azure.net'"),
            "{}",
            e.message
        );
        assert_eq!(
            code(good(json!({"aud": "https://eventhubs.azure.net"})), 150),
            "InvalidAudience",
            "and the other way round"
        );
        let mut no_exp = good(json!({}));
        no_exp.remove("exp");
        assert_eq!(code(no_exp, 150), "MalformedToken");
    }

    #[test]
    fn jwks_cache_refetches_at_most_every_interval() {
        let (_, jwks) = fixture();
        let mut cache = JwksCache::new("http://issuer/keys", Duration::from_secs(10));
        let t0 = Instant::now();
        let fetches = std::cell::Cell::new(0);
        let fetch = |_: &str| {
            fetches.set(fetches.get() + 1);
            Ok(jwks.clone())
        };
        assert!(cache.key("test-key", t0, fetch).0.is_some());
        assert!(cache.key("test-key", t0, fetch).0.is_some());
        assert_eq!(fetches.get(), 1, "a known kid needs no fetch");
        assert!(cache
            .key("other", t0 + Duration::from_secs(1), fetch)
            .0
            .is_none());
        assert_eq!(
            fetches.get(),
            1,
            "an unknown kid within 10 s of the last fetch does not refetch"
        );
        assert!(cache
            .key("other", t0 + Duration::from_secs(10), fetch)
            .0
            .is_none());
        assert_eq!(fetches.get(), 2);
        let (key, note) = cache.key("x", t0 + Duration::from_secs(30), |_| Err("down".into()));
        assert!(key.is_none() && note.unwrap().contains("failed"));
        assert!(
            cache
                .key("test-key", t0 + Duration::from_secs(31), fetch)
                .0
                .is_some(),
            "keys kept after a failed fetch"
        );
    }
}
