//! The cost meter's driver: `aeg-cost <path> <iterations>` runs `iterations` requests of one
//! request path through the real driver (`Gateway::handle`) of one `Gateway` loaded from
//! bench/cost/policy.json (like one isolate: caches warm after the first request), over the
//! fake Io of the host tests, which answers everything at once. `aeg-cost --list` prints the
//! paths. bench/cost/run counts its instructions under callgrind (bench/cost/README.md).
//!
//! Every request's status (and its one send to the fake Azure) is checked, so that a broken
//! path fails instead of being measured.

#[path = "../../../tests/support/fake_io.rs"]
mod fake_io;

use azure_edge_gateway::allocator::SizeClasses;
use azure_edge_gateway::encoding::base64url;
use azure_edge_gateway::exchange::RequestHead;
use azure_edge_gateway::pipeline::Gateway;
use fake_io::{block_on, block_on_all, request, Fake};
use serde_json::json;

/// The wasm's allocator (src/lib.rs), so that the small blocks of a request cost what they cost
/// there rather than what glibc's malloc costs. It is single-threaded, as is this program.
#[global_allocator]
static ALLOCATOR: SizeClasses<std::alloc::System> = SizeClasses::new(std::alloc::System);

const POLICY: &str = include_str!("../policy.json");

/// One request path: the request, the fake Azure's answers, and the status it must get.
struct CostPath {
    name: &'static str,
    /// What it is, for `--list` and the table.
    about: &'static str,
    /// The fake Io of the isolate, with its answers set up.
    io: fn() -> Fake,
    /// The request (built once; the same head every time).
    head: fn() -> RequestHead,
    status: u16,
    /// How many sends to the fake Azure each iteration makes, and the body bytes they carry in
    /// all (held or streamed; `None`: not checked, for a batch whose JSON adds its own bytes).
    sends: usize,
    carries: Option<u64>,
    /// Caller requests in flight together in one iteration (1 but for the coalesced path);
    /// bench/cost/run divides by it.
    group: usize,
    /// One request before counting, so that the isolate holds what it caches (a valet route's
    /// user delegation key): the path measured is the one most requests take.
    warm: bool,
}

/// The paths measured. To add one: a route in bench/cost/policy.json if it needs one, and an
/// entry here (bench/cost/run asks the binary for this list).
const PATHS: &[CostPath] = &[
    CostPath {
        name: "404",
        about: "no route matches: problem+json 404",
        io: Fake::new,
        head: || request("GET", "/nowhere", &[], false),
        status: 404,
        sends: 0,
        carries: Some(0),
        group: 1,
        warm: false,
    },
    CostPath {
        name: "sb-send",
        about: "Service Bus send of a 1 KB body, token from the cache, Azure answers 201",
        io: || Fake::new().with_body(&kb_json()),
        head: || body_request("POST", "/sb/contoso", "application/json"),
        status: 202,
        sends: 1,
        carries: Some(1024),
        group: 1,
        warm: false,
    },
    CostPath {
        name: "sb-coalesced",
        about: "the same Service Bus send, 9 in flight together: one goes alone, 8 leave as one batch (per caller request)",
        io: || Fake {
            concurrent: true,
            ..Fake::new().with_body(&kb_json())
        },
        head: || body_request("POST", "/sb/contoso", "application/json"),
        status: 202,
        sends: 2,
        carries: None,
        group: 9,
        warm: false,
    },
    CostPath {
        name: "blob-write",
        about: "Blob Put of a 1 KB body (streamed, one put), Azure answers 201",
        io: || {
            let io = Fake::new().with_body(&kb_json());
            io.answer_for(
                "blob.core.windows.net",
                Ok((
                    201,
                    headers(&[
                        ("etag", "\"0x8DC1E2F3A4B5C6D\""),
                        ("last-modified", "Tue, 14 Nov 2023 22:13:20 GMT"),
                        ("x-ms-request-id", "a1b2c3d4-0000-0000-0000-000000000001"),
                    ]),
                    String::new(),
                )),
            );
            io
        },
        head: || body_request("PUT", "/blob/orders", "application/octet-stream"),
        status: 201,
        sends: 1,
        carries: Some(1024),
        group: 1,
        warm: false,
    },
    CostPath {
        name: "azure-rest",
        about: "azure_rest PUT of a 1 KB JSON body to Resource Manager, Azure answers 200",
        io: || {
            let io = Fake::new().with_body(&kb_json());
            io.answer_for(
                "management.azure.com",
                Ok((
                    200,
                    headers(&[
                        ("content-type", "application/json; charset=utf-8"),
                        ("x-ms-request-id", "a1b2c3d4-0000-0000-0000-000000000002"),
                    ]),
                    r#"{"id":"/subscriptions/00000000-aaaa-bbbb-cccc-000000000001/resourceGroups/rg-edge/providers/Microsoft.Web/sites/shop/config/appsettings","name":"appsettings","properties":{"MODE":"edge"}}"#.to_owned(),
                )),
            );
            io
        },
        head: || body_request("PUT", "/sites/shop/settings", "application/json"),
        status: 200,
        sends: 1,
        carries: Some(1024),
        group: 1,
        warm: false,
    },
    CostPath {
        name: "jwt-send",
        about: "Service Bus send of a 1 KB body behind a JWT check (RS256; the key set fetched once, then cached; the fake verify says yes)",
        io: || {
            let mut io = Fake::new().with_body(&kb_json());
            io.jwks = Some(
                json!({"keys": [{"kty": "RSA", "kid": "k1", "n": base64url(&[0xc5u8; 256]), "e": "AQAB"}]})
                    .to_string(),
            );
            io
        },
        head: || {
            let b64 = |v: serde_json::Value| base64url(v.to_string().as_bytes());
            let token = format!(
                "{}.{}.{}",
                b64(json!({"alg": "RS256", "kid": "k1", "typ": "JWT"})),
                b64(json!({"iss": "https://issuer.example/", "aud": "api://orders",
                    "sub": "client-1", "exp": 1_800_000_000, "nbf": 1_600_000_000})),
                base64url(&[1u8; 256]),
            );
            request(
                "POST",
                "/jwt/contoso",
                &[
                    ("content-type", "application/json"),
                    ("content-length", "1024"),
                    ("authorization", &format!("Bearer {token}")),
                ],
                true,
            )
        },
        status: 202,
        sends: 1,
        carries: Some(1024),
        group: 1,
        warm: false,
    },
    CostPath {
        name: "azure-rest-page",
        about: "azure_rest GET of one page of a Resource Manager list (2 sites): elements projected, Azure's nextLink sealed into the gateway's link",
        io: || {
            let mut io = Fake::new();
            io.secrets
                .insert("COST_CLIENT_SECRET".into(), "cost-client-secret".into());
            let site = |n: u32| {
                json!({ "id": format!("/subscriptions/00000000-aaaa-bbbb-cccc-000000000001/resourceGroups/rg-edge/providers/Microsoft.Web/sites/site-{n}"),
                    "name": format!("site-{n}"), "type": "Microsoft.Web/sites", "location": "westeurope",
                    "properties": { "state": "Running", "hostNames": [format!("site-{n}.azurewebsites.net")] } })
            };
            let page = json!({ "value": [site(1), site(2)],
                "nextLink": "https://management.azure.com/subscriptions/00000000-aaaa-bbbb-cccc-000000000001/resourceGroups/rg-edge/providers/Microsoft.Web/sites?api-version=2022-09-01&%24skiptoken=eyJvZmZzZXQiOjJ9" });
            io.answer_for(
                "management.azure.com",
                Ok((
                    200,
                    headers(&[("content-type", "application/json; charset=utf-8")]),
                    page.to_string(),
                )),
            );
            io
        },
        head: || request("GET", "/lists/rg-edge/sites", &[], false),
        status: 200,
        sends: 1,
        carries: Some(0),
        group: 1,
        warm: false,
    },
    CostPath {
        name: "valet-url",
        about: "blob_sas create URL for a name from the path, the user delegation key from the isolate's cache (no send)",
        io: || {
            let io = Fake::new();
            io.answer_for(
                "comp=userdelegationkey",
                Ok((
                    200,
                    Vec::new(),
                    "<?xml version=\"1.0\" encoding=\"utf-8\"?><UserDelegationKey><SignedOid>6f1b2c3d-0000-4000-8000-000000000001</SignedOid><SignedTid>11111111-2222-3333-4444-555555555555</SignedTid><SignedStart>2023-11-14T22:08:20Z</SignedStart><SignedExpiry>2023-11-15T01:13:20Z</SignedExpiry><SignedService>b</SignedService><SignedVersion>2025-11-05</SignedVersion><Value>dGhlIGtleSdzIGJ5dGVzLCAzMiBvZiB0aGVtLCBmb3IgaG1hYw==</Value></UserDelegationKey>".to_owned(),
                )),
            );
            io
        },
        head: || request("POST", "/valet/contoso/report%201.pdf", &[], false),
        status: 200,
        sends: 0,
        carries: Some(0),
        group: 1,
        warm: true,
    },
];

/// A 1 KB (1024-byte) JSON body.
fn kb_json() -> Vec<u8> {
    let head = r#"{"order":"o-1","note":""#;
    let tail = r#""}"#;
    let fill = 1024 - head.len() - tail.len();
    format!("{head}{}{tail}", "x".repeat(fill)).into_bytes()
}

/// A request with a 1 KB body and its length, as an HTTP client sends it.
fn body_request(method: &str, path: &str, content_type: &str) -> RequestHead {
    request(
        method,
        path,
        &[("content-type", content_type), ("content-length", "1024")],
        true,
    )
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--list") {
        for path in PATHS {
            println!("{}\t{}\t{}", path.name, path.about, path.group);
        }
        return;
    }
    let (Some(name), Some(Ok(iterations)), 2) = (
        args.first(),
        args.get(1).map(|n| n.parse::<u32>()),
        args.len(),
    ) else {
        eprintln!("usage: aeg-cost <path> <iterations> | aeg-cost --list");
        std::process::exit(2);
    };
    let Some(path) = PATHS.iter().find(|p| p.name == name) else {
        eprintln!("aeg-cost: no path {name:?} (aeg-cost --list)");
        std::process::exit(2);
    };
    let gateway = Gateway::load(POLICY).unwrap_or_else(|e| panic!("bench/cost/policy.json: {e:?}"));
    let io = (path.io)();
    let head = (path.head)();
    // A warming request is the loop's first, not a call of its own: a second call site of
    // `block_on` changes how the handler's future is inlined, and so what every path counts.
    let warming = u32::from(path.warm);
    for i in 0..iterations + warming {
        let answers = if path.group == 1 {
            vec![block_on(gateway.handle(&head, &io))]
        } else {
            block_on_all(
                (0..path.group)
                    .map(|_| gateway.handle(&head, &io))
                    .collect(),
            )
        };
        let (sent, carried) = {
            let sent = io.sent.borrow();
            let carried = sent
                .iter()
                .map(|s| s.body.len() as u64 + s.stream.unwrap_or(0));
            (sent.len(), carried.sum::<u64>())
        };
        for (answer, _log_line) in answers.iter().filter(|_| i >= warming) {
            let carried_ok = path.carries.is_none_or(|c| c == carried);
            if (answer.status, sent) != (path.status, path.sends) || !carried_ok {
                eprintln!(
                    "aeg-cost: {name}, iteration {}: status {}, {sent} send(s) of {carried} bytes; expected {}, {} of {:?}",
                    i + 1 - warming,
                    answer.status,
                    path.status,
                    path.sends,
                    path.carries
                );
                std::process::exit(1);
            }
        }
        // What the fake recorded of this request, so that the next one starts as it did.
        io.sent.borrow_mut().clear();
        io.text_limits.borrow_mut().clear();
        io.body_pos.set(0);
    }
    if io.jwks_fetches.get() > 1 {
        eprintln!(
            "aeg-cost: {name}: the key set was fetched {} times, not once",
            io.jwks_fetches.get()
        );
        std::process::exit(1);
    }
    println!("{name}: {iterations} request(s), each {}", path.status);
}
