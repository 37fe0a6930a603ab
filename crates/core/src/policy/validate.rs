//! Checks a policy as a whole, after its shape has been read: what serde cannot see.
//!
//! Every rule pushes a [`PolicyError`] with the JSON path of the offending value and what was
//! expected there, and validation never stops at the first error. Values that may be secrets
//! are never quoted back.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::model::*;
use super::STORAGE_AUDIENCE;
use super::{hidden_string, PolicyError};
use crate::encoding::is_header_name;
use crate::routing::PathTemplate;
use crate::sas::MAX_URL_LIFETIME_SECONDS as MAX_SAS_LIFETIME_SECONDS;

mod common;
mod queues;

use common::{
    check_audience, check_endpoint, check_identity_ref, check_message_mapping,
    check_storage_account, check_template, check_vars, is_container, is_entity, is_guid, is_name,
    is_namespace, is_tenant, Checker, Scope, Url,
};

/// Validates a policy whose shape has been read. `route_positions[i]` is the index in the file
/// of `policy.routes[i]`; identities named in `unreadable_identities` exist in the file but
/// could not be read, so references to them are not reported again.
pub fn validate(
    policy: &Policy,
    route_positions: &[usize],
    unreadable_identities: &BTreeSet<String>,
) -> Vec<PolicyError> {
    let mut c = Checker {
        policy,
        local_origins: BTreeSet::new(),
        errors: Vec::new(),
    };
    check_local_endpoints(&mut c);
    check_store_and_forward(&mut c);
    if let Some(defaults) = &policy.inbound {
        check_inbound(&mut c, "inbound", defaults, None);
    }
    for (name, identity) in &policy.identities {
        check_identity(&mut c, name, identity);
    }
    let position = |i: usize| route_positions.get(i).copied().unwrap_or(i);
    let mut templates: Vec<Option<PathTemplate>> = Vec::new();
    for (i, route) in policy.routes.iter().enumerate() {
        let at = format!("routes[{}]", position(i));
        templates.push(check_route(&mut c, &at, route, unreadable_identities));
    }
    check_overlaps(&mut c, &templates, position);
    c.errors
}

fn check_store_and_forward(c: &mut Checker) {
    let Some(s) = &c.policy.store_and_forward else {
        return;
    };
    let is_binding = |binding: &str| {
        !binding.is_empty()
            && binding.len() <= 64
            && binding.starts_with(|ch: char| ch.is_ascii_alphabetic() || ch == '_')
            && binding
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    for (field, value) in [
        ("binding", &s.binding),
        ("dead_letter_binding", &s.dead_letter_binding),
    ] {
        if let Some(binding) = value.as_deref().filter(|b| !is_binding(b)) {
            c.err(format!("store_and_forward.{field}"), format!("a binding name of letters, digits and '_' (as in wrangler.toml), got \"{binding}\""));
        }
    }
    if c.policy.store_binding() == c.policy.dead_letter_binding() {
        c.err(
            "store_and_forward.dead_letter_binding",
            format!(
                "a binding other than the deliveries' own ({}): a dead letter put back on the deliveries queue would be delivered again, and again",
                c.policy.store_binding()
            ),
        );
    }
    if let Some(n) = s.max_attempts {
        if !(1..=100).contains(&n) {
            c.err(
                "store_and_forward.max_attempts",
                format!("between 1 and 100 (the consumer's max_retries + 1), got {n}"),
            );
        }
    }
}

fn check_local_endpoints(c: &mut Checker) {
    for (i, endpoint) in c.policy.local_endpoints.iter().enumerate() {
        match Url::parse(endpoint) {
            Some(url) if url.path.is_empty() || url.path == "/" => {
                c.local_origins.insert(url.origin());
            }
            _ => c.err(
                format!("local_endpoints[{i}]"),
                format!("an origin such as \"https://127.0.0.1:10000\" (scheme, host, optional port; no path), got \"{endpoint}\""),
            ),
        }
    }
}

fn check_identity(c: &mut Checker, name: &str, identity: &Identity) {
    let at = format!("identities.{name}");
    if !is_name(name) {
        c.err(
            &at,
            format!(
                "an identity name of letters, digits, '.', '_' or '-' (at most 64), got \"{name}\""
            ),
        );
    }
    let entra = match &identity.token_endpoint {
        TokenEndpoint::EntraV2 { tenant, authority }
        | TokenEndpoint::EntraV1 { tenant, authority } => {
            let v = if matches!(identity.token_endpoint, TokenEndpoint::EntraV2 { .. }) {
                "entra_v2"
            } else {
                "entra_v1"
            };
            if !is_tenant(tenant) {
                c.err(
                    format!("{at}.token_endpoint.{v}.tenant"),
                    format!("a tenant id (GUID) or verified domain such as contoso.onmicrosoft.com (not common/organizations/consumers, which client credentials cannot use), got \"{tenant}\""),
                );
            }
            let local_authority = authority
                .as_deref()
                .and_then(Url::parse)
                .is_some_and(|u| c.is_local(&u));
            if let Some(authority) = authority {
                let cloud_authority = format!("https://{}", c.policy.cloud.authority_host());
                let ok = match Url::parse(authority) {
                    Some(u) if u.path.is_empty() || u.path == "/" => {
                        local_authority
                            || Url::parse(&cloud_authority)
                                .is_some_and(|a| a.origin() == u.origin())
                    }
                    _ => false,
                };
                if !ok {
                    c.err(
                        format!("{at}.token_endpoint.{v}.authority"),
                        format!("{cloud_authority} (this cloud's authority) or an origin listed in local_endpoints, got \"{authority}\""),
                    );
                }
            }
            // A local stand-in of Entra is not bound to Entra's client id format.
            !local_authority
        }
        TokenEndpoint::Url(url) => {
            match Url::parse(url) {
                Some(u) if u.scheme == "https" || c.is_local(&u) => {}
                Some(u) if u.scheme == "http" => c.err(
                    format!("{at}.token_endpoint.url"),
                    format!("an https:// URL (plain http only for an origin listed in local_endpoints), got \"{url}\""),
                ),
                _ => c.err(
                    format!("{at}.token_endpoint.url"),
                    format!("an absolute https:// token URL without query or fragment, got \"{url}\""),
                ),
            }
            false
        }
    };
    if entra && !is_guid(&identity.client_id) {
        c.err(
            format!("{at}.client_id"),
            format!(
                "the application (client) id, a GUID, got \"{}\"",
                identity.client_id
            ),
        );
    } else if identity.client_id.trim().is_empty() || identity.client_id.len() > 256 {
        c.err(
            format!("{at}.client_id"),
            "a client id of 1 to 256 characters",
        );
    }
    if let Some(share) = identity.refresh_ahead {
        if !(0.1..=0.9).contains(&share) {
            c.err(
                format!("{at}.refresh_ahead"),
                format!("a share of the token lifetime between 0.1 and 0.9, got {share}"),
            );
        }
    }
    if let Some(ms) = identity.timeout_ms {
        if !(100..=60_000).contains(&ms) {
            c.err(
                format!("{at}.timeout_ms"),
                format!("a timeout between 100 and 60000 milliseconds, got {ms}"),
            );
        }
    }
    match &identity.credential {
        Credential::ClientSecret {
            secret,
            next_secret,
            ..
        } => {
            check_secret_name(c, &format!("{at}.credential.client_secret.secret"), secret);
            if let Some(next) = next_secret {
                let path = format!("{at}.credential.client_secret.next_secret");
                check_secret_name(c, &path, next);
                if next == secret {
                    c.err(path, "a different Worker secret than \"secret\" (it is tried when the first is rejected)");
                }
            }
        }
        Credential::Certificate {
            private_key_secret,
            certificate_secret,
        } => {
            check_secret_name(
                c,
                &format!("{at}.credential.certificate.private_key_secret"),
                private_key_secret,
            );
            check_secret_name(
                c,
                &format!("{at}.credential.certificate.certificate_secret"),
                certificate_secret,
            );
        }
    }
}

/// Secret names only: a value that is not a name may be the secret itself, so it is not quoted.
fn check_secret_name(c: &mut Checker, path: &str, value: &str) {
    let ok = value.len() <= 128
        && value
            .chars()
            .next()
            .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
        && value
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
    if !ok {
        c.err(
            path,
            format!("the name of a Worker secret (letters, digits and '_', e.g. ORDERS_CLIENT_SECRET; set its value with `wrangler secret put NAME`), got a value of {} characters that is not such a name (not shown, in case it is the secret itself)", value.chars().count()),
        );
    }
}

fn check_route(
    c: &mut Checker,
    at: &str,
    route: &Route,
    unreadable_identities: &BTreeSet<String>,
) -> Option<PathTemplate> {
    if !is_name(&route.name) {
        c.err(
            format!("{at}.name"),
            format!(
                "a route name of letters, digits, '.', '_' or '-' (at most 64), got \"{}\"",
                route.name
            ),
        );
    }
    if route.methods.is_empty() {
        c.err(
            format!("{at}.methods"),
            "at least one method, e.g. [\"POST\"]",
        );
    }
    let mut seen = BTreeSet::new();
    for (j, m) in route.methods.iter().enumerate() {
        if !seen.insert(*m) {
            c.err(
                format!("{at}.methods[{j}]"),
                format!("each method once, got \"{}\" again", m.as_str()),
            );
        }
    }
    if let Backend::AzureRest(rest) = &route.backend {
        let sends_get = match rest.method {
            Some(m) => m == Method::Get,
            None => route.methods.iter().all(|m| *m == Method::Get),
        };
        if rest.pages && !sends_get {
            c.err(
                format!("{at}.backend.azure_rest.pages"),
                "false unless the route sends GET (a list is read with GET; its next pages are GETs of this route)",
            );
        }
    }
    if matches!(route.backend, Backend::Blob(_)) {
        for (j, m) in route.methods.iter().enumerate() {
            if matches!(m, Method::Patch | Method::Delete) {
                c.err(
                    format!("{at}.methods[{j}]"),
                    format!(
                        "a method a blob route serves (GET, HEAD, PUT or POST), got \"{}\"",
                        m.as_str()
                    ),
                );
            }
        }
    }
    let template = match PathTemplate::parse(&route.path) {
        Ok(t) => Some(t),
        Err(e) => {
            c.err(format!("{at}.path"), e);
            None
        }
    };
    check_effective_inbound(c, at, route);
    if route.when_unavailable == WhenUnavailable::Queue {
        let storable = match &route.backend {
            Backend::ServiceBus(_) => true,
            Backend::Blob(b) => !b.overwrite,
            _ => false,
        };
        if !storable {
            c.err(
                format!("{at}.when_unavailable"),
                "\"fail\" for this backend: only service_bus routes and create-only blob routes (overwrite false) may store requests, because only there a request delivered twice is kept once (Service Bus drops a resent MessageId when the entity has duplicate detection; a create-only blob cannot be written twice)",
            );
        }
        if let Backend::ServiceBus(sb) = &route.backend {
            if !sb.duplicate_detection {
                c.err(
                    format!("{at}.backend.service_bus.duplicate_detection"),
                    "true for a route that stores requests: a stored message may be delivered after an attempt Azure took but did not answer, and only the entity's duplicate detection drops the second copy. Turn duplicate detection on for the entity (its window longer than max_attempts' deliveries take), then set \"duplicate_detection\": true",
                );
            }
        }
    }
    let coalescing = match &route.backend {
        Backend::ServiceBus(sb) => Some(("service_bus", sb.clone())),
        Backend::EventHubs(eh) => Some(("event_hubs", eh.as_service_bus())),
        _ => None,
    };
    if let Some((kind, sb)) = coalescing {
        check_coalescing(c, &format!("{at}.backend.{kind}"), &sb);
    }
    if let Some(b) = &route.breaker {
        if b.failures.is_some_and(|n| n > 1000) {
            c.err(
                format!("{at}.breaker.failures"),
                "a number of failures between 0 (no breaker) and 1000",
            );
        }
        for (field, value) in [
            ("window_seconds", b.window_seconds),
            ("cooldown_seconds", b.cooldown_seconds),
        ] {
            if value.is_some_and(|v| !(1..=3600).contains(&v)) {
                c.err(
                    format!("{at}.breaker.{field}"),
                    format!(
                        "a time between 1 and 3600 seconds, got {}",
                        value.unwrap_or_default()
                    ),
                );
            }
        }
    }
    if let Some(inbound) = &route.inbound {
        check_inbound(c, &format!("{at}.inbound"), inbound, Some(&route.methods));
    }
    let scope = Scope {
        params: template.iter().flat_map(|t| t.params()).collect(),
        path_ok: template.is_some(),
        jwt: c.policy.effective_inbound(route).jwt.is_some(),
        body: false,
    };
    match &route.backend {
        Backend::ServiceBus(sb) => check_service_bus(
            c,
            &format!("{at}.backend.service_bus"),
            sb,
            &scope,
            unreadable_identities,
        ),
        Backend::Blob(blob) => check_blob(
            c,
            &format!("{at}.backend.blob"),
            blob,
            &scope,
            unreadable_identities,
        ),
        Backend::BlobSas(sas) => check_blob_sas(
            c,
            &format!("{at}.backend.blob_sas"),
            sas,
            &scope,
            unreadable_identities,
        ),
        Backend::EventHubs(eh) => queues::check_event_hubs(
            c,
            &format!("{at}.backend.event_hubs"),
            eh,
            &scope,
            unreadable_identities,
        ),
        Backend::StorageQueue(q) => queues::check_storage_queue(
            c,
            &format!("{at}.backend.storage_queue"),
            q,
            unreadable_identities,
        ),
        Backend::AzureRest(rest) => check_azure_rest(
            c,
            &format!("{at}.backend.azure_rest"),
            rest,
            &scope,
            unreadable_identities,
        ),
        Backend::AzureOperation(op) => check_azure_operation(c, at, route, op, template.as_ref()),
    }
    template
}

fn check_api_key(c: &mut Checker, at: &str, check: &ApiKeyCheck) {
    // Nothing under an api_key check is quoted back: a key pasted in the wrong place would be.
    if !is_header_name(&check.header) {
        c.err(
            format!("{at}.header"),
            format!(
                "an HTTP header name such as x-api-key, got {} that is not one",
                hidden_string(&check.header)
            ),
        );
    }
    if check.keys.is_empty() {
        c.err(
            format!("{at}.keys"),
            "at least one key: {\"name\": …, \"secret\": WORKER_SECRET_NAME}",
        );
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, key) in check.keys.iter().enumerate() {
        if !is_name(&key.name) {
            c.err(
                format!("{at}.keys[{k}].name"),
                format!(
                    "a key name of letters, digits, '.', '_' or '-' (it is logged; the key is not), got {} that is not one",
                    hidden_string(&key.name)
                ),
            );
        } else if let Some(&first) = names.get(key.name.as_str()) {
            c.err(
                format!("{at}.keys[{k}].name"),
                format!(
                    "a name no other key of this check has, got the name of keys[{first}] again"
                ),
            );
        } else {
            names.insert(key.name.as_str(), k);
        }
        match (&key.secret, &key.sha256) {
            (Some(secret), None) => check_secret_name(c, &format!("{at}.keys[{k}].secret"), secret),
            (None, Some(hash)) => {
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    c.err(format!("{at}.keys[{k}].sha256"), "the SHA-256 of the key as 64 hex digits (printf %s \"$KEY\" | sha256sum), got something else (not shown)");
                }
            }
            _ => c.err(format!("{at}.keys[{k}]"), "exactly one of \"secret\" (a Worker secret's name) and \"sha256\" (the key's SHA-256)"),
        }
    }
}

/// The checks of one `inbound` section (a route's own, or the policy's defaults).
fn check_inbound(c: &mut Checker, at: &str, inbound: &Inbound, methods: Option<&[Method]>) {
    if let Some(api_key) = &inbound.api_key {
        check_api_key(c, &format!("{at}.api_key"), api_key);
    }
    if let Some(jwt) = &inbound.jwt {
        let at = format!("{at}.jwt");
        if jwt.issuers.is_empty() {
            c.err(format!("{at}.issuers"), "at least one accepted issuer, e.g. \"https://login.microsoftonline.com/{tenant}/v2.0\"");
        }
        if jwt.audiences.is_empty() {
            c.err(
                format!("{at}.audiences"),
                "at least one accepted audience, e.g. \"api://orders\"",
            );
        }
        if jwt.algorithms.is_empty() {
            c.err(
                format!("{at}.algorithms"),
                "at least one of RS256, PS256, ES256",
            );
        }
        match Url::parse(&jwt.jwks_url) {
            Some(u) if u.scheme == "https" || c.is_local(&u) => {}
            _ => c.err(format!("{at}.jwks_url"), format!("an https:// URL of a JSON Web Key Set (http only for an origin listed in local_endpoints), got \"{}\"", jwt.jwks_url)),
        }
        if jwt.clock_skew_seconds.is_some_and(|s| s > 600) {
            c.err(format!("{at}.clock_skew_seconds"), "at most 600 seconds");
        }
        if jwt
            .jwks_ttl_seconds
            .is_some_and(|s| !(60..=86_400).contains(&s))
        {
            c.err(
                format!("{at}.jwks_ttl_seconds"),
                "between 60 and 86400 seconds",
            );
        }
    }
    if let Some(ip) = &inbound.ip {
        for (list, items) in [("allow", &ip.allow), ("deny", &ip.deny)] {
            for (i, cidr) in items.iter().enumerate() {
                if let Err(e) = crate::inbound::ip::Cidr::parse(cidr) {
                    c.err(format!("{at}.ip.{list}[{i}]"), e);
                }
            }
        }
    }
    for (i, h) in inbound.required_headers.iter().enumerate() {
        if !is_header_name(&h.name) {
            c.err(
                format!("{at}.required_headers[{i}].name"),
                format!("an HTTP header name, got \"{}\"", h.name),
            );
        }
    }
    if let Some(rl) = &inbound.rate_limit {
        let at = format!("{at}.rate_limit");
        let binding_ok = rl.binding.starts_with(|ch: char| ch.is_ascii_alphabetic())
            && rl
                .binding
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !binding_ok {
            c.err(format!("{at}.binding"), format!("the name of a [[ratelimits]] binding in wrangler.toml (letters, digits, '_'), got \"{}\"", rl.binding));
        }
        if rl.limit == 0 {
            c.err(format!("{at}.limit"), "at least 1 request per period");
        }
        if !matches!(rl.period_seconds, 10 | 60) {
            c.err(
                format!("{at}.period_seconds"),
                format!(
                    "10 or 60 (the periods Cloudflare's rate limiting supports), got {}",
                    rl.period_seconds
                ),
            );
        }
    }
    if let Some(cors) = &inbound.cors {
        let at = format!("{at}.cors");
        if cors.origins.is_empty() {
            c.err(format!("{at}.origins"), "at least one origin, or [\"*\"]");
        }
        for (i, o) in cors.origins.iter().enumerate() {
            let ok = o == "*" || Url::parse(o).is_some_and(|u| u.path.is_empty());
            if !ok {
                c.err(format!("{at}.origins[{i}]"), format!("an origin such as \"https://app.example.com\" (no path) or \"*\", got \"{o}\""));
            }
        }
        for (i, h) in cors.headers.iter().enumerate() {
            if !is_header_name(h) {
                c.err(
                    format!("{at}.headers[{i}]"),
                    format!("an HTTP header name, got \"{h}\""),
                );
            }
        }
        if let Some(methods) = methods {
            for (i, m) in cors.methods.iter().enumerate() {
                if !methods.contains(m) {
                    c.err(
                        format!("{at}.methods[{i}]"),
                        format!("one of the route's methods, got \"{}\"", m.as_str()),
                    );
                }
            }
        }
    }
    if inbound.max_body_bytes == Some(0) {
        c.err(format!("{at}.max_body_bytes"), "at least 1 byte");
    }
    for (i, ct) in inbound.content_types.iter().enumerate() {
        let ok = ct
            .split_once('/')
            .is_some_and(|(t, s)| is_header_name(t) && is_header_name(s));
        if !ok {
            c.err(
                format!("{at}.content_types[{i}]"),
                format!("a media type such as \"application/json\" (no parameters), got \"{ct}\""),
            );
        }
    }
}

/// Rules that hold for the checks a route ends up with, its own over the defaults.
fn check_effective_inbound(c: &mut Checker, at: &str, route: &Route) {
    let effective = c.policy.effective_inbound(route);
    if !effective.protects() && !route.public {
        c.err(
            at,
            "inbound protection (\"api_key\", \"jwt\" or an \"ip\" allow list, on the route or in the policy's \"inbound\" defaults) or \"public\": true to let anyone call it; a route with an Azure identity and no protection is an open relay",
        );
    }
    if let Some(rl) = &effective.rate_limit {
        let missing = match rl.key {
            RateLimitKey::ApiKey if effective.api_key.is_none() => Some("api_key"),
            RateLimitKey::JwtSubject if effective.jwt.is_none() => Some("jwt"),
            _ => None,
        };
        if let Some(check) = missing {
            c.err(format!("{at}.inbound.rate_limit.key"), format!("a key the route has: it counts by its {check} check, which this route does not have"));
        }
    }
}

fn check_service_bus(
    c: &mut Checker,
    at: &str,
    sb: &ServiceBusBackend,
    scope: &Scope,
    unreadable: &BTreeSet<String>,
) {
    let cloud = c.policy.cloud;
    if let Some(mapping) = &sb.message {
        check_message_mapping(c, &format!("{at}.message"), mapping, scope);
    }
    if let Some(max) = sb.max_message_bytes {
        if !(1_024..=104_857_600).contains(&max) {
            c.err(format!("{at}.max_message_bytes"), format!("a size between 1024 and 104857600 bytes (100 MB, the Premium limit), got {max}"));
        }
    }
    if let Some(ns) = &sb.namespace {
        if !is_namespace(ns) {
            c.err(format!("{at}.namespace"), format!("a namespace name: 6-50 letters, digits or hyphens, starting with a letter and ending with a letter or digit, got \"{ns}\""));
        }
    }
    check_endpoint(
        c,
        at,
        "namespace",
        sb.namespace.as_deref(),
        sb.endpoint.as_deref(),
        cloud.service_bus_suffix(),
        false,
    );
    match (&sb.queue, &sb.topic) {
        (Some(_), Some(_)) => c.err(at, "either \"queue\" or \"topic\", not both"),
        (None, None) => c.err(
            at,
            "\"queue\" or \"topic\": the entity messages are sent to",
        ),
        (Some(name), None) | (None, Some(name)) => {
            let field = if sb.queue.is_some() { "queue" } else { "topic" };
            if !is_entity(name) {
                c.err(format!("{at}.{field}"), format!("an entity name: 1-260 letters, digits, '.', '-', '_' or '/', not starting or ending with '/', got \"{name}\""));
            }
        }
    }
    check_identity_ref(c, at, &sb.identity, unreadable);
    let mut allowed: Vec<String> = cloud
        .service_bus_audiences()
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(ns) = &sb.namespace {
        allowed.push(format!("https://{ns}.{}", cloud.service_bus_suffix()));
    }
    check_audience(c, at, sb.audience.as_deref(), &allowed, "Service Bus");
}

/// Where a blob route or a valet-key route points: the account, the container, the name
/// template, and the identity and audience its token is for.
struct BlobPlace<'a> {
    account: Option<&'a str>,
    endpoint: Option<&'a str>,
    container: &'a str,
    blob: &'a str,
    identity: &'a str,
    audience: Option<&'a str>,
}

fn check_blob_place(
    c: &mut Checker,
    at: &str,
    place: BlobPlace<'_>,
    scope: &Scope,
    unreadable: &BTreeSet<String>,
) {
    let cloud = c.policy.cloud;
    check_storage_account(c, at, place.account, place.endpoint, cloud.blob_suffix());
    if !is_container(place.container) {
        c.err(
            format!("{at}.container"),
            format!(
                "3-63 lowercase letters, digits or single hyphens, got \"{}\"",
                place.container
            ),
        );
    }
    check_blob_template(c, &format!("{at}.blob"), place.blob, scope);
    check_identity_ref(c, at, place.identity, unreadable);
    let mut allowed = vec![STORAGE_AUDIENCE.to_owned()];
    if let Some(account) = place.account {
        allowed.push(format!("https://{account}.{}", cloud.blob_suffix()));
    }
    if let Some(endpoint) = place.endpoint {
        allowed.push(endpoint.trim_end_matches('/').to_owned());
    }
    check_audience(c, at, place.audience, &allowed, "Blob Storage");
}

fn check_blob(
    c: &mut Checker,
    at: &str,
    blob: &BlobBackend,
    scope: &Scope,
    unreadable: &BTreeSet<String>,
) {
    let place = BlobPlace {
        account: blob.account.as_deref(),
        endpoint: blob.endpoint.as_deref(),
        container: &blob.container,
        blob: &blob.blob,
        identity: &blob.identity,
        audience: blob.audience.as_deref(),
    };
    check_blob_place(c, at, place, scope, unreadable);
    for (name, text) in &blob.metadata {
        let path = format!("{at}.metadata.{name}");
        let identifier = name.starts_with(|ch: char| ch.is_ascii_alphabetic() || ch == '_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !identifier {
            c.err(&path, format!("a metadata name that is a C# identifier (letters, digits, '_', not starting with a digit), got \"{name}\""));
        }
        check_template(c, &path, text, scope);
    }
    if let Some(ct) = &blob.content_type {
        if ct.is_empty() || !ct.contains('/') || !ct.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            c.err(
                format!("{at}.content_type"),
                format!("a media type such as \"application/json\", got \"{ct}\""),
            );
        }
    }
    let max = blob.max_body_bytes();
    let max_ok = (1..=MAX_BLOB_BYTES).contains(&max);
    if !max_ok {
        c.err(
            format!("{at}.max_body_bytes"),
            format!("a size between 1 byte and 5000 GiB, got {max}"),
        );
    }
    if blob.single_put_max_bytes() > 256 * 1024 * 1024 {
        c.err(
            format!("{at}.single_put_max_bytes"),
            format!(
                "at most 268435456 (256 MiB, the largest Put Blob), got {}",
                blob.single_put_max_bytes()
            ),
        );
    }
    // Azure allows blocks of up to 4000 MiB; one block is held in memory, hence 100 MiB here.
    let block = u64::from(blob.block_bytes());
    let block_ok = (MIN_BLOCK_BYTES..=MAX_BLOCK_BYTES).contains(&block);
    if !block_ok {
        c.err(
            format!("{at}.block_bytes"),
            format!(
                "a block size between {MIN_BLOCK_BYTES} and {MAX_BLOCK_BYTES} bytes, got {block}"
            ),
        );
    }
    // A blob has at most 50,000 committed blocks, so the blocks must be large enough for the
    // largest body the route accepts, or a write fails at Azure after most of it was sent.
    let largest_blob = block * MAX_BLOCKS_PER_BLOB;
    if block_ok && max_ok && largest_blob < max {
        let needed = max.div_ceil(MAX_BLOCKS_PER_BLOB);
        if needed <= MAX_BLOCK_BYTES {
            c.err(
                format!("{at}.block_bytes"),
                format!("at least {needed} bytes (max_body_bytes {max} in at most {MAX_BLOCKS_PER_BLOB} blocks, Azure's limit per blob), got {block}, which holds at most {largest_blob} bytes; raise block_bytes to {needed} or more, or lower max_body_bytes to {largest_blob} or less"),
            );
        } else {
            c.err(
                format!("{at}.max_body_bytes"),
                format!("at most {} bytes ({MAX_BLOCKS_PER_BLOB} blocks, Azure's limit per blob, of the largest block_bytes, {MAX_BLOCK_BYTES}), got {max}; with block_bytes {block}, at most {largest_blob}", MAX_BLOCK_BYTES * MAX_BLOCKS_PER_BLOB),
            );
        }
    }
    if let Some(idle) = blob.idle_timeout_ms {
        if !(100..=600_000).contains(&idle) {
            c.err(
                format!("{at}.idle_timeout_ms"),
                format!("between 100 and 600000 milliseconds, got {idle}"),
            );
        }
    }
}

/// A valet-key route: the blob route's place and name checks, then what the URL may do.
fn check_blob_sas(
    c: &mut Checker,
    at: &str,
    sas: &BlobSasBackend,
    scope: &Scope,
    unreadable: &BTreeSet<String>,
) {
    let place = BlobPlace {
        account: sas.account.as_deref(),
        endpoint: sas.endpoint.as_deref(),
        container: &sas.container,
        blob: &sas.blob,
        identity: &sas.identity,
        audience: sas.audience.as_deref(),
    };
    check_blob_place(c, at, place, scope, unreadable);
    if sas.endpoint.is_some() && sas.account_name().is_none() {
        c.err(
            format!("{at}.endpoint"),
            "an account URL that names the account, in its path (Azurite's https://127.0.0.1:10000/devstoreaccount1) or as its host's first label (https://contoso.blob.core.windows.net): the URL's signature covers the account's name",
        );
    }
    let lifetime = sas.lifetime_seconds();
    if !(MIN_SAS_LIFETIME_SECONDS..=MAX_SAS_LIFETIME_SECONDS).contains(&lifetime) {
        c.err(
            format!("{at}.lifetime_seconds"),
            format!("between {MIN_SAS_LIFETIME_SECONDS} and {MAX_SAS_LIFETIME_SECONDS} seconds (one hour: a URL is a bearer credential that cannot be taken back alone), got {lifetime}"),
        );
    }
    for (field, text) in [
        (
            "response_content_disposition",
            &sas.response_content_disposition,
        ),
        ("response_content_type", &sas.response_content_type),
    ] {
        let Some(text) = text else { continue };
        let path = format!("{at}.{field}");
        if sas.permission != SasPermission::Read {
            c.err(
                &path,
                format!(
                    "only on a \"read\" route (it is how Storage serves a download), not on \"{}\"",
                    sas.permission.as_str()
                ),
            );
        }
        check_template(c, &path, text, scope);
    }
}

/// The shortest lifetime a valet-key URL may have, in seconds.
const MIN_SAS_LIFETIME_SECONDS: u32 = 60;

/// The largest block blob Azure stores (5000 GiB in this API version's terms).
const MAX_BLOB_BYTES: u64 = 5_000 * 1024 * 1024 * 1024;
/// Azure commits at most this many blocks to one blob.
const MAX_BLOCKS_PER_BLOB: u64 = 50_000;
const MIN_BLOCK_BYTES: u64 = 64 * 1024;
const MAX_BLOCK_BYTES: u64 = crate::backend::blob::MAX_BLOCK_BYTES as u64;

fn check_blob_template(c: &mut Checker, at: &str, text: &str, scope: &Scope) {
    let Some(template) = check_template(c, at, text, scope) else {
        return;
    };
    if template.parts.is_empty() {
        return c.err(
            at,
            "a blob name template, e.g. \"{path.tenant}/{uuid}.json\"",
        );
    }
    let literal: String = template.literals().collect();
    if literal.chars().any(|ch| ch.is_control() || ch == '\\') {
        c.err(at, "a blob name without control characters or backslashes");
    }
    if text.split('/').any(|seg| seg == "." || seg == "..") || text.starts_with('/') {
        c.err(
            at,
            format!("a blob name without '.' or '..' segments or a leading '/', got \"{text}\""),
        );
    }
    if literal.chars().count() > 1024 {
        c.err(at, "a blob name of at most 1024 characters");
    }
}

/// Duplicate names and routes that another route already serves: each route is reported
/// once, naming the first route it conflicts with, in one pass keyed by name and by path shape
/// (so 10,000 copies of one route are 9,999 errors, not 50 million).
fn check_overlaps(
    c: &mut Checker,
    templates: &[Option<PathTemplate>],
    position: impl Fn(usize) -> usize,
) {
    let routes = &c.policy.routes;
    let mut first_named: HashMap<&str, usize> = HashMap::new();
    // Path shape → the first route serving each method with that shape.
    let mut owners: HashMap<Vec<Option<&str>>, Vec<(Method, usize)>> = HashMap::new();
    let mut errors = Vec::new();
    for (j, b) in routes.iter().enumerate() {
        let first = *first_named.entry(b.name.as_str()).or_insert(j);
        if first != j {
            errors.push(PolicyError::new(
                format!("routes[{}].name", position(j)),
                format!(
                    "a name no other route has, got \"{}\" (also routes[{}])",
                    b.name,
                    position(first)
                ),
            ));
        }
        let Some(tb) = &templates[j] else {
            continue;
        };
        let served = owners.entry(tb.shape()).or_default();
        // (owner, method) for each method of this route that an earlier route serves.
        let mut taken: Vec<(usize, Method)> = Vec::new();
        for m in &b.methods {
            match served.iter().find(|(method, _)| method == m) {
                Some(&(_, owner)) if owner != j => taken.push((owner, *m)),
                Some(_) => {}
                None => served.push((*m, j)),
            }
        }
        if taken.is_empty() {
            continue;
        }
        taken.sort_by_key(|&(owner, _)| owner);
        let mut parts: Vec<String> = Vec::new();
        let mut rest = taken.as_slice();
        while let Some(&(owner, _)) = rest.first() {
            let n = rest.iter().take_while(|(o, _)| *o == owner).count();
            let methods: Vec<&str> = rest[..n].iter().map(|(_, m)| m.as_str()).collect();
            let a = &routes[owner];
            parts.push(if parts.is_empty() {
                format!(
                    "got {} {} which routes[{}] (\"{}\") already matches as {}",
                    methods.join(", "),
                    b.path,
                    position(owner),
                    a.name,
                    a.path
                )
            } else {
                format!(
                    "and {} which routes[{}] (\"{}\") matches as {}",
                    methods.join(", "),
                    position(owner),
                    a.name,
                    a.path
                )
            });
            rest = &rest[n..];
        }
        errors.push(PolicyError::new(
            format!("routes[{}]", position(j)),
            format!(
                "a method and path no other route matches, {}",
                parts.join(", ")
            ),
        ));
    }
    c.errors.extend(errors);
}

/// An `azure_rest` route: the host is an Azure API host of the cloud (or a local endpoint), the
/// audience one its service accepts, the API version pinned where the service versions calls,
/// caller values only in whole path segments and query values, headers and query names from
/// allow-lists that cannot reach what the gateway sets.
fn check_azure_rest(
    c: &mut Checker,
    at: &str,
    rest: &AzureRestBackend,
    scope: &Scope,
    unreadable: &BTreeSet<String>,
) {
    use crate::backend::azure_rest::{self as ar, url::RestUrl};
    use crate::policy::cloud::Versioning;
    use crate::template::BodyFormat;
    let cloud = c.policy.cloud;
    check_identity_ref(c, at, &rest.identity, unreadable);
    let url = match RestUrl::parse(&rest.url) {
        Ok(url) => url,
        Err(e) => return c.err(format!("{at}.url"), e),
    };
    check_vars(c, &format!("{at}.url"), url.vars(), scope);
    let local = Url::parse(&url.origin).is_some_and(|u| c.is_local(&u));
    let service = if local {
        let Some(audience) = &rest.audience else {
            return c.err(
                format!("{at}.audience"),
                "an audience for a local endpoint: the one of the Azure service it stands in for, e.g. \"https://management.azure.com/\"",
            );
        };
        match cloud.service_for_audience(audience) {
            Some(service) => service,
            None => {
                let known: Vec<&str> = cloud
                    .services()
                    .iter()
                    .flat_map(|s| s.audiences.iter().copied())
                    .collect();
                return c.err(
                    format!("{at}.audience"),
                    format!(
                        "the audience of an Azure service of this cloud ({}), got \"{audience}\"",
                        known.join(", ")
                    ),
                );
            }
        }
    } else {
        let https = url.origin.starts_with("https://")
            && Url::parse(&url.origin).is_some_and(|u| u.port.is_none_or(|p| p == 443));
        match cloud.service_at(&url.host).filter(|_| https) {
            Some(service) => service,
            None => {
                let hosts: Vec<String> =
                    cloud.services().iter().map(|s| s.host.describe()).collect();
                return c.err(
                    format!("{at}.url"),
                    format!(
                        "an https:// URL on an Azure API host of this cloud ({}) or an origin listed in local_endpoints, got \"{}\"",
                        hosts.join(", "),
                        url.origin
                    ),
                );
            }
        }
    };
    if let Some(audience) = &rest.audience {
        if !service.accepts(audience, &url.origin) {
            let mut accepted: Vec<String> =
                service.audiences.iter().map(|a| a.to_string()).collect();
            if service.origin_audience && !local {
                accepted.push(url.origin.clone());
            }
            c.err(
                format!("{at}.audience"),
                format!(
                    "an audience {} accepts: {}, got \"{audience}\"",
                    service.name,
                    accepted.join(" or ")
                ),
            );
        }
    }
    match (service.versioning, &rest.api_version) {
        (Versioning::Query | Versioning::Header, None) => c.err(
            format!("{at}.api_version"),
            format!(
                "a pinned API version: {} versions every call (e.g. \"{}\")",
                service.name,
                if service.versioning == Versioning::Header {
                    "2021-08-06"
                } else {
                    "2022-09-01"
                }
            ),
        ),
        (Versioning::Path, Some(_)) => c.err(
            format!("{at}.api_version"),
            format!(
                "no api_version: {} takes its version in the path (e.g. /v1.0/)",
                service.name
            ),
        ),
        (_, Some(v))
            if v.is_empty()
                || v.len() > 32
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.')) =>
        {
            c.err(
                format!("{at}.api_version"),
                format!("an API version such as \"2022-09-01\" or \"7.4\", got \"{v}\""),
            )
        }
        _ => {}
    }
    let reserved =
        |name: &str| ar::RESERVED_REQUEST_HEADERS.contains(&name.to_ascii_lowercase().as_str());
    for (name, text) in &rest.headers {
        let path = format!("{at}.headers.{name}");
        if !is_header_name(name) || reserved(name) {
            c.err(&path, format!("a header name that HTTP, the token or the gateway does not set ({}), got \"{name}\"", ar::RESERVED_REQUEST_HEADERS.join(", ")));
        }
        check_template(c, &path, text, scope);
    }
    for (i, name) in rest.request_headers.iter().enumerate() {
        let path = format!("{at}.request_headers[{i}]");
        if !is_header_name(name) || reserved(name) {
            c.err(&path, format!("a header name that HTTP, the token or the gateway does not set ({}), got \"{name}\"", ar::RESERVED_REQUEST_HEADERS.join(", ")));
        } else if rest.headers.keys().any(|h| h.eq_ignore_ascii_case(name)) {
            c.err(
                &path,
                format!("a header the route does not set itself in \"headers\", got \"{name}\""),
            );
        }
    }
    for (i, name) in rest.query.iter().enumerate() {
        let path = format!("{at}.query[{i}]");
        if name.is_empty()
            || name.eq_ignore_ascii_case("api-version")
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'$'))
        {
            c.err(&path, format!("a query parameter name of letters, digits, '-', '_', '.' or '$', not api-version, got \"{name}\""));
        } else if url.query.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            // Azure reads query names without regard to case: `$Filter` would reach it as a
            // second `$filter` beside the fixed one.
            c.err(
                &path,
                format!("a parameter the URL does not fix itself (names compare case-insensitively, as Azure reads them), got \"{name}\""),
            );
        } else if rest.query[..i].iter().any(|n| n.eq_ignore_ascii_case(name)) {
            c.err(
                &path,
                format!("a parameter named once (names compare case-insensitively), got \"{name}\" again"),
            );
        }
    }
    for (i, name) in rest.response_headers.iter().enumerate() {
        if !is_header_name(name)
            || ar::GATEWAY_REPLY_HEADERS.contains(&name.to_ascii_lowercase().as_str())
        {
            c.err(
                format!("{at}.response_headers[{i}]"),
                format!(
                    "a header name the gateway does not set or rewrite itself ({}), got \"{name}\"",
                    ar::GATEWAY_REPLY_HEADERS.join(", ")
                ),
            );
        }
    }
    if let Some(RestBody::Template {
        content_type,
        template,
    }) = &rest.body
    {
        let path = format!("{at}.body.template");
        match BodyFormat::of(content_type) {
            None => c.err(
                format!("{at}.body.template.content_type"),
                format!("a JSON or XML media type (application/json, application/xml, …+json, …+xml), got \"{content_type}\""),
            ),
            Some(format) => {
                if !crate::backend::is_header_value(content_type) {
                    c.err(format!("{at}.body.template.content_type"), "a media type of printable ASCII");
                }
                let body_scope = Scope { body: true, ..scope.clone() };
                if let Some(parsed) = check_template(c, &path, template, &body_scope) {
                    // A JSON template must be JSON whatever the values (each is escaped into a
                    // string, so a variable belongs inside quotes).
                    let sample: String = parsed
                        .parts
                        .iter()
                        .map(|p| match p {
                            crate::template::Part::Literal(l) => l.clone(),
                            crate::template::Part::Var(_) => "x".to_owned(),
                        })
                        .collect();
                    if format == BodyFormat::Json && serde_json::from_str::<serde_json::Value>(&sample).is_err() {
                        c.err(&path, "a JSON document with each variable inside a string, e.g. {\"name\": \"{path.site}\"}");
                    }
                }
            }
        }
    }
    if let Some(RestBody::Json(document)) = &rest.body {
        let mut skeleton = document.clone();
        let mut leaves = Vec::new();
        match crate::policy::prepared::json_templates(&mut skeleton, "", &mut leaves) {
            Err(e) => c.err(format!("{at}.body.json"), e),
            Ok(()) => {
                let body_scope = Scope {
                    body: true,
                    ..scope.clone()
                };
                for (pointer, template) in &leaves {
                    check_vars(
                        c,
                        &format!("{at}.body.json{pointer}"),
                        template.vars(),
                        &body_scope,
                    );
                }
            }
        }
    }
    if let Some(max) = rest.max_body_bytes {
        if !(1..=104_857_600).contains(&max) {
            c.err(
                format!("{at}.max_body_bytes"),
                format!("a size between 1 and 104857600 bytes (100 MiB), got {max}"),
            );
        }
    }
    if let Some(ms) = rest.timeout_ms {
        if !(1_000..=300_000).contains(&ms) {
            c.err(
                format!("{at}.timeout_ms"),
                format!("a time limit between 1000 and 300000 ms, got {ms}"),
            );
        }
    }
    for (i, pointer) in rest.project.iter().enumerate() {
        if !is_json_pointer(pointer) {
            c.err(
                format!("{at}.project[{i}]"),
                format!("a JSON pointer such as \"/properties/state\", got \"{pointer}\""),
            );
        }
    }
    for (i, pointer) in rest.project_items.iter().enumerate() {
        if !is_json_pointer(pointer) || pointer.is_empty() {
            c.err(
                format!("{at}.project_items[{i}]"),
                format!("a JSON pointer within each element of the list, such as \"/name\" or \"/properties/state\", got \"{pointer}\""),
            );
        }
    }
    if !rest.project_items.is_empty()
        && rest
            .project
            .iter()
            .any(|p| p == "/value" || p.starts_with("/value/"))
    {
        c.err(
            format!("{at}.project"),
            "no pointer into /value beside project_items, which says what is kept of each element of /value",
        );
    }
    if rest.response_body == ResponseBody::None
        && (!rest.project.is_empty() || !rest.project_items.is_empty() || rest.pages)
    {
        c.err(
            format!("{at}.response_body"),
            "\"pass\" on a route that projects or pages its answers (\"none\" passes no body at all)",
        );
    }
    if rest.pages
        && rest
            .query
            .iter()
            .any(|q| q.eq_ignore_ascii_case(crate::backend::azure_rest::PAGE_PARAMETER))
    {
        c.err(
            format!("{at}.query"),
            format!("no parameter named \"{}\" on a route that pages its lists: the gateway's next-page links use it", crate::backend::azure_rest::PAGE_PARAMETER),
        );
    }
    if let Some(max) = rest.max_answer_bytes {
        if !(1..=ar::MAX_ANSWER_BYTES_LIMIT).contains(&max) {
            c.err(
                format!("{at}.max_answer_bytes"),
                format!(
                    "a size between 1 and {} bytes (1 MiB: the gateway holds what it reads of an answer; a larger answer can pass through unread, without \"project\"), got {max}",
                    ar::MAX_ANSWER_BYTES_LIMIT
                ),
            );
        }
    }
    if let Some(max) = rest.max_built_body_bytes {
        if !matches!(
            rest.body,
            Some(RestBody::Json(_) | RestBody::Template { .. })
        ) {
            c.err(
                format!("{at}.max_built_body_bytes"),
                "only with a \"json\" or \"template\" body (it limits the body they build)",
            );
        } else if !(1..=ar::MAX_BUILT_BODY_BYTES_LIMIT).contains(&max) {
            c.err(
                format!("{at}.max_built_body_bytes"),
                format!(
                    "a size between 1 and {} bytes (2 MiB: the gateway holds the body it builds until the call is done; a larger body can be sent as the caller's, \"body\": \"caller\" or \"stream\"), got {max}",
                    ar::MAX_BUILT_BODY_BYTES_LIMIT
                ),
            );
        }
    }
}

/// A JSON pointer (RFC 6901) as `project` takes it: `/a/b`, with `~0` and `~1` escapes only.
fn is_json_pointer(pointer: &str) -> bool {
    pointer.starts_with('/')
        && pointer
            .split('~')
            .skip(1)
            .all(|after| after.starts_with(['0', '1']))
}

/// Whether a pointer shows nothing beyond `allowed`: it is one of them or lies under one.
fn within_pointers(pointer: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|a| {
        pointer == a
            || pointer
                .strip_prefix(a.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// An `azure_operation` route: GET only, one path parameter `{operation}`, following
/// `azure_rest` routes that no other operation route follows.
fn check_azure_operation(
    c: &mut Checker,
    at: &str,
    route: &Route,
    op: &AzureOperationBackend,
    template: Option<&PathTemplate>,
) {
    if route.methods != [Method::Get] {
        c.err(
            format!("{at}.methods"),
            "[\"GET\"]: callers follow an operation with GET",
        );
    }
    if let Some(t) = template {
        let params: Vec<&str> = t.params().collect();
        if params != ["operation"] {
            c.err(
                format!("{at}.path"),
                format!("a path with one parameter, {{operation}}, e.g. \"/operations/{{operation}}\", got \"{}\"", route.path),
            );
        }
    }
    let at = format!("{at}.backend.azure_operation");
    if op.of.is_empty() {
        c.err(
            format!("{at}.of"),
            "the names of the azure_rest routes whose operations this route follows",
        );
    }
    for (i, name) in op.of.iter().enumerate() {
        let target = c.policy.routes.iter().find(|r| &r.name == name);
        if !matches!(target.map(|r| &r.backend), Some(Backend::AzureRest(_))) {
            c.err(
                format!("{at}.of[{i}]"),
                format!("the name of an azure_rest route, got \"{name}\""),
            );
            continue;
        }
        let followers = c
            .policy
            .routes
            .iter()
            .filter(|r| matches!(&r.backend, Backend::AzureOperation(o) if o.of.contains(name)))
            .count();
        if followers > 1 {
            c.err(
                format!("{at}.of[{i}]"),
                format!("a route no other azure_operation route follows, got \"{name}\""),
            );
        }
    }
    // What a caller following an operation sees: the operation's own fields, and of the rest
    // nothing a route that started it does not show.
    for (i, pointer) in op.project.iter().flatten().enumerate() {
        let path = format!("{at}.project[{i}]");
        if !is_json_pointer(pointer) {
            c.err(
                &path,
                format!("a JSON pointer such as \"/status\", got \"{pointer}\""),
            );
            continue;
        }
        if crate::backend::azure_rest::OPERATION_FIELDS.contains(&pointer.as_str()) {
            continue;
        }
        for name in &op.of {
            let Some(Backend::AzureRest(rest)) = c
                .policy
                .routes
                .iter()
                .find(|r| &r.name == name)
                .map(|r| &r.backend)
            else {
                continue;
            };
            if !rest.project.is_empty() && !within_pointers(pointer, &rest.project) {
                c.err(
                    &path,
                    format!(
                        "one of the operation's own fields ({}) or a pointer within what route \"{name}\" shows (its project: {}), got \"{pointer}\"",
                        crate::backend::azure_rest::OPERATION_FIELDS.join(", "),
                        rest.project.join(", ")
                    ),
                );
            }
        }
    }
}

/// Group commit's settings: not on a route that sends the caller's own batch, a linger of at
/// most a second, and batches of 2 to 1000 messages.
fn check_coalescing(c: &mut Checker<'_>, at: &str, sb: &ServiceBusBackend) {
    if sb.batch && sb.coalesce == Some(true) {
        c.err(
            format!("{at}.coalesce"),
            "false or absent on a batch route: it sends each caller's batch as it is, and coalescing applies to routes that take one message per request",
        );
    }
    if sb.linger_ms.is_some_and(|ms| ms > 1000) {
        c.err(
            format!("{at}.linger_ms"),
            format!(
                "a time between 0 and 1000 milliseconds, got {}: every waiting caller waits that long on top of the send",
                sb.linger_ms.unwrap_or_default()
            ),
        );
    }
    if sb
        .max_batch_messages
        .is_some_and(|n| !(2..=1000).contains(&n))
    {
        c.err(
            format!("{at}.max_batch_messages"),
            format!(
                "a number of messages between 2 and 1000, got {} (to send every message alone, set \"coalesce\": false)",
                sb.max_batch_messages.unwrap_or_default()
            ),
        );
    }
}
