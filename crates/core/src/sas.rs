//! User delegation SAS (the valet key): a URL that lets its holder do one thing to one blob,
//! signed with a user delegation key the gateway's identity obtained from Storage. Only the
//! string-to-sign and the URL are built here; the HMAC comes from [`crate::crypto`].
//!
//! The signed version is fixed: [`SAS_VERSION`] (2025-11-05), whose string-to-sign has 26 lines
//! (Azure's "Create a user delegation SAS", version 2025-07-05 and later: `skdutid` and `sduoid`
//! after `scid`). It is the newest version Azurite verifies (the 28-line 2026-10-06 form is
//! refused there), so the same URL is checked locally and accepted by Azure.

/// The `sv` of every URL minted here, and the `x-ms-version` of the Get User Delegation Key call.
pub const SAS_VERSION: &str = "2025-11-05";

/// A user delegation key as Get User Delegation Key answers it.
#[derive(Clone, PartialEq)]
pub struct DelegationKey {
    pub signed_oid: String,
    pub signed_tid: String,
    pub signed_start: String,
    pub signed_expiry: String,
    pub signed_service: String,
    pub signed_version: String,
    /// The key itself, decoded from the base64 Storage sends once, when the answer is read.
    /// Never logged, never shown.
    pub secret: Vec<u8>,
}

// The key's value signs URLs: never printed.
impl std::fmt::Debug for DelegationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelegationKey")
            .field("signed_oid", &self.signed_oid)
            .field("signed_start", &self.signed_start)
            .field("signed_expiry", &self.signed_expiry)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Which key a valet route signs with: one per account and identity (token key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct KeyId {
    /// The account's URL, without a trailing slash.
    pub account_url: String,
    pub token: crate::identity::TokenKey,
}

/// How long a user delegation key is asked for. A URL must expire before its key, so a key is
/// handed out only while it outlives the longest URL a route may mint
/// ([`MAX_URL_LIFETIME_MS`]): a key of 3 hours serves for about 2, and is refreshed after about
/// one (the cache's refresh point, half its usable life). A short key also bounds how long a
/// gateway keeps minting with a key that was revoked.
pub const KEY_LIFETIME_MS: f64 = 3.0 * 3600.0 * 1000.0;
/// The longest a URL lives: a route's `lifetime_seconds` is at most this.
pub const MAX_URL_LIFETIME_SECONDS: u32 = 3600;
pub const MAX_URL_LIFETIME_MS: f64 = MAX_URL_LIFETIME_SECONDS as f64 * 1000.0;
/// A key's start is set this far back: Storage's clock may be behind the Worker's.
pub const KEY_START_SKEW_MS: f64 = 5.0 * 60.0 * 1000.0;

/// A key held by the isolate's [`KeyCache`], shared by every request it signs for.
#[derive(Debug, Clone)]
pub struct HeldKey {
    pub key: std::rc::Rc<DelegationKey>,
    pub obtained_at: f64,
    /// The key's expiry less [`MAX_URL_LIFETIME_MS`]: any URL minted before this expires
    /// before its key.
    pub serves_until: f64,
}

impl crate::identity::cache::Lease for HeldKey {
    fn obtained_at(&self) -> f64 {
        self.obtained_at
    }
    fn expires_at(&self) -> f64 {
        self.serves_until
    }
}

impl crate::identity::cache::Failure for crate::problem::Problem {
    fn retry_after_secs(&self) -> Option<u64> {
        self.headers
            .iter()
            .find(|(name, _)| *name == "retry-after")
            .and_then(|(_, v)| v.parse().ok())
    }
}

/// The user delegation keys of one isolate: the token cache's state machine (one fetch for
/// many cold callers, refreshed ahead, served while usable when the identity provider or
/// Storage is down, a failure remembered for a back-off).
pub type KeyCache = crate::identity::cache::Cache<KeyId, HeldKey, crate::problem::Problem>;

/// Reads the answer of Get User Delegation Key (`<UserDelegationKey>…`); `None` when a field is
/// missing or the key's value is not base64.
pub fn parse_delegation_key(xml: &str) -> Option<DelegationKey> {
    let field =
        |name: &str| crate::encoding::xml_element(xml, name).map(|text| text.trim().to_owned());
    Some(DelegationKey {
        signed_oid: field("SignedOid")?,
        signed_tid: field("SignedTid")?,
        signed_start: field("SignedStart")?,
        signed_expiry: field("SignedExpiry")?,
        signed_service: field("SignedService")?,
        signed_version: field("SignedVersion")?,
        secret: crate::encoding::base64_decode(&field("Value")?)?,
    })
}

/// The body of Get User Delegation Key for a key valid from `start` to `expiry` (ISO 8601, UTC,
/// to the second).
pub fn key_request_body(start: &str, expiry: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><KeyInfo><Start>{start}</Start><Expiry>{expiry}</Expiry></KeyInfo>"
    )
}

/// What one URL allows: a closed set, never a permission string from a caller or a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// `c`: create a new blob; cannot overwrite one, cannot read.
    Create,
    /// `cw`: create or overwrite.
    CreateWrite,
    /// `r`: read.
    Read,
}

impl Permission {
    pub fn sp(self) -> &'static str {
        match self {
            Permission::Create => "c",
            Permission::CreateWrite => "cw",
            Permission::Read => "r",
        }
    }
}

/// One blob SAS to mint.
#[derive(Debug, Clone)]
pub struct BlobSas<'a> {
    pub account: &'a str,
    pub container: &'a str,
    /// The blob's name, unencoded (the string-to-sign carries it as it is).
    pub blob: &'a str,
    pub permission: Permission,
    pub start: &'a str,
    pub expiry: &'a str,
    /// `sip`: an address or range the URL is limited to (Azurite does not enforce it).
    pub ip: Option<&'a str>,
    /// `spr`: `https`, or `https,http` for a local endpoint.
    pub protocol: &'a str,
    /// `rscd`, `rsct`: response overrides for reads.
    pub content_disposition: Option<&'a str>,
    pub content_type: Option<&'a str>,
}

/// The string-to-sign of `sas` under `key`, in the documented order for [`SAS_VERSION`].
pub fn string_to_sign(sas: &BlobSas<'_>, key: &DelegationKey) -> String {
    let resource = format!("/blob/{}/{}/{}", sas.account, sas.container, sas.blob);
    [
        sas.permission.sp(),
        sas.start,
        sas.expiry,
        &resource,
        &key.signed_oid,
        &key.signed_tid,
        &key.signed_start,
        &key.signed_expiry,
        &key.signed_service,
        &key.signed_version,
        "", // saoid
        "", // suoid
        "", // scid
        "", // skdutid
        "", // sduoid
        sas.ip.unwrap_or_default(),
        sas.protocol,
        SAS_VERSION,
        "b", // sr
        "",  // snapshot time
        "",  // ses
        "",  // rscc
        sas.content_disposition.unwrap_or_default(),
        "", // rsce
        "", // rscl
        sas.content_type.unwrap_or_default(),
    ]
    .join("\n")
}

/// The SAS query string (without `?`) of `sas` under `key`: what the URL of the blob carries.
pub fn query(sas: &BlobSas<'_>, key: &DelegationKey) -> String {
    let signature = crate::encoding::base64(&crate::crypto::hmac_sha256(
        &key.secret,
        string_to_sign(sas, key).as_bytes(),
    ));
    let mut pairs: Vec<(&str, &str)> = vec![
        ("sp", sas.permission.sp()),
        ("st", sas.start),
        ("se", sas.expiry),
        ("skoid", &key.signed_oid),
        ("sktid", &key.signed_tid),
        ("skt", &key.signed_start),
        ("ske", &key.signed_expiry),
        ("sks", &key.signed_service),
        ("skv", &key.signed_version),
    ];
    if let Some(ip) = sas.ip {
        pairs.push(("sip", ip));
    }
    pairs.extend([("spr", sas.protocol), ("sv", SAS_VERSION), ("sr", "b")]);
    if let Some(v) = sas.content_disposition {
        pairs.push(("rscd", v));
    }
    if let Some(v) = sas.content_type {
        pairs.push(("rsct", v));
    }
    pairs.push(("sig", &signature));
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        crate::encoding::push_percent_encoded(&mut out, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DelegationKey {
        parse_delegation_key(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><UserDelegationKey>\
             <SignedOid>oid-1</SignedOid><SignedTid>tid-1</SignedTid>\
             <SignedStart>2026-12-07T10:00:00Z</SignedStart><SignedExpiry>2026-12-07T12:00:00Z</SignedExpiry>\
             <SignedService>b</SignedService><SignedVersion>2025-11-05</SignedVersion>\
             <Value>a2V5LWJ5dGVz</Value></UserDelegationKey>",
        )
        .unwrap()
    }

    fn sas() -> BlobSas<'static> {
        BlobSas {
            account: "contoso",
            container: "uploads",
            blob: "t1/report 1.pdf",
            permission: Permission::Create,
            start: "2026-12-07T10:55:00Z",
            expiry: "2026-12-07T11:10:00Z",
            ip: None,
            protocol: "https",
            content_disposition: None,
            content_type: None,
        }
    }

    #[test]
    fn the_string_to_sign_has_the_26_lines_of_the_version_in_order() {
        let s = string_to_sign(&sas(), &key());
        let lines: Vec<&str> = s.split('\n').collect();
        assert_eq!(lines.len(), 26);
        assert_eq!(lines[0], "c");
        assert_eq!(lines[3], "/blob/contoso/uploads/t1/report 1.pdf");
        assert_eq!(
            &lines[4..10],
            [
                "oid-1",
                "tid-1",
                "2026-12-07T10:00:00Z",
                "2026-12-07T12:00:00Z",
                "b",
                "2025-11-05"
            ]
        );
        assert_eq!(&lines[15..20], ["", "https", SAS_VERSION, "b", ""]);
    }

    #[test]
    fn the_query_carries_the_signature_of_the_string_to_sign_and_no_key() {
        let mut read = sas();
        read.permission = Permission::Read;
        read.content_disposition = Some("attachment; filename=\"r.pdf\"");
        let q = query(&read, &key());
        let expected = crate::encoding::base64(&crate::crypto::hmac_sha256(
            b"key-bytes",
            string_to_sign(&read, &key()).as_bytes(),
        ));
        let mut sig = String::new();
        crate::encoding::push_percent_encoded(&mut sig, &expected);
        assert!(q.ends_with(&format!("&sig={sig}")), "{q}");
        assert!(q.starts_with("sp=r&st=2026-12-07T10%3A55%3A00Z&se="), "{q}");
        assert!(
            q.contains("&rscd=attachment%3B%20filename%3D%22r.pdf%22&sig="),
            "{q}"
        );
        assert!(!q.contains("a2V5LWJ5dGVz"), "the key's value never leaves");
        let not_base64 = "<UserDelegationKey><SignedOid>o</SignedOid><SignedTid>t</SignedTid><SignedStart>s</SignedStart><SignedExpiry>e</SignedExpiry><SignedService>b</SignedService><SignedVersion>v</SignedVersion><Value>!</Value></UserDelegationKey>";
        assert_eq!(parse_delegation_key(not_base64), None);
    }
}
