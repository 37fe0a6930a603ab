//! Valet-key routes (`blob_sas`), run on the host through the same driver the worker runs,
//! with fake I/O: the URL a caller gets and what its signature covers (checked against a
//! string-to-sign written out here from Azure's documentation, not the gateway's), the key
//! fetched once for many callers and served while the identity provider is down, Storage's
//! refusal, and names and values that must not be minted.

#[path = "support/fake_io.rs"]
mod fake_io;

use azure_edge_gateway::exchange::{AnswerBody, RequestHead};
use azure_edge_gateway::pipeline::Gateway;
use azure_edge_gateway::problem::Problem;
use fake_io::{block_on, block_on_all, request, Fake, FakeReply};
use serde_json::Value;

const POLICY: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
      "client_id": "c", "credential": { "client_secret": { "secret": "GW_SECRET" } } } },
  "routes": [
    { "name": "upload-url", "methods": ["POST"], "path": "/uploads/{tenant}/{name}", "public": true,
      "backend": { "blob_sas": { "account": "contosofiles", "container": "uploads",
        "blob": "{path.tenant}/{path.name}", "permission": "create", "identity": "gw" } } },
    { "name": "download-url", "methods": ["GET"], "path": "/downloads/{name}", "public": true,
      "backend": { "blob_sas": { "account": "contosofiles", "container": "uploads", "blob": "t1/{path.name}",
        "permission": "read", "lifetime_seconds": 600, "identity": "gw",
        "response_content_disposition": "attachment; filename=\"{path.name}\"",
        "response_content_type": "{query.type}" } } },
    { "name": "pinned-url", "methods": ["POST"], "path": "/pinned/{name}", "public": true,
      "backend": { "blob_sas": { "account": "contosofiles", "container": "uploads", "blob": "{path.name}",
        "permission": "create_write", "client_ip": true, "identity": "gw" } } }
  ]
}"#;

/// The key Storage hands out in these tests (its value is base64 of "the key's bytes").
const KEY_VALUE: &str = "dGhlIGtleSdzIGJ5dGVz";

fn key_xml(expiry: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><UserDelegationKey><SignedOid>oid-7</SignedOid>\
         <SignedTid>tid-7</SignedTid><SignedStart>2023-11-14T22:08:20Z</SignedStart>\
         <SignedExpiry>{expiry}</SignedExpiry><SignedService>b</SignedService>\
         <SignedVersion>2025-11-05</SignedVersion><Value>{KEY_VALUE}</Value></UserDelegationKey>"
    )
}

/// The fake clock starts at 1_700_000_000_000 ms (2023-11-14T22:13:20Z): a key of 3 hours.
const KEY_EXPIRY: &str = "2023-11-15T01:13:20Z";

fn key_reply() -> FakeReply {
    Ok((200, Vec::new(), key_xml(KEY_EXPIRY)))
}

fn storage() -> Fake {
    let io = Fake::new();
    io.answer_for("comp=userdelegationkey", key_reply());
    io
}

fn gateway() -> Gateway {
    Gateway::load(POLICY).unwrap_or_else(|e| panic!("{e:?}"))
}

/// Runs one request: status, the answer's JSON, the log line as it was written.
fn run(g: &Gateway, head: &RequestHead, io: &Fake) -> (u16, Value, String) {
    let (answer, line) = block_on(g.handle(head, io));
    let body = match answer.body {
        AnswerBody::Text(t) => t,
        _ => String::new(),
    };
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (answer.status, json, line)
}

fn log_of(line: &str) -> Value {
    serde_json::from_str(line).expect("the log line is JSON")
}

fn post(path: &str) -> RequestHead {
    request("POST", path, &[], false)
}

/// A query's value by name, percent-decoded.
fn param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| azure_edge_gateway::encoding::percent_decode(v).expect("encoded"))
    })
}

/// The string-to-sign of a user delegation SAS of version 2025-07-05 and later, as Azure's
/// "Create a user delegation SAS" lists its fields, rebuilt from the URL's own query.
fn documented_string_to_sign(url: &str, canonical: &str) -> String {
    let p = |name: &str| param(url, name).unwrap_or_default();
    [
        p("sp"),
        p("st"),
        p("se"),
        canonical.to_owned(),
        p("skoid"),
        p("sktid"),
        p("skt"),
        p("ske"),
        p("sks"),
        p("skv"),
        p("saoid"),
        p("suoid"),
        p("scid"),
        p("skdutid"),
        p("sduoid"),
        p("sip"),
        p("spr"),
        p("sv"),
        p("sr"),
        String::new(), // signedSnapshotTime
        p("ses"),
        p("rscc"),
        p("rscd"),
        p("rsce"),
        p("rscl"),
        p("rsct"),
    ]
    .join("\n")
}

fn signature_holds(url: &str, canonical: &str) -> bool {
    let key = azure_edge_gateway::encoding::base64_decode(KEY_VALUE).unwrap();
    let expected = azure_edge_gateway::encoding::base64(&azure_edge_gateway::crypto::hmac_sha256(
        &key,
        documented_string_to_sign(url, canonical).as_bytes(),
    ));
    param(url, "sig").as_deref() == Some(expected.as_str())
}

#[test]
fn a_create_url_is_signed_for_one_blob_and_its_signature_is_in_no_log_line() {
    let (g, io) = (gateway(), storage());
    let (status, answer, line) = run(&g, &post("/uploads/t1/report%201.pdf"), &io);
    assert_eq!(status, 200, "{answer}");
    let url = answer["url"].as_str().unwrap();
    assert!(
        url.starts_with("https://contosofiles.blob.core.windows.net/uploads/t1/report%201.pdf?"),
        "{url}"
    );
    assert_eq!(answer["method"], "PUT");
    assert_eq!(answer["headers"]["x-ms-blob-type"], "BlockBlob");
    assert_eq!(answer["blob"], "t1/report 1.pdf");
    assert_eq!(answer["permission"], "create");
    // Five minutes by default, from the time of the request.
    assert_eq!(answer["expires"], "2023-11-14T22:18:20Z");
    for (name, value) in [
        ("sp", "c"),
        ("se", "2023-11-14T22:18:20Z"),
        ("spr", "https"),
        ("sv", "2025-11-05"),
        ("sr", "b"),
        ("skoid", "oid-7"),
        ("ske", KEY_EXPIRY),
    ] {
        assert_eq!(param(url, name).as_deref(), Some(value), "{name} in {url}");
    }
    assert_eq!(param(url, "sip"), None);
    assert!(signature_holds(
        url,
        "/blob/contosofiles/uploads/t1/report 1.pdf"
    ));
    assert!(
        !signature_holds(url, "/blob/contosofiles/uploads/t1/other.pdf"),
        "the signature covers the name"
    );
    assert!(!url.contains(KEY_VALUE), "the key never leaves");
    // The key came from Storage with the identity's token, for 3 hours from 5 minutes ago.
    let sent = io.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, "POST");
    assert_eq!(
        sent[0].url,
        "https://contosofiles.blob.core.windows.net/?restype=service&comp=userdelegationkey"
    );
    assert_eq!(sent[0].token.as_deref(), Some("token-for-gw"));
    assert_eq!(sent[0].header("x-ms-version"), Some("2025-11-05"));
    let body = String::from_utf8(sent[0].body.clone()).unwrap();
    assert!(
        body.contains("<Start>2023-11-14T22:08:20Z</Start><Expiry>2023-11-15T01:13:20Z</Expiry>"),
        "{body}"
    );
    // The log names the blob, the permission and the expiry; never the URL or its signature.
    let log = log_of(&line);
    assert_eq!(log["blob"], "t1/report 1.pdf");
    assert_eq!(log["sas_permission"], "create");
    assert_eq!(log["sas_expires"], "2023-11-14T22:18:20Z");
    assert_eq!(log["key"], "fetched");
    let sig = param(url, "sig").unwrap();
    assert!(
        !line.contains(&sig) && !line.contains(&url[url.find('?').unwrap()..]),
        "{line}"
    );
    assert!(!line.contains("sig="), "{line}");
}

#[test]
fn two_hundred_cold_callers_make_one_key_request_and_one_token_request() {
    let g = gateway();
    let mut io = storage();
    io.concurrent = true;
    let heads: Vec<RequestHead> = (0..200)
        .map(|i| post(&format!("/uploads/t1/f{i}")))
        .collect();
    let answers = block_on_all(heads.iter().map(|h| g.handle(h, &io)).collect());
    let mut sources = std::collections::BTreeMap::new();
    for (answer, line) in &answers {
        assert_eq!(answer.status, 200, "{line}");
        *sources
            .entry(log_of(line)["key"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(io.sent().len(), 1, "one Get User Delegation Key");
    assert_eq!(io.tokens_asked.get(), 1, "one token");
    assert_eq!(sources.get("fetched"), Some(&1), "{sources:?}");
    assert_eq!(sources.get("waited"), Some(&199), "{sources:?}");
}

#[test]
fn a_cached_key_serves_while_the_identity_provider_is_down_and_not_past_its_life() {
    let g = gateway();
    let warm = storage();
    assert_eq!(run(&g, &post("/uploads/t1/a"), &warm).0, 200);
    // The identity provider is down from now on.
    let mut down = storage();
    down.no_token = Some(
        Problem::new(503, "identity-unavailable", "down", "down").with_header("retry-after", "5"),
    );
    down.clock.set(warm.clock.get() + 30.0 * 60_000.0);
    let (status, answer, line) = run(&g, &post("/uploads/t1/b"), &down);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(log_of(&line)["key"], "cache");
    assert_eq!((down.tokens_asked.get(), down.sent().len()), (0, 0));
    // Past its refresh point (about an hour): one refresh tried, the old key still serves.
    down.clock.set(warm.clock.get() + 70.0 * 60_000.0);
    let (status, _, line) = run(&g, &post("/uploads/t1/c"), &down);
    assert_eq!(status, 200);
    assert_eq!(log_of(&line)["key"], "cache_refresh_failed");
    assert_eq!(down.tokens_asked.get(), 1);
    // Past the time when a one-hour URL would outlive the key: no URL from it.
    down.clock.set(warm.clock.get() + 120.0 * 60_000.0);
    let (status, answer, _) = run(&g, &post("/uploads/t1/d"), &down);
    assert_eq!(status, 503, "{answer}");
    assert_eq!(
        answer["type"]
            .as_str()
            .map(|t| t.ends_with(":identity-unavailable")),
        Some(true),
        "{answer}"
    );
    assert!(answer.get("url").is_none());
}

#[test]
fn storage_refusing_the_key_is_a_502_remembered_for_a_moment_and_nothing_is_minted() {
    let g = gateway();
    let io = Fake::new();
    io.answer_for(
        "comp=userdelegationkey",
        Ok((
            403,
            vec![(
                "x-ms-error-code".into(),
                "AuthorizationPermissionMismatch".into(),
            )],
            "<Error/>".into(),
        )),
    );
    let (status, answer, line) = run(&g, &post("/uploads/t1/a"), &io);
    assert_eq!(status, 502, "{answer}");
    assert!(answer["type"]
        .as_str()
        .unwrap()
        .ends_with(":delegation-key-refused"));
    assert!(answer["detail"]
        .as_str()
        .unwrap()
        .contains("Storage Blob Delegator"));
    assert!(
        answer.get("url").is_none() && !line.contains("sas_"),
        "{line}"
    );
    // Others get the same answer at once, without asking Storage again…
    let (status, _, _) = run(&g, &post("/uploads/t1/b"), &io);
    assert_eq!((status, io.sent().len()), (502, 1));
    // …until the back-off ends.
    io.answer_for("comp=userdelegationkey", key_reply());
    io.clock.set(io.clock.get() + 6_000.0);
    let (status, _, _) = run(&g, &post("/uploads/t1/c"), &io);
    assert_eq!((status, io.sent().len()), (200, 2));
}

#[test]
fn a_refused_token_is_replaced_once_and_the_key_asked_for_again() {
    let g = gateway();
    let io = Fake::new();
    io.replies
        .borrow_mut()
        .push_back(Ok((401, Vec::new(), String::new())));
    io.replies.borrow_mut().push_back(key_reply());
    let (status, answer, _) = run(&g, &post("/uploads/t1/a"), &io);
    assert_eq!(status, 200, "{answer}");
    let sent = io.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(io.evicted.borrow().as_slice(), ["token-for-gw"]);
    assert_eq!(sent[1].token.as_deref(), Some("token-for-gw-2"));
}

#[test]
fn names_that_leave_the_template_are_refused_before_any_key_or_token() {
    let g = gateway();
    for path in [
        "/uploads/t1/..",
        "/uploads/t1/%2E%2E",
        "/uploads/..%2Fother/x",
        "/uploads/t1/a%5Cb",
        "/uploads/t1/a%00b",
        "/uploads/%2E/x",
    ] {
        let io = storage();
        let (status, answer, line) = run(&g, &post(path), &io);
        assert!(matches!(status, 400 | 404), "{path}: {status} {answer}");
        assert!(answer.get("url").is_none(), "{path}");
        assert_eq!((io.sent().len(), io.tokens_asked.get()), (0, 0), "{path}");
        assert!(!line.contains("sas_"), "{line}");
    }
}

#[test]
fn a_read_url_carries_the_download_overrides_under_its_signature() {
    let (g, io) = (gateway(), storage());
    let head = request("GET", "/downloads/r.pdf?type=application/pdf", &[], false);
    let (status, answer, _) = run(&g, &head, &io);
    assert_eq!(status, 200, "{answer}");
    let url = answer["url"].as_str().unwrap();
    assert_eq!(answer["method"], "GET");
    assert_eq!(answer["headers"], serde_json::json!({}));
    assert_eq!(param(url, "sp").as_deref(), Some("r"));
    assert_eq!(
        param(url, "rscd").as_deref(),
        Some(r#"attachment; filename="r.pdf""#)
    );
    assert_eq!(param(url, "rsct").as_deref(), Some("application/pdf"));
    assert_eq!(answer["expires"], "2023-11-14T22:23:20Z", "600 s");
    assert!(signature_holds(url, "/blob/contosofiles/uploads/t1/r.pdf"));
    // A value Storage could not send back as a header is refused, and nothing minted.
    let io = storage();
    let head = request(
        "GET",
        "/downloads/r.pdf?type=text%2Fplain%0D%0AX-Evil:%201",
        &[],
        false,
    );
    let (status, answer, _) = run(&g, &head, &io);
    assert_eq!(status, 400, "{answer}");
    assert!(answer["type"]
        .as_str()
        .unwrap()
        .ends_with(":unsendable-value"));
    assert_eq!(io.sent().len(), 0);
}

#[test]
fn a_url_limited_to_the_caller_names_its_ipv4_address() {
    let (g, io) = (gateway(), storage());
    let from = |ip: &str| request("POST", "/pinned/a", &[("cf-connecting-ip", ip)], false);
    let (status, answer, _) = run(&g, &from("203.0.113.9"), &io);
    assert_eq!(status, 200, "{answer}");
    let url = answer["url"].as_str().unwrap();
    assert_eq!(param(url, "sip").as_deref(), Some("203.0.113.9"));
    assert_eq!(param(url, "sp").as_deref(), Some("cw"));
    assert!(signature_holds(url, "/blob/contosofiles/uploads/a"));
    let (status, answer, _) = run(&g, &from("2001:db8::1"), &io);
    assert_eq!(status, 400);
    assert!(answer["type"]
        .as_str()
        .unwrap()
        .ends_with(":address-not-supported"));
    let (status, _, _) = run(&g, &post("/pinned/a"), &io);
    assert_eq!(status, 400);
    assert_eq!(io.sent().len(), 1, "only the first request needed a key");
}

#[test]
fn a_key_that_would_expire_before_a_url_is_not_used() {
    let g = gateway();
    let io = Fake::new();
    // Storage gave 30 minutes, less than a one-hour URL needs: no URL is signed with it.
    io.answer_for(
        "comp=userdelegationkey",
        Ok((200, Vec::new(), key_xml("2023-11-14T22:43:20Z"))),
    );
    let (status, answer, _) = run(&g, &post("/uploads/t1/a"), &io);
    assert_eq!(status, 502, "{answer}");
    assert!(answer["type"].as_str().unwrap().ends_with(":backend-error"));
    assert!(answer.get("url").is_none());
}
