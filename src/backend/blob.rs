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
        return Err(bad("is longer than 1024 characters (Azure's limit)"));
    }
    if name.split('/').count() > MAX_NAME_SEGMENTS {
        return Err(bad(&format!(
            "has more than {MAX_NAME_SEGMENTS} path segments (Azure's limit)"
        )));
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

/// What a write stores besides the bytes: its content type and metadata, and the body's
/// length when the caller said it.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyInfo<'a> {
    pub content_type: Option<&'a str>,
    pub content_length: Option<u64>,
    pub metadata: &'a [(String, String)],
}

pub const DEFAULT_MAX_BODY_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_SINGLE_PUT_MAX_BYTES: u64 = 32 * 1024 * 1024;
pub const DEFAULT_BLOCK_BYTES: u32 = 4 * 1024 * 1024;
pub const DEFAULT_IDLE_TIMEOUT_MS: u32 = 30_000;

impl BlobBackend {
    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES)
    }

    pub fn single_put_max_bytes(&self) -> u64 {
        self.single_put_max_bytes
            .unwrap_or(DEFAULT_SINGLE_PUT_MAX_BYTES)
    }

    pub fn block_bytes(&self) -> u32 {
        self.block_bytes.unwrap_or(DEFAULT_BLOCK_BYTES)
    }

    pub fn idle_timeout_ms(&self) -> f64 {
        f64::from(self.idle_timeout_ms.unwrap_or(DEFAULT_IDLE_TIMEOUT_MS))
    }
}

/// How a write's body goes to Azure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// One Put Blob, the caller's stream passed through untouched.
    Single { length: u64 },
    /// Put Block calls of at most `block_bytes`, then Put Block List.
    Blocks,
}

/// Chooses the upload, or refuses a body whose declared length is over the route's limit.
pub fn upload_for(backend: &BlobBackend, content_length: Option<u64>) -> Result<Upload, Problem> {
    match content_length {
        Some(length) if length > backend.max_body_bytes() => {
            Err(body_too_large(length, backend.max_body_bytes()))
        }
        Some(length) if length <= backend.single_put_max_bytes() => Ok(Upload::Single { length }),
        _ => Ok(Upload::Blocks),
    }
}

pub fn body_too_large(size: u64, limit: u64) -> Problem {
    Problem::new(
        413,
        "body-too-large",
        "Request body too large",
        format!("The body is {size} bytes or more; this route accepts at most {limit}. Nothing was committed."),
    )
}

/// Cuts a stream of chunks into blocks of exactly `block_bytes` (the last may be shorter),
/// holding at most one block and one chunk at a time.
#[derive(Debug)]
pub struct BlockBuffer {
    block_bytes: usize,
    buf: Vec<u8>,
}

impl BlockBuffer {
    pub fn new(block_bytes: u32) -> BlockBuffer {
        BlockBuffer {
            block_bytes: block_bytes.max(1) as usize,
            buf: Vec::new(),
        }
    }

    /// Adds a chunk; returns the blocks it completed, in order.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<Vec<u8>> {
        let mut full = Vec::new();
        while !chunk.is_empty() {
            let take = (self.block_bytes - self.buf.len()).min(chunk.len());
            self.buf.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.buf.len() == self.block_bytes {
                full.push(std::mem::replace(
                    &mut self.buf,
                    Vec::with_capacity(self.block_bytes),
                ));
            }
        }
        full
    }

    /// The last, partial block, if any bytes are left.
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then_some(self.buf)
    }
}

/// The prefix of one upload's block ids: 32 hex digits from the upload's random UUID.
///
/// Azure keeps uncommitted blocks per blob *name*, not per upload: with ids that were the same
/// for every upload of a name (`block-00000000`, …), a second caller writing the same name could
/// replace a block of the first caller's upload before it was committed. Each upload's ids start
/// with its own random prefix, and its commit lists only its own ids.
pub fn upload_prefix(uuid: &str) -> String {
    let hex: String = uuid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(32)
        .collect();
    format!("{hex:0>32}")
}

/// Block ids must all have the same length within a blob: base64 of the upload's prefix and a
/// fixed-width counter (at most [`MAX_BLOCKS`] blocks, so six digits always suffice).
pub fn block_id(prefix: &str, index: u32) -> String {
    crate::encoding::base64(format!("{prefix}-{index:06}").as_bytes())
}

/// Azure's limit of committed blocks in one blob.
pub const MAX_BLOCKS: u64 = 50_000;
/// Azure's limit on a blob name's path segments.
pub const MAX_NAME_SEGMENTS: usize = 254;
/// Azure's limit on a blob's metadata: names and values together, in bytes.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

/// `PUT …?comp=block&blockid=…` with one block.
pub fn put_block_request(
    backend: &BlobBackend,
    cloud: Cloud,
    encoded_name: &str,
    now_ms: f64,
    id: &str,
    length: usize,
) -> BackendRequest {
    let mut r = base_request(backend, cloud, encoded_name, now_ms);
    r.url.push_str(&format!(
        "?comp=block&blockid={}",
        crate::encoding::form_encode(id)
    ));
    r.headers
        .push(("content-length".into(), length.to_string()));
    r.method = "PUT";
    r
}

/// `PUT …?comp=blocklist`: commits the blocks as the blob, with its content type, metadata and
/// create-only condition. The body is [`block_list_body`].
pub fn put_block_list_request(
    backend: &BlobBackend,
    cloud: Cloud,
    encoded_name: &str,
    now_ms: f64,
    ids: &[String],
    info: BodyInfo,
) -> (BackendRequest, String) {
    let body = block_list_body(ids);
    let mut r = base_request(backend, cloud, encoded_name, now_ms);
    r.url.push_str("?comp=blocklist");
    r.method = "PUT";
    r.headers
        .push(("content-type".into(), "application/xml".into()));
    r.headers
        .push(("content-length".into(), body.len().to_string()));
    r.headers.push((
        "x-ms-blob-content-type".into(),
        content_type(backend, info).to_owned(),
    ));
    push_write_headers(&mut r, backend, info);
    (r, body)
}

pub fn block_list_body(ids: &[String]) -> String {
    let mut body = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>");
    for id in ids {
        body.push_str(&format!("<Latest>{id}</Latest>"));
    }
    body.push_str("</BlockList>");
    body
}

fn content_type<'a>(backend: &'a BlobBackend, info: BodyInfo<'a>) -> &'a str {
    backend
        .content_type
        .as_deref()
        .or(info.content_type)
        .unwrap_or("application/octet-stream")
}

fn push_write_headers(r: &mut BackendRequest, backend: &BlobBackend, info: BodyInfo) {
    for (name, value) in info.metadata {
        r.headers.push((format!("x-ms-meta-{name}"), value.clone()));
    }
    if !backend.overwrite {
        r.headers.push(("if-none-match".into(), "*".into()));
    }
}

fn base_request(
    backend: &BlobBackend,
    cloud: Cloud,
    encoded_name: &str,
    now_ms: f64,
) -> BackendRequest {
    BackendRequest {
        method: "GET",
        url: format!(
            "{}/{}/{}",
            backend.base_url(cloud),
            backend.container,
            encoded_name
        ),
        headers: vec![
            ("x-ms-version".into(), API_VERSION.to_owned()),
            ("x-ms-date".into(), Utc::from_millis(now_ms).http_date()),
        ],
    }
}

/// Metadata Azure will store: at most [`MAX_METADATA_BYTES`] of names and values together.
/// (That each value can travel as a header is the outgoing gate's job, [`super::check`].)
pub fn check_metadata(metadata: &[(String, String)]) -> Result<(), Problem> {
    let total: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_METADATA_BYTES {
        return Err(Problem::new(
            400,
            "metadata-too-large",
            "Blob metadata built from this request is too large",
            format!("The metadata built from the request takes {total} bytes (names and values); Azure allows at most {MAX_METADATA_BYTES} (8 KB) per blob. Send shorter values; nothing was written."),
        ));
    }
    Ok(())
}

/// The request for `op` on the blob `encoded_name`; the edge streams a write's body.
pub fn request(
    backend: &BlobBackend,
    cloud: Cloud,
    op: BlobOp,
    encoded_name: &str,
    now_ms: f64,
    info: BodyInfo,
) -> BackendRequest {
    let mut r = base_request(backend, cloud, encoded_name, now_ms);
    match op {
        BlobOp::Write => {
            r.method = "PUT";
            r.headers
                .push(("x-ms-blob-type".into(), "BlockBlob".into()));
            r.headers.push((
                "content-type".into(),
                content_type(backend, info).to_owned(),
            ));
            if let Some(len) = info.content_length {
                r.headers.push(("content-length".into(), len.to_string()));
            }
            push_write_headers(&mut r, backend, info);
        }
        BlobOp::Read => r.method = "GET",
        BlobOp::Head => r.method = "HEAD",
    }
    r
}

/// The path of a route that reads back what `writer` wrote with these path parameters: a GET
/// route on the same container and blob name template whose parameters the write had.
pub fn read_location(
    routes: &[crate::policy::Route],
    writer: &BlobBackend,
    params: &[(String, String)],
) -> Option<String> {
    use crate::policy::{Backend, Method};
    use crate::routing::{PathTemplate, Segment};
    routes.iter().find_map(|route| {
        let Backend::Blob(reader) = &route.backend else {
            return None;
        };
        let same_blob = reader.blob == writer.blob
            && reader.container == writer.container
            && reader.account == writer.account
            && reader.endpoint == writer.endpoint;
        if !same_blob || !route.methods.contains(&Method::Get) {
            return None;
        }
        let template = PathTemplate::parse(&route.path).ok()?;
        let mut path = String::new();
        for segment in &template.segments {
            path.push('/');
            match segment {
                Segment::Literal(l) => path.push_str(&encode_segment(l)),
                Segment::Param(p) => {
                    path.push_str(&encode_segment(&params.iter().find(|(k, _)| k == p)?.1))
                }
            }
        }
        Some(if path.is_empty() {
            "/".to_owned()
        } else {
            path
        })
    })
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
    // Azure's error codes are identifiers; anything else is not passed on.
    let code: String = error_code
        .unwrap_or("unknown")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect();
    let problem = match (status, code.as_str()) {
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
            content_type: None,
            metadata: Default::default(),
            max_body_bytes: Some(1000),
            single_put_max_bytes: Some(100),
            block_bytes: Some(64 * 1024),
            idle_timeout_ms: None,
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
        assert!(encode_blob_name(&["s"; 254].join("/")).is_ok());
        let deep = encode_blob_name(&["s"; 255].join("/")).unwrap_err();
        assert!(deep.detail.contains("254"), "{}", deep.detail);
    }

    #[test]
    fn requests_pin_the_version_and_date_and_create_only_by_default() {
        let r = request(
            &backend(false),
            Cloud::Public,
            BlobOp::Write,
            "a/b.txt",
            784_111_777_000.0,
            BodyInfo {
                content_type: Some("text/plain"),
                content_length: Some(5),
                metadata: &[],
            },
        );
        assert_eq!(
            (r.method, r.url.as_str()),
            ("PUT", "https://acct.blob.core.windows.net/uploads/a/b.txt")
        );
        assert_eq!(
            r.header("authorization"),
            None,
            "the edge adds the token when it sends"
        );
        assert_eq!(r.header("x-ms-version"), Some(API_VERSION));
        assert!(
            API_VERSION >= "2017-11-09",
            "OAuth needs 2017-11-09 or later"
        );
        assert_eq!(r.header("x-ms-date"), Some("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(r.header("x-ms-blob-type"), Some("BlockBlob"));
        assert_eq!(r.header("content-length"), Some("5"));
        assert_eq!(r.header("if-none-match"), Some("*"));
        let over = request(
            &backend(true),
            Cloud::China,
            BlobOp::Write,
            "x",
            0.0,
            BodyInfo {
                content_type: None,
                content_length: Some(0),
                metadata: &[],
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
            0.0,
            BodyInfo {
                content_type: None,
                content_length: None,
                metadata: &[],
            },
        );
        assert_eq!((read.method, read.header("x-ms-blob-type")), ("GET", None));
    }

    #[test]
    fn the_upload_follows_the_declared_length() {
        let b = backend(false);
        assert_eq!(
            upload_for(&b, Some(100)),
            Ok(Upload::Single { length: 100 })
        );
        assert_eq!(upload_for(&b, Some(101)), Ok(Upload::Blocks));
        assert_eq!(upload_for(&b, None), Ok(Upload::Blocks));
        let p = upload_for(&b, Some(1001)).unwrap_err();
        assert_eq!((p.status, p.kind), (413, "body-too-large"));
    }

    #[test]
    fn blocks_are_cut_to_size_whatever_the_chunks() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for chunk_size in [1, 7, 300, 333, 1000] {
            let mut buffer = BlockBuffer::new(300);
            let mut blocks = Vec::new();
            for chunk in data.chunks(chunk_size) {
                blocks.extend(buffer.push(chunk));
            }
            blocks.extend(buffer.finish());
            assert_eq!(
                blocks.iter().map(Vec::len).collect::<Vec<_>>(),
                vec![300, 300, 300, 100],
                "chunks of {chunk_size}"
            );
            assert_eq!(blocks.concat(), data);
        }
        let mut exact = BlockBuffer::new(4);
        assert_eq!(
            exact.push(b"abcdefgh"),
            vec![b"abcd".to_vec(), b"efgh".to_vec()]
        );
        assert_eq!(exact.finish(), None);
    }

    #[test]
    fn block_ids_have_one_length_and_the_list_commits_them_in_order() {
        let prefix = upload_prefix("0af76519-16cd-43dd-8448-eb211c80319c");
        assert_eq!(prefix, "0af7651916cd43dd8448eb211c80319c");
        let ids: Vec<String> = [0, 9, 10, 49_999]
            .into_iter()
            .map(|i| block_id(&prefix, i))
            .collect();
        assert!(ids.iter().all(|id| id.len() == ids[0].len()));
        assert_eq!(
            crate::encoding::base64_decode(&ids[3]).unwrap(),
            b"0af7651916cd43dd8448eb211c80319c-049999"
        );
        // Azure: at most 64 bytes before encoding.
        assert!(crate::encoding::base64_decode(&ids[3]).unwrap().len() <= 64);
        // Two uploads of the same name never share an id, whatever their block numbers.
        let other = upload_prefix("7c9e6679-7425-40de-944b-e07fc1f90ae7");
        assert!(ids
            .iter()
            .all(|id| (0..50_000).all(|i| *id != block_id(&other, i))));
        assert_eq!(
            block_list_body(&ids[..2]),
            format!("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList><Latest>{}</Latest><Latest>{}</Latest></BlockList>", ids[0], ids[1])
        );
        let r = put_block_request(&backend(false), Cloud::Public, "a.bin", 0.0, &ids[0], 300);
        assert_eq!(
            r.url,
            format!(
                "https://acct.blob.core.windows.net/uploads/a.bin?comp=block&blockid={}",
                crate::encoding::form_encode(&ids[0])
            )
        );
        assert_eq!(r.header("content-length"), Some("300"));
        let meta = [("tenant".to_owned(), "contoso".to_owned())];
        let info = BodyInfo {
            content_type: Some("image/png"),
            content_length: None,
            metadata: &meta,
        };
        let (list, body) =
            put_block_list_request(&backend(false), Cloud::Public, "a.bin", 0.0, &ids, info);
        assert!(list.url.ends_with("/uploads/a.bin?comp=blocklist"));
        assert_eq!(list.header("x-ms-blob-content-type"), Some("image/png"));
        assert_eq!(list.header("x-ms-meta-tenant"), Some("contoso"));
        assert_eq!(list.header("if-none-match"), Some("*"));
        assert_eq!(
            list.header("content-length"),
            Some(body.len().to_string().as_str())
        );
    }

    #[test]
    fn a_fixed_content_type_wins_and_metadata_travels_as_headers() {
        let mut b = backend(true);
        b.content_type = Some("application/json".into());
        let meta = [("source".to_owned(), "edge".to_owned())];
        let info = BodyInfo {
            content_type: Some("text/plain"),
            content_length: Some(2),
            metadata: &meta,
        };
        let r = request(&b, Cloud::Public, BlobOp::Write, "x", 0.0, info);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-ms-meta-source"), Some("edge"));
        assert!(check_metadata(&[("a".into(), "ok".into())]).is_ok());
        // Names and values count together against Azure's 8 KB.
        let at_limit = [("note".to_owned(), "x".repeat(MAX_METADATA_BYTES - 4))];
        assert!(check_metadata(&at_limit).is_ok());
        let over = [
            ("note".to_owned(), "x".repeat(MAX_METADATA_BYTES - 4)),
            ("b".to_owned(), String::new()),
        ];
        let p = check_metadata(&over).unwrap_err();
        assert_eq!((p.status, p.kind), (400, "metadata-too-large"));
        assert!(p.detail.contains("8192"), "{}", p.detail);
        // A non-ASCII value is the outgoing gate's to refuse, naming the metadata.
        let r = request(
            &b,
            Cloud::Public,
            BlobOp::Write,
            "x",
            0.0,
            BodyInfo {
                metadata: &[("a".into(), "nö".into())],
                ..info
            },
        );
        let p = crate::backend::check(&r).unwrap_err();
        assert_eq!(p.status, 400);
        assert!(p.detail.contains("metadata value a"), "{}", p.detail);
    }

    #[test]
    fn the_read_route_of_a_written_blob_is_its_location() {
        let routes: Vec<crate::policy::Route> = serde_json::from_value(serde_json::json!([
            { "name": "up", "methods": ["PUT"], "path": "/files/{name}", "public": true,
              "backend": { "blob": { "account": "acct", "container": "uploads", "blob": "{path.name}", "identity": "gw" } } },
            { "name": "down", "methods": ["GET", "HEAD"], "path": "/read/{name}", "public": true,
              "backend": { "blob": { "account": "acct", "container": "uploads", "blob": "{path.name}", "identity": "gw" } } }
        ]))
        .unwrap();
        let crate::policy::Backend::Blob(writer) = &routes[0].backend else {
            panic!()
        };
        let params = vec![("name".to_owned(), "a b.txt".to_owned())];
        assert_eq!(
            read_location(&routes, writer, &params),
            Some("/read/a%20b.txt".to_owned())
        );
        let mut other = writer.clone();
        other.blob = "{uuid}".into();
        assert_eq!(
            read_location(&routes, &other, &params),
            None,
            "no route reads that name back"
        );
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
        // Only an identifier is passed on from Azure's error code header.
        let (p, _) = map(BlobOp::Write, 400, "Bad\r\n<script>");
        assert!(p.detail.contains("(Badscript)"), "{}", p.detail);
        let (p, _) = map(BlobOp::Write, 503, "ServerBusy");
        assert_eq!((p.status, p.headers[0].0), (503, "retry-after"));
    }
}
