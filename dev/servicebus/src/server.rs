//! The HTTP surface: Service Bus's REST send / receive / peek-lock routes behind Bearer-token
//! checks, Event Hubs' REST send (`/{hub}/messages`, `/{hub}/partitions/{id}/messages`) for
//! entities declared with `partitions=N`, Azure-shaped XML errors, and the unauthenticated
//! `/__control/*` routes for tests.

use std::io::Read;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::jwt::{AuthError, Authenticator, ClaimRules, EVENTHUBS_AUDIENCE};
use crate::message::{self, BrokerProperties, MessageError, NewMessage};
use crate::store::{Broker, Fault, Outage, Received};
use crate::util::{iso_seconds, unix_seconds, uuid_v4, xml_escape};

/// Receive waits at most this long, whatever `timeout` asks.
pub const MAX_RECEIVE_WAIT: Duration = Duration::from_secs(10);
/// Request bodies above this are refused unread (413); entities' limits are far below it.
const MAX_READ_BYTES: usize = 64 * 1024 * 1024;
/// What Service Bus answers as the Content-Type of a message sent without one (batch elements).
const DEFAULT_RECEIVE_CONTENT_TYPE: &str = "application/atom+xml;type=entry;charset=utf-8";
const XML: &str = "application/xml; charset=utf-8";

pub struct App {
    broker: Mutex<Broker>,
    arrived: Condvar,
    auth: Authenticator,
    /// Claims a queue's requests must carry (Service Bus audience).
    queue_rules: ClaimRules,
    /// Claims an event hub's requests must carry (Event Hubs audience).
    hub_rules: ClaimRules,
    /// For a send to an entity that does not exist: either audience, then 410.
    any_rules: ClaimRules,
    port: u16,
}

/// An answer before it is written.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// For the log line: the error code word, when the answer is an error.
    pub note: Option<String>,
}

impl Reply {
    fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: vec![],
            note: None,
        }
    }

    fn json(status: u16, value: &Value) -> Reply {
        Reply {
            status,
            headers: vec![(
                "Content-Type".into(),
                "application/json; charset=utf-8".into(),
            )],
            body: value.to_string().into_bytes(),
            note: None,
        }
    }
}

/// The parsed route of a non-control request.
#[derive(Debug, PartialEq)]
enum Route<'a> {
    Send(&'a str),
    /// Event Hubs' partition send: `POST /{hub}/partitions/{id}/messages`.
    PartitionSend {
        entity: &'a str,
        partition: &'a str,
    },
    Receive {
        entity: &'a str,
        peek_lock: bool,
    },
    Complete {
        entity: &'a str,
        sequence: &'a str,
        token: &'a str,
    },
    Unlock {
        entity: &'a str,
        sequence: &'a str,
        token: &'a str,
    },
    Unknown,
}

fn route<'a>(method: &str, path: &'a str) -> Route<'a> {
    let segments: Vec<&str> = path
        .trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .collect();
    match (method, segments.as_slice()) {
        ("POST", [entity, "messages"]) => Route::Send(entity),
        ("POST", [entity, "partitions", partition, "messages"]) => {
            Route::PartitionSend { entity, partition }
        }
        ("DELETE", [entity, "messages", "head"]) => Route::Receive {
            entity,
            peek_lock: false,
        },
        ("POST", [entity, "messages", "head"]) => Route::Receive {
            entity,
            peek_lock: true,
        },
        ("DELETE", [entity, "messages", sequence, token]) => Route::Complete {
            entity,
            sequence,
            token,
        },
        ("PUT", [entity, "messages", sequence, token]) => Route::Unlock {
            entity,
            sequence,
            token,
        },
        _ => Route::Unknown,
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `timeout`, when given, must be a whole number of seconds.
fn timeout_param(query: &str) -> Result<Option<u64>, String> {
    match query_param(query, "timeout") {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("The timeout '{v}' is not a whole number of seconds.")),
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl App {
    pub fn new(broker: Broker, port: u16, jwks_url: &str, issuer_prefix: &str) -> App {
        let namespace = format!("http://127.0.0.1:{port}");
        let queue_rules = ClaimRules::for_namespace(&namespace, issuer_prefix);
        let hub_rules = ClaimRules::for_event_hubs(&namespace, issuer_prefix);
        let mut any_rules = queue_rules.clone();
        any_rules.audiences.push(EVENTHUBS_AUDIENCE.to_string());
        App {
            broker: Mutex::new(broker),
            arrived: Condvar::new(),
            auth: Authenticator::new(jwks_url),
            queue_rules,
            hub_rules,
            any_rules,
            port,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Broker> {
        self.broker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entity's partition count when it is an event hub (None: a queue, or unknown).
    fn hub_partitions(&self, entity: &str) -> Option<u32> {
        self.lock()
            .entity_ref(entity)
            .and_then(|e| e.config.partitions)
    }

    /// The claims a request to `entity` must carry: Event Hubs' for an event hub, Service
    /// Bus's for a queue, either for an entity that does not exist (answered 410 next).
    fn rules_for(&self, entity: &str) -> &ClaimRules {
        match self.lock().entity_ref(entity) {
            Some(e) if e.config.is_event_hub() => &self.hub_rules,
            Some(_) => &self.queue_rules,
            None => &self.any_rules,
        }
    }

    /// Azure's error shape: `<Error><Code>status</Code><Detail>Code: message TrackingId:…,
    /// SystemTracker:…, Timestamp:…</Detail></Error>`.
    fn error(&self, status: u16, code: &str, message: &str, entity: Option<&str>) -> Reply {
        let tracker = match entity {
            Some(e) => format!("127.0.0.1:{}:{e}", self.port),
            None => "NoSystemTracker".to_string(),
        };
        let detail = format!(
            "{code}: {message} TrackingId:{}_G0, SystemTracker:{tracker}, Timestamp:{}",
            uuid_v4(),
            iso_seconds(SystemTime::now())
        );
        let body = format!(
            "<Error><Code>{status}</Code><Detail>{}</Detail></Error>",
            xml_escape(&detail)
        );
        Reply {
            status,
            headers: vec![("Content-Type".into(), XML.into())],
            body: body.into_bytes(),
            note: Some(code.to_string()),
        }
    }

    fn auth_error(&self, e: &AuthError, entity: Option<&str>) -> Reply {
        self.error(401, e.code, &e.message, entity)
    }

    fn message_error(&self, e: &MessageError, entity: &str) -> Reply {
        self.error(e.status, e.code, &e.message, Some(entity))
    }

    /// Answer one request. `body` is the whole request body.
    pub fn handle(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
        log: &dyn Fn(&str),
    ) -> Reply {
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        if let Some(rest) = path.strip_prefix("/__control/") {
            return self.control(method, rest.trim_end_matches('/'), &body);
        }
        {
            let mut broker = self.lock();
            broker.requests += 1;
            broker.bytes_received += body.len() as u64;
        }
        let mut route = route(method, path);
        // A full outage answers every request alike, before its token or body is looked at.
        let outage = self.lock().active_outage(Instant::now());
        if let Some(outage) = outage {
            let entity = match route {
                Route::Send(entity) | Route::PartitionSend { entity, .. } => Some(entity),
                _ => None,
            };
            if let Some(name) = entity {
                self.note_refused(name, query, headers, &body);
                if let Some(target) = self.lock().entity(name) {
                    target.reject(outage.status);
                }
            }
            return self.outage_reply(&outage, entity);
        }
        // The partition route exists on event hubs only; on a queue it is any unknown path.
        if let Route::PartitionSend { entity, .. } = route {
            if self.hub_partitions(entity).is_none() {
                route = Route::Unknown;
            }
        }
        let send_to = match route {
            Route::Send(entity) => Some((entity, None)),
            Route::PartitionSend { entity, partition } => Some((entity, Some(partition))),
            _ => None,
        };
        if let Some((entity, partition)) = send_to {
            let reply = self.send(entity, partition, query, headers, body, log);
            if reply.status >= 400 {
                if let Some(e) = self.lock().entity(entity) {
                    e.reject(reply.status);
                }
            }
            return reply;
        }
        // Receive and settle name their entity; an event hub's are checked with its audience and
        // then refused: Event Hubs has no REST receive.
        let target = match route {
            Route::Receive { entity, .. }
            | Route::Complete { entity, .. }
            | Route::Unlock { entity, .. } => Some(entity),
            _ => None,
        };
        let rules = match target {
            Some(entity) if self.hub_partitions(entity).is_some() => &self.hub_rules,
            _ => &self.queue_rules,
        };
        if let Err(e) = self.auth.authenticate(
            header(headers, "authorization"),
            rules,
            unix_seconds(SystemTime::now()),
            log,
        ) {
            return self.auth_error(&e, None);
        }
        if target.is_some_and(|entity| self.hub_partitions(entity).is_some()) {
            route = Route::Unknown;
        }
        match route {
            Route::Receive { entity, peek_lock } => self.receive(entity, peek_lock, query),
            Route::Complete {
                entity,
                sequence,
                token,
            } => self.settle(entity, sequence, token, true),
            Route::Unlock {
                entity,
                sequence,
                token,
            } => self.settle(entity, sequence, token, false),
            Route::Send(_) | Route::PartitionSend { .. } | Route::Unknown => self.error(
                404,
                "NotFound",
                &format!("No operation {method} {path} is supported here."),
                None,
            ),
        }
    }

    fn unknown_entity(&self, entity: &str) -> Reply {
        self.lock().unknown_entity += 1;
        self.error(
            410,
            "EntityNotFound",
            &format!(
                "The messaging entity '127.0.0.1:{}:{entity}' could not be found.",
                self.port
            ),
            Some(entity),
        )
    }

    /// A send refused before anything was stored (a fault, an outage): the ledger still records
    /// what arrived, when the body parses.
    fn note_refused(&self, entity: &str, query: &str, headers: &[(String, String)], body: &[u8]) {
        let Some(max_size) = self.lock().entity_ref(entity).map(|e| e.config.max_size) else {
            return;
        };
        if let Ok(messages) = parse_send(query, headers, body.to_vec(), max_size, None) {
            let ids = message_ids(&messages);
            if let Some(e) = self.lock().entity(entity) {
                e.note_refused(&ids);
            }
        }
    }

    /// A send to a queue, or to an event hub (`partition`: the id in a partition send's path).
    fn send(
        &self,
        entity: &str,
        partition: Option<&str>,
        query: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
        log: &dyn Fn(&str),
    ) -> Reply {
        let fault = self.lock().take_fault(entity);
        let stored_fault = fault.as_ref().filter(|f| f.after_store);
        if let Some(fault) = fault.as_ref().filter(|f| !f.after_store) {
            if fault.delay_ms > 0 {
                std::thread::sleep(Duration::from_millis(fault.delay_ms));
            }
            if let Some(status) = fault.status {
                self.note_refused(entity, query, headers, &body);
                self.lock().faults_before_store += 1;
                return self.fault_reply(fault, status, entity);
            }
        }
        if let Err(e) = self.auth.authenticate(
            header(headers, "authorization"),
            self.rules_for(entity),
            unix_seconds(SystemTime::now()),
            log,
        ) {
            return self.auth_error(&e, Some(entity));
        }
        let Some((max_size, partitions)) = self
            .lock()
            .entity_ref(entity)
            .map(|e| (e.config.max_size, e.config.partitions))
        else {
            return self.unknown_entity(entity);
        };
        let hub = match (partitions, partition) {
            (None, _) => None,
            (Some(_), None) => Some(HubSend { partition: None }),
            (Some(count), Some(id)) => match parse_partition(id, count) {
                Ok(p) => Some(HubSend { partition: Some(p) }),
                Err(e) => return self.message_error(&e, entity),
            },
        };
        let messages = match parse_send(query, headers, body, max_size, hub.as_ref()) {
            Ok(m) => m,
            Err(e) => return self.message_error(&e, entity),
        };
        let ids = message_ids(&messages);
        let mut broker = self.lock();
        let Some(target) = broker.entity(entity) else {
            return self.unknown_entity(entity);
        };
        match hub {
            Some(hub) => {
                target.enqueue_events(messages, hub.partition, SystemTime::now());
            }
            None => {
                target.enqueue(messages, SystemTime::now(), Instant::now());
            }
        }
        target.note_answered(&ids, stored_fault.is_none());
        if stored_fault.is_some() {
            broker.faults_after_store += 1;
        }
        drop(broker);
        self.arrived.notify_all();
        if let Some(fault) = stored_fault {
            // Stored, and now the answer is lost: late, and an error.
            if fault.stored_delay_ms > 0 {
                std::thread::sleep(Duration::from_millis(fault.stored_delay_ms));
            }
            return self.fault_reply(fault, fault.stored_status.unwrap_or(500), entity);
        }
        Reply::empty(201)
    }

    fn fault_reply(&self, fault: &Fault, status: u16, entity: &str) -> Reply {
        let (code, message) = match status {
            429 => ("Throttled", "The request was throttled (injected fault)."),
            500 => (
                "InternalServerError",
                "An internal error occurred (injected fault).",
            ),
            503 => (
                "ServerBusy",
                "The server is busy. Please retry the operation (injected fault).",
            ),
            _ => ("InjectedFault", "Injected fault."),
        };
        let mut reply = self.error(status, code, message, Some(entity));
        if let Some(after) = fault.retry_after {
            reply
                .headers
                .push(("Retry-After".into(), after.to_string()));
        }
        reply
    }

    fn outage_reply(&self, outage: &Outage, entity: Option<&str>) -> Reply {
        let (code, message) = match outage.status {
            503 => (
                "ServerBusy",
                "The service is unavailable (injected outage). Please retry the operation.",
            ),
            _ => ("InjectedOutage", "Injected outage."),
        };
        let mut reply = self.error(outage.status, code, message, entity);
        if let Some(after) = outage.retry_after {
            reply
                .headers
                .push(("Retry-After".into(), after.to_string()));
        }
        reply
    }

    fn receive(&self, entity: &str, peek_lock: bool, query: &str) -> Reply {
        let wait = match timeout_param(query) {
            Ok(t) => Duration::from_secs(t.unwrap_or(0)).min(MAX_RECEIVE_WAIT),
            Err(e) => return self.error(400, "BadRequest", &e, Some(entity)),
        };
        let deadline = Instant::now() + wait;
        let mut broker = self.lock();
        loop {
            let Some(target) = broker.entity(entity) else {
                drop(broker);
                return self.unknown_entity(entity);
            };
            if let Some(received) = target.take(peek_lock, SystemTime::now(), Instant::now()) {
                let name = target.config.name.clone();
                drop(broker);
                return received_reply(&name, received, peek_lock);
            }
            let now = Instant::now();
            if now >= deadline {
                return Reply::empty(204);
            }
            // Wake at least every 250 ms: scheduled messages become due without a send.
            let step = (deadline - now).min(Duration::from_millis(250));
            broker = self
                .arrived
                .wait_timeout(broker, step)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn settle(&self, entity: &str, sequence: &str, token: &str, complete: bool) -> Reply {
        let mut broker = self.lock();
        let Some(target) = broker.entity(entity) else {
            drop(broker);
            return self.unknown_entity(entity);
        };
        let done = sequence.parse::<u64>().is_ok_and(|seq| {
            if complete {
                target.complete(seq, token, Instant::now())
            } else {
                target.unlock(seq, token, Instant::now())
            }
        });
        drop(broker);
        if done {
            if !complete {
                self.arrived.notify_all();
            }
            Reply::empty(200)
        } else {
            self.error(
                404,
                "MessageLockLost",
                "The lock supplied is invalid: it expired, or the message was already settled.",
                Some(entity),
            )
        }
    }

    fn control(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        let mut broker = self.lock();
        match (method, path) {
            ("GET", "stats") => Reply::json(200, &broker.stats()),
            ("DELETE", "stats") => {
                broker.reset_stats();
                Reply::json(200, &broker.stats())
            }
            ("GET", "faults") => Reply::json(200, &json!({ "fault": broker.fault })),
            ("DELETE", "faults") => {
                broker.fault = None;
                Reply::json(200, &json!({ "fault": null }))
            }
            ("POST", "faults") => match Fault::parse(body) {
                Ok(fault) => {
                    broker.fault = Some(fault);
                    Reply::json(200, &json!({ "fault": broker.fault }))
                }
                Err(e) => Reply::json(400, &json!({ "error": e })),
            },
            ("GET", "outage") => {
                let now = Instant::now();
                let outage = broker
                    .outage
                    .as_ref()
                    .filter(|o| now < o.until)
                    .map(|o| o.describe(now));
                Reply::json(200, &json!({ "outage": outage }))
            }
            ("DELETE", "outage") => {
                broker.outage = None;
                Reply::json(200, &json!({ "outage": null }))
            }
            ("POST", "outage") => match Outage::parse(body, Instant::now()) {
                Ok(outage) => {
                    let shown = outage.describe(Instant::now());
                    broker.outage = Some(outage);
                    Reply::json(200, &json!({ "outage": shown }))
                }
                Err(e) => Reply::json(400, &json!({ "error": e })),
            },
            ("DELETE", "messages") => {
                broker.purge();
                Reply::json(200, &broker.stats())
            }
            ("GET", p) if p.starts_with("arrivals/") => {
                let name = &p["arrivals/".len()..];
                match broker.entity_ref(name) {
                    Some(e) => Reply::json(200, &json!(e.arrivals())),
                    None => Reply::json(404, &json!({ "error": format!("no entity {name}") })),
                }
            }
            ("GET", p) if p.starts_with("messages/") => {
                let name = &p["messages/".len()..];
                match broker.entity_ref(name) {
                    Some(e) => Reply::json(
                        200,
                        &Value::Array(
                            e.snapshot()
                                .into_iter()
                                .map(|(m, state)| {
                                    let user: Map<String, Value> = m
                                        .user
                                        .iter()
                                        .map(|(n, v)| (n.clone(), Value::String(v.clone())))
                                        .collect();
                                    let mut stored = json!({
                                        "sequenceNumber": m.sequence_number,
                                        "state": state,
                                        "body": STANDARD.encode(&m.body),
                                        "contentType": m.content_type,
                                        "brokerProperties": m.broker_json(None),
                                        "userProperties": user,
                                    });
                                    if let Some(p) = m.partition {
                                        stored["partitionId"] = p.to_string().into();
                                    }
                                    stored
                                })
                                .collect(),
                        ),
                    ),
                    None => Reply::json(404, &json!({ "error": format!("no entity {name}") })),
                }
            }
            _ => Reply::json(
                404,
                &json!({ "error": format!("no control route {method} /__control/{path}") }),
            ),
        }
    }
}

/// A send to an event hub: the partition named in the path, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
struct HubSend {
    partition: Option<u32>,
}

/// A partition id of a partition send: a decimal number below the hub's partition count.
/// The MessageId of each message of a send (None where the sender gave none).
fn message_ids(messages: &[NewMessage]) -> Vec<Option<String>> {
    messages
        .iter()
        .map(|m| m.broker.message_id.clone())
        .collect()
}

fn parse_partition(id: &str, count: u32) -> Result<u32, MessageError> {
    match id.parse::<u32>() {
        Ok(p) if p < count && id == p.to_string() => Ok(p),
        _ => Err(MessageError {
            status: 400,
            code: "BadRequest",
            message: format!(
                "The partition '{id}' does not exist: the event hub has partitions 0 to {}.",
                count - 1
            ),
        }),
    }
}

/// Validate a send request into the messages to store (one, or a batch). For an event hub
/// (`hub`), broker properties are also checked against what Event Hubs has.
fn parse_send(
    query: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    max_size: usize,
    hub: Option<&HubSend>,
) -> Result<Vec<NewMessage>, MessageError> {
    let messages = parse_send_messages(query, headers, body, max_size)?;
    if let Some(hub) = hub {
        let batch =
            messages.len() > 1 || message::is_batch_content_type(header(headers, "content-type"));
        for (i, m) in messages.iter().enumerate() {
            let what = if batch {
                format!("Batch message {i}: BrokerProperties")
            } else {
                "The BrokerProperties header".to_string()
            };
            message::check_event_properties(&m.broker, &what, hub.partition.is_some())?;
        }
    }
    Ok(messages)
}

fn parse_send_messages(
    query: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    max_size: usize,
) -> Result<Vec<NewMessage>, MessageError> {
    let bad = |message: String| MessageError {
        status: 400,
        code: "BadRequest",
        message,
    };
    timeout_param(query).map_err(bad)?;
    message::check_header_sizes(headers)?;
    let content_type = header(headers, "content-type");
    if message::is_batch_content_type(content_type) {
        message::check_size(body.len(), max_size, "batch")?;
        let batch = message::parse_batch(&body)?;
        for (i, m) in batch.iter().enumerate() {
            message::check_size(m.size(), max_size, &format!("batch message {i}"))?;
        }
        return Ok(batch);
    }
    let broker = match header(headers, "brokerproperties") {
        Some(text) => BrokerProperties::parse_header(text)?,
        None => BrokerProperties::default(),
    };
    let user = message::properties_from_headers(headers)?;
    let m = NewMessage {
        body,
        content_type: content_type.map(String::from),
        broker,
        user,
    };
    message::check_size(m.size(), max_size, "message")?;
    Ok(vec![m])
}

fn received_reply(entity: &str, (message, lock): Received, peek_lock: bool) -> Reply {
    let broker =
        Value::Object(message.broker_json(lock.as_ref().map(|(t, until)| (t.as_str(), *until))));
    let mut headers = vec![
        (
            "Content-Type".to_string(),
            message
                .content_type
                .clone()
                .unwrap_or_else(|| DEFAULT_RECEIVE_CONTENT_TYPE.into()),
        ),
        ("BrokerProperties".to_string(), broker.to_string()),
    ];
    if let Some((token, _)) = &lock {
        headers.push((
            "Location".into(),
            format!("/{entity}/messages/{}/{token}", message.sequence_number),
        ));
    }
    headers.extend(message.user.iter().cloned());
    Reply {
        status: if peek_lock { 201 } else { 200 },
        headers,
        body: message.body,
        note: None,
    }
}

/// Read a tiny_http request, answer it, and log one line.
pub fn serve(app: &App, mut request: tiny_http::Request, log: &dyn Fn(&str)) {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_string(),
                h.value.as_str().to_string(),
            )
        })
        .collect();
    let mut body = Vec::new();
    let read = request
        .as_reader()
        .take(MAX_READ_BYTES as u64 + 1)
        .read_to_end(&mut body);
    let reply = match read {
        Err(e) => app.error(
            400,
            "BadRequest",
            &format!("The request body could not be read: {e}."),
            None,
        ),
        Ok(n) if n > MAX_READ_BYTES => app.error(
            413,
            "MessageSizeExceeded",
            "The request body is too large.",
            None,
        ),
        Ok(_) => app.handle(&method, &url, &headers, body, log),
    };
    let note = reply
        .note
        .as_deref()
        .map(|n| format!(" {n}"))
        .unwrap_or_default();
    log(&format!(
        "{method} {url} -> {}{note} ({} ms)",
        reply.status,
        started.elapsed().as_millis()
    ));
    let mut response = tiny_http::Response::from_data(reply.body).with_status_code(reply.status);
    for (name, value) in reply.headers {
        match tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            Ok(h) => response.add_header(h),
            Err(()) => log(&format!(
                "  header {name:?} cannot be sent over HTTP/1.1; left out"
            )),
        }
    }
    if let Err(e) = request.respond(response) {
        log(&format!("  answer to {method} {url} not delivered: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("POST", "/orders/messages"), Route::Send("orders"));
        assert_eq!(route("POST", "/orders/messages/"), Route::Send("orders"));
        assert_eq!(
            route("DELETE", "/orders/messages/head"),
            Route::Receive {
                entity: "orders",
                peek_lock: false
            }
        );
        assert_eq!(
            route("POST", "/orders/messages/head"),
            Route::Receive {
                entity: "orders",
                peek_lock: true
            }
        );
        assert_eq!(
            route("DELETE", "/o/messages/3/abc"),
            Route::Complete {
                entity: "o",
                sequence: "3",
                token: "abc"
            }
        );
        assert_eq!(
            route("PUT", "/o/messages/3/abc"),
            Route::Unlock {
                entity: "o",
                sequence: "3",
                token: "abc"
            }
        );
        assert_eq!(route("GET", "/orders/messages"), Route::Unknown);
        assert_eq!(route("POST", "/orders"), Route::Unknown);
        assert_eq!(route("POST", "/a/b/messages"), Route::Unknown);
        assert_eq!(
            route("POST", "/hub/partitions/3/messages"),
            Route::PartitionSend {
                entity: "hub",
                partition: "3"
            }
        );
        assert_eq!(route("GET", "/hub/partitions/3/messages"), Route::Unknown);
        assert_eq!(route("POST", "/hub/partitions/messages"), Route::Unknown);
    }

    #[test]
    fn query_parameters() {
        assert_eq!(
            timeout_param("timeout=30&api-version=2015-01"),
            Ok(Some(30))
        );
        assert_eq!(timeout_param("api-version=2015-01"), Ok(None));
        assert!(timeout_param("timeout=abc").is_err());
        assert!(timeout_param("timeout=-1").is_err());
    }

    /// Tokens signed by two test keys (`test-key`: a Service Bus token, `hub-key`: an Event Hubs
    /// token), both valid until 2100, and a JWKS server for them on a loopback port.
    mod fixtures {
        use std::io::{Read, Write};
        use std::net::TcpListener;
        use std::sync::OnceLock;

        use serde_json::{json, Value};

        const SERVICEBUS: &str = include_str!("testdata/rs256-token.json");
        const EVENTHUBS: &str = include_str!("testdata/rs256-eventhubs-token.json");

        fn parsed(text: &str) -> Value {
            serde_json::from_str(text).unwrap()
        }
        pub fn servicebus_token() -> String {
            parsed(SERVICEBUS)["jwt"].as_str().unwrap().to_string()
        }
        pub fn eventhubs_token() -> String {
            parsed(EVENTHUBS)["jwt"].as_str().unwrap().to_string()
        }

        /// The JWKS URL of a server started once for all tests (it lives as long as the process).
        pub fn jwks_url() -> &'static str {
            static URL: OnceLock<String> = OnceLock::new();
            URL.get_or_init(|| {
                let key = |v: Value, kid: &str| json!({ "kty": "RSA", "use": "sig", "kid": kid, "n": v["n"], "e": v["e"] });
                let body = json!({ "keys": [key(parsed(SERVICEBUS), "test-key"), key(parsed(EVENTHUBS), "hub-key")] }).to_string();
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let port = listener.local_addr().unwrap().port();
                std::thread::spawn(move || {
                    for mut stream in listener.incoming().flatten() {
                        // Read the whole request head first: closing with unread input resets
                        // the connection under the client's feet.
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = write!(
                            stream,
                            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                });
                format!("http://127.0.0.1:{port}/t/discovery/v2.0/keys")
            })
        }
    }

    fn app_with(entities: &[&str]) -> App {
        let configs = entities
            .iter()
            .map(|e| crate::config::parse_entity(e).unwrap())
            .collect();
        App::new(
            Broker::new(configs),
            8410,
            fixtures::jwks_url(),
            "https://sts.windows.net/",
        )
    }

    /// (status, error code word or "") of one request with a Bearer token.
    fn call(
        app: &App,
        method: &str,
        url: &str,
        token: &str,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let mut headers = vec![("Authorization".to_string(), format!("Bearer {token}"))];
        headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        let reply = app.handle(method, url, &headers, body.to_vec(), &|_| {});
        (reply.status, reply.note.unwrap_or_default())
    }

    /// A one-byte send to `entity` with this MessageId: status and error code.
    fn send_id(app: &App, token: &str, entity: &str, id: &str) -> (u16, String) {
        let props = format!(r#"{{"MessageId":"{id}"}}"#);
        call(
            app,
            "POST",
            &format!("/{entity}/messages"),
            token,
            &[("BrokerProperties", props.as_str())],
            b"x",
        )
    }

    /// A request to the control surface: its status and JSON answer.
    fn control(app: &App, method: &str, path: &str, body: &str) -> (u16, Value) {
        let reply = app.handle(
            method,
            &format!("/__control/{path}"),
            &[],
            body.as_bytes().to_vec(),
            &|_| {},
        );
        (reply.status, serde_json::from_slice(&reply.body).unwrap())
    }

    fn stored(app: &App, entity: &str) -> Vec<Value> {
        let reply = app.handle(
            "GET",
            &format!("/__control/messages/{entity}"),
            &[],
            vec![],
            &|_| {},
        );
        assert_eq!(reply.status, 200);
        serde_json::from_slice::<Value>(&reply.body)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    const ATOM: (&str, &str) = (
        "Content-Type",
        "application/atom+xml;type=entry;charset=utf-8",
    );
    const BATCH: (&str, &str) = ("Content-Type", "application/vnd.microsoft.servicebus.json");

    #[test]
    fn event_hub_sends_single_partition_and_batch() {
        let app = app_with(&["orders", "telemetry:partitions=4"]);
        let hub = fixtures::eventhubs_token();
        let url = "/telemetry/messages?timeout=60&api-version=2014-01";
        let key = ("BrokerProperties", r#"{"PartitionKey":"device-7"}"#);
        assert_eq!(
            call(
                &app,
                "POST",
                url,
                &hub,
                &[ATOM, key, ("WindAlert", "Strong Winds")],
                b"{\"t\":1}"
            ),
            (201, String::new())
        );
        assert_eq!(
            call(
                &app,
                "POST",
                "/telemetry/partitions/2/messages?api-version=2014-01",
                &hub,
                &[ATOM],
                b"p2"
            )
            .0,
            201
        );
        let batch = br#"[{"Body":"b0","UserProperties":{"Alert":"x"}},{"Body":"b1","BrokerProperties":{"PartitionKey":"device-7"}}]"#;
        assert_eq!(call(&app, "POST", url, &hub, &[BATCH], batch).0, 201);
        assert_eq!(
            call(
                &app,
                "POST",
                "/telemetry/partitions/3/messages",
                &hub,
                &[BATCH],
                br#"[{"Body":"c"}]"#
            )
            .0,
            201,
            "a batch to a partition"
        );

        let events = stored(&app, "telemetry");
        let parts: Vec<&str> = events
            .iter()
            .map(|e| e["partitionId"].as_str().unwrap())
            .collect();
        let k = crate::store::partition_for_key("device-7", 4).to_string();
        assert_eq!(parts, [k.as_str(), "2", "0", k.as_str(), "3"]);
        assert_eq!(events[0]["brokerProperties"]["PartitionKey"], "device-7");
        assert_eq!(events[0]["userProperties"]["windalert"], "Strong Winds");
        assert_eq!(events[0]["contentType"], ATOM.1);
        assert!(
            events[0]["brokerProperties"].get("MessageId").is_none(),
            "no MessageId made up"
        );
        assert_eq!(events[2]["userProperties"]["Alert"], "x");

        let stats = app.handle("GET", "/__control/stats", &[], vec![], &|_| {});
        let stats: Value = serde_json::from_slice(&stats.body).unwrap();
        assert_eq!(stats["entities"]["telemetry"]["accepted"], 5);
        assert_eq!(stats["entities"]["telemetry"]["partitions"]["2"], 1);
        // Four sends (the control requests are not counted): their bodies' bytes.
        assert_eq!(stats["requests"], 4);
        let sent = b"{\"t\":1}".len() + b"p2".len() + batch.len() + br#"[{"Body":"c"}]"#.len();
        assert_eq!(stats["bytesReceived"], sent as u64);
        assert!(
            stats["entities"]["orders"].get("partitions").is_none(),
            "queues' stats unchanged"
        );
    }

    #[test]
    fn event_hub_audience_and_refusals() {
        let app = app_with(&["orders", "telemetry:partitions=4,max-size=2048"]);
        let (hub, sb) = (fixtures::eventhubs_token(), fixtures::servicebus_token());
        let send = |url: &str, token: &str, extra: &[(&str, &str)], body: &[u8]| {
            call(&app, "POST", url, token, extra, body)
        };

        // Each entity takes its own service's audience only.
        assert_eq!(
            send("/telemetry/messages", &sb, &[ATOM], b"x"),
            (401, "InvalidAudience".into())
        );
        assert_eq!(
            send("/orders/messages", &hub, &[], b"x"),
            (401, "InvalidAudience".into())
        );
        assert_eq!(
            send("/orders/messages", &sb, &[], b"x").0,
            201,
            "Service Bus unchanged"
        );
        // An entity that does not exist is 410 whichever service's token comes.
        assert_eq!(
            send("/nope/messages", &hub, &[], b"x"),
            (410, "EntityNotFound".into())
        );
        assert_eq!(
            send("/nope/messages", &sb, &[], b"x"),
            (410, "EntityNotFound".into())
        );

        // Partition ids: decimal, below the partition count.
        for bad in ["4", "01", "-1", "x", "4294967296"] {
            let url = format!("/telemetry/partitions/{bad}/messages");
            assert_eq!(
                send(&url, &hub, &[ATOM], b"x"),
                (400, "BadRequest".into()),
                "{bad}"
            );
        }
        let keyed = ("BrokerProperties", r#"{"PartitionKey":"k"}"#);
        assert_eq!(
            send(
                "/telemetry/partitions/1/messages",
                &hub,
                &[ATOM, keyed],
                b"x"
            ),
            (400, "BadRequest".into())
        );
        assert_eq!(
            send(
                "/telemetry/partitions/1/messages",
                &hub,
                &[BATCH],
                br#"[{"Body":"a","BrokerProperties":{"PartitionKey":"k"}}]"#
            ),
            (400, "BadRequest".into())
        );
        // Service Bus-only broker properties.
        assert_eq!(
            send(
                "/telemetry/messages",
                &hub,
                &[("BrokerProperties", r#"{"SessionId":"s"}"#)],
                b"x"
            ),
            (400, "BadRequest".into())
        );
        assert_eq!(
            send(
                "/telemetry/messages",
                &hub,
                &[BATCH],
                br#"[{"Body":"a","BrokerProperties":{"TimeToLive":5}}]"#
            ),
            (400, "BadRequest".into())
        );
        // Size: the entity's limit.
        assert_eq!(
            send("/telemetry/messages", &hub, &[ATOM], &[b'x'; 2049]),
            (413, "MessageSizeExceeded".into())
        );
        // No REST receive on an event hub; no partition route on a queue (as before).
        assert_eq!(
            call(&app, "DELETE", "/telemetry/messages/head", &hub, &[], b""),
            (404, "NotFound".into())
        );
        assert_eq!(
            call(&app, "POST", "/telemetry/messages/head", &hub, &[], b""),
            (404, "NotFound".into())
        );
        assert_eq!(
            call(&app, "DELETE", "/telemetry/messages/head", &sb, &[], b""),
            (401, "InvalidAudience".into())
        );
        assert_eq!(
            send("/orders/partitions/0/messages", &sb, &[], b"x"),
            (404, "NotFound".into())
        );
        assert_eq!(
            send("/orders/partitions/0/messages", &hub, &[], b"x"),
            (401, "InvalidAudience".into())
        );

        assert!(
            stored(&app, "telemetry").is_empty(),
            "nothing refused was stored"
        );
        let stats = app.handle("GET", "/__control/stats", &[], vec![], &|_| {});
        let stats: Value = serde_json::from_slice(&stats.body).unwrap();
        assert_eq!(stats["entities"]["telemetry"]["rejected"]["400"], 9);
    }

    #[test]
    fn a_fault_after_storing_keeps_the_message_and_the_ledger_counts_every_arrival() {
        let app = app_with(&["orders:duplicate-detection=60", "plain"]);
        let sb = fixtures::servicebus_token();
        let control = |method: &str, path: &str, body: &str| control(&app, method, path, body);
        let send = |entity: &str, id: &str| send_id(&app, &sb, entity, id);

        // Stored, then answered 500: the sender resends; duplicate detection drops the resend.
        assert_eq!(
            control("POST", "faults", r#"{"storedShare":1}"#).0,
            200,
            "a store-then-fail fault needs no other field"
        );
        assert_eq!(send("orders", "m1"), (500, "InternalServerError".into()));
        assert_eq!(send("orders", "m1"), (201, String::new()));
        // A resend after a 201: no failure explains it.
        assert_eq!(send("orders", "m1"), (201, String::new()));
        assert_eq!(stored(&app, "orders").len(), 1);
        // A refusal before storing, then the message.
        assert_eq!(control("POST", "faults", r#"{"status":503}"#).0, 200);
        assert_eq!(send("orders", "m2"), (503, "ServerBusy".into()));
        assert_eq!(send("orders", "m2"), (201, String::new()));
        // Without duplicate detection, a store-then-fail and its resend are stored twice.
        control(
            "POST",
            "faults",
            r#"{"status":503,"storedShare":1,"storedStatus":503}"#,
        );
        assert_eq!(send("plain", "p1"), (503, "ServerBusy".into()));
        assert_eq!(send("plain", "p1"), (201, String::new()));
        assert_eq!(stored(&app, "plain").len(), 2);

        let orders = control("GET", "arrivals/orders", "").1;
        assert_eq!(
            orders["m1"],
            json!({"arrived": 3, "refused": 0, "stored": 1, "duplicates": 2, "answersLost": 1,
                   "acknowledged": 2, "afterAck": 1})
        );
        assert_eq!(
            orders["m2"],
            json!({"arrived": 2, "refused": 1, "stored": 1, "duplicates": 0, "answersLost": 0,
                   "acknowledged": 1, "afterAck": 0})
        );
        assert_eq!(control("GET", "arrivals/plain", "").1["p1"]["stored"], 2);
        let stats = control("GET", "stats", "").1;
        assert_eq!(stats["faultsAfterStore"], 2);
        assert_eq!(stats["entities"]["orders"]["arrived"], 5);
        assert_eq!(stats["entities"]["orders"]["answersLost"], 1);
        assert_eq!(stats["entities"]["orders"]["arrivedAfterAck"], 1);
        assert_eq!(control("POST", "faults", r#"{"storedShare":1.5}"#).0, 400);
        control("DELETE", "stats", "");
        assert_eq!(control("GET", "arrivals/orders", "").1, json!({}));
    }

    #[test]
    fn a_seeded_share_of_faults_comes_after_storing() {
        let app = app_with(&["orders"]);
        let sb = fixtures::servicebus_token();
        let fault = r#"{"status":503,"probability":0.5,"seed":7,"storedShare":0.5}"#;
        app.handle(
            "POST",
            "/__control/faults",
            &[],
            fault.as_bytes().to_vec(),
            &|_| {},
        );
        let statuses: Vec<u16> = (0..200)
            .map(|i| send_id(&app, &sb, "orders", &format!("s{i}")).0)
            .collect();
        let lost = statuses.iter().filter(|s| **s == 500).count();
        let refused = statuses.iter().filter(|s| **s == 503).count();
        assert!(
            (25..=75).contains(&lost),
            "{lost} of about 50 failed after storing"
        );
        assert!(
            (25..=75).contains(&refused),
            "{refused} of about 50 refused"
        );
        assert_eq!(stored(&app, "orders").len(), 200 - refused);
    }

    #[test]
    fn faults_and_outages_store_nothing_they_fail() {
        let app = app_with(&["orders:duplicate-detection=60"]);
        let sb = fixtures::servicebus_token();
        let control = |method: &str, path: &str, body: &str| control(&app, method, path, body);
        let send = |id: &str| send_id(&app, &sb, "orders", id);

        assert_eq!(
            control("POST", "faults", r#"{"status":503,"probability":1}"#).0,
            200
        );
        assert_eq!(send("m1"), (503, "ServerBusy".into()));
        assert_eq!(control("DELETE", "faults", "").0, 200);

        let (status, shown) = control("POST", "outage", r#"{"seconds":30,"retryAfter":2}"#);
        assert_eq!(status, 200);
        assert_eq!(shown["outage"]["status"], 503);
        let reply = app.handle(
            "POST",
            "/orders/messages",
            &[("Authorization".into(), "Bearer not-even-a-token".into())],
            b"x".to_vec(),
            &|_| {},
        );
        assert_eq!(
            (reply.status, reply.note.as_deref()),
            (503, Some("ServerBusy"))
        );
        assert!(reply
            .headers
            .contains(&("Retry-After".to_string(), "2".to_string())));
        assert_eq!(
            call(&app, "DELETE", "/orders/messages/head", &sb, &[], b"").0,
            503,
            "receives too"
        );
        assert!(control("GET", "outage", "").1["outage"]["remainingSeconds"]
            .as_f64()
            .is_some_and(|s| s > 0.0));
        assert_eq!(control("DELETE", "outage", "").0, 200);
        assert_eq!(control("GET", "outage", "").1["outage"], Value::Null);
        assert_eq!(control("POST", "outage", r#"{"seconds":-1}"#).0, 400);

        // Failed sends left no MessageId behind: the same id is accepted now, once.
        assert_eq!(send("m1").0, 201);
        assert_eq!(send("m1").0, 201);
        assert_eq!(stored(&app, "orders").len(), 1);
        let stats = control("GET", "stats", "").1;
        assert_eq!(stats["faultsInjected"], 3);
        assert_eq!(stats["entities"]["orders"]["rejected"]["503"], 2);
        assert_eq!(stats["entities"]["orders"]["duplicates"], 1);
    }

    #[test]
    fn event_hub_default_size_is_one_megabyte() {
        let app = app_with(&["telemetry:partitions=2", "orders"]);
        let (hub, sb) = (fixtures::eventhubs_token(), fixtures::servicebus_token());
        let big = vec![b'x'; 300 * 1024];
        assert_eq!(
            call(&app, "POST", "/telemetry/messages", &hub, &[ATOM], &big).0,
            201
        );
        assert_eq!(
            call(&app, "POST", "/orders/messages", &sb, &[], &big).0,
            413
        );
        let over = vec![b'x'; 1024 * 1024 + 1];
        assert_eq!(
            call(&app, "POST", "/telemetry/messages", &hub, &[ATOM], &over).0,
            413
        );
    }

    #[test]
    fn error_shape() {
        let app = App::new(
            Broker::default(),
            8410,
            "http://127.0.0.1:1/keys",
            "https://sts.windows.net/",
        );
        let reply = app.error(
            401,
            "ExpiredToken",
            "The token is expired <now>.",
            Some("orders"),
        );
        let text = String::from_utf8(reply.body).unwrap();
        assert!(text.starts_with("<Error><Code>401</Code><Detail>ExpiredToken: The token is expired &lt;now&gt;. TrackingId:"), "{text}");
        assert!(
            text.contains(", SystemTracker:127.0.0.1:8410:orders, Timestamp:"),
            "{text}"
        );
        assert!(text.ends_with("</Detail></Error>"));
        assert_eq!(
            reply.headers,
            vec![("Content-Type".to_string(), XML.to_string())]
        );
    }
}
