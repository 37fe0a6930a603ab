//! Paged lists through `azure_rest` routes (`pages`), list elements projected
//! (`project_items`), and answers without Azure's body (`response_body: "none"`), run on the
//! host through the driver the worker runs, with fake Azure replies: the caller follows the
//! gateway's own links and never sees Azure's; a link works only on its route, for its path,
//! unchanged and in time, and a bad one sends nothing.

#[path = "support/fake_io.rs"]
mod fake_io;

use azure_edge_gateway::exchange::{AnswerBody, RequestHead};
use azure_edge_gateway::pipeline::Gateway;
use fake_io::{block_on, request, Fake};
use serde_json::{json, Value};

const POLICY: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
      "client_id": "c", "credential": { "client_secret": { "secret": "GW_SECRET" } } } },
  "routes": [
    { "name": "sites", "methods": ["GET"], "path": "/sites/{rg}", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01", "pages": true,
        "project_items": ["/name", "/properties/state"],
        "url": "https://management.azure.com/subscriptions/s1/resourceGroups/{path.rg}/providers/Microsoft.Web/sites" } } },
    { "name": "sites-too", "methods": ["GET"], "path": "/also/{rg}", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2022-09-01", "pages": true,
        "url": "https://management.azure.com/subscriptions/s1/resourceGroups/{path.rg}/providers/Microsoft.Web/sites" } } },
    { "name": "users", "methods": ["GET"], "path": "/users", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "pages": true, "project_items": ["/id"],
        "url": "https://graph.microsoft.com/v1.0/users" } } },
    { "name": "queues", "methods": ["GET"], "path": "/queues", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2021-08-06", "pages": true,
        "url": "https://contoso.queue.core.windows.net/?comp=list" } } },
    { "name": "enqueue", "methods": ["POST"], "path": "/jobs", "public": true,
      "backend": { "azure_rest": { "identity": "gw", "api_version": "2021-08-06", "response_body": "none",
        "body": { "template": { "content_type": "application/xml",
          "template": "<QueueMessage><MessageText>{body_base64}</MessageText></QueueMessage>" } },
        "url": "https://contoso.queue.core.windows.net/jobs/messages" } } }
  ]
}"#;

const SITES: &str =
    "https://management.azure.com/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.Web/sites";

fn gateway() -> Gateway {
    Gateway::load(POLICY).unwrap_or_else(|e| panic!("{e:?}"))
}

fn azure() -> Fake {
    let mut io = Fake::new();
    io.secrets
        .insert("GW_SECRET".into(), "identity-secret".into());
    io
}

fn json_reply(io: &Fake, body: Value) {
    io.replies.borrow_mut().push_back(Ok((
        200,
        vec![(
            "content-type".into(),
            "application/json; charset=utf-8".into(),
        )],
        body.to_string(),
    )));
}

fn site(n: u32) -> Value {
    json!({ "id": format!("/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.Web/sites/site-{n:02}"),
        "name": format!("site-{n:02}"), "type": "Microsoft.Web/sites", "location": "westeurope",
        "properties": { "state": "Running", "hostNames": [format!("site-{n:02}.azurewebsites.net")] } })
}

/// Page `i` of 5 (two sites each) as Resource Manager answers it.
fn page(i: u32) -> Value {
    let mut body = json!({ "value": [site(2 * i + 1), site(2 * i + 2)] });
    if i < 4 {
        body["nextLink"] = json!(format!(
            "{SITES}?api-version=2022-09-01&%24skiptoken=token-{}",
            i + 1
        ));
    }
    body
}

struct Got {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    log: Value,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn run(g: &Gateway, head: &RequestHead, io: &Fake) -> Got {
    let (answer, line) = block_on(g.handle(head, io));
    Got {
        status: answer.status,
        headers: answer.headers,
        body: match answer.body {
            AnswerBody::Text(t) => t,
            AnswerBody::Stream(s) => s,
            AnswerBody::Empty => String::new(),
        },
        log: serde_json::from_str(&line).unwrap(),
    }
}

fn get(path: &str) -> RequestHead {
    request("GET", path, &[], false)
}

#[test]
fn a_five_page_list_is_followed_through_the_gateway_every_element_once_never_azures_url() {
    let (g, io) = (gateway(), azure());
    let mut seen = Vec::new();
    let mut path = "/sites/rg1".to_owned();
    for i in 0..5 {
        json_reply(&io, page(i));
        let got = run(&g, &get(&path), &io);
        assert_eq!(got.status, 200, "{}", got.body);
        // What Azure was asked: the route's URL first, then exactly Azure's nextLink.
        let sent = io.sent().last().unwrap().url.clone();
        match i {
            0 => assert_eq!(sent, format!("{SITES}?api-version=2022-09-01")),
            _ => assert_eq!(
                sent,
                format!("{SITES}?api-version=2022-09-01&%24skiptoken=token-{i}")
            ),
        }
        assert!(
            !got.body.contains("management.azure.com")
                && !got.body.contains("skiptoken")
                && !got.body.contains("/subscriptions/"),
            "Azure's URL or ids in {}",
            got.body
        );
        let answer = got.json();
        for element in answer["value"].as_array().unwrap() {
            assert_eq!(
                element.as_object().unwrap().keys().collect::<Vec<_>>(),
                ["name", "properties"],
                "only the projected pointers: {element}"
            );
            assert_eq!(element["properties"], json!({ "state": "Running" }));
            seen.push(element["name"].as_str().unwrap().to_owned());
        }
        match answer.get("nextLink").and_then(Value::as_str) {
            Some(next) => {
                assert!(next.starts_with("/sites/rg1?page="), "{next}");
                assert_eq!(
                    got.header("link"),
                    Some(format!("<{next}>; rel=\"next\"").as_str())
                );
                path = next.to_owned();
            }
            None => {
                assert_eq!(i, 4, "only the last page has no next link");
                assert_eq!(got.header("link"), None);
            }
        }
    }
    let expected: Vec<String> = (1..=10).map(|n| format!("site-{n:02}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(io.sent().len(), 5);
}

/// The first page's next link, from a fresh request.
fn first_link(g: &Gateway, io: &Fake) -> String {
    json_reply(io, page(0));
    let got = run(g, &get("/sites/rg1"), io);
    got.json()["nextLink"].as_str().unwrap().to_owned()
}

#[test]
fn a_link_works_only_unchanged_in_time_on_its_route_and_path_and_a_bad_one_sends_nothing() {
    let g = gateway();
    let io = azure();
    let link = first_link(&g, &io);
    let handle = link.split_once("?page=").unwrap().1.to_owned();
    let tampered = {
        let mut bytes = handle.clone().into_bytes();
        let i = bytes.len() / 2;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let sent = io.sent().len();
    for (path, why) in [
        (
            format!("/sites/rg1?page={tampered}"),
            "one character changed",
        ),
        (
            format!("/sites/rg1?page={}", &handle[..handle.len() - 4]),
            "cut short",
        ),
        (
            format!("/sites/rg2?page={handle}"),
            "another path of the same route",
        ),
        (
            format!("/also/rg1?page={handle}"),
            "another route with the same URL",
        ),
        (
            format!("/sites/rg1?page={handle}&page={handle}"),
            "given twice",
        ),
        ("/sites/rg1?page=".to_owned(), "empty"),
    ] {
        let got = run(&g, &get(&path), &io);
        assert_eq!(got.status, 404, "{why}: {}", got.body);
        assert!(got.body.contains("page-not-found"), "{why}: {}", got.body);
        assert_eq!(io.sent().len(), sent, "{why}: nothing sent");
    }
    // In time it works; after an hour it does not.
    json_reply(&io, page(1));
    assert_eq!(run(&g, &get(&link), &io).status, 200);
    io.clock.set(io.clock.get() + 3_601_000.0);
    let got = run(&g, &get(&link), &io);
    assert_eq!((got.status, io.sent().len()), (404, sent + 1));
    // Another identity secret (a rotation that dropped the old one): the old links are void.
    let mut rotated = azure();
    rotated
        .secrets
        .insert("GW_SECRET".into(), "new-secret".into());
    let fresh = first_link(&g, &io);
    assert_eq!(run(&g, &get(&fresh), &rotated).status, 404);
    assert_eq!(rotated.sent().len(), 0);
}

#[test]
fn a_continuation_to_another_list_or_host_is_not_followed_or_shown() {
    let g = gateway();
    for next in [
        "https://evil.example/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.Web/sites?x=1",
        "https://management.azure.com/subscriptions/s1/resourceGroups/other/providers/Microsoft.Web/sites?x=1",
    ] {
        let io = azure();
        json_reply(&io, json!({ "value": [site(1)], "nextLink": next }));
        let got = run(&g, &get("/sites/rg1"), &io);
        assert_eq!(got.status, 200);
        assert_eq!(got.json(), json!({ "value": [{ "name": "site-01", "properties": { "state": "Running" } }] }));
        assert_eq!(got.header("link"), None);
        assert!(got.log["backend_detail"].as_str().unwrap().contains("not followed"));
        // Unprojected, the answer is Azure's, without its continuation.
        let io = azure();
        json_reply(&io, json!({ "value": [site(1)], "nextLink": next }));
        let got = run(&g, &get("/also/rg1"), &io);
        assert_eq!(got.json(), json!({ "value": [site(1)] }));
        assert!(!got.body.contains(next));
    }
}

#[test]
fn graph_lists_page_by_their_odata_next_link() {
    let (g, io) = (gateway(), azure());
    json_reply(
        &io,
        json!({ "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users",
            "value": [{ "id": "u1", "mail": "a@contoso.com" }],
            "@odata.nextLink": "https://graph.microsoft.com/v1.0/users?$skiptoken=X1" }),
    );
    let got = run(&g, &get("/users"), &io);
    let answer = got.json();
    assert_eq!(answer["value"], json!([{ "id": "u1" }]));
    let next = answer["@odata.nextLink"].as_str().unwrap();
    assert!(next.starts_with("/users?page="), "{next}");
    assert!(
        answer.get("@odata.context").is_none(),
        "project_items keeps /value only"
    );
    json_reply(&io, json!({ "value": [{ "id": "u2" }] }));
    let got = run(&g, &get(next), &io);
    assert_eq!(got.json(), json!({ "value": [{ "id": "u2" }] }));
    assert_eq!(
        io.sent().last().unwrap().url,
        "https://graph.microsoft.com/v1.0/users?$skiptoken=X1"
    );
}

#[test]
fn a_storage_list_pages_by_its_next_marker() {
    let (g, io) = (gateway(), azure());
    let xml = |names: &[&str], marker: &str| {
        let queues: String = names
            .iter()
            .map(|n| format!("<Queue><Name>{n}</Name></Queue>"))
            .collect();
        format!("<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults ServiceEndpoint=\"https://contoso.queue.core.windows.net/\"><Queues>{queues}</Queues><NextMarker>{marker}</NextMarker></EnumerationResults>")
    };
    io.replies.borrow_mut().push_back(Ok((
        200,
        vec![("content-type".into(), "application/xml".into())],
        xml(&["a", "b"], "/contoso/c&amp;d"),
    )));
    let got = run(&g, &get("/queues"), &io);
    assert_eq!(got.status, 200, "{}", got.body);
    let next = got
        .header("link")
        .unwrap_or_else(|| panic!("{} {:?} {}", got.body, got.headers, got.log));
    let next = &next[1..next.find('>').unwrap()];
    assert!(next.starts_with("/queues?page="));
    assert!(
        got.body
            .contains(&format!("<NextMarker>{next}</NextMarker>")),
        "{}",
        got.body
    );
    io.replies.borrow_mut().push_back(Ok((
        200,
        vec![("content-type".into(), "application/xml".into())],
        xml(&["c&amp;d"], ""),
    )));
    let got = run(&g, &get(next), &io);
    assert_eq!(
        io.sent().last().unwrap().url,
        "https://contoso.queue.core.windows.net/?comp=list&marker=%2Fcontoso%2Fc%26d"
    );
    assert_eq!(got.header("link"), None);
    assert!(got.body.contains("<NextMarker></NextMarker>"));
}

#[test]
fn an_answer_without_azures_body_carries_status_and_headers_only() {
    let g = gateway();
    let io = azure().with_body(b"job 1");
    io.replies.borrow_mut().push_back(Ok((
        201,
        vec![
            ("content-type".into(), "application/xml".into()),
            ("x-ms-request-id".into(), "r-1".into()),
        ],
        "<QueueMessagesList><QueueMessage><MessageId>m</MessageId><PopReceipt>AgAAAAMAAAA</PopReceipt></QueueMessage></QueueMessagesList>".into(),
    )));
    let got = run(
        &g,
        &request("POST", "/jobs", &[("content-length", "5")], true),
        &io,
    );
    assert_eq!(got.status, 201);
    assert_eq!(got.body, "");
    assert_eq!(got.header("content-type"), None);
    assert_eq!(got.header("x-ms-request-id"), Some("r-1"));
    assert!(String::from_utf8(io.sent()[0].body.clone())
        .unwrap()
        .contains("<MessageText>am9iIDE=</MessageText>"));
}
