//! Azure's clouds: each has its own Entra authority, service host suffixes and token audiences.
//! The one table of them (the compiler checks hosts against it, the core builds URLs from it).

use super::model::Cloud;

/// Default token audiences per backend kind (scope = audience + `/.default`).
pub const SERVICE_BUS_AUDIENCE: &str = "https://servicebus.azure.net";
pub const STORAGE_AUDIENCE: &str = "https://storage.azure.com";

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

/// How a service takes its API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versioning {
    /// `?api-version=` on every call: the policy must pin one.
    Query,
    /// `?api-version=` where the operation wants one: the policy may pin one.
    OptionalQuery,
    /// The `x-ms-version` header (Storage): the policy must pin one; `x-ms-date` is sent too.
    Header,
    /// In the path (`/v1.0/…`): the policy may not set `api_version`.
    Path,
}

/// How a service's host is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRule {
    Exact(&'static str),
    /// `{name}.{suffix}`: one label before the suffix.
    Suffix(&'static str),
}

impl HostRule {
    pub fn matches(self, host: &str) -> bool {
        match self {
            HostRule::Exact(h) => host.eq_ignore_ascii_case(h),
            HostRule::Suffix(s) => {
                host.len() > s.len() + 1
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
                    && host.as_bytes()[host.len() - s.len() - 1] == b'.'
                    && !host[..host.len() - s.len() - 1].contains('.')
            }
        }
    }

    pub fn describe(self) -> String {
        match self {
            HostRule::Exact(h) => h.to_owned(),
            HostRule::Suffix(s) => format!("NAME.{s}"),
        }
    }
}

/// An Azure REST service the `azure_rest` backend may call: where it lives, which token
/// audiences it accepts (the first is the default), and how it is versioned.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    pub name: &'static str,
    pub host: HostRule,
    pub audiences: &'static [&'static str],
    /// The service also accepts a token for its own origin (`https://{host}`).
    pub origin_audience: bool,
    pub versioning: Versioning,
}

const fn service(
    name: &'static str,
    host: HostRule,
    audiences: &'static [&'static str],
    origin_audience: bool,
    versioning: Versioning,
) -> Service {
    Service {
        name,
        host,
        audiences,
        origin_audience,
        versioning,
    }
}

use HostRule::{Exact, Suffix};
use Versioning::{Header, OptionalQuery, Path, Query};

const STORAGE: &[&str] = &[STORAGE_AUDIENCE];
/// Event Hubs' token audience, the same in every cloud.
pub const EVENT_HUBS_AUDIENCE: &str = "https://eventhubs.azure.net";

/// The public cloud's REST services (Azure SQL's and Cosmos DB's management APIs are Resource
/// Manager's; Cosmos DB's data plane takes its own `Authorization` format, not a bearer token,
/// so it is not listed).
const PUBLIC_SERVICES: &[Service] = &[
    service(
        "Resource Manager",
        Exact("management.azure.com"),
        &[
            "https://management.azure.com/",
            "https://management.core.windows.net/",
        ],
        false,
        Query,
    ),
    service(
        "Microsoft Graph",
        Exact("graph.microsoft.com"),
        &["https://graph.microsoft.com"],
        false,
        Path,
    ),
    service(
        "Key Vault",
        Suffix("vault.azure.net"),
        &["https://vault.azure.net"],
        false,
        Query,
    ),
    service(
        "Managed HSM",
        Suffix("managedhsm.azure.net"),
        &["https://managedhsm.azure.net"],
        false,
        Query,
    ),
    service(
        "Blob Storage",
        Suffix("blob.core.windows.net"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Queue Storage",
        Suffix("queue.core.windows.net"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Table Storage",
        Suffix("table.core.windows.net"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "File Storage",
        Suffix("file.core.windows.net"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Data Lake Storage",
        Suffix("dfs.core.windows.net"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Service Bus or Event Hubs",
        Suffix("servicebus.windows.net"),
        &[SERVICE_BUS_AUDIENCE, EVENT_HUBS_AUDIENCE],
        true,
        OptionalQuery,
    ),
    service(
        "App Configuration",
        Suffix("azconfig.io"),
        &["https://azconfig.io"],
        false,
        Query,
    ),
    service(
        "Event Grid",
        Suffix("eventgrid.azure.net"),
        &["https://eventgrid.azure.net"],
        false,
        Query,
    ),
    service(
        "Azure OpenAI",
        Suffix("openai.azure.com"),
        &["https://cognitiveservices.azure.com"],
        false,
        Query,
    ),
    service(
        "Log Analytics",
        Exact("api.loganalytics.io"),
        &["https://api.loganalytics.io"],
        false,
        Path,
    ),
];

const US_GOVERNMENT_SERVICES: &[Service] = &[
    service(
        "Resource Manager",
        Exact("management.usgovcloudapi.net"),
        &[
            "https://management.usgovcloudapi.net/",
            "https://management.core.usgovcloudapi.net/",
        ],
        false,
        Query,
    ),
    service(
        "Microsoft Graph",
        Exact("graph.microsoft.us"),
        &["https://graph.microsoft.us"],
        false,
        Path,
    ),
    service(
        "Key Vault",
        Suffix("vault.usgovcloudapi.net"),
        &["https://vault.usgovcloudapi.net"],
        false,
        Query,
    ),
    service(
        "Blob Storage",
        Suffix("blob.core.usgovcloudapi.net"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Queue Storage",
        Suffix("queue.core.usgovcloudapi.net"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Table Storage",
        Suffix("table.core.usgovcloudapi.net"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "File Storage",
        Suffix("file.core.usgovcloudapi.net"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Service Bus or Event Hubs",
        Suffix("servicebus.usgovcloudapi.net"),
        &[
            SERVICE_BUS_AUDIENCE,
            EVENT_HUBS_AUDIENCE,
            "https://servicebus.usgovcloudapi.net",
        ],
        true,
        OptionalQuery,
    ),
    service(
        "App Configuration",
        Suffix("azconfig.azure.us"),
        &["https://azconfig.azure.us"],
        false,
        Query,
    ),
    service(
        "Azure OpenAI",
        Suffix("openai.azure.us"),
        &["https://cognitiveservices.azure.us"],
        false,
        Query,
    ),
    service(
        "Log Analytics",
        Exact("api.loganalytics.us"),
        &["https://api.loganalytics.us"],
        false,
        Path,
    ),
];

const CHINA_SERVICES: &[Service] = &[
    service(
        "Resource Manager",
        Exact("management.chinacloudapi.cn"),
        &[
            "https://management.chinacloudapi.cn/",
            "https://management.core.chinacloudapi.cn/",
        ],
        false,
        Query,
    ),
    service(
        "Microsoft Graph",
        Exact("microsoftgraph.chinacloudapi.cn"),
        &["https://microsoftgraph.chinacloudapi.cn"],
        false,
        Path,
    ),
    service(
        "Key Vault",
        Suffix("vault.azure.cn"),
        &["https://vault.azure.cn"],
        false,
        Query,
    ),
    service(
        "Blob Storage",
        Suffix("blob.core.chinacloudapi.cn"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Queue Storage",
        Suffix("queue.core.chinacloudapi.cn"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Table Storage",
        Suffix("table.core.chinacloudapi.cn"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "File Storage",
        Suffix("file.core.chinacloudapi.cn"),
        STORAGE,
        true,
        Header,
    ),
    service(
        "Service Bus or Event Hubs",
        Suffix("servicebus.chinacloudapi.cn"),
        &[
            SERVICE_BUS_AUDIENCE,
            EVENT_HUBS_AUDIENCE,
            "https://servicebus.chinacloudapi.cn",
        ],
        true,
        OptionalQuery,
    ),
    service(
        "App Configuration",
        Suffix("azconfig.azure.cn"),
        &["https://azconfig.azure.cn"],
        false,
        Query,
    ),
];

impl Cloud {
    /// The REST services of this cloud that `azure_rest` routes may call.
    pub fn services(self) -> &'static [Service] {
        match self {
            Cloud::Public => PUBLIC_SERVICES,
            Cloud::UsGovernment => US_GOVERNMENT_SERVICES,
            Cloud::China => CHINA_SERVICES,
        }
    }

    /// The service at `host` (no port), if it is one of this cloud's.
    pub fn service_at(self, host: &str) -> Option<&'static Service> {
        self.services().iter().find(|s| s.host.matches(host))
    }

    /// The service that accepts `audience` (for a local endpoint, which has no Azure host).
    pub fn service_for_audience(self, audience: &str) -> Option<&'static Service> {
        let trimmed = audience.trim_end_matches('/');
        self.services().iter().find(|s| {
            s.audiences
                .iter()
                .any(|a| a.trim_end_matches('/') == trimmed)
        })
    }
}

impl Service {
    /// Whether this service takes a token of `audience` for a URL at `origin` (compared
    /// without a trailing slash).
    pub fn accepts(&self, audience: &str, origin: &str) -> bool {
        let trimmed = audience.trim_end_matches('/');
        self.audiences
            .iter()
            .any(|a| a.trim_end_matches('/') == trimmed)
            || (self.origin_audience && trimmed.eq_ignore_ascii_case(origin))
    }
}
