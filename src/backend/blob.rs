//! Blob Storage: Put Blob, Get Blob and Get Blob Properties with a bearer token.
//!
//! Blob names built from caller input are checked before anything is sent: no `.`/`..`
//! segments, no backslashes or control characters, at most 1024 characters. Each `/`-separated
//! segment is then percent-encoded, so the name Azure stores is exactly the rendered one.

use serde_json::json;

use super::BackendRequest;
use crate::policy::{BlobBackend, Cloud};
use crate::problem::Problem;
use crate::time::Utc;

/// The REST version sent on every call (OAuth needs 2017-11-09 or later).
pub const API_VERSION: &str = "2021-08-06";

/// What a request asks of a blob route, by its method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOp {
    Write,
    Read,
    Head,
}

impl BlobOp {
    pub fn for_method(method: &str) -> Option<BlobOp> {
        match method {
            "PUT" | "POST" => Some(BlobOp::Write),
            "GET" => Some(BlobOp::Read),
            "HEAD" => Some(BlobOp::Head),
            _ => None,
        }
    }
}

/// Checks a rendered blob name and percent-encodes it for the URL path.
pub fn encode_blob_name(name: &str) -> Result<String, Problem> {
    let bad = |why: &str| {
        Problem::new(
            400,
            "bad-blob-name",
            "The blob name built from this request is not allowed",
            format!("The blob name built from the request {why}; change the path, query or headers it is built from."),
        )
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.chars().count() > 1024 {
        return Err(bad("is longer than 1024 characters"));
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return Err(bad("contains a control character or a backslash"));
    }
    if name.starts_with('/')
        || name
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(bad("has an empty, '.' or '..' segment"));
    }
    Ok(name
        .split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/"))
}

fn encode_segment(seg: &str) -> String {
    let mut out = String::with_capacity(seg.len());
    for b in seg.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What the caller said about the body of a write.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyInfo<'a> {
    pub content_type: Option<&'a str>,
    pub content_length: Option<u64>,
}

/// The request for `op` on the blob `encoded_name`; the edge streams a write's body.
pub fn request(
    backend: &BlobBackend,
    cloud: Cloud,
    op: BlobOp,
    encoded_name: &str,
    token: &str,
    now_ms: f64,
    body: BodyInfo,
) -> BackendRequest {
    let url = format!(
        "{}/{}/{}",
        backend.base_url(cloud),
        backend.container,
        encoded_name
    );
    let mut headers: Vec<(String, String)> = vec![
        ("authorization".into(), format!("Bearer {token}")),
        ("x-ms-version".into(), API_VERSION.to_owned()),
        ("x-ms-date".into(), Utc::from_millis(now_ms).http_date()),
    ];
    let method = match op {
        BlobOp::Write => {
            headers.push(("x-ms-blob-type".into(), "BlockBlob".to_owned()));
            headers.push((
                "content-type".into(),
                body.content_type
                    .unwrap_or("application/octet-stream")
                    .to_owned(),
            ));
            if let Some(len) = body.content_length {
                headers.push(("content-length".into(), len.to_string()));
            }
            if !backend.overwrite {
                headers.push(("if-none-match".into(), "*".to_owned()));
            }
            "PUT"
        }
        BlobOp::Read => "GET",
        BlobOp::Head => "HEAD",
    };
    BackendRequest {
        method,
        url,
        headers,
    }
}

/// The caller's answer to a successful write.
pub fn created_body(container: &str, blob: &str, etag: Option<&str>) -> String {
    json!({ "container": container, "blob": blob, "etag": etag }).to_string()
}

/// What a failed call means for the caller, and whether the token must be evicted (401).
pub fn map_error(
    op: BlobOp,
    status: u16,
    error_code: Option<&str>,
    container: &str,
    blob: &str,
) -> (Problem, bool) {
    let code = error_code.unwrap_or("unknown");
    let problem = match (status, code) {
        (404, "ContainerNotFound") => Problem::new(
            502,
            "backend-container-not-found",
            "The storage container does not exist",
            format!("Blob Storage has no container '{container}'; the operator should create it or fix the route's container."),
        ),
        (404, _) if op != BlobOp::Write => Problem::new(404, "blob-not-found", "No such blob", format!("There is no blob '{blob}' in '{container}'.")),
        (409, "BlobAlreadyExists") => Problem::new(
            409,
            "blob-already-exists",
            "The blob already exists",
            format!("A blob named '{blob}' already exists and this route only creates; use another name."),
        ),
        (401 | 403, _) => Problem::new(
            502,
            "backend-authorization-failed",
            "Blob Storage refused the gateway's identity",
            format!("Blob Storage answered {status} ({code}): the identity's token is not accepted or lacks a data role (for example Storage Blob Data Contributor) on the container; the operator should check the identity's audience and role assignment."),
        ),
        (413, _) => Problem::new(413, "body-too-large", "Request body too large", "Blob Storage refused the body as too large."),
        (500..=599, _) => Problem::new(
            503,
            "backend-unavailable",
            "Blob Storage is unavailable",
            format!("Blob Storage answered {status} ({code}); try again later."),
        )
        .with_header("retry-after", "5"),
        _ => Problem::new(
            502,
            "backend-error",
            "Blob Storage refused the request",
            format!("Blob Storage answered {status} ({code})."),
        ),
    };
    (
        problem.with_extension("backend_status", json!(status)),
        status == 401,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(overwrite: bool) -> BlobBackend {
        BlobBackend {
            account: Some("acct".into()),
            endpoint: None,
            container: "uploads".into(),
            blob: "{path.name}".into(),
            overwrite,
            identity: "gw".into(),
            audience: None,
        }
    }

    #[test]
    fn names_from_callers_are_checked_then_encoded() {
        assert_eq!(
            encode_blob_name("a/b c/ü.txt").unwrap(),
            "a/b%20c/%C3%BC.txt"
        );
        assert_eq!(encode_blob_name("a%2Fb?#").unwrap(), "a%252Fb%3F%23");
        for bad in [
            "",
            "../etc/passwd",
            "a/../b",
            "a/./b",
            "/abs",
            "a//b",
            "a\\b",
            "a\u{0}b",
            "tab\tname",
        ] {
            assert_eq!(encode_blob_name(bad).unwrap_err().status, 400, "{bad:?}");
        }
        assert!(encode_blob_name(&"x".repeat(1025)).is_err());
        assert!(encode_blob_name(&"x".repeat(1024)).is_ok());
    }

    #[test]
    fn requests_pin_the_version_and_date_and_create_only_by_default() {
        let r = request(
            &backend(false),
            Cloud::Public,
            BlobOp::Write,
            "a/b.txt",
            "tok",
            784_111_777_000.0,
            BodyInfo {
                content_type: Some("text/plain"),
                content_length: Some(5),
            },
        );
        assert_eq!(
            (r.method, r.url.as_str()),
            ("PUT", "https://acct.blob.core.windows.net/uploads/a/b.txt")
        );
        assert_eq!(r.header("authorization"), Some("Bearer tok"));
        assert_eq!(r.header("x-ms-version"), Some(API_VERSION));
        assert!(
            API_VERSION >= "2017-11-09",
            "OAuth needs 2017-11-09 or later"
        );
        assert_eq!(r.header("x-ms-date"), Some("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(r.header("x-ms-blob-type"), Some("BlockBlob"));
        assert_eq!(r.header("content-length"), Some("5"));
        assert_eq!(r.header("if-none-match"), Some("*"));
        assert!(!format!("{r:?}").contains("tok"));
        let over = request(
            &backend(true),
            Cloud::China,
            BlobOp::Write,
            "x",
            "t",
            0.0,
            BodyInfo {
                content_type: None,
                content_length: Some(0),
            },
        );
        assert_eq!(over.header("if-none-match"), None);
        assert_eq!(
            over.header("content-type"),
            Some("application/octet-stream")
        );
        assert!(over
            .url
            .starts_with("https://acct.blob.core.chinacloudapi.cn/"));
        let read = request(
            &backend(false),
            Cloud::Public,
            BlobOp::Read,
            "x",
            "t",
            0.0,
            BodyInfo {
                content_type: None,
                content_length: None,
            },
        );
        assert_eq!((read.method, read.header("x-ms-blob-type")), ("GET", None));
    }

    #[test]
    fn errors_map_to_what_the_caller_can_act_on() {
        let map = |op, status, code| map_error(op, status, Some(code), "uploads", "a.txt");
        assert_eq!(map(BlobOp::Write, 409, "BlobAlreadyExists").0.status, 409);
        let (p, _) = map(BlobOp::Write, 404, "ContainerNotFound");
        assert_eq!((p.status, p.kind), (502, "backend-container-not-found"));
        assert!(p.detail.contains("'uploads'"));
        assert_eq!(map(BlobOp::Read, 404, "BlobNotFound").0.status, 404);
        let (p, evict) = map(BlobOp::Write, 401, "InvalidAuthenticationInfo");
        assert_eq!((p.status, evict), (502, true));
        let (p, evict) = map(BlobOp::Write, 403, "AuthorizationPermissionMismatch");
        assert_eq!((p.status, evict), (502, false));
        assert!(p.detail.contains("AuthorizationPermissionMismatch"));
        let (p, _) = map(BlobOp::Write, 503, "ServerBusy");
        assert_eq!((p.status, p.headers[0].0), (503, "retry-after"));
    }
}
