//! The rules of the `event_hubs` and `storage_queue` backends: names, hosts, audiences, the
//! event hub's mapping (as Service Bus's) and the queue's timing and size limits.

use std::collections::BTreeSet;

use super::common::{
    check_audience, check_endpoint, check_identity_ref, check_message_mapping,
    check_storage_account, is_container, is_namespace, Checker, Scope,
};
use crate::policy::cloud::EVENT_HUBS_AUDIENCE;
use crate::policy::model::{
    EventHubsBackend, StorageQueueBackend, EVENT_HUBS_DEFAULT_MAX_MESSAGE_BYTES,
};
use crate::policy::STORAGE_AUDIENCE;

/// Azure's largest visibility timeout of a new message: 7 days.
const MAX_VISIBILITY_SECONDS: u32 = 604_800;
/// The time to live Azure gives a message when the request names none: 7 days.
const DEFAULT_TTL_SECONDS: i64 = 604_800;

pub(super) fn check_event_hubs(
    c: &mut Checker,
    at: &str,
    eh: &EventHubsBackend,
    scope: &Scope,
    unreadable: &BTreeSet<String>,
) {
    let cloud = c.policy.cloud;
    if let Some(ns) = &eh.namespace {
        if !is_namespace(ns) {
            c.err(format!("{at}.namespace"), format!("a namespace name: 6-50 letters, digits or hyphens, starting with a letter and ending with a letter or digit, got \"{ns}\""));
        }
    }
    check_endpoint(
        c,
        at,
        "namespace",
        eh.namespace.as_deref(),
        eh.endpoint.as_deref(),
        cloud.service_bus_suffix(),
        false,
    );
    if !is_hub(&eh.hub) {
        c.err(
            format!("{at}.hub"),
            format!("an event hub name: 1-256 letters, digits, '.', '-' or '_', starting and ending with a letter or digit, got \"{}\"", eh.hub),
        );
    }
    // The same rules as a Service Bus message mapping, at this backend's own paths
    // (`…event_hubs.partition_key`, `…event_hubs.properties.NAME`).
    check_message_mapping(c, at, &eh.mapping(), scope);
    if let Some(max) = eh.max_message_bytes {
        if !(1_024..=EVENT_HUBS_DEFAULT_MAX_MESSAGE_BYTES).contains(&max) {
            c.err(format!("{at}.max_message_bytes"), format!("a size between 1024 and {EVENT_HUBS_DEFAULT_MAX_MESSAGE_BYTES} bytes (1 MB, Event Hubs' largest event or batch), got {max}"));
        }
    }
    check_identity_ref(c, at, &eh.identity, unreadable);
    let mut allowed = vec![EVENT_HUBS_AUDIENCE.to_owned()];
    if let Some(ns) = &eh.namespace {
        allowed.push(format!("https://{ns}.{}", cloud.service_bus_suffix()));
    }
    if let Some(endpoint) = &eh.endpoint {
        allowed.push(endpoint.trim_end_matches('/').to_owned());
    }
    check_audience(c, at, eh.audience.as_deref(), &allowed, "Event Hubs");
}

pub(super) fn check_storage_queue(
    c: &mut Checker,
    at: &str,
    q: &StorageQueueBackend,
    unreadable: &BTreeSet<String>,
) {
    let cloud = c.policy.cloud;
    check_storage_account(
        c,
        at,
        q.account.as_deref(),
        q.endpoint.as_deref(),
        cloud.queue_suffix(),
    );
    if !is_container(&q.queue) {
        c.err(
            format!("{at}.queue"),
            format!("a queue name: 3-63 lowercase letters, digits or single hyphens, starting and ending with a letter or digit, got \"{}\"", q.queue),
        );
    }
    if let Some(ttl) = q.message_ttl_seconds {
        if ttl == 0 || ttl < -1 {
            c.err(
                format!("{at}.message_ttl_seconds"),
                format!("a time to live of at least 1 second, or -1 for messages that never expire, got {ttl}"),
            );
        }
    }
    if let Some(visibility) = q.visibility_timeout_seconds {
        let ttl = q.message_ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
        if visibility > MAX_VISIBILITY_SECONDS {
            c.err(
                format!("{at}.visibility_timeout_seconds"),
                format!("0 to {MAX_VISIBILITY_SECONDS} seconds (7 days, Azure's limit), got {visibility}"),
            );
        } else if ttl >= 1 && i64::from(visibility) >= ttl {
            let whose = if q.message_ttl_seconds.is_some() {
                "message_ttl_seconds"
            } else {
                "the default time to live, 7 days, as message_ttl_seconds is not set"
            };
            c.err(
                format!("{at}.visibility_timeout_seconds"),
                format!("less than the message's time to live ({ttl} seconds: {whose}), or a message would expire before anyone can see it; Azure refuses such a message; got {visibility}"),
            );
        }
    }
    if let Some(max) = q.max_body_bytes {
        let largest = q.encoding.largest_body();
        if !(1..=largest).contains(&max) {
            c.err(
                format!("{at}.max_body_bytes"),
                format!("a size between 1 and {largest} bytes (the largest body whose {} message text fits Azure's 64 KiB), got {max}", q.encoding.as_str()),
            );
        }
    }
    check_identity_ref(c, at, &q.identity, unreadable);
    let mut allowed = vec![STORAGE_AUDIENCE.to_owned()];
    if let Some(account) = &q.account {
        allowed.push(format!("https://{account}.{}", cloud.queue_suffix()));
    }
    if let Some(endpoint) = &q.endpoint {
        allowed.push(endpoint.trim_end_matches('/').to_owned());
    }
    check_audience(c, at, q.audience.as_deref(), &allowed, "Queue Storage");
}

/// Event hub names: 1-256 letters, digits, `.`, `-`, `_`, starting and ending with a letter or
/// digit.
fn is_hub(s: &str) -> bool {
    (1..=256).contains(&s.len())
        && s.starts_with(|ch: char| ch.is_ascii_alphanumeric())
        && s.ends_with(|ch: char| ch.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}
