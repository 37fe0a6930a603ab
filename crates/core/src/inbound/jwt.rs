//! JWT validation, like API Management's `validate-jwt`, as plain functions and a cache state
//! machine. No I/O and no signature arithmetic: the edge fetches the key set and verifies with
//! WebCrypto (it is async); here are the pieces it calls, in this order:
//!
//! 1. [`bearer_token`]: the token of an `Authorization: Bearer …` header;
//! 2. [`parse`]: three base64url parts; the header's `alg` must be an accepted one (`none`
//!    and HMAC never are, whatever the policy says);
//! 3. [`select_key`]: the key of the token's `kid` from the configured key set, of a type that
//!    fits the algorithm (an RSA key never verifies anything but RS256/PS256), then
//!    [`public_jwk`], the members of it that WebCrypto imports;
//! 4. a signature check (WebCrypto at the edge; a stand-in in the tests);
//! 5. [`check_claims`]: `exp`, `nbf`, `iss`, `aud` and the required claims.
//!
//! [`validate`] runs them in that order, for the gateway and for the tests alike (the driver
//! gives it the isolate's key sets and the edge's WebCrypto). Every rejection is a [`Problem`]
//! with an RFC 6750 `WWW-Authenticate` challenge; none carries the token, a claim value the
//! policy did not name, or key material. Keys a token names in its own header (`jwk`, `jku`,
//! `x5u`, `x5c`) are never used: only the configured key set is trusted.
//!
//! [`JwksCache`] keeps the key set of each JWKS URL for an isolate: fresh for the policy's TTL,
//! fetched again at most once a minute for a `kid` it does not know, and remembered as
//! unreachable for a few seconds after a failed fetch.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::encoding::{base64_decode, base64url};
use crate::policy::{JwtAlgorithm, JwtCheck};
use crate::problem::Problem;

/// Larger tokens are refused before anything is decoded. Entra tokens with many group claims
/// stay well below this (it moves groups past 200 into an overage claim).
pub const MAX_TOKEN_BYTES: usize = 32 * 1024;
/// Default tolerance for `exp` and `nbf`.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u32 = 60;
/// Default time a fetched key set is used.
pub const DEFAULT_JWKS_TTL_SECONDS: u32 = 600;
/// An unknown `kid` fetches the key set again at most this often (per URL and isolate).
pub const UNKNOWN_KID_REFETCH_MS: f64 = 60_000.0;
/// After a failed fetch, requests are refused at once (503) for this long.
pub const JWKS_FAILURE_BACKOFF_MS: f64 = 5_000.0;
/// Largest key set read (Entra's is about 10 KB): a larger answer is refused without being read
/// whole (`jwks-unavailable`), so a key set URL cannot make the isolate hold what it sends.
pub const MAX_JWKS_BYTES: u32 = 256 * 1024;
/// Smallest RSA modulus accepted, in bytes (2048 bits).
const MIN_RSA_MODULUS_BYTES: usize = 256;

/// A token split and decoded, not yet verified: nothing in it is to be believed yet.
#[derive(Clone, PartialEq)]
pub struct Parsed {
    pub alg: JwtAlgorithm,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    /// `header.payload` exactly as sent: what the signature covers.
    pub signing_input: Vec<u8>,
    pub signature: Vec<u8>,
}

// Claims and signature stay out of logs and panics.
impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The JWS name of an algorithm (`RS256`).
pub fn alg_name(alg: JwtAlgorithm) -> &'static str {
    match alg {
        JwtAlgorithm::RS256 => "RS256",
        JwtAlgorithm::PS256 => "PS256",
        JwtAlgorithm::ES256 => "ES256",
    }
}

fn alg_from_name(name: &str) -> Option<JwtAlgorithm> {
    match name {
        "RS256" => Some(JwtAlgorithm::RS256),
        "PS256" => Some(JwtAlgorithm::PS256),
        "ES256" => Some(JwtAlgorithm::ES256),
        // `none`, HS256/384/512 and everything else: there is no variant to configure them with.
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Problems

const TITLE_INVALID: &str = "The bearer token is not valid";

fn invalid(description: &'static str, detail: &'static str) -> Problem {
    Problem::new(401, "jwt-invalid", TITLE_INVALID, detail).with_header(
        "www-authenticate",
        format!("Bearer error=\"invalid_token\", error_description=\"{description}\""),
    )
}

/// No usable bearer token in the request.
pub fn missing() -> Problem {
    Problem::new(
        401,
        "jwt-missing",
        "A bearer token is required",
        "This route requires a JWT in an `Authorization: Bearer <token>` header; get one from the identity provider and send it.",
    )
    .with_header("www-authenticate", "Bearer realm=\"azure-edge-gateway\"")
}

fn malformed() -> Problem {
    invalid(
        "the token is not a well-formed signed JWT",
        "The bearer token is not a well-formed signed JWT (three base64url parts: a JSON header, a JSON object of claims, a signature).",
    )
}

fn algorithm_refused() -> Problem {
    invalid(
        "the token's signing algorithm is not accepted",
        "The bearer token is signed with an algorithm this route does not accept; `none` and HMAC are never accepted.",
    )
}

/// No key of the configured key set can verify this token.
pub fn no_key() -> Problem {
    invalid(
        "no signing key matches the token",
        "No signing key of the configured issuer matches the token's key id and algorithm; get a token from the configured identity provider.",
    )
}

/// The signature does not verify.
pub fn bad_signature() -> Problem {
    invalid(
        "the token's signature is invalid",
        "The bearer token's signature does not verify with the issuer's signing key.",
    )
}

/// The key set could not be fetched: nothing can be verified, so nothing passes (fail closed).
pub fn jwks_unavailable(why: &str) -> Problem {
    Problem::new(
        503,
        "jwks-unavailable",
        "The token signing keys are unavailable",
        format!("The gateway could not get the identity provider's signing keys ({why}), so the token could not be checked and nothing was forwarded. Retry after the time in Retry-After."),
    )
    .with_header("retry-after", "5")
}

fn insufficient(claim: &str) -> Problem {
    Problem::new(
        403,
        "jwt-insufficient",
        "The bearer token does not grant this",
        format!("The bearer token is valid but its claim '{claim}' is missing or lacks a value this route requires; ask for a token with the required scopes or roles."),
    )
    .with_header(
        "www-authenticate",
        "Bearer error=\"insufficient_scope\", error_description=\"the token lacks a required claim\"",
    )
}

// ---------------------------------------------------------------------------------------------
// Token

/// The token of an `Authorization` header: scheme `Bearer` (any case), then the token.
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, Problem> {
    let value = authorization.map(str::trim).unwrap_or_default();
    let (scheme, token) = value.split_once(' ').ok_or_else(missing)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(missing());
    }
    Ok(token)
}

/// One part of a compact JWS: base64url without padding, nothing else.
fn decode_part(part: &str) -> Option<Vec<u8>> {
    let alphabet = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if part.is_empty() || part.len() % 4 == 1 || !part.bytes().all(alphabet) {
        return None;
    }
    base64_decode(part)
}

/// A segment of the token: a [`decode_part`] spelt the one way base64url spells its bytes (the
/// spare low bits of the last character zero, RFC 4648 §3.5), so that the text of a signed
/// token cannot be altered and still be accepted.
fn decode_segment(segment: &str) -> Option<Vec<u8>> {
    decode_part(segment).filter(|bytes| base64url(bytes) == segment)
}

/// `typ` may be absent or name a JWT (RFC 7519 `JWT`, RFC 9068 `at+jwt`); anything else (a
/// DPoP proof, a logout token) is some other kind of token.
fn typ_accepted(typ: &str) -> bool {
    let typ = typ.to_ascii_lowercase();
    let typ = typ.strip_prefix("application/").unwrap_or(&typ);
    typ == "jwt" || typ == "at+jwt"
}

/// Splits and decodes a compact JWS and checks its header against the route's algorithms.
pub fn parse(token: &str, check: &JwtCheck) -> Result<Parsed, Problem> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(malformed());
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let header: Map<String, Value> = decode_segment(header_b64)
        .and_then(|bytes| crate::encoding::json_object(&bytes))
        .ok_or_else(malformed)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(alg_from_name)
        .filter(|alg| check.algorithms.contains(alg))
        .ok_or_else(algorithm_refused)?;
    // Extensions that must be understood (RFC 7515 §4.1.11): this gateway understands none.
    if header.contains_key("crit") {
        return Err(malformed());
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ_accepted(typ) => {}
        Some(_) => return Err(malformed()),
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(malformed()),
    };
    let claims: Map<String, Value> = decode_segment(payload_b64)
        .and_then(|bytes| crate::encoding::json_object(&bytes))
        .ok_or_else(malformed)?;
    let signature = decode_segment(signature_b64).ok_or_else(malformed)?;
    // ES256 is r‖s, 32 bytes each (RFC 7518 §3.4), never DER.
    if alg == JwtAlgorithm::ES256 && signature.len() != 64 {
        return Err(bad_signature());
    }
    let signing_input = token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()].to_vec();
    Ok(Parsed {
        alg,
        kid,
        claims,
        signing_input,
        signature,
    })
}

// ---------------------------------------------------------------------------------------------
// Keys

/// A key set fetched from a JWKS URL: a JSON object with a `keys` array.
pub fn parse_jwks(body: &str) -> Option<Value> {
    let jwks: Value = serde_json::from_str(body).ok()?;
    jwks.get("keys")?.as_array()?;
    Some(jwks)
}

fn member<'a>(jwk: &'a Value, name: &str) -> Option<&'a str> {
    jwk.get(name).and_then(Value::as_str)
}

/// A base64url member that decodes to something.
fn has_bytes(jwk: &Value, name: &str) -> bool {
    member(jwk, name)
        .and_then(decode_part)
        .is_some_and(|b| !b.is_empty())
}

/// Whether `jwk` may verify signatures of `alg`: its type fits the algorithm, it is a
/// signature key, and it names no other algorithm.
fn fits(jwk: &Value, alg: JwtAlgorithm) -> bool {
    let kind = match alg {
        JwtAlgorithm::RS256 | JwtAlgorithm::PS256 => {
            member(jwk, "kty") == Some("RSA")
                && has_bytes(jwk, "e")
                && member(jwk, "n").and_then(decode_part).is_some_and(|n| {
                    n.iter().skip_while(|&&b| b == 0).count() >= MIN_RSA_MODULUS_BYTES
                })
        }
        JwtAlgorithm::ES256 => {
            member(jwk, "kty") == Some("EC")
                && member(jwk, "crv") == Some("P-256")
                && has_bytes(jwk, "x")
                && has_bytes(jwk, "y")
        }
    };
    let usable = match jwk.get("use") {
        None => true,
        Some(u) => u.as_str() == Some("sig"),
    };
    let ops = match jwk.get("key_ops") {
        None => true,
        Some(ops) => ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify"))),
    };
    let same_alg = match jwk.get("alg") {
        None => true,
        Some(a) => a.as_str() == Some(alg_name(alg)),
    };
    kind && usable && ops && same_alg
}

/// The key that may verify `parsed`: the one with its `kid` or, for a token without a `kid`,
/// the only key that fits its algorithm. A key of another type, an encryption key, or a key
/// made for another algorithm is never chosen.
pub fn select_key<'a>(jwks: &'a Value, parsed: &Parsed) -> Option<&'a Value> {
    let mut candidates = jwks
        .get("keys")?
        .as_array()?
        .iter()
        .filter(|jwk| fits(jwk, parsed.alg));
    match &parsed.kid {
        Some(kid) => candidates.find(|jwk| member(jwk, "kid") == Some(kid.as_str())),
        None => {
            let only = candidates.next()?;
            candidates.next().is_none().then_some(only)
        }
    }
}

/// The public members of a selected key, and only those (`kty`, `n`, `e` or `kty`, `crv`,
/// `x`, `y`): what WebCrypto imports. Certificates, private members and usage hints are
/// left behind, so a key set that carries them still imports as a verification key.
pub fn public_jwk(jwk: &Value) -> Value {
    let names: &[&str] = match member(jwk, "kty") {
        Some("RSA") => &["kty", "n", "e"],
        Some("EC") => &["kty", "crv", "x", "y"],
        _ => &[],
    };
    let mut out = Map::new();
    for name in names {
        if let Some(v) = jwk.get(*name) {
            out.insert((*name).to_owned(), v.clone());
        }
    }
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// Claims

fn claim_time(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, ()> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_f64().filter(|t| t.is_finite()).map(Some).ok_or(()),
    }
}

/// Whether a claim holds `wanted`: a string equal to it or holding it as a space-separated
/// word (`scp`), an array with it as an element (`roles`), a number or boolean written so.
fn claim_has(value: &Value, wanted: &str) -> bool {
    let scalar = |v: &Value| match v {
        Value::String(s) => s == wanted,
        Value::Number(n) => n.to_string() == wanted,
        Value::Bool(b) => b.to_string() == wanted,
        _ => false,
    };
    match value {
        Value::String(s) => s == wanted || s.split_whitespace().any(|w| w == wanted),
        Value::Array(items) => items.iter().any(scalar),
        other => scalar(other),
    }
}

/// The claims of a verified token against the route's check, at `now_ms` (Unix ms).
pub fn check_claims(
    claims: &Map<String, Value>,
    check: &JwtCheck,
    now_ms: f64,
) -> Result<(), Problem> {
    let skew_ms = f64::from(
        check
            .clock_skew_seconds
            .unwrap_or(DEFAULT_CLOCK_SKEW_SECONDS),
    ) * 1000.0;
    let bad_time = || {
        invalid(
            "the token's expiry or start time is malformed",
            "The bearer token's `exp` or `nbf` claim is not a number of seconds.",
        )
    };
    let exp = claim_time(claims, "exp")
        .map_err(|()| bad_time())?
        .ok_or_else(|| {
            invalid(
                "the token has no expiry",
                "The bearer token has no `exp` claim; tokens without an expiry are not accepted.",
            )
        })?;
    if now_ms >= exp * 1000.0 + skew_ms {
        return Err(invalid(
            "the token has expired",
            "The bearer token has expired; get a new one from the identity provider and send it again.",
        ));
    }
    if let Some(nbf) = claim_time(claims, "nbf").map_err(|()| bad_time())? {
        if nbf * 1000.0 > now_ms + skew_ms {
            return Err(invalid(
                "the token is not valid yet",
                "The bearer token is not valid yet (its `nbf` is in the future); check the caller's clock.",
            ));
        }
    }
    let issuer_ok = claims
        .get("iss")
        .and_then(Value::as_str)
        .is_some_and(|iss| check.issuers.iter().any(|i| i == iss));
    if !issuer_ok {
        return Err(invalid(
            "the token's issuer is not accepted",
            "The bearer token was issued by an issuer this route does not accept.",
        ));
    }
    let accepted = |aud: &Value| {
        aud.as_str()
            .is_some_and(|a| check.audiences.iter().any(|x| x == a))
    };
    let audience_ok = match claims.get("aud") {
        Some(Value::Array(auds)) => auds.iter().any(accepted),
        Some(aud) => accepted(aud),
        None => false,
    };
    if !audience_ok {
        return Err(invalid(
            "the token's audience is not accepted",
            "The bearer token is for another audience; ask the identity provider for a token for this API.",
        ));
    }
    for (name, wanted) in &check.required_claims {
        let ok = match claims.get(name) {
            None | Some(Value::Null) => false,
            Some(value) => wanted.iter().all(|w| claim_has(value, w)),
        };
        if !ok {
            return Err(insufficient(name));
        }
    }
    Ok(())
}

/// The whole check, in the order the gateway runs it: parse, the key that may verify the
/// token (`key`: the driver's cached key sets), the signature (`verify`: WebCrypto at the
/// edge), the claims. Returns the claims of an accepted token. The unit tests below run this
/// same function, with a key set and a verifier of their own.
pub async fn validate(
    token: &str,
    check: &JwtCheck,
    now_ms: f64,
    key: impl AsyncFnOnce(&Parsed) -> Result<Value, Problem>,
    verify: impl AsyncFnOnce(JwtAlgorithm, &Value, &[u8], &[u8]) -> bool,
) -> Result<Map<String, Value>, Problem> {
    let parsed = parse(token, check)?;
    let jwk = key(&parsed).await?;
    if !verify(
        parsed.alg,
        &public_jwk(&jwk),
        &parsed.signing_input,
        &parsed.signature,
    )
    .await
    {
        return Err(bad_signature());
    }
    check_claims(&parsed.claims, check, now_ms)?;
    Ok(parsed.claims)
}

// ---------------------------------------------------------------------------------------------
// Key set cache

/// What the caller should do for a route's key set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum JwksLookup<'a> {
    /// Use these keys.
    Fresh(&'a Value),
    /// Never fetched: fetch, then [`JwksCache::store`] (or [`JwksCache::fail`]).
    Missing,
    /// Fetched longer ago than the TTL: fetch again.
    Expired,
    /// A fetch failed moments ago: refuse with 503 without trying again.
    Failed,
}

#[derive(Debug, Default)]
struct JwksEntry {
    jwks: Option<Value>,
    stored_at: f64,
    /// When the key set was last fetched or a fetch was last started for an unknown kid.
    last_fetch: Option<f64>,
    failed_until: f64,
    /// When the fetch in flight started, if one is (single flight: one fetch per URL at a time).
    fetching_since: Option<f64>,
}

/// A fetch in flight for longer than this is taken to be gone (its request ended without
/// storing anything), and the next caller leads a new one.
pub const JWKS_LEADER_TIMEOUT_MS: f64 = 10_000.0;

/// The key sets of one isolate, by JWKS URL. The caller says what time it is.
#[derive(Debug, Default)]
pub struct JwksCache {
    entries: HashMap<String, JwksEntry>,
}

impl JwksCache {
    pub fn new() -> JwksCache {
        JwksCache::default()
    }

    /// What to do for `check.jwks_url` at `now_ms`.
    pub fn lookup(&self, check: &JwtCheck, now_ms: f64) -> JwksLookup<'_> {
        let Some(entry) = self.entries.get(&check.jwks_url) else {
            return JwksLookup::Missing;
        };
        let ttl_ms = f64::from(check.jwks_ttl_seconds.unwrap_or(DEFAULT_JWKS_TTL_SECONDS)) * 1000.0;
        match &entry.jwks {
            Some(jwks) if now_ms < entry.stored_at + ttl_ms => JwksLookup::Fresh(jwks),
            _ if now_ms < entry.failed_until => JwksLookup::Failed,
            Some(_) => JwksLookup::Expired,
            None => JwksLookup::Missing,
        }
    }

    /// A fetched key set (from [`parse_jwks`]).
    pub fn store(&mut self, check: &JwtCheck, jwks: Value, now_ms: f64) {
        let entry = self.entries.entry(check.jwks_url.clone()).or_default();
        entry.fetching_since = None;
        entry.jwks = Some(jwks);
        entry.stored_at = now_ms;
        entry.last_fetch = Some(now_ms);
        entry.failed_until = 0.0;
    }

    /// A fetch failed. Keys that expired are not served on: the route fails closed, and for
    /// [`JWKS_FAILURE_BACKOFF_MS`] without trying again.
    pub fn fail(&mut self, check: &JwtCheck, now_ms: f64) {
        let entry = self.entries.entry(check.jwks_url.clone()).or_default();
        entry.fetching_since = None;
        entry.last_fetch = Some(now_ms);
        entry.failed_until = now_ms + JWKS_FAILURE_BACKOFF_MS;
    }

    /// After [`JwksLookup::Missing`] or [`JwksLookup::Expired`]: may this caller fetch the key
    /// set? `true` makes it the one fetch in flight for the URL; every other caller gets
    /// `false` and waits for the outcome by looking up again, so a burst of requests on an
    /// empty cache fetches the key set once. A leader gone for [`JWKS_LEADER_TIMEOUT_MS`] is
    /// replaced.
    pub fn claim_fetch(&mut self, check: &JwtCheck, now_ms: f64) -> bool {
        let entry = self.entries.entry(check.jwks_url.clone()).or_default();
        let free = entry
            .fetching_since
            .is_none_or(|since| now_ms - since >= JWKS_LEADER_TIMEOUT_MS);
        if free {
            entry.fetching_since = Some(now_ms);
        }
        free
    }

    /// A token names a `kid` the fresh key set lacks (the issuer may have rotated keys): may
    /// this caller fetch again? At most once per [`UNKNOWN_KID_REFETCH_MS`] per URL, counting
    /// every fetch, so tokens with made-up `kid`s cannot make the gateway hammer the issuer.
    /// A `true` claims the slot.
    pub fn may_refetch_for_unknown_kid(&mut self, check: &JwtCheck, now_ms: f64) -> bool {
        let entry = self.entries.entry(check.jwks_url.clone()).or_default();
        let allowed = entry
            .last_fetch
            .is_none_or(|at| now_ms - at >= UNKNOWN_KID_REFETCH_MS);
        if allowed {
            entry.last_fetch = Some(now_ms);
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use p256::ecdsa::signature::{Signer as _, Verifier as _};
    use rsa::pkcs8::DecodePrivateKey as _;
    use rsa::rand_core::{CryptoRng, RngCore};
    use rsa::traits::PublicKeyParts as _;
    use rsa::{BigUint, Pkcs1v15Sign, Pss, RsaPrivateKey, RsaPublicKey};
    use serde_json::json;
    use sha2::{Digest, Sha256};

    use super::*;

    /// A signature check standing in for WebCrypto.
    trait Verify {
        fn verify(&self, alg: JwtAlgorithm, jwk: &Value, input: &[u8], signature: &[u8]) -> bool;
    }

    /// [`super::validate`], the gateway's own sequence, with a key set and a verifier.
    fn validate<V: Verify>(
        token: &str,
        check: &JwtCheck,
        jwks: &Value,
        now_ms: f64,
        verifier: &V,
    ) -> Result<Map<String, Value>, Problem> {
        let key = async |parsed: &Parsed| select_key(jwks, parsed).cloned().ok_or_else(no_key);
        let verify = async |alg: JwtAlgorithm, jwk: &Value, input: &[u8], signature: &[u8]| {
            verifier.verify(alg, jwk, input, signature)
        };
        block_on(super::validate(token, check, now_ms, key, verify))
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }
    use crate::encoding::{base64url, pem_block};

    const RSA_SIGNING_PEM: &str = include_str!("../../../../tests/fixtures/jwt/rsa-signing.pem");
    const RSA_SIGNING_PUBLIC_PEM: &str =
        include_str!("../../../../tests/fixtures/jwt/rsa-signing.pub.pem");
    const RSA_OTHER_PEM: &str = include_str!("../../../../tests/fixtures/jwt/rsa-other.pem");
    const EC_SIGNING_PEM: &str = include_str!("../../../../tests/fixtures/jwt/ec-signing.pem");
    const JWKS: &str = include_str!("../../../../tests/fixtures/jwt/jwks.json");

    const NOW: i64 = 1_700_000_000;
    const NOW_MS: f64 = NOW as f64 * 1000.0;
    const ISS: &str = "https://login.example.com/tenant/v2.0";
    const AUD: &str = "api://orders";
    const SUB: &str = "caller-7f3a-private";

    // ---- keys, signing and verifying (pure Rust, standing in for WebCrypto) ----

    fn rsa_key(pem: &str) -> RsaPrivateKey {
        RsaPrivateKey::from_pkcs8_der(&pem_block(pem, "PRIVATE KEY").unwrap()).unwrap()
    }

    fn rsa_signing() -> &'static RsaPrivateKey {
        static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| rsa_key(RSA_SIGNING_PEM))
    }

    fn rsa_other() -> &'static RsaPrivateKey {
        static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| rsa_key(RSA_OTHER_PEM))
    }

    fn ec_signing() -> p256::ecdsa::SigningKey {
        use p256::pkcs8::DecodePrivateKey as _;
        p256::ecdsa::SigningKey::from_pkcs8_der(&pem_block(EC_SIGNING_PEM, "PRIVATE KEY").unwrap())
            .unwrap()
    }

    fn jwks() -> Value {
        parse_jwks(JWKS).unwrap()
    }

    /// PSS salts come from here: deterministic (splitmix64), good enough for test signatures.
    struct TestRng(u64);

    impl RngCore for TestRng {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                *b = self.next_u64() as u8;
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    impl CryptoRng for TestRng {}

    enum Sig<'a> {
        Rs256(&'a RsaPrivateKey),
        Ps256(&'a RsaPrivateKey),
        Es256,
        Hs256(&'a [u8]),
        Empty,
    }

    fn b64_json(v: &Value) -> String {
        base64url(v.to_string().as_bytes())
    }

    fn token(header: Value, claims: &Value, sig: Sig) -> String {
        let input = format!("{}.{}", b64_json(&header), b64_json(claims));
        let digest = Sha256::digest(input.as_bytes());
        let signature = match sig {
            Sig::Rs256(key) => key.sign(Pkcs1v15Sign::new::<Sha256>(), &digest).unwrap(),
            Sig::Ps256(key) => key
                .sign_with_rng(&mut TestRng(7), Pss::new::<Sha256>(), &digest)
                .unwrap(),
            Sig::Es256 => {
                let signature: p256::ecdsa::Signature = ec_signing().sign(input.as_bytes());
                signature.to_bytes().to_vec()
            }
            Sig::Hs256(secret) => crate::crypto::hmac_sha256(secret, input.as_bytes()).to_vec(),
            Sig::Empty => Vec::new(),
        };
        format!("{input}.{}", base64url(&signature))
    }

    fn rs256(claims: &Value) -> String {
        token(
            json!({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}),
            claims,
            Sig::Rs256(rsa_signing()),
        )
    }

    /// Verifies like WebCrypto would, with the key material of the public JWK.
    struct Crypto;

    impl Verify for Crypto {
        fn verify(&self, alg: JwtAlgorithm, jwk: &Value, input: &[u8], signature: &[u8]) -> bool {
            let bytes = |name: &str| member(jwk, name).and_then(base64_decode);
            match alg {
                JwtAlgorithm::RS256 | JwtAlgorithm::PS256 => {
                    let (Some("RSA"), Some(n), Some(e)) =
                        (member(jwk, "kty"), bytes("n"), bytes("e"))
                    else {
                        return false;
                    };
                    let Ok(key) =
                        RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
                    else {
                        return false;
                    };
                    let digest = Sha256::digest(input);
                    if alg == JwtAlgorithm::RS256 {
                        key.verify(Pkcs1v15Sign::new::<Sha256>(), &digest, signature)
                            .is_ok()
                    } else {
                        key.verify(Pss::new::<Sha256>(), &digest, signature).is_ok()
                    }
                }
                JwtAlgorithm::ES256 => {
                    let (Some("EC"), Some("P-256"), Some(x), Some(y)) = (
                        member(jwk, "kty"),
                        member(jwk, "crv"),
                        bytes("x"),
                        bytes("y"),
                    ) else {
                        return false;
                    };
                    let point = [&[4u8][..], &x, &y].concat();
                    let (Ok(key), Ok(signature)) = (
                        p256::ecdsa::VerifyingKey::from_sec1_bytes(&point),
                        p256::ecdsa::Signature::from_slice(signature),
                    ) else {
                        return false;
                    };
                    key.verify(input, &signature).is_ok()
                }
            }
        }
    }

    /// A verifier that accepts every signature: refusals that still happen with it do not
    /// depend on cryptography at all.
    struct AcceptAnything;

    impl Verify for AcceptAnything {
        fn verify(&self, _: JwtAlgorithm, _: &Value, _: &[u8], _: &[u8]) -> bool {
            true
        }
    }

    // ---- policy and claims ----

    fn check_with(extra: Value) -> JwtCheck {
        let mut check = json!({
            "issuers": [ISS],
            "audiences": [AUD],
            "jwks_url": "https://login.example.com/keys",
            "algorithms": ["RS256", "PS256", "ES256"],
        });
        if let (Some(check), Value::Object(extra)) = (check.as_object_mut(), extra) {
            check.extend(extra);
        }
        serde_json::from_value(check).unwrap()
    }

    fn check() -> JwtCheck {
        check_with(json!({}))
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": SUB,
            "exp": NOW + 3600,
            "nbf": NOW - 10,
            "iat": NOW - 10,
            "scp": "orders.read orders.write",
            "roles": ["Orders.Writer", "Orders.Auditor"],
        })
    }

    /// `claims()` with some replaced; a null removes one.
    fn claims_with(changes: Value) -> Value {
        let mut claims = claims();
        if let (Some(map), Value::Object(changes)) = (claims.as_object_mut(), changes) {
            for (k, v) in changes {
                if v.is_null() {
                    map.remove(&k);
                } else {
                    map.insert(k, v);
                }
            }
        }
        claims
    }

    fn validate_at(token: &str, check: &JwtCheck) -> Result<Map<String, Value>, Problem> {
        validate(token, check, &jwks(), NOW_MS, &Crypto)
    }

    #[track_caller]
    fn assert_invalid(result: Result<Map<String, Value>, Problem>, description: &str) {
        let problem = result.unwrap_err();
        assert_eq!(
            (problem.status, problem.kind),
            (401, "jwt-invalid"),
            "{problem:?}"
        );
        let challenge =
            format!("Bearer error=\"invalid_token\", error_description=\"{description}\"");
        assert_eq!(problem.headers, vec![("www-authenticate", challenge)]);
    }

    #[track_caller]
    fn assert_insufficient(result: Result<Map<String, Value>, Problem>) {
        let problem = result.unwrap_err();
        assert_eq!(
            (problem.status, problem.kind),
            (403, "jwt-insufficient"),
            "{problem:?}"
        );
        assert_eq!(
            problem.headers,
            vec![(
                "www-authenticate",
                "Bearer error=\"insufficient_scope\", error_description=\"the token lacks a required claim\"".to_owned()
            )]
        );
    }

    const MALFORMED: &str = "the token is not a well-formed signed JWT";
    const ALG_REFUSED: &str = "the token's signing algorithm is not accepted";
    const NO_KEY: &str = "no signing key matches the token";
    const BAD_SIGNATURE: &str = "the token's signature is invalid";

    // ---- signatures and keys ----

    #[test]
    fn accepts_a_valid_rs256_token_and_returns_its_claims() {
        let claims = validate_at(&rs256(&claims()), &check()).unwrap();
        assert_eq!(Value::Object(claims), self::claims());
    }

    #[test]
    fn accepts_a_valid_ps256_token() {
        let t = token(
            json!({"alg": "PS256", "kid": "rsa-1"}),
            &claims(),
            Sig::Ps256(rsa_signing()),
        );
        assert_eq!(validate_at(&t, &check()).unwrap()["sub"], SUB);
    }

    #[test]
    fn accepts_a_valid_es256_token() {
        let t = token(
            json!({"alg": "ES256", "typ": "at+jwt", "kid": "ec-1"}),
            &claims(),
            Sig::Es256,
        );
        assert_eq!(validate_at(&t, &check()).unwrap()["sub"], SUB);
    }

    #[test]
    fn a_token_without_kid_uses_the_only_key_that_fits_its_algorithm() {
        // RS256: rsa-enc is an encryption key, so rsa-1 is the only RSA signing key.
        let t = token(
            json!({"alg": "RS256"}),
            &claims(),
            Sig::Rs256(rsa_signing()),
        );
        assert!(validate_at(&t, &check()).is_ok());
        let t = token(json!({"alg": "ES256"}), &claims(), Sig::Es256);
        assert!(validate_at(&t, &check()).is_ok());
        // With two RSA signing keys, a token without kid names none of them.
        let mut two = jwks();
        let copy = json!({"kty": "RSA", "kid": "rsa-2", "n": two["keys"][0]["n"], "e": "AQAB"});
        two["keys"].as_array_mut().unwrap().push(copy);
        let t = token(
            json!({"alg": "RS256"}),
            &claims(),
            Sig::Rs256(rsa_signing()),
        );
        assert_invalid(validate(&t, &check(), &two, NOW_MS, &Crypto), NO_KEY);
    }

    #[test]
    fn refuses_a_token_signed_by_another_key() {
        let t = token(
            json!({"alg": "RS256", "kid": "rsa-1"}),
            &claims(),
            Sig::Rs256(rsa_other()),
        );
        assert_invalid(validate_at(&t, &check()), BAD_SIGNATURE);
        let t = token(
            json!({"alg": "PS256", "kid": "rsa-1"}),
            &claims(),
            Sig::Ps256(rsa_other()),
        );
        assert_invalid(validate_at(&t, &check()), BAD_SIGNATURE);
    }

    #[test]
    fn refuses_a_token_whose_claims_were_changed_after_signing() {
        let signed = rs256(&claims());
        let forged = b64_json(&claims_with(json!({"roles": ["Orders.Admin"]})));
        let parts: Vec<&str> = signed.split('.').collect();
        let t = format!("{}.{forged}.{}", parts[0], parts[2]);
        assert_invalid(validate_at(&t, &check()), BAD_SIGNATURE);
    }

    #[test]
    fn refuses_alg_none_whatever_the_verifier_says() {
        for alg in ["none", "None", "NONE"] {
            let t = token(json!({"alg": alg}), &claims(), Sig::Empty);
            assert_invalid(
                validate(&t, &check(), &jwks(), NOW_MS, &AcceptAnything),
                ALG_REFUSED,
            );
            let t = token(
                json!({"alg": alg, "kid": "rsa-1"}),
                &claims(),
                Sig::Rs256(rsa_signing()),
            );
            assert_invalid(
                validate(&t, &check(), &jwks(), NOW_MS, &AcceptAnything),
                ALG_REFUSED,
            );
        }
    }

    #[test]
    fn refuses_hs256_signed_with_the_rsa_public_key_as_secret() {
        // The classic algorithm confusion: the RSA public key is public, so an HMAC made with
        // it as the secret proves nothing.
        for kid in ["rsa-1", "hmac-1"] {
            let t = token(
                json!({"alg": "HS256", "kid": kid}),
                &claims(),
                Sig::Hs256(RSA_SIGNING_PUBLIC_PEM.as_bytes()),
            );
            assert_invalid(
                validate(&t, &check(), &jwks(), NOW_MS, &AcceptAnything),
                ALG_REFUSED,
            );
        }
        for alg in ["HS384", "HS512", "RS384", "ES512", "EdDSA", ""] {
            let t = token(json!({"alg": alg}), &claims(), Sig::Empty);
            assert_invalid(parse(&t, &check()).map(|p| p.claims), ALG_REFUSED);
        }
        let t = token(
            json!({"kid": "rsa-1"}),
            &claims(),
            Sig::Rs256(rsa_signing()),
        );
        assert_invalid(validate_at(&t, &check()), ALG_REFUSED);
    }

    #[test]
    fn refuses_an_algorithm_the_route_does_not_accept() {
        // Without `algorithms`, a route accepts RS256 only.
        let policy = json!({"issuers": [ISS], "audiences": [AUD], "jwks_url": "https://k"});
        let default_check: JwtCheck = serde_json::from_value(policy).unwrap();
        assert_eq!(default_check.algorithms, vec![JwtAlgorithm::RS256]);
        let ps = token(
            json!({"alg": "PS256", "kid": "rsa-1"}),
            &claims(),
            Sig::Ps256(rsa_signing()),
        );
        let es = token(
            json!({"alg": "ES256", "kid": "ec-1"}),
            &claims(),
            Sig::Es256,
        );
        for t in [&ps, &es] {
            assert_invalid(validate_at(t, &default_check), ALG_REFUSED);
        }
        assert!(validate_at(&rs256(&claims()), &default_check).is_ok());
    }

    #[test]
    fn refuses_a_token_whose_kid_is_unknown() {
        let t = token(
            json!({"alg": "RS256", "kid": "rotated-away"}),
            &claims(),
            Sig::Rs256(rsa_signing()),
        );
        assert_invalid(validate_at(&t, &check()), NO_KEY);
    }

    #[test]
    fn never_uses_an_rsa_key_for_es256() {
        let t = token(
            json!({"alg": "ES256", "kid": "rsa-1"}),
            &claims(),
            Sig::Es256,
        );
        assert!(select_key(&jwks(), &parse(&t, &check()).unwrap()).is_none());
        assert_invalid(
            validate(&t, &check(), &jwks(), NOW_MS, &AcceptAnything),
            NO_KEY,
        );
        // …nor an EC key for RS256.
        let t = token(
            json!({"alg": "RS256", "kid": "ec-1"}),
            &claims(),
            Sig::Rs256(rsa_signing()),
        );
        assert_invalid(
            validate(&t, &check(), &jwks(), NOW_MS, &AcceptAnything),
            NO_KEY,
        );
    }

    #[test]
    fn never_uses_an_encryption_key_an_hmac_key_or_a_key_for_another_algorithm() {
        // rsa-enc holds the other key's public half, so the signature itself would verify.
        let t = token(
            json!({"alg": "RS256", "kid": "rsa-enc"}),
            &claims(),
            Sig::Rs256(rsa_other()),
        );
        assert_invalid(validate_at(&t, &check()), NO_KEY);
        let t = token(
            json!({"alg": "RS256", "kid": "hmac-1"}),
            &claims(),
            Sig::Rs256(rsa_signing()),
        );
        assert_invalid(
            validate(&t, &check(), &jwks(), NOW_MS, &AcceptAnything),
            NO_KEY,
        );
        // A key published for RS256 does not verify PS256.
        let mut pinned = jwks();
        pinned["keys"][0]["alg"] = json!("RS256");
        let t = token(
            json!({"alg": "PS256", "kid": "rsa-1"}),
            &claims(),
            Sig::Ps256(rsa_signing()),
        );
        assert_invalid(validate(&t, &check(), &pinned, NOW_MS, &Crypto), NO_KEY);
        assert!(validate(&rs256(&claims()), &check(), &pinned, NOW_MS, &Crypto).is_ok());
        // A key of another type, whatever members it carries.
        let mut oct = jwks();
        oct["keys"][0]["kty"] = json!("oct");
        assert_invalid(
            validate(&rs256(&claims()), &check(), &oct, NOW_MS, &AcceptAnything),
            NO_KEY,
        );
        // key_ops without "verify".
        let mut ops = jwks();
        ops["keys"][0]["key_ops"] = json!(["encrypt"]);
        assert_invalid(
            validate(&rs256(&claims()), &check(), &ops, NOW_MS, &Crypto),
            NO_KEY,
        );
    }

    #[test]
    fn refuses_rsa_keys_under_2048_bits() {
        let mut small = jwks();
        small["keys"][0]["n"] = json!(base64url(&[0xC5; 128]));
        assert_invalid(
            validate(&rs256(&claims()), &check(), &small, NOW_MS, &AcceptAnything),
            NO_KEY,
        );
    }

    #[test]
    fn ignores_keys_the_token_brings_in_its_own_header() {
        let public = rsa_other().to_public_key();
        let embedded = json!({
            "kty": "RSA",
            "n": base64url(&public.n().to_bytes_be()),
            "e": base64url(&public.e().to_bytes_be()),
        });
        for header in [
            json!({"alg": "RS256", "kid": "rsa-1", "jwk": embedded}),
            json!({"alg": "RS256", "jwk": embedded, "jku": "https://attacker.example/keys"}),
        ] {
            let t = token(header, &claims(), Sig::Rs256(rsa_other()));
            assert_invalid(validate_at(&t, &check()), BAD_SIGNATURE);
        }
    }

    #[test]
    fn refuses_an_es256_signature_that_is_not_64_bytes() {
        let t = token(
            json!({"alg": "ES256", "kid": "ec-1"}),
            &claims(),
            Sig::Es256,
        );
        let (input, _) = t.rsplit_once('.').unwrap();
        let der_sized = format!("{input}.{}", base64url(&[0x30; 71]));
        assert_invalid(
            validate(&der_sized, &check(), &jwks(), NOW_MS, &AcceptAnything),
            BAD_SIGNATURE,
        );
    }

    #[test]
    fn public_jwk_keeps_only_the_public_members() {
        let jwk = json!({"kty": "RSA", "kid": "k", "use": "sig", "alg": "RS256", "n": "AQ", "e": "AQAB", "d": "c2VjcmV0", "x5c": ["MII"]});
        assert_eq!(
            public_jwk(&jwk),
            json!({"kty": "RSA", "n": "AQ", "e": "AQAB"})
        );
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": "AQ", "y": "Ag", "d": "c2VjcmV0", "key_ops": ["verify"]});
        assert_eq!(
            public_jwk(&jwk),
            json!({"kty": "EC", "crv": "P-256", "x": "AQ", "y": "Ag"})
        );
        assert_eq!(
            public_jwk(&json!({"kty": "oct", "k": "c2VjcmV0"})),
            json!({})
        );
    }

    #[test]
    fn parse_jwks_wants_an_object_with_a_keys_array() {
        assert!(parse_jwks(r#"{"keys": []}"#).is_some());
        for body in ["", "[]", r#"{"keys": {}}"#, r#"{"key": []}"#, "<html>"] {
            assert!(parse_jwks(body).is_none(), "{body}");
        }
    }

    // ---- time ----

    #[test]
    fn refuses_an_expired_token_beyond_the_clock_skew_and_accepts_one_within_it() {
        let expired = rs256(&claims_with(json!({"exp": NOW - 61})));
        assert_invalid(validate_at(&expired, &check()), "the token has expired");
        let just = rs256(&claims_with(json!({"exp": NOW - 59})));
        assert!(validate_at(&just, &check()).is_ok());
        let strict = check_with(json!({"clock_skew_seconds": 0}));
        assert_invalid(validate_at(&just, &strict), "the token has expired");
        let now = rs256(&claims_with(json!({"exp": NOW})));
        assert_invalid(validate_at(&now, &strict), "the token has expired");
    }

    #[test]
    fn refuses_a_token_without_a_numeric_exp() {
        let t = rs256(&claims_with(json!({"exp": null})));
        assert_invalid(validate_at(&t, &check()), "the token has no expiry");
        let t = rs256(&claims_with(json!({"exp": "1700003600"})));
        assert_invalid(
            validate_at(&t, &check()),
            "the token's expiry or start time is malformed",
        );
    }

    #[test]
    fn refuses_a_token_not_valid_yet_beyond_the_clock_skew() {
        let early = rs256(&claims_with(json!({"nbf": NOW + 61})));
        assert_invalid(validate_at(&early, &check()), "the token is not valid yet");
        let soon = rs256(&claims_with(json!({"nbf": NOW + 59})));
        assert!(validate_at(&soon, &check()).is_ok());
        let without = rs256(&claims_with(json!({"nbf": null})));
        assert!(validate_at(&without, &check()).is_ok());
    }

    // ---- issuer and audience ----

    #[test]
    fn refuses_a_wrong_or_missing_issuer() {
        for iss in [
            json!("https://login.example.com/other/v2.0"),
            json!(null),
            json!([ISS]),
        ] {
            let t = rs256(&claims_with(json!({"iss": iss})));
            assert_invalid(
                validate_at(&t, &check()),
                "the token's issuer is not accepted",
            );
        }
    }

    #[test]
    fn refuses_a_wrong_audience_as_string_or_array() {
        for aud in [
            json!("api://billing"),
            json!(["api://billing", "api://x"]),
            json!([]),
            json!(null),
        ] {
            let t = rs256(&claims_with(json!({"aud": aud})));
            assert_invalid(
                validate_at(&t, &check()),
                "the token's audience is not accepted",
            );
        }
        let t = rs256(&claims_with(json!({"aud": ["api://billing", AUD]})));
        assert!(validate_at(&t, &check()).is_ok());
    }

    // ---- required claims ----

    #[test]
    fn a_missing_required_claim_is_403_insufficient_scope() {
        let check = check_with(json!({"required_claims": {"roles": []}}));
        assert!(validate_at(&rs256(&claims()), &check).is_ok());
        let t = rs256(&claims_with(json!({"roles": null})));
        assert_insufficient(validate_at(&t, &check));
    }

    #[test]
    fn scp_is_split_at_spaces() {
        let wants = |scopes: Value| check_with(json!({"required_claims": {"scp": scopes}}));
        let t = rs256(&claims());
        assert!(validate_at(&t, &wants(json!(["orders.write"]))).is_ok());
        assert!(validate_at(&t, &wants(json!(["orders.read", "orders.write"]))).is_ok());
        assert_insufficient(validate_at(&t, &wants(json!(["orders"]))));
        assert_insufficient(validate_at(
            &t,
            &wants(json!(["orders.write", "orders.delete"])),
        ));
    }

    #[test]
    fn roles_are_matched_element_wise() {
        let wants = |roles: Value| check_with(json!({"required_claims": {"roles": roles}}));
        let t = rs256(&claims());
        assert!(validate_at(&t, &wants(json!(["Orders.Writer"]))).is_ok());
        assert_insufficient(validate_at(&t, &wants(json!(["Orders.Admin"]))));
        // An element is one value: it is not split.
        let t = rs256(&claims_with(
            json!({"roles": ["Orders.Writer Orders.Admin"]}),
        ));
        assert_insufficient(validate_at(&t, &wants(json!(["Orders.Admin"]))));
    }

    // ---- malformed tokens and headers ----

    #[test]
    fn refuses_malformed_tokens() {
        let good = rs256(&claims());
        let p: Vec<&str> = good.split('.').collect();
        let header = p[0];
        let sig = p[2];
        let cases = [
            format!("{}.{}", p[0], p[1]),
            format!("{good}.{sig}"),
            String::new(),
            "..".to_owned(),
            format!("{header}.{}!.{sig}", p[1]),
            format!("{header}.{}.{sig}=", p[1]),
            format!("{header}.{}+.{sig}", p[1]),
            format!("{}.{}.{sig}", base64url(b"not json"), p[1]),
            format!("{header}.{}.{sig}", b64_json(&json!(["a", "b"]))),
            format!("{header}.{}.{sig}", b64_json(&json!("claims"))),
            format!("{header}.{}.{sig}", base64url(b"{\"sub\":")),
            format!("{header}.{}.", p[1]),
            token(
                json!({"alg": "RS256", "kid": "rsa-1", "crit": ["b64"], "b64": false}),
                &claims(),
                Sig::Rs256(rsa_signing()),
            ),
            token(
                json!({"alg": "RS256", "kid": "rsa-1", "typ": "dpop+jwt"}),
                &claims(),
                Sig::Rs256(rsa_signing()),
            ),
            token(
                json!({"alg": "RS256", "kid": 1}),
                &claims(),
                Sig::Rs256(rsa_signing()),
            ),
            rs256(&claims_with(
                json!({"padding": "x".repeat(MAX_TOKEN_BYTES)}),
            )),
        ];
        for t in &cases {
            let result = validate(t, &check(), &jwks(), NOW_MS, &AcceptAnything);
            let problem = result.clone().unwrap_err();
            assert_eq!(problem.kind, "jwt-invalid", "{t:.80}");
            assert_invalid(result, MALFORMED);
        }
        // A header whose `alg` is not one of ours is refused as such, before anything else.
        let t = format!("{}.{}.{sig}", b64_json(&json!({"alg": "none"})), p[1]);
        assert_invalid(parse(&t, &check()).map(|p| p.claims), ALG_REFUSED);
    }

    #[test]
    fn refuses_a_segment_that_is_not_canonical_base64url() {
        // Found by tests/fuzz.rs: the spare bits of a segment's last character change no byte,
        // so a signed token was accepted in 16 spellings of its signature.
        let good = rs256(&claims());
        assert!(validate_at(&good, &check()).is_ok());
        let (input, sig) = good.rsplit_once('.').unwrap();
        // 256 bytes are 342 characters: the last one carries 2 bits and 4 spare ones.
        assert_eq!(sig.len() % 4, 2);
        const URL_SAFE: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let last = URL_SAFE.find(sig.chars().last().unwrap()).unwrap();
        let sibling = URL_SAFE.as_bytes()[last ^ 1] as char;
        let altered = format!("{}{sibling}", &sig[..sig.len() - 1]);
        assert_eq!(base64_decode(&altered), base64_decode(sig));
        assert_invalid(
            validate_at(&format!("{input}.{altered}"), &check()),
            MALFORMED,
        );
    }

    #[test]
    fn a_missing_or_non_bearer_authorization_is_jwt_missing() {
        for header in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer   "),
            Some("Basic dXNlcjpwYXNz"),
            Some("Token abc"),
        ] {
            let problem = bearer_token(header).unwrap_err();
            assert_eq!(
                (problem.status, problem.kind),
                (401, "jwt-missing"),
                "{header:?}"
            );
            assert_eq!(
                problem.headers,
                vec![(
                    "www-authenticate",
                    "Bearer realm=\"azure-edge-gateway\"".to_owned()
                )]
            );
        }
        assert_eq!(
            bearer_token(Some("Bearer abc.def.ghi")).unwrap(),
            "abc.def.ghi"
        );
        assert_eq!(
            bearer_token(Some("bearer  abc.def.ghi ")).unwrap(),
            "abc.def.ghi"
        );
        assert_eq!(bearer_token(Some("BEARER abc")).unwrap(), "abc");
    }

    #[test]
    fn problems_never_echo_the_token_its_claims_or_keys() {
        let check = check_with(json!({"required_claims": {"roles": ["Orders.Admin"]}}));
        let tokens = [
            rs256(&claims_with(json!({"exp": NOW - 3600}))),
            rs256(&claims_with(json!({"aud": "api://secret-audience"}))),
            rs256(&claims_with(json!({"iss": "https://secret-issuer"}))),
            rs256(&claims()),
            token(
                json!({"alg": "RS256", "kid": "rsa-1"}),
                &claims(),
                Sig::Rs256(rsa_other()),
            ),
            token(
                json!({"alg": "HS256", "kid": "secret-kid"}),
                &claims(),
                Sig::Hs256(b"k"),
            ),
        ];
        let n = member(&jwks()["keys"][0], "n").unwrap().to_owned();
        for t in &tokens {
            let problem = validate_at(t, &check).unwrap_err();
            let rendered = format!("{} {:?}", problem.body("/orders", "r-1"), problem.headers);
            for secret in [
                t.as_str(),
                t.split('.').nth(1).unwrap(),
                SUB,
                "secret",
                &n[..40],
            ] {
                assert!(!rendered.contains(secret), "{rendered}");
            }
        }
    }

    // ---- key set cache ----

    #[test]
    fn the_key_set_is_fresh_for_its_ttl_then_fetched_again() {
        let mut cache = JwksCache::new();
        let default_ttl = check();
        assert_eq!(cache.lookup(&default_ttl, NOW_MS), JwksLookup::Missing);
        cache.store(&default_ttl, jwks(), NOW_MS);
        let keys = jwks();
        assert_eq!(
            cache.lookup(&default_ttl, NOW_MS + 599_999.0),
            JwksLookup::Fresh(&keys)
        );
        assert_eq!(
            cache.lookup(&default_ttl, NOW_MS + 600_000.0),
            JwksLookup::Expired
        );
        let short = check_with(json!({"jwks_ttl_seconds": 30}));
        assert_eq!(
            cache.lookup(&short, NOW_MS + 29_000.0),
            JwksLookup::Fresh(&keys)
        );
        assert_eq!(cache.lookup(&short, NOW_MS + 30_000.0), JwksLookup::Expired);
        let other_url = check_with(json!({"jwks_url": "https://other.example/keys"}));
        assert_eq!(cache.lookup(&other_url, NOW_MS), JwksLookup::Missing);
    }

    #[test]
    fn one_fetch_at_a_time_per_key_set() {
        let check = check();
        let mut cache = JwksCache::new();
        assert!(cache.claim_fetch(&check, NOW_MS), "the first caller leads");
        for i in 1..200 {
            assert!(
                !cache.claim_fetch(&check, NOW_MS + i as f64),
                "caller {i} waits"
            );
        }
        cache.store(&check, jwks(), NOW_MS + 300.0);
        assert!(matches!(
            cache.lookup(&check, NOW_MS + 301.0),
            JwksLookup::Fresh(_)
        ));
        // After a failure, the next fetch (once the back-off ends) has a free slot.
        let later = NOW_MS + 700_000.0;
        assert!(cache.claim_fetch(&check, later));
        cache.fail(&check, later + 10.0);
        assert!(cache.claim_fetch(&check, later + 5_010.0));
        // A leader whose request vanished is replaced after the leader timeout.
        assert!(!cache.claim_fetch(&check, later + 5_010.0 + JWKS_LEADER_TIMEOUT_MS - 1.0));
        assert!(cache.claim_fetch(&check, later + 5_010.0 + JWKS_LEADER_TIMEOUT_MS));
        // Another URL has its own slot.
        let other = check_with(json!({"jwks_url": "https://other.example/keys"}));
        assert!(cache.claim_fetch(&other, NOW_MS));
    }

    #[test]
    fn a_failed_fetch_fails_closed_for_a_few_seconds() {
        let check = check();
        let mut cache = JwksCache::new();
        cache.fail(&check, NOW_MS);
        assert_eq!(cache.lookup(&check, NOW_MS + 4_999.0), JwksLookup::Failed);
        assert_eq!(cache.lookup(&check, NOW_MS + 5_000.0), JwksLookup::Missing);
        // Expired keys are not served while the issuer is unreachable.
        cache.store(&check, jwks(), NOW_MS);
        let later = NOW_MS + 700_000.0;
        cache.fail(&check, later);
        assert_eq!(cache.lookup(&check, later + 1.0), JwksLookup::Failed);
        assert_eq!(cache.lookup(&check, later + 5_000.0), JwksLookup::Expired);
        // Fresh keys stay fresh when a refetch for an unknown kid fails.
        cache.store(&check, jwks(), later);
        cache.fail(&check, later + 61_000.0);
        assert!(matches!(
            cache.lookup(&check, later + 61_001.0),
            JwksLookup::Fresh(_)
        ));
    }

    #[test]
    fn an_unknown_kid_refetches_at_most_once_a_minute() {
        let check = check();
        let mut cache = JwksCache::new();
        cache.store(&check, jwks(), NOW_MS);
        assert!(!cache.may_refetch_for_unknown_kid(&check, NOW_MS + 59_999.0));
        assert!(cache.may_refetch_for_unknown_kid(&check, NOW_MS + 60_000.0));
        // The slot is taken by the first caller, whether or not its fetch succeeds.
        assert!(!cache.may_refetch_for_unknown_kid(&check, NOW_MS + 60_001.0));
        cache.fail(&check, NOW_MS + 60_500.0);
        assert!(!cache.may_refetch_for_unknown_kid(&check, NOW_MS + 120_000.0));
        assert!(cache.may_refetch_for_unknown_kid(&check, NOW_MS + 120_500.0));
        // A URL never fetched may be fetched.
        let mut empty = JwksCache::new();
        assert!(empty.may_refetch_for_unknown_kid(&check, NOW_MS));
    }
}
