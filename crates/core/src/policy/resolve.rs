//! What a validated backend resolves to: its base URL, entity and token audience, with the
//! defaults filled in. Used by `policy explain` and by the backends that build requests.

use super::cloud::{Service, EVENT_HUBS_AUDIENCE};
use super::model::{
    AzureRestBackend, Backend, BlobBackend, BlobSasBackend, Cloud, Credential, EventHubsBackend,
    Identity, Inbound, MessageMapping, Policy, Route, ServiceBusBackend, StorageQueueBackend,
    EVENT_HUBS_DEFAULT_MAX_MESSAGE_BYTES,
};
use super::{SERVICE_BUS_AUDIENCE, STORAGE_AUDIENCE};
use crate::backend::azure_rest::url::RestUrl;

impl ServiceBusBackend {
    /// `https://{namespace}.servicebus.windows.net` or the explicit endpoint, no trailing slash.
    pub fn base_url(&self, cloud: Cloud) -> String {
        match (&self.endpoint, &self.namespace) {
            (Some(endpoint), _) => endpoint.trim_end_matches('/').to_owned(),
            (None, Some(ns)) => format!("https://{ns}.{}", cloud.service_bus_suffix()),
            (None, None) => String::new(),
        }
    }

    /// The queue or topic name.
    pub fn entity(&self) -> &str {
        self.queue
            .as_deref()
            .or(self.topic.as_deref())
            .unwrap_or_default()
    }

    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(SERVICE_BUS_AUDIENCE)
    }
}

/// `https://{account}.blob.core.windows.net` or the explicit endpoint, no trailing slash.
fn blob_base_url(endpoint: Option<&str>, account: Option<&str>, cloud: Cloud) -> String {
    match (endpoint, account) {
        (Some(endpoint), _) => endpoint.trim_end_matches('/').to_owned(),
        (None, Some(account)) => format!("https://{account}.{}", cloud.blob_suffix()),
        (None, None) => String::new(),
    }
}

impl BlobBackend {
    /// `https://{account}.blob.core.windows.net` or the explicit endpoint, no trailing slash.
    pub fn base_url(&self, cloud: Cloud) -> String {
        blob_base_url(self.endpoint.as_deref(), self.account.as_deref(), cloud)
    }

    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(STORAGE_AUDIENCE)
    }
}

/// A valet-key URL's lifetime when the route sets none, in seconds.
pub const DEFAULT_SAS_LIFETIME_SECONDS: u32 = 300;

impl BlobSasBackend {
    /// `https://{account}.blob.core.windows.net` or the explicit endpoint, no trailing slash.
    pub fn base_url(&self, cloud: Cloud) -> String {
        blob_base_url(self.endpoint.as_deref(), self.account.as_deref(), cloud)
    }

    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(STORAGE_AUDIENCE)
    }

    pub fn lifetime_seconds(&self) -> u32 {
        self.lifetime_seconds
            .unwrap_or(DEFAULT_SAS_LIFETIME_SECONDS)
    }

    /// The account name a SAS is signed for: `account`, or the endpoint's last path segment
    /// (Azurite's `https://127.0.0.1:10000/devstoreaccount1`), or its host's first label
    /// (`https://contoso.blob.core.windows.net`).
    pub fn account_name(&self) -> Option<String> {
        if let Some(account) = &self.account {
            return Some(account.clone());
        }
        let endpoint = self.endpoint.as_deref()?;
        let rest = endpoint.split_once("://")?.1.trim_end_matches('/');
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let name = match path.rsplit('/').find(|s| !s.is_empty()) {
            Some(last) => last,
            // A host of the account's own: `{account}.{suffix}`, never an address.
            None => {
                let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
                let (first, rest) = host.split_once('.')?;
                let address = host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[');
                if address || rest.is_empty() {
                    return None;
                }
                first
            }
        };
        (!name.is_empty()).then(|| name.to_owned())
    }
}

impl AzureRestBackend {
    /// What Azure's answers on this route carry that a caller should not hold, when the
    /// route passes them on whole (no `project`, no `project_items`, `response_body` pass):
    /// receipts, secret values, keys or SAS tokens. `None` when nothing is known of it.
    pub fn secret_warning(&self, cloud: Cloud) -> Option<&'static str> {
        use super::model::ResponseBody;
        if !self.project.is_empty()
            || !self.project_items.is_empty()
            || self.response_body == ResponseBody::None
        {
            return None;
        }
        let url = RestUrl::parse(&self.url).ok()?;
        let shape = url.shape().to_ascii_lowercase();
        let path = shape.split('?').next().unwrap_or_default();
        let last = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or_default();
        match self.service(cloud)?.name {
            "Queue Storage" if path.ends_with("/messages") || path.contains("/messages/") => Some(
                "Storage queue answers to Put Message and Get Messages carry each message's PopReceipt, which lets its holder delete or change the message: set \"response_body\": \"none\", or use a storage_queue route (it holds the receipt back)",
            ),
            "Key Vault" if path.contains("/secrets") => Some(
                "Key Vault's secret answers carry the secret's value: project only what the caller may see (e.g. [\"/id\", \"/attributes\"], or project_items for lists)",
            ),
            "Resource Manager"
                if last.starts_with("list")
                    && ["key", "sas", "secret", "credential", "connectionstring"]
                        .iter()
                        .any(|w| last.contains(w))
                    || last.starts_with("regeneratekey") =>
            {
                Some("this Resource Manager action answers with account keys, connection strings, credentials or SAS tokens: project only what the caller may see, or set \"response_body\": \"none\"")
            }
            "Blob Storage" if shape.contains("comp=userdelegationkey") => Some(
                "Get User Delegation Key answers with a key that signs SAS URLs for the whole account: use a blob_sas route, which keeps the key in the gateway",
            ),
            _ => None,
        }
    }

    /// The Azure service this route calls: by its host, or, for a local endpoint, by its
    /// audience.
    pub fn service(&self, cloud: Cloud) -> Option<&'static Service> {
        let url = RestUrl::parse(&self.url).ok()?;
        cloud.service_at(&url.host).or_else(|| {
            self.audience
                .as_deref()
                .and_then(|a| cloud.service_for_audience(a))
        })
    }

    /// The token audience: the policy's, else the one the service documents.
    pub fn audience(&self, cloud: Cloud) -> String {
        self.audience
            .clone()
            .or_else(|| {
                self.service(cloud)
                    .and_then(|s| s.audiences.first())
                    .map(|a| a.to_string())
            })
            .unwrap_or_default()
    }
}

impl Identity {
    /// The Worker secrets that hold this identity's own secret (current first, then next).
    pub fn secret_names(&self) -> Vec<String> {
        match &self.credential {
            Credential::ClientSecret {
                secret,
                next_secret,
                ..
            } => std::iter::once(secret.clone())
                .chain(next_secret.clone())
                .collect(),
            Credential::Certificate {
                private_key_secret, ..
            } => vec![private_key_secret.clone()],
        }
    }
}

impl Backend {
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::ServiceBus(_) => "service_bus",
            Backend::Blob(_) => "blob",
            Backend::BlobSas(_) => "blob_sas",
            Backend::EventHubs(_) => "event_hubs",
            Backend::StorageQueue(_) => "storage_queue",
            Backend::AzureRest(_) => "azure_rest",
            Backend::AzureOperation(_) => "azure_operation",
        }
    }

    /// The identity whose token is sent (an operation route's is its routes').
    pub fn identity(&self) -> &str {
        match self {
            Backend::ServiceBus(sb) => &sb.identity,
            Backend::Blob(b) => &b.identity,
            Backend::BlobSas(b) => &b.identity,
            Backend::EventHubs(eh) => &eh.identity,
            Backend::StorageQueue(q) => &q.identity,
            Backend::AzureRest(r) => &r.identity,
            Backend::AzureOperation(_) => "",
        }
    }

    pub fn audience(&self, cloud: Cloud) -> String {
        match self {
            Backend::ServiceBus(sb) => sb.audience().to_owned(),
            Backend::Blob(b) => b.audience().to_owned(),
            Backend::BlobSas(b) => b.audience().to_owned(),
            Backend::EventHubs(eh) => eh.audience().to_owned(),
            Backend::StorageQueue(q) => q.audience().to_owned(),
            Backend::AzureRest(r) => r.audience(cloud),
            Backend::AzureOperation(_) => String::new(),
        }
    }

    /// Where requests go, for people: `{base}/{entity}` or `{base}/{container}/{blob template}`.
    pub fn target(&self, cloud: Cloud) -> String {
        match self {
            Backend::ServiceBus(sb) => format!("{}/{}", sb.base_url(cloud), sb.entity()),
            Backend::Blob(b) => format!("{}/{}/{}", b.base_url(cloud), b.container, b.blob),
            Backend::BlobSas(b) => format!(
                "{}/{}/{} (URL: {})",
                b.base_url(cloud),
                b.container,
                b.blob,
                b.permission.as_str()
            ),
            Backend::EventHubs(eh) => format!("{}/{}", eh.base_url(cloud), eh.hub),
            Backend::StorageQueue(q) => format!("{}/{}", q.base_url(cloud), q.queue),
            Backend::AzureRest(r) => RestUrl::parse(&r.url)
                .map(|u| u.shape())
                .unwrap_or_else(|_| r.url.clone()),
            Backend::AzureOperation(o) => format!("operations of {}", o.of.join(", ")),
        }
    }
}

impl Policy {
    /// The store-and-forward queue's producer binding.
    pub fn store_binding(&self) -> String {
        self.store_and_forward
            .as_ref()
            .and_then(|s| s.binding.clone())
            .unwrap_or_else(|| crate::store::DEFAULT_BINDING.to_owned())
    }

    /// The producer binding of the store-and-forward dead-letter queue.
    pub fn dead_letter_binding(&self) -> String {
        self.store_and_forward
            .as_ref()
            .and_then(|s| s.dead_letter_binding.clone())
            .unwrap_or_else(|| crate::store::DEFAULT_DEAD_LETTER_BINDING.to_owned())
    }

    /// A route's inbound checks over the policy's defaults.
    pub fn effective_inbound(&self, route: &Route) -> Inbound {
        let defaults = self.inbound.clone().unwrap_or_default();
        route
            .inbound
            .as_ref()
            .map(|i| i.over(&defaults))
            .unwrap_or(defaults)
    }
}

impl EventHubsBackend {
    /// `https://{namespace}.servicebus.windows.net` or the explicit endpoint, no trailing slash.
    pub fn base_url(&self, cloud: Cloud) -> String {
        self.as_service_bus().base_url(cloud)
    }

    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(EVENT_HUBS_AUDIENCE)
    }

    /// The mapping an event hub route sets: its `PartitionKey` and application properties.
    pub fn mapping(&self) -> MessageMapping {
        MessageMapping {
            partition_key: self.partition_key.clone(),
            properties: self.properties.clone(),
            ..MessageMapping::default()
        }
    }

    /// The Service Bus backend this event hub sends like: the same REST send to
    /// `{namespace}/{hub}/messages`, with only what an event hub takes mapped.
    pub fn as_service_bus(&self) -> ServiceBusBackend {
        ServiceBusBackend {
            namespace: self.namespace.clone(),
            endpoint: self.endpoint.clone(),
            queue: Some(self.hub.clone()),
            topic: None,
            identity: self.identity.clone(),
            audience: Some(self.audience().to_owned()),
            message: Some(self.mapping()),
            batch: self.batch,
            max_message_bytes: Some(self.max_message_bytes()),
            // Event Hubs has none.
            duplicate_detection: false,
            coalesce: self.coalesce,
            linger_ms: self.linger_ms,
            max_batch_messages: self.max_batch_messages,
        }
    }

    pub fn max_message_bytes(&self) -> u32 {
        self.max_message_bytes
            .unwrap_or(EVENT_HUBS_DEFAULT_MAX_MESSAGE_BYTES)
    }
}

impl StorageQueueBackend {
    /// `https://{account}.queue.core.windows.net` or the explicit endpoint, no trailing slash.
    pub fn base_url(&self, cloud: Cloud) -> String {
        match (&self.endpoint, &self.account) {
            (Some(endpoint), _) => endpoint.trim_end_matches('/').to_owned(),
            (None, Some(account)) => format!("https://{account}.{}", cloud.queue_suffix()),
            (None, None) => String::new(),
        }
    }

    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(STORAGE_AUDIENCE)
    }

    /// `{account}/{queue}/messages` with the route's fixed `visibilitytimeout` and `messagettl`.
    pub fn send_url(&self, cloud: Cloud) -> String {
        let mut url = format!("{}/{}/messages", self.base_url(cloud), self.queue);
        let mut query = Vec::new();
        if let Some(v) = self.visibility_timeout_seconds {
            query.push(format!("visibilitytimeout={v}"));
        }
        if let Some(ttl) = self.message_ttl_seconds {
            query.push(format!("messagettl={ttl}"));
        }
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query.join("&"));
        }
        url
    }

    /// The largest body this route accepts.
    pub fn max_body_bytes(&self) -> u32 {
        self.max_body_bytes.unwrap_or(self.encoding.largest_body())
    }
}
