//! What the rules of every part share: the checker that collects the errors, URLs, Azure's name
//! formats, and the checks of identity references, endpoints, audiences, templates and message
//! mappings that several backends' rules make.

use std::collections::BTreeSet;

use crate::encoding::is_header_name;
use crate::policy::model::*;
use crate::policy::PolicyError;
use crate::template::{Template, Var};

/// A URL split into the parts the policy cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url<'a> {
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: Option<u16>,
    pub path: &'a str,
}

impl<'a> Url<'a> {
    /// Parses `scheme://host[:port][/path]`; no user info, query or fragment.
    pub fn parse(s: &'a str) -> Option<Url<'a>> {
        let (scheme, rest) = s.split_once("://")?;
        if !matches!(scheme, "http" | "https") || s.contains(['?', '#', '@', ' ', '\\']) {
            return None;
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']')?;
            let port = v6[end + 1..].strip_prefix(':');
            (&authority[..end + 2], port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => Some(p.parse::<u16>().ok()?),
            None => None,
        };
        let host_ok = !host.is_empty()
            && host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
            });
        host_ok.then_some(Url {
            scheme,
            host,
            port,
            path,
        })
    }

    /// `scheme://host:port` with the scheme's default port made explicit, for comparison.
    pub fn origin(&self) -> String {
        let port = self
            .port
            .unwrap_or(if self.scheme == "https" { 443 } else { 80 });
        format!(
            "{}://{}:{}",
            self.scheme,
            self.host.to_ascii_lowercase(),
            port
        )
    }
}

pub(super) struct Checker<'p> {
    pub(super) policy: &'p Policy,
    pub(super) local_origins: BTreeSet<String>,
    pub(super) errors: Vec<PolicyError>,
}

impl Checker<'_> {
    pub(super) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError::new(path, message));
    }

    pub(super) fn is_local(&self, url: &Url) -> bool {
        self.local_origins.contains(&url.origin())
    }
}

/// What a route's templates may name: its path parameters, JWT claims when it checks a JWT,
/// and the body in an `azure_rest` body template.
#[derive(Clone)]
pub(super) struct Scope<'a> {
    pub(super) params: BTreeSet<&'a str>,
    pub(super) path_ok: bool,
    pub(super) jwt: bool,
    pub(super) body: bool,
}

pub(super) fn check_identity_ref(
    c: &mut Checker,
    at: &str,
    name: &str,
    unreadable: &BTreeSet<String>,
) {
    if c.policy.identities.contains_key(name) || unreadable.contains(name) {
        return;
    }
    // At most a few names: many routes may name a missing identity among many.
    const LISTED: usize = 10;
    let ids = &c.policy.identities;
    let names: Vec<&str> = ids.keys().take(LISTED).map(String::as_str).collect();
    let defined = match ids.len() {
        0 => "none is defined".to_owned(),
        n if n <= LISTED => format!("defined: {}", names.join(", ")),
        n => format!("defined: {} and {} more", names.join(", "), n - LISTED),
    };
    c.err(
        format!("{at}.identity"),
        format!("the name of an identity under \"identities\" ({defined}), got \"{name}\""),
    );
}

/// A storage account's name (or its explicit endpoint) for a Storage service with this host
/// suffix.
pub(super) fn check_storage_account(
    c: &mut Checker,
    at: &str,
    account: Option<&str>,
    endpoint: Option<&str>,
    suffix: &str,
) {
    if let Some(account) = account {
        if !is_account(account) {
            c.err(
                format!("{at}.account"),
                format!(
                    "a storage account name: 3-24 lowercase letters or digits, got \"{account}\""
                ),
            );
        }
    }
    check_endpoint(c, at, "account", account, endpoint, suffix, true);
}

/// Checks `namespace`/`account` against `endpoint`: exactly one, and the endpoint's host is
/// this cloud's host for the service or a declared local endpoint.
pub(super) fn check_endpoint(
    c: &mut Checker,
    at: &str,
    name_field: &str,
    name: Option<&str>,
    endpoint: Option<&str>,
    suffix: &str,
    allow_path: bool,
) {
    match (name, endpoint) {
        (Some(_), Some(_)) => c.err(
            at,
            format!("either \"{name_field}\" or \"endpoint\", not both"),
        ),
        (None, None) => c.err(
            at,
            format!("\"{name_field}\" (the Azure resource name) or \"endpoint\" (a URL)"),
        ),
        (None, Some(endpoint)) => {
            let at = format!("{at}.endpoint");
            let Some(url) = Url::parse(endpoint) else {
                c.err(at, format!("an absolute https:// URL, got \"{endpoint}\""));
                return;
            };
            if c.is_local(&url) {
                if !(allow_path || url.path.is_empty() || url.path == "/") {
                    c.err(at, format!("a URL without a path, got \"{endpoint}\""));
                }
                return;
            }
            let azure_host = url
                .host
                .to_ascii_lowercase()
                .strip_suffix(suffix)
                .is_some_and(|h| h.ends_with('.') && h.len() > 1);
            if url.scheme != "https"
                || !azure_host
                || url.port.is_some_and(|p| p != 443)
                || !(url.path.is_empty() || url.path == "/")
            {
                c.err(
                    at,
                    format!("https://NAME.{suffix} (the host of this cloud, no path) or an origin listed in local_endpoints, got \"{endpoint}\""),
                );
            }
        }
        (Some(_), None) => {}
    }
}

pub(super) fn check_audience(
    c: &mut Checker,
    at: &str,
    audience: Option<&str>,
    allowed: &[String],
    kind: &str,
) {
    let Some(audience) = audience else { return };
    let trimmed = audience.strip_suffix('/').unwrap_or(audience);
    if !allowed.iter().any(|a| a.as_str() == trimmed) {
        c.err(
            format!("{at}.audience"),
            format!(
                "an audience {kind} accepts: {}, got \"{audience}\"",
                allowed.join(" or ")
            ),
        );
    }
}

/// Headers a message property may not be named as: they mean something to HTTP or to Service Bus.
const RESERVED_PROPERTY_NAMES: &[&str] = &[
    "authorization",
    "brokerproperties",
    "content-type",
    "content-length",
    "content-encoding",
    "host",
    "connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "x-ms-version",
    "user-agent",
];

pub(super) fn check_message_mapping(c: &mut Checker, at: &str, m: &MessageMapping, scope: &Scope) {
    let fields = [
        ("message_id", &m.message_id),
        ("correlation_id", &m.correlation_id),
        ("session_id", &m.session_id),
        ("partition_key", &m.partition_key),
        ("label", &m.label),
        ("to", &m.to),
        ("reply_to", &m.reply_to),
        ("scheduled_enqueue_time_utc", &m.scheduled_enqueue_time_utc),
    ];
    for (field, template) in fields {
        if let Some(text) = template {
            check_template(c, &format!("{at}.{field}"), text, scope);
        }
    }
    if m.time_to_live == Some(0) {
        c.err(
            format!("{at}.time_to_live"),
            "a time to live of at least 1 second, got 0",
        );
    }
    for (name, text) in &m.properties {
        let path = format!("{at}.properties.{name}");
        if !is_header_name(name)
            || RESERVED_PROPERTY_NAMES.contains(&name.to_ascii_lowercase().as_str())
        {
            c.err(&path, format!("a property name that is an HTTP header name and not one HTTP or Service Bus reserves, got \"{name}\""));
        }
        check_template(c, &path, text, scope);
    }
}

/// Parses a template and checks that every `{path.NAME}` is a parameter of the route's path.
pub(super) fn check_template(
    c: &mut Checker,
    at: &str,
    text: &str,
    scope: &Scope,
) -> Option<Template> {
    let template = match Template::parse(text) {
        Ok(t) => t,
        Err(e) => {
            c.err(at, e);
            return None;
        }
    };
    if let Some(var) = template
        .vars()
        .find(|v| matches!(v, Var::Body | Var::BodyBase64))
    {
        if !scope.body {
            c.err(
                at,
                format!("{var} only in the body template of an azure_rest route"),
            );
        }
    }
    check_vars(c, at, template.vars(), scope);
    Some(template)
}

/// Checks that each `{path.NAME}` names a parameter of the route's path and that `{jwt.…}`
/// is used only where a JWT is checked.
pub(super) fn check_vars<'v>(
    c: &mut Checker,
    at: &str,
    vars: impl Iterator<Item = &'v Var>,
    scope: &Scope,
) {
    let vars: Vec<&Var> = vars.collect();
    for &var in &vars {
        if let Var::Path(name) = var {
            if scope.path_ok && !scope.params.contains(name.as_str()) {
                let have: Vec<&str> = scope.params.iter().copied().collect();
                let have = if have.is_empty() {
                    "the path has none".to_owned()
                } else {
                    format!("the path has {}", have.join(", "))
                };
                c.err(
                    at,
                    format!(
                        "{{path.NAME}} naming a parameter of the route's path ({have}), got {var}"
                    ),
                );
            }
        }
    }
    if !scope.jwt {
        if let Some(var) = vars.iter().find(|v| matches!(v, Var::Jwt(_))) {
            c.err(
                at,
                format!("{{jwt.CLAIM}} only on a route with a \"jwt\" inbound check, got {var}"),
            );
        }
    }
}

pub(super) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(super) fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub(super) fn is_tenant(s: &str) -> bool {
    is_guid(s)
        || (s.contains('.')
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }))
}

pub(super) fn is_namespace(s: &str) -> bool {
    (6..=50).contains(&s.len())
        && s.starts_with(|ch: char| ch.is_ascii_alphabetic())
        && s.ends_with(|ch: char| ch.is_ascii_alphanumeric())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

pub(super) fn is_entity(s: &str) -> bool {
    (1..=260).contains(&s.len())
        && !s.starts_with('/')
        && !s.ends_with('/')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'))
}

pub(super) fn is_account(s: &str) -> bool {
    (3..=24).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

pub(super) fn is_container(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}
