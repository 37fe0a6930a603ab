//! What a validated backend resolves to: its base URL, entity and token audience, with the
//! defaults filled in. Used by `policy explain` and by the backends that build requests.

use super::model::{Backend, BlobBackend, Cloud, Inbound, Policy, Route, ServiceBusBackend};
use super::{SERVICE_BUS_AUDIENCE, STORAGE_AUDIENCE};

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

impl Backend {
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::ServiceBus(_) => "service_bus",
            Backend::Blob(_) => "blob",
            Backend::EventHubs(_) => "event_hubs",
            Backend::StorageQueue(_) => "storage_queue",
        }
    }

    pub fn identity(&self) -> &str {
        match self {
            Backend::ServiceBus(sb) => &sb.identity,
            Backend::Blob(b) => &b.identity,
            Backend::EventHubs(eh) => &eh.identity,
            Backend::StorageQueue(q) => &q.identity,
        }
    }

    pub fn audience(&self) -> &str {
        match self {
            Backend::ServiceBus(sb) => sb.audience(),
            Backend::Blob(b) => b.audience(),
            Backend::EventHubs(eh) => eh.audience(),
            Backend::StorageQueue(q) => q.audience(),
        }
    }

    /// Where requests go, for people: `{base}/{entity}` or `{base}/{container}/{blob template}`.
    pub fn target(&self, cloud: Cloud) -> String {
        match self {
            Backend::ServiceBus(sb) => format!("{}/{}", sb.base_url(cloud), sb.entity()),
            Backend::Blob(b) => format!("{}/{}/{}", b.base_url(cloud), b.container, b.blob),
            Backend::EventHubs(eh) => format!("{}/{}", eh.base_url(cloud), eh.hub),
            Backend::StorageQueue(q) => format!("{}/{}", q.base_url(cloud), q.queue),
        }
    }
}

impl Policy {
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
