//! The typed shape of `policy.json`.
//!
//! These types are the single source of truth: serde reads the file into them (unknown fields
//! are rejected everywhere), and `policy.schema.json` is generated from them, so an editor
//! and the gateway agree on what a policy may say. Rules that a type cannot express (name
//! formats, references between parts, hosts) live in [`super::validate`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[cfg(feature = "compile")]
use schemars::JsonSchema;

pub use super::messaging::{
    EventHubsBackend, QueueEncoding, StorageQueueBackend, EVENT_HUBS_DEFAULT_MAX_MESSAGE_BYTES,
    QUEUE_MESSAGE_MAX_BYTES,
};

/// A gateway policy: who the gateway is towards Azure (identities) and what callers may ask
/// it to do (routes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The JSON Schema that editors use to check this file (`./policy.schema.json`).
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    /// The Azure cloud every backend and Entra authority belongs to.
    #[serde(default)]
    pub cloud: Cloud,
    /// Origins (`scheme://host:port`) that are not Azure hosts but may be used as backend or
    /// token endpoints anyway: local emulators such as Azurite. Each one is a deliberate,
    /// visible exception; `policy explain` marks routes that use one.
    #[serde(default)]
    pub local_endpoints: Vec<String>,
    /// Inbound checks every route starts from; a route's own check of a kind replaces these.
    #[serde(default)]
    pub inbound: Option<Inbound>,
    /// Named identities (OAuth2 clients) that backends obtain Azure tokens as.
    #[serde(default)]
    pub identities: BTreeMap<String, Identity>,
    /// The routes callers may use, matched by method and path.
    pub routes: Vec<Route>,
    /// Where routes with `"when_unavailable": "queue"` keep requests Azure could not take, to
    /// deliver them later: a Cloudflare Queue this worker produces to and consumes.
    #[serde(default)]
    pub store_and_forward: Option<StoreAndForward>,
}

/// The Cloudflare Queue of store-and-forward, declared in `wrangler.toml` as a producer binding
/// and a consumer of this worker (with `max_retries` and a `dead_letter_queue`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct StoreAndForward {
    /// The producer binding's name. Default `DELIVERIES`.
    #[serde(default)]
    pub binding: Option<String>,
    /// Deliveries tried at most this many times before the queue moves them to its dead-letter
    /// queue: the consumer's `max_retries` + 1 in `wrangler.toml`. Default 6.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// The producer binding of the dead-letter queue (the consumer's `dead_letter_queue` in
    /// `wrangler.toml`). A delivery that cannot succeed (Azure refuses it, its route is gone or
    /// changed, it is not a request its route sends, its last attempt failed) is put there with
    /// its reason. Default `DEAD_LETTERS`; not the same as `binding`.
    #[serde(default)]
    pub dead_letter_binding: Option<String>,
}

/// What a route does when Azure stays unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum WhenUnavailable {
    /// The caller gets 503 with Retry-After.
    #[default]
    Fail,
    /// The request is stored on the store-and-forward queue and delivered later; the caller
    /// gets 202 `{"status": "queued"}`. Service Bus and Blob write routes only (a resent
    /// MessageId is dropped by duplicate detection, a create-only blob cannot be written twice).
    Queue,
}

/// Azure clouds: each has its own Entra authority and service host suffixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Cloud {
    /// Azure public cloud (`login.microsoftonline.com`, `*.windows.net`).
    #[default]
    Public,
    /// Azure US Government (`login.microsoftonline.us`, `*.usgovcloudapi.net`).
    UsGovernment,
    /// Azure operated by 21Vianet in China (`login.chinacloudapi.cn`, `*.chinacloudapi.cn`).
    China,
}

/// Whether the value at a JSON path (its field names, array indices left out) may hold a
/// secret: a credential, an API key check, a SHA-256 of a key, a required header's values, any
/// field whose name ends in `secret`, and everything under them. A secret's *name* lives there,
/// and that is exactly where a user pastes the secret itself by mistake, so no error about a
/// value at or under such a path quotes a string or number from it (nor an unknown field or
/// variant name). A new field named `*_secret` is covered by the rule; list any other here.
pub fn is_secret_bearing_path<'a>(fields: impl IntoIterator<Item = &'a str>) -> bool {
    let mut previous = "";
    for field in fields {
        if field.ends_with("secret")
            || matches!(field, "credential" | "api_key" | "sha256")
            || (previous == "required_headers" && field == "values")
        {
            return true;
        }
        previous = field;
    }
    false
}

/// An OAuth2 client the gateway authenticates as: the stand-in for a managed identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Where tokens are requested.
    pub token_endpoint: TokenEndpoint,
    /// The application (client) id.
    pub client_id: String,
    /// How the client proves who it is.
    pub credential: Credential,
    /// Share of a token's lifetime after which the next request refreshes it in the
    /// background (with a little jitter so isolates do not refresh together). Default 0.5.
    #[serde(default)]
    pub refresh_ahead: Option<f64>,
    /// Time limit of one token request, in milliseconds. Default 5000.
    #[serde(default)]
    pub timeout_ms: Option<u32>,
}

/// A token endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenEndpoint {
    /// Microsoft Entra ID v2 endpoint: `scope={audience}/.default`.
    EntraV2 {
        /// Tenant id (a GUID) or verified domain.
        tenant: String,
        /// Authority origin; default the cloud's (`https://login.microsoftonline.com`).
        /// Another origin must be listed in `local_endpoints`.
        #[serde(default)]
        authority: Option<String>,
    },
    /// Microsoft Entra ID v1 endpoint: `resource={audience}`.
    EntraV1 {
        /// Tenant id (a GUID) or verified domain.
        tenant: String,
        /// Authority origin; default the cloud's. Another origin must be listed in
        /// `local_endpoints`.
        #[serde(default)]
        authority: Option<String>,
    },
    /// Any OAuth2 token URL that takes `scope={audience}/.default`.
    Url(String),
}

/// A client credential. Secret values never appear in the policy: it names the Worker secrets
/// (`wrangler secret put NAME`) that hold them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Credential {
    /// A client secret.
    ClientSecret {
        /// Name of the Worker secret that holds the client secret.
        secret: String,
        /// During rotation: name of a second Worker secret, tried when the first is rejected.
        #[serde(default)]
        next_secret: Option<String>,
        /// How the secret is sent: in the form body (`post`, the default) or as HTTP Basic.
        #[serde(default)]
        auth: ClientAuth,
    },
    /// A certificate: the gateway signs a client assertion (RS256 JWT) with its private key.
    Certificate {
        /// Name of the Worker secret that holds the PEM private key (PKCS#8).
        private_key_secret: String,
        /// Name of the Worker secret that holds the PEM certificate (for the `x5t` thumbprints).
        certificate_secret: String,
    },
}

/// How a client secret is presented to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    #[default]
    Post,
    /// `client_secret_basic`: HTTP Basic authentication.
    Basic,
}

/// One route: requests that match `methods` and `path` go through `inbound`, then to `backend`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A unique name, used in logs and errors.
    pub name: String,
    /// The HTTP methods this route accepts.
    pub methods: Vec<Method>,
    /// Path template: literal segments and whole-segment parameters, e.g. `/orders/{tenant}`.
    pub path: String,
    /// Set to `true` to let anyone call this route without inbound protection.
    #[serde(default)]
    pub public: bool,
    /// Checks a caller must pass before anything is sent to Azure.
    #[serde(default)]
    pub inbound: Option<Inbound>,
    /// Where an accepted request goes.
    pub backend: Backend,
    /// The circuit breakers of this route's calls (per isolate): by caller and resource, and
    /// for the whole route; default on, with 5 failures in 30 s opening one for 30 s. They apply
    /// to this route alone; the host's breaker opens on the gateway's own rule.
    #[serde(default)]
    pub breaker: Option<BreakerSettings>,
    /// `queue`: when Azure stays unavailable (after the retries, with the breaker open, or with
    /// no token to be had), store the request and deliver it later. Default `fail`.
    #[serde(default)]
    pub when_unavailable: WhenUnavailable,
}

/// When this route's calls fail fast: after `failures` consecutive calls that found Azure
/// unavailable (5xx, 429, timeouts, network errors, after their retries) within
/// `window_seconds`, for `cooldown_seconds` (or Azure's `Retry-After`); then probes go through.
/// A caller's own failures open its own breakers (on a resource, on the route); a breaker that
/// refuses other callers needs failures from at least two callers, one caller counting for at
/// most half of them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    /// Consecutive failures that open a breaker (at least 2, from two callers, for one that
    /// refuses others); 0 turns this route's breakers off. Default 5.
    #[serde(default)]
    pub failures: Option<u32>,
    /// Default 30.
    #[serde(default)]
    pub window_seconds: Option<u32>,
    /// Default 30.
    #[serde(default)]
    pub cooldown_seconds: Option<u32>,
}

impl BreakerSettings {
    /// The settings with their defaults filled in.
    pub fn resolve(settings: Option<&BreakerSettings>) -> BreakerConfig {
        let s = settings.copied().unwrap_or(BreakerSettings {
            failures: None,
            window_seconds: None,
            cooldown_seconds: None,
        });
        BreakerConfig {
            failures: s.failures.unwrap_or(DEFAULT_FAILURES),
            window_ms: f64::from(s.window_seconds.unwrap_or(DEFAULT_WINDOW_SECONDS)) * 1000.0,
            cooldown_ms: f64::from(s.cooldown_seconds.unwrap_or(DEFAULT_COOLDOWN_SECONDS)) * 1000.0,
            many_resources: false,
        }
    }
}

/// A route's breaker settings, resolved at build time (what the runtime's breakers,
/// [`crate::breaker`], read).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BreakerConfig {
    /// Failures that open the route's own scopes; 0: no breaker at all on this route.
    pub failures: u32,
    /// The failures must fall within this many milliseconds of the first.
    pub window_ms: f64,
    /// How long an open breaker fails calls fast, in milliseconds, when Azure did not say.
    pub cooldown_ms: f64,
    /// The route's backend URL path is built from the request, so its calls go to many
    /// resources (decided at build time).
    pub many_resources: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: DEFAULT_FAILURES,
            window_ms: f64::from(DEFAULT_WINDOW_SECONDS) * 1000.0,
            cooldown_ms: f64::from(DEFAULT_COOLDOWN_SECONDS) * 1000.0,
            many_resources: false,
        }
    }
}

/// A route's breaker settings when it sets none (`breaker`): failures, window and cool-down.
pub const DEFAULT_FAILURES: u32 = 5;
pub const DEFAULT_WINDOW_SECONDS: u32 = 30;
pub const DEFAULT_COOLDOWN_SECONDS: u32 = 30;

/// HTTP methods a route may accept (`OPTIONS` is the gateway's own, for CORS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// The method named by an HTTP request line, if a route can accept it.
    pub fn parse(s: &str) -> Option<Method> {
        [
            Method::Get,
            Method::Head,
            Method::Post,
            Method::Put,
            Method::Patch,
            Method::Delete,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// Inbound checks of a route (or, at the top of the policy, the defaults every route starts
/// from: a route's own check of a kind replaces the default of that kind).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// Callers must present one of these API keys.
    #[serde(default)]
    pub api_key: Option<ApiKeyCheck>,
    /// Callers must present a valid JWT (`Authorization: Bearer …`).
    #[serde(default)]
    pub jwt: Option<JwtCheck>,
    /// Allow and deny lists of client addresses (`CF-Connecting-IP`).
    #[serde(default)]
    pub ip: Option<IpFilter>,
    /// Headers a request must carry, optionally with one of given values.
    #[serde(default)]
    pub required_headers: Vec<RequiredHeader>,
    /// A rate limit through a Cloudflare rate-limiting binding.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Cross-origin access from browsers.
    #[serde(default)]
    pub cors: Option<Cors>,
    /// Largest request body accepted, in bytes (413 above it).
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Media types a request body may have (415 otherwise), e.g. `["application/json"]`.
    #[serde(default)]
    pub content_types: Vec<String>,
}

impl Inbound {
    /// Whether a check that identifies or restricts callers is configured: a route without
    /// one must be marked public. Rate limits, CORS and size limits do not keep anyone out.
    pub fn protects(&self) -> bool {
        self.api_key.is_some()
            || self.jwt.is_some()
            || self.ip.as_ref().is_some_and(|ip| !ip.allow.is_empty())
    }

    /// This route's checks over the policy's defaults: each kind of check the route sets
    /// replaces the default of that kind.
    pub fn over(&self, defaults: &Inbound) -> Inbound {
        Inbound {
            api_key: self.api_key.clone().or_else(|| defaults.api_key.clone()),
            jwt: self.jwt.clone().or_else(|| defaults.jwt.clone()),
            ip: self.ip.clone().or_else(|| defaults.ip.clone()),
            required_headers: if self.required_headers.is_empty() {
                defaults.required_headers.clone()
            } else {
                self.required_headers.clone()
            },
            rate_limit: self
                .rate_limit
                .clone()
                .or_else(|| defaults.rate_limit.clone()),
            cors: self.cors.clone().or_else(|| defaults.cors.clone()),
            max_body_bytes: self.max_body_bytes.or(defaults.max_body_bytes),
            content_types: if self.content_types.is_empty() {
                defaults.content_types.clone()
            } else {
                self.content_types.clone()
            },
        }
    }
}

/// JWT validation, like API Management's `validate-jwt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct JwtCheck {
    /// Accepted `iss` values (exact match).
    pub issuers: Vec<String>,
    /// Accepted `aud` values; the token's `aud` (a string or an array) must contain one.
    pub audiences: Vec<String>,
    /// Where the signing keys are published (JSON Web Key Set).
    pub jwks_url: String,
    /// Accepted signature algorithms. Default `["RS256"]`. `none` and HMAC are never accepted.
    #[serde(default = "default_jwt_algorithms")]
    pub algorithms: Vec<JwtAlgorithm>,
    /// Claims that must be present: claim → values it must contain (a string claim is split
    /// at spaces, like `scp`; an array claim, like `roles`, is matched element-wise). An empty
    /// list only requires the claim.
    #[serde(default)]
    pub required_claims: BTreeMap<String, Vec<String>>,
    /// Tolerance for `exp` and `nbf`, in seconds. Default 60.
    #[serde(default)]
    pub clock_skew_seconds: Option<u32>,
    /// How long fetched keys are used before they are fetched again, in seconds. Default 600.
    /// An unknown `kid` refetches sooner, at most once a minute.
    #[serde(default)]
    pub jwks_ttl_seconds: Option<u32>,
}

fn default_jwt_algorithms() -> Vec<JwtAlgorithm> {
    vec![JwtAlgorithm::RS256]
}

/// JWS algorithms the gateway verifies (with WebCrypto).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
pub enum JwtAlgorithm {
    RS256,
    PS256,
    ES256,
}

/// Address filter on `CF-Connecting-IP`. A denied address is refused even if allowed; with an
/// allow list, every other address is refused.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IpFilter {
    /// CIDRs (IPv4 or IPv6) or single addresses that may call.
    #[serde(default)]
    pub allow: Vec<String>,
    /// CIDRs or single addresses that may not call.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// A header a request must carry (like API Management's `check-header`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RequiredHeader {
    pub name: String,
    /// When given, the header's value must be one of these (exact match).
    #[serde(default)]
    pub values: Vec<String>,
}

/// A rate limit enforced by a Cloudflare rate-limiting binding declared in `wrangler.toml`
/// (`[[ratelimits]]`), whose `simple = { limit, period }` must match `limit` and `period_seconds`
/// here. Counts are kept per Cloudflare location, not globally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// The binding's name in `wrangler.toml`.
    pub binding: String,
    /// What is counted: the API key's name, the JWT's subject, or the client's address.
    pub key: RateLimitKey,
    /// Requests allowed per period (as declared in `wrangler.toml`).
    pub limit: u32,
    /// 10 or 60 seconds (as declared in `wrangler.toml`).
    pub period_seconds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RateLimitKey {
    ApiKey,
    JwtSubject,
    ClientIp,
}

/// CORS for browser callers; preflight requests are answered by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Cors {
    /// Allowed origins (`https://app.example.com`), or `["*"]` for any.
    pub origins: Vec<String>,
    /// Methods allowed cross-origin; default the route's.
    #[serde(default)]
    pub methods: Vec<Method>,
    /// Request headers allowed cross-origin (besides the CORS-safelisted ones).
    #[serde(default)]
    pub headers: Vec<String>,
    /// How long browsers may cache a preflight answer, in seconds. Default 600.
    #[serde(default)]
    pub max_age_seconds: Option<u32>,
}

/// API key check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCheck {
    /// The request header that carries the key.
    #[serde(default = "default_api_key_header")]
    pub header: String,
    /// Accepted keys, each with a name (logged) and the Worker secret holding its value.
    pub keys: Vec<ApiKey>,
}

fn default_api_key_header() -> String {
    "x-api-key".to_owned()
}

/// One accepted API key: held in a Worker secret, or as the SHA-256 of the key (exactly one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Name of the key, written to the log line instead of the key.
    pub name: String,
    /// Name of the Worker secret that holds the key.
    #[serde(default)]
    pub secret: Option<String>,
    /// SHA-256 of the key, 64 hex digits (`printf %s "$KEY" | sha256sum`).
    #[serde(default)]
    pub sha256: Option<String>,
}

/// A backend: the Azure service a route writes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
// Built once per isolate and never moved on a request path: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    /// Send messages to a Service Bus queue or topic.
    ServiceBus(ServiceBusBackend),
    /// Write or read blobs in a Blob Storage container.
    Blob(BlobBackend),
    /// Hand out a short-lived URL (a user delegation SAS: the valet key) that lets the caller
    /// do one thing to one blob directly with Storage: upload a file of any size, or download
    /// one. Nothing of the file passes through the gateway.
    BlobSas(BlobSasBackend),
    /// Send events to an event hub (Event Hubs' REST send, Service Bus's wire format).
    EventHubs(EventHubsBackend),
    /// Put messages on a Storage queue.
    StorageQueue(StorageQueueBackend),
    /// Any Azure REST API: one request to a URL whose host the policy fixes.
    AzureRest(AzureRestBackend),
    /// The status of long-running operations started through `azure_rest` routes: the caller
    /// follows the `Location` the gateway answered with, never Azure's own URL.
    AzureOperation(AzureOperationBackend),
}

/// One call to an Azure REST API per request, with the identity's token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AzureRestBackend {
    /// The URL, e.g. `https://management.azure.com/subscriptions/{path.sub}/resourceGroups/{path.rg}/providers/Microsoft.Web/sites/{path.site}/restart`.
    /// Scheme and host are fixed: an Azure API host of the policy's cloud or an origin listed
    /// in `local_endpoints`. A template variable fills a whole path segment or a whole query
    /// value, and is percent-encoded: no caller value can change the host or add a path level.
    pub url: String,
    /// The API version, pinned: sent as `api-version` (or `x-ms-version` to Storage). Required
    /// by services that version every call (Resource Manager, Key Vault, Storage, …); not
    /// allowed where the version is in the path (Microsoft Graph).
    #[serde(default)]
    pub api_version: Option<String>,
    /// The identity whose token is sent.
    pub identity: String,
    /// Token audience; default the one the URL's service documents (Resource Manager's for
    /// `management.azure.com`, `https://vault.azure.net` for Key Vault, …). Required for a
    /// local endpoint. Another audience must be one the service accepts.
    #[serde(default)]
    pub audience: Option<String>,
    /// The method sent to Azure; default the caller's.
    #[serde(default)]
    pub method: Option<Method>,
    /// Fixed request headers: name → template.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Caller request headers passed on as they are (names, case-insensitive); no others are.
    #[serde(default)]
    pub request_headers: Vec<String>,
    /// Caller query parameters passed on (names); no others are.
    #[serde(default)]
    pub query: Vec<String>,
    /// What is sent as the body. Default: the caller's body (held whole, up to
    /// `max_body_bytes`), with its `Content-Type`.
    #[serde(default)]
    pub body: Option<RestBody>,
    /// Largest caller body accepted, in bytes (413 above it). Default 1048576 (1 MiB).
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Reply headers passed back besides `Content-Type`, `ETag`, `Last-Modified`,
    /// `Retry-After` and `x-ms-request-id` (names, case-insensitive); no others are.
    #[serde(default)]
    pub response_headers: Vec<String>,
    /// Azure's error answers: `problem` (default) maps them to problem+json naming Azure's error
    /// code (its message goes to the log line); `pass` passes status, `x-ms-error-code` and body.
    #[serde(default)]
    pub errors: ErrorMode,
    /// Keep only these JSON pointers (`/properties/state`) of a successful JSON answer of at
    /// most `max_answer_bytes`; the rest is never sent to the caller.
    #[serde(default)]
    pub project: Vec<String>,
    /// Keep only these JSON pointers of each element of a successful JSON answer's `/value`
    /// list (Resource Manager, Graph and Key Vault lists), e.g. `["/name", "/properties/state"]`.
    /// The answer's `/value` is the list of what is kept of each element, beside what `project`
    /// keeps (nothing else, when `project` is empty).
    #[serde(default)]
    pub project_items: Vec<String>,
    /// Page Azure's lists through the gateway (GET routes): the `nextLink` or
    /// `@odata.nextLink` of a JSON answer (Resource Manager, Graph, Key Vault), an absolute
    /// Azure URL, becomes a link to this route's own path with `?page=` and a sealed handle of
    /// Azure's URL (valid one hour, bound to the route and the path), also sent as
    /// `Link: <…>; rel="next"`. A GET with `page` asks Azure for that page, as this route, with
    /// its checks and projection. Answers are read whole (up to `max_answer_bytes`).
    #[serde(default)]
    pub pages: bool,
    /// `none`: a successful answer carries Azure's status and the allowed headers, never
    /// Azure's body (for answers that carry receipts or secrets the caller must not see, e.g.
    /// Storage queue's `PopReceipt`). Default `pass`.
    #[serde(default)]
    pub response_body: ResponseBody,
    /// Largest answer the gateway reads to pass on a part of it, in bytes: a projected answer
    /// (`project`) and the answers of this route's operations followed through the gateway. A
    /// larger one is not read whole: the gateway stops reading as it passes the limit and
    /// answers 502 `backend-answer-too-large`. Answers passed on as they are stream through and
    /// are not limited. Default 65536 (64 KiB), at most 1048576 (1 MiB).
    #[serde(default)]
    pub max_answer_bytes: Option<u32>,
    /// Largest body a `json` or `template` body may build, in bytes: building stops as soon as
    /// it passes the limit, and the caller gets 413 before anything is sent. Default a third
    /// more than `max_body_bytes` and 64 KiB (room for `{body_base64}` of a body at that limit,
    /// or `{body}` escaped), at most 2097152 (2 MiB), which is also the most it may be set to.
    #[serde(default)]
    pub max_built_body_bytes: Option<u64>,
    /// Time limit of one call, in milliseconds (for a reply streamed back: of no bytes moving).
    /// Default 30000.
    #[serde(default)]
    pub timeout_ms: Option<u32>,
}

/// The body an `azure_rest` route sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RestBody {
    /// The caller's body, held whole (so a throttled call can be sent again).
    Caller,
    /// The caller's body streamed through untouched (never retried); for large bodies.
    Stream,
    /// No body.
    None,
    /// A JSON body (`application/json`) written as JSON here: every string in it is a template
    /// (`"{path.site}"`, `"{body}"`), filled and escaped as a JSON string.
    Json(serde_json::Value),
    /// A body built from a text template: JSON or XML by its content type, each value escaped
    /// for it (write `{{` and `}}` for literal braces). Besides the usual variables, `{body}`
    /// is the caller's body as text and `{body_base64}` its bytes in base64 (in a `json` body
    /// too).
    Template {
        content_type: String,
        template: String,
    },
}

/// Whether a successful answer carries Azure's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ResponseBody {
    /// Azure's body, projected when the route says so.
    #[default]
    Pass,
    /// Status and allowed headers only.
    None,
}

/// How Azure's error answers reach the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorMode {
    #[default]
    Problem,
    Pass,
}

/// Where callers follow long-running operations (Resource Manager's `202` with
/// `Azure-AsyncOperation` or `Location`). The route's path has one parameter, `{operation}`,
/// and its method is GET. The gateway answers a `202` of the routes in `of` with a `Location`
/// on this route holding a signed handle of Azure's URL; a GET here checks the handle and asks
/// Azure, as the route that started the operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AzureOperationBackend {
    /// Names of the `azure_rest` routes whose operations this route follows.
    pub of: Vec<String>,
    /// The JSON pointers of an operation's answer the caller sees; nothing else of it is passed
    /// on. Default: the operation's status, error code and message, and times (`/status`,
    /// `/error/code`, `/error/message`, `/startTime`, `/endTime`). A pointer besides those must
    /// lie within the `project` of each route in `of` that projects: following an operation
    /// never shows more than the route that started it.
    #[serde(default)]
    pub project: Option<Vec<String>>,
}

/// A Service Bus queue or topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceBusBackend {
    /// Namespace name: `{namespace}.servicebus.windows.net` (or the cloud's suffix).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Explicit namespace URL instead of `namespace`, e.g. a local stand-in listed in
    /// `local_endpoints`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Queue name (exactly one of `queue` and `topic`).
    #[serde(default)]
    pub queue: Option<String>,
    /// Topic name (exactly one of `queue` and `topic`).
    #[serde(default)]
    pub topic: Option<String>,
    /// The identity whose token is sent.
    pub identity: String,
    /// Token audience; default `https://servicebus.azure.net`.
    #[serde(default)]
    pub audience: Option<String>,
    /// How the message's properties are built from the request.
    #[serde(default)]
    pub message: Option<MessageMapping>,
    /// Accept a JSON array of messages (`[{"Body": …, "BrokerProperties": {…},
    /// "UserProperties": {…}}]`) and send it as one batch.
    #[serde(default)]
    pub batch: bool,
    /// Largest message (body and properties) or batch accepted, in bytes; larger requests get
    /// 413 before anything is sent. Default 262144 (256 KB, the Standard tier).
    #[serde(default)]
    pub max_message_bytes: Option<u32>,
    /// The entity has duplicate detection on (with a window longer than a send's retries and,
    /// for a storing route, its deliveries). Then a send whose outcome is unknown (a timeout, a
    /// lost connection, a 500) is sent again with the same `MessageId`, which Service Bus drops
    /// if the first was taken; and the route may store requests (`when_unavailable`). Default
    /// false: such a send is the caller's `backend-outcome-unknown`, never sent twice.
    #[serde(default)]
    pub duplicate_detection: bool,
    /// Group commit: while a send to this entity is in flight, single-message sends that arrive
    /// wait for it, then leave together as one Send Message Batch (each message keeps its own
    /// body, broker and application properties; grouped by session or partition key), within
    /// `max_message_bytes` for the whole batch and `max_batch_messages`. A send to an idle entity
    /// goes at once, alone. Default true; false sends every request on its own. Not for `batch`
    /// routes, which send the caller's own batch as it is.
    #[serde(default)]
    pub coalesce: Option<bool>,
    /// Coalescing: how long, in milliseconds, a batch waits for more sends before it leaves
    /// (0 to 1000). Default 0: it leaves as soon as the send before it completes.
    #[serde(default)]
    pub linger_ms: Option<u32>,
    /// Coalescing: the most messages in one batch (2 to 1000). Default 100.
    #[serde(default)]
    pub max_batch_messages: Option<u32>,
}

/// Templates for a message's broker properties and application properties. Each string is a
/// template over the request (`{path.x}`, `{query.x}`, `{header.x}`, `{uuid}`,
/// `{request_id}`, `{date:…}`, literals).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MessageMapping {
    /// Default: the caller's `Idempotency-Key` header when present (so a client's retry is a
    /// duplicate Service Bus can drop), else a generated id.
    #[serde(default)]
    pub message_id: Option<String>,
    /// Default: the trace id of `traceparent`, else the request id.
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub partition_key: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Time to live in seconds.
    #[serde(default)]
    pub time_to_live: Option<u64>,
    /// Must render to an RFC 1123 date, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
    #[serde(default)]
    pub scheduled_enqueue_time_utc: Option<String>,
    /// Application (custom) properties: name → template.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl MessageMapping {
    /// The `BrokerProperties` this mapping sets, with Service Bus's names, in Service Bus's
    /// order: each field that is present (`time_to_live` included). In a batch, an element may
    /// not set one of these itself (the route's value stands); `policy explain` lists the rest.
    pub fn mapped_broker_properties(&self) -> Vec<&'static str> {
        [
            ("MessageId", self.message_id.is_some()),
            ("CorrelationId", self.correlation_id.is_some()),
            ("SessionId", self.session_id.is_some()),
            ("PartitionKey", self.partition_key.is_some()),
            ("Label", self.label.is_some()),
            ("To", self.to.is_some()),
            ("ReplyTo", self.reply_to.is_some()),
            ("TimeToLive", self.time_to_live.is_some()),
            (
                "ScheduledEnqueueTimeUtc",
                self.scheduled_enqueue_time_utc.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    /// The broker property templates, with Service Bus's names.
    pub fn broker_templates(&self) -> Vec<(&'static str, &str)> {
        [
            ("MessageId", &self.message_id),
            ("CorrelationId", &self.correlation_id),
            ("SessionId", &self.session_id),
            ("PartitionKey", &self.partition_key),
            ("Label", &self.label),
            ("To", &self.to),
            ("ReplyTo", &self.reply_to),
            ("ScheduledEnqueueTimeUtc", &self.scheduled_enqueue_time_utc),
        ]
        .into_iter()
        .filter_map(|(name, t)| t.as_deref().map(|t| (name, t)))
        .collect()
    }

    /// Whether the mapping sets the application property `name` (compared without case: the
    /// property travels as an HTTP header).
    pub fn maps_property(&self, name: &str) -> bool {
        self.properties.keys().any(|k| k.eq_ignore_ascii_case(name))
    }
}

/// A Blob Storage container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BlobBackend {
    /// Storage account name: `{account}.blob.core.windows.net` (or the cloud's suffix).
    #[serde(default)]
    pub account: Option<String>,
    /// Explicit account URL instead of `account`, e.g. Azurite's
    /// `https://127.0.0.1:10000/devstoreaccount1` listed in `local_endpoints`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Container name.
    pub container: String,
    /// Blob name template, e.g. `{path.tenant}/{uuid}.json`.
    pub blob: String,
    /// Content type stored with a written blob; default: the caller's `Content-Type`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Blob metadata (`x-ms-meta-NAME`): name → template. Names are C# identifiers.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Largest body a write accepts, in bytes; larger ones get 413 and nothing is committed.
    /// Default 104857600 (100 MiB, the Workers request body limit on most plans).
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// A body with a known length up to this many bytes is streamed as one Put Blob; a larger
    /// one, or one of unknown length, goes as Put Block calls and a Put Block List.
    /// Default 33554432 (32 MiB).
    #[serde(default)]
    pub single_put_max_bytes: Option<u64>,
    /// Size of one Put Block (the only part of a body held in memory). Default 1048576 (1 MiB),
    /// or the smallest multiple of 64 KiB that holds `max_body_bytes` in 50,000 blocks if larger.
    #[serde(default)]
    pub block_bytes: Option<u32>,
    /// A read streamed back is stopped when no bytes move for this long, in milliseconds; a
    /// single Put Blob of the caller's body gets this plus its length at 64 KiB/s. Neither is
    /// cut off by a whole-transfer limit. Default 30000.
    #[serde(default)]
    pub idle_timeout_ms: Option<u32>,
    /// Writes replace an existing blob when `true`; by default they only create
    /// (`If-None-Match: *`), and an existing blob is a 409.
    #[serde(default)]
    pub overwrite: bool,
    /// The identity whose token is sent.
    pub identity: String,
    /// Token audience; default `https://storage.azure.com`.
    #[serde(default)]
    pub audience: Option<String>,
}

/// A valet-key route: the URL it answers with lets its holder do `permission` to the one blob
/// the name template names, until the URL expires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BlobSasBackend {
    /// Storage account name: `{account}.blob.core.windows.net` (or the cloud's suffix).
    #[serde(default)]
    pub account: Option<String>,
    /// Explicit account URL instead of `account`, e.g. Azurite's
    /// `https://127.0.0.1:10000/devstoreaccount1` listed in `local_endpoints`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Container name.
    pub container: String,
    /// Blob name template, with the same variables and checks as blob routes, e.g.
    /// `{path.tenant}/{uuid}.bin`: the URL is for this one name.
    pub blob: String,
    /// What the URL allows: `create` (upload a new blob in one Put Blob; it cannot overwrite
    /// one, cannot read), `create_write` (create or overwrite, in one Put Blob or in blocks),
    /// `read` (download).
    pub permission: SasPermission,
    /// How long the URL is valid, in seconds: default 300, at most 3600.
    #[serde(default)]
    pub lifetime_seconds: Option<u32>,
    /// Limit the URL to the caller's address (`CF-Connecting-IP`, the SAS's `sip`).
    #[serde(default)]
    pub client_ip: bool,
    /// `read` only: the `Content-Disposition` the download is served with (template), e.g.
    /// `attachment; filename="{path.name}"`.
    #[serde(default)]
    pub response_content_disposition: Option<String>,
    /// `read` only: the `Content-Type` the download is served with (template).
    #[serde(default)]
    pub response_content_type: Option<String>,
    /// The identity that obtains the user delegation key (it needs the Storage Blob Delegator
    /// role and a data role that allows `permission` on the container).
    pub identity: String,
    /// Token audience; default `https://storage.azure.com`.
    #[serde(default)]
    pub audience: Option<String>,
}

/// What a valet-key URL allows: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum SasPermission {
    /// `c`: create a new blob (one Put Blob, up to 5000 MiB); an existing blob is refused.
    Create,
    /// `cw`: create or overwrite (Put Blob, or Put Block and Put Block List).
    CreateWrite,
    /// `r`: read the blob.
    Read,
}

impl SasPermission {
    pub fn as_str(self) -> &'static str {
        match self {
            SasPermission::Create => "create",
            SasPermission::CreateWrite => "create_write",
            SasPermission::Read => "read",
        }
    }
}
