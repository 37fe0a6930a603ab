//! What a send request carries, validated the way Service Bus does (stricter where it helps
//! catch a gateway bug): `BrokerProperties`, custom properties from headers, batches, sizes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::util::parse_rfc1123;

pub const MAX_ID_CHARS: usize = 128;
/// One application property (its value) at most 32 KB.
pub const MAX_PROPERTY_BYTES: usize = 32 * 1024;
/// All request headers together at most 64 KB.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.servicebus.json";

/// A refused message: HTTP status (400 or 413), error code word and message.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

fn bad<T>(message: impl Into<String>) -> Result<T, MessageError> {
    Err(MessageError {
        status: 400,
        code: "BadRequest",
        message: message.into(),
    })
}

/// The broker properties a sender may set. Unknown fields and wrong types are refused
/// (Azure itself ignores unknown fields; refusing them catches misspellings early).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct BrokerProperties {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to_session_id: Option<String>,
    /// Seconds; kept as the sender's number so it reads back as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_live: Option<Number>,
    /// RFC 1123, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_enqueue_time_utc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_persistence: Option<bool>,
    /// A batch message's content type (a single message's is its Content-Type header): read
    /// from a batch element, kept as the message's content type, never echoed here.
    #[serde(skip_serializing)]
    pub content_type: Option<String>,
}

impl BrokerProperties {
    /// The `BrokerProperties` header's value.
    pub fn parse_header(text: &str) -> Result<Self, MessageError> {
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                return bad(format!(
                    "The BrokerProperties header is not valid JSON: {e}."
                ))
            }
        };
        let what = "The BrokerProperties header";
        if !value.is_object() {
            return bad(format!("{what} must be a JSON object."));
        }
        // Typed straight from the text, so a field given twice is refused too.
        let props: BrokerProperties = match serde_json::from_str(text) {
            Ok(p) => p,
            Err(e) => return bad(format!("{what} is invalid: {e}.")),
        };
        if props.content_type.is_some() {
            return bad(format!(
                "{what}: ContentType is a batch message's; a single message's content type is the Content-Type header."
            ));
        }
        props.validate(what)?;
        Ok(props)
    }

    /// From a JSON value (the header's, or a batch element's `BrokerProperties`).
    pub fn from_value(value: Value, what: &str) -> Result<Self, MessageError> {
        if !value.is_object() {
            return bad(format!("{what} must be a JSON object."));
        }
        let props: BrokerProperties = match serde_json::from_value(value) {
            Ok(p) => p,
            Err(e) => return bad(format!("{what} is invalid: {e}.")),
        };
        props.validate(what)?;
        Ok(props)
    }

    fn validate(&self, what: &str) -> Result<(), MessageError> {
        for (name, value) in [
            ("MessageId", &self.message_id),
            ("SessionId", &self.session_id),
            ("PartitionKey", &self.partition_key),
        ] {
            if let Some(v) = value {
                if v.chars().count() > MAX_ID_CHARS {
                    return bad(format!(
                        "{what}: {name} is longer than {MAX_ID_CHARS} characters."
                    ));
                }
            }
        }
        if self.message_id.as_deref() == Some("") {
            return bad(format!("{what}: MessageId must not be empty."));
        }
        if let (Some(session), Some(partition)) = (&self.session_id, &self.partition_key) {
            if session != partition {
                return bad(format!(
                    "{what}: SessionId '{session}' and PartitionKey '{partition}' must be equal when both are set."
                ));
            }
        }
        if let Some(ttl) = &self.time_to_live {
            if !ttl.as_f64().is_some_and(|s| s > 0.0 && s.is_finite()) {
                return bad(format!(
                    "{what}: TimeToLive must be a positive number of seconds."
                ));
            }
        }
        if let Some(date) = &self.scheduled_enqueue_time_utc {
            if parse_rfc1123(date).is_none() {
                return bad(format!(
                    "{what}: ScheduledEnqueueTimeUtc '{date}' is not an RFC 1123 date like 'Sun, 06 Nov 1994 08:49:37 GMT'."
                ));
            }
        }
        Ok(())
    }

    /// As a JSON object, for the size count and the receive side.
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }
}

/// An event hub's send: Event Hubs has no sessions, time-to-live, scheduling or forced
/// persistence, so the Service Bus-only broker properties are refused (stricter than Azure may
/// be: it catches a gateway mapping a queue's properties onto an event hub), and a PartitionKey
/// cannot be combined with a partition send (the SDKs refuse the pair too).
pub fn check_event_properties(
    props: &BrokerProperties,
    what: &str,
    partition_in_path: bool,
) -> Result<(), MessageError> {
    let queue_only = [
        ("SessionId", props.session_id.is_some()),
        ("ReplyToSessionId", props.reply_to_session_id.is_some()),
        ("TimeToLive", props.time_to_live.is_some()),
        (
            "ScheduledEnqueueTimeUtc",
            props.scheduled_enqueue_time_utc.is_some(),
        ),
        ("ForcePersistence", props.force_persistence.is_some()),
    ];
    if let Some((name, _)) = queue_only.iter().find(|(_, set)| *set) {
        return bad(format!(
            "{what}: {name} is a Service Bus property; an event hub does not take it."
        ));
    }
    if partition_in_path && props.partition_key.is_some() {
        return bad(format!(
            "{what}: PartitionKey cannot be set on a send to a given partition (partitions/{{id}}/messages)."
        ));
    }
    Ok(())
}

/// Request headers that are HTTP or transport plumbing, not application properties.
/// Service Bus makes every other header a custom property (its own example uses `Priority`).
pub fn is_standard_header(lower: &str) -> bool {
    const EXACT: &[&str] = &[
        "authorization",
        "brokerproperties",
        "content-type",
        "content-length",
        "content-encoding",
        "host",
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "accept-charset",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "date",
        "cache-control",
        "pragma",
        "via",
        "forwarded",
        "x-real-ip",
        "cdn-loop",
    ];
    const PREFIXES: &[&str] = &["x-forwarded-", "cf-", "sec-fetch-"];
    EXACT.contains(&lower) || PREFIXES.iter().any(|p| lower.starts_with(p))
}

/// All headers together within 64 KB (name + ": " + value + CRLF each).
pub fn check_header_sizes(headers: &[(String, String)]) -> Result<(), MessageError> {
    let total: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    if total > MAX_HEADER_BYTES {
        return bad(format!(
            "The request headers total {total} bytes; at most {MAX_HEADER_BYTES} are allowed."
        ));
    }
    Ok(())
}

/// Custom properties of a single-message send: every non-standard header, name lowercased
/// (header names are case-insensitive), repeated headers joined with ", ", in request order.
pub fn properties_from_headers(
    headers: &[(String, String)],
) -> Result<Vec<(String, String)>, MessageError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if is_standard_header(&lower) {
            continue;
        }
        match out.iter_mut().find(|(n, _)| *n == lower) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(value);
            }
            None => out.push((lower, value.clone())),
        }
    }
    check_property_sizes(&out)?;
    Ok(out)
}

fn check_property_sizes(props: &[(String, String)]) -> Result<(), MessageError> {
    for (name, value) in props {
        if value.len() > MAX_PROPERTY_BYTES {
            return bad(format!(
                "The property '{name}' is {} bytes; one property may have at most {MAX_PROPERTY_BYTES}.",
                value.len()
            ));
        }
    }
    Ok(())
}

/// A message ready to store (not yet numbered).
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub broker: BrokerProperties,
    pub user: Vec<(String, String)>,
}

impl NewMessage {
    /// What counts against the entity's size limit: body, broker properties and custom properties.
    pub fn size(&self) -> usize {
        let broker = serde_json::to_string(&self.broker)
            .map(|s| s.len())
            .unwrap_or(0);
        let broker = if self.broker == BrokerProperties::default() {
            0
        } else {
            broker
        };
        self.body.len()
            + broker
            + self
                .user
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
    }
}

/// 413 when a message (or a whole batch) is over the entity's limit.
pub fn check_size(size: usize, max: usize, what: &str) -> Result<(), MessageError> {
    if size > max {
        return Err(MessageError {
            status: 413,
            code: "MessageSizeExceeded",
            message: format!("The {what} ({size} bytes) exceeds the limit ({max} bytes) currently allowed on the entity."),
        });
    }
    Ok(())
}

/// Parse a batch body: a non-empty JSON array of `{"Body": string, "BrokerProperties": {..},
/// "UserProperties": {..}}`. Any invalid element refuses the whole batch.
/// User property values may be strings, numbers or booleans (kept as their text).
pub fn parse_batch(body: &[u8]) -> Result<Vec<NewMessage>, MessageError> {
    let elements: Vec<Value> = match serde_json::from_slice(body) {
        Ok(Value::Array(items)) => items,
        Ok(_) => return bad("A batch body must be a JSON array of messages."),
        Err(e) => return bad(format!("The batch body is not valid JSON: {e}.")),
    };
    if elements.is_empty() {
        return bad("The batch contains no messages.");
    }
    let mut out = Vec::with_capacity(elements.len());
    for (i, element) in elements.into_iter().enumerate() {
        let what = format!("Batch message {i}");
        let Value::Object(mut fields) = element else {
            return bad(format!("{what} must be a JSON object."));
        };
        let body = match fields.remove("Body") {
            Some(Value::String(s)) => s.into_bytes(),
            Some(_) => return bad(format!("{what}: Body must be a string.")),
            None => return bad(format!("{what}: Body is missing.")),
        };
        let mut broker = match fields.remove("BrokerProperties") {
            None | Some(Value::Null) => BrokerProperties::default(),
            Some(v) => BrokerProperties::from_value(v, &format!("{what}: BrokerProperties"))?,
        };
        // A batch has one Content-Type header for all its messages: each message's own is its
        // `BrokerProperties.ContentType`, stored as the message's content type (without it,
        // the message has none).
        let content_type = broker.content_type.take();
        if content_type.as_deref() == Some("") {
            return bad(format!(
                "{what}: BrokerProperties.ContentType must not be empty."
            ));
        }
        let user = match fields.remove("UserProperties") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(map)) => {
                let mut user = Vec::with_capacity(map.len());
                for (name, value) in map {
                    let text = match value {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => {
                            return bad(format!(
                                "{what}: UserProperties.{name} must be a string, number or boolean."
                            ))
                        }
                    };
                    if name.is_empty() {
                        return bad(format!("{what}: a UserProperties name is empty."));
                    }
                    user.push((name, text));
                }
                check_property_sizes(&user)?;
                user
            }
            Some(_) => return bad(format!("{what}: UserProperties must be a JSON object.")),
        };
        if let Some(unknown) = fields.keys().next() {
            return bad(format!("{what}: unknown field '{unknown}' (expected Body, BrokerProperties, UserProperties)."));
        }
        out.push(NewMessage {
            body,
            content_type,
            broker,
            user,
        });
    }
    // The pass above reads JSON values, where a repeated key silently wins; a typed pass
    // refuses `Body` or a broker property given twice.
    if let Err(e) = serde_json::from_slice::<Vec<StrictElement>>(body) {
        return bad(format!("The batch body is invalid: {e}."));
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(dead_code)] // read only to detect repeated keys
struct StrictElement {
    body: serde::de::IgnoredAny,
    broker_properties: Option<BrokerProperties>,
    user_properties: Option<serde::de::IgnoredAny>,
}

/// Whether a Content-Type names the batch format (parameters ignored).
pub fn is_batch_content_type(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|ct| ct.trim().eq_ignore_ascii_case(BATCH_CONTENT_TYPE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn broker_properties_types_and_rules() {
        let ok = BrokerProperties::parse_header(
            r#"{"MessageId":"m1","CorrelationId":"c","SessionId":"s","PartitionKey":"s","Label":"l","To":"t",
                "ReplyTo":"r","ReplyToSessionId":"rs","TimeToLive":90,"ScheduledEnqueueTimeUtc":"Sun, 06 Nov 1994 08:49:37 GMT",
                "ForcePersistence":true}"#,
        )
        .unwrap();
        assert_eq!(ok.message_id.as_deref(), Some("m1"));
        assert_eq!(
            ok.to_map()["TimeToLive"],
            serde_json::json!(90),
            "numbers read back as sent"
        );
        assert_eq!(
            BrokerProperties::parse_header("{}").unwrap(),
            BrokerProperties::default()
        );

        let refused = |text: &str| BrokerProperties::parse_header(text).unwrap_err().status;
        assert_eq!(refused("not json"), 400);
        assert_eq!(refused("[1]"), 400);
        assert_eq!(refused(r#""MessageId""#), 400);
        assert_eq!(refused(r#"{"MessageId":5}"#), 400);
        assert_eq!(refused(r#"{"TimeToLive":"90"}"#), 400);
        assert_eq!(refused(r#"{"TimeToLive":0}"#), 400);
        assert_eq!(refused(r#"{"TimeToLive":-1}"#), 400);
        assert_eq!(refused(r#"{"ForcePersistence":"true"}"#), 400);
        assert_eq!(refused(r#"{"Lable":"typo"}"#), 400);
        assert_eq!(refused(r#"{"SequenceNumber":1}"#), 400);
        assert_eq!(refused(r#"{"MessageId":""}"#), 400);
        assert_eq!(refused(r#"{"MessageId":"a","MessageId":"b"}"#), 400);
        assert_eq!(
            refused(r#"{"ScheduledEnqueueTimeUtc":"2024-01-01T00:00:00Z"}"#),
            400
        );
        assert_eq!(
            refused(r#"{"ScheduledEnqueueTimeUtc":"Sunday, 06-Nov-94 08:49:37 GMT"}"#),
            400
        );
        assert_eq!(refused(r#"{"SessionId":"a","PartitionKey":"b"}"#), 400);
        let long = "x".repeat(129);
        assert_eq!(refused(&format!(r#"{{"MessageId":"{long}"}}"#)), 400);
        assert_eq!(refused(&format!(r#"{{"SessionId":"{long}"}}"#)), 400);
        assert!(BrokerProperties::parse_header(&format!(
            r#"{{"MessageId":"{}"}}"#,
            "é".repeat(128)
        ))
        .is_ok());
    }

    #[test]
    fn custom_properties_from_headers() {
        let props = properties_from_headers(&h(&[
            ("Authorization", "Bearer x"),
            ("Content-Type", "text/plain"),
            ("BrokerProperties", "{}"),
            ("Priority", "High"),
            ("x-request-id", "r1"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("cf-ray", "abc"),
            ("sec-fetch-mode", "cors"),
            ("Customer", "12345"),
            ("customer", "ABC"),
        ]))
        .unwrap();
        assert_eq!(
            props,
            h(&[
                ("priority", "High"),
                ("x-request-id", "r1"),
                ("customer", "12345, ABC")
            ])
        );
        let big = "v".repeat(MAX_PROPERTY_BYTES + 1);
        assert_eq!(
            properties_from_headers(&h(&[("p", &big)]))
                .unwrap_err()
                .status,
            400
        );
        assert!(properties_from_headers(&h(&[("p", &big[1..])])).is_ok());
        let many = h(&[("a", &big[1..]), ("b", &big[1..]), ("c", "x")]);
        assert_eq!(check_header_sizes(&many).unwrap_err().status, 400);
        assert!(check_header_sizes(&many[..1]).is_ok());
    }

    #[test]
    fn sizes() {
        let m = NewMessage {
            body: vec![0; 100],
            content_type: None,
            broker: BrokerProperties {
                message_id: Some("m".into()),
                ..Default::default()
            },
            user: h(&[("ab", "cd")]),
        };
        assert_eq!(m.size(), 100 + r#"{"MessageId":"m"}"#.len() + 4);
        assert!(check_size(m.size(), m.size(), "message").is_ok());
        let e = check_size(m.size() + 1, m.size(), "message").unwrap_err();
        assert_eq!((e.status, e.code), (413, "MessageSizeExceeded"));
    }

    #[test]
    fn batches() {
        let batch = parse_batch(
            br#"[{"Body":"one","BrokerProperties":{"MessageId":"1","Label":"L"},"UserProperties":{"p":"v","n":5,"b":true}},
                 {"Body":"two"},{"Body":"three","BrokerProperties":null}]"#,
        )
        .unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[0].body, b"one");
        assert_eq!(batch[0].broker.label.as_deref(), Some("L"));
        assert_eq!(
            batch[0].user,
            h(&[("b", "true"), ("n", "5"), ("p", "v")]),
            "by name"
        );
        assert_eq!(batch[2].body, b"three");

        let refused = |text: &str| parse_batch(text.as_bytes()).unwrap_err();
        assert_eq!(refused("{}").status, 400);
        assert_eq!(refused("[]").status, 400);
        assert_eq!(refused("[1]").status, 400);
        assert_eq!(refused(r#"[{"Body":5}]"#).status, 400);
        assert_eq!(refused(r#"[{"BrokerProperties":{}}]"#).status, 400);
        assert_eq!(refused(r#"[{"Body":"a","Extra":1}]"#).status, 400);
        assert_eq!(
            refused(r#"[{"Body":"a","UserProperties":{"o":{}}}]"#).status,
            400
        );
        assert_eq!(refused(r#"[{"Body":"a","UserProperties":[]}]"#).status, 400);
        assert_eq!(refused(r#"[{"Body":"a","Body":"b"}]"#).status, 400);
        assert_eq!(
            refused(r#"[{"Body":"a","BrokerProperties":{"Label":"x","Label":"y"}}]"#).status,
            400
        );
        let e = refused(
            r#"[{"Body":"a"},{"Body":"b","BrokerProperties":{"SessionId":"x","PartitionKey":"y"}}]"#,
        );
        assert!(e.message.starts_with("Batch message 1"), "{}", e.message);
    }

    #[test]
    fn a_batch_message_s_content_type_is_its_broker_properties_content_type() {
        let batch = parse_batch(
            br#"[{"Body":"{}","BrokerProperties":{"MessageId":"1","ContentType":"application/json"}},
                 {"Body":"x"}]"#,
        )
        .unwrap();
        assert_eq!(batch[0].content_type.as_deref(), Some("application/json"));
        assert_eq!(
            batch[0].broker.content_type, None,
            "kept as the message's, not a property"
        );
        assert!(!serde_json::to_string(&batch[0].broker)
            .unwrap()
            .contains("ContentType"));
        assert_eq!(batch[1].content_type, None, "without it, none");
        let refused = |text: &str| parse_batch(text.as_bytes()).unwrap_err();
        assert_eq!(
            refused(r#"[{"Body":"a","BrokerProperties":{"ContentType":""}}]"#).status,
            400
        );
        assert_eq!(
            refused(r#"[{"Body":"a","BrokerProperties":{"ContentType":5}}]"#).status,
            400
        );
        // A single message's content type is its header.
        let e = BrokerProperties::parse_header(r#"{"ContentType":"text/plain"}"#).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn event_hub_properties() {
        let ok = BrokerProperties::parse_header(
            r#"{"PartitionKey":"device-7","MessageId":"m","CorrelationId":"c","Label":"l"}"#,
        )
        .unwrap();
        assert!(check_event_properties(&ok, "h", false).is_ok());
        let e = check_event_properties(&ok, "h", true).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("PartitionKey"), "{}", e.message);
        let without_key = BrokerProperties::parse_header(r#"{"MessageId":"m"}"#).unwrap();
        assert!(check_event_properties(&without_key, "h", true).is_ok());
        for text in [
            r#"{"SessionId":"s"}"#,
            r#"{"ReplyToSessionId":"s"}"#,
            r#"{"TimeToLive":5}"#,
            r#"{"ScheduledEnqueueTimeUtc":"Sun, 06 Nov 1994 08:49:37 GMT"}"#,
            r#"{"ForcePersistence":false}"#,
        ] {
            let props = BrokerProperties::parse_header(text).unwrap();
            let e = check_event_properties(&props, "h", false).unwrap_err();
            assert_eq!((e.status, e.code), (400, "BadRequest"), "{text}");
        }
    }

    #[test]
    fn batch_content_type() {
        assert!(is_batch_content_type(Some(
            "application/vnd.microsoft.servicebus.json"
        )));
        assert!(is_batch_content_type(Some(
            "application/vnd.microsoft.servicebus.json; charset=utf-8"
        )));
        assert!(!is_batch_content_type(Some("application/json")));
        assert!(!is_batch_content_type(None));
    }
}
