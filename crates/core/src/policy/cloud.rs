//! Azure's clouds: each has its own Entra authority, service host suffixes and token audiences.
//! The one table of them (the compiler checks hosts against it, the core builds URLs from it).

use super::model::Cloud;

/// Default token audiences per backend kind (scope = audience + `/.default`).
pub const SERVICE_BUS_AUDIENCE: &str = "https://servicebus.azure.net";
pub const STORAGE_AUDIENCE: &str = "https://storage.azure.com";
/// Event Hubs' audience, the one the Azure SDKs ask for (a route may use the namespace URL).
pub const EVENT_HUBS_AUDIENCE: &str = "https://eventhubs.azure.net";

impl Cloud {
    pub fn authority_host(self) -> &'static str {
        match self {
            Cloud::Public => "login.microsoftonline.com",
            Cloud::UsGovernment => "login.microsoftonline.us",
            Cloud::China => "login.chinacloudapi.cn",
        }
    }

    pub fn service_bus_suffix(self) -> &'static str {
        match self {
            Cloud::Public => "servicebus.windows.net",
            Cloud::UsGovernment => "servicebus.usgovcloudapi.net",
            Cloud::China => "servicebus.chinacloudapi.cn",
        }
    }

    pub fn blob_suffix(self) -> &'static str {
        match self {
            Cloud::Public => "blob.core.windows.net",
            Cloud::UsGovernment => "blob.core.usgovcloudapi.net",
            Cloud::China => "blob.core.chinacloudapi.cn",
        }
    }

    /// Storage queues: `{account}.queue.…`.
    pub fn queue_suffix(self) -> &'static str {
        match self {
            Cloud::Public => "queue.core.windows.net",
            Cloud::UsGovernment => "queue.core.usgovcloudapi.net",
            Cloud::China => "queue.core.chinacloudapi.cn",
        }
    }

    /// Service Bus audiences other than the namespace URL that this cloud's Entra issues.
    pub fn service_bus_audiences(self) -> &'static [&'static str] {
        match self {
            Cloud::Public => &[SERVICE_BUS_AUDIENCE],
            Cloud::UsGovernment => &[SERVICE_BUS_AUDIENCE, "https://servicebus.usgovcloudapi.net"],
            Cloud::China => &[SERVICE_BUS_AUDIENCE, "https://servicebus.chinacloudapi.cn"],
        }
    }
}
