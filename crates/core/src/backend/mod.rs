//! Backends: how an accepted request becomes an Azure REST call, and how Azure's answer
//! becomes the caller's. Each backend builds its request as data and maps the response; the
//! edge sends.
//!
//! Every request a backend builds passes [`check`] before the first byte of it (or of any
//! request of the same call) is sent: it is the one gate between values that came from a caller
//! and what goes on the wire. Requests are built without their bearer token, so the gate runs
//! before a token is fetched; the edge adds `Authorization` at send time.

pub mod azure_rest;
pub mod blob;
pub mod blob_sas;
pub mod service_bus;
pub mod storage_queue;

use crate::exchange::{BackendRequest, Bearer, Io, Limit, LogFields, OutBody, Reply, SendError};
use crate::problem::Problem;
use crate::retry::RetryPolicy;

/// Whether `value` travels unchanged as an HTTP header value: visible ASCII, spaces and tabs
/// inside (RFC 9110 field-value without obs-text), nothing that a runtime would trim.
///
/// Non-ASCII is refused rather than encoded: a runtime sends it as UTF-8, which Azure reads as
/// something else or drops the connection over (and a dropped connection is retried as a network
/// error: the same bad bytes three times, then 503).
pub fn is_header_value(value: &str) -> bool {
    crate::encoding::bytes_within(value.as_bytes(), 0x20, b'\t')
        && !value.starts_with([' ', '\t'])
        && !value.ends_with([' ', '\t'])
}

/// Whether `url` travels unchanged: an `http(s)` URL of visible ASCII, no fragment.
fn is_wire_url(url: &str) -> bool {
    (url.starts_with("https://") || url.starts_with("http://"))
        && crate::encoding::bytes_within(url.as_bytes(), 0x21, 0x21)
        && !url.contains('#')
}

/// The gate every backend request passes before anything of its call is sent: every header
/// name is a token, every value is what HTTP carries unchanged, the URL is plain ASCII. A
/// failure names the field the value came from, and nothing is sent.
pub fn check(request: &BackendRequest) -> Result<(), Problem> {
    if !is_wire_url(&request.url) {
        return Err(unsendable("The backend URL built from the request"));
    }
    for (name, value) in &request.headers {
        if !crate::encoding::is_header_name(name) {
            return Err(unsendable(&format!("The header name \"{name}\"")));
        }
        if !is_header_value(value) {
            return Err(unsendable(&field_of(name, value)));
        }
    }
    Ok(())
}

/// Which field of the caller's view a header carries, for the error message.
fn field_of(header: &str, value: &str) -> String {
    let header = header.to_ascii_lowercase();
    if header == "brokerproperties" {
        // Name the broker property that holds the bad character.
        if let Ok(serde_json::Value::Object(props)) = serde_json::from_str(value) {
            if let Some((name, _)) = props
                .iter()
                .find(|(_, v)| v.as_str().is_some_and(|s| !is_header_value(s)))
            {
                return format!("BrokerProperties.{name}");
            }
        }
        return "BrokerProperties".to_owned();
    }
    if let Some(meta) = header.strip_prefix("x-ms-meta-") {
        return format!("The metadata value {meta}");
    }
    match header.as_str() {
        "content-type" | "x-ms-blob-content-type" => "Content-Type".to_owned(),
        _ => format!("The value of {header}"),
    }
}

fn unsendable(what: &str) -> Problem {
    Problem::new(
        400,
        "unsendable-value",
        "A value from this request cannot be sent to Azure",
        format!("{what} contains a character HTTP headers cannot carry unchanged (only printable ASCII, without leading or trailing spaces); change the request value it is built from. Nothing was sent."),
    )
}

/// What one backend reply means to [`send_retried`].
pub enum Verdict<S> {
    Done(Reply<S>),
    /// Final; `detail` is the backend's own reason, for the log line only.
    Fail {
        problem: Problem,
        detail: Option<String>,
    },
    /// Worth another attempt (429, 5xx), after at least this many seconds if given.
    Retry(Option<u64>),
}

/// A 401 to a body streamed as it arrived: it cannot be sent again.
pub fn not_replayable() -> Problem {
    Problem::new(
        503,
        "token-refused",
        "Azure refused the gateway's token",
        "Azure refused the gateway's token, which has been replaced. This request's body was streamed to Azure as it arrived and cannot be sent again: send the request again.",
    )
    .with_header("retry-after", "1")
}

/// One send with the bearer's token; a 401 to a request that can be sent again (no body, or a
/// body the edge holds) is replayed once with a fresh token; a 401 to the caller's stream is
/// [`not_replayable`] (the token evicted). Otherwise the reply or the send error as they are.
pub async fn send_renewing<I: Io>(
    io: &I,
    request: &BackendRequest,
    bearer: &Bearer<'_>,
    body: OutBody<'_, I::Bytes>,
    limit: Limit,
    log: &mut LogFields,
) -> Result<Result<Reply<I::Stream>, SendError>, Problem> {
    if matches!(body, OutBody::CallerStream { .. }) {
        // Whatever becomes of this call may be the caller's doing (a slow or broken upload):
        // the host's circuit breaker does not count it.
        log.caller_stream = true;
    }
    let reply = io.send(request, Some(&bearer.token()), body, limit).await;
    note_retry_after(&reply, log);
    let refused = matches!(&reply, Ok(r) if r.status == 401);
    if !refused || bearer.renewed() {
        return Ok(reply);
    }
    if let Ok(Reply { body, .. }) = reply {
        drain(io, body).await;
    }
    if matches!(body, OutBody::CallerStream { .. }) {
        bearer.evict(io);
        log.backend_status = Some(401);
        return Err(not_replayable());
    }
    bearer.renew(io, log).await?;
    let reply = io.send(request, Some(&bearer.token()), body, limit).await;
    note_retry_after(&reply, log);
    Ok(reply)
}

/// Azure's `Retry-After` on an answer that found it unavailable (429, 5xx): what the circuit
/// breaker honours if the call fails.
fn note_retry_after<S>(reply: &Result<Reply<S>, SendError>, log: &mut LogFields) {
    if let Ok(r) = reply {
        if r.status == 429 || r.status >= 500 {
            log.retry_after = crate::retry::parse_retry_after_secs(r.header("retry-after"));
        }
    }
}

/// Whether a request may be sent again when an attempt's outcome is unknown: no answer within
/// the deadline, or the connection lost once the request may have gone out. (What Azure
/// *answered* is the judge's to weigh: a backend's judge retries a 5xx only where this says
/// [`Resend::Safe`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// Sending it twice does it once: an idempotent method (GET, HEAD, PUT, DELETE) with a body
    /// the edge holds, or a Service Bus message whose entity drops a resent `MessageId`.
    Safe,
    /// Sending it twice may do it twice (POST, PATCH; a message to an entity without duplicate
    /// detection): sent again only when Azure said it did not process it (429, or a throttling
    /// 503 where the service documents one); an unknown outcome is the caller's
    /// [`outcome_unknown`], and the request is not sent again.
    OnlyIfRefused,
}

/// The caller's answer when a request that must not be sent twice may or may not have been
/// carried out: 504 when no answer came in time, 502 when the connection was lost or Azure's
/// answer said its own outcome is unknown (a 500). No `Retry-After`: sending it again is the
/// caller's decision, after checking.
pub fn outcome_unknown(service: &str, why: &str, gateway_timeout: bool) -> Problem {
    Problem::new(
        if gateway_timeout { 504 } else { 502 },
        "backend-outcome-unknown",
        "Azure may or may not have carried out the request",
        format!("The request reached {service}, but {why}, so whether {service} carried it out is unknown. The gateway did not send it again, since sending it twice could do it twice. Check the outcome (read the resource or the entity) before sending the request again."),
    )
}

/// Sends a request whose body the edge holds (so every attempt carries the same bytes) until
/// `judge` says done or failed. [`Verdict::Retry`], and (with [`Resend::Safe`]) network errors
/// and timeouts, are retried within the [`RetryPolicy`], honouring `Retry-After`; then
/// `unavailable(why, retry_after)`. With [`Resend::OnlyIfRefused`], a timeout or a lost
/// connection ends the call at once with [`outcome_unknown`] (`service`: who it was sent to).
/// `judge` is told whether an earlier attempt's outcome was unknown (its answer lost), so that
/// it can tell a conflict with that attempt's own effect from someone else's.
/// A first 401 is replayed at once with a fresh token (outside the retry budget); a second
/// goes to `judge`. A request the outgoing gate refuses is never retried.
#[allow(clippy::too_many_arguments)]
pub async fn send_retried<I: Io>(
    io: &I,
    request: &BackendRequest,
    bearer: &Bearer<'_>,
    body: OutBody<'_, I::Bytes>,
    limit: Limit,
    log: &mut LogFields,
    resend: (Resend, &str),
    mut judge: impl AsyncFnMut(Reply<I::Stream>, bool) -> Verdict<I::Stream>,
    unavailable: impl Fn(&str, Option<u64>) -> Problem,
) -> Result<Reply<I::Stream>, Problem> {
    let (resend, service) = resend;
    let retry = RetryPolicy::default();
    let started = io.now();
    let mut attempts = 0;
    let mut earlier_unknown = false;
    loop {
        attempts += 1;
        // A first 401 is replayed inside: it does not use the retry budget.
        let sent = send_renewing(io, request, bearer, body, limit, log).await?;
        let (retry_after, why) = match sent {
            Ok(reply) => {
                let status = reply.status;
                log.backend_status = Some(status);
                match judge(reply, earlier_unknown).await {
                    Verdict::Done(reply) => return Ok(reply),
                    Verdict::Fail { problem, detail } => {
                        log.backend_detail = detail;
                        return Err(problem);
                    }
                    Verdict::Retry(retry_after) => {
                        earlier_unknown |= status >= 500 && status != 503;
                        (retry_after, format!("answered {status}"))
                    }
                }
            }
            Err(SendError::Unsendable(problem)) => return Err(problem),
            Err(e) if resend == Resend::OnlyIfRefused => {
                log.backend_detail =
                    Some(format!("outcome unknown: the request {e}; not sent again"));
                let timed_out = matches!(e, SendError::Timeout);
                let why = if timed_out {
                    "no answer came back within the route's time limit"
                } else {
                    "the connection was lost before an answer came back"
                };
                return Err(outcome_unknown(service, why, timed_out));
            }
            Err(e) => {
                earlier_unknown = true;
                (None, format!("could not be reached ({e})"))
            }
        };
        let wait = retry.next_delay(
            attempts,
            io.now() - started,
            retry_after.map(|s| s as f64 * 1000.0),
            io.random(),
        );
        match wait {
            Some(delay) => io.sleep(delay).await,
            None => return Err(unavailable(&why, retry_after)),
        }
    }
}

/// Largest answer read for what the gateway parses of it where the route sets no limit of its
/// own: an error's code and message (they go to the log line; the status decides the caller's
/// problem), a Put Message's receipt. A longer one is not read, and the log says so.
pub const ANSWER_TEXT_BYTES: u32 = 64 * 1024;
/// A reply nobody needs is read to its end when it is at most this long (its connection can be
/// used again); a longer one is cancelled.
pub const DRAIN_BYTES: u32 = 16 * 1024;

/// Lets go of a reply whose body nobody needs (read to its end if short, else cancelled).
pub async fn drain<I: Io>(io: &I, body: Option<I::Stream>) {
    if let Some(body) = body {
        let _ = io.text(body, DRAIN_BYTES).await;
    }
}

/// A small answer's text (an error's code and message, a receipt): read up to
/// [`ANSWER_TEXT_BYTES`]. A longer answer, or one that broke off, is never read as if it were
/// whole: the error is what the log line should say instead.
pub async fn answer_text<I: Io>(io: &I, body: Option<I::Stream>) -> Result<String, String> {
    let Some(body) = body else {
        return Ok(String::new());
    };
    match io.text(body, ANSWER_TEXT_BYTES).await {
        Ok(text) => Ok(text),
        Err(crate::exchange::BodyError::TooLarge(seen)) => Err(format!(
            "an answer of at least {seen} bytes, over the {ANSWER_TEXT_BYTES} read: not read"
        )),
        Err(crate::exchange::BodyError::Unreadable(why)) => {
            Err(log_detail(&format!("the answer broke off: {why}")))
        }
    }
}

/// A backend's own words for the log line: control characters out, at most 300 characters.
pub fn log_detail(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect::<String>()
        .trim_end_matches(['.', ',', ' '])
        .to_owned()
}

/// A request body that could not be read.
pub fn unreadable(why: &str) -> Problem {
    Problem::new(
        400,
        "bad-body",
        "The request body could not be read",
        format!("Reading the body failed: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> BackendRequest {
        BackendRequest {
            method: "POST",
            url: "https://ns.servicebus.windows.net/orders/messages".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn header_values_must_travel_unchanged() {
        assert!(check(&request(&[(
            "content-type",
            "application/json; charset=utf-8"
        )]))
        .is_ok());
        for bad in [
            "café",
            "a\r\nx-injected: 1",
            "nul\0",
            " padded",
            "padded ",
            "tab\u{7f}",
        ] {
            let problem = check(&request(&[("x-note", bad)])).unwrap_err();
            assert_eq!(problem.status, 400, "{bad:?}");
            assert_eq!(problem.kind, "unsendable-value");
            assert!(problem.detail.contains("x-note"), "{}", problem.detail);
        }
    }

    #[test]
    fn the_problem_names_the_broker_property_metadata_or_content_type() {
        let props = serde_json::json!({"MessageId": "m-1", "Label": "caf\u{e9}"}).to_string();
        let p = check(&request(&[("brokerproperties", &props)])).unwrap_err();
        assert!(
            p.detail.starts_with("BrokerProperties.Label "),
            "{}",
            p.detail
        );
        let p = check(&request(&[("x-ms-meta-note", "ü")])).unwrap_err();
        assert!(p.detail.contains("metadata value note"), "{}", p.detail);
        let p = check(&request(&[("content-type", "text/plain; x=ü")])).unwrap_err();
        assert!(p.detail.starts_with("Content-Type "), "{}", p.detail);
        // The value itself is not echoed.
        assert!(!p.detail.contains('ü'));
    }

    #[test]
    fn urls_and_header_names_are_checked_too() {
        let mut r = request(&[]);
        r.url = "https://a.blob.core.windows.net/c/b lob".into();
        assert!(check(&r).is_err());
        r.url = "https://a.blob.core.windows.net/c/b#x".into();
        assert!(check(&r).is_err());
        assert!(check(&request(&[("bad name", "v")])).is_err());
    }
}
