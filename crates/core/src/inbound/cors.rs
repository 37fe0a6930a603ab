//! CORS: preflight requests answered by the gateway (no backend, no token), and the headers
//! that let a browser read an answer.

use crate::policy::{Cors, Method};
use crate::problem::Problem;

/// Request headers a browser may send cross-origin without asking.
const SAFELISTED: &[&str] = &[
    "accept",
    "accept-language",
    "content-language",
    "content-type",
];
/// Response headers a browser may read besides the safelisted ones.
const EXPOSED: &str = "x-request-id, location, etag, retry-after";

fn origin_allowed(cors: &Cors, origin: &str) -> bool {
    cors.origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

fn allow_origin(cors: &Cors, origin: &str) -> String {
    if cors.origins.iter().any(|o| o == "*") {
        "*".to_owned()
    } else {
        origin.to_owned()
    }
}

fn rejected(detail: String) -> Problem {
    Problem::new(
        403,
        "cors-rejected",
        "Cross-origin request not allowed",
        detail,
    )
}

/// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`) for a route with
/// these methods: the 204's headers, or 403.
pub fn preflight(
    cors: &Cors,
    route_methods: &[Method],
    origin: Option<&str>,
    request_method: &str,
    request_headers: Option<&str>,
) -> Result<Vec<(&'static str, String)>, Problem> {
    let origin =
        origin.ok_or_else(|| rejected("A preflight request needs an Origin header.".into()))?;
    if !origin_allowed(cors, origin) {
        return Err(rejected(format!(
            "The origin {origin} may not call this route."
        )));
    }
    let methods: Vec<Method> = if cors.methods.is_empty() {
        route_methods.to_vec()
    } else {
        cors.methods.clone()
    };
    if !methods.iter().any(|m| m.as_str() == request_method) {
        return Err(rejected(format!(
            "{request_method} is not allowed cross-origin on this route."
        )));
    }
    let requested: Vec<String> = request_headers
        .unwrap_or_default()
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    if let Some(h) = requested.iter().find(|h| {
        !SAFELISTED.contains(&h.as_str()) && !cors.headers.iter().any(|a| a.eq_ignore_ascii_case(h))
    }) {
        return Err(rejected(format!(
            "The header {h} is not allowed cross-origin on this route."
        )));
    }
    let method_list: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
    let mut headers = vec![
        ("access-control-allow-origin", allow_origin(cors, origin)),
        ("access-control-allow-methods", method_list.join(", ")),
        (
            "access-control-max-age",
            cors.max_age_seconds.unwrap_or(600).to_string(),
        ),
        ("vary", "Origin".to_owned()),
    ];
    if !requested.is_empty() {
        headers.push(("access-control-allow-headers", requested.join(", ")));
    }
    Ok(headers)
}

/// Headers for an actual (non-preflight) answer to an allowed origin; none for others.
pub fn response_headers(cors: &Cors, origin: Option<&str>) -> Vec<(&'static str, String)> {
    match origin {
        Some(origin) if origin_allowed(cors, origin) => vec![
            ("access-control-allow-origin", allow_origin(cors, origin)),
            ("access-control-expose-headers", EXPOSED.to_owned()),
            ("vary", "Origin".to_owned()),
        ],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> Cors {
        Cors {
            origins: origins.iter().map(|s| s.to_string()).collect(),
            methods: vec![],
            headers: vec!["x-api-key".into()],
            max_age_seconds: None,
        }
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_gets_the_methods_and_headers() {
        let h = preflight(
            &cors(&["https://app.example.com"]),
            &[Method::Post],
            Some("https://app.example.com"),
            "POST",
            Some("Content-Type, X-Api-Key"),
        )
        .unwrap();
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(
            get("access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(get("access-control-allow-methods"), Some("POST"));
        assert_eq!(
            get("access-control-allow-headers"),
            Some("content-type, x-api-key")
        );
        assert_eq!(get("access-control-max-age"), Some("600"));
        assert_eq!(get("vary"), Some("Origin"));
    }

    #[test]
    fn preflights_are_refused_for_other_origins_methods_and_headers() {
        let c = cors(&["https://app.example.com"]);
        assert_eq!(
            preflight(
                &c,
                &[Method::Post],
                Some("https://evil.example"),
                "POST",
                None
            )
            .unwrap_err()
            .status,
            403
        );
        assert_eq!(
            preflight(
                &c,
                &[Method::Post],
                Some("https://app.example.com"),
                "DELETE",
                None
            )
            .unwrap_err()
            .status,
            403
        );
        assert!(preflight(
            &c,
            &[Method::Post],
            Some("https://app.example.com"),
            "POST",
            Some("x-secret")
        )
        .unwrap_err()
        .detail
        .contains("x-secret"));
        assert!(preflight(&c, &[Method::Post], None, "POST", None).is_err());
    }

    #[test]
    fn a_wildcard_allows_any_origin_and_answers_star() {
        let h = preflight(
            &cors(&["*"]),
            &[Method::Get],
            Some("https://x.test"),
            "GET",
            None,
        )
        .unwrap();
        assert_eq!(h[0], ("access-control-allow-origin", "*".to_owned()));
        assert_eq!(
            response_headers(&cors(&["*"]), Some("https://x.test"))[0].1,
            "*"
        );
        assert!(response_headers(&cors(&["https://a.test"]), Some("https://b.test")).is_empty());
    }
}
