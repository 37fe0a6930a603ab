//! The request driver, run on the host with fake I/O: the same code the worker runs
//! (`Gateway::handle`), every phase in order, with a fake clock, fake secrets, a fake rate
//! limiter, fake Azure replies, and a record of everything that would have been sent.

#[path = "support/fake_io.rs"]
mod fake_io;

use azure_edge_gateway::exchange::{AnswerBody, Limit, OutBody, RequestHead, SendError};
use azure_edge_gateway::pipeline::Gateway;
use azure_edge_gateway::problem::Problem;
use azure_edge_gateway::store::Delivered;
use fake_io::{block_on, block_on_all, request, Fake, FakeReply, Sent};
use serde_json::{json, Value};

const POLICY: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
      "client_id": "c", "credential": { "client_secret": { "secret": "GW_SECRET" } } } },
  "routes": [
    { "name": "orders", "methods": ["POST"], "path": "/orders/{tenant}",
      "inbound": { "api_key": { "keys": [{ "name": "partner", "secret": "PARTNER_KEY" }] } },
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "orders", "identity": "gw",
        "message": { "label": "{header.x-label}", "properties": { "tenant": "{path.tenant}" } } } } },
    { "name": "batch", "methods": ["POST"], "path": "/batch/{tenant}", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "events", "identity": "gw", "batch": true,
        "message": { "session_id": "{path.tenant}" } } } },
    { "name": "upload", "methods": ["PUT"], "path": "/files/{name}", "public": true,
      "backend": { "blob": { "account": "contosofiles", "container": "uploads", "blob": "{path.name}", "identity": "gw",
        "block_bytes": 65536, "single_put_max_bytes": 100000, "max_body_bytes": 1000000 } } },
    { "name": "download", "methods": ["GET"], "path": "/read/{name}", "public": true,
      "backend": { "blob": { "account": "contosofiles", "container": "uploads", "blob": "{path.name}", "identity": "gw",
        "block_bytes": 65536, "single_put_max_bytes": 100000, "max_body_bytes": 1000000 } } },
    { "name": "jwt", "methods": ["POST"], "path": "/jwt",
      "inbound": { "jwt": { "issuers": ["https://issuer.example/"], "audiences": ["api://orders"],
        "jwks_url": "https://issuer.example/keys" },
        "rate_limit": { "binding": "RL", "key": "jwt_subject", "limit": 10, "period_seconds": 60 } },
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "orders", "identity": "gw" } } }
  ]
}"#;

fn gateway() -> Gateway {
    Gateway::load(POLICY).unwrap_or_else(|e| panic!("{e:?}"))
}

/// Runs one request; returns status, headers, body text and the parsed log line.
fn run(
    g: &Gateway,
    head: &RequestHead,
    io: &Fake,
) -> (u16, Vec<(&'static str, String)>, String, Value) {
    let (answer, line) = block_on(g.handle(head, io));
    let body = match answer.body {
        AnswerBody::Empty => String::new(),
        AnswerBody::Text(t) => t,
        AnswerBody::Stream(s) => format!("<stream {s}>"),
    };
    let log: Value = serde_json::from_str(&line).expect("the log line is JSON");
    (answer.status, answer.headers, body, log)
}

/// The `Location` an answer hands out (an operation's handle), or the test fails.
fn location_of(headers: &[(&'static str, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| *k == "location")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no Location: {headers:?}"))
}

fn with_secrets(mut io: Fake) -> Fake {
    io.secrets.insert("PARTNER_KEY".into(), "k-123".into());
    io
}

#[test]
fn a_path_no_route_has_is_a_404_problem_with_one_log_line() {
    let io = Fake::new();
    let (status, headers, body, log) = run(&gateway(), &request("GET", "/nope", &[], false), &io);
    assert_eq!(status, 404);
    assert!(headers.contains(&("content-type", "application/problem+json".to_owned())));
    let request_id = headers.iter().find(|(k, _)| *k == "x-request-id").unwrap();
    assert_eq!(log["request_id"], request_id.1.as_str());
    assert_eq!(log["status"], 404);
    assert_eq!(log["problem"], "route-not-found");
    assert!(body.contains("urn:azure-edge-gateway:problem:route-not-found"));
    assert!(io.sent().is_empty());
}

#[test]
fn a_service_bus_send_goes_through_every_phase_in_order() {
    let io = with_secrets(Fake::new()).with_body(br#"{"order":1}"#);
    let head = request(
        "POST",
        "/orders/contoso",
        &[
            ("x-api-key", "k-123"),
            ("x-label", "new"),
            ("content-type", "application/json"),
            ("idempotency-key", "order-1"),
            ("x-request-id", "req-1"),
        ],
        true,
    );
    let (status, _, body, log) = run(&gateway(), &head, &io);
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "accepted", "entity": "orders", "messageId": "order-1"})
    );
    let sent = io.sent();
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(
        (s.method, s.url.as_str()),
        (
            "POST",
            "https://contoso-orders.servicebus.windows.net/orders/messages"
        )
    );
    assert_eq!(s.token.as_deref(), Some("token-for-gw"));
    assert_eq!(s.body, br#"{"order":1}"#);
    let broker: Value = serde_json::from_str(s.header("brokerproperties").unwrap()).unwrap();
    assert_eq!(broker["MessageId"], "order-1");
    assert_eq!(broker["Label"], "new");
    assert_eq!(s.header("tenant"), Some("contoso"));
    assert_eq!(s.header("authorization"), None, "the token travels apart");
    assert_eq!(log["route"], "orders");
    assert_eq!(log["api_key"], "partner");
    assert_eq!(log["identity"], "gw");
    assert_eq!(log["token"], "cache");
    assert_eq!(log["backend_status"], 201);
    assert_eq!(log["request_id"], "req-1");
}

#[test]
fn a_key_held_in_a_secret_is_read_and_hashed_once_per_isolate() {
    let g = gateway();
    let io = with_secrets(Fake::new()).with_body(b"{}");
    for _ in 0..3 {
        let head = request(
            "POST",
            "/orders/a",
            &[("x-api-key", "k-123"), ("x-label", "l")],
            true,
        );
        assert_eq!(run(&g, &head, &io).0, 202);
    }
    let wrong = request("POST", "/orders/a", &[("x-api-key", "nope")], true);
    assert_eq!(run(&g, &wrong, &io).0, 401);
    assert_eq!(io.secret_reads.get(), 1);
}

#[test]
fn a_throttled_send_is_retried_with_the_same_bytes_and_message_id() {
    let io = with_secrets(Fake::new())
        .with_body(b"payload")
        .reply(503, &[("retry-after", "1")], "")
        .reply(201, &[], "");
    let head = request(
        "POST",
        "/orders/a",
        &[("x-api-key", "k-123"), ("x-label", "l")],
        true,
    );
    let (status, _, _, _) = run(&gateway(), &head, &io);
    assert_eq!(status, 202);
    let sent = io.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].body, sent[1].body);
    assert_eq!(
        sent[0].header("brokerproperties"),
        sent[1].header("brokerproperties")
    );
}

#[test]
fn service_bus_s_reason_goes_to_the_log_never_to_the_caller() {
    let xml =
        "<Error><Code>400</Code><Detail>The value 'x' is bad. TrackingId:abc</Detail></Error>";
    let io = with_secrets(Fake::new())
        .with_body(b"{}")
        .reply(400, &[], xml);
    let head = request(
        "POST",
        "/orders/a",
        &[("x-api-key", "k-123"), ("x-label", "l")],
        true,
    );
    let (status, _, body, log) = run(&gateway(), &head, &io);
    assert_eq!(status, 400);
    assert!(!body.contains("is bad"), "{body}");
    assert_eq!(log["backend_detail"], "The value 'x' is bad");
}

#[test]
fn a_value_http_cannot_carry_is_refused_before_a_token_is_asked_for() {
    let io = with_secrets(Fake::new()).with_body(b"{}");
    let head = request(
        "POST",
        "/orders/a",
        &[("x-api-key", "k-123"), ("x-label", "caf\u{e9}")],
        true,
    );
    let (status, _, body, log) = run(&gateway(), &head, &io);
    assert_eq!(status, 400);
    assert!(body.contains("BrokerProperties.Label"), "{body}");
    assert_eq!(log["problem"], "unsendable-value");
    assert_eq!(io.tokens_asked.get(), 0);
    assert!(io.sent().is_empty());
}

#[test]
fn a_batch_element_cannot_set_what_the_route_maps() {
    let body = br#"[{"Body": "a"}, {"Body": "b", "BrokerProperties": {"SessionId": "fabrikam"}}]"#;
    let io = Fake::new().with_body(body);
    let (status, _, text, _) = run(
        &gateway(),
        &request("POST", "/batch/contoso", &[], true),
        &io,
    );
    assert_eq!(status, 400);
    assert!(text.contains("batch[1].BrokerProperties.SessionId is set by this route"));
    assert!(io.sent().is_empty());
}

/// A query value as sent (`%XX` escapes undone).
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&value[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Uploads `data` without a length as /files/big.bin on a fake whose UUIDs start after
/// `uuids_from`; returns (the block ids of its Put Block calls, in order, and its commit).
fn upload_in_blocks(data: &[u8], uuids_from: u32) -> (Vec<String>, Sent) {
    let io = Fake::new().with_body(data);
    io.uuids.set(uuids_from);
    let head = request(
        "PUT",
        "/files/big.bin",
        &[("content-type", "image/png")],
        true,
    );
    let (status, headers, body, _) = run(&gateway(), &head, &io);
    assert_eq!(status, 201, "{body}");
    assert!(headers.contains(&("location", "/read/big.bin".to_owned())));
    let sent = io.sent();
    assert_eq!(sent.len(), 4, "three blocks and the commit");
    let mut ids = Vec::new();
    for s in &sent[..3] {
        let id = s.url.split("blockid=").nth(1).unwrap();
        ids.push(percent_decoded(id));
        assert!(matches!(s.limit, Limit::Deadline(_)));
    }
    assert_eq!(
        sent[..3]
            .iter()
            .flat_map(|s| s.body.clone())
            .collect::<Vec<u8>>(),
        data
    );
    (ids, sent[3].clone())
}

#[test]
fn a_body_without_a_length_is_uploaded_in_blocks_of_this_upload_s_own_ids() {
    let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let (ids, commit) = upload_in_blocks(&data, 0);
    // Azure wants one length for every id of a blob; each block its own id.
    assert!(ids.iter().all(|id| id.len() == ids[0].len()));
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        3
    );
    assert!(commit.url.ends_with("?comp=blocklist"));
    assert_eq!(commit.header("x-ms-blob-content-type"), Some("image/png"));
    assert_eq!(commit.header("if-none-match"), Some("*"));
    // The commit lists exactly the blocks this upload put, in order: nothing else.
    let list = String::from_utf8(commit.body.clone()).unwrap();
    let latest: String = ids
        .iter()
        .map(|id| format!("<Latest>{id}</Latest>"))
        .collect();
    assert_eq!(
        list,
        format!("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>{latest}</BlockList>")
    );
    // Another upload of the same name (another request, other UUIDs) shares none of these ids,
    // so it can neither replace nor commit a block of this one.
    let (other, other_commit) = upload_in_blocks(&data, 1_000);
    assert!(
        other.iter().all(|id| !ids.contains(id)),
        "{ids:?} / {other:?}"
    );
    let other_list = String::from_utf8(other_commit.body).unwrap();
    assert!(ids.iter().all(|id| !other_list.contains(id.as_str())));
}

#[test]
fn a_body_with_a_small_length_is_streamed_in_one_put_timed_on_progress() {
    let io = Fake::new().reply(201, &[("etag", "\"0x1\"")], "");
    let head = request(
        "PUT",
        "/files/small.txt",
        &[("content-length", "5"), ("content-type", "text/plain")],
        true,
    );
    let (status, _, body, _) = run(&gateway(), &head, &io);
    assert_eq!(status, 201);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["etag"],
        "\"0x1\""
    );
    let sent = io.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].stream, Some(5));
    assert_eq!(sent[0].header("content-length"), Some("5"));
    assert!(matches!(sent[0].limit, Limit::Idle(_)));
}

#[test]
fn a_read_streams_azure_s_body_back() {
    let io = Fake::new().reply(
        200,
        &[("content-type", "text/plain"), ("etag", "\"e\"")],
        "hello",
    );
    let (status, headers, body, _) =
        run(&gateway(), &request("GET", "/read/a.txt", &[], false), &io);
    assert_eq!(status, 200);
    assert_eq!(body, "<stream hello>");
    assert!(headers.contains(&("etag", "\"e\"".to_owned())));
}

#[test]
fn jwt_keys_are_fetched_once_and_a_token_without_sub_counts_against_its_address() {
    let g = gateway();
    let b64 = |v: &Value| azure_edge_gateway::encoding::base64url(v.to_string().as_bytes());
    let token = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": "k1", "typ": "JWT"})),
        b64(
            &json!({"iss": "https://issuer.example/", "aud": "api://orders", "exp": 1_800_000_000, "nbf": 1_600_000_000})
        ),
        azure_edge_gateway::encoding::base64url(&[1u8; 256]),
    );
    let mut io = Fake::new().with_body(b"{}");
    io.jwks = Some(
        json!({"keys": [{"kty": "RSA", "kid": "k1", "n": azure_edge_gateway::encoding::base64url(&[0xc5u8; 256]), "e": "AQAB"}]})
            .to_string(),
    );
    io.rate_allowed.set(Some(true));
    let head = request(
        "POST",
        "/jwt",
        &[
            ("authorization", &format!("Bearer {token}")),
            ("cf-connecting-ip", "203.0.113.7"),
        ],
        true,
    );
    for _ in 0..2 {
        let (status, _, body, _) = run(&g, &head, &io);
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(io.jwks_fetches.get(), 1);
    // Over the limit: 429 with Retry-After, nothing sent.
    io.rate_allowed.set(Some(false));
    let before = io.sent().len();
    let (status, headers, _, _) = run(&g, &head, &io);
    assert_eq!(status, 429);
    assert!(headers.contains(&("retry-after", "60".to_owned())));
    assert_eq!(io.sent().len(), before);
    // A forged signature is refused.
    io.verify_ok = false;
    assert_eq!(run(&g, &head, &io).0, 401);
}

#[test]
fn an_identity_provider_outage_is_the_caller_s_503_and_nothing_is_sent() {
    let mut io = Fake::new().with_body(br#"[{"Body": "a"}]"#);
    io.no_token = Some(Problem::new(503, "identity-unavailable", "x", "y"));
    let (status, _, _, log) = run(&gateway(), &request("POST", "/batch/a", &[], true), &io);
    assert_eq!(status, 503);
    assert_eq!(log["token_error"], "unavailable");
    assert!(io.sent().is_empty());
}

const REST_POLICY: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
      "client_id": "c", "credential": { "client_secret": { "secret": "GW_SECRET" } } } },
  "routes": [
    { "name": "restart", "methods": ["POST"], "path": "/sites/{site}/restart", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01", "body": "none",
        "url": "https://management.azure.com/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Web/sites/{path.site}/restart" } } },
    { "name": "site", "methods": ["GET"], "path": "/sites/{site}", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01",
        "url": "https://management.azure.com/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Web/sites/{path.site}" } } },
    { "name": "operations", "methods": ["GET"], "path": "/ops/{operation}", "public": true,
      "backend": { "azure_operation": { "of": ["restart"] } } }
  ]
}"#;

fn rest_io() -> Fake {
    let mut io = Fake::new();
    io.secrets
        .insert("GW_SECRET".into(), "identity-secret".into());
    io
}

#[test]
fn a_post_azure_may_have_processed_is_never_sent_twice_a_read_is_retried() {
    let g = Gateway::load(REST_POLICY).unwrap();
    let io = rest_io().reply(503, &[("retry-after", "3")], "");
    let (status, headers, _, log) = run(&g, &request("POST", "/sites/a/restart", &[], false), &io);
    assert_eq!(status, 503);
    assert!(headers.contains(&("retry-after", "3".to_owned())));
    assert_eq!(io.sent().len(), 1, "a POST answered 503 is not sent again");
    assert_eq!(log["backend_status"], 503);
    let io = rest_io().reply(503, &[("retry-after", "1")], "").reply(
        200,
        &[("content-type", "application/json")],
        "{}",
    );
    let (status, _, _, _) = run(&g, &request("GET", "/sites/a", &[], false), &io);
    assert_eq!(status, 200);
    let sent = io.sent();
    assert_eq!(sent.len(), 2, "a read is retried");
    assert_eq!(sent[0].url, sent[1].url);
    assert_eq!(
        sent[0].url,
        "https://management.azure.com/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Web/sites/a?api-version=2022-09-01"
    );
}

#[test]
fn a_post_that_timed_out_or_lost_its_connection_is_never_sent_again_a_read_is() {
    let g = Gateway::load(REST_POLICY).unwrap();
    for (error, status) in [
        (SendError::Timeout, 504),
        (
            SendError::Network("connection reset after the request was written".into()),
            502,
        ),
    ] {
        let io = rest_io().reply(202, &[], "");
        io.replies.borrow_mut().push_front(Err(error));
        let (got, headers, answer, log) =
            run(&g, &request("POST", "/sites/a/restart", &[], false), &io);
        assert_eq!(got, status, "{answer}");
        assert!(answer.contains("backend-outcome-unknown"), "{answer}");
        assert!(answer.contains("Check the outcome"), "{answer}");
        assert!(!headers.iter().any(|(k, _)| *k == "retry-after"));
        assert_eq!(
            io.sent().len(),
            1,
            "a POST whose outcome is unknown is sent once"
        );
        assert_eq!(log["problem"], "backend-outcome-unknown");
        assert!(
            log["backend_detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("outcome unknown"),
            "{log}"
        );
    }
    // A GET that timed out is sent again.
    let io = rest_io().reply(200, &[("content-type", "application/json")], "{}");
    io.replies.borrow_mut().push_front(Err(SendError::Timeout));
    let (status, _, _, _) = run(&g, &request("GET", "/sites/a", &[], false), &io);
    assert_eq!(status, 200);
    assert_eq!(io.sent().len(), 2);
}

#[test]
fn a_service_bus_send_with_an_unknown_outcome_goes_again_only_with_duplicate_detection() {
    // The plain route (no duplicate_detection): 500, a timeout or a lost connection end the call.
    for first in [
        Err(SendError::Timeout),
        Err(SendError::Network("reset".into())),
        Ok((500, vec![], String::new())),
    ] {
        let g = store_gateway();
        let io = Fake::new().with_body(b"m").reply(201, &[], "");
        io.replies.borrow_mut().push_front(first);
        let (status, _, answer, _) = run(&g, &request("POST", "/plain/a", &[], true), &io);
        assert!(matches!(status, 502 | 504), "{status} {answer}");
        assert!(answer.contains("backend-outcome-unknown"), "{answer}");
        assert_eq!(io.sent().len(), 1, "sent once: {answer}");
    }
    // A busy entity (503, 429) did not take it: sent again.
    let g = store_gateway();
    let io = Fake::new()
        .with_body(b"m")
        .reply(503, &[], "")
        .reply(201, &[], "");
    assert_eq!(run(&g, &request("POST", "/plain/a", &[], true), &io).0, 202);
    assert_eq!(io.sent().len(), 2);
    // With duplicate detection, the same MessageId goes again after a 500.
    let io = Fake::new()
        .with_body(b"m")
        .reply(500, &[], "")
        .reply(201, &[], "");
    let head = request("POST", "/orders/a", &[("idempotency-key", "k-1")], true);
    assert_eq!(run(&g, &head, &io).0, 202);
    let sent = io.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[0]
            .headers
            .iter()
            .find(|(k, _)| k == "brokerproperties"),
        sent[1]
            .headers
            .iter()
            .find(|(k, _)| k == "brokerproperties")
    );
}

#[test]
fn a_create_only_write_that_finds_its_own_lost_attempt_says_the_outcome_is_unknown() {
    // A route that stores requests holds the body, so the write can be sent again.
    let g = store_gateway();
    let io =
        Fake::new()
            .with_body(b"hello")
            .reply(409, &[("x-ms-error-code", "BlobAlreadyExists")], "");
    io.replies.borrow_mut().push_front(Err(SendError::Timeout));
    let head = request("PUT", "/files/a.txt", &[("content-length", "5")], true);
    let (status, _, answer, _) = run(&g, &head, &io);
    assert_eq!(status, 502, "{answer}");
    assert!(answer.contains("backend-outcome-unknown"), "{answer}");
    assert!(
        answer.contains("most likely that attempt's own write"),
        "{answer}"
    );
    assert_eq!(io.sent().len(), 2);
    // Without a lost attempt, a 409 is someone else's blob.
    let io =
        Fake::new()
            .with_body(b"hello")
            .reply(409, &[("x-ms-error-code", "BlobAlreadyExists")], "");
    let (status, _, answer, _) = run(&g, &head, &io);
    assert_eq!(status, 409, "{answer}");
}

#[test]
fn during_a_rotation_with_only_the_next_secret_set_operations_are_still_handed_out() {
    let policy = REST_POLICY.replace(
        r#""credential": { "client_secret": { "secret": "GW_SECRET" } }"#,
        r#""credential": { "client_secret": { "secret": "GW_SECRET", "next_secret": "GW_NEXT" } }"#,
    );
    assert_ne!(policy, REST_POLICY);
    let g = Gateway::load(&policy).unwrap_or_else(|e| panic!("{e:?}"));
    let azure_op = "https://management.azure.com/subscriptions/s1/providers/Microsoft.Web/locations/westeurope/operationResults/op-2?api-version=2022-09-01";
    let only_next = || {
        let mut io = Fake::new();
        io.secrets.insert("GW_NEXT".into(), "next-secret".into());
        io
    };
    let io = only_next().reply(202, &[("azure-asyncoperation", azure_op)], "");
    let (status, headers, answer, _) =
        run(&g, &request("POST", "/sites/a/restart", &[], false), &io);
    assert_eq!(status, 202, "{answer}");
    let location = location_of(&headers);
    let io = only_next().reply(
        200,
        &[("content-type", "application/json")],
        r#"{"status":"Succeeded"}"#,
    );
    assert_eq!(run(&g, &request("GET", &location, &[], false), &io).0, 200);
    assert_eq!(io.sent()[0].url, azure_op);
    // With neither set, the restart is not sent: the caller could not follow it.
    let io = Fake::new().reply(202, &[("azure-asyncoperation", azure_op)], "");
    let (status, _, answer, _) = run(&g, &request("POST", "/sites/a/restart", &[], false), &io);
    assert_eq!(status, 500, "{answer}");
    assert!(answer.contains("GW_SECRET, GW_NEXT"), "{answer}");
    assert!(io.sent().is_empty());
}

#[test]
fn a_handle_issued_before_a_rotation_opens_while_the_old_secret_is_set_and_not_after() {
    let policy = REST_POLICY
        .replace(
            r#""credential": { "client_secret": { "secret": "GW_SECRET" } }"#,
            r#""credential": { "client_secret": { "secret": "GW_SECRET", "next_secret": "GW_NEXT" } }"#,
        )
        .replace(
            r#"{ "name": "operations","#,
            r#"{ "name": "stop", "methods": ["POST"], "path": "/sites/{site}/stop", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01", "body": "none",
        "url": "https://management.azure.com/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Web/sites/{path.site}/stop" } } },
    { "name": "stop-operations", "methods": ["GET"], "path": "/stop-ops/{operation}", "public": true,
      "backend": { "azure_operation": { "of": ["stop"] } } },
    { "name": "operations","#,
        );
    let g = Gateway::load(&policy).unwrap_or_else(|e| panic!("{e:?}"));
    let azure_op = "https://management.azure.com/subscriptions/s1/providers/Microsoft.Web/locations/westeurope/operationResults/op-3?api-version=2022-09-01";
    let with = |secrets: &[(&str, &str)]| {
        let mut io = Fake::new();
        for (name, value) in secrets {
            io.secrets.insert((*name).into(), (*value).into());
        }
        io
    };
    // Before the rotation: only the old secret. The same operation twice: a fresh nonce each
    // time, two handles.
    let io = with(&[("GW_SECRET", "old-secret")])
        .reply(202, &[("azure-asyncoperation", azure_op)], "")
        .reply(202, &[("azure-asyncoperation", azure_op)], "");
    let restart = || run(&g, &request("POST", "/sites/a/restart", &[], false), &io);
    let (status, headers, _, _) = restart();
    assert_eq!(status, 202);
    let location = location_of(&headers);
    assert_ne!(location, location_of(&restart().1));
    let follow = |location: &str, io: Fake| {
        let io = io.reply(
            200,
            &[("content-type", "application/json")],
            r#"{"status":"Succeeded"}"#,
        );
        let status = run(&g, &request("GET", location, &[], false), &io).0;
        (status, io.sent().len())
    };
    // During the rotation (both set) it still opens; once the old secret is gone it does not,
    // and nothing is sent.
    let both = [("GW_SECRET", "old-secret"), ("GW_NEXT", "next-secret")];
    assert_eq!(follow(&location, with(&both)), (200, 1));
    assert_eq!(
        follow(&location, with(&[("GW_NEXT", "next-secret")])),
        (404, 0)
    );
    // A handle sealed under the next secret (the old one was unset for a while) opens when both
    // are set again: every configured key is tried, not only the first.
    let io =
        with(&[("GW_NEXT", "next-secret")]).reply(202, &[("azure-asyncoperation", azure_op)], "");
    let (status, headers, _, _) = run(&g, &request("POST", "/sites/a/restart", &[], false), &io);
    assert_eq!(status, 202);
    assert_eq!(follow(&location_of(&headers), with(&both)), (200, 1));
    // A handle is bound to the route that issued it: another operations route cannot open it,
    // even under the same identity.
    let elsewhere = location.replacen("/ops/", "/stop-ops/", 1);
    assert_eq!(follow(&elsewhere, with(&both)), (404, 0));
}

#[test]
fn an_allowed_query_parameter_given_twice_is_refused_and_nothing_is_sent() {
    let policy = REST_POLICY.replace(
        r#"{ "name": "operations","#,
        r#"{ "name": "list", "methods": ["GET"], "path": "/sites", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01", "query": ["$top"],
        "url": "https://management.azure.com/subscriptions/s1/providers/Microsoft.Web/sites" } } },
    { "name": "operations","#,
    );
    let g = Gateway::load(&policy).unwrap_or_else(|e| panic!("{e:?}"));
    for query in ["$top=1&$top=2", "$top=1&$TOP=2"] {
        let io = rest_io().reply(200, &[("content-type", "application/json")], "{}");
        let (status, _, answer, _) = run(
            &g,
            &request("GET", &format!("/sites?{query}"), &[], false),
            &io,
        );
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains("repeated-query-parameter"), "{answer}");
        assert!(io.sent().is_empty(), "nothing sent for {query}");
    }
    let io = rest_io().reply(200, &[("content-type", "application/json")], "{}");
    let (status, _, _, _) = run(
        &g,
        &request("GET", "/sites?$top=1&other=x", &[], false),
        &io,
    );
    assert_eq!(status, 200);
    assert_eq!(
        io.sent()[0].url,
        "https://management.azure.com/subscriptions/s1/providers/Microsoft.Web/sites?api-version=2022-09-01&%24top=1"
    );
}

#[test]
fn an_operation_is_followed_through_the_gateway_as_the_route_that_started_it() {
    let g = Gateway::load(REST_POLICY).unwrap();
    let azure_op = "https://management.azure.com/subscriptions/s1/providers/Microsoft.Web/locations/westeurope/operationResults/op-1?api-version=2022-09-01";
    let io = rest_io().reply(
        202,
        &[
            ("azure-asyncoperation", azure_op),
            ("location", "https://management.azure.com/x"),
            ("retry-after", "2"),
        ],
        "",
    );
    let (status, headers, _, _) = run(&g, &request("POST", "/sites/a/restart", &[], false), &io);
    assert_eq!(status, 202);
    let location = location_of(&headers);
    assert!(location.starts_with("/ops/"), "{location}");
    assert!(!headers
        .iter()
        .any(|(_, v)| v.contains("management.azure.com")));
    assert!(headers.contains(&("retry-after", "2".to_owned())));
    // The follow-up: Azure's URL, with the identity's token; the answer shaped to the
    // operation's own fields.
    let io2 = rest_io().reply(
        200,
        &[("content-type", "application/json")],
        r#"{"status":"Succeeded","properties":{"password":"p"}}"#,
    );
    let (status, _, body, log) = run(&g, &request("GET", &location, &[], false), &io2);
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"status":"Succeeded"}"#);
    assert_eq!(log["route"], "operations");
    let sent = io2.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].url, azure_op);
    assert_eq!(sent[0].method, "GET");
    assert!(sent[0].token.is_some());
    // Signed with the identity's secret: a gateway with another secret does not follow it.
    let mut other = Fake::new();
    other
        .secrets
        .insert("GW_SECRET".into(), "another-secret".into());
    let (status, _, body, _) = run(&g, &request("GET", &location, &[], false), &other);
    assert_eq!(status, 404);
    assert!(body.contains("operation-not-found"));
    assert!(other.sent().is_empty());
}

#[test]
fn azure_s_401_evicts_the_token_and_is_the_caller_s_502() {
    let g = Gateway::load(REST_POLICY).unwrap();
    let refused = r#"{"error":{"code":"InvalidAuthenticationTokenAudience","message":"The access token has been obtained for wrong audience or resource 'x'."}}"#;
    // Refused, replayed once with a fresh token, refused again.
    let io = rest_io()
        .reply(401, &[("content-type", "application/json")], refused)
        .reply(401, &[("content-type", "application/json")], refused);
    let (status, _, body, log) = run(&g, &request("GET", "/sites/a", &[], false), &io);
    assert_eq!(status, 502);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["type"], "urn:azure-edge-gateway:problem:backend-auth");
    assert_eq!(
        body["azure_error_code"],
        "InvalidAuthenticationTokenAudience"
    );
    assert!(
        !body.to_string().contains("wrong audience"),
        "Azure's message goes to the log only"
    );
    assert!(log["backend_detail"]
        .as_str()
        .unwrap()
        .contains("wrong audience"));
    assert_eq!(io.evicted.borrow().len(), 2);
    assert_eq!(io.sent().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// What the gateway reads of Azure's answers, and what a template builds

const BOUNDED_POLICY: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
      "client_id": "c", "credential": { "client_secret": { "secret": "GW_SECRET" } } } },
  "routes": [
    { "name": "site", "methods": ["GET"], "path": "/sites/{site}", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01", "project": ["/name"],
        "url": "https://management.azure.com/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Web/sites/{path.site}" } } },
    { "name": "site-big", "methods": ["GET"], "path": "/big/sites/{site}", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01", "project": ["/name"],
        "max_answer_bytes": 1048576,
        "url": "https://management.azure.com/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Web/sites/{path.site}" } } },
    { "name": "start", "methods": ["POST"], "path": "/sites/{site}/start", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01", "body": "none", "project": ["/id", "/name"],
        "url": "https://management.azure.com/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Web/sites/{path.site}/start" } } },
    { "name": "ops", "methods": ["GET"], "path": "/ops/{operation}", "public": true,
      "backend": { "azure_operation": { "of": ["start"] } } },
    { "name": "six", "methods": ["POST"], "path": "/six", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01",
        "url": "https://management.azure.com/subscriptions/s1/x",
        "body": { "template": { "content_type": "application/xml",
          "template": "<M><A>{body}</A><B>{body}</B><C>{body}</C><D>{body}</D><E>{body}</E><F>{body}</F></M>" } } } } },
    { "name": "b64", "methods": ["POST"], "path": "/b64", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2021-08-06",
        "url": "https://contoso.queue.core.windows.net/jobs/messages",
        "max_body_bytes": 49152, "max_built_body_bytes": 65536,
        "body": { "template": { "content_type": "application/xml",
          "template": "<QueueMessage><MessageText>{body_base64}</MessageText></QueueMessage>" } } } } },
    { "name": "json", "methods": ["POST"], "path": "/json", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01",
        "url": "https://management.azure.com/subscriptions/s1/y", "max_built_body_bytes": 1000,
        "body": { "json": { "properties": { "text": "{body}" } } } } } }
  ]
}"#;

/// A JSON answer of `bytes` bytes: `{"name":"big","properties":{"secret":…,"padding":"xxx…"}}`.
fn big_answer(bytes: usize) -> String {
    let head = r#"{"name":"big","properties":{"secret":"not-for-callers","padding":""#;
    let tail = r#""}}"#;
    format!(
        "{head}{}{tail}",
        "x".repeat(bytes - head.len() - tail.len())
    )
}

fn problem_type(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["type"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("urn:azure-edge-gateway:problem:")
        .to_owned()
}

#[test]
fn a_projected_answer_is_read_only_up_to_the_route_s_limit_and_refused_past_it() {
    let g = Gateway::load(BOUNDED_POLICY).unwrap();
    let json = [("content-type", "application/json")];
    // 70,000 bytes against the default 64 KiB: refused, nothing of it passed on.
    let io = rest_io().reply(200, &json, &big_answer(70_000));
    let (status, _, body, log) = run(&g, &request("GET", "/sites/a", &[], false), &io);
    assert_eq!(status, 502, "{body}");
    assert_eq!(problem_type(&body), "backend-answer-too-large");
    assert!(body.contains("65536 bytes (max_answer_bytes)"), "{body}");
    assert!(!body.contains("not-for-callers"));
    assert_eq!(
        *io.text_limits.borrow(),
        [65536],
        "read with the route's limit"
    );
    assert!(
        log["backend_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("over max_answer_bytes (65536): not read"),
        "{log}"
    );
    assert_eq!(
        io.sent().len(),
        1,
        "a refused answer is not asked for again"
    );
    // The same answer on a route that reads up to 1 MiB: projected.
    let io = rest_io().reply(200, &json, &big_answer(70_000));
    let (status, headers, body, _) = run(&g, &request("GET", "/big/sites/a", &[], false), &io);
    assert_eq!((status, body.as_str()), (200, r#"{"name":"big"}"#));
    assert!(headers.contains(&("content-type", "application/json".to_owned())));
    assert_eq!(*io.text_limits.borrow(), [1_048_576]);
    // An answer that broke off is never projected as if it were whole (nor as an empty one).
    let io = rest_io().reply(200, &json, "<broken>connection reset");
    let (status, _, body, _) = run(&g, &request("GET", "/sites/a", &[], false), &io);
    assert_eq!(status, 502, "{body}");
    assert_eq!(problem_type(&body), "backend-answer-unreadable");
    assert!(body.contains("broke off"), "{body}");
}

#[test]
fn an_error_answer_is_read_only_up_to_64_kib_and_mapped_by_its_status_and_header() {
    let g = Gateway::load(BOUNDED_POLICY).unwrap();
    let huge = format!(
        r#"{{"error":{{"code":"SomethingElse","message":"{}"}}}}"#,
        "m".repeat(100_000)
    );
    let io = rest_io().reply(
        404,
        &[
            ("content-type", "application/json"),
            ("x-ms-error-code", "ResourceNotFound"),
        ],
        &huge,
    );
    let (status, _, body, log) = run(&g, &request("GET", "/sites/a", &[], false), &io);
    assert_eq!(status, 404, "{body}");
    assert_eq!(problem_type(&body), "azure-rejected");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["azure_error_code"], "ResourceNotFound");
    assert_eq!(*io.text_limits.borrow(), [65536]);
    assert!(
        log["backend_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("not read"),
        "{log}"
    );
}

#[test]
fn a_template_body_is_built_only_up_to_its_limit_and_refused_before_anything_is_sent() {
    let g = Gateway::load(BOUNDED_POLICY).unwrap();
    // {body} six times: 1 MiB would build 6 MiB; the default limit is a third more than
    // max_body_bytes and 64 KiB.
    let io = rest_io().with_body(&vec![b'x'; 1024 * 1024]);
    let (status, _, body, _) = run(&g, &request("POST", "/six", &[], true), &io);
    assert_eq!(status, 413, "{body}");
    assert_eq!(problem_type(&body), "body-too-large");
    assert!(
        body.contains("at most 1463638 bytes (max_built_body_bytes)"),
        "{body}"
    );
    assert!(io.sent().is_empty(), "nothing sent");
    assert_eq!(
        io.tokens_asked.get(),
        0,
        "refused before a token is asked for"
    );
    // 100 KiB builds 600 KiB and some markup: sent.
    let io = rest_io().with_body(&vec![b'x'; 100 * 1024]);
    let (status, _, body, _) = run(&g, &request("POST", "/six", &[], true), &io);
    assert_eq!(status, 201, "{body}");
    assert_eq!(io.sent()[0].body.len(), 6 * 100 * 1024 + 49);
    // Escaping counts: 700 KiB of '<' is 2.8 MiB as XML.
    let io = rest_io().with_body(&vec![b'<'; 700 * 1024]);
    assert_eq!(run(&g, &request("POST", "/six", &[], true), &io).0, 413);
    assert!(io.sent().is_empty());
    // {body_base64} into at most 65536 bytes: 48,000 bytes fit (64,000 and the markup), 49,152
    // (within max_body_bytes) do not.
    let io = rest_io().with_body(&[7u8; 48_000]);
    assert_eq!(run(&g, &request("POST", "/b64", &[], true), &io).0, 201);
    assert_eq!(io.sent()[0].body.len(), 64_000 + 56);
    let io = rest_io().with_body(&[7u8; 49_152]);
    let (status, _, body, _) = run(&g, &request("POST", "/b64", &[], true), &io);
    assert_eq!(
        (status, problem_type(&body).as_str()),
        (413, "body-too-large")
    );
    assert!(io.sent().is_empty());
    // A JSON body: a body longer than the limit is not even read whole; one that escaping
    // makes longer is refused as it is written.
    let io = rest_io().with_body(&[b'a'; 2000]);
    let (status, _, body, _) = run(&g, &request("POST", "/json", &[], true), &io);
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("at most 1000 bytes (max_built_body_bytes)"),
        "{body}"
    );
    let io = rest_io().with_body(&[b'"'; 600]);
    assert_eq!(run(&g, &request("POST", "/json", &[], true), &io).0, 413);
    assert!(io.sent().is_empty());
    let io = rest_io().with_body(b"he said \"hi\"");
    assert_eq!(run(&g, &request("POST", "/json", &[], true), &io).0, 201);
    assert_eq!(
        String::from_utf8(io.sent()[0].body.clone()).unwrap(),
        r#"{"properties":{"text":"he said \"hi\""}}"#
    );
}

#[test]
fn a_followed_operation_shows_its_status_error_and_times_and_nothing_else() {
    let g = Gateway::load(BOUNDED_POLICY).unwrap();
    let azure_op = "https://management.azure.com/subscriptions/s1/providers/Microsoft.Web/locations/westeurope/operationResults/op-1?api-version=2022-09-01";
    let io = rest_io().reply(202, &[("azure-asyncoperation", azure_op)], "");
    let (status, headers, _, _) = run(&g, &request("POST", "/sites/a/start", &[], false), &io);
    assert_eq!(status, 202);
    let location = location_of(&headers);
    let answer = r#"{"id":"/subscriptions/s1/operationResults/op-1","name":"op-1","status":"Failed",
        "startTime":"2026-12-01T10:00:00Z","endTime":"2026-12-01T10:00:05Z","percentComplete":100,
        "error":{"code":"Conflict","message":"The site is busy.","details":[{"message":"secret-1"}]},
        "properties":{"connectionString":"secret-2"}}"#;
    let io = rest_io().reply(200, &[("content-type", "application/json")], answer);
    let (status, headers, body, _) = run(&g, &request("GET", &location, &[], false), &io);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        json!({"status": "Failed", "error": {"code": "Conflict", "message": "The site is busy."},
            "startTime": "2026-12-01T10:00:00Z", "endTime": "2026-12-01T10:00:05Z"})
    );
    assert!(headers.contains(&("content-type", "application/json".to_owned())));
    assert_eq!(
        *io.text_limits.borrow(),
        [65536],
        "read with the starting route's limit"
    );
    // Still running (Location polling): 202, no body, a new handle to follow.
    let io = rest_io().reply(202, &[("location", azure_op), ("retry-after", "5")], "");
    let (status, headers, body, _) = run(&g, &request("GET", &location, &[], false), &io);
    assert_eq!((status, body.as_str()), (202, ""));
    assert!(headers
        .iter()
        .any(|(k, v)| *k == "location" && v.starts_with("/ops/")));
    // An answer that is not JSON is not passed on.
    let io = rest_io().reply(200, &[("content-type", "text/plain")], "secret-3");
    let (status, _, body, _) = run(&g, &request("GET", &location, &[], false), &io);
    assert_eq!(status, 502, "{body}");
    assert!(!body.contains("secret-3"));
    // An answer too large to read is refused, not streamed.
    let io = rest_io().reply(
        200,
        &[("content-type", "application/json")],
        &big_answer(70_000),
    );
    let (status, _, body, _) = run(&g, &request("GET", &location, &[], false), &io);
    assert_eq!(
        (status, problem_type(&body).as_str()),
        (502, "backend-answer-too-large")
    );
}

// ---------------------------------------------------------------------------------------------
// Storage queue and Event Hubs routes

const MESSAGING_POLICY: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
      "client_id": "c", "credential": { "client_secret": { "secret": "GW_SECRET" } } } },
  "routes": [
    { "name": "jobs", "methods": ["POST"], "path": "/jobs", "public": true,
      "backend": { "storage_queue": { "account": "contosojobs", "queue": "jobs", "identity": "gw",
        "visibility_timeout_seconds": 30, "message_ttl_seconds": -1 } } },
    { "name": "notes", "methods": ["POST"], "path": "/notes", "public": true,
      "backend": { "storage_queue": { "account": "contosojobs", "queue": "notes", "identity": "gw",
        "encoding": "text", "max_body_bytes": 1024 } } },
    { "name": "telemetry", "methods": ["POST"], "path": "/telemetry/{device}", "public": true,
      "backend": { "event_hubs": { "namespace": "contoso-events", "hub": "telemetry", "identity": "gw",
        "partition_key": "{path.device}", "properties": { "device": "{path.device}" } } } },
    { "name": "telemetry-batch", "methods": ["POST"], "path": "/telemetry/{device}/batch", "public": true,
      "backend": { "event_hubs": { "namespace": "contoso-events", "hub": "telemetry", "identity": "gw",
        "partition_key": "{path.device}", "batch": true } } },
    { "name": "spread", "methods": ["POST"], "path": "/spread", "public": true,
      "backend": { "event_hubs": { "namespace": "contoso-events", "hub": "telemetry", "identity": "gw",
        "batch": true } } }
  ]
}"#;

fn messaging() -> Gateway {
    Gateway::load(MESSAGING_POLICY).unwrap_or_else(|e| panic!("{e:?}"))
}

const ENQUEUED: &str =
    "<?xml version=\"1.0\" encoding=\"utf-8\"?><QueueMessagesList><QueueMessage>\
    <MessageId>5974b586-0df3-4e2d-ad0c-18e3892bfca2</MessageId>\
    <InsertionTime>Tue, 14 Nov 2023 22:13:20 GMT</InsertionTime>\
    <ExpirationTime>Fri, 31 Dec 9999 23:59:59 GMT</ExpirationTime>\
    <PopReceipt>AgAAAAMAAAAAAAAA</PopReceipt>\
    <TimeNextVisible>Tue, 14 Nov 2023 22:13:50 GMT</TimeNextVisible>\
    </QueueMessage></QueueMessagesList>";

#[test]
fn a_queue_message_is_put_base64_encoded_and_answered_without_the_pop_receipt() {
    let body = b"\x00binary <&> \xff";
    let io = Fake::new().with_body(body).reply(201, &[], ENQUEUED);
    let head = request(
        "POST",
        "/jobs",
        &[("content-type", "application/octet-stream")],
        true,
    );
    let (status, _, answer, log) = run(&messaging(), &head, &io);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap(),
        json!({
            "status": "accepted", "queue": "jobs",
            "message_id": "5974b586-0df3-4e2d-ad0c-18e3892bfca2",
            "insertion_time": "Tue, 14 Nov 2023 22:13:20 GMT",
            "expiration_time": "Fri, 31 Dec 9999 23:59:59 GMT",
            "time_next_visible": "Tue, 14 Nov 2023 22:13:50 GMT"
        })
    );
    assert!(!answer.contains("AgAAAAMAAAAAAAAA"));
    let sent = io.sent();
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(
        (s.method, s.url.as_str()),
        (
            "POST",
            "https://contosojobs.queue.core.windows.net/jobs/messages?visibilitytimeout=30&messagettl=-1"
        )
    );
    assert_eq!(s.token.as_deref(), Some("token-for-gw"));
    assert_eq!(s.header("x-ms-version"), Some("2021-08-06"));
    assert!(s.header("x-ms-date").is_some_and(|d| d.ends_with(" GMT")));
    assert_eq!(
        s.header("content-type"),
        Some("application/xml; charset=utf-8")
    );
    let xml = String::from_utf8(s.body.clone()).unwrap();
    let text = xml
        .split_once("<MessageText>")
        .and_then(|(_, r)| r.split_once("</MessageText>"))
        .unwrap()
        .0;
    assert_eq!(
        azure_edge_gateway::encoding::base64_decode(text).unwrap(),
        body
    );
    assert_eq!(log["backend_status"], 201);
    assert_eq!(log["identity"], "gw");
}

#[test]
fn a_text_queue_message_is_escaped_and_a_body_xml_cannot_carry_is_refused_before_a_token() {
    let io = Fake::new()
        .with_body("a < b & c\r\n</MessageText>".as_bytes())
        .reply(201, &[], ENQUEUED);
    let (status, _, answer, _) = run(&messaging(), &request("POST", "/notes", &[], true), &io);
    assert_eq!(status, 202, "{answer}");
    let xml = String::from_utf8(io.sent()[0].body.clone()).unwrap();
    assert!(
        xml.contains("<MessageText>a &lt; b &amp; c&#xD;\n&lt;/MessageText&gt;</MessageText>"),
        "{xml}"
    );
    for bad in [&b"\xc3\x28"[..], b"bell\x07"] {
        let io = Fake::new().with_body(bad);
        let (status, headers, answer, log) =
            run(&messaging(), &request("POST", "/notes", &[], true), &io);
        assert_eq!(status, 400, "{answer}");
        assert!(headers.contains(&("content-type", "application/problem+json".to_owned())));
        assert_eq!(log["problem"], "bad-message");
        assert_eq!(io.tokens_asked.get(), 0);
        assert!(io.sent().is_empty());
    }
}

#[test]
fn a_queue_body_over_the_limit_is_413_before_a_token_with_or_without_a_length() {
    // Base64: 49152 bytes fit Azure's 64 KiB once encoded, 49153 do not.
    let g = messaging();
    let io = Fake::new().with_body(&[7u8; 49_153]);
    let declared = request("POST", "/jobs", &[("content-length", "49153")], true);
    let (status, _, answer, _) = run(&g, &declared, &io);
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("at most 49152"), "{answer}");
    let undeclared = request("POST", "/jobs", &[], true);
    assert_eq!(run(&g, &undeclared, &io).0, 413);
    assert_eq!(io.tokens_asked.get(), 0);
    assert!(io.sent().is_empty());
    let io = Fake::new()
        .with_body(&[7u8; 49_152])
        .reply(201, &[], ENQUEUED);
    assert_eq!(run(&g, &undeclared, &io).0, 202);
    assert_eq!(io.sent()[0].body.len() - ENVELOPE.len(), 65_536);
}

const ENVELOPE: &str = "<?xml version=\"1.0\" encoding=\"utf-8\"?><QueueMessage><MessageText></MessageText></QueueMessage>";

#[test]
fn queue_storage_refusals_are_mapped_and_its_reason_goes_to_the_log() {
    let error = "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthorizationPermissionMismatch</Code>\
        <Message>This request is not authorized to perform this operation using this permission.\nRequestId:1\nTime:2</Message></Error>";
    let io = Fake::new().with_body(b"job").reply(
        403,
        &[("x-ms-error-code", "AuthorizationPermissionMismatch")],
        error,
    );
    let (status, _, answer, log) = run(&messaging(), &request("POST", "/jobs", &[], true), &io);
    assert_eq!(status, 502, "{answer}");
    assert!(answer.contains("backend-authorization-failed"), "{answer}");
    assert!(
        !answer.contains("AuthorizationPermissionMismatch"),
        "{answer}"
    );
    assert!(!answer.contains("not authorized"), "{answer}");
    assert_eq!(
        log["backend_detail"],
        "AuthorizationPermissionMismatch: This request is not authorized to perform this operation using this permission."
    );
    assert_eq!(log["backend_status"], 403);

    // A 401 is replayed once with a fresh token; a second is the caller's 502.
    let io = Fake::new()
        .with_body(b"job")
        .reply(401, &[], "")
        .reply(401, &[], "");
    assert_eq!(
        run(&messaging(), &request("POST", "/jobs", &[], true), &io).0,
        502
    );
    assert_eq!(
        *io.evicted.borrow(),
        vec!["token-for-gw".to_owned(), "token-for-gw-2".to_owned()]
    );

    let io = Fake::new()
        .with_body(b"job")
        .reply(404, &[("x-ms-error-code", "QueueNotFound")], "");
    let (status, _, answer, _) = run(&messaging(), &request("POST", "/jobs", &[], true), &io);
    assert_eq!(status, 502);
    assert!(answer.contains("no queue 'jobs'"), "{answer}");
}

#[test]
fn a_busy_queue_is_retried_with_the_same_body_then_503_with_retry_after() {
    let io = Fake::new()
        .with_body(b"job")
        .reply(503, &[("retry-after", "1")], "")
        .reply(201, &[], ENQUEUED);
    assert_eq!(
        run(&messaging(), &request("POST", "/jobs", &[], true), &io).0,
        202
    );
    let sent = io.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].body, sent[1].body);

    let mut io = Fake::new().with_body(b"job");
    for _ in 0..5 {
        io = io.reply(503, &[("retry-after", "2")], "");
    }
    let (status, headers, answer, _) = run(&messaging(), &request("POST", "/jobs", &[], true), &io);
    assert_eq!(status, 503, "{answer}");
    assert!(headers.contains(&("retry-after", "2".to_owned())));
    assert!(answer.contains("Queue Storage is unavailable"), "{answer}");
    assert_eq!(io.sent().len(), 3, "three attempts");
}

#[test]
fn a_queue_message_whose_outcome_is_unknown_is_not_sent_again() {
    // 500 OperationTimedOut: Storage says the operation may or may not have completed.
    let io = Fake::new()
        .with_body(b"job")
        .reply(500, &[("x-ms-error-code", "OperationTimedOut")], "")
        .reply(201, &[], ENQUEUED);
    let (status, headers, answer, log) =
        run(&messaging(), &request("POST", "/jobs", &[], true), &io);
    assert_eq!(status, 502, "{answer}");
    assert!(answer.contains("backend-outcome-unknown"), "{answer}");
    assert!(
        !headers.iter().any(|(k, _)| *k == "retry-after"),
        "no invitation to resend"
    );
    assert_eq!(io.sent().len(), 1, "Put Message is not sent twice");
    assert_eq!(log["problem"], "backend-outcome-unknown");
    // A timeout: 504, the same.
    let io = Fake::new().with_body(b"job");
    io.replies.borrow_mut().push_back(Err(SendError::Timeout));
    let (status, _, answer, _) = run(&messaging(), &request("POST", "/jobs", &[], true), &io);
    assert_eq!(status, 504, "{answer}");
    assert!(answer.contains("backend-outcome-unknown"), "{answer}");
    assert_eq!(io.sent().len(), 1);
}

#[test]
fn an_event_carries_the_routes_partition_key_and_properties_and_no_message_id() {
    let io = Fake::new().with_body(br#"{"t":21.5}"#);
    let head = request(
        "POST",
        "/telemetry/dev-7",
        &[
            ("content-type", "application/json"),
            ("idempotency-key", "k1"),
        ],
        true,
    );
    let (status, _, answer, log) = run(&messaging(), &head, &io);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap(),
        json!({"status": "accepted", "hub": "telemetry", "count": 1})
    );
    let s = &io.sent()[0];
    assert_eq!(
        s.url,
        "https://contoso-events.servicebus.windows.net/telemetry/messages"
    );
    assert_eq!(
        s.header("brokerproperties"),
        Some(r#"{"PartitionKey":"dev-7"}"#)
    );
    assert_eq!(s.header("device"), Some("dev-7"));
    assert_eq!(s.header("content-type"), Some("application/json"));
    assert_eq!(s.body, br#"{"t":21.5}"#);
    assert_eq!(log["backend_status"], 201);
}

#[test]
fn a_batch_of_events_is_one_send_and_a_service_bus_property_stops_it_before_a_token() {
    let io = Fake::new()
        .with_body(br#"[{"Body": {"t": 1}}, {"Body": "two", "UserProperties": {"n": 2}}]"#);
    let (status, _, answer, _) = run(
        &messaging(),
        &request("POST", "/telemetry/dev-7/batch", &[], true),
        &io,
    );
    assert_eq!(status, 202, "{answer}");
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["count"], 2);
    let s = &io.sent()[0];
    assert_eq!(
        s.header("content-type"),
        Some("application/vnd.microsoft.servicebus.json")
    );
    let batch: Value = serde_json::from_slice(&s.body).unwrap();
    assert_eq!(
        batch[0]["BrokerProperties"],
        json!({"PartitionKey": "dev-7"})
    );
    assert_eq!(batch[1]["UserProperties"], json!({"n": "2"}));

    for (path, body, expected) in [
        (
            "/spread",
            r#"[{"Body": "a"}, {"Body": "b", "BrokerProperties": {"SessionId": "s"}}]"#,
            "batch[1].BrokerProperties.SessionId is a Service Bus property",
        ),
        (
            "/telemetry/dev-7/batch",
            r#"[{"Body": "a", "BrokerProperties": {"PartitionKey": "dev-8"}}]"#,
            "batch[0].BrokerProperties.PartitionKey is set by this route",
        ),
    ] {
        let io = Fake::new().with_body(body.as_bytes());
        let (status, _, answer, _) = run(&messaging(), &request("POST", path, &[], true), &io);
        assert_eq!(status, 400, "{answer}");
        let problem: Value = serde_json::from_str(&answer).unwrap();
        assert!(
            problem["detail"].as_str().unwrap().starts_with(expected),
            "{answer}"
        );
        assert_eq!(problem["title"], "The event would be refused by Event Hubs");
        assert_eq!(io.tokens_asked.get(), 0);
        assert!(io.sent().is_empty());
    }
    // Without a route key, an element picks its own partition key.
    let io =
        Fake::new().with_body(br#"[{"Body": "a", "BrokerProperties": {"PartitionKey": "p"}}]"#);
    assert_eq!(
        run(&messaging(), &request("POST", "/spread", &[], true), &io).0,
        202
    );
}

// ---------------------------------------------------------------------------------------------
// A refused token (issue 13): replayed once with a fresh token

#[test]
fn a_401_is_replayed_once_with_a_fresh_token_and_the_same_bytes_and_message_id() {
    let io = with_secrets(Fake::new())
        .with_body(b"payload")
        .reply(
            401,
            &[],
            "<Error><Code>401</Code><Detail>ExpiredToken</Detail></Error>",
        )
        .reply(201, &[], "");
    let head = request(
        "POST",
        "/orders/a",
        &[("x-api-key", "k-123"), ("x-label", "l")],
        true,
    );
    let (status, _, _, log) = run(&gateway(), &head, &io);
    assert_eq!(status, 202);
    let sent = io.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].token.as_deref(), Some("token-for-gw"));
    assert_eq!(
        sent[1].token.as_deref(),
        Some("token-for-gw-2"),
        "a fresh token"
    );
    assert_eq!(sent[0].body, sent[1].body);
    assert_eq!(
        sent[0].header("brokerproperties"),
        sent[1].header("brokerproperties")
    );
    assert_eq!(*io.evicted.borrow(), vec!["token-for-gw".to_owned()]);
    assert_eq!(log["token_renewed"], true);
    assert_eq!(io.tokens_asked.get(), 2);
}

#[test]
fn a_second_401_is_the_caller_s_502_and_no_third_send() {
    let io = with_secrets(Fake::new())
        .with_body(b"payload")
        .reply(401, &[], "")
        .reply(401, &[], "");
    let head = request(
        "POST",
        "/orders/a",
        &[("x-api-key", "k-123"), ("x-label", "l")],
        true,
    );
    let (status, _, _, log) = run(&gateway(), &head, &io);
    assert_eq!(status, 502);
    assert_eq!(io.sent().len(), 2);
    assert_eq!(
        io.evicted.borrow().len(),
        2,
        "both refused tokens are evicted"
    );
    assert_eq!(log["backend_status"], 401);
}

#[test]
fn a_401_to_a_streamed_body_is_not_replayed_and_the_caller_is_told_so() {
    let body = vec![7u8; 50_000];
    let io = Fake::new().with_body(&body).reply(401, &[], "");
    let head = request("PUT", "/files/a.bin", &[("content-length", "50000")], true);
    let (status, headers, text, _) = run(&gateway(), &head, &io);
    assert_eq!(status, 503);
    assert!(headers.contains(&("retry-after", "1".to_owned())));
    assert!(text.contains("token-refused"), "{text}");
    assert!(text.contains("cannot be sent again"));
    assert_eq!(io.sent().len(), 1, "the stream went once");
    assert_eq!(io.evicted.borrow().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// The circuit breaker (issue 13)

#[test]
fn a_host_that_keeps_failing_is_not_called_until_the_cool_down_then_one_probe_closes_it() {
    let g = gateway();
    let mut io = with_secrets(Fake::new()).with_body(b"payload");
    for _ in 0..200 {
        io = io.reply(503, &[], "");
    }
    let head = request(
        "POST",
        "/orders/a",
        &[("x-api-key", "k-123"), ("x-label", "l")],
        true,
    );
    for i in 0..5 {
        io.body_pos.set(0);
        let (status, _, _, log) = run(&g, &head, &io);
        assert_eq!(status, 503, "request {i}");
        assert_eq!(log["breaker"], "closed");
    }
    let sends = io.sent().len();
    let (status, headers, body, log) = run(&g, &head, &io);
    assert_eq!(status, 503);
    assert!(body.contains("backend-circuit-open"), "{body}");
    assert!(headers
        .iter()
        .any(|(k, v)| *k == "retry-after" && v.parse::<u64>().unwrap() <= 30));
    assert_eq!(log["breaker"], "open");
    assert_eq!(io.sent().len(), sends, "nothing sent while open");
    // After the cool-down: one probe; Azure is back, so the breaker closes.
    io.replies.borrow_mut().clear();
    io.clock.set(io.clock.get() + 31_000.0);
    io.body_pos.set(0);
    let (status, _, _, log) = run(&g, &head, &io);
    assert_eq!(status, 202);
    assert_eq!(log["breaker"], "probe");
    io.body_pos.set(0);
    let (_, _, _, log) = run(&g, &head, &io);
    assert_eq!(log["breaker"], "closed");
}

#[test]
fn refusals_of_the_request_itself_do_not_open_the_breaker() {
    let g = gateway();
    let mut io = with_secrets(Fake::new()).with_body(b"payload");
    for _ in 0..10 {
        io = io.reply(400, &[], "<Error><Detail>bad</Detail></Error>");
    }
    let head = request(
        "POST",
        "/orders/a",
        &[("x-api-key", "k-123"), ("x-label", "l")],
        true,
    );
    for _ in 0..8 {
        io.body_pos.set(0);
        let (status, _, _, log) = run(&g, &head, &io);
        assert_ne!(status, 503);
        assert_eq!(log["breaker"], "closed");
    }
}

// ---------------------------------------------------------------------------------------------
// Store-and-forward (issue 13)

const STORE_POLICY: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
      "client_id": "c", "credential": { "client_secret": { "secret": "GW_SECRET" } } } },
  "store_and_forward": { "binding": "DELIVERIES", "max_attempts": 3 },
  "routes": [
    { "name": "orders", "methods": ["POST"], "path": "/orders/{tenant}", "public": true,
      "when_unavailable": "queue",
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "orders", "identity": "gw",
        "duplicate_detection": true } } },
    { "name": "files", "methods": ["PUT"], "path": "/files/{name}", "public": true,
      "when_unavailable": "queue",
      "backend": { "blob": { "account": "contosofiles", "container": "uploads", "blob": "{path.name}", "identity": "gw" } } },
    { "name": "plain", "methods": ["POST"], "path": "/plain/{tenant}", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-other", "queue": "orders", "identity": "gw" } } }
  ]
}"#;

fn store_gateway() -> Gateway {
    Gateway::load(STORE_POLICY).unwrap_or_else(|e| panic!("{e:?}"))
}

fn unavailable(io: Fake, n: usize) -> Fake {
    (0..n).fold(io, |io, _| io.reply(503, &[], ""))
}

#[test]
fn a_send_azure_cannot_take_is_queued_with_its_message_id_and_the_caller_gets_202_queued() {
    let g = store_gateway();
    let io = unavailable(Fake::new().with_body(b"order-1"), 20);
    let head = request("POST", "/orders/a", &[("idempotency-key", "order-1")], true);
    let (status, _, body, log) = run(&g, &head, &io);
    assert_eq!(status, 202, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "queued");
    assert_eq!(body["messageId"], "order-1");
    assert_eq!(log["stored"], "queued");
    assert_eq!(log["unavailable"], "backend-unavailable");
    let enqueued = io.enqueued.borrow();
    assert_eq!(enqueued.len(), 1);
    let (binding, stored, bytes) = &enqueued[0];
    assert_eq!(binding, "DELIVERIES");
    assert_eq!(bytes, b"order-1");
    let stored: Value = serde_json::from_str(stored).unwrap();
    assert_eq!(stored["route"], "orders");
    assert_eq!(
        stored["url"],
        "https://contoso-orders.servicebus.windows.net/orders/messages"
    );
    assert!(
        stored["headers"]
            .to_string()
            .contains(r#"\"MessageId\":\"order-1\""#),
        "{stored}"
    );
    assert!(
        !stored.to_string().contains("token-for"),
        "no token is stored"
    );
    // A route without store-and-forward answers 503 as before.
    let io = unavailable(Fake::new().with_body(b"x"), 20);
    let (status, _, _, _) = run(&g, &request("POST", "/plain/a", &[], true), &io);
    assert_eq!(status, 503);
    assert!(io.enqueued.borrow().is_empty());
}

#[test]
fn with_the_breaker_open_or_the_identity_provider_down_requests_are_queued_without_a_send() {
    let g = store_gateway();
    // Open the breaker with five failed calls (each stored).
    for _ in 0..5 {
        let io = unavailable(Fake::new().with_body(b"x"), 20);
        assert_eq!(
            run(&g, &request("POST", "/orders/a", &[], true), &io).0,
            202
        );
    }
    let io = Fake::new().with_body(b"y");
    let (status, _, _, log) = run(&g, &request("POST", "/orders/a", &[], true), &io);
    assert_eq!(status, 202);
    assert_eq!(log["breaker"], "open");
    assert_eq!(log["unavailable"], "backend-circuit-open");
    assert!(io.sent().is_empty());
    assert_eq!(io.enqueued.borrow().len(), 1);
    // The identity provider is down and no token is cached.
    let g = store_gateway();
    let mut io = Fake::new().with_body(b"z");
    io.no_token = Some(Problem::new(503, "identity-unavailable", "t", "d"));
    let (status, _, _, _) = run(&g, &request("POST", "/orders/a", &[], true), &io);
    assert_eq!(status, 202);
    assert!(io.sent().is_empty());
    assert_eq!(io.enqueued.borrow().len(), 1);
}

#[test]
fn a_create_only_blob_write_is_held_stored_and_delivered_once() {
    let g = store_gateway();
    let io = unavailable(Fake::new().with_body(b"file-bytes"), 20);
    let head = request("PUT", "/files/a.txt", &[("content-length", "10")], true);
    let (status, _, body, _) = run(&g, &head, &io);
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"status\":\"queued\""), "{body}");
    let (_, stored, bytes) = io.enqueued.borrow()[0].clone();
    assert_eq!(bytes, b"file-bytes");
    assert!(
        stored.contains("If-None-Match") || stored.contains("if-none-match"),
        "{stored}"
    );
    // Delivered: the same request, a fresh token; a second delivery meets 409 (or 412) and
    // counts as done, never as a dead letter.
    let io = Fake::new().reply(201, &[], "");
    let (outcome, line) = block_on(g.deliver(&stored, OutBody::Bytes(&bytes), 1, &io));
    assert_eq!(outcome, Delivered::Yes, "{line}");
    let sent = io.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].body, b"file-bytes");
    assert_eq!(
        sent[0].url,
        "https://contosofiles.blob.core.windows.net/uploads/a.txt"
    );
    assert_eq!(sent[0].header("if-none-match"), Some("*"));
    assert!(sent[0].token.is_some());
    for (status, code) in [(409, "BlobAlreadyExists"), (412, "ConditionNotMet")] {
        let io = Fake::new().reply(status, &[("x-ms-error-code", code)], "");
        let (outcome, line) = block_on(g.deliver(&stored, OutBody::Bytes(&bytes), 2, &io));
        assert_eq!(outcome, Delivered::Yes, "{status}: {line}");
        assert!(io.dead_letters.borrow().is_empty());
    }
}

/// A delivery's stored request, queued by a request Service Bus could not take.
fn queued_send(g: &Gateway, key: &str) -> (String, Vec<u8>) {
    let io = unavailable(Fake::new().with_body(b"m"), 20);
    let head = request("POST", "/orders/a", &[("idempotency-key", key)], true);
    assert_eq!(run(g, &head, &io).0, 202);
    let (_, stored, bytes) = io.enqueued.borrow()[0].clone();
    (stored, bytes)
}

#[test]
fn deliveries_retry_while_azure_is_down_and_the_last_attempt_is_dead_lettered_with_its_reason() {
    let g = store_gateway();
    let (stored, bytes) = queued_send(&g, "k1");
    let io = Fake::new().reply(503, &[("retry-after", "7")], "");
    let (outcome, line) = block_on(g.deliver(&stored, OutBody::Bytes(&bytes), 1, &io));
    assert_eq!(outcome, Delivered::Later(7));
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["outcome"], "retry");
    assert_eq!(line["request_id"].as_str().map(str::len), Some(36));
    assert!(io.dead_letters.borrow().is_empty());
    // The last attempt (max_attempts 3) fails too: on the dead-letter queue, with why.
    let io = Fake::new().reply(503, &[], "");
    let (outcome, line) = block_on(g.deliver(&stored, OutBody::Bytes(&bytes), 3, &io));
    assert_eq!(outcome, Delivered::DeadLettered, "{line}");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["outcome"], "dead_lettered");
    assert_eq!(line["level"], "error");
    assert_eq!(
        line["reason"],
        "its last attempt (3) failed: Azure answered 503"
    );
    let letters = io.dead_letters.borrow();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0, "DEAD_LETTERS", "the default binding");
    assert_eq!(letters[0].1["reason"], line["reason"]);
    assert_eq!(letters[0].1["attempts"], 3);
    assert_eq!(letters[0].1["backend_status"], 503);
    // A delivery Azure takes.
    let io = Fake::new();
    let (outcome, _) = block_on(g.deliver(&stored, OutBody::Bytes(&bytes), 2, &io));
    assert_eq!(outcome, Delivered::Yes);
    assert_eq!(
        io.sent()[0]
            .header("brokerproperties")
            .map(|p| p.contains("k1")),
        Some(true)
    );
}

#[test]
fn a_queued_send_azure_refuses_at_delivery_is_dead_lettered_with_its_reason_not_dropped() {
    let g = store_gateway();
    let (stored, bytes) = queued_send(&g, "k403");
    let caller: Value = serde_json::from_str(&stored).unwrap();
    let io = Fake::new().reply(
        403,
        &[],
        "<Error><Code>403</Code><Detail>Unauthorized: 'Send' claim(s) are required</Detail></Error>",
    );
    let (outcome, line) = block_on(g.deliver(&stored, OutBody::Bytes(&bytes), 1, &io));
    // Acknowledged off the deliveries queue only because it is on the dead-letter queue.
    assert_eq!(outcome, Delivered::DeadLettered, "{line}");
    assert_eq!(io.sent().len(), 1, "sent once, not retried");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["outcome"], "dead_lettered");
    assert_eq!(line["reason"], "Azure refused it (403)");
    assert_eq!(line["backend_status"], 403);
    let letters = io.dead_letters.borrow();
    assert_eq!(letters.len(), 1, "one dead letter");
    let (binding, letter) = &letters[0];
    assert_eq!(binding, "DEAD_LETTERS");
    assert_eq!(letter["reason"], "Azure refused it (403)");
    assert_eq!(letter["backend_status"], 403);
    assert!(
        letter["backend_detail"]
            .as_str()
            .is_some_and(|d| d.contains("'Send' claim(s) are required")),
        "{letter}"
    );
    assert_eq!(letter["route"], "orders");
    assert_eq!(letter["request_id"], caller["request_id"]);
    assert_eq!(letter["ids"], json!(["k403"]));
    assert_eq!(letter["attempts"], 1);
    assert!(
        letter["at"]
            .as_str()
            .is_some_and(|at| at.starts_with("2023-11-14T") && at.ends_with('Z')),
        "{letter}"
    );
    for text in [letter.to_string(), line.to_string()] {
        assert!(!text.contains("token-for"), "no token: {text}");
    }
}

#[test]
fn when_the_dead_letter_queue_does_not_take_it_the_message_stays_on_the_queue() {
    let g = store_gateway();
    let (stored, bytes) = queued_send(&g, "k-stays");
    let mut io = Fake::new().reply(400, &[], "bad");
    io.dead_letter_refused = Some("no queue binding DEAD_LETTERS".into());
    let (outcome, line) = block_on(g.deliver(&stored, OutBody::Bytes(&bytes), 1, &io));
    assert_eq!(outcome, Delivered::Later(10), "retried, not acknowledged");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["outcome"], "retry");
    assert!(
        line["reason"].as_str().is_some_and(|r| r.starts_with(
            "Azure refused it (400); the dead-letter queue did not take it (no queue binding DEAD_LETTERS)"
        )),
        "{line}"
    );
    // After the last attempt the queue's own dead-lettering keeps it; the line says so.
    let mut io = Fake::new().reply(400, &[], "bad");
    io.dead_letter_refused = Some("too large".into());
    let (outcome, line) = block_on(g.deliver(&stored, OutBody::Bytes(&bytes), 3, &io));
    assert!(matches!(outcome, Delivered::Later(_)), "{line}");
    assert!(
        line.contains("\"outcome\":\"dead_letter_by_queue\""),
        "{line}"
    );
}

/// Delivers a stored request (as JSON, after `tamper`) and asserts it is dead-lettered with a
/// reason containing `why`, and that nothing is sent and no token is asked for.
#[track_caller]
fn assert_dead_lettered_unsent(g: &Gateway, stored: &Value, why: &str) {
    let io = Fake::new();
    let (outcome, line) =
        block_on(g.deliver(&stored.to_string(), OutBody::Bytes(&b"m".to_vec()), 1, &io));
    assert_eq!(outcome, Delivered::DeadLettered, "{line}");
    assert!(io.sent().is_empty(), "nothing sent: {line}");
    assert_eq!(io.tokens_asked.get(), 0, "no token asked for: {line}");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["outcome"], "dead_lettered");
    let reason = line["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(why), "{reason:?} should contain {why:?}");
    let letters = io.dead_letters.borrow();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1["reason"], reason);
    assert!(letters[0].1.get("backend_status").is_none(), "never sent");
}

/// `stored` with `change` made to it.
fn tampered(stored: &str, change: impl FnOnce(&mut Value)) -> Value {
    let mut v: Value = serde_json::from_str(stored).unwrap();
    change(&mut v);
    v
}

/// The stored request with one more header.
fn with_header(stored: &str, name: &str, value: &str) -> Value {
    tampered(stored, |v| {
        v["headers"]
            .as_array_mut()
            .unwrap()
            .push(json!([name, value]))
    })
}

#[test]
fn a_stored_send_is_delivered_only_as_its_route_sends_it_today() {
    let g = store_gateway();
    let (stored, _) = queued_send(&g, "k1");
    let entity = "https://contoso-orders.servicebus.windows.net/orders/messages";
    let cases: Vec<(&str, Value)> = vec![
        // Another producer's DELETE of the queue's head (it would remove real messages).
        (
            "its method is \"DELETE\"; route \"orders\" sends POST",
            tampered(&stored, |v| {
                v["method"] = json!("DELETE");
                v["url"] = json!(format!("{entity}/head"));
            }),
        ),
        (
            "its URL is \"https://contoso-orders.servicebus.windows.net/audit/messages\"; route \"orders\" sends to https://contoso-orders.servicebus.windows.net/orders/messages",
            tampered(&stored, |v| {
                v["url"] = json!("https://contoso-orders.servicebus.windows.net/audit/messages")
            }),
        ),
        (
            "its URL is \"https://attacker.servicebus.windows.net/orders/messages\"",
            tampered(&stored, |v| {
                v["url"] = json!("https://attacker.servicebus.windows.net/orders/messages")
            }),
        ),
        (
            "its URL is \"https://contoso-orders.servicebus.windows.net/orders/messages?timeout=1\"",
            tampered(&stored, |v| v["url"] = json!(format!("{entity}?timeout=1"))),
        ),
        (
            "it carries the header \"authorization\", which route \"orders\" does not send",
            with_header(&stored, "authorization", "Bearer stolen"),
        ),
        (
            "it carries the header \"Content-Type\" twice",
            with_header(&stored, "Content-Type", "text/plain"),
        ),
        (
            "it has no BrokerProperties with a MessageId",
            tampered(&stored, |v| {
                v["headers"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|h| h[0] != "brokerproperties")
            }),
        ),
        (
            "it has no BrokerProperties with a MessageId",
            tampered(&stored, |v| {
                v["headers"] = json!([["brokerproperties", "{\"Label\":\"x\"}"]])
            }),
        ),
        (
            "its BrokerProperties set \"ReplyTo\" as route \"orders\" does not",
            tampered(&stored, |v| {
                v["headers"] = json!([[
                    "brokerproperties",
                    "{\"MessageId\":\"k1\",\"ReplyTo\":\"elsewhere\"}"
                ]])
            }),
        ),
        (
            "it is in format 2; this gateway reads format 1",
            tampered(&stored, |v| v["v"] = json!(2)),
        ),
        (
            "its route \"nope\" is no longer in the policy",
            tampered(&stored, |v| v["route"] = json!("nope")),
        ),
        (
            "route \"plain\" no longer stores requests",
            tampered(&stored, |v| v["route"] = json!("plain")),
        ),
    ];
    for (why, stored) in &cases {
        assert_dead_lettered_unsent(&g, stored, why);
    }
    // An unreadable message too: dead-lettered (the edge keeps the message whole), not dropped.
    let io = Fake::new();
    let (outcome, line) = block_on(g.deliver("{\"not\":\"stored\"}", OutBody::None, 1, &io));
    assert_eq!(outcome, Delivered::DeadLettered, "{line}");
    assert!(io.sent().is_empty());
    assert_eq!(
        io.dead_letters.borrow()[0].1["reason"],
        "it is not a stored request this gateway can read"
    );
}

#[test]
fn a_policy_change_since_a_send_was_stored_dead_letters_it_instead_of_sending_it_elsewhere() {
    let (stored, _) = queued_send(&store_gateway(), "k1");
    // The route now sends to another queue, another namespace, or no longer stores requests.
    for (change, why) in [
        (
            ("\"queue\": \"orders\"", "\"queue\": \"orders-v2\""),
            "route \"orders\" sends to https://contoso-orders.servicebus.windows.net/orders-v2/messages",
        ),
        (
            ("\"namespace\": \"contoso-orders\", \"queue\": \"orders\"", "\"namespace\": \"contoso-new\", \"queue\": \"orders\""),
            "route \"orders\" sends to https://contoso-new.servicebus.windows.net/orders/messages",
        ),
        (
            ("\"when_unavailable\": \"queue\",\n      \"backend\": { \"service_bus\"", "\"backend\": { \"service_bus\""),
            "route \"orders\" no longer stores requests",
        ),
    ] {
        let policy = STORE_POLICY.replacen(change.0, change.1, 1);
        assert_ne!(policy, STORE_POLICY, "{change:?}");
        let g = Gateway::load(&policy).unwrap_or_else(|e| panic!("{e:?}"));
        let stored: Value = serde_json::from_str(&stored).unwrap();
        assert_dead_lettered_unsent(&g, &stored, why);
    }
    // A dead letter goes to the binding the policy names.
    let policy = STORE_POLICY.replacen(
        "\"max_attempts\": 3 }",
        "\"max_attempts\": 3, \"dead_letter_binding\": \"REFUSED\" }",
        1,
    );
    let g = Gateway::load(&policy).unwrap_or_else(|e| panic!("{e:?}"));
    let io = Fake::new();
    let gone = stored.replace("\"route\":\"orders\"", "\"route\":\"nope\"");
    let (outcome, _) = block_on(g.deliver(&gone, OutBody::None, 1, &io));
    assert_eq!(outcome, Delivered::DeadLettered);
    assert_eq!(io.dead_letters.borrow()[0].0, "REFUSED");
}

const BLOB_STORE_POLICY: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
      "client_id": "c", "credential": { "client_secret": { "secret": "GW_SECRET" } } } },
  "routes": [
    { "name": "files", "methods": ["PUT"], "path": "/files/{tenant}/{name}", "public": true,
      "when_unavailable": "queue",
      "backend": { "blob": { "account": "contosofiles", "container": "uploads",
        "blob": "in/{path.tenant}/{path.name}.bin", "identity": "gw",
        "metadata": { "tenant": "{path.tenant}" } } } }
  ]
}"#;

#[test]
fn a_stored_blob_write_is_delivered_only_as_its_route_writes_today_with_a_fresh_date() {
    let g = Gateway::load(BLOB_STORE_POLICY).unwrap_or_else(|e| panic!("{e:?}"));
    let io = unavailable(Fake::new().with_body(b"file-bytes"), 20);
    let head = request("PUT", "/files/north/a b", &[("content-length", "10")], true);
    assert_eq!(run(&g, &head, &io).0, 202);
    let (_, stored, bytes) = io.enqueued.borrow()[0].clone();
    let url = "https://contosofiles.blob.core.windows.net/uploads/in/north/a%20b.bin";
    assert!(stored.contains(url), "{stored}");
    // As stored, it goes, with the gateway's own headers made for the time it is sent.
    let io = Fake::new();
    io.clock.set(1_800_000_000_000.0);
    let (outcome, line) = block_on(g.deliver(&stored, OutBody::Bytes(&bytes), 1, &io));
    assert_eq!(outcome, Delivered::Yes, "{line}");
    let sent = io.sent();
    assert_eq!(sent[0].url, url);
    assert_eq!(sent[0].method, "PUT");
    assert_eq!(sent[0].header("x-ms-meta-tenant"), Some("north"));
    assert_eq!(sent[0].header("if-none-match"), Some("*"));
    assert_eq!(
        sent[0].header("x-ms-date"),
        Some("Fri, 15 Jan 2027 08:00:00 GMT"),
        "the date it is sent, not the date it was stored"
    );
    assert_eq!(
        sent[0]
            .headers
            .iter()
            .filter(|(k, _)| k == "x-ms-date")
            .count(),
        1
    );
    let header_list = |v: &mut Value| v["headers"].as_array_mut().unwrap().clone();
    let cases: Vec<(&str, Value)> = vec![
        (
            "its method is \"POST\"; route \"files\" sends PUT",
            tampered(&stored, |v| v["method"] = json!("POST")),
        ),
        (
            "its method is \"DELETE\"",
            tampered(&stored, |v| v["method"] = json!("DELETE")),
        ),
        (
            "not a blob in route \"files\"'s container https://contosofiles.blob.core.windows.net/uploads",
            tampered(&stored, |v| {
                v["url"] = json!(url.replace("/uploads/", "/secrets/"))
            }),
        ),
        (
            "not a blob in route \"files\"'s container",
            tampered(&stored, |v| v["url"] = json!(format!("{url}?comp=block&blockid=AA"))),
        ),
        (
            "not a blob in route \"files\"'s container",
            tampered(&stored, |v| v["url"] = json!(url.replace("%20", " "))),
        ),
        (
            "its blob name \"out/north/a b.bin\" is not one route \"files\"'s name template \"in/{path.tenant}/{path.name}.bin\" makes",
            tampered(&stored, |v| v["url"] = json!(url.replace("/in/", "/out/"))),
        ),
        (
            "it is not create-only (no If-None-Match: *)",
            tampered(&stored, |v| {
                let kept: Vec<Value> = header_list(v)
                    .into_iter()
                    .filter(|h| h[0] != "if-none-match")
                    .collect();
                v["headers"] = json!(kept);
            }),
        ),
        (
            "it carries the header \"x-ms-meta-owner\", which route \"files\" does not send",
            with_header(&stored, "x-ms-meta-owner", "mallory"),
        ),
        (
            "it carries the header \"x-ms-delete-snapshots\"",
            with_header(&stored, "x-ms-delete-snapshots", "include"),
        ),
        (
            "its x-ms-blob-type is not BlockBlob",
            tampered(&stored, |v| {
                let changed: Vec<Value> = header_list(v)
                    .into_iter()
                    .map(|h| {
                        if h[0] == "x-ms-blob-type" {
                            json!(["x-ms-blob-type", "AppendBlob"])
                        } else {
                            h
                        }
                    })
                    .collect();
                v["headers"] = json!(changed);
            }),
        ),
    ];
    for (why, stored) in &cases {
        assert_dead_lettered_unsent(&g, stored, why);
    }
    // A route that now overwrites cannot store (the policy check refuses it), so the write it
    // stored before is dead-lettered, not sent without its create-only condition.
    let changed = BLOB_STORE_POLICY.replacen("\"when_unavailable\": \"queue\",", "", 1);
    let g = Gateway::load(&changed).unwrap_or_else(|e| panic!("{e:?}"));
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert_dead_lettered_unsent(&g, &stored, "route \"files\" no longer stores requests");
}

#[test]
fn uploads_that_stall_or_break_on_the_caller_s_side_do_not_open_the_breaker() {
    let g = gateway();
    let body = vec![1u8; 50_000];
    let head = request("PUT", "/files/a.bin", &[("content-length", "50000")], true);
    for _ in 0..8 {
        let io = Fake::new().with_body(&body);
        io.replies
            .borrow_mut()
            .push_back(Err(SendError::Network("the caller's stream broke".into())));
        let (status, _, _, log) = run(&g, &head, &io);
        assert_eq!(status, 503);
        assert_eq!(log["breaker"], "closed");
    }
    // Azure is still called for the next caller.
    let io = Fake::new().with_body(&body);
    let (status, _, _, log) = run(&g, &head, &io);
    assert_eq!(status, 201);
    assert_eq!(log["breaker"], "closed");
    assert_eq!(io.sent().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Whose failures open which breaker (issue 20): no caller, resource or route alone can make the
// gateway refuse others.

const SCOPE_POLICY: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
      "client_id": "c", "credential": { "client_secret": { "secret": "GW_SECRET" } } } },
  "inbound": { "api_key": { "keys": [
      { "name": "a", "secret": "KEY_A" }, { "name": "b", "secret": "KEY_B" },
      { "name": "c", "secret": "KEY_C" }, { "name": "d", "secret": "KEY_D" } ] } },
  "routes": [
    { "name": "items", "methods": ["GET"], "path": "/items/{id}",
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01",
        "url": "https://management.azure.com/items/{path.id}" } } },
    { "name": "other", "methods": ["GET"], "path": "/other/{id}",
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01",
        "url": "https://management.azure.com/other/{path.id}" } } },
    { "name": "strict", "methods": ["GET"], "path": "/strict/{id}",
      "breaker": { "failures": 1, "cooldown_seconds": 3600 },
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01",
        "url": "https://management.azure.com/strict/{path.id}" } } },
    { "name": "raw", "methods": ["POST"], "path": "/raw/{id}",
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01", "body": "none",
        "errors": "pass", "url": "https://management.azure.com/raw/{path.id}" } } },
    { "name": "orders", "methods": ["POST"], "path": "/orders/{tenant}",
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "orders", "identity": "gw" } } }
  ]
}"#;

fn scope_io() -> Fake {
    let mut io = Fake::new();
    for (secret, value) in [
        ("GW_SECRET", "identity-secret"),
        ("KEY_A", "key-a"),
        ("KEY_B", "key-b"),
        ("KEY_C", "key-c"),
        ("KEY_D", "key-d"),
    ] {
        io.secrets.insert(secret.into(), value.into());
    }
    io.answer_for("management.azure.com", Ok((200, Vec::new(), "{}".into())));
    io
}

/// A GET by caller `who` (a, b, c or d): status, headers, body, log line, and how many sends it
/// made.
fn get_as(
    g: &Gateway,
    io: &Fake,
    who: &str,
    path: &str,
) -> (u16, Vec<(&'static str, String)>, String, Value, usize) {
    let method = if path.starts_with("/raw/") || path.starts_with("/orders/") {
        "POST"
    } else {
        "GET"
    };
    let key = format!("key-{who}");
    let head = request(method, path, &[("x-api-key", key.as_str())], false);
    let before = io.sent().len();
    let (status, headers, body, log) = run(g, &head, io);
    (status, headers, body, log, io.sent().len() - before)
}

fn retry_after<'h>(headers: &'h [(&'static str, String)]) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| *k == "retry-after")
        .map(|(_, v)| v.as_str())
}

fn failed(status: u16) -> FakeReply {
    Ok((status, Vec::new(), String::new()))
}

/// Caller a calls one resource that Azure fails, again and again; then b's calls (another
/// resource of the route, another route of the host, the same resource) and a's other calls
/// are all made, and only a's calls of that resource fail fast.
fn one_caller_hammering_one_failing_resource(fault: FakeReply) {
    let g = Gateway::load(SCOPE_POLICY).unwrap();
    let io = scope_io();
    io.answer_for("/items/bad", fault);
    for _ in 0..12 {
        let (status, _, _, _, _) = get_as(&g, &io, "a", "/items/bad");
        assert_eq!(status, 503);
    }
    for (who, path) in [
        ("b", "/items/good"),
        ("b", "/other/x"),
        ("a", "/items/good"),
    ] {
        let (status, _, body, log, sends) = get_as(&g, &io, who, path);
        assert_eq!(status, 200, "{who} {path}: {body}");
        assert_eq!(
            (log["breaker"].as_str(), sends),
            (Some("closed"), 1),
            "{who} {path}"
        );
    }
    // a's calls of that resource fail fast, for a alone: nothing is sent.
    let (status, _, body, log, sends) = get_as(&g, &io, "a", "/items/bad");
    assert_eq!((status, sends), (503, 0), "{body}");
    assert!(body.contains("backend-circuit-open"), "{body}");
    assert!(
        body.contains("Your recent calls for this resource"),
        "{body}"
    );
    assert_eq!(log["breaker_scope"], "caller_resource");
    // b's call of it is made (and fails as Azure fails it).
    let (status, _, body, log, sends) = get_as(&g, &io, "b", "/items/bad");
    assert_eq!(status, 503);
    assert!(sends >= 1 && body.contains("backend-unavailable"), "{body}");
    assert_eq!(log["breaker"], "closed");
}

#[test]
fn one_caller_whose_resource_azure_fails_is_refused_alone_not_the_host() {
    one_caller_hammering_one_failing_resource(failed(500));
}

#[test]
fn one_caller_whose_resource_times_out_is_refused_alone_not_the_host() {
    one_caller_hammering_one_failing_resource(Err(SendError::Timeout));
}

#[test]
fn one_caller_throttled_on_one_resource_is_refused_alone_for_as_long_as_azure_asked() {
    let g = Gateway::load(SCOPE_POLICY).unwrap();
    let io = scope_io();
    io.answer_for(
        "/items/hot",
        Ok((
            429,
            vec![("retry-after".into(), "60".into())],
            String::new(),
        )),
    );
    for _ in 0..5 {
        let (status, headers, _, _, sends) = get_as(&g, &io, "a", "/items/hot");
        // 60 s is past the retry budget: answered at once, with Azure's wait.
        assert_eq!((status, retry_after(&headers), sends), (503, Some("60"), 1));
    }
    let (status, _, body, _, _) = get_as(&g, &io, "b", "/items/cool");
    assert_eq!(status, 200, "b: {body}");
    let (status, headers, body, log, sends) = get_as(&g, &io, "a", "/items/hot");
    assert_eq!((status, sends), (503, 0), "{body}");
    assert_eq!(log["breaker_scope"], "caller_resource");
    assert_eq!(
        retry_after(&headers),
        Some("60"),
        "Azure's wait, not the 30 s cool-down"
    );
}

#[test]
fn a_routes_own_breaker_settings_change_that_route_alone() {
    let g = Gateway::load(SCOPE_POLICY).unwrap();
    let io = scope_io();
    io.answer_for("/strict/x", failed(500));
    let (status, _, _, _, _) = get_as(&g, &io, "a", "/strict/x");
    assert_eq!(status, 503);
    // One failure on the route that opens at 1 failure for an hour: nobody else is refused.
    for (who, path) in [
        ("b", "/items/y"),
        ("b", "/other/z"),
        ("b", "/strict/y"),
        ("a", "/strict/y"),
    ] {
        let (status, _, body, _, sends) = get_as(&g, &io, who, path);
        assert_eq!((status, sends), (200, 1), "{who} {path}: {body}");
    }
    // a, on that resource, for the route's hour.
    let (status, headers, _, log, sends) = get_as(&g, &io, "a", "/strict/x");
    assert_eq!((status, sends), (503, 0));
    assert_eq!(log["breaker_scope"], "caller_resource");
    assert_eq!(retry_after(&headers), Some("3600"));
}

/// Azure fails everything; three callers fail on five resources of two routes.
fn host_outage(g: &Gateway, io: &Fake) {
    io.answer_for("management.azure.com", failed(503));
    for (who, path) in [
        ("a", "/items/a1"),
        ("b", "/other/b1"),
        ("c", "/items/c1"),
        ("a", "/other/a2"),
        ("b", "/items/b2"),
    ] {
        let (status, _, body, _, sends) = get_as(g, io, who, path);
        assert_eq!(status, 503, "{body}");
        assert!(sends >= 1, "{who} {path}");
    }
}

#[test]
fn a_real_outage_seen_by_several_callers_on_several_resources_opens_the_host_for_everyone() {
    let g = Gateway::load(SCOPE_POLICY).unwrap();
    let io = scope_io();
    host_outage(&g, &io);
    // Each route for its own cool-down: the default 30 s, and the strict route's hour.
    for (path, cool_down) in [
        ("/other/new", 30),
        ("/items/new", 30),
        ("/strict/new", 3600),
    ] {
        let (status, headers, body, log, sends) = get_as(&g, &io, "d", path);
        assert_eq!((status, sends), (503, 0), "d {path}: {body}");
        assert!(body.contains("backend-circuit-open"), "{body}");
        assert_eq!(log["breaker"], "open");
        assert_eq!(log["breaker_scope"], "host", "{path}");
        let wait: u64 = retry_after(&headers).unwrap().parse().unwrap();
        assert!(wait > cool_down - 5 && wait <= cool_down, "{path}: {wait}");
    }
}

#[test]
fn after_an_outage_a_caller_whose_own_resource_still_fails_cannot_reopen_it_for_others() {
    let g = Gateway::load(SCOPE_POLICY).unwrap();
    let io = scope_io();
    host_outage(&g, &io);
    // Azure is back, except for a's resource. a fires first as the cool-down ends.
    io.answer_for("management.azure.com", Ok((200, Vec::new(), "{}".into())));
    io.answer_for("/items/bad", failed(503));
    io.clock.set(io.clock.get() + 31_000.0);
    let (status, _, _, log, sends) = get_as(&g, &io, "a", "/items/bad");
    assert_eq!((status, log["breaker"].as_str()), (503, Some("probe")));
    assert!(sends >= 1);
    // b, right after: called (and the answer closes the host's breaker for all).
    let (status, _, body, log, sends) = get_as(&g, &io, "b", "/items/good");
    assert_eq!((status, sends), (200, 1), "b: {body}");
    assert_eq!(log["breaker"], "probe");
    let (status, _, _, log, _) = get_as(&g, &io, "c", "/other/x");
    assert_eq!((status, log["breaker"].as_str()), (200, Some("closed")));
}

#[test]
fn azures_retry_after_reaches_callers_between_1_and_300_seconds() {
    let g = Gateway::load(SCOPE_POLICY).unwrap();
    let io = scope_io();
    let asking = |secs: &str| -> FakeReply {
        Ok((
            503,
            vec![("retry-after".into(), secs.into())],
            String::new(),
        ))
    };
    let throttled = |secs: &str| -> FakeReply {
        Ok((
            429,
            vec![("retry-after".into(), secs.into())],
            String::new(),
        ))
    };
    for (who, path, reply, expected) in [
        // Mapped to problem+json after the retries.
        ("a", "/items/huge", throttled("99999999999"), "300"),
        ("b", "/items/zero", throttled("0"), "1"),
        // Passed through as Azure answered (a POST answered 503 is not sent again).
        ("c", "/raw/huge", asking("99999999999"), "300"),
        ("d", "/raw/zero", asking("0"), "1"),
        // Service Bus, after its retries.
        ("a", "/orders/t", asking("0"), "1"),
    ] {
        if path.starts_with("/orders/") {
            io.answer_for("servicebus.windows.net", reply);
        } else {
            io.answer_for(path, reply);
        }
        let (status, headers, body, _, _) = get_as(&g, &io, who, path);
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(retry_after(&headers), Some(expected), "{path}");
    }
}

/// `n` requests to the `orders` route in flight together, each with its own `Idempotency-Key`
/// (`m-{i}`, its `MessageId`) and label; returns each one's status, body and log line.
fn coalesced_sends(g: &Gateway, io: &Fake, n: usize) -> Vec<(u16, Value, Value)> {
    let heads: Vec<RequestHead> = (0..n)
        .map(|i| {
            request(
                "POST",
                &format!("/orders/t{i}"),
                &[
                    ("x-api-key", "k-123"),
                    ("x-label", &format!("label-{i}")),
                    ("idempotency-key", &format!("m-{i}")),
                    ("content-type", "application/json"),
                ],
                true,
            )
        })
        .collect();
    let answers = block_on_all(heads.iter().map(|h| g.handle(h, io)).collect());
    answers
        .into_iter()
        .map(|(answer, line)| {
            let body = match answer.body {
                AnswerBody::Text(t) => serde_json::from_str(&t).unwrap_or(Value::Null),
                _ => Value::Null,
            };
            (answer.status, body, serde_json::from_str(&line).unwrap())
        })
        .collect()
}

fn concurrent(io: Fake) -> Fake {
    Fake {
        concurrent: true,
        ..with_secrets(io)
    }
}

#[test]
fn sends_that_arrive_while_one_is_in_flight_leave_as_one_batch_each_message_its_own() {
    let io = concurrent(Fake::new().with_body(br#"{"n": "\"}]"}"#));
    let results = coalesced_sends(&gateway(), &io, 9);
    for (i, (status, body, _)) in results.iter().enumerate() {
        assert_eq!(*status, 202, "{body}");
        assert_eq!(
            body["messageId"],
            format!("m-{i}"),
            "each caller its own id"
        );
    }
    let sent = io.sent();
    assert_eq!(sent.len(), 2, "one send alone, then one batch");
    assert_eq!(
        sent[0]
            .header("brokerproperties")
            .map(|b| b.contains("m-0")),
        Some(true)
    );
    assert_eq!(
        sent[1].header("content-type"),
        Some("application/vnd.microsoft.servicebus.json")
    );
    let batch: Vec<Value> = serde_json::from_slice(&sent[1].body).expect("the batch is JSON");
    assert_eq!(batch.len(), 8);
    for (k, element) in batch.iter().enumerate() {
        let i = k + 1;
        assert_eq!(element["Body"], r#"{"n": "\"}]"}"#, "the body as it came");
        assert_eq!(element["BrokerProperties"]["MessageId"], format!("m-{i}"));
        assert_eq!(element["BrokerProperties"]["Label"], format!("label-{i}"));
        assert_eq!(
            element["BrokerProperties"]["ContentType"],
            "application/json"
        );
        assert_eq!(element["UserProperties"]["tenant"], format!("t{i}"));
    }
    let leader = results[1].2["request_id"].clone();
    assert_eq!(results[0].2.get("batch"), None, "the first went alone");
    for (_, _, log) in &results[1..] {
        assert_eq!(log["batch"], 8);
        assert_eq!(log["batch_leader"], leader);
    }
}

#[test]
fn a_batch_refused_as_a_whole_is_sent_again_one_message_each() {
    let io = concurrent(Fake::new().with_body(b"payload").reply(201, &[], "").reply(
        413,
        &[],
        "<Error><Detail>The batch is too large.</Detail></Error>",
    ));
    let results = coalesced_sends(&gateway(), &io, 4);
    assert!(results.iter().all(|(s, _, _)| *s == 202), "{results:?}");
    let sent = io.sent();
    let kinds: Vec<bool> = sent
        .iter()
        .map(|s| s.header("content-type") == Some("application/vnd.microsoft.servicebus.json"))
        .collect();
    assert_eq!(
        kinds,
        [false, true, false, false, false],
        "alone, the batch, then each alone"
    );
    assert!(results[2].2["backend_detail"]
        .as_str()
        .unwrap()
        .contains("refused as a whole"));
}

#[test]
fn a_batch_azure_cannot_take_is_retried_as_a_batch_then_each_caller_gets_its_own_503() {
    let io = concurrent(
        Fake::new()
            .with_body(b"payload")
            .reply(201, &[], "")
            .reply(503, &[("retry-after", "1")], "")
            .reply(503, &[("retry-after", "1")], "")
            .reply(503, &[("retry-after", "1")], ""),
    );
    let results = coalesced_sends(&gateway(), &io, 4);
    assert_eq!(results[0].0, 202);
    for (status, body, log) in &results[1..] {
        assert_eq!(*status, 503);
        assert_eq!(
            body["type"],
            "urn:azure-edge-gateway:problem:backend-unavailable"
        );
        assert_eq!(log["batch"], 3);
    }
    let sent = io.sent();
    assert_eq!(sent.len(), 4, "one alone, and the batch three times");
    assert_eq!(
        sent[1].body, sent[3].body,
        "the batch again with the same MessageIds"
    );
}

#[test]
fn when_a_batch_s_leader_goes_away_mid_send_its_followers_are_told_the_outcome_is_unknown() {
    // The leader's request is dropped (its caller gone, the runtime cancelling it) after its
    // batch went out: the followers cannot know whether Azure took it. Without duplicate
    // detection a second send could be a second message, so nothing is sent again.
    let io = concurrent(Fake::new().with_body(b"payload"));
    let g = gateway();
    let heads: Vec<RequestHead> = (0..4)
        .map(|i| {
            let key = format!("m-{i}");
            request(
                "POST",
                "/orders/t",
                &[
                    ("x-api-key", "k-123"),
                    ("x-label", "l"),
                    ("idempotency-key", &key),
                ],
                true,
            )
        })
        .collect();
    let mut futures: Vec<_> = heads
        .iter()
        .map(|h| Some(Box::pin(g.handle(h, &io))))
        .collect();
    let mut outs: Vec<Option<(u16, Value)>> = vec![None; 4];
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while outs
        .iter()
        .enumerate()
        .any(|(i, o)| o.is_none() && futures[i].is_some())
    {
        for i in 0..4 {
            let Some(future) = futures[i].as_mut() else {
                continue;
            };
            if let std::task::Poll::Ready((answer, line)) =
                std::future::Future::poll(future.as_mut(), &mut cx)
            {
                outs[i] = Some((answer.status, serde_json::from_str(&line).unwrap()));
                futures[i] = None;
            }
        }
        if io.sent().len() == 2 && futures[1].is_some() {
            futures[1] = None; // the leader of the batch, with its send in flight
        }
    }
    assert_eq!(
        outs[0].as_ref().map(|o| o.0),
        Some(202),
        "the first went alone"
    );
    assert!(outs[1].is_none(), "the leader never answered");
    for out in &outs[2..] {
        let (status, log) = out.as_ref().unwrap();
        assert_eq!(*status, 504);
        assert_eq!(log["problem"], "backend-outcome-unknown");
    }
    assert_eq!(io.sent().len(), 2, "nothing was sent again");
}

#[test]
fn a_failed_batch_counts_once_against_its_callers_breakers() {
    // Nine requests of one caller: one alone, then a batch of eight that Service Bus cannot take.
    // Counted once, the batch is one failure: the caller's breakers (which open at 5) stay
    // closed, and its next request goes to Azure. Counted per message it would be 8.
    let io = concurrent(
        Fake::new()
            .with_body(b"payload")
            .reply(201, &[], "")
            .reply(503, &[], "")
            .reply(503, &[], "")
            .reply(503, &[], ""),
    );
    let g = gateway();
    let results = coalesced_sends(&g, &io, 9);
    assert!(
        results[1..].iter().all(|(s, _, _)| *s == 503),
        "{results:?}"
    );
    let sent_before = io.sent().len();
    let next = coalesced_sends(&g, &io, 1);
    assert_eq!(next[0].0, 202, "{:?}", next[0]);
    assert_eq!(
        io.sent().len(),
        sent_before + 1,
        "the next request went to Azure"
    );
}
