//! Route matching as a caller sees it: which route answers, with which parameters, and the
//! 404 / 405 answers when none does.

use azure_edge_gateway::pipeline::Gateway;

fn gateway() -> Gateway {
    let route = |name: &str, methods: &str, path: &str| {
        format!(
            r#"{{ "name": "{name}", "methods": {methods}, "path": "{path}", "public": true,
                 "backend": {{ "service_bus": {{ "namespace": "contoso-orders", "queue": "q", "identity": "gw" }} }} }}"#
        )
    };
    let routes = [
        route("create", r#"["POST"]"#, "/orders/{tenant}"),
        route("read", r#"["GET", "HEAD"]"#, "/orders/{tenant}/{id}"),
        route("new", r#"["PUT"]"#, "/orders/new"),
        route("root", r#"["GET"]"#, "/"),
        route("odd", r#"["DELETE"]"#, "/a b/caf%C3%A9"),
    ];
    let policy = format!(
        r#"{{ "identities": {{ "gw": {{ "token_endpoint": {{ "url": "https://idp.example.com/token" }},
              "client_id": "c", "credential": {{ "client_secret": {{ "secret": "S" }} }} }} }},
              "routes": [{}] }}"#,
        routes.join(",")
    );
    Gateway::load(&policy).unwrap_or_else(|e| panic!("{e:?}"))
}

fn matched(method: &str, path: &str) -> (String, Vec<(String, String)>) {
    let g = gateway();
    let m = g
        .route(method, path)
        .unwrap_or_else(|p| panic!("{method} {path}: {p:?}"));
    (m.route.name.clone(), m.params)
}

fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn path_parameters_are_captured_by_name() {
    assert_eq!(
        matched("POST", "/orders/contoso"),
        ("create".into(), params(&[("tenant", "contoso")]))
    );
    assert_eq!(
        matched("GET", "/orders/contoso/42"),
        (
            "read".into(),
            params(&[("tenant", "contoso"), ("id", "42")])
        )
    );
    assert_eq!(matched("GET", "/"), ("root".into(), vec![]));
}

#[test]
fn percent_encoded_segments_are_decoded_after_splitting() {
    // %2F stays inside its segment: it cannot add a level to the path.
    assert_eq!(
        matched("POST", "/orders/a%2Fb"),
        ("create".into(), params(&[("tenant", "a/b")]))
    );
    assert_eq!(
        matched("POST", "/orders/caf%C3%A9"),
        ("create".into(), params(&[("tenant", "café")]))
    );
    // Literals are compared decoded, so either spelling reaches the route.
    assert_eq!(matched("DELETE", "/a%20b/caf%C3%A9").0, "odd");
    let g = gateway();
    let bad = g.route("POST", "/orders/%E9").unwrap_err();
    assert_eq!((bad.status, bad.kind), (400, "bad-path"));
    assert_eq!(g.route("POST", "/orders/%zz").unwrap_err().status, 400);
}

#[test]
fn a_trailing_slash_is_ignored() {
    assert_eq!(matched("POST", "/orders/contoso/").0, "create");
    assert_eq!(matched("PUT", "/orders/new/").0, "new");
}

#[test]
fn a_literal_segment_wins_over_a_parameter() {
    assert_eq!(matched("PUT", "/orders/new").0, "new");
    assert_eq!(
        matched("POST", "/orders/new"),
        ("create".into(), params(&[("tenant", "new")]))
    );
}

#[test]
fn an_unknown_path_is_404_problem() {
    let g = gateway();
    for path in ["/nothing", "/orders", "/orders/a/b/c", "/orders//x"] {
        let p = g.route("GET", path).unwrap_err();
        assert_eq!((p.status, p.kind), (404, "route-not-found"), "{path}");
        assert!(p.headers.is_empty());
    }
}

#[test]
fn a_known_path_with_another_method_is_405_with_allow() {
    let g = gateway();
    let p = g.route("DELETE", "/orders/contoso/42").unwrap_err();
    assert_eq!(p.status, 405);
    assert_eq!(p.headers, vec![("allow", "GET, HEAD".to_owned())]);
    // Allow lists every route that has the path: /orders/new is both PUT (literal) and POST.
    let p = g.route("GET", "/orders/new").unwrap_err();
    assert_eq!(p.headers, vec![("allow", "POST, PUT".to_owned())]);
    // Methods a route can never have are still 405, not 404.
    assert_eq!(g.route("BREW", "/orders/x").unwrap_err().status, 405);
}

#[test]
fn an_invalid_policy_does_not_load_at_all() {
    // No gateway is made from an invalid policy (build.rs refuses to build the worker).
    let errors = Gateway::load(
        r#"{ "routes": [{ "name": "x", "methods": ["GET"], "path": "/x", "backend": {} }] }"#,
    )
    .err()
    .unwrap();
    assert!(!errors.is_empty());
}

#[test]
fn a_preflight_for_a_method_the_route_lacks_is_a_cors_refusal_not_a_405() {
    let g = gateway();
    let p = g.preflight_route("DELETE", "/orders/contoso").unwrap_err();
    assert_eq!((p.status, p.kind), (403, "cors-rejected"));
    assert!(p.detail.contains("DELETE"), "{}", p.detail);
    // A method the route has finds it; an unknown path stays a 404.
    assert_eq!(
        g.preflight_route("POST", "/orders/contoso")
            .unwrap()
            .route
            .name,
        "create"
    );
    assert_eq!(
        g.preflight_route("POST", "/nowhere").unwrap_err().status,
        404
    );
}
