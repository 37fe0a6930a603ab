//! Every validation rule of `policy.json`, each with a policy broken in one way and the exact
//! JSON path and message the user sees.

use azure_edge_gateway::policy;
use serde_json::{json, Value};

/// A valid policy using every part of the model; each test breaks one thing.
fn base() -> Value {
    json!({
        "$schema": "./policy.schema.json",
        "cloud": "public",
        "local_endpoints": ["https://127.0.0.1:10000"],
        "identities": {
            "gw": {
                "token_endpoint": { "entra_v2": { "tenant": "00000000-0000-0000-0000-000000000001" } },
                "client_id": "00000000-0000-0000-0000-000000000002",
                "credential": { "client_secret": { "secret": "GW_SECRET", "next_secret": "GW_SECRET_NEXT", "auth": "basic" } }
            },
            "cert": {
                "token_endpoint": { "url": "https://idp.example.com/oauth2/token" },
                "client_id": "gateway",
                "credential": { "certificate": { "private_key_secret": "GW_KEY", "certificate_secret": "GW_CERT" } }
            }
        },
        "routes": [
            {
                "name": "orders",
                "methods": ["POST"],
                "path": "/orders/{tenant}",
                "inbound": { "api_key": { "keys": [{ "name": "primary", "secret": "ORDERS_KEY" }] } },
                "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "orders", "identity": "gw" } }
            },
            {
                "name": "files",
                "methods": ["PUT", "GET"],
                "path": "/files/{tenant}/{name}",
                "inbound": { "api_key": { "header": "x-files-key", "keys": [{ "name": "a", "secret": "FILES_KEY" }] } },
                "backend": { "blob": {
                    "account": "contosofiles", "container": "uploads",
                    "blob": "{path.tenant}/{date:%Y/%m/%d}/{path.name}-{uuid}", "identity": "cert",
                    "audience": "https://contosofiles.blob.core.windows.net"
                } }
            },
            {
                "name": "local",
                "methods": ["PUT"],
                "path": "/local/{name}",
                "public": true,
                "backend": { "blob": {
                    "endpoint": "https://127.0.0.1:10000/devstoreaccount1", "container": "uploads",
                    "blob": "{path.name}", "identity": "gw"
                } }
            }
        ]
    })
}

fn errors_after(change: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut policy = base();
    change(&mut policy);
    match policy::load(&policy.to_string()) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts exactly one error, at `path`, whose message contains `expected`.
#[track_caller]
fn assert_one_error(change: impl FnOnce(&mut Value), path: &str, expected: &str) {
    assert_only_error(errors_after(change), path, expected);
}

/// Asserts that `errors` is exactly one, at `path`, whose message contains `expected`.
#[track_caller]
fn assert_only_error(errors: Vec<String>, path: &str, expected: &str) {
    assert_eq!(
        errors.len(),
        1,
        "expected one error at {path}, got {errors:#?}"
    );
    let (got_path, message) = errors[0].split_once(": ").expect("path: message");
    assert_eq!(got_path, path, "{errors:#?}");
    assert!(
        message.contains(expected),
        "{message:?} should contain {expected:?}"
    );
}

#[test]
fn the_base_policy_is_valid() {
    assert_eq!(errors_after(|_| {}), Vec::<String>::new());
}

#[test]
fn the_shipped_policies_are_valid() {
    for file in [
        "policy.json",
        "dev/policy.json",
        "tests/e2e/fixtures/gateway-policy.json",
        "tests/e2e/fixtures/identity-policy.json",
        "tests/e2e/fixtures/servicebus-policy.json",
        "tests/e2e/fixtures/blob-policy.json",
        "tests/e2e/fixtures/inbound-policy.json",
        "tests/e2e/fixtures/azure-rest-policy.json",
        "tests/e2e/fixtures/queues-policy.json",
        "bench/policy.json",
    ] {
        let text = std::fs::read_to_string(file).unwrap();
        if let Err(errors) = policy::load(&text) {
            panic!("{file}: {errors:#?}");
        }
    }
}

/// Store-and-forward only works if wrangler.toml declares the policy's queue binding as a
/// producer, this worker as the consumer of the same queue with `max_retries` one less than
/// the policy's `max_attempts`, and a dead-letter queue that the policy's dead-letter binding
/// produces to. Checked for every shipped policy that stores requests (the dev stack and the
/// tests run with this wrangler.toml).
#[test]
fn store_and_forward_bindings_of_the_shipped_policies_are_declared_in_wrangler_toml() {
    let toml = std::fs::read_to_string("wrangler.toml").unwrap();
    let field = |block: &str, name: &str| -> Option<String> {
        block.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
        })
    };
    let mut checked = 0;
    for file in [
        "policy.json",
        "dev/policy.json",
        "tests/e2e/fixtures/store-forward-policy.json",
        "tests/e2e/fixtures/dead-letter-policy.json",
    ] {
        let policy = policy::load(&std::fs::read_to_string(file).unwrap()).unwrap();
        if !policy
            .routes
            .iter()
            .any(|r| r.when_unavailable == policy::WhenUnavailable::Queue)
        {
            continue;
        }
        checked += 1;
        let binding = policy.store_binding();
        let producer = toml
            .split("[[queues.producers]]")
            .skip(1)
            .find(|b| field(b, "binding").as_deref() == Some(binding.as_str()))
            .unwrap_or_else(|| {
                panic!("{file}: wrangler.toml declares no queue producer {binding}")
            });
        let queue = field(producer, "queue").expect("the producer names its queue");
        let consumer = toml
            .split("[[queues.consumers]]")
            .skip(1)
            .find(|b| field(b, "queue").as_deref() == Some(queue.as_str()))
            .unwrap_or_else(|| panic!("{file}: this worker does not consume {queue}"));
        let attempts = policy
            .store_and_forward
            .as_ref()
            .and_then(|s| s.max_attempts)
            .unwrap_or(azure_edge_gateway::store::DEFAULT_MAX_ATTEMPTS);
        assert_eq!(
            field(consumer, "max_retries").map(|v| v.parse::<u32>().unwrap()),
            Some(attempts - 1),
            "{file}: max_retries must be max_attempts - 1"
        );
        let dead_letter_queue = field(consumer, "dead_letter_queue").unwrap_or_else(|| {
            panic!("{file}: deliveries that keep failing need a dead-letter queue")
        });
        // The gateway puts what cannot be delivered there itself, with the reason: it needs a
        // producer binding of that same queue.
        let dead_letters = policy.dead_letter_binding();
        let producer = toml
            .split("[[queues.producers]]")
            .skip(1)
            .find(|b| field(b, "binding").as_deref() == Some(dead_letters.as_str()))
            .unwrap_or_else(|| {
                panic!("{file}: wrangler.toml declares no queue producer {dead_letters} (the dead-letter queue)")
            });
        assert_eq!(
            field(producer, "queue"),
            Some(dead_letter_queue),
            "{file}: {dead_letters} must be the consumer's dead_letter_queue"
        );
    }
    assert!(checked > 0, "a shipped policy stores requests");
}

#[test]
fn the_dead_letter_binding_is_a_binding_name_and_not_the_deliveries_own() {
    assert_one_error(
        |p| p["store_and_forward"] = json!({ "dead_letter_binding": "dead-letters" }),
        "store_and_forward.dead_letter_binding",
        "a binding name of letters, digits and '_'",
    );
    // Put back on the deliveries queue, a dead letter would be delivered again, and again.
    assert_one_error(
        |p| p["store_and_forward"] = json!({ "dead_letter_binding": "DELIVERIES" }),
        "store_and_forward.dead_letter_binding",
        "a binding other than the deliveries' own (DELIVERIES)",
    );
    assert_one_error(
        |p| {
            p["store_and_forward"] = json!({ "binding": "QUEUED", "dead_letter_binding": "QUEUED" })
        },
        "store_and_forward.dead_letter_binding",
        "a binding other than the deliveries' own (QUEUED)",
    );
    assert_eq!(
        errors_after(|p| p["store_and_forward"] = json!({ "dead_letter_binding": "REFUSED" })),
        Vec::<String>::new()
    );
    let policy = policy::load(&base().to_string()).unwrap();
    assert_eq!(policy.dead_letter_binding(), "DEAD_LETTERS");
}

/// A rate limit in policy.json only works if wrangler.toml declares its binding with the same
/// numbers; a mismatch would silently enforce other limits than the policy says.
#[test]
fn rate_limit_bindings_of_the_shipped_policy_are_declared_in_wrangler_toml() {
    let policy = policy::load(&std::fs::read_to_string("policy.json").unwrap()).unwrap();
    let toml = std::fs::read_to_string("wrangler.toml").unwrap();
    let limits: Vec<_> = policy
        .routes
        .iter()
        .filter_map(|r| policy.effective_inbound(r).rate_limit)
        .collect();
    assert!(!limits.is_empty(), "policy.json shows a rate limit");
    for rl in limits {
        let block = toml
            .split("[[ratelimits]]")
            .find(|b| b.contains(&format!("name = \"{}\"", rl.binding)));
        let block = block.unwrap_or_else(|| {
            panic!(
                "wrangler.toml declares no [[ratelimits]] named {}",
                rl.binding
            )
        });
        assert!(
            block.contains(&format!(
                "limit = {}, period = {} }}",
                rl.limit, rl.period_seconds
            )),
            "{} differs:\n{block}",
            rl.binding
        );
    }
}

#[test]
fn container_names_follow_azure_rules() {
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["container"] = json!("My_Files"),
        "routes[1].backend.blob.container",
        "3-63 lowercase letters, digits or single hyphens, got \"My_Files\"",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["container"] = json!("a--b"),
        "routes[1].backend.blob.container",
        "got \"a--b\"",
    );
}

#[test]
fn unknown_fields_are_rejected_and_the_rest_still_read() {
    let errors = errors_after(|p| {
        p["routes"][0]["colour"] = json!("red");
        p["routes"][0]["backend"]["service_bus"]["queue"] = json!("/bad/");
    });
    assert_eq!(
        errors,
        vec![
            "routes[0].colour: not a known field (\"colour\"); expected one of name, methods, path, public, inbound, backend, breaker, when_unavailable".to_owned(),
            "routes[0].backend.service_bus.queue: an entity name: 1-260 letters, digits, '.', '-', '_' or '/', not starting or ending with '/', got \"/bad/\"".to_owned(),
        ]
    );
}

#[test]
fn wrong_types_and_missing_fields_name_their_path() {
    assert_one_error(
        |p| p["routes"][0]["public"] = json!("yes"),
        "routes[0].public",
        "a boolean, got string \"yes\"",
    );
    assert_one_error(
        |p| {
            p["routes"][2].as_object_mut().unwrap().remove("backend");
        },
        "routes[2].backend",
        "required, but missing",
    );
    assert_one_error(
        |p| p["routes"][0]["methods"] = json!(["POST", "PUTT"]),
        "routes[0].methods[1]",
        "got \"PUTT\"",
    );
    assert_one_error(
        |p| p["cloud"] = json!("mars"),
        "cloud",
        "one of public, us_government, china, got \"mars\"",
    );
}

#[test]
fn json_syntax_errors_give_line_and_column() {
    let errors = policy::load("{\n  \"routes\": [,]\n}").unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].path, "line 2 column 14");
    assert!(
        errors[0].message.starts_with("valid JSON"),
        "{}",
        errors[0].message
    );
}

#[test]
fn references_to_undefined_identities_list_the_defined_ones() {
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["identity"] = json!("nobody"),
        "routes[0].backend.service_bus.identity",
        "(defined: cert, gw), got \"nobody\"",
    );
}

#[test]
fn a_reference_to_an_identity_that_failed_to_read_is_not_reported_twice() {
    assert_one_error(
        |p| p["identities"]["gw"]["client_idd"] = json!("x"),
        "identities.gw.client_idd",
        "not a known field",
    );
}

#[test]
fn duplicate_route_names_point_at_both() {
    assert_one_error(
        |p| p["routes"][2]["name"] = json!("orders"),
        "routes[2].name",
        "a name no other route has, got \"orders\" (also routes[0])",
    );
}

#[test]
fn two_routes_for_the_same_method_and_path_shape_conflict() {
    assert_one_error(
        |p| {
            p["routes"][2]["path"] = json!("/orders/{name}");
            p["routes"][2]["methods"] = json!(["PUT", "POST"]);
        },
        "routes[2]",
        "got POST /orders/{name} which routes[0] (\"orders\") already matches as /orders/{tenant}",
    );
    // Same path, other methods: no conflict. A literal where the other has a parameter: no
    // conflict either (the literal wins).
    assert!(errors_after(|p| p["routes"][2]["path"] = json!("/orders/{name}")).is_empty());
    assert!(errors_after(|p| {
        p["routes"][2]["path"] = json!("/orders/new");
        p["routes"][2]["methods"] = json!(["POST"]);
        p["routes"][2]["backend"]["blob"]["blob"] = json!("new-{uuid}");
    })
    .is_empty());
}

#[test]
fn malformed_path_templates_say_what_was_expected() {
    for (path, expected) in [
        ("orders", "a path starting with '/'"),
        ("/orders//x", "no empty segment"),
        ("/orders/x{id}", "whole segment"),
        ("/orders/{Tenant}", "parameter names of lowercase letters"),
        ("/orders/{id}/{id}", "each parameter once"),
        ("/orders?x=1", "without query or fragment"),
    ] {
        assert_one_error(
            |p| p["routes"][0]["path"] = json!(path),
            "routes[0].path",
            expected,
        );
    }
}

#[test]
fn templates_may_only_name_what_exists() {
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["blob"] = json!("{path.tenant}/{path.nam}"),
        "routes[1].backend.blob.blob",
        "(the path has name, tenant), got {path.nam}",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["blob"] = json!("{body.id}"),
        "routes[1].backend.blob.blob",
        "one of path.NAME, query.NAME, header.NAME, jwt.CLAIM, uuid, request_id or date:FORMAT, got {body.id}",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["blob"] = json!("{date:%Y-%q}"),
        "routes[1].backend.blob.blob",
        "got %q",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["blob"] = json!("a/../{uuid}"),
        "routes[1].backend.blob.blob",
        "without '.' or '..' segments",
    );
}

#[test]
fn backend_hosts_must_belong_to_the_cloud_or_be_declared_local() {
    assert_one_error(
        |p| p["routes"][2]["backend"]["blob"]["endpoint"] = json!("https://evil.example.com"),
        "routes[2].backend.blob.endpoint",
        "https://NAME.blob.core.windows.net (the host of this cloud, no path) or an origin listed in local_endpoints, got \"https://evil.example.com\"",
    );
    // A host of another cloud is not this cloud's.
    assert_one_error(
        |p| {
            p["routes"][2]["backend"]["blob"]["endpoint"] =
                json!("https://acct.blob.core.chinacloudapi.cn")
        },
        "routes[2].backend.blob.endpoint",
        "got \"https://acct.blob.core.chinacloudapi.cn\"",
    );
    // Suffix tricks do not pass.
    assert_one_error(
        |p| {
            p["routes"][2]["backend"]["blob"]["endpoint"] =
                json!("https://blob.core.windows.net.evil.com")
        },
        "routes[2].backend.blob.endpoint",
        "or an origin listed in local_endpoints",
    );
    // Plain http to Azure is refused; the declared local origin on another port is not local.
    assert_one_error(
        |p| {
            p["routes"][2]["backend"]["blob"]["endpoint"] =
                json!("https://127.0.0.1:10001/devstoreaccount1")
        },
        "routes[2].backend.blob.endpoint",
        "or an origin listed in local_endpoints",
    );
    assert!(
        errors_after(|p| p["routes"][2]["backend"]["blob"]["endpoint"] =
            json!("https://acct.blob.core.windows.net"))
        .is_empty()
    );
    // In the US Government cloud, names resolve to its hosts, so a public-cloud audience is wrong.
    assert_one_error(
        |p| p["cloud"] = json!("us_government"),
        "routes[1].backend.blob.audience",
        "https://storage.azure.com or https://contosofiles.blob.core.usgovcloudapi.net, got \"https://contosofiles.blob.core.windows.net\"",
    );
}

#[test]
fn exactly_one_of_name_and_endpoint_and_of_queue_and_topic() {
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["topic"] = json!("events"),
        "routes[0].backend.service_bus",
        "either \"queue\" or \"topic\", not both",
    );
    assert_one_error(
        |p| p["routes"][2]["backend"]["blob"]["account"] = json!("acct"),
        "routes[2].backend.blob",
        "either \"account\" or \"endpoint\", not both",
    );
    assert_one_error(
        |p| {
            p["routes"][0]["backend"]["service_bus"]
                .as_object_mut()
                .unwrap()
                .remove("namespace");
        },
        "routes[0].backend.service_bus",
        "\"namespace\" (the Azure resource name) or \"endpoint\" (a URL)",
    );
}

#[test]
fn resource_names_follow_azure_rules() {
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["namespace"] = json!("1bad"),
        "routes[0].backend.service_bus.namespace",
        "6-50 letters, digits or hyphens",
    );
    assert_one_error(
        |p| {
            p["routes"][1]["backend"]["blob"]["account"] = json!("Contoso");
            p["routes"][1]["backend"]["blob"]
                .as_object_mut()
                .unwrap()
                .remove("audience");
        },
        "routes[1].backend.blob.account",
        "3-24 lowercase letters or digits, got \"Contoso\"",
    );
}

#[test]
fn audiences_must_fit_the_backend_kind() {
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["audience"] = json!("https://storage.azure.com"),
        "routes[0].backend.service_bus.audience",
        "an audience Service Bus accepts: https://servicebus.azure.net or https://contoso-orders.servicebus.windows.net, got \"https://storage.azure.com\"",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["audience"] = json!("https://servicebus.azure.net"),
        "routes[1].backend.blob.audience",
        "an audience Blob Storage accepts",
    );
    assert!(
        errors_after(|p| p["routes"][0]["backend"]["service_bus"]["audience"] =
            json!("https://servicebus.azure.net/"))
        .is_empty()
    );
}

#[test]
fn a_route_without_protection_must_say_it_is_public() {
    assert_one_error(
        |p| p["routes"][2]["public"] = json!(false),
        "routes[2]",
        "inbound protection (\"api_key\", \"jwt\" or an \"ip\" allow list, on the route or in the policy's \"inbound\" defaults) or \"public\": true",
    );
    assert_one_error(
        |p| p["routes"][0]["inbound"] = json!({}),
        "routes[0]",
        "or \"public\": true",
    );
}

#[test]
fn secrets_are_named_never_written_and_never_echoed() {
    let secret_value = "Qx8~abc.DEFghij_klmnop-qrs";
    let errors = errors_after(|p| {
        p["identities"]["gw"]["credential"]["client_secret"]["secret"] = json!(secret_value)
    });
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0]
        .starts_with("identities.gw.credential.client_secret.secret: the name of a Worker secret"));
    assert!(
        !errors[0].contains(secret_value),
        "the error must not quote a possible secret"
    );
    assert_one_error(
        |p| {
            p["routes"][0]["inbound"]["api_key"]["keys"][0]["secret"] = json!("-----BEGIN KEY-----")
        },
        "routes[0].inbound.api_key.keys[0].secret",
        "not such a name (not shown",
    );
    assert_one_error(
        |p| {
            p["identities"]["gw"]["credential"]["client_secret"]["next_secret"] = json!("GW_SECRET")
        },
        "identities.gw.credential.client_secret.next_secret",
        "a different Worker secret",
    );
}

#[test]
fn identities_need_a_usable_tenant_client_and_endpoint() {
    assert_one_error(
        |p| p["identities"]["gw"]["token_endpoint"]["entra_v2"]["tenant"] = json!("common"),
        "identities.gw.token_endpoint.entra_v2.tenant",
        "got \"common\"",
    );
    assert_one_error(
        |p| p["identities"]["gw"]["client_id"] = json!("my-app"),
        "identities.gw.client_id",
        "a GUID, got \"my-app\"",
    );
    assert_one_error(
        |p| {
            p["identities"]["cert"]["token_endpoint"]["url"] = json!("http://idp.example.com/token")
        },
        "identities.cert.token_endpoint.url",
        "an https:// URL (plain http only for an origin listed in local_endpoints)",
    );
    // A malformed local endpoint declares nothing, so the route using it is reported too.
    let errors = errors_after(|p| {
        p["local_endpoints"] = json!(["https://127.0.0.1:10000/devstoreaccount1"])
    });
    assert!(
        errors[0].starts_with("local_endpoints[0]: an origin such as \"https://127.0.0.1:10000\""),
        "{errors:#?}"
    );
    assert!(
        errors[1].starts_with("routes[2].backend.blob.endpoint: "),
        "{errors:#?}"
    );
}

#[test]
fn api_key_checks_need_keys_with_unique_names_and_a_header() {
    assert_one_error(
        |p| p["routes"][0]["inbound"]["api_key"]["keys"] = json!([]),
        "routes[0].inbound.api_key.keys",
        "at least one key",
    );
    assert_one_error(
        |p| {
            p["routes"][0]["inbound"]["api_key"]["keys"] =
                json!([{ "name": "a", "secret": "K1" }, { "name": "a", "secret": "K2" }])
        },
        "routes[0].inbound.api_key.keys[1].name",
        "got the name of keys[0] again",
    );
    assert_one_error(
        |p| p["routes"][0]["inbound"]["api_key"]["header"] = json!("x key"),
        "routes[0].inbound.api_key.header",
        "an HTTP header name",
    );
}

#[test]
fn blob_routes_only_take_methods_that_read_or_write() {
    assert_one_error(
        |p| p["routes"][1]["methods"] = json!(["PUT", "DELETE"]),
        "routes[1].methods[1]",
        "a method a blob route serves (GET, HEAD, PUT or POST), got \"DELETE\"",
    );
}

#[test]
fn message_mappings_are_templates_over_what_the_route_has() {
    assert!(errors_after(
        |p| p["routes"][0]["backend"]["service_bus"]["message"] = json!({
            "session_id": "{path.tenant}", "label": "created", "time_to_live": 60,
            "properties": { "tenant": "{path.tenant}", "source": "edge" }
        })
    )
    .is_empty());
    assert_one_error(
        |p| {
            p["routes"][0]["backend"]["service_bus"]["message"] =
                json!({ "session_id": "{path.tenantt}" })
        },
        "routes[0].backend.service_bus.message.session_id",
        "(the path has tenant), got {path.tenantt}",
    );
    assert_one_error(
        |p| {
            p["routes"][0]["backend"]["service_bus"]["message"] =
                json!({ "properties": { "Authorization": "x" } })
        },
        "routes[0].backend.service_bus.message.properties.Authorization",
        "not one HTTP or Service Bus reserves",
    );
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["message"] = json!({ "time_to_live": 0 }),
        "routes[0].backend.service_bus.message.time_to_live",
        "at least 1 second",
    );
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["max_message_bytes"] = json!(200_000_000),
        "routes[0].backend.service_bus.max_message_bytes",
        "between 1024 and 104857600",
    );
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["message"] = json!({ "sessionid": "x" }),
        "routes[0].backend.service_bus.message.sessionid",
        "not a known field",
    );
}

#[test]
fn blob_write_options_are_checked() {
    assert!(errors_after(|p| {
        let b = &mut p["routes"][1]["backend"]["blob"];
        b["metadata"] = json!({ "tenant": "{path.tenant}", "_source": "edge" });
        b["content_type"] = json!("application/json");
        b["single_put_max_bytes"] = json!(1_048_576);
        b["block_bytes"] = json!(262_144);
        b["max_body_bytes"] = json!(10_000_000);
    })
    .is_empty());
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["metadata"] = json!({ "x-tenant": "a" }),
        "routes[1].backend.blob.metadata.x-tenant",
        "a metadata name that is a C# identifier",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["metadata"] = json!({ "tenant": "{path.nope}" }),
        "routes[1].backend.blob.metadata.tenant",
        "got {path.nope}",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["content_type"] = json!("json"),
        "routes[1].backend.blob.content_type",
        "a media type",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["single_put_max_bytes"] = json!(300_000_000u64),
        "routes[1].backend.blob.single_put_max_bytes",
        "at most 268435456",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["block_bytes"] = json!(1000),
        "routes[1].backend.blob.block_bytes",
        "between 65536",
    );
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["max_body_bytes"] = json!(0),
        "routes[1].backend.blob.max_body_bytes",
        "between 1 byte",
    );
}

fn jwt_check() -> Value {
    json!({
        "issuers": ["https://sts.windows.net/t/"], "audiences": ["api://orders"],
        "jwks_url": "https://login.microsoftonline.com/t/discovery/v2.0/keys",
        "algorithms": ["RS256", "ES256"], "required_claims": { "roles": ["Orders.Write"] }
    })
}

#[test]
fn api_keys_are_a_secret_name_or_a_sha256_never_both() {
    let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    assert!(errors_after(
        |p| p["routes"][0]["inbound"]["api_key"]["keys"] = json!([{ "name": "h", "sha256": hash }])
    )
    .is_empty());
    assert_one_error(
        |p| {
            p["routes"][0]["inbound"]["api_key"]["keys"] = json!([{ "name": "h", "sha256": "abc" }])
        },
        "routes[0].inbound.api_key.keys[0].sha256",
        "64 hex digits",
    );
    assert_one_error(
        |p| {
            p["routes"][0]["inbound"]["api_key"]["keys"] =
                json!([{ "name": "h", "sha256": hash, "secret": "K" }])
        },
        "routes[0].inbound.api_key.keys[0]",
        "exactly one of",
    );
}

#[test]
fn jwt_checks_need_issuers_audiences_and_a_trusted_key_set() {
    assert!(errors_after(|p| p["routes"][0]["inbound"] = json!({ "jwt": jwt_check() })).is_empty());
    let mut bad = jwt_check();
    bad["audiences"] = json!([]);
    assert_one_error(
        |p| p["routes"][0]["inbound"] = json!({ "jwt": bad }),
        "routes[0].inbound.jwt.audiences",
        "at least one accepted audience",
    );
    let mut bad = jwt_check();
    bad["jwks_url"] = json!("http://keys.example.com/jwks");
    assert_one_error(
        |p| p["routes"][0]["inbound"] = json!({ "jwt": bad }),
        "routes[0].inbound.jwt.jwks_url",
        "an https:// URL",
    );
    let mut bad = jwt_check();
    bad["algorithms"] = json!(["HS256"]);
    assert_one_error(
        |p| p["routes"][0]["inbound"] = json!({ "jwt": bad }),
        "routes[0].inbound.jwt.algorithms[0]",
        "one of RS256, PS256, ES256, got \"HS256\"",
    );
}

#[test]
fn jwt_claims_in_templates_need_a_jwt_check() {
    let with_jwt = |p: &mut Value| {
        p["routes"][0]["inbound"] = json!({ "jwt": jwt_check() });
        p["routes"][0]["backend"]["service_bus"]["message"] = json!({ "session_id": "{jwt.sub}" });
    };
    assert!(errors_after(with_jwt).is_empty());
    assert_one_error(
        |p| {
            p["routes"][0]["backend"]["service_bus"]["message"] =
                json!({ "session_id": "{jwt.sub}" })
        },
        "routes[0].backend.service_bus.message.session_id",
        "{jwt.CLAIM} only on a route with a \"jwt\" inbound check, got {jwt.sub}",
    );
}

#[test]
fn ip_lists_are_cidrs() {
    assert!(errors_after(|p| p["routes"][2]["inbound"] = json!({ "ip": { "allow": ["203.0.113.0/24", "2001:db8::/32"], "deny": ["203.0.113.9"] } })).is_empty());
    assert_one_error(
        |p| p["routes"][2]["inbound"] = json!({ "ip": { "deny": ["10.0.0.0/40"] } }),
        "routes[2].inbound.ip.deny[0]",
        "a prefix length of 0 to 32",
    );
}

#[test]
fn an_ip_allow_list_protects_a_route_but_a_deny_list_alone_does_not() {
    assert!(errors_after(|p| {
        p["routes"][2]["public"] = json!(false);
        p["routes"][2]["inbound"] = json!({ "ip": { "allow": ["203.0.113.0/24"] } });
    })
    .is_empty());
    assert_one_error(
        |p| {
            p["routes"][2]["public"] = json!(false);
            p["routes"][2]["inbound"] = json!({ "ip": { "deny": ["203.0.113.0/24"] }, "rate_limit": { "binding": "RL", "key": "client_ip", "limit": 5, "period_seconds": 10 } });
        },
        "routes[2]",
        "inbound protection",
    );
}

#[test]
fn defaults_protect_every_route_that_does_not_override_them() {
    let errors = errors_after(|p| {
        p["inbound"] =
            json!({ "api_key": { "keys": [{ "name": "default", "secret": "DEFAULT_KEY" }] } });
        p["routes"][0].as_object_mut().unwrap().remove("inbound");
        p["routes"][2]["public"] = json!(false);
    });
    assert_eq!(errors, Vec::<String>::new());
    assert_one_error(
        |p| p["inbound"] = json!({ "content_types": ["json"] }),
        "inbound.content_types[0]",
        "a media type such as \"application/json\"",
    );
}

#[test]
fn rate_limits_use_a_binding_a_supported_period_and_a_key_the_route_has() {
    let rl = |key: &str, period: u32| json!({ "binding": "ORDERS_LIMIT", "key": key, "limit": 100, "period_seconds": period });
    assert!(
        errors_after(|p| p["routes"][0]["inbound"]["rate_limit"] = rl("api_key", 60)).is_empty()
    );
    assert_one_error(
        |p| p["routes"][0]["inbound"]["rate_limit"] = rl("api_key", 30),
        "routes[0].inbound.rate_limit.period_seconds",
        "10 or 60",
    );
    assert_one_error(
        |p| p["routes"][0]["inbound"]["rate_limit"] = rl("jwt_subject", 60),
        "routes[0].inbound.rate_limit.key",
        "counts by its jwt check, which this route does not have",
    );
}

#[test]
fn cors_names_origins_headers_and_the_route_s_methods() {
    let cors = |c: Value| move |p: &mut Value| p["routes"][0]["inbound"]["cors"] = c;
    assert!(errors_after(cors(json!({ "origins": ["https://app.example.com"], "methods": ["POST"], "headers": ["x-api-key"] }))).is_empty());
    assert_one_error(
        cors(json!({ "origins": ["https://app.example.com/path"] })),
        "routes[0].inbound.cors.origins[0]",
        "an origin such as",
    );
    assert_one_error(
        cors(json!({ "origins": ["*"], "methods": ["GET"] })),
        "routes[0].inbound.cors.methods[0]",
        "one of the route's methods, got \"GET\"",
    );
}

#[test]
fn methods_are_listed_once_and_at_least_once() {
    assert_one_error(
        |p| p["routes"][0]["methods"] = json!([]),
        "routes[0].methods",
        "at least one method",
    );
    assert_one_error(
        |p| p["routes"][0]["methods"] = json!(["POST", "POST"]),
        "routes[0].methods[1]",
        "each method once",
    );
}

#[test]
fn all_errors_are_reported_at_once_in_one_pass() {
    let errors = errors_after(|p| {
        p["routes"][0]["name"] = json!("files");
        p["routes"][1]["backend"]["blob"]["container"] = json!("My_Files");
        p["routes"][1]["backend"]["blob"]["identity"] = json!("nobody");
        p["routes"][2]["public"] = json!(false);
        p["routes"][2]["path"] = json!("/local//x");
        p["identities"]["gw"]["client_id"] = json!("nope");
    });
    assert_eq!(errors.len(), 6, "{errors:#?}");
}

// ---------------------------------------------------------------------------------------------
// Secrets are never quoted back, whatever shape they arrive in.

/// Distinctive secrets, in the shapes real ones have; the last one carries serde's own message
/// syntax, so a parser that looks for "expected" or "at line" in the wrong place would leak it.
const SECRETS: &[&str] = &[
    "Xq8~SuperSecretValue.123",
    "sk-LIVE-4eC39HqLyjWDarjtT1zdp7dc",
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEF",
    "Zq7`, expected `Wv9~Kk2\" at line 1 column 2",
];
/// A secret that is a number (a PIN, a numeric key).
const NUMERIC_SECRET: u64 = 73_914_682_005;

/// What must not appear in an error: the secret and every 6-character piece of it, except
/// pieces of lowercase letters and spaces only ("expect", "at lin"), which are words the
/// messages themselves use.
fn pieces(secret: &str) -> Vec<String> {
    let chars: Vec<char> = secret.chars().collect();
    let mut out = vec![secret.to_owned()];
    for w in chars.windows(6) {
        if !w.iter().all(|c| c.is_ascii_lowercase() || *c == ' ') {
            out.push(w.iter().collect());
        }
    }
    out
}

/// The base policy with every secret-bearing field present: both credential kinds, api_key
/// checks with a secret name and with a sha256, in the defaults and on routes, and a
/// required header's values.
fn secret_base() -> Value {
    let mut p = base();
    p["inbound"] =
        json!({ "api_key": { "keys": [{ "name": "default", "secret": "DEFAULT_KEY" }] } });
    p["routes"][0]["inbound"]["required_headers"] =
        json!([{ "name": "x-origin", "values": ["ORIGIN_TOKEN"] }]);
    p["routes"][1]["inbound"]["api_key"]["keys"] = json!([{
        "name": "hashed",
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    }]);
    p
}

/// Every secret-bearing place of `secret_base()`, as JSON pointers: the secret names, the
/// credential and api_key objects around them, and the enum and array positions in between.
/// A new secret-bearing field goes here (the schema test below finds one that is missing).
const SECRET_LOCATIONS: &[&str] = &[
    "/identities/gw/credential",
    "/identities/gw/credential/client_secret",
    "/identities/gw/credential/client_secret/secret",
    "/identities/gw/credential/client_secret/next_secret",
    "/identities/gw/credential/client_secret/auth",
    "/identities/cert/credential",
    "/identities/cert/credential/certificate",
    "/identities/cert/credential/certificate/private_key_secret",
    "/identities/cert/credential/certificate/certificate_secret",
    "/inbound/api_key",
    "/inbound/api_key/keys",
    "/inbound/api_key/keys/0",
    "/inbound/api_key/keys/0/secret",
    "/routes/0/inbound/api_key",
    "/routes/0/inbound/api_key/header",
    "/routes/0/inbound/api_key/keys",
    "/routes/0/inbound/api_key/keys/0",
    "/routes/0/inbound/api_key/keys/0/name",
    "/routes/0/inbound/api_key/keys/0/secret",
    "/routes/1/inbound/api_key/keys/0/sha256",
    "/routes/0/inbound/required_headers/0/values",
];

/// `/routes/0/inbound` → `routes[0].inbound`.
fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').skip(1) {
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// Wrong (or right) shapes a secret can arrive in, put where a value is expected.
fn value_shapes(secret: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("the secret as a string", json!(secret)),
        ("the secret as an array element", json!([secret])),
        ("an object keyed by the secret", json!({ secret: secret })),
        (
            "the secret as a variant",
            json!({ secret: { "secret": "A" } }),
        ),
        (
            "the secret inside a key object",
            json!({ "name": "k", "secret": secret }),
        ),
        (
            "the secret under an unknown field",
            json!({ "key": secret }),
        ),
        ("a number", json!(NUMERIC_SECRET)),
        ("a fraction", json!(7_391.468_200_5)),
        ("an array of numbers", json!([NUMERIC_SECRET])),
        ("a boolean", json!(true)),
        ("null", Value::Null),
    ]
}

/// Puts `value` at `pointer` (replacing what is there, or adding the member), or, with
/// `as_field`, adds it to the object there as a member named `as_field`.
fn place(policy: &mut Value, pointer: &str, value: Value, as_field: Option<&str>) -> bool {
    let (holder, name) = match as_field {
        Some(name) => (pointer, name),
        None => match pointer.rsplit_once('/') {
            Some((holder, name)) => (holder, name),
            None => return false,
        },
    };
    match policy.pointer_mut(holder) {
        Some(Value::Object(o)) => {
            o.insert(name.to_owned(), value);
            true
        }
        Some(Value::Array(a)) => match name.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
            Some(slot) => {
                *slot = value;
                true
            }
            None => false,
        },
        _ => false,
    }
}

/// Runs one case; returns the errors, after asserting none leaks and one names the place
/// (or, for a `null` that reads as an absent optional field, the object holding it).
#[track_caller]
fn secret_case(case: &str, policy: &Value, place_path: &str, forbidden: &[String]) -> Vec<String> {
    let holder = match place_path.rfind(['.', '[']) {
        Some(i) if case.contains("← null") => &place_path[..i],
        _ => place_path,
    };
    let errors: Vec<String> = match policy::load(&policy.to_string()) {
        Ok(_) => return Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    for e in &errors {
        for f in forbidden {
            assert!(!e.contains(f.as_str()), "{case}: {e:?} quotes {f:?}");
        }
    }
    assert!(
        errors.iter().any(|e| {
            let path = e.split_once(": ").map_or("", |(p, _)| p);
            path == place_path
                || path == holder
                || path.starts_with(&format!("{place_path}."))
                || path.starts_with(&format!("{place_path}["))
        }),
        "{case}: no error names {place_path}: {errors:#?}"
    );
    errors
}

#[test]
fn no_error_quotes_a_secret_in_any_shape_at_any_secret_bearing_place() {
    assert_eq!(errors_after(|p| *p = secret_base()), Vec::<String>::new());
    let numeric = pieces(&NUMERIC_SECRET.to_string())
        .into_iter()
        .chain(pieces("7391.4682005"))
        .collect::<Vec<_>>();
    let mut valid = Vec::new();
    let mut cases = 0;
    for &location in SECRET_LOCATIONS {
        let at = dotted(location);
        let holds_object = secret_base()
            .pointer(location)
            .is_some_and(Value::is_object);
        for &secret in SECRETS {
            let mut forbidden = pieces(secret);
            forbidden.extend(numeric.iter().cloned());
            let mut run = |label: &str, value: Value, as_field: Option<&str>| {
                let mut p = secret_base();
                assert!(place(&mut p, location, value, as_field), "{location}");
                let case = format!("{location} ← {label} {secret:?}");
                cases += 1;
                if secret_case(&case, &p, &at, &forbidden).is_empty() {
                    valid.push(format!("{location} ← {label}"));
                }
            };
            for (label, value) in value_shapes(secret) {
                run(label, value, None);
            }
            if holds_object {
                // An unknown member named by the secret, or holding it.
                run("an unknown field named by", json!("x"), Some(secret));
                run("an unknown field holding", json!(secret), Some("key"));
                run(
                    "an unknown field holding a number",
                    json!(NUMERIC_SECRET),
                    Some("pin"),
                );
            }
        }
    }
    assert!(cases > 800, "{cases} cases");
    // The only shapes that are valid policy: `null` for an optional member; a required
    // header's values, which may be any strings; an api_key header, which may be any header
    // name; and a key name, for a secret that happens to look like one (no check can tell).
    valid.sort();
    valid.dedup();
    assert_eq!(
        valid,
        vec![
            "/identities/gw/credential/client_secret/next_secret ← null",
            "/inbound/api_key ← null",
            "/routes/0/inbound/api_key ← null",
            "/routes/0/inbound/api_key/header ← the secret as a string",
            "/routes/0/inbound/api_key/keys/0/name ← the secret as a string",
            "/routes/0/inbound/required_headers/0/values ← the secret as an array element",
        ],
    );
}

/// Every field of the model that the redaction rule counts as secret-bearing has a place in
/// SECRET_LOCATIONS, so a new `*_secret` field cannot go untested.
#[test]
fn every_secret_bearing_field_of_the_schema_is_tested() {
    fn names(schema: &Value, out: &mut std::collections::BTreeSet<String>) {
        match schema {
            Value::Object(o) => {
                for (k, v) in o {
                    if k == "properties" || k == "required" {
                        if let Value::Object(props) = v {
                            out.extend(props.keys().cloned());
                        }
                    }
                    names(v, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| names(v, out)),
            _ => {}
        }
    }
    let schema: Value = serde_json::from_str(&policy::schema::policy_schema_json()).unwrap();
    let mut all = std::collections::BTreeSet::new();
    names(&schema, &mut all);
    let secret_fields: Vec<&String> = all
        .iter()
        .filter(|n| policy::is_secret_bearing_path([n.as_str()]))
        .collect();
    assert!(secret_fields.len() >= 7, "{secret_fields:?}");
    for field in secret_fields {
        assert!(
            SECRET_LOCATIONS
                .iter()
                .any(|l| l.split('/').any(|part| part == field)),
            "{field} is secret-bearing but no SECRET_LOCATIONS entry tests it"
        );
    }
}

/// Runs the built `policy` binary on a policy written to a file: exit code, stdout, stderr.
fn run_policy_tool(command: &str, name: &str, policy: &Value) -> (Option<i32>, String, String) {
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&file, serde_json::to_string_pretty(policy).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_policy"))
        .args([command, file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

/// What a user sees: `policy check` on a file full of misplaced secrets prints the paths and
/// not one of the secrets.
#[test]
fn policy_check_prints_where_a_secret_is_misplaced_but_never_the_secret() {
    let [s0, s1, s2, s3] = SECRETS else {
        unreachable!()
    };
    let mut p = secret_base();
    p["identities"]["gw"]["credential"] = json!({ "client_secret": s0 });
    p["identities"]["cert"]["credential"] = json!({ *s1: { "private_key_secret": "K" } });
    p["routes"][0]["inbound"]["api_key"]["keys"] =
        json!([s2, { "name": "b", "secret": NUMERIC_SECRET }]);
    p["routes"][1]["inbound"]["api_key"]["keys"][0][*s3] = json!("x");
    let (code, stdout, stderr) = run_policy_tool("check", "secrets-policy.json", &p);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    for path in [
        "identities.gw.credential.client_secret: an object, got a string of 24 characters (not shown: it may be a secret)",
        "identities.cert.credential: client_secret or certificate, got a key of 32 characters (not shown: it may be a secret)",
        "routes[0].inbound.api_key.keys[0]: an object, got a string of ",
        "routes[1].inbound.api_key.keys[0]: not a known field (a name of 43 characters, not shown: it may be a secret)",
    ] {
        assert!(stdout.contains(path), "{path:?} missing from:\n{stdout}");
    }
    for secret in SECRETS {
        for piece in pieces(secret) {
            assert!(
                !stdout.contains(&piece) && !stderr.contains(&piece),
                "{piece:?} in:\n{stdout}{stderr}"
            );
        }
    }
    assert!(!stdout.contains("739146"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// Overlapping routes and duplicate names: each reported once, naming the first.

/// `n` public Service Bus routes; `path(i)` and `name(i)` say what route `i` looks like.
fn many_routes(n: usize, name: impl Fn(usize) -> String, path: impl Fn(usize) -> String) -> Value {
    let mut p = base();
    p["routes"] = (0..n)
        .map(|i| {
            json!({
                "name": name(i), "methods": ["POST"], "path": path(i), "public": true,
                "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "orders", "identity": "gw" } }
            })
        })
        .collect();
    p
}

#[test]
fn ten_thousand_copies_of_one_route_are_reported_once_each_against_the_first() {
    let p = many_routes(
        10_000,
        |i| format!("r{i}"),
        |i| format!("/orders/{{p{}}}", i % 7),
    );
    let errors = policy::load(&p.to_string()).unwrap_err();
    assert_eq!(errors.len(), 9_999);
    for (k, e) in errors.iter().enumerate() {
        assert_eq!(e.path, format!("routes[{}]", k + 1));
        assert!(
            e.message.ends_with(&format!(
                "got POST {} which routes[0] (\"r0\") already matches as /orders/{{p0}}",
                p["routes"][k + 1]["path"].as_str().unwrap()
            )),
            "{e}"
        );
    }
}

#[test]
fn ten_thousand_distinct_routes_are_valid() {
    let p = many_routes(
        10_000,
        |i| format!("r{i}"),
        |i| format!("/t{}/{{id}}/items{}", i % 100, i / 100),
    );
    assert!(policy::load(&p.to_string()).is_ok());
}

#[test]
fn a_duplicate_name_is_reported_once_per_duplicate() {
    let p = many_routes(
        4,
        |i| {
            if i == 2 {
                "other".into()
            } else {
                "same".into()
            }
        },
        |i| format!("/r{i}"),
    );
    let errors: Vec<String> = policy::load(&p.to_string())
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        [
            "routes[1].name: a name no other route has, got \"same\" (also routes[0])",
            "routes[3].name: a name no other route has, got \"same\" (also routes[0])",
        ]
    );
}

#[test]
fn a_route_taken_by_two_earlier_routes_is_one_error_naming_both() {
    let errors = errors_after(|p| {
        p["routes"][1]["path"] = json!("/orders/{id}");
        p["routes"][1]["backend"]["blob"]["blob"] = json!("{path.id}");
        p["routes"][1]["methods"] = json!(["PUT"]);
        p["routes"][2]["path"] = json!("/orders/{name}");
        p["routes"][2]["methods"] = json!(["PUT", "GET", "POST"]);
    });
    assert_eq!(
        errors,
        ["routes[2]: a method and path no other route matches, got POST /orders/{name} which routes[0] (\"orders\") already matches as /orders/{tenant}, and PUT which routes[1] (\"files\") matches as /orders/{id}"]
    );
}

#[test]
fn blob_blocks_must_be_large_enough_for_the_largest_body_in_50000_blocks() {
    let tib: u64 = 1 << 40;
    // The defaults (100 MiB in 1 MiB blocks) and small blocks for small bodies fit; without
    // block_bytes, the default block grows with max_body_bytes (1 TiB: 22,020,096 bytes).
    assert!(
        errors_after(|p| p["routes"][1]["backend"]["blob"]["max_body_bytes"] = json!(tib))
            .is_empty()
    );
    let route: azure_edge_gateway::policy::model::BlobBackend = serde_json::from_value(json!({
        "container": "c", "blob": "b", "identity": "i", "endpoint": "https://example.com/a",
        "max_body_bytes": tib
    }))
    .unwrap();
    assert_eq!(route.block_bytes(), 22_020_096);
    assert!(u64::from(route.block_bytes()) * 50_000 >= tib);
    assert!(errors_after(|p| {
        let b = &mut p["routes"][1]["backend"]["blob"];
        b["block_bytes"] = json!(65_536);
        b["max_body_bytes"] = json!(3_276_800_000u64);
    })
    .is_empty());
    assert!(errors_after(|p| {
        let b = &mut p["routes"][1]["backend"]["blob"];
        b["block_bytes"] = json!(21_990_233);
        b["max_body_bytes"] = json!(tib);
    })
    .is_empty());
    // 1 TiB in 4 MiB blocks needs 262,144 blocks.
    assert_one_error(
        |p| {
            let b = &mut p["routes"][1]["backend"]["blob"];
            b["block_bytes"] = json!(4_194_304);
            b["max_body_bytes"] = json!(tib);
        },
        "routes[1].backend.blob.block_bytes",
        "at least 21990233 bytes (max_body_bytes 1099511627776 in at most 50000 blocks, Azure's limit per blob), got 4194304, which holds at most 209715200000 bytes; raise block_bytes to 21990233 or more, or lower max_body_bytes to 209715200000 or less",
    );
    assert_one_error(
        |p| {
            let b = &mut p["routes"][1]["backend"]["blob"];
            b["block_bytes"] = json!(65_536);
            b["max_body_bytes"] = json!(3_276_800_001u64);
        },
        "routes[1].backend.blob.block_bytes",
        "at least 65537 bytes",
    );
    // No block size the gateway allows holds 5000 GiB: the body limit is what must change.
    assert_one_error(
        |p| p["routes"][1]["backend"]["blob"]["max_body_bytes"] = json!(5_000 * (1u64 << 30)),
        "routes[1].backend.blob.max_body_bytes",
        "at most 5242880000000 bytes (50000 blocks, Azure's limit per blob, of the largest block_bytes, 104857600), got 5368709120000; with block_bytes 104857600, at most 5242880000000",
    );
}

// ---------------------------------------------------------------------------------------------
// The policy tool.

#[test]
fn explain_says_what_each_element_of_a_batch_may_set() {
    let mut p = base();
    let sb = |message: Option<Value>| {
        let mut sb = json!({
            "namespace": "contoso-orders", "queue": "orders", "identity": "gw", "batch": true
        });
        if let Some(m) = message {
            sb["message"] = m;
        }
        json!({ "service_bus": sb })
    };
    let route = |name: &str, path: &str, backend: Value| json!({ "name": name, "methods": ["POST"], "path": path, "public": true, "backend": backend });
    let routes = p["routes"].as_array_mut().unwrap();
    routes.push(route(
        "mapped-batch",
        "/batch/{tenant}",
        sb(Some(json!({
            "session_id": "{path.tenant}", "label": "order", "time_to_live": 60,
            "properties": { "tenant": "{path.tenant}", "Source": "edge" }
        }))),
    ));
    routes.push(route("plain-batch", "/plain", sb(None)));
    let (code, out, _) = run_policy_tool("explain", "batch-policy.json", &p);
    assert_eq!(code, Some(0), "{out}");
    // The section ends at the next blank line (another section follows).
    let section = out
        .split_once("\nBatch routes: what each element of the caller's array may set\n")
        .map(|(_, s)| {
            s.split_once("\n\n")
                .map_or(s.to_owned(), |(a, _)| format!("{a}\n"))
        })
        .unwrap_or_else(|| panic!("no batch section in:\n{out}"));
    assert_eq!(
        section,
        "  mapped-batch: BrokerProperties MessageId, CorrelationId, PartitionKey, To, ReplyTo, ReplyToSessionId, ScheduledEnqueueTimeUtc, ForcePersistence (not SessionId, Label, TimeToLive: the route sets them); UserProperties of any name but Source, tenant (the route sets them; names compare case-insensitively)\n\
         \x20 plain-batch: BrokerProperties MessageId, CorrelationId, SessionId, PartitionKey, Label, To, ReplyTo, ReplyToSessionId, TimeToLive, ScheduledEnqueueTimeUtc, ForcePersistence; UserProperties of any name\n"
    );
    // Without a batch route there is no such section.
    let (code, out, _) = run_policy_tool("explain", "no-batch-policy.json", &base());
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("Batch routes"), "{out}");
}

#[test]
fn explain_shows_whom_each_routes_breakers_refuse_and_on_whose_failures() {
    let rest = |id: &str| {
        json!({ "azure_rest": { "identity": "gw", "api_version": "2022-09-01",
        "url": format!("https://management.azure.com/{id}/{{path.id}}") } })
    };
    let route = |name: &str, backend: Value| {
        json!({ "name": name, "methods": ["GET"],
        "path": format!("/{name}/{{id}}"), "public": true, "backend": backend })
    };
    let mut p = base();
    p["routes"] = json!([
        route("items", rest("items")),
        route("strict", rest("strict")),
        route("off", rest("off")),
        {
            "name": "orders", "methods": ["POST"], "path": "/orders/{tenant}",
            "inbound": { "api_key": { "keys": [{ "name": "primary", "secret": "ORDERS_KEY" }] } },
            "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "orders", "identity": "gw" } }
        }
    ]);
    p["routes"][1]["breaker"] = json!({ "failures": 1, "cooldown_seconds": 3600 });
    p["routes"][2]["breaker"] = json!({ "failures": 0 });
    let (code, out, err) = run_policy_tool("explain", "breaker-policy.json", &p);
    assert_eq!(code, Some(0), "{out}{err}");
    let section = out
        .split_once("\nCircuit breakers (per isolate): whom each refuses, on whose failures\n")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no breaker section in:\n{out}"));
    let cells = |name: &str| -> Vec<String> {
        let line = section
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{section}"));
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    };
    // ROUTE, CALLERS BY, RESOURCES, WINDOW, COOL-DOWN, CALLER_RESOURCE, CALLER, RESOURCE, ROUTE, HOST
    assert_eq!(
        cells("items"),
        [
            "items",
            "address",
            "many",
            "30 s",
            "30 s",
            "5",
            "5 r<=3",
            "5 c<=3",
            "5 c<=3 r<=3",
            "https://management.azure.com"
        ]
    );
    // Its own hour and one failure: only for its own scopes; shared ones need two callers.
    assert_eq!(
        cells("strict"),
        [
            "strict",
            "address",
            "many",
            "30 s",
            "3600 s",
            "1",
            "2 r<=1",
            "2 c<=1",
            "2 c<=1 r<=1",
            "https://management.azure.com"
        ]
    );
    assert_eq!(
        cells("orders"),
        [
            "orders",
            "API key",
            "one",
            "30 s",
            "30 s",
            "5",
            "-",
            "-",
            "5 c<=3",
            "https://contoso-orders.servicebus.windows.net"
        ]
    );
    assert!(
        section.contains(
            "\n  off: no breaker (\"failures\": 0): always called, its failures count nowhere\n"
        ),
        "{section}"
    );
    // The host's rule is the gateway's, the same whatever its routes say; the route without a
    // breaker is not on it.
    assert!(
        section.contains(
            "\n  HOST https://management.azure.com (items, strict): 5 c<=3 r<=3 within 30 s\n"
        ),
        "{section}"
    );
}

/// The base policy with one `azure_rest` route (index 3) whose backend `edit` changes.
fn rest_after(edit: impl FnOnce(&mut Value)) -> impl FnOnce(&mut Value) {
    move |p: &mut Value| {
        let mut route = json!({
            "name": "restart",
            "methods": ["POST"],
            "path": "/sites/{site}/restart",
            "inbound": { "api_key": { "keys": [{ "name": "ops", "secret": "OPS_KEY" }] } },
            "backend": { "azure_rest": {
                "url": "https://management.azure.com/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Web/sites/{path.site}/restart",
                "api_version": "2022-09-01",
                "identity": "gw"
            } }
        });
        edit(&mut route["backend"]["azure_rest"]);
        p["routes"].as_array_mut().unwrap().push(route);
    }
}

#[test]
fn an_azure_rest_route_is_valid_on_each_documented_host_with_its_default_audience() {
    for (url, version) in [
        (
            "https://management.azure.com/subscriptions/{path.site}",
            Some("2022-09-01"),
        ),
        ("https://graph.microsoft.com/v1.0/users/{path.site}", None),
        (
            "https://contoso.vault.azure.net/secrets/{path.site}",
            Some("7.4"),
        ),
        (
            "https://contoso.queue.core.windows.net/jobs/messages",
            Some("2021-08-06"),
        ),
        (
            "https://contoso.servicebus.windows.net/telemetry/messages",
            None,
        ),
    ] {
        let errors = errors_after(rest_after(|b| {
            b["url"] = json!(url);
            b["api_version"] = json!(version);
            if version.is_none() {
                b.as_object_mut().unwrap().remove("api_version");
            }
        }));
        assert!(errors.is_empty(), "{url}: {errors:#?}");
    }
}

#[test]
fn azure_rest_rules_name_their_path() {
    let at = "routes[3].backend.azure_rest";
    assert_one_error(
        rest_after(|b| b["url"] = json!("https://example.com/api/{path.site}")),
        &format!("{at}.url"),
        "an https:// URL on an Azure API host of this cloud (management.azure.com, graph.microsoft.com, NAME.vault.azure.net",
    );
    assert_one_error(
        rest_after(|b| b["url"] = json!("https://{path.site}.vault.azure.net/secrets/x")),
        &format!("{at}.url"),
        "host is fixed",
    );
    assert_one_error(
        rest_after(|b| b["audience"] = json!("https://vault.azure.net")),
        &format!("{at}.audience"),
        "an audience Resource Manager accepts: https://management.azure.com/ or https://management.core.windows.net/, got \"https://vault.azure.net\"",
    );
    assert_one_error(
        rest_after(|b| {
            b.as_object_mut().unwrap().remove("api_version");
        }),
        &format!("{at}.api_version"),
        "a pinned API version: Resource Manager versions every call",
    );
    assert_one_error(
        rest_after(|b| {
            b["url"] = json!("https://graph.microsoft.com/v1.0/users/{path.site}");
        }),
        &format!("{at}.api_version"),
        "no api_version: Microsoft Graph takes its version in the path",
    );
    assert_one_error(
        rest_after(|b| b["url"] = json!("https://management.azure.com/subscriptions/x{path.site}")),
        &format!("{at}.url"),
        "one whole variable",
    );
    assert_one_error(
        rest_after(|b| b["url"] = json!("https://management.azure.com/subscriptions/{path.nope}")),
        &format!("{at}.url"),
        "naming a parameter of the route's path",
    );
    assert_one_error(
        rest_after(|b| b["url"] = json!("https://management.azure.com/s?api-version=2020-01-01")),
        &format!("{at}.url"),
        "set \"api_version\"",
    );
    assert_one_error(
        rest_after(|b| b["url"] = json!("http://management.azure.com/subscriptions")),
        &format!("{at}.url"),
        "an https:// URL on an Azure API host",
    );
    assert_one_error(
        rest_after(|b| b["request_headers"] = json!(["authorization"])),
        &format!("{at}.request_headers[0]"),
        "a header name that HTTP, the token or the gateway does not set",
    );
    assert_one_error(
        rest_after(|b| b["headers"] = json!({"x-ms-version": "2020-01-01"})),
        &format!("{at}.headers.x-ms-version"),
        "a header name that HTTP, the token or the gateway does not set",
    );
    assert_one_error(
        rest_after(|b| b["query"] = json!(["api-version"])),
        &format!("{at}.query[0]"),
        "not api-version",
    );
    assert_one_error(
        rest_after(|b| {
            b["url"] = json!("https://management.azure.com/subscriptions/0000/resources?$filter=resourceType%20eq%20'x'");
            b["query"] = json!(["$Filter"]);
        }),
        &format!("{at}.query[0]"),
        "names compare case-insensitively",
    );
    assert_one_error(
        rest_after(|b| b["query"] = json!(["$top", "$TOP"])),
        &format!("{at}.query[1]"),
        "a parameter named once",
    );
    assert_one_error(
        rest_after(|b| b["response_headers"] = json!(["location"])),
        &format!("{at}.response_headers[0]"),
        "does not set or rewrite itself",
    );
    assert_one_error(
        rest_after(|b| {
            b["body"] = json!({"template": {"content_type": "text/plain", "template": "{body}"}})
        }),
        &format!("{at}.body.template.content_type"),
        "a JSON or XML media type",
    );
    assert_one_error(
        rest_after(
            |b| b["body"] = json!({"template": {"content_type": "application/json", "template": "{{\"a\": {path.site}}}"}}),
        ),
        &format!("{at}.body.template"),
        "each variable inside a string",
    );
    assert_one_error(
        rest_after(|b| b["body"] = json!({"json": {"who": "{jwt.sub}"}})),
        &format!("{at}.body.json/who"),
        "only on a route with a \"jwt\" inbound check",
    );
    assert_one_error(
        rest_after(|b| b["project"] = json!(["properties/state"])),
        &format!("{at}.project[0]"),
        "a JSON pointer",
    );
}

#[test]
fn a_local_azure_rest_endpoint_needs_the_audience_of_the_service_it_stands_in_for() {
    let at = "routes[3].backend.azure_rest";
    assert_one_error(
        rest_after(|b| b["url"] = json!("https://127.0.0.1:10000/subscriptions/{path.site}")),
        &format!("{at}.audience"),
        "an audience for a local endpoint",
    );
    assert_one_error(
        rest_after(|b| {
            b["url"] = json!("https://127.0.0.1:10000/subscriptions/{path.site}");
            b["audience"] = json!("https://example.com");
        }),
        &format!("{at}.audience"),
        "the audience of an Azure service of this cloud",
    );
    let errors = errors_after(rest_after(|b| {
        b["url"] = json!("https://127.0.0.1:10000/subscriptions/{path.site}");
        b["audience"] = json!("https://management.azure.com/");
    }));
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn body_variables_are_only_for_azure_rest_bodies_and_operation_routes_follow_azure_rest_routes() {
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["message"] = json!({"label": "{body}"}),
        "routes[0].backend.service_bus.message.label",
        "{body} only in the body template of an azure_rest route",
    );
    let operations = |of: Value, methods: Value, path: &str| {
        let path = path.to_owned();
        move |p: &mut Value| {
            rest_after(|_| {})(p);
            p["routes"].as_array_mut().unwrap().push(json!({
                "name": "operations", "methods": methods, "path": path,
                "inbound": { "api_key": { "keys": [{ "name": "ops", "secret": "OPS_KEY" }] } },
                "backend": { "azure_operation": { "of": of } }
            }));
        }
    };
    assert!(errors_after(operations(
        json!(["restart"]),
        json!(["GET"]),
        "/ops/{operation}"
    ))
    .is_empty());
    assert_one_error(
        operations(json!(["orders"]), json!(["GET"]), "/ops/{operation}"),
        "routes[4].backend.azure_operation.of[0]",
        "the name of an azure_rest route, got \"orders\"",
    );
    assert_one_error(
        operations(json!(["restart"]), json!(["POST"]), "/ops/{operation}"),
        "routes[4].methods",
        "[\"GET\"]",
    );
    assert_one_error(
        operations(json!(["restart"]), json!(["GET"]), "/ops/{id}"),
        "routes[4].path",
        "one parameter, {operation}",
    );
}

#[test]
fn what_a_route_reads_of_answers_and_what_a_template_builds_are_bounded() {
    let at = "routes[3].backend.azure_rest";
    let errors = errors_after(rest_after(|b| {
        b["project"] = json!(["/name"]);
        b["max_answer_bytes"] = json!(1_048_576);
        b["body"] = json!({"template": {"content_type": "application/xml", "template": "<a>{body_base64}</a>"}});
        b["max_built_body_bytes"] = json!(65536);
    }));
    assert!(errors.is_empty(), "{errors:#?}");
    for bad in [0, 1_048_577] {
        assert_one_error(
            rest_after(|b| b["max_answer_bytes"] = json!(bad)),
            &format!("{at}.max_answer_bytes"),
            &format!("a size between 1 and 1048576 bytes (1 MiB: the gateway holds what it reads of an answer; a larger answer can pass through unread, without \"project\"), got {bad}"),
        );
    }
    assert_one_error(
        rest_after(|b| b["max_built_body_bytes"] = json!(1000)),
        &format!("{at}.max_built_body_bytes"),
        "only with a \"json\" or \"template\" body",
    );
    assert_one_error(
        rest_after(|b| {
            b["body"] = json!({"json": {"text": "{body}"}});
            b["max_built_body_bytes"] = json!(2_097_153);
        }),
        &format!("{at}.max_built_body_bytes"),
        "a size between 1 and 2097152 bytes (2 MiB",
    );
    assert_one_error(
        rest_after(|b| b["project"] = json!(["/a~2b"])),
        &format!("{at}.project[0]"),
        "a JSON pointer",
    );
}

#[test]
fn a_followed_operation_shows_nothing_the_route_that_started_it_does_not() {
    // restart projects /id and /name; operations follows it.
    let follow = |project: Option<Value>| {
        move |p: &mut Value| {
            rest_after(|b| b["project"] = json!(["/id", "/name"]))(p);
            let mut op = json!({ "of": ["restart"] });
            if let Some(project) = project {
                op["project"] = project;
            }
            p["routes"].as_array_mut().unwrap().push(json!({
                "name": "operations", "methods": ["GET"], "path": "/ops/{operation}",
                "inbound": { "api_key": { "keys": [{ "name": "ops", "secret": "OPS_KEY" }] } },
                "backend": { "azure_operation": op }
            }));
        }
    };
    assert!(errors_after(follow(None)).is_empty());
    // The operation's own fields, and what the route shows.
    assert!(errors_after(follow(Some(json!([
        "/status",
        "/error/message",
        "/name",
        "/id"
    ]))))
    .is_empty());
    assert_one_error(
        follow(Some(json!(["/status", "/properties"]))),
        "routes[4].backend.azure_operation.project[1]",
        "one of the operation's own fields (/status, /error/code, /error/message, /startTime, /endTime) or a pointer within what route \"restart\" shows (its project: /id, /name), got \"/properties\"",
    );
    assert_one_error(
        follow(Some(json!(["/names"]))),
        "routes[4].backend.azure_operation.project[0]",
        "got \"/names\"",
    );
    assert_one_error(
        follow(Some(json!(["status"]))),
        "routes[4].backend.azure_operation.project[0]",
        "a JSON pointer such as \"/status\", got \"status\"",
    );
}

// ---------------------------------------------------------------------------------------------
// Event Hubs and Storage queue routes

/// Adds an event hub route (routes[3]) and a Storage queue route (routes[4]) to the base policy.
fn with_message_routes(p: &mut Value) {
    let routes = p["routes"].as_array_mut().unwrap();
    routes.push(json!({
        "name": "telemetry",
        "methods": ["POST"],
        "path": "/telemetry/{device}",
        "inbound": { "api_key": { "keys": [{ "name": "k", "secret": "TELEMETRY_KEY" }] } },
        "backend": { "event_hubs": {
            "namespace": "contoso-events", "hub": "telemetry", "identity": "gw",
            "partition_key": "{path.device}", "properties": { "device": "{path.device}" },
            "batch": true, "max_message_bytes": 262144
        } }
    }));
    routes.push(json!({
        "name": "jobs",
        "methods": ["POST"],
        "path": "/jobs",
        "inbound": { "api_key": { "keys": [{ "name": "k", "secret": "JOBS_KEY" }] } },
        "backend": { "storage_queue": {
            "account": "contosojobs", "queue": "jobs", "identity": "cert",
            "visibility_timeout_seconds": 30, "message_ttl_seconds": 3600,
            "encoding": "text", "max_body_bytes": 65536
        } }
    }));
}

#[track_caller]
fn assert_one_message_route_error(change: impl FnOnce(&mut Value), path: &str, expected: &str) {
    assert_one_error(
        |p| {
            with_message_routes(p);
            change(p)
        },
        path,
        expected,
    );
}

const EH: &str = "event_hubs";
const SQ: &str = "storage_queue";

#[test]
fn event_hubs_and_storage_queue_routes_are_valid_and_prepared() {
    assert_eq!(errors_after(with_message_routes), Vec::<String>::new());
    let mut p = base();
    with_message_routes(&mut p);
    let policy = policy::load(&p.to_string()).unwrap();
    let explained: Vec<(&str, String, String)> = policy.routes[3..]
        .iter()
        .map(|r| {
            (
                r.backend.kind(),
                r.backend.target(policy.cloud),
                r.backend.audience(policy.cloud),
            )
        })
        .collect();
    assert_eq!(
        explained,
        vec![
            (
                "event_hubs",
                "https://contoso-events.servicebus.windows.net/telemetry".to_owned(),
                "https://eventhubs.azure.net".to_owned()
            ),
            (
                "storage_queue",
                "https://contosojobs.queue.core.windows.net/jobs".to_owned(),
                "https://storage.azure.com".to_owned()
            ),
        ]
    );
    let prepared = policy::compile(&p.to_string()).unwrap();
    let json = serde_json::to_value(&prepared.routes[3..]).unwrap();
    assert_eq!(
        json[0]["backend"]["EventHubs"]["send_url"],
        "https://contoso-events.servicebus.windows.net/telemetry/messages"
    );
    assert_eq!(json[0]["backend"]["EventHubs"]["flavor"], "EventHubs");
    assert_eq!(
        json[0]["backend"]["EventHubs"]["token"]["key"]["scope"],
        "https://eventhubs.azure.net/.default"
    );
    assert_eq!(
        json[1]["backend"]["StorageQueue"]["send_url"],
        "https://contosojobs.queue.core.windows.net/jobs/messages?visibilitytimeout=30&messagettl=3600"
    );
}

#[test]
fn storage_queue_hosts_follow_the_cloud() {
    let mut p = base();
    with_message_routes(&mut p);
    p["cloud"] = json!("china");
    // The base's blob route names a public-cloud audience.
    p["routes"][1]["backend"]["blob"]
        .as_object_mut()
        .unwrap()
        .remove("audience");
    p["routes"][3]["backend"][EH]["audience"] =
        json!("https://contoso-events.servicebus.chinacloudapi.cn");
    p["routes"][4]["backend"][SQ]["audience"] =
        json!("https://contosojobs.queue.core.chinacloudapi.cn");
    let policy = policy::load(&p.to_string()).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(
        policy.routes[4].backend.target(policy.cloud),
        "https://contosojobs.queue.core.chinacloudapi.cn/jobs"
    );
    p["cloud"] = json!("us_government");
    p["routes"][4]["backend"][SQ]["audience"] =
        json!("https://contosojobs.queue.core.usgovcloudapi.net");
    p["routes"][3]["backend"][EH]
        .as_object_mut()
        .unwrap()
        .remove("audience");
    if let Err(e) = policy::load(&p.to_string()) {
        panic!("{e:#?}");
    }
}

#[test]
fn event_hubs_names_hosts_and_audiences_are_checked() {
    assert_one_message_route_error(
        |p| p["routes"][3]["backend"][EH]["hub"] = json!("-hub"),
        "routes[3].backend.event_hubs.hub",
        "an event hub name: 1-256 letters, digits, '.', '-' or '_', starting and ending with a letter or digit, got \"-hub\"",
    );
    assert_one_message_route_error(
        |p| p["routes"][3]["backend"][EH]["namespace"] = json!("ns"),
        "routes[3].backend.event_hubs.namespace",
        "a namespace name: 6-50 letters",
    );
    assert_one_message_route_error(
        |p| {
            let b = p["routes"][3]["backend"][EH].as_object_mut().unwrap();
            b.remove("namespace");
            b.insert("endpoint".into(), json!("https://evil.example.com"));
        },
        "routes[3].backend.event_hubs.endpoint",
        "https://NAME.servicebus.windows.net (the host of this cloud, no path) or an origin listed in local_endpoints, got \"https://evil.example.com\"",
    );
    assert_one_message_route_error(
        |p| {
            p["routes"][3]["backend"][EH]["endpoint"] =
                json!("https://contoso-events.servicebus.windows.net")
        },
        "routes[3].backend.event_hubs",
        "either \"namespace\" or \"endpoint\", not both",
    );
    assert_one_message_route_error(
        |p| p["routes"][3]["backend"][EH]["audience"] = json!("https://servicebus.azure.net"),
        "routes[3].backend.event_hubs.audience",
        "an audience Event Hubs accepts: https://eventhubs.azure.net or https://contoso-events.servicebus.windows.net, got \"https://servicebus.azure.net\"",
    );
    assert_one_message_route_error(
        |p| p["routes"][3]["backend"][EH]["identity"] = json!("nobody"),
        "routes[3].backend.event_hubs.identity",
        "the name of an identity under \"identities\" (defined: cert, gw), got \"nobody\"",
    );
    assert_one_message_route_error(
        |p| p["routes"][3]["backend"][EH]["max_message_bytes"] = json!(2_000_000),
        "routes[3].backend.event_hubs.max_message_bytes",
        "a size between 1024 and 1048576 bytes (1 MB, Event Hubs' largest event or batch), got 2000000",
    );
}

#[test]
fn event_hubs_templates_and_properties_follow_the_service_bus_rules() {
    assert_one_message_route_error(
        |p| p["routes"][3]["backend"][EH]["partition_key"] = json!("{path.tenant}"),
        "routes[3].backend.event_hubs.partition_key",
        "{path.NAME} naming a parameter of the route's path (the path has device), got {path.tenant}",
    );
    assert_one_message_route_error(
        |p| p["routes"][3]["backend"][EH]["properties"]["BrokerProperties"] = json!("x"),
        "routes[3].backend.event_hubs.properties.BrokerProperties",
        "a property name that is an HTTP header name and not one HTTP or Service Bus reserves, got \"BrokerProperties\"",
    );
    assert_one_message_route_error(
        |p| p["routes"][3]["backend"][EH]["properties"]["who"] = json!("{jwt.sub}"),
        "routes[3].backend.event_hubs.properties.who",
        "{jwt.CLAIM} only on a route with a \"jwt\" inbound check",
    );
    // Service Bus-only fields are not part of an event hub's shape.
    let errors = errors_after(|p| {
        with_message_routes(p);
        p["routes"][3]["backend"][EH]["session_id"] = json!("{path.device}");
    });
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with("routes[3].backend.event_hubs"),
        "{errors:#?}"
    );
    assert!(errors[0].contains("session_id"), "{errors:#?}");
}

#[test]
fn storage_queue_names_hosts_and_audiences_are_checked() {
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["queue"] = json!("Jobs_1"),
        "routes[4].backend.storage_queue.queue",
        "a queue name: 3-63 lowercase letters, digits or single hyphens, starting and ending with a letter or digit, got \"Jobs_1\"",
    );
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["account"] = json!("Contoso"),
        "routes[4].backend.storage_queue.account",
        "a storage account name: 3-24 lowercase letters or digits, got \"Contoso\"",
    );
    assert_one_message_route_error(
        |p| {
            let b = p["routes"][4]["backend"][SQ].as_object_mut().unwrap();
            b.remove("account");
            b.insert("endpoint".into(), json!("https://contosojobs.blob.core.windows.net"));
        },
        "routes[4].backend.storage_queue.endpoint",
        "https://NAME.queue.core.windows.net (the host of this cloud, no path) or an origin listed in local_endpoints",
    );
    // A declared local endpoint (Azurite) may have the account in its path.
    let errors = errors_after(|p| {
        with_message_routes(p);
        let b = p["routes"][4]["backend"][SQ].as_object_mut().unwrap();
        b.remove("account");
        b.insert(
            "endpoint".into(),
            json!("https://127.0.0.1:10000/devstoreaccount1"),
        );
    });
    assert_eq!(errors, Vec::<String>::new());
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["audience"] = json!("https://contosojobs.blob.core.windows.net"),
        "routes[4].backend.storage_queue.audience",
        "an audience Queue Storage accepts: https://storage.azure.com or https://contosojobs.queue.core.windows.net, got \"https://contosojobs.blob.core.windows.net\"",
    );
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["identity"] = json!("nobody"),
        "routes[4].backend.storage_queue.identity",
        "got \"nobody\"",
    );
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["encoding"] = json!("utf16"),
        "routes[4].backend.storage_queue.encoding",
        "base64",
    );
}

#[test]
fn storage_queue_timing_follows_azure_rules() {
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["visibility_timeout_seconds"] = json!(604_801),
        "routes[4].backend.storage_queue.visibility_timeout_seconds",
        "0 to 604800 seconds (7 days, Azure's limit), got 604801",
    );
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["visibility_timeout_seconds"] = json!(3600),
        "routes[4].backend.storage_queue.visibility_timeout_seconds",
        "less than the message's time to live (3600 seconds: message_ttl_seconds)",
    );
    assert_one_message_route_error(
        |p| {
            let b = p["routes"][4]["backend"][SQ].as_object_mut().unwrap();
            b.remove("message_ttl_seconds");
            b.insert("visibility_timeout_seconds".into(), json!(604_800));
        },
        "routes[4].backend.storage_queue.visibility_timeout_seconds",
        "the default time to live, 7 days",
    );
    for ttl in [0, -2] {
        assert_one_message_route_error(
            |p| p["routes"][4]["backend"][SQ]["message_ttl_seconds"] = json!(ttl),
            "routes[4].backend.storage_queue.message_ttl_seconds",
            &format!("a time to live of at least 1 second, or -1 for messages that never expire, got {ttl}"),
        );
    }
    // Never expiring messages may be hidden for up to 7 days.
    let errors = errors_after(|p| {
        with_message_routes(p);
        p["routes"][4]["backend"][SQ]["message_ttl_seconds"] = json!(-1);
        p["routes"][4]["backend"][SQ]["visibility_timeout_seconds"] = json!(604_800);
    });
    assert_eq!(errors, Vec::<String>::new());
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["visibility_timeout_seconds"] = json!(-5),
        "routes[4].backend.storage_queue.visibility_timeout_seconds",
        "",
    );
}

#[test]
fn storage_queue_bodies_must_fit_azures_64_kib_once_encoded() {
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["max_body_bytes"] = json!(65_537),
        "routes[4].backend.storage_queue.max_body_bytes",
        "a size between 1 and 65536 bytes (the largest body whose text message text fits Azure's 64 KiB), got 65537",
    );
    // Base64 takes 4 bytes for every 3: the same 64 KiB body no longer fits.
    assert_one_message_route_error(
        |p| {
            p["routes"][4]["backend"][SQ]
                .as_object_mut()
                .unwrap()
                .remove("encoding");
        },
        "routes[4].backend.storage_queue.max_body_bytes",
        "a size between 1 and 49152 bytes (the largest body whose base64 message text fits Azure's 64 KiB), got 65536",
    );
    assert_one_message_route_error(
        |p| p["routes"][4]["backend"][SQ]["max_body_bytes"] = json!(0),
        "routes[4].backend.storage_queue.max_body_bytes",
        "got 0",
    );
}

/// The worker loads the compiled policy from the bytes build.rs writes: every shipped policy
/// comes back from them whole (encoding what was loaded gives the same bytes again).
#[test]
fn the_compiled_policy_survives_the_bytes_the_worker_embeds() {
    use azure_edge_gateway::policy::{compile, prepared::Prepared};
    for file in [
        "policy.json",
        "dev/policy.json",
        "tests/e2e/fixtures/azure-rest-policy.json",
        "tests/e2e/fixtures/queues-policy.json",
        "tests/e2e/fixtures/inbound-policy.json",
        "tests/e2e/fixtures/hardening-policy.json",
    ] {
        let prepared = compile(&std::fs::read_to_string(file).unwrap()).unwrap();
        let bytes = prepared.to_bytes().unwrap();
        let loaded = Prepared::load(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(loaded.to_bytes().unwrap(), bytes, "{file}");
        assert_eq!(loaded.routes.len(), prepared.routes.len(), "{file}");
    }
    assert!(Prepared::load(b"not a policy").is_err());
}

/// `policy check` says which store-and-forward routes accept bodies too large to be stored.
#[test]
fn policy_check_notes_bodies_too_large_to_store() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_policy"))
        .args(["check", "tests/e2e/fixtures/store-forward-policy.json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("valid (3 route(s)"), "{text}");
    let notes: Vec<&str> = text.lines().filter(|l| l.contains(": note: ")).collect();
    assert_eq!(notes.len(), 2, "{text}");
    assert!(
        notes[0].contains(
            "routes[0] (\"orders\") accepts bodies up to 262144 bytes, but only those up to 98304"
        ),
        "{text}"
    );
    assert!(
        notes[1].contains("routes[2] (\"files\") accepts bodies up to 104857600 bytes"),
        "{text}"
    );
    // A policy without store-and-forward has no notes.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_policy"))
        .args(["check", "policy.json"])
        .output()
        .unwrap();
    assert!(!String::from_utf8(out.stdout).unwrap().contains("note:"));
}

#[test]
fn a_service_bus_route_stores_requests_only_with_duplicate_detection_declared() {
    assert_one_error(
        |p| p["routes"][0]["when_unavailable"] = json!("queue"),
        "routes[0].backend.service_bus.duplicate_detection",
        "true for a route that stores requests",
    );
    assert_eq!(
        errors_after(|p| {
            p["routes"][0]["when_unavailable"] = json!("queue");
            p["routes"][0]["backend"]["service_bus"]["duplicate_detection"] = json!(true);
        }),
        Vec::<String>::new()
    );
}

#[test]
fn explain_says_which_routes_send_again_after_an_unknown_outcome() {
    let mut p = base();
    p["routes"][0]["backend"]["service_bus"]["duplicate_detection"] = json!(true);
    let routes = p["routes"].as_array_mut().unwrap();
    routes.push(json!({ "name": "plain", "methods": ["POST"], "path": "/plain", "public": true,
        "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "plain", "identity": "gw" } } }));
    let (code, out, _) = run_policy_tool("explain", "resend-policy.json", &p);
    assert_eq!(code, Some(0), "{out}");
    let section = out
        .split_once(
            "\nAfter a timeout, a lost connection or a 500 (Azure may have carried it out):\n",
        )
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no resend section in:\n{out}"));
    assert!(
        section.contains("  orders: sent again, same MessageId (the entity's duplicate detection drops a second copy)\n"),
        "{section}"
    );
    assert!(
        section.contains("  plain: not sent again (no duplicate_detection declared): the caller gets backend-outcome-unknown (502/504)\n"),
        "{section}"
    );
}

/// `policy check` warns of each store-and-forward route without a rate limit (one caller could
/// fill the queue while Azure is down), and not of one with a rate limit or of a route that
/// does not store requests; the policy is still valid.
#[test]
fn policy_check_warns_when_a_storing_route_has_no_rate_limit() {
    let check = |policy: &Value| {
        let dir = std::env::temp_dir().join(format!("aeg-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("warn.json");
        std::fs::write(&file, policy.to_string()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_policy"))
            .arg("check")
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "a warning is not an error: {text}");
        text.lines()
            .filter(|l| l.contains(": warning: "))
            .map(|l| l.split_once(": warning: ").unwrap().1.to_owned())
            .collect::<Vec<_>>()
    };
    let mut policy = base();
    policy["routes"][0]["when_unavailable"] = json!("queue");
    policy["routes"][0]["backend"]["service_bus"]["duplicate_detection"] = json!(true);
    let warnings = check(&policy);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].starts_with(&format!(
            "routes[0] (\"{}\") stores requests when Azure is unavailable but has no rate limit",
            policy["routes"][0]["name"].as_str().unwrap()
        )),
        "{warnings:#?}"
    );
    assert!(
        warnings[0].ends_with("add inbound.rate_limit"),
        "{warnings:#?}"
    );
    // With a rate limit (the route's own, or the policy's default), no warning.
    policy["inbound"] = json!({ "rate_limit": { "binding": "RL", "key": "client_ip", "limit": 10, "period_seconds": 60 } });
    assert_eq!(check(&policy), Vec::<String>::new());
}

#[test]
fn coalescing_is_not_for_batch_routes_and_its_limits_are_bounded() {
    assert_one_error(
        |p| {
            let sb = &mut p["routes"][0]["backend"]["service_bus"];
            sb["batch"] = json!(true);
            sb["coalesce"] = json!(true);
        },
        "routes[0].backend.service_bus.coalesce",
        "false or absent on a batch route",
    );
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["linger_ms"] = json!(5000),
        "routes[0].backend.service_bus.linger_ms",
        "a time between 0 and 1000 milliseconds, got 5000",
    );
    assert_one_error(
        |p| p["routes"][0]["backend"]["service_bus"]["max_batch_messages"] = json!(1),
        "routes[0].backend.service_bus.max_batch_messages",
        "a number of messages between 2 and 1000, got 1",
    );
    // Off, tuned, or a batch route that leaves it alone: all valid.
    for change in [
        json!({ "coalesce": false }),
        json!({ "linger_ms": 5, "max_batch_messages": 500 }),
        json!({ "batch": true }),
    ] {
        let errors = errors_after(|p| {
            let sb = p["routes"][0]["backend"]["service_bus"]
                .as_object_mut()
                .unwrap();
            sb.extend(change.as_object().unwrap().clone());
        });
        assert!(errors.is_empty(), "{change}: {errors:?}");
    }
}

/// The base policy with a valet-key route (index 3) whose backend `change` edits.
fn valet_errors(change: impl FnOnce(&mut Value)) -> Vec<String> {
    errors_after(|p| {
        p["routes"].as_array_mut().unwrap().push(json!({
            "name": "upload-url",
            "methods": ["POST"],
            "path": "/upload-url/{tenant}/{name}",
            "inbound": { "api_key": { "keys": [{ "name": "a", "secret": "FILES_KEY" }] } },
            "backend": { "blob_sas": {
                "account": "contosofiles", "container": "uploads",
                "blob": "{path.tenant}/{path.name}", "permission": "create", "identity": "gw"
            } }
        }));
        change(&mut p["routes"][3]["backend"]["blob_sas"]);
    })
}

#[track_caller]
fn assert_one_valet_error(change: impl FnOnce(&mut Value), field: &str, expected: &str) {
    let path = format!("routes[3].backend.blob_sas{field}");
    assert_only_error(valet_errors(change), &path, expected);
}

#[test]
fn valet_routes_take_the_blob_checks_and_a_closed_set_of_permissions() {
    assert_eq!(valet_errors(|_| {}), Vec::<String>::new());
    assert_one_valet_error(
        |b| b["blob"] = json!("{path.tenant}/../{path.name}"),
        ".blob",
        "without '.' or '..' segments",
    );
    assert_one_valet_error(
        |b| b["container"] = json!("Up_Loads"),
        ".container",
        "3-63 lowercase",
    );
    assert_one_valet_error(|b| b["blob"] = json!("{path.nope}"), ".blob", "nope");
    assert_one_valet_error(|b| b["identity"] = json!("ghost"), ".identity", "ghost");
    // A permission string is not a permission.
    let errors = valet_errors(|b| b["permission"] = json!("racwd"));
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("create") && errors[0].contains("read"),
        "{errors:#?}"
    );
    assert_one_valet_error(
        |b| b["lifetime_seconds"] = json!(3601),
        ".lifetime_seconds",
        "between 60 and 3600 seconds",
    );
    assert_one_valet_error(
        |b| b["lifetime_seconds"] = json!(59),
        ".lifetime_seconds",
        "got 59",
    );
    assert_one_valet_error(
        |b| b["response_content_disposition"] = json!("attachment"),
        ".response_content_disposition",
        "only on a \"read\" route",
    );
    assert_eq!(
        valet_errors(|b| {
            b["permission"] = json!("read");
            b["response_content_disposition"] = json!("attachment; filename=\"{path.name}\"");
            b["response_content_type"] = json!("{header.accept}");
            b["client_ip"] = json!(true);
            b["lifetime_seconds"] = json!(3600);
        }),
        Vec::<String>::new()
    );
    assert_one_valet_error(
        |b| {
            b.as_object_mut().unwrap().remove("account");
            b["endpoint"] = json!("https://127.0.0.1:10000/");
        },
        ".endpoint",
        "names the account",
    );
    assert_eq!(
        valet_errors(|b| {
            b.as_object_mut().unwrap().remove("account");
            b["endpoint"] = json!("https://127.0.0.1:10000/devstoreaccount1");
        }),
        Vec::<String>::new()
    );
}

#[test]
fn a_valet_route_without_protection_or_storing_requests_is_refused() {
    let errors = errors_after(|p| {
        p["routes"].as_array_mut().unwrap().push(json!({
            "name": "open", "methods": ["POST"], "path": "/open/{name}",
            "backend": { "blob_sas": { "account": "contosofiles", "container": "uploads",
                "blob": "{path.name}", "permission": "create_write", "identity": "gw" } }
        }));
    });
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("open relay"), "{errors:#?}");
    let errors = valet_errors(|_| {});
    assert!(errors.is_empty());
    let errors = errors_after(|p| {
        p["routes"].as_array_mut().unwrap().push(json!({
            "name": "q", "methods": ["POST"], "path": "/q/{name}", "public": true, "when_unavailable": "queue",
            "backend": { "blob_sas": { "account": "contosofiles", "container": "uploads",
                "blob": "{path.name}", "permission": "create", "identity": "gw" } }
        }));
    });
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("when_unavailable"), "{errors:#?}");
}

/// The base policy with one more `azure_rest` route (index 3).
fn with_rest(route: Value) -> Value {
    let mut p = base();
    p["routes"].as_array_mut().unwrap().push(route);
    p
}

fn rest_route(name: &str, path: &str, backend: Value) -> Value {
    json!({ "name": name, "methods": ["GET"], "path": path,
        "inbound": { "api_key": { "keys": [{ "name": "a", "secret": "FILES_KEY" }] } },
        "backend": { "azure_rest": backend } })
}

#[test]
fn paging_projection_of_items_and_answers_without_body_are_checked() {
    let sites = json!({ "identity": "gw", "api_version": "2022-09-01", "pages": true,
        "project_items": ["/name"],
        "url": "https://management.azure.com/subscriptions/{path.sub}/resourceGroups/{path.rg}/providers/Microsoft.Web/sites" });
    let ok = with_rest(rest_route("sites", "/sites/{sub}/{rg}", sites.clone()));
    assert_eq!(policy::load(&ok.to_string()).err().map(|e| e.len()), None);
    let errors_of = |route: Value| -> Vec<String> {
        match policy::load(&with_rest(route).to_string()) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    };
    let mut post = rest_route("sites", "/sites/{sub}/{rg}", sites.clone());
    post["methods"] = json!(["POST"]);
    assert_only_error(
        errors_of(post),
        "routes[3].backend.azure_rest.pages",
        "unless the route sends GET",
    );
    let mut bad = sites.clone();
    bad["project_items"] = json!(["name"]);
    assert_only_error(
        errors_of(rest_route("sites", "/sites/{sub}/{rg}", bad)),
        "routes[3].backend.azure_rest.project_items[0]",
        "a JSON pointer within each element",
    );
    let mut both = sites.clone();
    both["project"] = json!(["/value/0/name"]);
    assert_only_error(
        errors_of(rest_route("sites", "/sites/{sub}/{rg}", both)),
        "routes[3].backend.azure_rest.project",
        "no pointer into /value",
    );
    let mut page_param = sites.clone();
    page_param["query"] = json!(["Page"]);
    assert_only_error(
        errors_of(rest_route("sites", "/sites/{sub}/{rg}", page_param)),
        "routes[3].backend.azure_rest.query",
        "no parameter named \"page\"",
    );
    let mut none = sites.clone();
    none["response_body"] = json!("none");
    assert_only_error(
        errors_of(rest_route("sites", "/sites/{sub}/{rg}", none)),
        "routes[3].backend.azure_rest.response_body",
        "\"pass\" on a route that projects or pages",
    );
}

#[test]
fn explain_warns_of_answers_that_carry_receipts_or_secrets_and_tells_how_lists_page() {
    let route = |name: &str, url: &str, extra: Value| {
        let mut backend = json!({ "identity": "gw", "url": url });
        for (k, v) in extra.as_object().unwrap() {
            backend[k] = v.clone();
        }
        rest_route(name, &format!("/{name}"), backend)
    };
    let mut p = base();
    p["local_endpoints"] = json!([]);
    let routes = p["routes"].as_array_mut().unwrap();
    routes.truncate(2);
    routes.extend([
        route("enqueue", "https://contoso.queue.core.windows.net/jobs/messages", json!({ "api_version": "2021-08-06", "method": "POST" })),
        route("enqueue-quiet", "https://contoso.queue.core.windows.net/jobs/messages", json!({ "api_version": "2021-08-06", "method": "POST", "response_body": "none" })),
        route("secret", "https://contoso.vault.azure.net/secrets/db-password", json!({ "api_version": "7.4" })),
        route("secret-meta", "https://contoso.vault.azure.net/secrets/db-password", json!({ "api_version": "7.4", "project": ["/id", "/attributes"] })),
        route("keys", "https://management.azure.com/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/a/listKeys", json!({ "api_version": "2023-01-01", "method": "POST" })),
        route("sites", "https://management.azure.com/subscriptions/s/resourceGroups/rg/providers/Microsoft.Web/sites", json!({ "api_version": "2022-09-01", "pages": true, "project_items": ["/name"] })),
    ]);
    let (code, out, err) = run_policy_tool("explain", "secrets-policy.json", &p);
    assert_eq!(code, Some(0), "{out}{err}");
    // A route's block: its line in the azure_rest section and the indented lines under it.
    let block = |name: &str| -> String {
        let section = out.split_once("azure_rest routes:").map_or("", |(_, s)| s);
        let mut lines = section
            .lines()
            .skip_while(|l| !l.starts_with(&format!("  {name}: ")));
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("no {name} in:\n{out}"));
        std::iter::once(first)
            .chain(lines.take_while(|l| l.starts_with("    ")))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        block("enqueue").contains("WARNING") && block("enqueue").contains("PopReceipt"),
        "{}",
        block("enqueue")
    );
    assert!(
        !block("enqueue-quiet").contains("WARNING"),
        "{}",
        block("enqueue-quiet")
    );
    assert!(
        block("enqueue-quiet").contains("no body"),
        "{}",
        block("enqueue-quiet")
    );
    assert!(block("secret").contains("WARNING") && block("secret").contains("secret's value"));
    assert!(!block("secret-meta").contains("WARNING"));
    assert!(block("keys").contains("WARNING") && block("keys").contains("account keys"));
    let sites = block("sites");
    assert!(!sites.contains("WARNING"), "{sites}");
    assert!(
        sites.contains("pages: Azure's nextLink") && sites.contains("/sites?page=<handle>"),
        "{sites}"
    );
    assert!(sites.contains("/name of each element of /value"), "{sites}");
}
