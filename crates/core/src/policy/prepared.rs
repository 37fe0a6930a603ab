//! The prepared policy: what build.rs compiles `policy.json` into and the worker embeds.
//!
//! Everything that can be decided before a request arrives is decided here, once, at build
//! time: the routes' effective inbound checks over the defaults, their path matchers sorted for
//! matching, every template parsed, IP lists parsed, API key digests decoded, backend URLs and
//! token keys resolved, the route that reads back what a blob route writes. The worker only
//! deserializes this (a few hundred microseconds, once per isolate) and never validates: a
//! policy that does not pass `policy check` fails the build instead.
//!
//! The encoding is postcard through serde: no field names, and only the sequence half of each
//! type's visitor ends up in the wasm (measured: the JSON decoder of these types was about
//! 60 KiB of the upload's gzip). Its load is paid once per isolate.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::*;
use crate::backend::azure_rest::url::RestUrl;
use crate::identity::TokenKey;
use crate::inbound::ip::Cidr;
use crate::routing::{PathTemplate, Router};
use crate::template::{BodyFormat, Template};

/// A compiled policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    pub cloud: Cloud,
    /// Tries of a stored request's delivery before the queue dead-letters it.
    pub max_delivery_attempts: u32,
    /// Where a delivery that cannot succeed is put, with its reason.
    pub dead_letter_binding: String,
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
    /// The backend's origin (`scheme://host[:port]`): what the host's circuit breaker is kept
    /// by.
    pub host: String,
    pub breaker: BreakerConfig,
    /// The store-and-forward queue binding, when the route stores requests Azure cannot take.
    pub store: Option<String>,
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
// Built once per isolate and never moved on a request path: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum PreparedBackend {
    ServiceBus(PreparedServiceBus),
    Blob(PreparedBlob),
    /// An event hub: Service Bus's REST send, of the Event Hubs flavour.
    EventHubs(PreparedServiceBus),
    StorageQueue(PreparedStorageQueue),
    AzureRest(PreparedRest),
    AzureOperation(PreparedOperation),
    /// A valet-key route: answers with a URL; nothing of the file passes the gateway.
    BlobSas(PreparedBlobSas),
}

impl PreparedBackend {
    /// Whether the path of the URL sent to Azure is built from the request (a blob name, an
    /// `azure_rest` path value, an operation's URL), so that the route's calls go to many
    /// resources; otherwise (a queue, an event hub, a fixed URL) to one.
    pub fn many_resources(&self) -> bool {
        match self {
            PreparedBackend::Blob(b) => b.name.vars().next().is_some(),
            PreparedBackend::AzureRest(r) => r
                .url
                .segments
                .iter()
                .any(|s| matches!(s, crate::backend::azure_rest::url::UrlPart::Var(_))),
            PreparedBackend::AzureOperation(_) => true,
            PreparedBackend::BlobSas(_)
            | PreparedBackend::ServiceBus(_)
            | PreparedBackend::EventHubs(_)
            | PreparedBackend::StorageQueue(_) => false,
        }
    }
}

/// An `azure_rest` route's call, prepared.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedRest {
    pub url: RestUrl,
    pub api_version: ApiVersion,
    /// The method sent; `None`: the caller's.
    pub method: Option<Method>,
    /// Fixed headers (lowercase names) and their templates.
    pub headers: Vec<(String, Template)>,
    /// Caller headers passed on (lowercase).
    pub request_headers: Vec<String>,
    /// Caller query parameters passed on.
    pub query: Vec<String>,
    pub body: RestBodyPlan,
    pub max_body_bytes: u64,
    /// Largest body a `json` or `template` body builds.
    pub max_built_body_bytes: u64,
    /// Largest answer read to pass on a part of it (projected, or a followed operation's).
    pub max_answer_bytes: u32,
    /// Reply headers passed back (lowercase): the defaults and the route's.
    pub response_headers: Vec<String>,
    /// Reply headers the edge hands the core beyond its usual few: the above and the
    /// long-running operation headers.
    pub reply_headers: Vec<String>,
    pub errors: ErrorMode,
    pub project: Vec<String>,
    /// Pointers kept of each element of the answer's `/value`.
    pub project_items: Vec<String>,
    /// Whether Azure's list continuations become links on this route (`?page=`).
    pub pages: bool,
    pub response_body: ResponseBody,
    pub timeout_ms: u32,
    pub token: TokenTarget,
    /// The path of the `azure_operation` route that follows this route's operations, with
    /// `{operation}` where the handle goes.
    pub operation_path: Option<String>,
    /// The Worker secrets whose values seal operation and page handles (the identity's current
    /// and next secret): handles are sealed with the first set and opened with either.
    pub handle_secrets: Vec<String>,
}

/// How the API version travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApiVersion {
    None,
    Query(String),
    Header(String),
}

/// The body an `azure_rest` route sends, prepared.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RestBodyPlan {
    Caller,
    Stream,
    None,
    Template {
        content_type: String,
        format: BodyFormat,
        template: Template,
    },
    /// A JSON document whose strings are templates: the document with the strings that hold no
    /// variable already in place, and where each other string goes.
    Json {
        /// JSON text (the encoding has no self-describing values): parsed per request.
        skeleton: String,
        leaves: Vec<(String, Template)>,
    },
}

impl RestBodyPlan {
    /// The variables the body uses.
    pub fn vars(&self) -> Vec<&crate::template::Var> {
        match self {
            RestBodyPlan::Template { template, .. } => template.vars().collect(),
            RestBodyPlan::Json { leaves, .. } => {
                leaves.iter().flat_map(|(_, t)| t.vars()).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// The strings of a JSON document as templates, by JSON pointer; strings without a variable
/// are replaced by their text (`{{` read as `{`). The error names the pointer.
pub fn json_templates(
    value: &mut serde_json::Value,
    at: &str,
    out: &mut Vec<(String, Template)>,
) -> Result<(), String> {
    use serde_json::Value;
    match value {
        Value::String(text) => {
            let template = Template::parse(text).map_err(|e| format!("{at}: {e}"))?;
            if template.vars().next().is_some() {
                out.push((at.to_owned(), template));
            } else {
                *text = template.literals().collect();
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                json_templates(item, &format!("{at}/{i}"), out)?;
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let token = key.replace('~', "~0").replace('/', "~1");
                json_templates(item, &format!("{at}/{token}"), out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// An `azure_operation` route: the indices (in `Prepared::routes`) of the routes it follows, and
/// what of an operation's answer it shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedOperation {
    pub of: Vec<usize>,
    /// The JSON pointers of an operation's answer the caller sees.
    pub project: Vec<String>,
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
    pub config: ServiceBusSettings,
    /// `{namespace}/{entity}/messages`.
    pub send_url: String,
    pub token: TokenTarget,
    pub message: PreparedMessage,
    /// Service Bus, or an event hub sent to the same way.
    #[serde(default)]
    pub flavor: Flavor,
    /// Group commit's lanes: the isolate's sends in flight and those waiting to join a batch.
    #[serde(skip)]
    pub lanes: crate::coalesce::Lanes,
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

/// What a Service Bus or Event Hubs route's requests read of its `backend`, defaults applied.
///
/// The prepared policy carries only this, not the policy's `backend` object: every field the
/// wasm decodes is code in the upload, and the rest (the namespace, the `message` mapping now
/// in [`PreparedMessage`], …) is never read after the build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceBusSettings {
    /// The queue, topic or event hub.
    pub entity: String,
    /// The caller sends a batch (a JSON array).
    pub batch: bool,
    pub duplicate_detection: bool,
    pub linger_ms: Option<u32>,
    coalesces: bool,
    max_batch_messages: u32,
    max_message_bytes: u32,
}

impl ServiceBusSettings {
    pub fn entity(&self) -> &str {
        &self.entity
    }

    /// Whether concurrent single-message sends leave together ([`crate::coalesce`]).
    pub fn coalesces(&self) -> bool {
        self.coalesces
    }

    /// The most messages in one coalesced batch.
    pub fn max_batch_messages(&self) -> usize {
        self.max_batch_messages as usize
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes as usize
    }
}

impl From<&ServiceBusBackend> for ServiceBusSettings {
    fn from(b: &ServiceBusBackend) -> Self {
        ServiceBusSettings {
            entity: b.entity().to_owned(),
            batch: b.batch,
            duplicate_detection: b.duplicate_detection,
            linger_ms: b.linger_ms,
            coalesces: b.coalesces(),
            max_batch_messages: u32::try_from(b.max_batch_messages()).unwrap_or(u32::MAX),
            max_message_bytes: u32::try_from(b.max_message_bytes()).unwrap_or(u32::MAX),
        }
    }
}

/// What a Storage queue route's requests read of its `backend`, defaults applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageQueueSettings {
    pub queue: String,
    pub encoding: QueueEncoding,
    max_body_bytes: u32,
}

impl StorageQueueSettings {
    /// The largest body this route accepts.
    pub fn max_body_bytes(&self) -> u32 {
        self.max_body_bytes
    }
}

impl From<&StorageQueueBackend> for StorageQueueSettings {
    fn from(q: &StorageQueueBackend) -> Self {
        StorageQueueSettings {
            queue: q.queue.clone(),
            encoding: q.encoding,
            max_body_bytes: q.max_body_bytes(),
        }
    }
}

/// What a blob route's requests read of its `backend`, defaults applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobSettings {
    pub container: String,
    /// The content type every write gets, over the caller's.
    pub content_type: Option<String>,
    /// Writes may replace a blob (otherwise they are create-only, `If-None-Match: *`).
    pub overwrite: bool,
    max_body_bytes: u64,
    single_put_max_bytes: u64,
    block_bytes: u32,
    idle_timeout_ms: u32,
}

impl BlobSettings {
    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes
    }

    pub fn single_put_max_bytes(&self) -> u64 {
        self.single_put_max_bytes
    }

    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    pub fn idle_timeout_ms(&self) -> f64 {
        f64::from(self.idle_timeout_ms)
    }
}

impl From<&BlobBackend> for BlobSettings {
    fn from(b: &BlobBackend) -> Self {
        BlobSettings {
            container: b.container.clone(),
            content_type: b.content_type.clone(),
            overwrite: b.overwrite,
            max_body_bytes: b.max_body_bytes(),
            single_put_max_bytes: b.single_put_max_bytes(),
            block_bytes: b.block_bytes(),
            idle_timeout_ms: b.idle_timeout_ms(),
        }
    }
}

/// A Storage queue route: where it sends, with what token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedStorageQueue {
    pub config: StorageQueueSettings,
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
    pub config: BlobSettings,
    /// `{account}/{container}`: blob URLs are this, `/`, the encoded name.
    pub container_url: String,
    pub name: Template,
    pub metadata: Vec<(String, Template)>,
    pub token: TokenTarget,
    /// The path templates of the GET routes that read back what this route writes, in
    /// policy order: a write's `Location` is the first whose parameters the write has.
    pub readers: Vec<PathTemplate>,
}

/// A valet-key route, prepared: where its key comes from and what its URLs are for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedBlobSas {
    /// The account name the URLs are signed for.
    pub account: String,
    pub container: String,
    /// `{account URL}/{container}`: URLs are this, `/`, the encoded name, `?`, the SAS.
    pub container_url: String,
    pub name: Template,
    pub permission: SasPermission,
    pub lifetime_ms: f64,
    /// Whether the URL is limited to the caller's address (`sip`).
    pub client_ip: bool,
    /// `spr`: `https`, or `https,http` for a local endpoint served over plain HTTP.
    pub protocol: String,
    pub content_disposition: Option<Template>,
    pub content_type: Option<Template>,
    /// Get User Delegation Key: `{account URL}/?restype=service&comp=userdelegationkey`.
    pub key_url: String,
    /// The isolate's key cache entry: one key per account and identity.
    pub key_id: crate::sas::KeyId,
    pub token: TokenTarget,
}

impl Prepared {
    /// The worker's one step: the compiled policy from the bytes build.rs wrote.
    pub fn load(bytes: &[u8]) -> Result<Prepared, String> {
        postcard::from_bytes(bytes).map_err(|e| e.to_string())
    }

    /// The bytes the worker embeds: postcard (serde, without field names), whose decoder in the
    /// wasm is a fraction of the size of a JSON one for the same types.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        postcard::to_allocvec(self).map_err(|e| e.to_string())
    }

    pub fn identity(&self, name: &str) -> Option<&Identity> {
        self.identities.get(name)
    }
}
