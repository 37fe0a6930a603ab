//! The prepared policy: what build.rs compiles `policy.json` into and the worker embeds.
//!
//! Everything that can be decided before a request arrives is decided here, once, at build
//! time: the routes' effective inbound checks over the defaults, their path matchers sorted for
//! matching, every template parsed, IP lists parsed, API key digests decoded, backend URLs and
//! token keys resolved, the route that reads back what a blob route writes. The worker only
//! deserializes this (a few hundred microseconds, once per isolate) and never validates: a
//! policy that does not pass `policy check` fails the build instead.
//!
//! The encoding is JSON through serde, which the wasm carries anyway (measured in the README,
//! "Architecture": smaller than generating Rust constants for these types, and its load is
//! paid once per isolate).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::*;
use crate::identity::TokenKey;
use crate::inbound::ip::Cidr;
use crate::routing::{PathTemplate, Router};
use crate::template::Template;

/// A compiled policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    pub cloud: Cloud,
    pub identities: BTreeMap<String, Identity>,
    pub routes: Vec<PreparedRoute>,
    pub router: Router,
}

/// One route with everything its requests need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedRoute {
    pub name: String,
    pub methods: Vec<Method>,
    /// The route's checks over the policy's defaults.
    pub inbound: Inbound,
    /// The parsed IP lists of `inbound.ip`.
    pub ip: Option<IpLists>,
    /// `inbound.api_key`: its header, lowercased, and each key's SHA-256 when the policy gives
    /// one (keys held in Worker secrets are hashed once per isolate, when first read).
    pub api_key: Option<PreparedApiKey>,
    pub backend: PreparedBackend,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IpLists {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedApiKey {
    /// The header, lowercase.
    pub header: String,
    /// As the caller is told in `WWW-Authenticate`.
    pub header_display: String,
    pub keys: Vec<PreparedKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedKey {
    pub name: String,
    /// The Worker secret that holds the key, or …
    pub secret: Option<String>,
    /// … the key's SHA-256.
    pub digest: Option<[u8; 32]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PreparedBackend {
    ServiceBus(PreparedServiceBus),
    Blob(PreparedBlob),
    /// An event hub: Service Bus's REST send, of the Event Hubs flavour.
    EventHubs(PreparedServiceBus),
    StorageQueue(PreparedStorageQueue),
}

/// The identity a backend's requests carry a token of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenTarget {
    /// The identity's name in the policy.
    pub identity: String,
    pub key: TokenKey,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedServiceBus {
    pub config: ServiceBusBackend,
    /// `{namespace}/{entity}/messages`.
    pub send_url: String,
    pub token: TokenTarget,
    pub message: PreparedMessage,
    /// Service Bus, or an event hub sent to the same way.
    #[serde(default)]
    pub flavor: Flavor,
}

/// Which service a Service Bus-style send goes to. Event Hubs takes the same REST send; what
/// differs is its defaults (no `MessageId` or `CorrelationId`), the broker properties an event
/// may carry, its names in messages and its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Flavor {
    #[default]
    ServiceBus,
    EventHubs,
}

/// A Storage queue route: where it sends, with what token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedStorageQueue {
    pub config: StorageQueueBackend,
    /// `{account}/{queue}/messages[?visibilitytimeout=…&messagettl=…]`.
    pub send_url: String,
    pub token: TokenTarget,
}

/// A route's message mapping, parsed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PreparedMessage {
    /// BrokerProperties the route sets, by Service Bus's name.
    pub broker: Vec<(String, Template)>,
    pub time_to_live: Option<u64>,
    /// Application properties, name and template.
    pub properties: Vec<(String, Template)>,
}

impl PreparedMessage {
    /// A route's `message` mapping with its templates parsed.
    pub fn from_mapping(mapping: &MessageMapping) -> Result<PreparedMessage, String> {
        let mut message = PreparedMessage {
            time_to_live: mapping.time_to_live,
            ..PreparedMessage::default()
        };
        for (name, text) in mapping.broker_templates() {
            message
                .broker
                .push((name.to_owned(), Template::parse(text)?));
        }
        for (name, text) in &mapping.properties {
            message
                .properties
                .push((name.clone(), Template::parse(text)?));
        }
        Ok(message)
    }

    /// Whether the route sets this BrokerProperty (a batch element may not).
    pub fn maps_broker(&self, name: &str) -> bool {
        self.broker
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
            || (self.time_to_live.is_some() && name.eq_ignore_ascii_case("TimeToLive"))
    }

    /// Whether the route sets this application property (compared without case: it travels
    /// as an HTTP header).
    pub fn maps_property(&self, name: &str) -> bool {
        self.properties
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedBlob {
    pub config: BlobBackend,
    /// `{account}/{container}`: blob URLs are this, `/`, the encoded name.
    pub container_url: String,
    pub name: Template,
    pub metadata: Vec<(String, Template)>,
    pub token: TokenTarget,
    /// The path templates of the GET routes that read back what this route writes, in
    /// policy order: a write's `Location` is the first whose parameters the write has.
    pub readers: Vec<PathTemplate>,
}

impl Prepared {
    /// The worker's one step: the compiled policy from its JSON.
    pub fn load(json: &str) -> Result<Prepared, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    pub fn identity(&self, name: &str) -> Option<&Identity> {
        self.identities.get(name)
    }
}

#[cfg(feature = "compile")]
pub use compile::compile;

#[cfg(feature = "compile")]
mod compile {
    use super::*;
    use crate::policy::PolicyError;

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
                            let digest =
                                match &k.sha256 {
                                    Some(hex) => Some(decode_hex32(hex).ok_or_else(|| {
                                        format!("key {} has a bad sha256", k.name)
                                    })?),
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
                        config: sb.clone(),
                        message,
                        flavor: Flavor::ServiceBus,
                    })
                }
                Backend::EventHubs(eh) => {
                    let sb = eh.as_service_bus();
                    PreparedBackend::EventHubs(PreparedServiceBus {
                        send_url: format!("{}/{}/messages", sb.base_url(policy.cloud), sb.entity()),
                        token: target(&eh.identity, eh.audience())?,
                        message: PreparedMessage::from_mapping(&eh.mapping())?,
                        config: sb,
                        flavor: Flavor::EventHubs,
                    })
                }
                Backend::StorageQueue(q) => PreparedBackend::StorageQueue(PreparedStorageQueue {
                    send_url: q.send_url(policy.cloud),
                    token: target(&q.identity, q.audience())?,
                    config: q.clone(),
                }),
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
                    config: b.clone(),
                }),
            };
            routes.push(PreparedRoute {
                name: route.name.clone(),
                methods: route.methods.clone(),
                inbound,
                ip,
                api_key,
                backend,
            });
        }
        Ok(Prepared {
            cloud: policy.cloud,
            identities: policy.identities.clone(),
            router: Router::new(&policy.routes),
            routes,
        })
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
}
