//! Store-and-forward: a request Azure could not take, kept on a Cloudflare Queue and delivered
//! later by the same worker.
//!
//! What is stored is the backend request exactly as it was built and checked by the outgoing
//! gate (method, URL, headers with the `MessageId` or the create-only blob name), without its
//! token, and the body's bytes. A delivery sends that same request again with a fresh token,
//! so a delivery that happens twice (Azure took the first attempt after all, or the queue
//! redelivers) is dropped by Azure itself: Service Bus's duplicate detection drops a resent
//! `MessageId`, and a create-only blob (`If-None-Match: *`) cannot be written twice. Only those
//! two kinds of route may store requests; the policy check refuses the others.

use serde::{Deserialize, Serialize};

use crate::backend::BackendRequest;

/// The largest body stored: a Cloudflare Queues message holds 128 KB, and the request's
/// method, URL and headers travel with it.
pub const MAX_STORED_BODY_BYTES: usize = 96 * 1024;

/// Default producer binding.
pub const DEFAULT_BINDING: &str = "DELIVERIES";

/// Default producer binding of the dead-letter queue (the consumer's `dead_letter_queue`).
pub const DEFAULT_DEAD_LETTER_BINDING: &str = "DEAD_LETTERS";

/// Default number of tries of a delivery (the consumer's `max_retries` + 1).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 6;

/// The part of a stored request that is not its body (the body travels beside it, as bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// The format, for a worker that reads a message an older one wrote.
    pub v: u32,
    /// The route that stored it: its identity's token is sent, and a route that no longer
    /// stores requests (or whose backend moved) does not deliver it.
    pub route: String,
    /// The request id the caller was given.
    pub request_id: String,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// What the caller was told (message ids, or the blob's name), for the log.
    pub ids: Vec<String>,
    /// When it was stored (ms since the epoch).
    pub stored_at: f64,
}

impl Stored {
    pub fn new(
        route: &str,
        request_id: &str,
        request: &BackendRequest,
        ids: Vec<String>,
        now: f64,
    ) -> Stored {
        Stored {
            v: 1,
            route: route.to_owned(),
            request_id: request_id.to_owned(),
            method: request.method.to_owned(),
            url: request.url.clone(),
            headers: request.headers.clone(),
            ids,
            stored_at: now,
        }
    }

    /// The request to send again, when its method is one a route sends.
    pub fn request(&self) -> Option<BackendRequest> {
        let method = crate::policy::Method::parse(&self.method)?.as_str();
        Some(BackendRequest {
            method,
            url: self.url.clone(),
            headers: self.headers.clone(),
            reply_headers: Vec::new(),
        })
    }
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Azure has it (now, or from an earlier attempt): acknowledge the message.
    Yes,
    /// Not now: the queue tries again after this many seconds.
    Later(u64),
    /// Never: the message cannot be delivered (its route is gone or changed, or Azure refused
    /// the request itself); acknowledged and logged as an error.
    Never,
}
