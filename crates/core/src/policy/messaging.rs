//! The policy model of the two message backends beside Service Bus: Event Hubs and Storage
//! queues (re-exported by [`super::model`], whose `Backend` enum names them). What they
//! resolve to (base URL, audience) with the defaults filled in is in [`super::resolve`], with
//! the other backends'.
//!
//! Event Hubs' REST send is Service Bus's (same URL shape, headers and batch JSON), so an
//! event hub route is prepared as a Service Bus backend of the Event Hubs flavour
//! ([`EventHubsBackend::as_service_bus`]) and runs the same code; the policy keeps it a kind of
//! its own, because what a user may say (no sessions, no time to live, a hub) differs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[cfg(feature = "compile")]
use schemars::JsonSchema;

/// An event hub in an Event Hubs namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EventHubsBackend {
    /// Namespace name: `{namespace}.servicebus.windows.net` (or the cloud's suffix).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Explicit namespace URL instead of `namespace`, e.g. a local stand-in listed in
    /// `local_endpoints`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The event hub's name.
    pub hub: String,
    /// The identity whose token is sent.
    pub identity: String,
    /// Token audience; default `https://eventhubs.azure.net` (or the namespace URL).
    #[serde(default)]
    pub audience: Option<String>,
    /// Template of the events' `PartitionKey` (events with one key land in one partition),
    /// e.g. `{path.device}`. Without it, Event Hubs spreads events over the partitions and a
    /// batch element may set its own.
    #[serde(default)]
    pub partition_key: Option<String>,
    /// Application properties: name → template, sent as headers (as Service Bus's are).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Accept a JSON array of events (`[{"Body": …, "UserProperties": {…}}]`) and send it as
    /// one batch.
    #[serde(default)]
    pub batch: bool,
    /// Largest event (body and properties) or batch accepted, in bytes; larger requests get 413
    /// before anything is sent. Default 1048576 (1 MB, Event Hubs' limit from Standard up).
    #[serde(default)]
    pub max_message_bytes: Option<u32>,
    /// Group commit, as a Service Bus route's: concurrent single-event sends with the same
    /// partition key leave as one batch send. Default true; false sends each on its own.
    #[serde(default)]
    pub coalesce: Option<bool>,
    /// Coalescing: how long, in milliseconds, a batch waits for more sends (0 to 1000; default 0).
    #[serde(default)]
    pub linger_ms: Option<u32>,
    /// Coalescing: the most events in one batch (2 to 1000). Default 100.
    #[serde(default)]
    pub max_batch_messages: Option<u32>,
}

/// A Storage queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct StorageQueueBackend {
    /// Storage account name: `{account}.queue.core.windows.net` (or the cloud's suffix).
    #[serde(default)]
    pub account: Option<String>,
    /// Explicit account URL instead of `account`, e.g. Azurite's
    /// `https://127.0.0.1:10001/devstoreaccount1` listed in `local_endpoints`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Queue name.
    pub queue: String,
    /// The identity whose token is sent.
    pub identity: String,
    /// Token audience; default `https://storage.azure.com` (or the account's queue URL).
    #[serde(default)]
    pub audience: Option<String>,
    /// Seconds before a new message becomes visible to receivers (0 to 604800, less than the
    /// time to live). Default 0: at once.
    #[serde(default)]
    pub visibility_timeout_seconds: Option<u32>,
    /// Seconds a message lives, or -1 for never. Default: the service's (7 days).
    #[serde(default)]
    pub message_ttl_seconds: Option<i64>,
    /// How the caller's body becomes the message text: `base64` (the default, as the Azure
    /// SDKs write and read it; any bytes) or `text` (the body must be UTF-8; stored as it is).
    #[serde(default)]
    pub encoding: QueueEncoding,
    /// Largest body accepted, in bytes; larger ones get 413 before anything is sent. Default
    /// and maximum: what fits Azure's 64 KiB message once encoded (49152 for `base64`, 65536
    /// for `text`).
    #[serde(default)]
    pub max_body_bytes: Option<u32>,
}

/// How a Storage queue route turns the caller's body into the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "compile", derive(JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum QueueEncoding {
    /// Standard base64 of the body's bytes, as the Azure SDKs encode by default.
    #[default]
    Base64,
    /// The body as text (it must be UTF-8), XML-escaped on the wire.
    Text,
}

impl QueueEncoding {
    pub fn is_default(&self) -> bool {
        *self == QueueEncoding::default()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QueueEncoding::Base64 => "base64",
            QueueEncoding::Text => "text",
        }
    }
}

/// 1 MB: the largest event (or batch) Event Hubs takes from the Standard tier up.
pub const EVENT_HUBS_DEFAULT_MAX_MESSAGE_BYTES: u32 = 1_048_576;

/// Azure's limit of one queue message's text, in bytes (after encoding).
pub const QUEUE_MESSAGE_MAX_BYTES: u32 = 65_536;

impl QueueEncoding {
    /// The largest body whose message text (once encoded) fits [`QUEUE_MESSAGE_MAX_BYTES`].
    pub fn largest_body(self) -> u32 {
        match self {
            QueueEncoding::Base64 => QUEUE_MESSAGE_MAX_BYTES / 4 * 3,
            QueueEncoding::Text => QUEUE_MESSAGE_MAX_BYTES,
        }
    }
}
