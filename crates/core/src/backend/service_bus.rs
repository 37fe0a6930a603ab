//! Service Bus: an accepted request becomes one message (or one batch) sent with
//! `POST {namespace}/{entity}/messages`, and Service Bus's answer becomes the caller's.
//!
//! Everything Service Bus would refuse is refused here first, before a token is fetched or a
//! byte is sent: id lengths, `SessionId` = `PartitionKey`, property and header sizes, the
//! message size, and (for a batch) every element, named by its index.
//!
//! Event hubs take the same REST send, so an `event_hubs` route runs this code too, with the
//! prepared backend's [`Flavor`] set to Event Hubs: its events get no default `MessageId` or
//! `CorrelationId`, may carry no Service Bus-only broker property ([`SERVICE_BUS_ONLY`]), and
//! problems and the answer name Event Hubs and the hub.

use serde_json::{json, Map, Value};

use super::{Resend, Verdict};
use crate::encoding::push_json_str;
use crate::exchange::{
    Answer, Backend, BackendRequest, Bearer, BodyError, Cx, Io, Limit, OutBody, Reply, StoredPlan,
};
use crate::policy::prepared::{Flavor, PreparedMessage, PreparedServiceBus};
use crate::policy::ServiceBusBackend;
use crate::problem::Problem;
use crate::template::{RenderContext, Template};

pub const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.servicebus.json";
/// 256 KB: the Standard tier's message size, properties included.
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 262_144;
const MAX_ID_CHARS: usize = 128;
const MAX_PROPERTY_BYTES: usize = 32 * 1024;
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Broker properties a sender may set, and their JSON types. Public for the fuzz targets
/// (`tests/fuzz.rs`), which check every batch element against it.
pub const SENDER_PROPERTIES: &[(&str, PropertyType)] = &[
    ("MessageId", PropertyType::String),
    ("CorrelationId", PropertyType::String),
    ("SessionId", PropertyType::String),
    ("PartitionKey", PropertyType::String),
    ("Label", PropertyType::String),
    ("To", PropertyType::String),
    ("ReplyTo", PropertyType::String),
    ("ReplyToSessionId", PropertyType::String),
    ("TimeToLive", PropertyType::Number),
    ("ScheduledEnqueueTimeUtc", PropertyType::String),
    ("ForcePersistence", PropertyType::Bool),
];

/// The JSON type of a broker property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyType {
    String,
    Number,
    Bool,
}

/// Broker properties of Service Bus that an event hub does not take (no sessions, time to live,
/// scheduling or forced persistence): an event that sets one is refused before it is sent.
pub const SERVICE_BUS_ONLY: &[&str] = &[
    "SessionId",
    "ReplyToSessionId",
    "TimeToLive",
    "ScheduledEnqueueTimeUtc",
    "ForcePersistence",
];

/// The broker properties an event may set, in Service Bus's order.
pub fn event_property_names() -> impl Iterator<Item = &'static str> {
    sender_property_names().filter(|n| !SERVICE_BUS_ONLY.contains(n))
}

/// The names of the broker properties a sender may set, in Service Bus's order.
pub fn sender_property_names() -> impl Iterator<Item = &'static str> {
    SENDER_PROPERTIES.iter().map(|(name, _)| *name)
}

impl ServiceBusBackend {
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES) as usize
    }

    /// Whether concurrent single-message sends leave together ([`crate::coalesce`]): on by
    /// default, never for a route that sends the caller's own batch.
    pub fn coalesces(&self) -> bool {
        !self.batch && self.coalesce.unwrap_or(true)
    }

    /// The most messages in one coalesced batch.
    pub fn max_batch_messages(&self) -> usize {
        self.max_batch_messages
            .unwrap_or(DEFAULT_MAX_BATCH_MESSAGES) as usize
    }
}

/// Messages in one coalesced batch, unless the route says otherwise.
pub const DEFAULT_MAX_BATCH_MESSAGES: u32 = 100;

/// Where defaults come from.
pub struct Defaults<'a> {
    /// The caller's `Idempotency-Key`: the default `MessageId` (suffixed `-{index}` in a batch).
    pub idempotency_key: Option<&'a str>,
    /// The caller's `traceparent`: its trace id is the default `CorrelationId`.
    pub traceparent: Option<&'a str>,
    pub request_id: &'a str,
}

/// A message's metadata, rendered and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Properties {
    pub broker: Map<String, Value>,
    pub custom: Vec<(String, String)>,
}

impl Properties {
    /// The `BrokerProperties` header's value: the broker properties as JSON, byte for byte what
    /// `serde_json` writes for the map, without its serializer on a send's path (strings are
    /// [`push_json_str`]'s, the rare number or bool `serde_json`'s own).
    pub fn broker_json(&self) -> String {
        let mut out = String::with_capacity(
            2 + self
                .broker
                .iter()
                .map(|(k, v)| k.len() + v.as_str().map_or(8, str::len) + 6)
                .sum::<usize>(),
        );
        self.write_broker_json(&mut out, None);
        out
    }

    /// [`Properties::broker_json`] written onto `out`, with one more string member at its end
    /// if given (a batch element's `ContentType`).
    fn write_broker_json(&self, out: &mut String, more: Option<(&str, &str)>) {
        out.push('{');
        let mut first = true;
        let mut member = |out: &mut String, name: &str| {
            if !first {
                out.push(',');
            }
            first = false;
            push_json_str(out, name);
            out.push(':');
        };
        for (name, value) in &self.broker {
            member(out, name);
            match value {
                Value::String(text) => push_json_str(out, text),
                other => out.push_str(&other.to_string()),
            }
        }
        if let Some((name, value)) = more {
            member(out, name);
            push_json_str(out, value);
        }
        out.push('}');
    }

    pub fn message_id(&self) -> &str {
        self.broker
            .get("MessageId")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

fn bad_message(flavor: Flavor, detail: String) -> Problem {
    let title = match flavor {
        Flavor::ServiceBus => "The message would be refused by Service Bus",
        Flavor::EventHubs => "The event would be refused by Event Hubs",
    };
    Problem::new(
        400,
        "bad-message",
        title,
        format!("{detail}; nothing was sent."),
    )
}

/// Renders the route's mapping for this request, fills the defaults and checks the result.
/// `index` is the element of a batch, if any.
pub fn properties(
    mapping: &PreparedMessage,
    ctx: &RenderContext,
    defaults: &Defaults,
    index: Option<usize>,
) -> Result<Properties, Problem> {
    properties_for(Flavor::ServiceBus, mapping, ctx, defaults, index)
}

/// [`properties`] for a Service Bus entity or an event hub: an event gets no `MessageId` or
/// `CorrelationId` by default (Event Hubs does not deduplicate or correlate), and may carry no
/// Service Bus-only property.
pub fn properties_for(
    flavor: Flavor,
    mapping: &PreparedMessage,
    ctx: &RenderContext,
    defaults: &Defaults,
    index: Option<usize>,
) -> Result<Properties, Problem> {
    let render = |what: &str, template: &Template| -> Result<String, Problem> {
        template.render(ctx).map_err(|missing| {
            bad_message(
                flavor,
                format!("{what} is built from the request, but {missing}"),
            )
        })
    };
    let mut broker = Map::new();
    let mut custom = Vec::new();
    for (name, template) in &mapping.broker {
        broker.insert(name.clone(), Value::from(render(name, template)?));
    }
    if let Some(ttl) = mapping.time_to_live {
        broker.insert("TimeToLive".into(), Value::from(ttl));
    }
    for (name, template) in &mapping.properties {
        custom.push((name.clone(), render(&format!("property {name}"), template)?));
    }
    let service_bus = flavor == Flavor::ServiceBus;
    if service_bus && !broker.contains_key("MessageId") {
        let id = match (defaults.idempotency_key, index) {
            (Some(key), Some(i)) => format!("{key}-{i}"),
            (Some(key), None) => key.to_owned(),
            (None, _) => (ctx.uuid)(),
        };
        broker.insert("MessageId".into(), Value::from(id));
    }
    if service_bus && !broker.contains_key("CorrelationId") {
        let trace_id = defaults.traceparent.and_then(trace_id);
        broker.insert(
            "CorrelationId".into(),
            Value::from(trace_id.unwrap_or(defaults.request_id)),
        );
    }
    let props = Properties { broker, custom };
    check(flavor, &props, "")?;
    Ok(props)
}

/// The trace id of a W3C `traceparent` (`00-{32 hex}-{16 hex}-{2 hex}`).
fn trace_id(traceparent: &str) -> Option<&str> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    match parts.as_slice() {
        [_, id, _, _]
            if id.len() == 32
                && id.bytes().all(|b| b.is_ascii_hexdigit())
                && id.bytes().any(|b| b != b'0') =>
        {
            Some(id)
        }
        _ => None,
    }
}

/// Service Bus's rules for one message's properties (and Event Hubs' for an event); `at`
/// prefixes errors (`batch[3].`).
fn check(flavor: Flavor, props: &Properties, at: &str) -> Result<(), Problem> {
    for (name, value) in &props.broker {
        if flavor == Flavor::EventHubs && SERVICE_BUS_ONLY.contains(&name.as_str()) {
            let allowed: Vec<&str> = event_property_names().collect();
            return Err(bad_message(flavor, format!("{at}BrokerProperties.{name} is a Service Bus property that an event hub does not take; an event may set {}", allowed.join(", "))));
        }
        let Some((_, ty)) = SENDER_PROPERTIES.iter().find(|(n, _)| n == name) else {
            let known: Vec<&str> = SENDER_PROPERTIES.iter().map(|(n, _)| *n).collect();
            return Err(bad_message(flavor, format!("{at}BrokerProperties.{name} is not a property a sender may set (expected one of {})", known.join(", "))));
        };
        let type_ok = match ty {
            PropertyType::String => value.is_string(),
            PropertyType::Number => value.as_f64().is_some_and(|n| n > 0.0),
            PropertyType::Bool => value.is_boolean(),
        };
        if !type_ok {
            let expected = match ty {
                PropertyType::String => "a string",
                PropertyType::Number => "a positive number of seconds",
                PropertyType::Bool => "true or false",
            };
            return Err(bad_message(
                flavor,
                format!("{at}BrokerProperties.{name} must be {expected}"),
            ));
        }
    }
    let text = |name: &str| props.broker.get(name).and_then(Value::as_str);
    for name in ["MessageId", "SessionId"] {
        if let Some(v) = text(name) {
            let n = v.chars().count();
            if n == 0 || n > MAX_ID_CHARS {
                return Err(bad_message(
                    flavor,
                    format!("{at}{name} must be 1 to {MAX_ID_CHARS} characters, got {n}"),
                ));
            }
        }
    }
    if let (Some(session), Some(partition)) = (text("SessionId"), text("PartitionKey")) {
        if session != partition {
            return Err(bad_message(
                flavor,
                format!("{at}SessionId and PartitionKey must be equal when both are set"),
            ));
        }
    }
    if let Some(when) = text("ScheduledEnqueueTimeUtc") {
        if !is_rfc1123(when) {
            return Err(bad_message(flavor, format!("{at}ScheduledEnqueueTimeUtc must be an RFC 1123 date such as \"Sun, 06 Nov 1994 08:49:37 GMT\"")));
        }
    }
    let mut header_bytes = "BrokerProperties".len() + props.broker_json().len();
    for (name, value) in &props.custom {
        if !crate::encoding::bytes_within(value.as_bytes(), 0x20, b'\t') {
            return Err(bad_message(
                flavor,
                format!(
                    "{at}property {name} must be printable ASCII (it travels as an HTTP header)"
                ),
            ));
        }
        if value.len() > MAX_PROPERTY_BYTES {
            return Err(bad_message(flavor, format!("{at}property {name} is {} bytes; one property may have at most {MAX_PROPERTY_BYTES}", value.len())));
        }
        header_bytes += name.len() + value.len();
    }
    if header_bytes > MAX_HEADER_BYTES {
        return Err(bad_message(flavor, format!("{at}the properties take {header_bytes} bytes of headers; at most {MAX_HEADER_BYTES} are allowed")));
    }
    Ok(())
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`, strictly.
fn is_rfc1123(s: &str) -> bool {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let parts: Vec<&str> = s.split(' ').collect();
    let [day, dd, mon, yyyy, time, "GMT"] = parts.as_slice() else {
        return false;
    };
    let digits = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_digit());
    let hms: Vec<&str> = time.split(':').collect();
    day.strip_suffix(',').is_some_and(|d| DAYS.contains(&d))
        && digits(dd, 2)
        && MONTHS.contains(mon)
        && digits(yyyy, 4)
        && hms.len() == 3
        && hms.iter().all(|p| digits(p, 2))
}

/// Size of one message as Service Bus counts it: body plus properties (`broker_json`, from
/// [`Properties::broker_json`], is serialised once and sent as it is measured).
pub fn message_size(body_len: usize, broker_json: &str, props: &Properties) -> usize {
    body_len
        + broker_json.len()
        + props
            .custom
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

pub fn too_large(size: usize, limit: usize) -> Problem {
    Problem::new(
        413,
        "body-too-large",
        "Message too large",
        format!("The message is {size} bytes with its properties; this route accepts at most {limit}. Nothing was sent."),
    )
}

/// The send request for one message; the body is the caller's, as it came.
pub fn single_request(
    backend: &PreparedServiceBus,
    content_type: &str,
    broker_json: String,
    props: &Properties,
) -> BackendRequest {
    let mut headers = vec![
        ("content-type".to_owned(), content_type.to_owned()),
        ("brokerproperties".to_owned(), broker_json),
    ];
    headers.extend(props.custom.iter().cloned());
    BackendRequest {
        method: "POST",
        url: backend.send_url.clone(),
        headers,
        ..Default::default()
    }
}

/// A caller's batch (a JSON array of `{"Body", "BrokerProperties", "UserProperties"}`) as
/// Service Bus's batch body, with the route's mapping as defaults for every element and each
/// element checked. Returns the body and the message ids in order.
pub fn batch_body(
    body: &[u8],
    mapping: &PreparedMessage,
    ctx: &RenderContext,
    defaults: &Defaults,
) -> Result<(String, Vec<String>), Problem> {
    batch_body_for(Flavor::ServiceBus, body, mapping, ctx, defaults)
}

/// [`batch_body`] for a Service Bus entity or an event hub (whose elements get no default
/// `MessageId`, so their ids are empty unless an element sets one).
pub fn batch_body_for(
    flavor: Flavor,
    body: &[u8],
    mapping: &PreparedMessage,
    ctx: &RenderContext,
    defaults: &Defaults,
) -> Result<(String, Vec<String>), Problem> {
    let elements: Vec<Value> = match serde_json::from_slice(body) {
        Ok(Value::Array(items)) if !items.is_empty() => items,
        _ => {
            return Err(bad_message(
                flavor,
                "This route takes a batch: a non-empty JSON array of {\"Body\": …, \"BrokerProperties\": {…}, \"UserProperties\": {…}}".into(),
            ))
        }
    };
    let mut out = Vec::with_capacity(elements.len());
    let mut ids = Vec::with_capacity(elements.len());
    for (i, element) in elements.into_iter().enumerate() {
        let at = format!("batch[{i}].");
        let Value::Object(mut element) = element else {
            return Err(bad_message(
                flavor,
                format!("batch[{i}] must be an object with \"Body\""),
            ));
        };
        let body = match element.remove("Body") {
            Some(Value::String(s)) => s,
            Some(Value::Null) | None => {
                return Err(bad_message(flavor, format!("{at}Body is required")))
            }
            Some(other) => other.to_string(),
        };
        let mut props =
            properties_for(flavor, mapping, ctx, defaults, Some(i)).map_err(|p| prefix(p, &at))?;
        match element.remove("BrokerProperties") {
            Some(Value::Object(own)) => {
                // What the route maps is the route's: an element may not replace it (a tenant
                // taken from the caller's token, say). Defaults (MessageId, CorrelationId) it
                // may set.
                if let Some(name) = own.keys().find(|k| mapping.maps_broker(k)) {
                    return Err(set_by_route(
                        flavor,
                        &at,
                        &format!("BrokerProperties.{name}"),
                    ));
                }
                props.broker.extend(own)
            }
            None | Some(Value::Null) => {}
            Some(_) => {
                return Err(bad_message(
                    flavor,
                    format!("{at}BrokerProperties must be an object"),
                ))
            }
        }
        match element.remove("UserProperties") {
            Some(Value::Object(own)) => {
                if let Some(name) = own.keys().find(|k| mapping.maps_property(k)) {
                    return Err(set_by_route(flavor, &at, &format!("UserProperties.{name}")));
                }
                for (k, v) in own {
                    let v = match v {
                        Value::String(s) => s,
                        Value::Number(_) | Value::Bool(_) => v.to_string(),
                        _ => {
                            return Err(bad_message(
                                flavor,
                                format!(
                                    "{at}UserProperties.{k} must be a string, number or boolean"
                                ),
                            ))
                        }
                    };
                    props.custom.retain(|(name, _)| name != &k);
                    props.custom.push((k, v));
                }
            }
            None | Some(Value::Null) => {}
            Some(_) => {
                return Err(bad_message(
                    flavor,
                    format!("{at}UserProperties must be an object"),
                ))
            }
        }
        if let Some(extra) = element.keys().next() {
            return Err(bad_message(flavor, format!("{at}{extra} is not a field of a batch message (Body, BrokerProperties, UserProperties)")));
        }
        check(flavor, &props, &at)?;
        ids.push(props.message_id().to_owned());
        let user: Map<String, Value> = props
            .custom
            .into_iter()
            .map(|(k, v)| (k, Value::from(v)))
            .collect();
        out.push(json!({ "Body": body, "BrokerProperties": props.broker, "UserProperties": user }));
    }
    Ok((Value::Array(out).to_string(), ids))
}

fn set_by_route(flavor: Flavor, at: &str, field: &str) -> Problem {
    bad_message(flavor, format!(
        "{at}{field} is set by this route and may not be set by a batch element; leave it out (policy explain lists what an element may set)"
    ))
}

fn prefix(mut p: Problem, at: &str) -> Problem {
    p.detail = format!("{at}{}", p.detail);
    p
}

/// The batch send request.
pub fn batch_request(backend: &PreparedServiceBus) -> BackendRequest {
    BackendRequest {
        method: "POST",
        url: backend.send_url.clone(),
        headers: vec![("content-type".to_owned(), BATCH_CONTENT_TYPE.to_owned())],
        ..Default::default()
    }
}

/// Time limit of one send attempt, in milliseconds.
pub const SEND_TIMEOUT_MS: f64 = 30_000.0;

/// What [`build`] decided: the request and the bytes every attempt sends (so a retry carries
/// the same body and `MessageId`, and an entity with duplicate detection drops a repeat).
pub struct Plan<B> {
    request: BackendRequest,
    payload: Payload<B>,
    ids: Vec<String>,
    /// A single message on a coalescing route: what a batch element is built from.
    single: Option<Single>,
}

/// A single message's properties, kept to build its batch element if it waits to join a batch
/// (its content type is its send's header).
struct Single {
    props: Properties,
}

impl<B> Plan<B> {
    /// The send (its URL names the entity).
    pub fn request(&self) -> &BackendRequest {
        &self.request
    }
}

enum Payload<B> {
    /// The caller's body, held by the edge.
    Bytes(B),
    /// A batch, rebuilt here.
    Text(String),
    Empty,
}

/// Phase 7: reads the body (within the message size), builds the message or batch with the
/// route's mapping, checks everything Service Bus would refuse, and passes the request through
/// the outgoing gate: all before a token is fetched.
pub async fn build<I: Io>(
    sb: &PreparedServiceBus,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Plan<I::Bytes>, Problem> {
    let limit = sb
        .config
        .max_message_bytes()
        .min(cx.max_body().map_or(usize::MAX, |m| m as usize));
    let head = cx.head;
    if let Some(length) = head.content_length().filter(|&l| l > limit as u64) {
        return Err(too_large(length as usize, limit));
    }
    let body = match io.read_body(limit as u64).await {
        Ok(body) => body,
        Err(BodyError::TooLarge(seen)) => return Err(too_large(seen as usize, limit)),
        Err(BodyError::Unreadable(why)) => return Err(crate::backend::unreadable(&why)),
    };
    let defaults = Defaults {
        idempotency_key: head.header("idempotency-key"),
        traceparent: head.header("traceparent"),
        request_id: &cx.request_id,
    };
    let header = |name: &str| head.header(name).map(str::to_owned);
    let uuid = || io.uuid();
    let values = cx.render_context(&header, &uuid, io.now());
    let plan = if sb.config.batch {
        let bytes = body.as_ref().map(|(b, _)| io.bytes(b)).unwrap_or_default();
        let (batch, ids) = batch_body_for(sb.flavor, &bytes, &sb.message, &values, &defaults)?;
        if batch.len() > limit {
            return Err(too_large(batch.len(), limit));
        }
        Plan {
            request: batch_request(sb),
            payload: Payload::Text(batch),
            ids,
            single: None,
        }
    } else {
        let props = properties_for(sb.flavor, &sb.message, &values, &defaults, None)?;
        let broker_json = props.broker_json();
        let body_len = body.as_ref().map_or(0, |(_, n)| *n as usize);
        let size = message_size(body_len, &broker_json, &props);
        if size > limit {
            return Err(too_large(size, limit));
        }
        let content_type = head
            .header("content-type")
            .unwrap_or("application/octet-stream");
        Plan {
            request: single_request(sb, content_type, broker_json, &props),
            ids: vec![props.message_id().to_owned()],
            payload: body.map_or(Payload::Empty, |(b, _)| Payload::Bytes(b)),
            single: sb.config.coalesces().then_some(Single { props }),
        }
    };
    crate::backend::check(&plan.request)?;
    Ok(plan)
}

/// Whether a send may go again when its outcome is unknown (a timeout, a lost connection, a
/// 500/502/504): only to a Service Bus entity the route says has duplicate detection (which
/// drops the resent `MessageId`). Event Hubs has none: an event sent twice is stored twice.
pub fn resend_for(sb: &PreparedServiceBus) -> Resend {
    if sb.flavor == Flavor::ServiceBus && sb.config.duplicate_detection {
        Resend::Safe
    } else {
        Resend::OnlyIfRefused
    }
}

/// Phase 9: on a coalescing route, a single message goes at once when its lane is idle, and
/// otherwise waits to leave with others as one batch ([`crate::coalesce`]); every other send
/// goes alone ([`send_alone`]).
pub async fn send<I: Io>(
    sb: &PreparedServiceBus,
    plan: &Plan<I::Bytes>,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    match &plan.single {
        Some(single) => coalesced(sb, plan, single, bearer, cx, io).await,
        None => send_alone(sb, plan, bearer, cx, io).await,
    }
}

/// Sends with the same bytes within the retry policy, again after a 429 or 503 (the service
/// busy: not taken) and, where [`resend_for`] allows, after a 500/502/504, a timeout or a lost
/// connection; otherwise those are `backend-outcome-unknown`. A final refusal is mapped (and a
/// 401 evicts the token).
async fn send_alone<I: Io>(
    sb: &PreparedServiceBus,
    plan: &Plan<I::Bytes>,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    let body = match &plan.payload {
        Payload::Bytes(b) => OutBody::Bytes(b),
        Payload::Text(t) => OutBody::Text(t),
        Payload::Empty => OutBody::Text(""),
    };
    send_request(sb, &plan.request, body, false, bearer, cx, io).await
}

/// One send (a message, a caller's batch, or a coalesced batch) through the retry loop.
/// `coalesced`: a batch of several callers' messages, which Azure may refuse as a whole for one
/// message's content (400, 403, 413): that answer comes back as it is (without its body), for
/// the messages to be sent again alone.
async fn send_request<I: Io>(
    sb: &PreparedServiceBus,
    request: &BackendRequest,
    body: OutBody<'_, I::Bytes>,
    coalesced: bool,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    let entity = sb.config.entity();
    let resend = resend_for(sb);
    let service = service_name(sb.flavor);
    let refused = std::cell::RefCell::new(None);
    let sent = crate::backend::send_retried(
        io,
        request,
        bearer,
        body,
        Limit::Deadline(SEND_TIMEOUT_MS),
        &mut cx.log,
        (resend, service),
        async |reply: Reply<I::Stream>, _| {
            let status = reply.status;
            if status == 201 {
                return Verdict::Done(reply);
            }
            let retry_after = crate::retry::parse_retry_after_secs(reply.header("retry-after"));
            let (text, unread) = match crate::backend::answer_text(io, reply.body).await {
                Ok(text) => (text, None),
                Err(note) => (String::new(), Some(note)),
            };
            if coalesced && matches!(status, 400 | 403 | 413) {
                *refused.borrow_mut() = Some(unread.unwrap_or_else(|| error_detail(&text)));
                return Verdict::Done(Reply {
                    status,
                    headers: Vec::new(),
                    body: None,
                });
            }
            if resend == Resend::OnlyIfRefused && matches!(status, 500 | 502 | 504) {
                // Not a refusal: the message may have been taken. Without duplicate detection a
                // second send could be a second message.
                return Verdict::Fail {
                    problem: crate::backend::outcome_unknown(
                        service,
                        &format!("it answered {status}, which does not say whether the message was taken"),
                        status == 504,
                    ),
                    detail: Some(format!("outcome unknown: answered {status}; not sent again")),
                };
            }
            match map_response_for(sb.flavor, status, retry_after, &text, entity) {
                SendOutcome::Accepted => Verdict::Done(Reply {
                    status,
                    headers: Vec::new(),
                    body: None,
                }),
                SendOutcome::Retry { retry_after_secs } => Verdict::Retry(retry_after_secs),
                SendOutcome::Failed {
                    problem,
                    evict,
                    detail,
                } => {
                    if evict {
                        bearer.evict(io);
                    }
                    Verdict::Fail {
                        problem,
                        detail: Some(unread.unwrap_or(detail)),
                    }
                }
            }
        },
        |why, retry_after| unavailable_for(sb.flavor, retry_after, why),
    )
    .await;
    if let Some(detail) = refused.into_inner() {
        cx.log.backend_detail = Some(format!(
            "the batch was refused as a whole: {detail}; each message sent alone"
        ));
    }
    sent
}

fn service_name(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::ServiceBus => "Service Bus",
        Flavor::EventHubs => "Event Hubs",
    }
}

/// The lane a message travels on: its session (Service Bus) or partition key, which every
/// message of one batch must share.
fn lane_of(props: &Properties) -> &str {
    let text = |name: &str| props.broker.get(name).and_then(Value::as_str);
    text("SessionId")
        .or_else(|| text("PartitionKey"))
        .unwrap_or_default()
}

/// A message as a batch element, exactly as it would be received had it been sent alone: its
/// body as the batch's `Body` string (only a body that is UTF-8 can be carried byte for byte;
/// `None` for any other, which goes alone), its broker properties with its `ContentType` (which
/// a batch's HTTP header cannot give each message), and its application properties under the
/// lowercase names its headers would have had. Written as JSON by the same writer as the
/// `BrokerProperties` header (every string escaped as `serde_json` escapes it): a caller's value
/// is only ever the contents of a JSON string, so nothing in it can close the element.
fn element_of<I: Io>(plan: &Plan<I::Bytes>, single: &Single, io: &I) -> Option<String> {
    let bytes = match &plan.payload {
        Payload::Bytes(b) => io.bytes(b),
        Payload::Text(t) => t.as_bytes().to_vec(),
        Payload::Empty => Vec::new(),
    };
    let body = std::str::from_utf8(&bytes).ok()?;
    let content_type = plan.request.header("content-type").unwrap_or_default();
    Some(element_json(body, &single.props, content_type))
}

/// [`element_of`]'s JSON.
fn element_json(body: &str, props: &Properties, content_type: &str) -> String {
    let room = body.len()
        + body.len() / 8
        + 96
        + props
            .custom
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum::<usize>();
    let mut out = String::with_capacity(room);
    out.push_str("{\"Body\":");
    push_json_str(&mut out, body);
    out.push_str(",\"BrokerProperties\":");
    props.write_broker_json(&mut out, Some(("ContentType", content_type)));
    out.push_str(",\"UserProperties\":{");
    for (i, (name, value)) in props.custom.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, &name.to_ascii_lowercase());
        out.push(':');
        push_json_str(&mut out, value);
    }
    out.push_str("}}");
    out
}

/// Group commit ([`crate::coalesce`]): alone at once on an idle lane; otherwise the message
/// waits, looking on its own timer, until its batch's leader has left it its outcome, or until
/// it is handed the lane and leads the next batch itself.
async fn coalesced<I: Io>(
    sb: &PreparedServiceBus,
    plan: &Plan<I::Bytes>,
    single: &Single,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    use crate::coalesce::{Entry, Flight, State, Waiter, STALE_MS};
    let lane = lane_of(&single.props);
    if let Entry::Alone = sb.lanes.enter(lane, io.now()) {
        // Whoever waits behind this send is handed the lane when it ends, even if this
        // request's caller has gone by then.
        io.hold();
        let mut flight = Flight::new(&sb.lanes, lane, Vec::new(), io.now());
        let sent = send_alone(sb, plan, bearer, cx, io).await;
        flight.ended(io.now());
        return sent;
    }
    let Some(element) = element_of(plan, single, io) else {
        return send_alone(sb, plan, bearer, cx, io).await;
    };
    let me = Waiter::new(element, &cx.request_id, io.now());
    sb.lanes.queue(lane, me.clone());
    let mut overdue = 0;
    loop {
        match me.state() {
            State::Done(outcome) => return follow(sb, plan, &outcome, bearer, cx, io).await,
            State::Lead => return lead(sb, plan, lane, &me, bearer, cx, io).await,
            State::Queued { .. } => {
                if sb.lanes.take_over(lane, &me, io.now()) {
                    continue;
                }
            }
            State::InBatch { since } if io.now() - since > STALE_MS => {
                let orphaned = crate::coalesce::Outcome {
                    size: 0,
                    leader: String::new(),
                    result: crate::coalesce::BatchResult::Orphaned,
                };
                return follow(sb, plan, &orphaned, bearer, cx, io).await;
            }
            State::InBatch { .. } => {}
        }
        // Its own timer: nothing another request does resumes this one.
        io.sleep(sb.lanes.poll_ms(lane, io.now(), &mut overdue))
            .await;
    }
}

/// The leader of a batch: it takes the waiters of its lane (itself first), sends them as one
/// batch in its own request's context (kept alive past its caller), and tells each what became
/// of it; its own answer comes from the same outcome.
async fn lead<I: Io>(
    sb: &PreparedServiceBus,
    plan: &Plan<I::Bytes>,
    lane: &str,
    me: &std::rc::Rc<crate::coalesce::Waiter>,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    use crate::coalesce::{batch_body, BatchResult, Flight, Outcome};
    if let Some(ms) = sb.config.linger_ms.filter(|&ms| ms > 0) {
        io.sleep(f64::from(ms)).await;
    }
    let batch = sb.lanes.take_batch(
        lane,
        me,
        sb.config.max_batch_messages(),
        sb.config.max_message_bytes(),
        io.now(),
    );
    io.hold();
    let mut flight = Flight::new(
        &sb.lanes,
        lane,
        batch.iter().skip(1).cloned().collect(),
        io.now(),
    );
    if batch.len() <= 1 {
        let sent = send_alone(sb, plan, bearer, cx, io).await;
        flight.ended(io.now());
        return sent;
    }
    let body = batch_body(&batch);
    let request = batch_request(sb);
    let sent = send_request(sb, &request, OutBody::Text(&body), true, bearer, cx, io).await;
    let result = match sent {
        Ok(reply) if reply.status == 201 => BatchResult::Accepted,
        Ok(_) => BatchResult::Alone,
        Err(problem) => BatchResult::Failed {
            problem,
            detail: cx.log.backend_detail.clone(),
            backend_status: cx.log.backend_status,
            retry_after: cx.log.retry_after,
        },
    };
    let outcome = std::rc::Rc::new(Outcome {
        size: batch.len(),
        leader: cx.request_id.clone(),
        result,
    });
    flight.finish(outcome.clone(), io.now());
    drop(flight);
    follow(sb, plan, &outcome, bearer, cx, io).await
}

/// A message's answer from its batch's outcome: accepted; sent again alone (its batch was
/// refused for something in one message, or its leader went away and the entity drops a resent
/// `MessageId`); or the batch's failure as its own.
async fn follow<I: Io>(
    sb: &PreparedServiceBus,
    plan: &Plan<I::Bytes>,
    outcome: &crate::coalesce::Outcome,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    use crate::coalesce::BatchResult;
    if outcome.size > 1 {
        cx.log.batch = Some((outcome.size, outcome.leader.clone()));
    }
    let led = outcome.leader == cx.request_id;
    match &outcome.result {
        BatchResult::Accepted => {
            // The batch's one send: counted once, by its leader.
            cx.log.batch_follower = !led;
            cx.log.backend_status = Some(201);
            Ok(Reply {
                status: 201,
                headers: Vec::new(),
                body: None,
            })
        }
        BatchResult::Alone => {
            if !led {
                cx.log.backend_detail = Some(format!(
                    "the batch of {} led by {} was refused as a whole; sent alone",
                    outcome.size, outcome.leader
                ));
            }
            send_alone(sb, plan, bearer, cx, io).await
        }
        BatchResult::Failed {
            problem,
            detail,
            backend_status,
            retry_after,
        } => {
            cx.log.batch_follower = !led;
            cx.log.backend_status = *backend_status;
            cx.log.backend_detail = detail.clone();
            cx.log.retry_after = *retry_after;
            Err(problem.clone())
        }
        BatchResult::Orphaned if resend_for(sb) == Resend::Safe => {
            cx.log.backend_detail =
                Some("its batch's leader went away before Azure answered; sent again alone".into());
            send_alone(sb, plan, bearer, cx, io).await
        }
        BatchResult::Orphaned => {
            cx.log.backend_detail =
                Some("its batch's leader went away before Azure answered; not sent again".into());
            Err(crate::backend::outcome_unknown(
                service_name(sb.flavor),
                "the request that sent it in a batch went away before the answer reached the gateway",
                true,
            ))
        }
    }
}

/// Phase 10: the caller's 202 with the message id(s), or for an event hub the number of events.
pub fn answer<B, S>(sb: &PreparedServiceBus, plan: &Plan<B>) -> crate::exchange::Answer<S> {
    let body = match sb.flavor {
        Flavor::ServiceBus => accepted_body(sb.config.entity(), &plan.ids, sb.config.batch),
        Flavor::EventHubs => events_accepted_body(sb.config.entity(), plan.ids.len()),
    };
    crate::exchange::Answer::json(202, body)
}

/// Store-and-forward: the send as built (its `MessageId`s in `BrokerProperties` or the batch),
/// for Service Bus only: an event hub has no duplicate detection, so a second delivery would
/// be a second event.
pub fn stored<'p, B>(
    sb: &PreparedServiceBus,
    plan: &'p Plan<B>,
) -> Option<crate::exchange::StoredPlan<'p, B>> {
    if sb.flavor != Flavor::ServiceBus {
        return None;
    }
    let body = match &plan.payload {
        Payload::Bytes(b) => OutBody::Bytes(b),
        Payload::Text(t) => OutBody::Text(t),
        Payload::Empty => OutBody::Text(""),
    };
    Some(crate::exchange::StoredPlan {
        request: &plan.request,
        body,
        ids: plan.ids.clone(),
    })
}

/// Store-and-forward's delivery: the stored send, when it is one `sb` (of route `route`) sends
/// today: `POST` to exactly its entity, the headers a send of its carries (a batch: only its
/// content type; a message: its content type, `BrokerProperties` with the properties its mapping
/// and the gateway set and a `MessageId`, so that Service Bus drops a second delivery, and the
/// mapping's application properties). Otherwise why not.
pub fn stored_request(
    sb: &PreparedServiceBus,
    route: &str,
    stored: &crate::store::Stored,
) -> Result<BackendRequest, String> {
    use crate::store::shown;
    if sb.flavor != Flavor::ServiceBus {
        return Err(format!(
            "route \"{route}\" sends to an event hub, which cannot take a stored request"
        ));
    }
    let method = stored.method_is("POST", route)?;
    if stored.url != sb.send_url {
        return Err(format!(
            "its URL is {}; route \"{route}\" sends to {}",
            shown(&stored.url),
            sb.send_url
        ));
    }
    let headers = if sb.config.batch {
        let headers = stored.headers_within(&|name| name == "content-type", route)?;
        if stored.header("content-type") != Some(BATCH_CONTENT_TYPE) {
            return Err(format!(
                "its Content-Type is not {BATCH_CONTENT_TYPE}, which the batch route \"{route}\" sends"
            ));
        }
        headers
    } else {
        let mapped = |name: &str| {
            name == "content-type"
                || name == "brokerproperties"
                || sb
                    .message
                    .properties
                    .iter()
                    .any(|(p, _)| p.eq_ignore_ascii_case(name))
        };
        let headers = stored.headers_within(&mapped, route)?;
        check_stored_broker(sb, route, stored.header("brokerproperties"))?;
        headers
    };
    Ok(BackendRequest {
        method,
        url: sb.send_url.clone(),
        headers,
        ..Default::default()
    })
}

/// A stored message's `BrokerProperties`: a JSON object with a `MessageId`, and no property the
/// route's mapping and the gateway do not set (`TimeToLive` the route's own).
fn check_stored_broker(
    sb: &PreparedServiceBus,
    route: &str,
    broker: Option<&str>,
) -> Result<(), String> {
    let lacks = "it has no BrokerProperties with a MessageId, so Service Bus could not drop a second delivery";
    let Some(Value::Object(broker)) = broker.and_then(|b| serde_json::from_str(b).ok()) else {
        return Err(lacks.to_owned());
    };
    let id = broker.get("MessageId").and_then(Value::as_str);
    if id.is_none_or(str::is_empty) {
        return Err(lacks.to_owned());
    }
    for (name, value) in &broker {
        let allowed = match name.as_str() {
            "MessageId" | "CorrelationId" => true,
            "TimeToLive" => sb
                .message
                .time_to_live
                .is_some_and(|ttl| value.as_u64() == Some(ttl)),
            other => sb.message.broker.iter().any(|(b, _)| b == other),
        };
        if !allowed {
            return Err(format!(
                "its BrokerProperties set {} as route \"{route}\" does not",
                crate::store::shown(name)
            ));
        }
    }
    Ok(())
}

/// The caller's 202 for a stored send: the message id(s) it will carry.
pub fn queued<B, S>(sb: &PreparedServiceBus, plan: &Plan<B>) -> crate::exchange::Answer<S> {
    let body = ids_body("queued", sb.config.entity(), &plan.ids, sb.config.batch);
    crate::exchange::Answer::json(202, body)
}

/// The caller's 202 for events: Event Hubs answers 201 without ids, so there are none to give.
pub fn events_accepted_body(hub: &str, count: usize) -> String {
    // Keys in the order serde_json's map writes them (sorted), as the other answers.
    #[derive(serde::Serialize)]
    struct Events<'a> {
        count: usize,
        hub: &'a str,
        status: &'static str,
    }
    let body = Events {
        count,
        hub,
        status: "accepted",
    };
    serde_json::to_string(&body).unwrap_or_default()
}

/// The caller's 202.
pub fn accepted_body(entity: &str, ids: &[String], batch: bool) -> String {
    ids_body("accepted", entity, ids, batch)
}

/// `{"entity", "messageId"}` (one message; null when it has none) or `{"entity",
/// "messageIds"}` (a batch) and `"status"`, keys sorted: written straight from the values, no
/// JSON map built on the way (this is every send's answer).
fn ids_body(status: &'static str, entity: &str, ids: &[String], batch: bool) -> String {
    #[derive(serde::Serialize)]
    struct One<'a> {
        entity: &'a str,
        #[serde(rename = "messageId")]
        message_id: Option<&'a String>,
        status: &'static str,
    }
    #[derive(serde::Serialize)]
    struct Many<'a> {
        entity: &'a str,
        #[serde(rename = "messageIds")]
        message_ids: &'a [String],
        status: &'static str,
    }
    let body = if batch {
        serde_json::to_string(&Many {
            entity,
            message_ids: ids,
            status,
        })
    } else {
        serde_json::to_string(&One {
            entity,
            message_id: ids.first(),
            status,
        })
    };
    body.unwrap_or_default()
}

/// What Service Bus's answer means.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    Accepted,
    /// Throttled or failing: worth a retry with the same message (and `MessageId`).
    Retry {
        retry_after_secs: Option<u64>,
    },
    /// Final; `evict`: the token was refused (401) and must leave the cache. `detail`: Service
    /// Bus's own reason, for the gateway's log line only.
    Failed {
        problem: Problem,
        evict: bool,
        detail: String,
    },
}

/// Service Bus's answer as the caller's. Its error body is never copied into the caller's
/// problem (it names the namespace, tracking ids and at times the values sent); the caller
/// gets what it can act on, and the operator finds Service Bus's reason in the log line of the
/// same request id.
pub fn map_response(
    status: u16,
    retry_after_secs: Option<u64>,
    body: &str,
    entity: &str,
) -> SendOutcome {
    map_response_for(Flavor::ServiceBus, status, retry_after_secs, body, entity)
}

/// [`map_response`] for a Service Bus entity or an event hub (same statuses, their own names).
pub fn map_response_for(
    flavor: Flavor,
    status: u16,
    retry_after_secs: Option<u64>,
    body: &str,
    entity: &str,
) -> SendOutcome {
    let failed = |problem: Problem| SendOutcome::Failed {
        problem: problem.with_extension("backend_status", json!(status)),
        evict: status == 401,
        detail: error_detail(body),
    };
    let (service, role, what) = match flavor {
        Flavor::ServiceBus => (
            "Service Bus",
            "Azure Service Bus Data Sender",
            "queue or topic",
        ),
        Flavor::EventHubs => ("Event Hubs", "Azure Event Hubs Data Sender", "event hub"),
    };
    let see_log = format!("{service}'s reason is in the gateway's log under this request id");
    let (refused, identity_refused, missing, too_large, error) = match flavor {
        Flavor::ServiceBus => (
            "Service Bus refused the message",
            "Service Bus refused the gateway's identity",
            "The Service Bus entity does not exist",
            "Service Bus refused the message as too large; send a smaller body or fewer properties.",
            "Service Bus refused the request",
        ),
        Flavor::EventHubs => (
            "Event Hubs refused the event",
            "Event Hubs refused the gateway's identity",
            "The event hub does not exist",
            "Event Hubs refused the event as too large; send a smaller body or fewer properties.",
            "Event Hubs refused the request",
        ),
    };
    match status {
        201 => SendOutcome::Accepted,
        429 | 500 | 502 | 503 | 504 => SendOutcome::Retry { retry_after_secs },
        400 => failed(Problem::new(400, "bad-message", refused, format!("{service} answered 400: it refused something in the message that the gateway's own checks let through ({see_log}). Check the message's properties and body; nothing was accepted."))),
        401 | 403 => failed(Problem::new(
            502,
            "backend-authorization-failed",
            identity_refused,
            format!("{service} answered {status}. The identity's token may have the wrong audience or lack the {role} role on '{entity}' (403 can also mean a quota is exceeded); the operator should check them ({see_log})."),
        )),
        404 | 410 => failed(Problem::new(
            502,
            "backend-entity-not-found",
            missing,
            format!("{service} has no {what} '{entity}' (it answered {status}); the operator should create it or fix the route."),
        )),
        413 => failed(Problem::new(413, "body-too-large", "Message too large", too_large)),
        _ => failed(Problem::new(502, "backend-error", error, format!("{service} answered {status} ({see_log})."))),
    }
}

/// After the last retry: 503 with the last `Retry-After` (or 5 s).
pub fn unavailable(retry_after_secs: Option<u64>, why: &str) -> Problem {
    unavailable_for(Flavor::ServiceBus, retry_after_secs, why)
}

/// [`unavailable`] for a Service Bus entity or an event hub.
pub fn unavailable_for(flavor: Flavor, retry_after_secs: Option<u64>, why: &str) -> Problem {
    let (service, title) = match flavor {
        Flavor::ServiceBus => ("Service Bus", "Service Bus is unavailable"),
        Flavor::EventHubs => ("Event Hubs", "Event Hubs is unavailable"),
    };
    Problem::new(503, "backend-unavailable", title, format!("{service} {why} after retries; nothing was accepted. Retry after the time in Retry-After."))
        .with_header("retry-after", crate::retry::caller_retry_after(retry_after_secs).to_string())
}

/// The human part of Service Bus's XML error (`<Detail>…</Detail>`), without tracking ids.
fn error_detail(body: &str) -> String {
    let detail = body
        .split_once("<Detail>")
        .and_then(|(_, rest)| rest.split_once("</Detail>"))
        .map(|(d, _)| d)
        .unwrap_or("no reason given");
    super::log_detail(detail.split(" TrackingId:").next().unwrap_or(detail))
}

impl Backend for PreparedServiceBus {
    type Plan<B> = Plan<B>;

    async fn build<I: Io>(&self, cx: &mut Cx<'_>, io: &I) -> Result<Self::Plan<I::Bytes>, Problem> {
        build(self, cx, io).await
    }

    async fn send<I: Io>(
        &self,
        plan: &Self::Plan<I::Bytes>,
        bearer: &Bearer<'_>,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Reply<I::Stream>, Problem> {
        send(self, plan, bearer, cx, io).await
    }

    fn answer<B, S>(&self, plan: &Self::Plan<B>, _reply: Reply<S>, _cx: &Cx<'_>) -> Answer<S> {
        answer(self, plan)
    }

    fn request<'p, B>(&self, plan: &'p Self::Plan<B>) -> &'p BackendRequest {
        plan.request()
    }

    fn stored<'p, B>(&self, plan: &'p Self::Plan<B>) -> Option<StoredPlan<'p, B>> {
        stored(self, plan)
    }

    fn queued<B, S>(&self, plan: &Self::Plan<B>) -> Answer<S> {
        queued(self, plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_element_holds_each_caller_value_as_a_string_whatever_it_contains() {
        let nasty = [
            "\"}],[{\"Body\":\"x\"}]",
            "\\\"",
            "\u{0}\u{1f}\u{7f}\u{2028}\u{2029}",
            "ünïcödé 😀",
            "]}",
            "",
            "\n\r\t",
        ];
        for (i, value) in nasty.iter().enumerate() {
            let mut broker = Map::new();
            broker.insert("MessageId".into(), Value::from(*value));
            broker.insert("TimeToLive".into(), Value::from(60));
            let props = Properties {
                broker,
                custom: vec![("Tenant".into(), (*value).to_owned())],
            };
            let text = element_json(value, &props, value);
            let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{i}: {e}"));
            let expected = json!({
                "Body": value,
                "BrokerProperties": { "MessageId": value, "TimeToLive": 60, "ContentType": value },
                "UserProperties": { "tenant": value },
            });
            assert_eq!(parsed, expected, "{i}");
        }
    }

    #[test]
    fn answers_are_the_json_callers_read() {
        let ids = ["m-1".to_owned(), "m-\"2".to_owned()];
        assert_eq!(
            accepted_body("orders", &ids[..1], false),
            r#"{"entity":"orders","messageId":"m-1","status":"accepted"}"#
        );
        assert_eq!(
            accepted_body("orders", &ids, true),
            r#"{"entity":"orders","messageIds":["m-1","m-\"2"],"status":"accepted"}"#
        );
        assert_eq!(
            accepted_body("orders", &[], false),
            r#"{"entity":"orders","messageId":null,"status":"accepted"}"#
        );
        assert_eq!(
            events_accepted_body("telemetry", 3),
            r#"{"count":3,"hub":"telemetry","status":"accepted"}"#
        );
        // The same document serde_json's map wrote before (sorted keys).
        let reference = json!({ "status": "accepted", "entity": "orders", "messageIds": ids });
        assert_eq!(accepted_body("orders", &ids, true), reference.to_string());
    }
    use crate::policy::MessageMapping;

    fn prep(m: &MessageMapping) -> PreparedMessage {
        PreparedMessage::from_mapping(m).unwrap()
    }

    fn mapping() -> MessageMapping {
        MessageMapping {
            session_id: Some("{path.tenant}".into()),
            label: Some("order-created".into()),
            time_to_live: Some(3600),
            properties: [
                ("tenant".to_owned(), "{path.tenant}".to_owned()),
                ("source".to_owned(), "edge".to_owned()),
            ]
            .into(),
            ..MessageMapping::default()
        }
    }

    fn with_ctx<T>(tenant: &str, f: impl FnOnce(&RenderContext) -> T) -> T {
        let path = vec![("tenant".to_owned(), tenant.to_owned())];
        let header = |_: &str| None;
        let uuid = || "generated-id".to_owned();
        let ctx = RenderContext {
            path: &path,
            query: &[],
            header: &header,
            request_id: "req-1",
            uuid: &uuid,
            now_ms: 0.0,
            jwt: None,
            body: None,
        };
        f(&ctx)
    }

    fn defaults(key: Option<&'static str>, traceparent: Option<&'static str>) -> Defaults<'static> {
        Defaults {
            idempotency_key: key,
            traceparent,
            request_id: "req-1",
        }
    }

    #[test]
    fn mapping_and_defaults_fill_broker_and_custom_properties() {
        let p = with_ctx("contoso", |ctx| {
            properties(
                &prep(&mapping()),
                ctx,
                &defaults(Some("idem-9"), None),
                None,
            )
        })
        .unwrap();
        assert_eq!(
            Value::Object(p.broker.clone()),
            json!({"SessionId": "contoso", "Label": "order-created", "TimeToLive": 3600, "MessageId": "idem-9", "CorrelationId": "req-1"})
        );
        assert_eq!(
            p.custom,
            vec![
                ("source".to_owned(), "edge".to_owned()),
                ("tenant".to_owned(), "contoso".to_owned())
            ]
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = with_ctx("c", |ctx| {
            properties(
                &PreparedMessage::default(),
                ctx,
                &defaults(None, Some(tp)),
                None,
            )
        })
        .unwrap();
        assert_eq!(p.message_id(), "generated-id");
        assert_eq!(
            p.broker["CorrelationId"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let p = with_ctx("c", |ctx| {
            properties(
                &PreparedMessage::default(),
                ctx,
                &defaults(None, Some("garbage")),
                None,
            )
        })
        .unwrap();
        assert_eq!(p.broker["CorrelationId"], "req-1");
    }

    #[test]
    fn service_bus_rules_are_checked_before_sending() {
        let long = "x".repeat(129);
        let p = with_ctx(&long, |ctx| {
            properties(&prep(&mapping()), ctx, &defaults(None, None), None)
        })
        .unwrap_err();
        assert_eq!((p.status, p.kind), (400, "bad-message"));
        assert!(
            p.detail
                .contains("SessionId must be 1 to 128 characters, got 129"),
            "{}",
            p.detail
        );
        let m = MessageMapping {
            partition_key: Some("other".into()),
            ..mapping()
        };
        let p = with_ctx("contoso", |ctx| {
            properties(&prep(&m), ctx, &defaults(None, None), None)
        })
        .unwrap_err();
        assert!(p
            .detail
            .contains("SessionId and PartitionKey must be equal"));
        let m = MessageMapping {
            scheduled_enqueue_time_utc: Some("tomorrow".into()),
            ..MessageMapping::default()
        };
        let p = with_ctx("c", |ctx| {
            properties(&prep(&m), ctx, &defaults(None, None), None)
        })
        .unwrap_err();
        assert!(p.detail.contains("RFC 1123"));
        let m = MessageMapping {
            scheduled_enqueue_time_utc: Some("Sun, 06 Nov 1994 08:49:37 GMT".into()),
            ..MessageMapping::default()
        };
        assert!(with_ctx("c", |ctx| properties(
            &prep(&m),
            ctx,
            &defaults(None, None),
            None
        ))
        .is_ok());
        let m = MessageMapping {
            properties: [("big".to_owned(), "y".repeat(33 * 1024))].into(),
            ..MessageMapping::default()
        };
        let p = with_ctx("c", |ctx| {
            properties(&prep(&m), ctx, &defaults(None, None), None)
        })
        .unwrap_err();
        assert!(p.detail.contains("one property may have at most 32768"));
        let p = with_ctx("ünï", |ctx| {
            properties(&prep(&mapping()), ctx, &defaults(None, None), None)
        })
        .unwrap_err();
        assert!(p.detail.contains("printable ASCII"));
    }

    #[test]
    fn a_batch_takes_defaults_per_element_and_names_a_bad_element() {
        let body = br#"[{"Body": "a"}, {"Body": {"n": 1}, "BrokerProperties": {"To": "own"}, "UserProperties": {"n": 1}}]"#;
        let (out, ids) = with_ctx("contoso", |ctx| {
            batch_body(body, &prep(&mapping()), ctx, &defaults(Some("k"), None))
        })
        .unwrap();
        assert_eq!(ids, vec!["k-0", "k-1"]);
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out[0]["Body"], "a");
        assert_eq!(out[1]["Body"], "{\"n\":1}");
        assert_eq!(out[1]["BrokerProperties"]["To"], "own");
        assert_eq!(out[1]["BrokerProperties"]["Label"], "order-created");
        assert_eq!(out[1]["BrokerProperties"]["SessionId"], "contoso");
        assert_eq!(out[1]["UserProperties"]["n"], "1");
        assert_eq!(out[0]["UserProperties"]["tenant"], "contoso");

        let bad = br#"[{"Body": "a"}, {"Body": "b"}, {"Body": "c", "BrokerProperties": {"SessionId": "x", "PartitionKey": "y"}}]"#;
        let p = with_ctx("c", |ctx| {
            batch_body(bad, &PreparedMessage::default(), ctx, &defaults(None, None))
        })
        .unwrap_err();
        assert_eq!(p.status, 400);
        assert!(
            p.detail.starts_with("batch[2].SessionId and PartitionKey"),
            "{}",
            p.detail
        );
        for (body, expected) in [
            (
                &br#"[{"Body": "a", "BrokerProperties": {"Color": "red"}}]"#[..],
                "batch[0].BrokerProperties.Color is not a property a sender may set",
            ),
            (
                br#"[{"Body": "a", "BrokerProperties": {"TimeToLive": "1h"}}]"#,
                "batch[0].BrokerProperties.TimeToLive must be a positive number",
            ),
            (br#"[{"Bod": "a"}]"#, "batch[0].Body is required"),
            (br#"[]"#, "non-empty JSON array"),
            (br#"{"Body": "a"}"#, "non-empty JSON array"),
        ] {
            let p = with_ctx("c", |ctx| {
                batch_body(
                    body,
                    &PreparedMessage::default(),
                    ctx,
                    &defaults(None, None),
                )
            })
            .unwrap_err();
            assert!(
                p.detail.contains(expected),
                "{} should contain {expected}",
                p.detail
            );
        }
    }

    #[test]
    fn a_batch_element_cannot_replace_what_the_route_maps() {
        // The route maps SessionId and the tenant property from the path (or a JWT claim): an
        // element that tries to send as another tenant is refused, whatever the letter case.
        for (element, field) in [
            (
                r#"{"Body": "a", "BrokerProperties": {"SessionId": "fabrikam"}}"#,
                "BrokerProperties.SessionId",
            ),
            (
                r#"{"Body": "a", "BrokerProperties": {"Label": "x"}}"#,
                "BrokerProperties.Label",
            ),
            (
                r#"{"Body": "a", "BrokerProperties": {"timetolive": 1}}"#,
                "BrokerProperties.timetolive",
            ),
            (
                r#"{"Body": "a", "UserProperties": {"tenant": "fabrikam"}}"#,
                "UserProperties.tenant",
            ),
            (
                r#"{"Body": "a", "UserProperties": {"Tenant": "fabrikam"}}"#,
                "UserProperties.Tenant",
            ),
        ] {
            let body = format!("[{{\"Body\": \"ok\"}}, {element}]");
            let p = with_ctx("contoso", |ctx| {
                batch_body(
                    body.as_bytes(),
                    &prep(&mapping()),
                    ctx,
                    &defaults(None, None),
                )
            })
            .unwrap_err();
            assert_eq!((p.status, p.kind), (400, "bad-message"));
            assert!(
                p.detail
                    .starts_with(&format!("batch[1].{field} is set by this route")),
                "{}",
                p.detail
            );
        }
        // What the route leaves unmapped, an element may set: its own MessageId and properties.
        let body = br#"[{"Body": "a", "BrokerProperties": {"MessageId": "own-id", "ReplyTo": "r"}, "UserProperties": {"color": "red"}}]"#;
        let (out, ids) = with_ctx("contoso", |ctx| {
            batch_body(body, &prep(&mapping()), ctx, &defaults(None, None))
        })
        .unwrap();
        assert_eq!(ids, vec!["own-id"]);
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out[0]["UserProperties"]["color"], "red");
        assert_eq!(out[0]["UserProperties"]["tenant"], "contoso");
    }

    #[test]
    fn requests_carry_the_token_properties_and_content_type() {
        let backend: ServiceBusBackend = serde_json::from_value(
            json!({"namespace": "contoso-orders", "queue": "orders", "identity": "gw"}),
        )
        .unwrap();
        let props = with_ctx("t", |ctx| {
            properties(&prep(&mapping()), ctx, &defaults(Some("m1"), None), None)
        })
        .unwrap();
        let prepared = PreparedServiceBus {
            send_url: format!(
                "{}/{}/messages",
                backend.base_url(crate::policy::Cloud::Public),
                backend.entity()
            ),
            token: crate::policy::prepared::TokenTarget {
                identity: "gw".into(),
                key: crate::identity::TokenKey {
                    token_url: "https://login.example/token".into(),
                    client_id: "c".into(),
                    scope: "https://servicebus.azure.net/.default".into(),
                },
            },
            lanes: Default::default(),
            message: prep(&mapping()),
            config: (&backend).into(),
            flavor: Flavor::ServiceBus,
        };
        let r = single_request(&prepared, "application/json", props.broker_json(), &props);
        assert_eq!(
            r.url,
            "https://contoso-orders.servicebus.windows.net/orders/messages"
        );
        assert_eq!(r.header("authorization"), None, "the edge adds the token");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let broker: Value = serde_json::from_str(r.header("brokerproperties").unwrap()).unwrap();
        assert_eq!(broker["MessageId"], "m1");
        assert_eq!(r.header("tenant"), Some("t"));
        assert_eq!(
            batch_request(&prepared).header("content-type"),
            Some(BATCH_CONTENT_TYPE)
        );
    }

    #[test]
    fn answers_map_to_what_the_caller_can_act_on() {
        let xml = "<Error><Code>400</Code><Detail>The value for BrokerProperties is invalid. TrackingId:abc, SystemTracker:x</Detail></Error>";
        let SendOutcome::Failed {
            problem,
            evict,
            detail,
        } = map_response(400, None, xml, "orders")
        else {
            panic!()
        };
        assert_eq!((problem.status, evict), (400, false));
        // Service Bus's reason goes to the log, not to the caller.
        assert_eq!(detail, "The value for BrokerProperties is invalid");
        assert!(!problem.detail.contains("value for"), "{}", problem.detail);
        assert!(problem.detail.contains("log"), "{}", problem.detail);
        let SendOutcome::Failed { problem, evict, .. } = map_response(401, None, "", "orders")
        else {
            panic!()
        };
        assert_eq!(
            (problem.status, problem.kind, evict),
            (502, "backend-authorization-failed", true)
        );
        for status in [404, 410] {
            let SendOutcome::Failed { problem, .. } = map_response(status, None, "", "orders")
            else {
                panic!()
            };
            assert_eq!(
                (problem.status, problem.kind),
                (502, "backend-entity-not-found")
            );
        }
        let SendOutcome::Failed { problem, .. } = map_response(413, None, "", "orders") else {
            panic!()
        };
        assert_eq!(problem.status, 413);
        assert_eq!(
            map_response(429, Some(3), "", "orders"),
            SendOutcome::Retry {
                retry_after_secs: Some(3)
            }
        );
        assert_eq!(map_response(201, None, "", "orders"), SendOutcome::Accepted);
        assert_eq!(
            unavailable(Some(7), "x").headers,
            vec![("retry-after", "7".to_owned())]
        );
    }

    fn event_mapping(partition_key: Option<&str>) -> PreparedMessage {
        prep(&MessageMapping {
            partition_key: partition_key.map(str::to_owned),
            properties: [("site".to_owned(), "{path.tenant}".to_owned())].into(),
            ..MessageMapping::default()
        })
    }

    fn events(body: &str, mapping: &PreparedMessage) -> Result<(Value, Vec<String>), Problem> {
        with_ctx("north", |ctx| {
            batch_body_for(
                Flavor::EventHubs,
                body.as_bytes(),
                mapping,
                ctx,
                &defaults(Some("k"), None),
            )
        })
        .map(|(out, ids)| (serde_json::from_str(&out).unwrap(), ids))
    }

    #[test]
    fn an_event_gets_the_routes_partition_key_and_no_service_bus_defaults() {
        let p = with_ctx("north", |ctx| {
            properties_for(
                Flavor::EventHubs,
                &event_mapping(Some("dev-{path.tenant}")),
                ctx,
                &defaults(
                    Some("idem"),
                    Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                ),
                None,
            )
        })
        .unwrap();
        // Event Hubs neither deduplicates nor correlates: no MessageId, no CorrelationId.
        assert_eq!(
            Value::Object(p.broker.clone()),
            json!({"PartitionKey": "dev-north"})
        );
        assert_eq!(p.custom, vec![("site".to_owned(), "north".to_owned())]);
        let (out, ids) = events(
            r#"[{"Body": "a"}, {"Body": {"t": 1}}]"#,
            &event_mapping(Some("k1")),
        )
        .unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(out[0]["BrokerProperties"], json!({"PartitionKey": "k1"}));
        assert_eq!(out[1]["Body"], "{\"t\":1}");
        assert_eq!(out[1]["UserProperties"]["site"], "north");
        assert_eq!(
            events_accepted_body("telemetry", 2),
            r#"{"count":2,"hub":"telemetry","status":"accepted"}"#
        );
    }

    #[test]
    fn an_element_sets_its_own_partition_key_only_when_the_route_does_not() {
        let body = r#"[{"Body": "a", "BrokerProperties": {"PartitionKey": "own"}}]"#;
        let (out, _) = events(body, &event_mapping(None)).unwrap();
        assert_eq!(out[0]["BrokerProperties"]["PartitionKey"], "own");
        let p = events(body, &event_mapping(Some("route"))).unwrap_err();
        assert_eq!((p.status, p.kind), (400, "bad-message"));
        assert!(
            p.detail
                .starts_with("batch[0].BrokerProperties.PartitionKey is set by this route"),
            "{}",
            p.detail
        );
        assert_eq!(p.title, "The event would be refused by Event Hubs");
    }

    #[test]
    fn an_event_with_a_service_bus_only_property_is_refused() {
        for name in SERVICE_BUS_ONLY {
            let value = if *name == "TimeToLive" {
                "60".to_owned()
            } else if *name == "ForcePersistence" {
                "true".to_owned()
            } else {
                "\"x\"".to_owned()
            };
            let body = format!(
                r#"[{{"Body": "ok"}}, {{"Body": "a", "BrokerProperties": {{"{name}": {value}}}}}]"#
            );
            let p = events(&body, &event_mapping(None)).unwrap_err();
            assert_eq!(p.status, 400);
            assert!(
                p.detail.starts_with(&format!(
                    "batch[1].BrokerProperties.{name} is a Service Bus property"
                )),
                "{}",
                p.detail
            );
            assert!(
                p.detail.contains(
                    "may set MessageId, CorrelationId, PartitionKey, Label, To, ReplyTo;"
                ),
                "{}",
                p.detail
            );
        }
        // The same element is a valid Service Bus message.
        let body = r#"[{"Body": "a", "BrokerProperties": {"SessionId": "s"}}]"#;
        assert!(with_ctx("c", |ctx| batch_body(
            body.as_bytes(),
            &PreparedMessage::default(),
            ctx,
            &defaults(None, None)
        ))
        .is_ok());
        // What an event may carry besides its key passes.
        let ok = r#"[{"Body": "a", "BrokerProperties": {"MessageId": "m", "CorrelationId": "c", "Label": "l"}}]"#;
        assert!(events(ok, &event_mapping(None)).is_ok());
    }

    #[test]
    fn event_hubs_refusals_name_event_hubs() {
        let SendOutcome::Failed { problem, evict, .. } =
            map_response_for(Flavor::EventHubs, 401, None, "", "telemetry")
        else {
            panic!()
        };
        assert!(evict);
        assert_eq!(problem.title, "Event Hubs refused the gateway's identity");
        assert!(
            problem.detail.contains("Azure Event Hubs Data Sender"),
            "{}",
            problem.detail
        );
        let SendOutcome::Failed { problem, .. } =
            map_response_for(Flavor::EventHubs, 410, None, "", "telemetry")
        else {
            panic!()
        };
        assert!(
            problem.detail.contains("no event hub 'telemetry'"),
            "{}",
            problem.detail
        );
        assert!(
            !problem.detail.contains("Service Bus"),
            "{}",
            problem.detail
        );
        let p = unavailable_for(Flavor::EventHubs, None, "answered 503");
        assert_eq!((p.status, p.title), (503, "Event Hubs is unavailable"));
        assert_eq!(p.headers, vec![("retry-after", "5".to_owned())]);
    }

    #[test]
    fn broker_json_is_what_serde_json_writes() {
        let mut broker = Map::new();
        broker.insert(
            "MessageId".into(),
            Value::from("id \"quoted\" \\ \u{1}\n é ✓"),
        );
        broker.insert("Label".into(), Value::from(""));
        broker.insert("TimeToLive".into(), Value::from(90u64));
        broker.insert("ForcePersistence".into(), Value::from(true));
        let props = Properties {
            broker,
            custom: Vec::new(),
        };
        assert_eq!(
            props.broker_json(),
            serde_json::to_string(&props.broker).unwrap()
        );
        let empty = Properties {
            broker: Map::new(),
            custom: Vec::new(),
        };
        assert_eq!(empty.broker_json(), "{}");
    }
}
