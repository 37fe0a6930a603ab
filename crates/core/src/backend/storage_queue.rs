//! Storage queues: an accepted request becomes one message put on a queue with
//! `POST {account}/{queue}/messages[?visibilitytimeout=N&messagettl=N]`, and Queue Storage's
//! `QueueMessagesList` answer becomes the caller's 202.
//!
//! The caller's body is the message: base64-encoded (the default, as the Azure SDKs write and
//! read queue messages; any bytes) or, with `"encoding": "text"`, as UTF-8 text that is
//! XML-escaped on the wire. Azure stores at most 64 KiB of message text, so a body that would
//! not fit once encoded is refused with 413 before a token is fetched. The visibility timeout
//! and time to live are fixed by the policy; no caller value reaches the URL or a header, and
//! the one request passes the outgoing gate ([`super::check`]) all the same.

use std::cell::RefCell;

use serde_json::json;

use super::Verdict;
use crate::encoding::xml_element;
use crate::exchange::{
    Answer, Backend, BackendRequest, Bearer, BodyError, Cx, Io, Limit, OutBody, Reply,
};
use crate::policy::prepared::PreparedStorageQueue;
use crate::policy::{QueueEncoding, QUEUE_MESSAGE_MAX_BYTES};
use crate::problem::Problem;
use crate::time::Utc;

/// The REST version sent (the blob backend's; OAuth needs 2017-11-09 or later, and
/// `messagettl=-1` 2017-07-29 or later).
pub const API_VERSION: &str = super::blob::API_VERSION;
/// Time limit of one send attempt, in milliseconds.
pub const SEND_TIMEOUT_MS: f64 = 30_000.0;
const CONTENT_TYPE: &str = "application/xml; charset=utf-8";

/// What [`build`] decided: the request, the XML every attempt sends, and (once Azure answered)
/// what it said about the stored message.
pub struct Plan {
    request: BackendRequest,
    xml: String,
    answered: RefCell<Option<Enqueued>>,
}

/// The message text for a body: base64 of its bytes, or the body as XML-escaped text.
pub fn message_text(body: &[u8], encoding: QueueEncoding) -> Result<String, Problem> {
    match encoding {
        QueueEncoding::Base64 => Ok(crate::encoding::base64(body)),
        QueueEncoding::Text => {
            let text = std::str::from_utf8(body).map_err(|e| {
                bad_message(format!("This route stores the body as text (\"encoding\": \"text\"), so it must be UTF-8, and it is not (at byte {}). Send UTF-8 text", e.valid_up_to()))
            })?;
            let mut escaped = String::with_capacity(text.len() + text.len() / 8);
            crate::encoding::xml_escape(text, &mut escaped).map_err(|(at, ch)| {
                bad_message(format!("The body has U+{:04X} at byte {at}, a character XML 1.0 (Queue Storage's wire format) cannot carry even escaped. Send text without control characters", ch as u32))
            })?;
            Ok(escaped)
        }
    }
}

/// The Put Message body.
pub fn message_xml(escaped_text: &str) -> String {
    format!("<?xml version=\"1.0\" encoding=\"utf-8\"?><QueueMessage><MessageText>{escaped_text}</MessageText></QueueMessage>")
}

/// The Put Message request (its body is [`message_xml`]).
pub fn send_request(send_url: &str, now_ms: f64) -> BackendRequest {
    BackendRequest {
        method: "POST",
        url: send_url.to_owned(),
        headers: vec![
            ("x-ms-version".into(), API_VERSION.to_owned()),
            ("x-ms-date".into(), Utc::from_millis(now_ms).http_date()),
            ("content-type".into(), CONTENT_TYPE.to_owned()),
        ],
        ..Default::default()
    }
}

/// What Azure says about a message it stored (`QueueMessagesList`), without the
/// `PopReceipt`: that is a capability to delete or update the message, not the caller's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enqueued {
    pub message_id: Option<String>,
    pub insertion_time: Option<String>,
    pub expiration_time: Option<String>,
    pub time_next_visible: Option<String>,
}

/// Reads the answer to Put Message: the first `<QueueMessage>` of a `<QueueMessagesList>`.
/// Values are kept only when they look like what Azure sends (an id, an RFC 1123 date): the
/// caller's answer never carries anything else from the response body.
pub fn parse_enqueued(xml: &str) -> Option<Enqueued> {
    let list = xml_element(xml, "QueueMessagesList")?;
    let message = xml_element(list, "QueueMessage")?;
    let field = |name: &str| {
        xml_element(message, name)
            .map(str::trim)
            .filter(|v| {
                (1..=64).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b" -:,.+".contains(&b))
            })
            .map(str::to_owned)
    };
    Some(Enqueued {
        message_id: field("MessageId"),
        insertion_time: field("InsertionTime"),
        expiration_time: field("ExpirationTime"),
        time_next_visible: field("TimeNextVisible"),
    })
}

/// The caller's 202.
pub fn accepted_body(queue: &str, e: &Enqueued) -> String {
    json!({
        "status": "accepted",
        "queue": queue,
        "message_id": e.message_id,
        "insertion_time": e.insertion_time,
        "expiration_time": e.expiration_time,
        "time_next_visible": e.time_next_visible,
    })
    .to_string()
}

fn bad_message(detail: String) -> Problem {
    Problem::new(
        400,
        "bad-message",
        "The message cannot be put on the queue",
        format!("{detail}; nothing was sent."),
    )
}

pub fn too_large(size: u64, limit: u64, encoding: QueueEncoding) -> Problem {
    let why = match encoding {
        QueueEncoding::Base64 => format!("Queue Storage keeps at most {QUEUE_MESSAGE_MAX_BYTES} bytes of message text, and this route base64-encodes the body (4 bytes for every 3)"),
        QueueEncoding::Text => format!("Queue Storage keeps at most {QUEUE_MESSAGE_MAX_BYTES} bytes of message text"),
    };
    Problem::new(
        413,
        "body-too-large",
        "Message too large",
        format!("The body is {size} bytes or more; this route accepts at most {limit} ({why}). Send a smaller body, or store large payloads in a blob and queue a reference to it. Nothing was sent."),
    )
}

/// Phase 7: reads the body (within the route's limit), encodes it as the message text, checks
/// Azure's size limit and passes the request through the outgoing gate: all before a token is
/// fetched.
pub async fn build<I: Io>(
    q: &PreparedStorageQueue,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Plan, Problem> {
    let encoding = q.config.encoding;
    let limit = u64::from(q.config.max_body_bytes()).min(cx.max_body().unwrap_or(u64::MAX));
    if let Some(length) = cx.head.content_length().filter(|&l| l > limit) {
        return Err(too_large(length, limit, encoding));
    }
    let body = match io.read_body(limit).await {
        Ok(body) => body.map(|(b, _)| io.bytes(&b)).unwrap_or_default(),
        Err(BodyError::TooLarge(seen)) => return Err(too_large(seen, limit, encoding)),
        Err(BodyError::Unreadable(why)) => return Err(super::unreadable(&why)),
    };
    // Azure counts the message text (unescaped): the base64, or the text's UTF-8 bytes.
    let text_bytes = match encoding {
        QueueEncoding::Base64 => body.len().div_ceil(3) * 4,
        QueueEncoding::Text => body.len(),
    };
    if text_bytes > QUEUE_MESSAGE_MAX_BYTES as usize {
        return Err(too_large(body.len() as u64, limit, encoding));
    }
    let text = message_text(&body, encoding)?;
    let request = send_request(&q.send_url, io.now());
    super::check(&request)?;
    Ok(Plan {
        request,
        xml: message_xml(&text),
        answered: RefCell::new(None),
    })
}

/// Phase 9: sends, again after a 429 or 503 (throttled: not stored) within the retry policy;
/// a 500/502/504, a timeout or a lost connection is `backend-outcome-unknown` (Put Message is
/// not idempotent), a final refusal is mapped (and a 401 evicts the token). Azure's error code
/// and message go to the log line, not to the caller.
pub async fn send<I: Io>(
    q: &PreparedStorageQueue,
    plan: &Plan,
    bearer: &Bearer<'_>,
    cx: &mut Cx<'_>,
    io: &I,
) -> Result<Reply<I::Stream>, Problem> {
    let queue = q.config.queue.as_str();
    let reply = super::send_retried(
        io,
        &plan.request,
        bearer,
        OutBody::Text(&plan.xml),
        Limit::Deadline(SEND_TIMEOUT_MS),
        &mut cx.log,
        // Put Message is a POST: a message sent twice is in the queue twice.
        (super::Resend::OnlyIfRefused, "Queue Storage"),
        async |reply: Reply<I::Stream>, _| {
            let status = reply.status;
            let code = reply.header("x-ms-error-code").map(str::to_owned);
            let retry_after = crate::retry::parse_retry_after_secs(reply.header("retry-after"));
            let (text, unread) = match super::answer_text(io, reply.body).await {
                Ok(text) => (text, None),
                Err(note) => (String::new(), Some(note)),
            };
            if status == 201 {
                *plan.answered.borrow_mut() = parse_enqueued(&text);
                return Verdict::Done(Reply {
                    status,
                    headers: Vec::new(),
                    body: None,
                });
            }
            // Storage throttles with 503 ServerBusy (and 429): the message was not taken.
            if status == 429 || status == 503 {
                return Verdict::Retry(retry_after);
            }
            if matches!(status, 500 | 502 | 504) {
                // 500 OperationTimedOut / InternalError: "may or may not have completed".
                return Verdict::Fail {
                    problem: super::outcome_unknown(
                        "Queue Storage",
                        &format!("it answered {status}, which does not say whether the message was stored"),
                        status == 504,
                    ),
                    detail: Some(unread.unwrap_or_else(|| error_detail(code.as_deref(), &text))),
                };
            }
            let (problem, evict) = map_error(status, queue);
            if evict {
                bearer.evict(io);
            }
            Verdict::Fail {
                problem,
                detail: Some(unread.unwrap_or_else(|| error_detail(code.as_deref(), &text))),
            }
        },
        unavailable,
    )
    .await?;
    if plan.answered.borrow().is_none() {
        cx.log.backend_detail = Some(
            "stored (201), but the answer was not a QueueMessagesList of at most 64 KiB".to_owned(),
        );
    }
    Ok(reply)
}

/// Phase 10: 202 with what Azure said about the stored message (never its `PopReceipt`).
pub fn answer<S>(q: &PreparedStorageQueue, plan: &Plan) -> Answer<S> {
    let enqueued = plan.answered.borrow().clone().unwrap_or_default();
    Answer::json(202, accepted_body(&q.config.queue, &enqueued))
}

/// What a final refusal means for the caller, and whether the token must be evicted (401).
/// Nothing the caller sent can cause one (the body is encoded, the rest is the policy's), so
/// they are the operator's to fix: 502, with Azure's reason in the log line only.
pub fn map_error(status: u16, queue: &str) -> (Problem, bool) {
    const SEE_LOG: &str = "Queue Storage's reason is in the gateway's log under this request id";
    let problem = match status {
        401 | 403 => Problem::new(
            502,
            "backend-authorization-failed",
            "Queue Storage refused the gateway's identity",
            format!("Queue Storage answered {status}: the identity's token is not accepted or lacks a data role (for example Storage Queue Data Message Sender) on queue '{queue}'; the operator should check the identity's audience and role assignment ({SEE_LOG})."),
        ),
        404 => Problem::new(
            502,
            "backend-entity-not-found",
            "The storage queue does not exist",
            format!("Queue Storage has no queue '{queue}' (it answered 404); the operator should create it or fix the route."),
        ),
        413 => Problem::new(
            413,
            "body-too-large",
            "Message too large",
            "Queue Storage refused the message as too large; send a smaller body. Nothing was stored.",
        ),
        _ => Problem::new(
            502,
            "backend-error",
            "Queue Storage refused the request",
            format!("Queue Storage answered {status} to a message the gateway's checks let through ({SEE_LOG}); nothing was stored."),
        ),
    };
    (
        problem.with_extension("backend_status", json!(status)),
        status == 401,
    )
}

/// After the last retry: 503 with the last `Retry-After` (or 5 s).
fn unavailable(why: &str, retry_after: Option<u64>) -> Problem {
    Problem::new(
        503,
        "backend-unavailable",
        "Queue Storage is unavailable",
        format!("Queue Storage {why} after retries; nothing was stored. Retry after the time in Retry-After."),
    )
    .with_header("retry-after", crate::retry::caller_retry_after(retry_after).to_string())
}

/// Azure's error code (the `x-ms-error-code` header, else `<Code>`) and the first line of its
/// `<Message>` (without the request id and time that follow), for the log line.
pub fn error_detail(header_code: Option<&str>, body: &str) -> String {
    let code: String = header_code
        .or_else(|| xml_element(body, "Code"))
        .unwrap_or("no error code")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == ' ')
        .take(64)
        .collect();
    let message = xml_element(body, "Message")
        .map(|m| m.split(['\n', '\r']).next().unwrap_or(m))
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect::<String>();
    if message.is_empty() {
        code
    } else {
        format!("{code}: {message}")
    }
}

impl Backend for PreparedStorageQueue {
    type Plan<B> = Plan;

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
        &plan.request
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::base64_decode;

    /// What an XML parser gives back for escaped text: the inverse of
    /// [`crate::encoding::xml_escape`].
    fn unescape(s: &str) -> String {
        s.replace("&#xD;", "\r")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    }

    #[test]
    fn base64_is_the_default_and_round_trips_any_bytes() {
        let bytes: Vec<u8> = (0..=255u8).chain([0, 0xff, b'<']).collect();
        let text = message_text(&bytes, QueueEncoding::Base64).unwrap();
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)));
        assert_eq!(base64_decode(&text).unwrap(), bytes);
        assert_eq!(message_text(b"", QueueEncoding::Base64).unwrap(), "");
        assert_eq!(message_text(b"hi", QueueEncoding::Base64).unwrap(), "aGk=");
    }

    #[test]
    fn text_is_escaped_so_the_stored_text_equals_the_body() {
        let body = "a < b && c > d </MessageText><x>\r\n\ttab \"q\" 'a' ünï 🦀 ]]>";
        let escaped = message_text(body.as_bytes(), QueueEncoding::Text).unwrap();
        assert!(!escaped.contains('<') && !escaped.contains('>') && !escaped.contains('\r'));
        assert!(!escaped.contains("</MessageText>"));
        assert_eq!(unescape(&escaped), body);
        let xml = message_xml(&escaped);
        assert_eq!(xml.matches("<MessageText>").count(), 1);
        assert_eq!(xml.matches("</MessageText>").count(), 1);
    }

    #[test]
    fn text_that_xml_cannot_carry_is_refused_naming_where() {
        let p = message_text(b"ok\xff\xfe", QueueEncoding::Text).unwrap_err();
        assert_eq!((p.status, p.kind), (400, "bad-message"));
        assert!(p.detail.contains("must be UTF-8"), "{}", p.detail);
        assert!(p.detail.contains("at byte 2"), "{}", p.detail);
        for (body, at, code) in [
            ("nul\0", 3, "U+0000"),
            ("esc\u{1b}[0m", 3, "U+001B"),
            ("ab\u{fffe}", 2, "U+FFFE"),
        ] {
            let p = message_text(body.as_bytes(), QueueEncoding::Text).unwrap_err();
            assert!(p.detail.contains(code), "{}", p.detail);
            assert!(p.detail.contains(&format!("at byte {at}")), "{}", p.detail);
            assert!(p.detail.ends_with("nothing was sent."), "{}", p.detail);
        }
        // Base64 carries them all.
        assert!(message_text(b"nul\0", QueueEncoding::Base64).is_ok());
    }

    #[test]
    fn the_request_is_a_put_message_with_version_date_and_fixed_query() {
        let r = send_request(
            "https://acct.queue.core.windows.net/jobs/messages?visibilitytimeout=30&messagettl=-1",
            784_111_777_000.0,
        );
        assert_eq!(r.method, "POST");
        assert!(r
            .url
            .ends_with("/jobs/messages?visibilitytimeout=30&messagettl=-1"));
        assert_eq!(r.header("x-ms-version"), Some(API_VERSION));
        assert!(
            API_VERSION >= "2017-11-09",
            "OAuth needs 2017-11-09 or later"
        );
        assert_eq!(r.header("x-ms-date"), Some("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(r.header("authorization"), None, "the edge adds the token");
        assert!(super::super::check(&r).is_ok());
    }

    #[test]
    fn the_answer_keeps_ids_and_times_and_never_the_pop_receipt() {
        let xml = "<?xml version=\"1.0\" encoding=\"utf-8\"?><QueueMessagesList><QueueMessage>\
            <MessageId>5974b586-0df3-4e2d-ad0c-18e3892bfca2</MessageId>\
            <InsertionTime>Fri, 09 Oct 2009 21:04:30 GMT</InsertionTime>\
            <ExpirationTime>Fri, 16 Oct 2009 21:04:30 GMT</ExpirationTime>\
            <PopReceipt>YzQ4Yzg1MDItYTc0Ny00OWNjLTkxYTUtZGM0MDFiZDAwYzEw</PopReceipt>\
            <TimeNextVisible>Fri, 09 Oct 2009 23:29:20 GMT</TimeNextVisible>\
            </QueueMessage></QueueMessagesList>";
        let e = parse_enqueued(xml).unwrap();
        assert_eq!(
            e.message_id.as_deref(),
            Some("5974b586-0df3-4e2d-ad0c-18e3892bfca2")
        );
        assert_eq!(
            e.time_next_visible.as_deref(),
            Some("Fri, 09 Oct 2009 23:29:20 GMT")
        );
        let body: serde_json::Value = serde_json::from_str(&accepted_body("jobs", &e)).unwrap();
        assert_eq!(body["status"], "accepted");
        assert_eq!(body["queue"], "jobs");
        assert_eq!(body["expiration_time"], "Fri, 16 Oct 2009 21:04:30 GMT");
        assert!(!body.to_string().contains("YzQ4"), "no PopReceipt: {body}");
        assert!(body.get("pop_receipt").is_none());
        // Values that do not look like Azure's are dropped, not passed on.
        let odd = "<QueueMessagesList><QueueMessage><MessageId>a<b>\"x\"</MessageId>\
            <InsertionTime>Fri, 09 Oct 2009 21:04:30 GMT</InsertionTime></QueueMessage></QueueMessagesList>";
        let e = parse_enqueued(odd).unwrap();
        assert_eq!(e.message_id, None);
        assert!(e.insertion_time.is_some());
        assert_eq!(parse_enqueued("<Error><Code>x</Code></Error>"), None);
        assert_eq!(parse_enqueued(""), None);
    }

    #[test]
    fn refusals_are_the_operators_and_azures_reason_goes_to_the_log() {
        let (p, evict) = map_error(401, "jobs");
        assert_eq!(
            (p.status, p.kind, evict),
            (502, "backend-authorization-failed", true)
        );
        let (p, evict) = map_error(403, "jobs");
        assert_eq!((p.status, evict), (502, false));
        let (p, _) = map_error(404, "jobs");
        assert_eq!((p.status, p.kind), (502, "backend-entity-not-found"));
        assert!(p.detail.contains("'jobs'"));
        let (p, _) = map_error(413, "jobs");
        assert_eq!(p.status, 413);
        let (p, _) = map_error(400, "jobs");
        assert_eq!((p.status, p.kind), (502, "backend-error"));
        let body = "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>InvalidXmlDocument</Code>\
            <Message>XML specified is not syntactically valid.\nRequestId:0a1b\nTime:2024-01-01T00:00:00Z</Message></Error>";
        assert!(!p.detail.contains("InvalidXmlDocument"));
        assert_eq!(
            error_detail(Some("InvalidXmlDocument"), body),
            "InvalidXmlDocument: XML specified is not syntactically valid."
        );
        assert_eq!(
            error_detail(None, body).split(':').next(),
            Some("InvalidXmlDocument")
        );
        assert_eq!(error_detail(None, ""), "no error code");
        assert_eq!(
            unavailable("answered 503", Some(9)).headers,
            vec![("retry-after", "9".to_owned())]
        );
    }

    #[test]
    fn the_size_limit_is_azures_64_kib_after_encoding() {
        assert_eq!(QueueEncoding::Base64.largest_body(), 49_152);
        assert_eq!(QueueEncoding::Text.largest_body(), 65_536);
        assert_eq!(
            message_text(&[0u8; 49_152], QueueEncoding::Base64)
                .unwrap()
                .len(),
            65_536
        );
        let p = too_large(49_153, 49_152, QueueEncoding::Base64);
        assert_eq!((p.status, p.kind), (413, "body-too-large"));
        assert!(p.detail.contains("at most 49152"), "{}", p.detail);
        assert!(p.detail.contains("base64"), "{}", p.detail);
    }
}
