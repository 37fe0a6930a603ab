//! Store-and-forward's consumer: a stored request ([`crate::store`]) delivered by the route that
//! stored it, as that route is in the current policy ([`Gateway::deliver`]), with a fresh token
//! and through the route's circuit breaker; or put on the dead-letter queue with its reason.

use super::Gateway;
use crate::breaker::{asked_ms, resource_of, Admission, Caller, Outcome};
use crate::exchange::{BackendRequest, Bearer, Io, Limit, LogFields, OutBody, SendError};
use crate::policy::prepared::{PreparedBackend, PreparedRoute};
use crate::store::FORMAT;

/// What one delivery attempt came to, before the dead-letter queue is asked.
enum Tried {
    /// Azure has it.
    Delivered(String),
    /// Not now: again after this many seconds (or, after the last attempt, a dead letter).
    Later(u64, String),
    /// Never: a dead letter with this reason.
    Refused(String),
}

/// Seconds before a delivery the dead-letter queue did not take is tried again.
const DEAD_LETTER_RETRY_SECS: u64 = 10;

impl Gateway {
    /// Delivers one stored request (store-and-forward's consumer): the request its route sends
    /// (checked against the route as it is in the current policy), with a fresh token, through
    /// the route's circuit breaker. `attempt` counts from 1. A delivery that cannot succeed
    /// (Azure refuses it, its route is gone or changed, it is not a request its route sends, or
    /// its last attempt failed) is put on the dead-letter queue with its reason. Returns what
    /// became of it and the delivery's one log line.
    pub async fn deliver<I: Io>(
        &self,
        stored: &str,
        body: OutBody<'_, I::Bytes>,
        attempt: u32,
        io: &I,
    ) -> (crate::store::Delivered, String) {
        use crate::store::{Delivered, Stored};
        let started = io.now();
        let mut log = LogFields::default();
        let parsed = Stored::parse(stored);
        let tried = match &parsed {
            None => Tried::Refused("it is not a stored request this gateway can read".to_owned()),
            Some(s) => self.deliver_stored(s, body, io, &mut log).await,
        };
        let last = attempt >= self.prepared.max_delivery_attempts;
        let (outcome, state, why) = match tried {
            Tried::Delivered(why) => (Delivered::Yes, "delivered", why),
            Tried::Later(secs, why) if !last => (Delivered::Later(secs), "retry", why),
            Tried::Later(_, why) => {
                let why = format!("its last attempt ({attempt}) failed: {why}");
                self.dead_letter(why, parsed.as_ref(), attempt, last, &log, io)
                    .await
            }
            Tried::Refused(why) => {
                self.dead_letter(why, parsed.as_ref(), attempt, last, &log, io)
                    .await
            }
        };
        #[derive(serde::Serialize)]
        struct Line<'a> {
            level: &'static str,
            kind: &'static str,
            request_id: Option<&'a str>,
            route: Option<&'a str>,
            ids: Option<&'a [String]>,
            attempt: u32,
            outcome: &'static str,
            reason: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            backend_status: Option<u16>,
            #[serde(skip_serializing_if = "Option::is_none")]
            backend_detail: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            breaker: Option<&'static str>,
            stored_ms: Option<f64>,
            duration_ms: f64,
        }
        let line = serde_json::to_string(&Line {
            level: match state {
                "delivered" => "info",
                "retry" => "warn",
                _ => "error",
            },
            kind: "delivery",
            request_id: parsed.as_ref().map(|s| s.request_id.as_str()),
            route: parsed.as_ref().map(|s| s.route.as_str()),
            ids: parsed.as_ref().map(|s| s.ids.as_slice()),
            attempt,
            outcome: state,
            reason: &why,
            backend_status: log.backend_status,
            backend_detail: log.backend_detail.as_deref(),
            breaker: log.breaker,
            stored_ms: parsed
                .as_ref()
                .map(|s| (started - s.stored_at).max(0.0).floor()),
            duration_ms: io.now() - started,
        })
        .unwrap_or_default();
        (outcome, line)
    }

    async fn deliver_stored<I: Io>(
        &self,
        stored: &crate::store::Stored,
        body: OutBody<'_, I::Bytes>,
        io: &I,
        log: &mut LogFields,
    ) -> Tried {
        let Some(route) = self.prepared.routes.iter().find(|r| r.name == stored.route) else {
            return Tried::Refused(format!(
                "its route {} is no longer in the policy",
                crate::store::shown(&stored.route)
            ));
        };
        // Only what the route sends today: a policy changed since, or another producer bound to
        // the queue, must not make the gateway send anything else, anywhere else.
        let request = match stored.request_for(route, io.now()) {
            Ok(request) => request,
            Err(why) => return Tried::Refused(why),
        };
        let (target, created_ok) = match &route.backend {
            PreparedBackend::ServiceBus(sb) => (&sb.token, false),
            PreparedBackend::Blob(b) => (&b.token, true),
            _ => {
                return Tried::Refused(format!(
                    "route \"{}\" is no longer a Service Bus or blob route",
                    route.name
                ))
            }
        };
        // Deliveries are the gateway's own calls: one caller, whose failures count for at most
        // half of what opens a breaker shared with the callers.
        let (call, admitted) = {
            let mut breakers = self.breakers.borrow_mut();
            let call = breakers.call(
                &route.name,
                &route.host,
                Caller::Gateway,
                resource_of(&request.url),
                || io.random(),
            );
            (call, breakers.admit(&call, &route.breaker, io.now()))
        };
        log.breaker = Some(admitted.log_state());
        log.breaker_scope = admitted.scope().map(|s| s.name());
        if let Admission::Open { retry_in_ms, scope } = admitted {
            let secs = (retry_in_ms / 1000.0).ceil().max(1.0) as u64;
            return Tried::Later(
                secs,
                format!("the backend's circuit breaker ({}) is open", scope.name()),
            );
        }
        let record = |outcome: Outcome| {
            self.breakers
                .borrow_mut()
                .record(&call, &route.breaker, admitted, outcome, io.now())
        };
        let grant = match io.token(target).await {
            Ok(grant) => grant,
            Err(no) => {
                record(Outcome::NotSent);
                return Tried::Later(10, format!("no token: {}", no.log));
            }
        };
        let bearer = Bearer::new(target, &grant);
        let limit = Limit::Deadline(30_000.0);
        let sent =
            match crate::backend::send_renewing(io, &request, &bearer, body, limit, log).await {
                Ok(sent) => sent,
                Err(problem) => {
                    record(Outcome::NotSent);
                    return Tried::Later(10, problem.detail);
                }
            };
        match sent {
            Ok(reply) => {
                let status = reply.status;
                log.backend_status = Some(status);
                let code = reply.header("x-ms-error-code").map(str::to_owned);
                let retry_after = crate::retry::parse_retry_after_secs(reply.header("retry-after"));
                if status >= 300 {
                    let text = crate::backend::answer_text(io, reply.body)
                        .await
                        .unwrap_or_else(|note| note);
                    let detail = code.unwrap_or_else(|| text.chars().take(300).collect());
                    log.backend_detail = Some(crate::backend::log_detail(&detail));
                } else {
                    crate::backend::drain(io, reply.body).await;
                }
                if (200..300).contains(&status) {
                    record(Outcome::Answered);
                    Tried::Delivered(format!("Azure answered {status}"))
                } else if created_ok && (status == 409 || status == 412) {
                    // Create-only: the name exists, written by an earlier attempt of this
                    // delivery (or, if another write took the name, by that one).
                    record(Outcome::Answered);
                    Tried::Delivered(format!(
                        "the blob exists already ({status}): written by an earlier attempt"
                    ))
                } else if status == 429 || status >= 500 {
                    record(Outcome::Failed {
                        retry_after_ms: asked_ms(retry_after),
                    });
                    Tried::Later(
                        crate::retry::caller_retry_after(retry_after),
                        format!("Azure answered {status}"),
                    )
                } else {
                    record(Outcome::Answered);
                    Tried::Refused(format!("Azure refused it ({status})"))
                }
            }
            Err(SendError::Unsendable(problem)) => {
                record(Outcome::NotSent);
                Tried::Refused(problem.detail)
            }
            Err(e) => {
                record(Outcome::Failed {
                    retry_after_ms: None,
                });
                Tried::Later(5, format!("Azure could not be reached ({e})"))
            }
        }
    }

    /// Puts a delivery that cannot succeed on the dead-letter queue with its reason; when the
    /// dead-letter queue does not take it, the message stays on the deliveries queue.
    async fn dead_letter<I: Io>(
        &self,
        why: String,
        stored: Option<&crate::store::Stored>,
        attempt: u32,
        last: bool,
        log: &LogFields,
        io: &I,
    ) -> (crate::store::Delivered, &'static str, String) {
        use crate::store::{DeadLetter, Delivered};
        let letter = DeadLetter {
            reason: why.clone(),
            route: stored.map(|s| s.route.clone()),
            request_id: stored.map(|s| s.request_id.clone()),
            ids: stored.map(|s| s.ids.clone()),
            attempts: attempt,
            at: crate::time::Utc::from_millis(io.now()).format("%Y-%m-%dT%H:%M:%SZ"),
            backend_status: log.backend_status,
            backend_detail: log.backend_detail.clone(),
        };
        let letter = serde_json::to_string(&letter).unwrap_or_default();
        match io
            .dead_letter(&self.prepared.dead_letter_binding, &letter)
            .await
        {
            Ok(()) => (Delivered::DeadLettered, "dead_lettered", why),
            // Not lost: the queue keeps it and tries it again, and after its last attempt moves
            // it to the dead-letter queue itself (without the reason, which is in this line).
            Err(not) => (
                Delivered::Later(DEAD_LETTER_RETRY_SECS),
                if last { "dead_letter_by_queue" } else { "retry" },
                format!("{why}; the dead-letter queue did not take it ({not}), so it stays on the queue"),
            ),
        }
    }
}

/// A stored request, as the backends that send it read it.
impl crate::store::Stored {
    /// The request to send for this stored one: checked against `route` as it is in the current
    /// policy, with the gateway's own headers derived at `now_ms`; or why it is not a request
    /// that route sends (then it is dead-lettered, never sent).
    pub fn request_for(
        &self,
        route: &PreparedRoute,
        now_ms: f64,
    ) -> Result<BackendRequest, String> {
        if self.v != FORMAT {
            return Err(format!(
                "it is in format {}; this gateway reads format {FORMAT}",
                self.v
            ));
        }
        if route.store.is_none() {
            return Err(format!(
                "route \"{}\" no longer stores requests",
                route.name
            ));
        }
        let request = match &route.backend {
            PreparedBackend::ServiceBus(sb) => {
                crate::backend::service_bus::stored_request(sb, &route.name, self)?
            }
            PreparedBackend::Blob(b) => {
                crate::backend::blob::stored_request(b, &route.name, self, now_ms)?
            }
            _ => {
                return Err(format!(
                    "route \"{}\" is no longer a Service Bus or blob route",
                    route.name
                ))
            }
        };
        crate::backend::check(&request).map_err(|p| p.detail)?;
        Ok(request)
    }
}
