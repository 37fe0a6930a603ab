//! The compiler's last stage: a valid policy (read and validated by [`super::load`]) prepared
//! into the form the worker embeds ([`super::prepared::Prepared`]). Native only (the `compile`
//! feature), like reading and validation: the worker only loads the result.

use super::model::*;
use super::prepared::*;
use super::PolicyError;
use crate::backend::azure_rest::url::RestUrl;
use crate::inbound::ip::Cidr;
use crate::routing::{PathTemplate, Router};
use crate::template::{BodyFormat, Template};

/// Reads, validates and prepares a policy: every error at once (as `policy check` reports
/// them), or the prepared form.
pub fn compile(text: &str) -> Result<Prepared, Vec<PolicyError>> {
    let policy = crate::policy::load(text)?;
    prepare(&policy).map_err(|e| vec![PolicyError::new("(compiler)", e)])
}

/// Prepares a valid policy. An error here means validation let through something it should
/// not have: a bug, reported rather than panicking.
fn prepare(policy: &Policy) -> Result<Prepared, String> {
    let template = |text: &str| Template::parse(text);
    let mut routes = Vec::with_capacity(policy.routes.len());
    for route in &policy.routes {
        let inbound = policy.effective_inbound(route);
        let ip = match &inbound.ip {
            Some(filter) => Some(IpLists {
                allow: filter
                    .allow
                    .iter()
                    .map(|c| Cidr::parse(c))
                    .collect::<Result<_, _>>()?,
                deny: filter
                    .deny
                    .iter()
                    .map(|c| Cidr::parse(c))
                    .collect::<Result<_, _>>()?,
            }),
            None => None,
        };
        let api_key = match &inbound.api_key {
            Some(check) => Some(PreparedApiKey {
                header: check.header.to_ascii_lowercase(),
                header_display: check.header.clone(),
                keys: check
                    .keys
                    .iter()
                    .map(|k| {
                        let digest = match &k.sha256 {
                            Some(hex) => Some(
                                decode_hex32(hex)
                                    .ok_or_else(|| format!("key {} has a bad sha256", k.name))?,
                            ),
                            None => None,
                        };
                        Ok(PreparedKey {
                            name: k.name.clone(),
                            secret: k.secret.clone(),
                            digest,
                        })
                    })
                    .collect::<Result<_, String>>()?,
            }),
            None => None,
        };
        let target = |identity_name: &str, audience: &str| -> Result<TokenTarget, String> {
            let identity = policy
                .identities
                .get(identity_name)
                .ok_or_else(|| format!("no identity {identity_name}"))?;
            Ok(TokenTarget {
                identity: identity_name.to_owned(),
                key: identity.token_key(policy.cloud, audience),
            })
        };
        let backend = match &route.backend {
            Backend::ServiceBus(sb) => {
                let message = match &sb.message {
                    Some(m) => PreparedMessage::from_mapping(m)?,
                    None => PreparedMessage::default(),
                };
                PreparedBackend::ServiceBus(PreparedServiceBus {
                    send_url: format!("{}/{}/messages", sb.base_url(policy.cloud), sb.entity()),
                    token: target(&sb.identity, sb.audience())?,
                    config: sb.into(),
                    message,
                    flavor: Flavor::ServiceBus,
                    lanes: Default::default(),
                })
            }
            Backend::EventHubs(eh) => {
                let sb = eh.as_service_bus();
                PreparedBackend::EventHubs(PreparedServiceBus {
                    send_url: format!("{}/{}/messages", sb.base_url(policy.cloud), sb.entity()),
                    token: target(&eh.identity, eh.audience())?,
                    message: PreparedMessage::from_mapping(&eh.mapping())?,
                    config: (&sb).into(),
                    flavor: Flavor::EventHubs,
                    lanes: Default::default(),
                })
            }
            Backend::StorageQueue(q) => PreparedBackend::StorageQueue(PreparedStorageQueue {
                send_url: q.send_url(policy.cloud),
                token: target(&q.identity, q.audience())?,
                config: q.into(),
            }),
            Backend::AzureRest(r) => PreparedBackend::AzureRest(prepare_rest(
                policy,
                route,
                r,
                target(&r.identity, &r.audience(policy.cloud))?,
            )?),
            Backend::AzureOperation(o) => PreparedBackend::AzureOperation(PreparedOperation {
                of: o
                    .of
                    .iter()
                    .map(|name| {
                        policy
                            .routes
                            .iter()
                            .position(|r| &r.name == name)
                            .ok_or_else(|| format!("no route {name}"))
                    })
                    .collect::<Result<_, String>>()?,
                project: o.project.clone().unwrap_or_else(|| {
                    crate::backend::azure_rest::OPERATION_FIELDS
                        .iter()
                        .map(|p| (*p).to_owned())
                        .collect()
                }),
            }),
            Backend::BlobSas(b) => {
                let base = b.base_url(policy.cloud);
                let token = target(&b.identity, b.audience())?;
                PreparedBackend::BlobSas(PreparedBlobSas {
                    account: b.account_name().ok_or("no account name")?,
                    container: b.container.clone(),
                    container_url: format!("{base}/{}", b.container),
                    name: template(&b.blob)?,
                    permission: b.permission,
                    lifetime_ms: f64::from(b.lifetime_seconds()) * 1000.0,
                    client_ip: b.client_ip,
                    protocol: if base.starts_with("http://") {
                        "https,http"
                    } else {
                        "https"
                    }
                    .to_owned(),
                    content_disposition: b
                        .response_content_disposition
                        .as_deref()
                        .map(template)
                        .transpose()?,
                    content_type: b
                        .response_content_type
                        .as_deref()
                        .map(template)
                        .transpose()?,
                    key_url: format!("{base}/?restype=service&comp=userdelegationkey"),
                    key_id: crate::sas::KeyId {
                        account_url: base,
                        token: token.key.clone(),
                    },
                    token,
                })
            }
            Backend::Blob(b) => PreparedBackend::Blob(PreparedBlob {
                container_url: format!("{}/{}", b.base_url(policy.cloud), b.container),
                name: template(&b.blob)?,
                metadata: b
                    .metadata
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), template(v)?)))
                    .collect::<Result<_, String>>()?,
                token: target(&b.identity, b.audience())?,
                readers: readers_of(policy, b),
                config: b.into(),
            }),
        };
        let breaker = BreakerConfig {
            many_resources: backend.many_resources(),
            ..BreakerSettings::resolve(route.breaker.as_ref())
        };
        routes.push(PreparedRoute {
            name: route.name.clone(),
            methods: route.methods.clone(),
            inbound,
            ip,
            api_key,
            host: backend_origin(policy, route),
            breaker,
            store: (route.when_unavailable == WhenUnavailable::Queue)
                .then(|| policy.store_binding()),
            backend,
        });
    }
    Ok(Prepared {
        cloud: policy.cloud,
        max_delivery_attempts: policy
            .store_and_forward
            .as_ref()
            .and_then(|s| s.max_attempts)
            .unwrap_or(crate::store::DEFAULT_MAX_ATTEMPTS),
        dead_letter_binding: policy.dead_letter_binding(),
        identities: policy.identities.clone(),
        router: Router::new(&policy.routes),
        routes,
    })
}

/// An `azure_rest` route's call: URL parsed, version placed, headers and body prepared.
fn prepare_rest(
    policy: &Policy,
    route: &Route,
    r: &AzureRestBackend,
    token: TokenTarget,
) -> Result<PreparedRest, String> {
    use crate::backend::azure_rest as rest;
    use crate::policy::cloud::Versioning;
    let url = RestUrl::parse(&r.url)?;
    let service = r
        .service(policy.cloud)
        .ok_or("no Azure service for the URL")?;
    let api_version = match (service.versioning, &r.api_version) {
        (Versioning::Header, Some(v)) => ApiVersion::Header(v.clone()),
        (_, Some(v)) => ApiVersion::Query(v.clone()),
        (_, None) => ApiVersion::None,
    };
    let body = match &r.body {
        None | Some(RestBody::Caller) => RestBodyPlan::Caller,
        Some(RestBody::Stream) => RestBodyPlan::Stream,
        Some(RestBody::None) => RestBodyPlan::None,
        Some(RestBody::Json(document)) => {
            let mut skeleton = document.clone();
            let mut leaves = Vec::new();
            json_templates(&mut skeleton, "", &mut leaves)?;
            RestBodyPlan::Json {
                skeleton: skeleton.to_string(),
                leaves,
            }
        }
        Some(RestBody::Template {
            content_type,
            template,
        }) => RestBodyPlan::Template {
            content_type: content_type.clone(),
            format: BodyFormat::of(content_type).ok_or("a JSON or XML content type")?,
            template: Template::parse(template)?,
        },
    };
    let lower = |names: &[String]| -> Vec<String> {
        names.iter().map(|n| n.to_ascii_lowercase()).collect()
    };
    let mut response_headers: Vec<String> = rest::DEFAULT_RESPONSE_HEADERS
        .iter()
        .map(|h| h.to_string())
        .collect();
    if r.errors == ErrorMode::Pass {
        response_headers.push("x-ms-error-code".to_owned());
    }
    for name in lower(&r.response_headers) {
        if !response_headers.contains(&name) {
            response_headers.push(name);
        }
    }
    let mut reply_headers = response_headers.clone();
    reply_headers.extend(["location".to_owned(), "azure-asyncoperation".to_owned()]);
    let operation_path = policy.routes.iter().find_map(|other| match &other.backend {
        Backend::AzureOperation(o) if o.of.contains(&route.name) => Some(other.path.clone()),
        _ => None,
    });
    let identity = policy
        .identities
        .get(&r.identity)
        .ok_or_else(|| format!("no identity {}", r.identity))?;
    Ok(PreparedRest {
        url,
        api_version,
        method: r.method,
        headers: r
            .headers
            .iter()
            .map(|(k, v)| Ok((k.to_ascii_lowercase(), Template::parse(v)?)))
            .collect::<Result<_, String>>()?,
        request_headers: lower(&r.request_headers),
        query: r.query.clone(),
        body,
        max_body_bytes: r.max_body_bytes.unwrap_or(rest::DEFAULT_MAX_BODY_BYTES),
        max_built_body_bytes: r.max_built_body_bytes.unwrap_or_else(|| {
            rest::default_max_built_body_bytes(
                r.max_body_bytes.unwrap_or(rest::DEFAULT_MAX_BODY_BYTES),
            )
        }),
        max_answer_bytes: r.max_answer_bytes.unwrap_or(rest::DEFAULT_MAX_ANSWER_BYTES),
        response_headers,
        reply_headers,
        errors: r.errors,
        project: r.project.clone(),
        project_items: r.project_items.clone(),
        pages: r.pages,
        response_body: r.response_body,
        timeout_ms: r.timeout_ms.unwrap_or(rest::DEFAULT_TIMEOUT_MS),
        token,
        operation_path,
        handle_secrets: identity.secret_names(),
    })
}

/// The origin a route's backend calls go to (an operation route's: the first route it
/// follows).
fn backend_origin(policy: &Policy, route: &Route) -> String {
    let backend = match &route.backend {
        Backend::AzureOperation(o) => policy
            .routes
            .iter()
            .find(|r| o.of.first() == Some(&r.name))
            .map(|r| &r.backend)
            .unwrap_or(&route.backend),
        b => b,
    };
    let target = backend.target(policy.cloud);
    let after = target.find("://").map_or(0, |i| i + 3);
    let end = target[after..]
        .find('/')
        .map_or(target.len(), |i| after + i);
    target[..end].to_ascii_lowercase()
}

/// The path templates of GET routes on the same container and blob name template.
fn readers_of(policy: &Policy, writer: &BlobBackend) -> Vec<PathTemplate> {
    policy
        .routes
        .iter()
        .filter_map(|route| {
            let Backend::Blob(reader) = &route.backend else {
                return None;
            };
            let same_blob = reader.blob == writer.blob
                && reader.container == writer.container
                && reader.account == writer.account
                && reader.endpoint == writer.endpoint;
            if !same_blob || !route.methods.contains(&Method::Get) {
                return None;
            }
            PathTemplate::parse(&route.path).ok()
        })
        .collect()
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}
