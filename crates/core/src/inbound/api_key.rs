//! API keys: a header compared with keys held in Worker secrets or as SHA-256 hashes.
//!
//! The presented key is hashed once and compared with every configured key's hash in constant
//! time, without an early exit: timing says nothing about which key matched, nor how much of
//! one, nor how long the right key is. The log names the key that matched, never the key.

use crate::crypto::{equal_in_constant_time, sha256};
use crate::policy::prepared::PreparedApiKey;
use crate::problem::Problem;

/// On success, the name of the key (for the log line and rate limits). `digest(name)` is the
/// SHA-256 of the key held in the Worker secret `name` (the gateway hashes each once per
/// isolate), `None` when that secret is not set.
pub fn check<'c>(
    check: &'c PreparedApiKey,
    presented: Option<&str>,
    digest: impl Fn(&str) -> Option<[u8; 32]>,
) -> Result<&'c str, Problem> {
    let challenge = format!("ApiKey header=\"{}\"", check.header_display);
    let Some(presented) = presented.filter(|p| !p.is_empty()) else {
        return Err(Problem::new(
            401,
            "api-key-missing",
            "API key required",
            format!(
                "This route needs an API key in the {} header.",
                check.header_display
            ),
        )
        .with_header("www-authenticate", challenge));
    };
    let presented = sha256(presented.as_bytes());
    let mut matched = None;
    let mut configured = 0;
    for key in &check.keys {
        let expected = match (&key.digest, &key.secret) {
            (Some(digest), _) => *digest,
            (None, Some(name)) => match digest(name) {
                Some(digest) => digest,
                None => continue,
            },
            (None, None) => continue,
        };
        configured += 1;
        if equal_in_constant_time(&expected, &presented) && matched.is_none() {
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
                check.header_display
            ),
        )
        .with_header("www-authenticate", challenge)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::prepared::PreparedKey;

    fn keys() -> PreparedApiKey {
        let key = |name: &str, secret: Option<&str>, digest: Option<[u8; 32]>| PreparedKey {
            name: name.into(),
            secret: secret.map(Into::into),
            digest,
        };
        PreparedApiKey {
            header: "x-api-key".into(),
            header_display: "x-api-key".into(),
            keys: vec![
                key("old", Some("KEY_OLD"), None),
                key("new", Some("KEY_NEW"), None),
                key("hashed", None, Some(sha256(b"hashed-key-1"))),
            ],
        }
    }

    fn secrets(name: &str) -> Option<[u8; 32]> {
        match name {
            "KEY_OLD" => Some(sha256(b"s3cret-old")),
            "KEY_NEW" => Some(sha256(b"s3cret-new")),
            _ => None,
        }
    }

    #[test]
    fn names_the_key_that_matched_from_a_secret_or_a_hash() {
        assert_eq!(check(&keys(), Some("s3cret-new"), secrets), Ok("new"));
        assert_eq!(check(&keys(), Some("s3cret-old"), secrets), Ok("old"));
        assert_eq!(check(&keys(), Some("hashed-key-1"), secrets), Ok("hashed"));
    }

    #[test]
    fn rejections_challenge_and_never_echo_the_key() {
        let missing = check(&keys(), None, secrets).unwrap_err();
        assert_eq!((missing.status, missing.kind), (401, "api-key-missing"));
        assert_eq!(
            missing.headers[0],
            ("www-authenticate", "ApiKey header=\"x-api-key\"".to_owned())
        );
        assert_eq!(
            check(&keys(), Some(""), secrets).unwrap_err().kind,
            "api-key-missing"
        );
        let wrong = check(&keys(), Some("s3cret-ol"), secrets).unwrap_err();
        assert_eq!((wrong.status, wrong.kind), (401, "api-key-invalid"));
        assert!(!wrong.body("/", "r").contains("s3cret"));
    }

    #[test]
    fn keys_whose_secrets_are_unset_are_skipped_and_none_at_all_is_a_500() {
        let only_secrets = PreparedApiKey {
            keys: keys().keys[..2].to_vec(),
            ..keys()
        };
        assert_eq!(
            check(&only_secrets, Some("x"), |_| None)
                .unwrap_err()
                .status,
            500
        );
        assert_eq!(check(&keys(), Some("hashed-key-1"), |_| None), Ok("hashed"));
    }
}
