//! Inbound checks: what a caller must pass before anything is sent to Azure, in the order a
//! gateway should run them, cheap first: IP filter, body size, content type, required headers
//! (here, [`check_request`]), then credentials (API key: [`api_key`]; JWT: [`jwt`]), then the
//! rate limit (a Cloudflare binding, at the edge). CORS preflights are answered before any of
//! them ([`cors`]). Every rejection is a problem+json that reaches no backend and no token
//! endpoint.

pub mod api_key;
pub mod cors;
pub mod ip;
pub mod jwt;

use crate::policy::prepared::IpLists;
use crate::policy::{Inbound, RateLimit, RateLimitKey};
use crate::problem::Problem;

/// Whom a request counts against in the route's rate limit: the API key's name, the JWT's
/// `sub`, or the client address, each in its own namespace (`key:`, `sub:`, `ip:`) so one kind
/// can never land in another's bucket.
///
/// A token without `sub` (some client-credential flows) counts against its client address,
/// like Kong's fallback to the IP when no consumer is identified; rather than one bucket shared
/// by every such caller. A request that cannot be attributed at all is refused: a limit that
/// anyone could share is no limit.
pub fn rate_limit_subject(
    key: RateLimitKey,
    api_key: Option<&str>,
    jwt_subject: Option<&str>,
    client_ip: Option<&str>,
) -> Result<String, Problem> {
    fn present(v: Option<&str>) -> Option<&str> {
        v.filter(|v| !v.is_empty())
    }
    let ip = present(client_ip).map(|ip| format!("ip:{ip}"));
    let subject = match key {
        RateLimitKey::ApiKey => present(api_key).map(|k| format!("key:{k}")),
        RateLimitKey::JwtSubject => present(jwt_subject).map(|s| format!("sub:{s}")).or(ip),
        RateLimitKey::ClientIp => ip,
    };
    subject.ok_or_else(|| {
        Problem::new(
            400,
            "rate-limit-unattributable",
            "The request cannot be counted against a rate limit",
            "This route limits each caller's rate, but the request names no caller it can be counted against (no API key, token subject or client address).",
        )
    })
}

/// What the cheap checks look at.
pub struct RequestFacts<'a> {
    /// `CF-Connecting-IP`.
    pub client_ip: Option<&'a str>,
    pub content_length: Option<u64>,
    /// Whether the request has a body at all (a length above zero, or a chunked body).
    pub has_body: bool,
    pub content_type: Option<&'a str>,
    /// A request header by lowercase name.
    pub header: &'a dyn Fn(&str) -> Option<String>,
}

/// Over the limit: 429 with the period as `Retry-After`.
pub fn rate_limited(limit: &RateLimit) -> Problem {
    Problem::new(
        429,
        "rate-limited",
        "Too many requests",
        format!("This route allows {} requests per {} seconds for each caller; retry after the time in Retry-After.", limit.limit, limit.period_seconds),
    )
    .with_header("retry-after", limit.period_seconds.to_string())
}

/// The rate limiter could not count: fail closed. `missing`: the binding is not declared.
pub fn rate_limit_unavailable(missing: bool) -> Problem {
    if missing {
        Problem::new(
            500,
            "gateway-misconfigured",
            "Gateway is misconfigured",
            "The rate-limiting binding this route names is not declared in wrangler.toml; the operator should add it and redeploy.",
        )
    } else {
        Problem::new(
            503,
            "rate-limit-unavailable",
            "Rate limiting is unavailable",
            "The rate limiter did not answer; try again shortly.",
        )
        .with_header("retry-after", "1")
    }
}

/// IP filter (403), body size (413), content type (415), required headers (400), in that order.
/// `ip` holds the route's IP lists, parsed when the policy was compiled.
pub fn check_request(
    inbound: &Inbound,
    ip: Option<&IpLists>,
    facts: &RequestFacts,
) -> Result<(), Problem> {
    if let Some(lists) = ip {
        if !ip::allowed(&lists.allow, &lists.deny, facts.client_ip) {
            return Err(Problem::new(
                403,
                "ip-forbidden",
                "Client address not allowed",
                "This route does not accept requests from your address.",
            ));
        }
    }
    if let (Some(max), Some(length)) = (inbound.max_body_bytes, facts.content_length) {
        if length > max {
            return Err(Problem::new(
                413,
                "body-too-large",
                "Request body too large",
                format!("The body is {length} bytes; this route accepts at most {max}."),
            ));
        }
    }
    if !inbound.content_types.is_empty() && facts.has_body {
        let media = facts.content_type.map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
        if !media.as_deref().is_some_and(|m| {
            inbound
                .content_types
                .iter()
                .any(|a| a.eq_ignore_ascii_case(m))
        }) {
            return Err(Problem::new(
                415,
                "unsupported-media-type",
                "Content type not accepted",
                format!(
                    "This route accepts bodies of type {}; send one with a matching Content-Type.",
                    inbound.content_types.join(", ")
                ),
            )
            .with_header("accept", inbound.content_types.join(", ")));
        }
    }
    for required in &inbound.required_headers {
        let value = (facts.header)(&required.name.to_ascii_lowercase());
        let ok = match &value {
            None => false,
            Some(v) => required.values.is_empty() || required.values.iter().any(|a| a == v),
        };
        if !ok {
            let detail = if required.values.is_empty() {
                format!("This route needs the header {}.", required.name)
            } else {
                format!(
                    "This route needs the header {} with one of: {}.",
                    required.name,
                    required.values.join(", ")
                )
            };
            return Err(Problem::new(
                400,
                "header-required",
                "A required header is missing or not accepted",
                detail,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cheap checks with the IP lists parsed as the compiler does.
    fn check(inbound: &Inbound, facts: &RequestFacts) -> Result<(), Problem> {
        let lists = inbound.ip.as_ref().map(|f| IpLists {
            allow: f
                .allow
                .iter()
                .map(|c| ip::Cidr::parse(c).unwrap())
                .collect(),
            deny: f.deny.iter().map(|c| ip::Cidr::parse(c).unwrap()).collect(),
        });
        check_request(inbound, lists.as_ref(), facts)
    }

    #[test]
    fn rate_limit_subjects_never_share_a_bucket_across_kinds() {
        use RateLimitKey::*;
        let subject = |k, a, s, i| rate_limit_subject(k, a, s, i);
        assert_eq!(
            subject(ApiKey, Some("partner"), None, Some("1.2.3.4")).unwrap(),
            "key:partner"
        );
        assert_eq!(
            subject(JwtSubject, None, Some("u1"), Some("1.2.3.4")).unwrap(),
            "sub:u1"
        );
        // No `sub`: the token's caller counts against its address, not a bucket shared by all.
        assert_eq!(
            subject(JwtSubject, None, None, Some("1.2.3.4")).unwrap(),
            "ip:1.2.3.4"
        );
        assert_eq!(
            subject(JwtSubject, None, Some(""), Some("1.2.3.4")).unwrap(),
            "ip:1.2.3.4"
        );
        assert_ne!(
            subject(JwtSubject, None, None, Some("1.2.3.4")).unwrap(),
            subject(JwtSubject, None, None, Some("5.6.7.8")).unwrap()
        );
        // A subject that looks like an address is still a subject.
        assert_eq!(
            subject(JwtSubject, None, Some("ip:1.2.3.4"), None).unwrap(),
            "sub:ip:1.2.3.4"
        );
        assert_eq!(
            subject(ClientIp, None, None, Some("::1")).unwrap(),
            "ip:::1"
        );
        for (k, a, s, i) in [
            (JwtSubject, None, None, None),
            (ClientIp, None, Some("u"), None),
            (ApiKey, None, None, Some("1.2.3.4")),
        ] {
            let p = subject(k, a, s, i).unwrap_err();
            assert_eq!((p.status, p.kind), (400, "rate-limit-unattributable"));
        }
    }
    use crate::policy::{IpFilter, RequiredHeader};

    fn inbound() -> Inbound {
        Inbound {
            ip: Some(IpFilter {
                allow: vec!["203.0.113.0/24".into()],
                deny: vec![],
            }),
            max_body_bytes: Some(100),
            content_types: vec!["application/json".into()],
            required_headers: vec![RequiredHeader {
                name: "X-Tenant".into(),
                values: vec!["a".into(), "b".into()],
            }],
            ..Inbound::default()
        }
    }

    fn facts<'a>(
        ip: &'a str,
        length: u64,
        ct: Option<&'a str>,
        header: &'a dyn Fn(&str) -> Option<String>,
    ) -> RequestFacts<'a> {
        RequestFacts {
            client_ip: Some(ip),
            content_length: Some(length),
            has_body: length > 0,
            content_type: ct,
            header,
        }
    }

    #[test]
    fn each_cheap_check_answers_its_status_in_order() {
        let tenant = |n: &str| (n == "x-tenant").then(|| "a".to_owned());
        let none = |_: &str| None;
        let ok = facts(
            "203.0.113.9",
            10,
            Some("application/json; charset=utf-8"),
            &tenant,
        );
        assert_eq!(check(&inbound(), &ok), Ok(()));
        // The IP is checked first: a bad IP with every other fault is a 403.
        assert_eq!(
            check(&inbound(), &facts("198.51.100.1", 1000, None, &none))
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            check(&inbound(), &facts("203.0.113.9", 1000, None, &none))
                .unwrap_err()
                .status,
            413
        );
        let p = check(
            &inbound(),
            &facts("203.0.113.9", 10, Some("text/plain"), &none),
        )
        .unwrap_err();
        assert_eq!(
            (p.status, &p.headers[0]),
            (415, &("accept", "application/json".to_owned()))
        );
        assert_eq!(
            check(&inbound(), &facts("203.0.113.9", 10, None, &none))
                .unwrap_err()
                .status,
            415
        );
        assert_eq!(
            check(
                &inbound(),
                &facts("203.0.113.9", 10, Some("application/json"), &none)
            )
            .unwrap_err()
            .status,
            400
        );
        let other = |n: &str| (n == "x-tenant").then(|| "c".to_owned());
        let p = check(
            &inbound(),
            &facts("203.0.113.9", 10, Some("application/json"), &other),
        )
        .unwrap_err();
        assert!(p.detail.contains("one of: a, b"));
    }

    #[test]
    fn a_request_without_body_needs_no_content_type() {
        let tenant = |n: &str| (n == "x-tenant").then(|| "b".to_owned());
        assert_eq!(
            check(&inbound(), &facts("203.0.113.9", 0, None, &tenant)),
            Ok(())
        );
    }
}
