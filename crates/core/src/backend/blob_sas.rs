//! Valet-key routes: the caller gets a short-lived URL (a user delegation SAS) that lets it do
//! one thing to one blob directly with Storage, and nothing of the file passes the gateway.
//!
//! A request is built here as blob routes build theirs: the name from the route's template,
//! with the same checks ([`super::blob::encode_blob_name`]); the download overrides from
//! theirs, as values Storage can send back as headers; the caller's address when the route
//! limits URLs to it. Signing needs the isolate's user delegation key, which the driver holds
//! ([`crate::sas::KeyCache`]) and fetches with [`key_request`] when it has none.

use serde_json::json;

use super::Verdict;
use crate::exchange::{Answer, BackendRequest, Cx, Io, Reply};
use crate::policy::prepared::PreparedBlobSas;
use crate::policy::SasPermission;
use crate::problem::Problem;
use crate::sas::{self, BlobSas, DelegationKey, HeldKey, Permission};
use crate::time::Utc;

/// What a request asks for, checked: nothing in it can change the blob or what the URL allows.
#[derive(Debug)]
pub struct Plan {
    /// The rendered name, and as it goes in the URL.
    pub name: String,
    encoded: String,
    content_disposition: Option<String>,
    content_type: Option<String>,
    /// The caller's IPv4 address, when the route limits URLs to it.
    ip: Option<String>,
}

/// A URL minted for a plan.
#[derive(Debug)]
pub struct Minted {
    pub url: String,
    /// ISO 8601, to the second.
    pub expires: String,
}

fn permission(p: SasPermission) -> Permission {
    match p {
        SasPermission::Create => Permission::Create,
        SasPermission::CreateWrite => Permission::CreateWrite,
        SasPermission::Read => Permission::Read,
    }
}

/// Phase 7: the blob's name, the download overrides and the caller's address, each checked.
/// Nothing is fetched or minted before this succeeds.
pub fn build<I: Io>(s: &PreparedBlobSas, cx: &Cx<'_>, io: &I) -> Result<Plan, Problem> {
    let head = cx.head;
    let header = |name: &str| head.header(name).map(str::to_owned);
    let uuid = || io.uuid();
    let values = cx.render_context(&header, &uuid, io.now());
    let missing = super::blob::missing_value;
    let name = s.name.render(&values).map_err(missing)?;
    let encoded = super::blob::encode_blob_name(&name)?;
    let mut overrides = [None, None];
    for (slot, (field, template)) in overrides.iter_mut().zip([
        ("Content-Disposition", &s.content_disposition),
        ("Content-Type", &s.content_type),
    ]) {
        let Some(template) = template else { continue };
        let value = template.render(&values).map_err(missing)?;
        // Storage sends it back as a header of the download.
        if !super::is_header_value(&value) {
            return Err(Problem::new(
                400,
                "unsendable-value",
                "A value from this request cannot be sent to Azure",
                format!("The download's {field} built from the request contains a character HTTP headers cannot carry unchanged (only printable ASCII, without leading or trailing spaces); change the request value it is built from. No URL was made."),
            ));
        }
        *slot = Some(value);
    }
    let [content_disposition, content_type] = overrides;
    let ip = if s.client_ip {
        Some(caller_ipv4(head.header("cf-connecting-ip"))?)
    } else {
        None
    };
    Ok(Plan {
        name,
        encoded,
        content_disposition,
        content_type,
        ip,
    })
}

/// The caller's address as a SAS's `sip` takes it (Azure documents IPv4 addresses and ranges).
fn caller_ipv4(address: Option<&str>) -> Result<String, Problem> {
    match address.map(str::parse::<std::net::Ipv4Addr>) {
        Some(Ok(ip)) => Ok(ip.to_string()),
        Some(Err(_)) => Err(Problem::new(
            400,
            "address-not-supported",
            "This route's URLs are limited to an IPv4 address",
            "This route limits the URL it gives to the caller's address, and a Storage URL can be limited to an IPv4 address only; call the gateway over IPv4.",
        )),
        None => Err(Problem::new(
            400,
            "address-unknown",
            "The caller's address is unknown",
            "This route limits the URL it gives to the caller's address, and the request came without one (CF-Connecting-IP).",
        )),
    }
}

/// Get User Delegation Key for a key valid from a little before `now_ms` for
/// [`sas::KEY_LIFETIME_MS`], and its body.
pub fn key_request(s: &PreparedBlobSas, now_ms: f64) -> (BackendRequest, String) {
    let iso = |ms: f64| Utc::from_millis(ms).format("%Y-%m-%dT%H:%M:%SZ");
    let body = sas::key_request_body(
        &iso(now_ms - sas::KEY_START_SKEW_MS),
        &iso(now_ms + sas::KEY_LIFETIME_MS),
    );
    let request = BackendRequest {
        method: "POST",
        url: s.key_url.clone(),
        headers: vec![
            ("x-ms-version".into(), sas::SAS_VERSION.into()),
            ("x-ms-date".into(), Utc::from_millis(now_ms).http_date()),
            ("content-type".into(), "application/xml".into()),
        ],
        reply_headers: vec!["x-ms-error-code".into()],
    };
    (request, body)
}

/// What an answer to Get User Delegation Key means: 200 is read by the caller of
/// `send_retried`; 429 and 5xx are tried again; anything else is final (a first 401 has been
/// replayed with a fresh token before this sees it).
pub async fn judge<I: Io>(io: &I, reply: Reply<I::Stream>) -> Verdict<I::Stream> {
    match reply.status {
        200 => Verdict::Done(reply),
        429 | 500..=599 => {
            let after = crate::retry::parse_retry_after_secs(reply.header("retry-after"));
            super::drain(io, reply.body).await;
            Verdict::Retry(after)
        }
        status => {
            let code = error_code(reply.header("x-ms-error-code"));
            super::drain(io, reply.body).await;
            Verdict::Fail {
                problem: key_refused(status, &code),
                detail: Some(format!("Get User Delegation Key: {status} {code}")),
            }
        }
    }
}

/// Azure's error codes are identifiers; anything else is not passed on.
fn error_code(code: Option<&str>) -> String {
    code.unwrap_or("unknown")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect()
}

/// Storage would not give the identity a user delegation key.
pub fn key_refused(status: u16, code: &str) -> Problem {
    let detail = match status {
        401 | 403 => format!("Blob Storage answered {status} ({code}) to the gateway's request for a user delegation key: the identity's token is not accepted, or the identity lacks a role that allows generateUserDelegationKey on the account (Storage Blob Delegator, or a Storage Blob Data role). The operator should check the identity's audience and role assignments. No URL was made."),
        _ => format!("Blob Storage answered {status} ({code}) to the gateway's request for a user delegation key. No URL was made."),
    };
    Problem::new(
        502,
        "delegation-key-refused",
        "Blob Storage would not issue a key to sign the URL",
        detail,
    )
    .with_extension("backend_status", json!(status))
}

/// Storage could not be reached for a key, or kept answering that it is busy.
pub fn key_unavailable(why: &str, retry_after: Option<u64>) -> Problem {
    Problem::new(
        503,
        "backend-unavailable",
        "Blob Storage is unavailable",
        format!("Blob Storage {why} when the gateway asked it for a key to sign the URL; no URL was made. Try again later."),
    )
    .with_header(
        "retry-after",
        crate::retry::caller_retry_after(retry_after).to_string(),
    )
}

/// Storage's answer to Get User Delegation Key was not a key (or broke off).
pub fn unusable_answer() -> Problem {
    Problem::new(
        502,
        "backend-error",
        "Blob Storage answered with something that is not a key",
        "Blob Storage's answer to the gateway's request for a user delegation key could not be read. No URL was made.",
    )
}

/// Reads the key out of Get User Delegation Key's answer, as the cache holds it.
pub fn held_key(text: &str, now_ms: f64) -> Result<HeldKey, Problem> {
    let unusable = unusable_answer;
    let key = sas::parse_delegation_key(text).ok_or_else(unusable)?;
    let expiry = crate::time::parse_iso_utc(&key.signed_expiry).ok_or_else(unusable)?;
    // A key must outlive the longest URL a route may sign with it: one that does not (Storage
    // gave less than was asked) would sign URLs Azure refuses before they expire.
    let serves_until = expiry - sas::MAX_URL_LIFETIME_MS;
    if serves_until <= now_ms {
        return Err(unusable());
    }
    Ok(HeldKey {
        key: std::rc::Rc::new(key),
        obtained_at: now_ms,
        serves_until,
    })
}

/// The URL for `plan`, signed with `key`, valid from now until the route's lifetime ends.
pub fn mint(s: &PreparedBlobSas, plan: &Plan, key: &DelegationKey, now_ms: f64) -> Minted {
    let expires = Utc::from_millis(now_ms + s.lifetime_ms).format("%Y-%m-%dT%H:%M:%SZ");
    let sas = BlobSas {
        account: &s.account,
        container: &s.container,
        blob: &plan.name,
        permission: permission(s.permission),
        // No start: valid at once, whatever Storage's clock says of ours.
        start: "",
        expiry: &expires,
        ip: plan.ip.as_deref(),
        protocol: &s.protocol,
        content_disposition: plan.content_disposition.as_deref(),
        content_type: plan.content_type.as_deref(),
    };
    let query = sas::query(&sas, key);
    Minted {
        url: format!("{}/{}?{query}", s.container_url, plan.encoded),
        expires,
    }
}

/// The caller's 200: the URL, the method and headers to use it with, its expiry, the blob.
/// Never stored by a cache on the way: the URL is a credential.
pub fn answer<S>(s: &PreparedBlobSas, plan: &Plan, minted: &Minted) -> Answer<S> {
    use crate::encoding::JsonObject;
    let mut headers = JsonObject::with_capacity(32);
    let method = match s.permission {
        SasPermission::Create | SasPermission::CreateWrite => {
            headers.str("x-ms-blob-type", "BlockBlob");
            "PUT"
        }
        SasPermission::Read => "GET",
    };
    let mut body = JsonObject::with_capacity(minted.url.len() + 256);
    body.str("url", &minted.url)
        .str("method", method)
        .object("headers", headers)
        .str("expires", &minted.expires)
        .str("container", &s.container)
        .str("blob", &plan.name)
        .str("permission", s.permission.as_str());
    let mut answer = Answer::json(200, body.finish());
    answer
        .headers
        .push(("cache-control", "no-store".to_owned()));
    answer
}
