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
//!
//! A stored request is not trusted as it is: the policy may have changed since it was stored, and
//! any worker bound to the queue can put a message on it. At delivery, [`Stored::request_for`]
//! (defined with the consumer, in pipeline/delivery.rs, above the backends it asks) checks it
//! against its route as it is in the current policy (method, URL, each header's name, what makes
//! the delivery happen once) and derives the gateway's own headers anew; one that is not a
//! request its route sends is dead-lettered with the reason, never sent.
//!
//! Nothing acknowledged to a caller is lost: a delivery either reaches Azure or is put on the
//! dead-letter queue with its reason ([`DeadLetter`]). Only when the dead-letter queue does not
//! take it either is it left on the queue, whose own dead-lettering then keeps it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::exchange::BackendRequest;

/// The largest body stored: a Cloudflare Queues message holds 128 KB, and the request's
/// method, URL and headers travel with it.
pub const MAX_STORED_BODY_BYTES: usize = 96 * 1024;

/// Default producer binding.
pub const DEFAULT_BINDING: &str = "DELIVERIES";

/// Default producer binding of the dead-letter queue (the consumer's `dead_letter_queue`).
pub const DEFAULT_DEAD_LETTER_BINDING: &str = "DEAD_LETTERS";

/// The format of [`Stored`] this gateway writes and reads.
pub const FORMAT: u32 = 1;

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

    /// Reads one as [`Stored::new`]'s value is written (`serde_json::to_string`); `None` for
    /// anything else. Read by hand, not by its `Deserialize`: see [`crate::encoding::json_object`].
    pub fn parse(text: &str) -> Option<Stored> {
        let o = crate::encoding::json_object(text.as_bytes())?;
        let text_of = |name: &str| o.get(name)?.as_str().map(str::to_owned);
        let texts = |v: &Value| -> Option<Vec<String>> {
            v.as_array()?
                .iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        Some(Stored {
            v: u32::try_from(o.get("v")?.as_u64()?).ok()?,
            route: text_of("route")?,
            request_id: text_of("request_id")?,
            method: text_of("method")?,
            url: text_of("url")?,
            headers: o
                .get("headers")?
                .as_array()?
                .iter()
                .map(|pair| match <[String; 2]>::try_from(texts(pair)?) {
                    Ok([name, value]) => Some((name, value)),
                    Err(_) => None,
                })
                .collect::<Option<_>>()?,
            ids: texts(o.get("ids")?)?,
            stored_at: o.get("stored_at")?.as_f64()?,
        })
    }

    /// Its method, when it is `expected`.
    pub fn method_is(&self, expected: &'static str, route: &str) -> Result<&'static str, String> {
        if self.method == expected {
            Ok(expected)
        } else {
            Err(format!(
                "its method is {}; route \"{route}\" sends {expected}",
                shown(&self.method)
            ))
        }
    }

    /// Its headers, when each name is one of `allowed` (without case) and none comes twice.
    pub fn headers_within(
        &self,
        allowed: &dyn Fn(&str) -> bool,
        route: &str,
    ) -> Result<Vec<(String, String)>, String> {
        let mut seen: Vec<String> = Vec::with_capacity(self.headers.len());
        for (name, _) in &self.headers {
            let lower = name.to_ascii_lowercase();
            if !allowed(&lower) {
                return Err(format!(
                    "it carries the header {}, which route \"{route}\" does not send",
                    shown(name)
                ));
            }
            if seen.contains(&lower) {
                return Err(format!("it carries the header {} twice", shown(name)));
            }
            seen.push(lower);
        }
        Ok(self.headers.clone())
    }

    /// The value of a header, by name without case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A value from a stored request, quoted and cut short, for a reason in the log and the dead
/// letter (the line is JSON: any character is safe in it; the length is what is bounded).
pub fn shown(value: &str) -> String {
    let cut: String = value.chars().take(160).collect();
    if cut.len() < value.len() {
        format!("\"{cut}…\"")
    } else {
        format!("\"{cut}\"")
    }
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Azure has it (now, or from an earlier attempt): acknowledge the message.
    Yes,
    /// Not now: the queue tries again after this many seconds.
    Later(u64),
    /// On the dead-letter queue with its reason (Azure refused it, its route is gone or changed,
    /// it is not a request its route sends, or it ran out of attempts): acknowledge the message.
    DeadLettered,
}

/// Why a message was dead-lettered: what travels beside it on the dead-letter queue (the
/// message itself is there as it came off the deliveries queue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Why it was not delivered, in words.
    pub reason: String,
    /// The route that stored it, and the request id its caller was given (when readable).
    pub route: Option<String>,
    pub request_id: Option<String>,
    /// What it was to carry (message ids, or the blob's name).
    pub ids: Option<Vec<String>>,
    /// The attempts made, this one included.
    pub attempts: u32,
    /// When it was dead-lettered (RFC 3339, UTC).
    pub at: String,
    /// Azure's answer to the last attempt, when there was one: its status, and its error code or
    /// the start of its reason.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backend_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backend_detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Stored {
        let request = BackendRequest {
            method: "POST",
            url: "https://ns.servicebus.windows.net/orders/messages".into(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("brokerproperties".into(), "{\"MessageId\":\"m-1\"}".into()),
            ],
            ..Default::default()
        };
        Stored::new(
            "orders",
            "r-1",
            &request,
            vec!["m-1".into()],
            1_765_000_000_123.5,
        )
    }

    #[test]
    fn parse_reads_what_is_written_and_what_serde_reads() {
        let s = stored();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(Stored::parse(&text), Some(s.clone()));
        // Field order and unknown fields do not matter, as for serde's reader.
        let mut v = serde_json::to_value(&s).unwrap();
        v["later"] = "ignored".into();
        let reordered = serde_json::to_string(&v).unwrap();
        assert_eq!(Stored::parse(&reordered), Some(s));
    }

    #[test]
    fn parse_refuses_what_serde_refuses() {
        let good = serde_json::to_value(stored()).unwrap();
        let mut cases: Vec<Value> = vec![Value::Null, "x".into(), Value::Array(vec![])];
        for field in [
            "v",
            "route",
            "request_id",
            "method",
            "url",
            "headers",
            "ids",
            "stored_at",
        ] {
            let mut missing = good.clone();
            missing.as_object_mut().unwrap().remove(field);
            cases.push(missing);
            let mut wrong = good.clone();
            wrong[field] = serde_json::json!({"a": 1});
            cases.push(wrong);
        }
        for (field, bad) in [
            ("v", serde_json::json!(-1)),
            ("v", serde_json::json!(1.5)),
            ("v", serde_json::json!(5_000_000_000u64)),
            ("headers", serde_json::json!([["a"]])),
            ("headers", serde_json::json!([["a", "b", "c"]])),
            ("headers", serde_json::json!([["a", 1]])),
            ("ids", serde_json::json!([1])),
            ("stored_at", serde_json::json!("now")),
        ] {
            let mut wrong = good.clone();
            wrong[field] = bad;
            cases.push(wrong);
        }
        for case in cases {
            let text = case.to_string();
            assert!(
                serde_json::from_str::<Stored>(&text).is_err(),
                "serde reads {text}"
            );
            assert_eq!(Stored::parse(&text), None, "{text}");
        }
        assert_eq!(Stored::parse("{"), None);
    }
}
