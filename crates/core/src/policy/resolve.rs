//! What a validated backend resolves to: its base URL, entity and token audience, with the
//! defaults filled in. Used by `policy explain` and by the backends that build requests.

use super::cloud::Service;
use super::model::{
    AzureRestBackend, Backend, BlobBackend, Cloud, Credential, Identity, Inbound, Policy, Route,
    ServiceBusBackend,
};
use super::{SERVICE_BUS_AUDIENCE, STORAGE_AUDIENCE};
use crate::backend::azure_rest::RestUrl;

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

impl BlobBackend {
    /// `https://{account}.blob.core.windows.net` or the explicit endpoint, no trailing slash.
    pub fn base_url(&self, cloud: Cloud) -> String {
        match (&self.endpoint, &self.account) {
            (Some(endpoint), _) => endpoint.trim_end_matches('/').to_owned(),
            (None, Some(account)) => format!("https://{account}.{}", cloud.blob_suffix()),
            (None, None) => String::new(),
        }
    }

    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(STORAGE_AUDIENCE)
    }
}

impl AzureRestBackend {
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
