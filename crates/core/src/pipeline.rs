//! The life of one request, in one place: the phases, in order, run by one driver over one
//! per-request context. Read [`Gateway::handle`] top to bottom:
//!
//! 1. **request id**: the caller's `x-request-id` when it is sane, else a new one;
//! 2. **preflight**: a CORS preflight is answered here, for the route the browser asks about;
//! 3. **route**: method and path to a route, or 404 / 405;
//! 4. **cheap checks**: IP, size, content type, required headers;
//! 5. **credentials**: API key, JWT;
//! 6. **rate limit**: counted per route and caller;
//! 7. **build**: the backend reads what it needs of the request and builds its request(s) as
//!    data, every caller value checked and passed through the outgoing gate;
//! 8. **token**: the identity's token for the backend's audience;
//! 9. **send**: the backend request(s), retried where a retry is safe;
//! 10. **answer**: the backend's reply as the caller's answer;
//! 11. **log**: one JSON line, whatever happened above.
//!
//! The driver decides; it performs no I/O. What it needs from outside (the clock, a secret, a
//! key set, a signature check, a rate-limit count, a token, a body, a send) it asks of an
//! [`Io`], which the edge implements with JavaScript and the tests implement with fakes: the
//! unit tests drive exactly the code production runs. Backends plug in through [`Backend`]; what
//! the driver, the backends and the edge exchange is in [`crate::exchange`]. Store-and-forward's
//! consumer, [`Gateway::deliver`], is in pipeline/delivery.rs.

use std::cell::RefCell;

use serde_json::{Map, Value};

use crate::backend::azure_rest;
use crate::breaker::{asked_ms, circuit_open, resource_of, Admission, Breakers, Call, Outcome};
use crate::exchange::{
    Answer, AnswerBody, Backend, Bearer, Cx, Grant, Io, LogFields, RequestHead, StoredPlan,
};
use crate::fasthash::FastMap;
use crate::inbound::{self, jwt};
use crate::policy::prepared::{Prepared, PreparedBackend, PreparedRoute, TokenTarget};
use crate::problem::Problem;
use crate::routing::RouteMatch;

mod delivery;
mod valet;

// ---------------------------------------------------------------------------------------------
// The gateway and its driver

/// A loaded policy and the isolate's shared state. One per isolate.
pub struct Gateway {
    prepared: Prepared,
    /// Key sets of JWT checks, by URL.
    jwks: RefCell<jwt::JwksCache>,
    /// SHA-256 of API keys held in Worker secrets, by secret name (hashed once per isolate).
    key_digests: RefCell<FastMap<String, Option<[u8; 32]>>>,
    /// The circuit breakers of backend hosts.
    breakers: RefCell<Breakers>,
    /// Storage's user delegation keys the valet-key routes sign with, by account and identity.
    delegation_keys: RefCell<crate::sas::KeyCache>,
}

/// A request that matched a route.
#[derive(Debug)]
pub struct Matched<'g> {
    pub route: &'g PreparedRoute,
    pub params: Vec<(String, String)>,
}

impl Gateway {
    pub fn new(prepared: Prepared) -> Gateway {
        Gateway {
            prepared,
            jwks: RefCell::new(jwt::JwksCache::new()),
            key_digests: RefCell::new(FastMap::default()),
            breakers: RefCell::new(Breakers::default()),
            delegation_keys: RefCell::new(crate::sas::KeyCache::default()),
        }
    }

    /// Compiles `policy.json` text (as build.rs does) and loads the result: for tests and tools.
    #[cfg(feature = "compile")]
    pub fn load(text: &str) -> Result<Gateway, Vec<crate::policy::PolicyError>> {
        crate::policy::compile(text).map(Gateway::new)
    }

    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }

    /// Runs one request through every phase. Returns the caller's answer and the request's one
    /// log line.
    pub async fn handle<'r, I: Io>(
        &'r self,
        head: &'r RequestHead,
        io: &I,
    ) -> (Answer<I::Stream>, String) {
        let started = io.now();
        // 1. request id
        let request_id = match request_id(head.header("x-request-id")) {
            Some(id) => id.to_owned(),
            None => io.uuid(),
        };
        let mut cx = Cx {
            head,
            request_id,
            route: None,
            params: Vec::new(),
            query: crate::encoding::query_pairs(&head.query),
            api_key: None,
            claims: None,
            log: LogFields::default(),
        };
        let mut cors = Vec::new();
        let mut answer = match self.phases(&mut cx, &mut cors, io).await {
            Ok(answer) => answer,
            Err(problem) => {
                cx.log.problem = Some(problem.kind);
                Answer::problem(&problem, &head.path, &cx.request_id)
            }
        };
        answer.headers.push(("x-request-id", cx.request_id.clone()));
        answer.headers.extend(cors);
        // 11. log
        let line = log_line(&cx, answer.status, io.now() - started);
        (answer, line)
    }

    /// Phases 2 to 10.
    async fn phases<'r, I: Io>(
        &'r self,
        cx: &mut Cx<'r>,
        cors: &mut Vec<(&'static str, String)>,
        io: &I,
    ) -> Result<Answer<I::Stream>, Problem> {
        let head = cx.head;
        // 2. preflight
        if head.method == "OPTIONS" {
            if let Some(requested) = head.header("access-control-request-method") {
                return self.preflight(cx, requested);
            }
        }
        // 3. route
        let matched = self.route(&head.method, &head.path)?;
        let route = matched.route;
        cx.route = Some(route);
        cx.params = matched.params;
        let inbound = &route.inbound;
        if let Some(policy) = &inbound.cors {
            *cors = inbound::cors::response_headers(policy, head.header("origin"));
        }
        // 4. cheap checks
        let client_ip = head.header("cf-connecting-ip");
        let content_length = head.content_length();
        let header = |name: &str| head.header(name).map(str::to_owned);
        let facts = inbound::RequestFacts {
            client_ip,
            content_length,
            has_body: head.has_body && content_length != Some(0),
            content_type: head.header("content-type"),
            header: &header,
        };
        inbound::check_request(inbound, route.ip.as_ref(), &facts)?;
        // 5. credentials
        if let Some(check) = &route.api_key {
            let name = inbound::api_key::check(check, head.header(&check.header), |secret| {
                self.secret_digest(secret, io)
            })?;
            cx.api_key = Some(name.to_owned());
        }
        if let Some(check) = &inbound.jwt {
            cx.claims = Some(
                self.validate_jwt(check, head.header("authorization"), io)
                    .await?,
            );
        }
        // 6. rate limit
        if let Some(limit) = &inbound.rate_limit {
            let subject = cx
                .claims
                .as_ref()
                .and_then(|c| c.get("sub"))
                .and_then(Value::as_str);
            let who =
                inbound::rate_limit_subject(limit.key, cx.api_key.as_deref(), subject, client_ip)?;
            match io
                .rate_limit(&limit.binding, &format!("{}:{who}", route.name))
                .await
            {
                Ok(true) => {}
                Ok(false) => return Err(inbound::rate_limited(limit)),
                Err(missing) => return Err(inbound::rate_limit_unavailable(missing)),
            }
        }
        // 7–10: the backend, with the token in between.
        match &route.backend {
            PreparedBackend::ServiceBus(sb) => self.call(sb, &sb.token, cx, io).await,
            PreparedBackend::Blob(b) => self.call(b, &b.token, cx, io).await,
            PreparedBackend::EventHubs(eh) => self.call(eh, &eh.token, cx, io).await,
            PreparedBackend::StorageQueue(q) => self.call(q, &q.token, cx, io).await,
            PreparedBackend::AzureRest(r) => self.call(r, &r.token, cx, io).await,
            PreparedBackend::BlobSas(s) => self.valet(s, cx, io).await,
            PreparedBackend::AzureOperation(op) => {
                // 7. build: the handle opened; the call is the route's that started it.
                let (rest, plan) = azure_rest::build_operation(op, &self.prepared.routes, cx, io)?;
                self.call_planned(rest, &rest.token, plan, cx, io).await
            }
        }
    }

    /// Phases 7 to 10 for one backend.
    async fn call<B: Backend, I: Io>(
        &self,
        backend: &B,
        target: &TokenTarget,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Answer<I::Stream>, Problem> {
        // 7. build
        let plan = backend.build(cx, io).await?;
        self.call_planned(backend, target, plan, cx, io).await
    }

    /// Phases 8 to 10 for a built plan.
    async fn call_planned<B: Backend, I: Io>(
        &self,
        backend: &B,
        target: &TokenTarget,
        plan: B::Plan<I::Bytes>,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Answer<I::Stream>, Problem> {
        // 8. breaker and token
        let resource = resource_of(&backend.request(&plan).url);
        let (call, admitted, grant) = match self.admit_and_grant(target, resource, cx, io).await {
            Ok(granted) => granted,
            Err((problem, true)) => return self.store(backend, &plan, problem, cx, io).await,
            Err((problem, false)) => return Err(problem),
        };
        // 9. send
        let bearer = Bearer::new(target, &grant);
        let sent = backend.send(&plan, &bearer, cx, io).await;
        let outcome = self.settle(cx, &call, admitted, sent.as_ref().err(), io);
        let reply = match sent {
            Ok(reply) => reply,
            // Unavailable: a storing route keeps it. Not an unknown outcome: Azure may have it.
            Err(problem)
                if matches!(outcome, Outcome::Failed { .. }) && problem.kind != UNKNOWN =>
            {
                return self.store(backend, &plan, problem, cx, io).await
            }
            Err(problem) => return Err(problem),
        };
        // 10. answer
        Ok(backend.answer(&plan, reply, cx))
    }

    /// Phase 8: the circuit breakers (calls recently found failing are not made: fail fast,
    /// then probes after the cool-down; see [`crate::breaker`] for who is refused on whose
    /// failures), then the identity's token. An error says whether the request may be stored
    /// (Azure or the identity provider unavailable).
    async fn admit_and_grant<I: Io>(
        &self,
        target: &TokenTarget,
        resource: &str,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<(Call, Admission, Grant), (Problem, bool)> {
        let route = cx
            .route
            .ok_or_else(|| (Problem::internal("no route"), false))?;
        let (call, admitted) = {
            let mut breakers = self.breakers.borrow_mut();
            let call = breakers.call(
                &route.name,
                &route.host,
                cx.breaker_caller(),
                resource,
                || io.random(),
            );
            (call, breakers.admit(&call, &route.breaker, io.now()))
        };
        if route.breaker.failures > 0 {
            cx.log.breaker = Some(admitted.log_state());
            cx.log.breaker_scope = admitted.scope().map(|s| s.name());
        }
        if let Admission::Open { retry_in_ms, scope } = admitted {
            return Err((circuit_open(retry_in_ms, scope), true));
        }
        cx.log.identity = Some(target.identity.clone());
        match io.token(target).await {
            Ok(grant) => {
                cx.log.token = Some(grant.source);
                cx.log.idp_ms = grant.idp_ms;
                cx.log.token_ttl_s = Some((grant.token.expires_at - io.now()) / 1000.0);
                Ok((call, admitted, grant))
            }
            Err(no) => {
                self.settle(cx, &call, admitted, None, io);
                cx.log.token_error = Some(no.log);
                // The identity provider is unavailable (no token cached): may be stored. A
                // refused credential is not a reason to store anything.
                let storable = no.problem.status == 503;
                Err((no.problem, storable))
            }
        }
    }

    /// Tells the breakers how the call went (`failed`: the send's problem, if any; a call that
    /// never went out says nothing), and returns the outcome.
    fn settle<I: Io>(
        &self,
        cx: &Cx<'_>,
        call: &Call,
        admitted: Admission,
        failed: Option<&Problem>,
        io: &I,
    ) -> Outcome {
        let outcome = match failed {
            // A failed call that streamed the caller's body may be the caller's doing: a client
            // that stalls or breaks its uploads must not open a breaker, even its own.
            Some(_) if cx.log.caller_stream => Outcome::NotSent,
            // An unknown outcome whose last answer was Azure's own refusal (a create-only write
            // that found its lost attempt's blob: 409): Azure answered.
            Some(p) if p.kind == UNKNOWN && cx.log.backend_status.is_some_and(|s| s < 500) => {
                Outcome::Answered
            }
            Some(p) if matches!(p.kind, "backend-unavailable" | "backend-timeout" | UNKNOWN) => {
                Outcome::Failed {
                    retry_after_ms: asked_ms(cx.log.retry_after),
                }
            }
            Some(p) if p.kind == "unsendable-value" => Outcome::NotSent,
            _ if cx.log.token.is_none() => Outcome::NotSent,
            _ => Outcome::Answered,
        };
        if let Some(route) = cx.route {
            let counted = if cx.log.batch_follower {
                Outcome::NotSent
            } else {
                outcome
            };
            self.breakers
                .borrow_mut()
                .record(call, &route.breaker, admitted, counted, io.now());
        }
        outcome
    }

    /// Azure is unavailable for this call: a route that stores requests puts it on its queue
    /// and answers 202 `queued`; otherwise (or when it cannot be stored) `problem` stands.
    async fn store<B: Backend, I: Io>(
        &self,
        backend: &B,
        plan: &B::Plan<I::Bytes>,
        problem: Problem,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<Answer<I::Stream>, Problem> {
        if cx.route.is_none_or(|r| r.store.is_none()) {
            return Err(problem);
        }
        self.enqueue(backend.stored(plan), problem, cx, io).await?;
        Ok(backend.queued(plan))
    }

    /// Puts a stored request on the route's queue; `problem` stands when it cannot be.
    async fn enqueue<I: Io>(
        &self,
        stored: Option<StoredPlan<'_, I::Bytes>>,
        problem: Problem,
        cx: &mut Cx<'_>,
        io: &I,
    ) -> Result<(), Problem> {
        let (Some(route), Some(stored)) = (cx.route, stored) else {
            cx.log.stored = Some(format!(
                "not stored: the body was streamed to Azure (only bodies of at most {} bytes, of known length, are held to be stored)",
                crate::store::MAX_STORED_BODY_BYTES
            ));
            return Err(problem);
        };
        let Some(binding) = &route.store else {
            return Err(problem);
        };
        let description = crate::store::Stored::new(
            &route.name,
            &cx.request_id,
            stored.request,
            stored.ids,
            io.now(),
        );
        let text = serde_json::to_string(&description).unwrap_or_default();
        match io
            .enqueue(
                binding,
                &text,
                stored.body,
                crate::store::MAX_STORED_BODY_BYTES,
            )
            .await
        {
            Ok(()) => {
                cx.log.stored = Some("queued".to_owned());
                cx.log.problem_avoided = Some(problem.kind);
                Ok(())
            }
            Err(why) => {
                cx.log.stored = Some(format!("not stored: {why}"));
                Err(problem)
            }
        }
    }

    /// Phase 3: the route for a method and a raw path (without query string).
    pub fn route(&self, method: &str, raw_path: &str) -> Result<Matched<'_>, Problem> {
        match self.prepared.router.find(method, raw_path) {
            RouteMatch::Found { route, params } => match self.prepared.routes.get(route) {
                Some(route) => Ok(Matched { route, params }),
                None => Err(Problem::not_found(raw_path)),
            },
            RouteMatch::MethodNotAllowed { allow } => {
                let allow: Vec<&str> = allow.iter().map(|m| m.as_str()).collect();
                Err(Problem::method_not_allowed(method, &allow.join(", ")))
            }
            RouteMatch::NotFound => Err(Problem::not_found(raw_path)),
            RouteMatch::BadPath => Err(Problem::bad_path()),
        }
    }

    /// The route a CORS preflight asks about (`Access-Control-Request-Method` on this path). A
    /// path the gateway has but not for that method is a CORS refusal (403 `cors-rejected`, as
    /// for any method, origin or header the route does not allow cross-origin), not a 405: the
    /// preflight itself, an OPTIONS, is what the browser sent.
    pub fn preflight_route(&self, requested: &str, raw_path: &str) -> Result<Matched<'_>, Problem> {
        self.route(requested, raw_path).map_err(|p| {
            if p.status == 405 {
                Problem::new(
                    403,
                    "cors-rejected",
                    "Cross-origin request not allowed",
                    format!("{requested} is not a method of this route, so browsers may not send it cross-origin."),
                )
            } else {
                p
            }
        })
    }

    /// Phase 2: a preflight, answered for the route the browser means to call.
    fn preflight<'r, S>(&'r self, cx: &mut Cx<'r>, requested: &str) -> Result<Answer<S>, Problem> {
        let head = cx.head;
        let matched = self.preflight_route(requested, &head.path)?;
        cx.route = Some(matched.route);
        let cors = matched.route.inbound.cors.as_ref().ok_or_else(|| {
            Problem::new(
                403,
                "cors-rejected",
                "Cross-origin request not allowed",
                "This route does not accept cross-origin requests from browsers.",
            )
        })?;
        let headers = inbound::cors::preflight(
            cors,
            &matched.route.methods,
            head.header("origin"),
            requested,
            head.header("access-control-request-headers"),
        )?;
        Ok(Answer {
            status: 204,
            headers,
            body: AnswerBody::Empty,
        })
    }

    /// The SHA-256 of the API key in a Worker secret: read and hashed once per isolate.
    fn secret_digest<I: Io>(&self, name: &str, io: &I) -> Option<[u8; 32]> {
        if let Some(known) = self.key_digests.borrow().get(name) {
            return *known;
        }
        let digest = io
            .secret(name)
            .map(|value| crate::crypto::sha256(value.as_bytes()));
        self.key_digests
            .borrow_mut()
            .insert(name.to_owned(), digest);
        digest
    }

    /// Phase 5's JWT check: parse, the key from the isolate's key sets (fetched once for all
    /// callers when missing, again at most once a minute for an unknown `kid`), the signature,
    /// the claims.
    async fn validate_jwt<I: Io>(
        &self,
        check: &crate::policy::JwtCheck,
        authorization: Option<&str>,
        io: &I,
    ) -> Result<Map<String, Value>, Problem> {
        let token = jwt::bearer_token(authorization)?;
        jwt::validate(
            token,
            check,
            io.now(),
            async |parsed: &jwt::Parsed| self.jwt_key(check, parsed, io).await,
            async |alg, jwk: &Value, input: &[u8], signature: &[u8]| {
                io.verify(alg, jwk, input, signature).await
            },
        )
        .await
    }

    async fn jwt_key<I: Io>(
        &self,
        check: &crate::policy::JwtCheck,
        parsed: &jwt::Parsed,
        io: &I,
    ) -> Result<Value, Problem> {
        enum Next {
            Found(Option<Value>),
            Lead,
            Wait,
            Failed,
        }
        let started = io.now();
        loop {
            let now = io.now();
            let next = {
                let mut cache = self.jwks.borrow_mut();
                let next = match cache.lookup(check, now) {
                    jwt::JwksLookup::Fresh(jwks) => {
                        Next::Found(jwt::select_key(jwks, parsed).cloned())
                    }
                    jwt::JwksLookup::Failed => Next::Failed,
                    jwt::JwksLookup::Missing | jwt::JwksLookup::Expired => Next::Wait,
                };
                match next {
                    Next::Wait if cache.claim_fetch(check, now) => Next::Lead,
                    next => next,
                }
            };
            match next {
                Next::Found(Some(jwk)) => return Ok(jwk),
                // The issuer may have rotated its keys: fetch again, at most once a minute.
                Next::Found(None) => {
                    if !self
                        .jwks
                        .borrow_mut()
                        .may_refetch_for_unknown_kid(check, now)
                    {
                        return Err(jwt::no_key());
                    }
                    let jwks = self.fetch_jwks(check, io).await?;
                    return jwt::select_key(&jwks, parsed)
                        .cloned()
                        .ok_or_else(jwt::no_key);
                }
                Next::Lead => {
                    let jwks = self.fetch_jwks(check, io).await?;
                    return jwt::select_key(&jwks, parsed)
                        .cloned()
                        .ok_or_else(jwt::no_key);
                }
                Next::Failed => return Err(jwt::jwks_unavailable("a recent fetch failed")),
                Next::Wait if now - started > jwt::JWKS_LEADER_TIMEOUT_MS => {
                    return Err(jwt::jwks_unavailable("the key set fetch took too long"))
                }
                // Another request is fetching the key set: look again shortly.
                Next::Wait => io.sleep(5.0).await,
            }
        }
    }

    async fn fetch_jwks<I: Io>(
        &self,
        check: &crate::policy::JwtCheck,
        io: &I,
    ) -> Result<Value, Problem> {
        let result = io
            .fetch_jwks(&check.jwks_url, jwt::MAX_JWKS_BYTES)
            .await
            .and_then(|body| {
                jwt::parse_jwks(&body)
                    .ok_or("the key set URL answered something that is not a key set")
            });
        let now = io.now();
        let mut cache = self.jwks.borrow_mut();
        match &result {
            Ok(jwks) => cache.store(check, jwks.clone(), now),
            Err(_) => cache.fail(check, now),
        }
        result.map_err(jwt::jwks_unavailable)
    }
}

/// The problem kind of a call whose outcome is unknown ([`crate::backend::outcome_unknown`]).
const UNKNOWN: &str = "backend-outcome-unknown";

/// Phase 1: the caller's request id, when it is one we can safely echo and log: 1 to 128
/// characters of letters, digits and `-._:`. Anything else is replaced by a generated id.
pub fn request_id(header: Option<&str>) -> Option<&str> {
    header.filter(|id| {
        (1..=128).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    })
}

/// Phase 11: the one JSON log line of a request.
fn log_line(cx: &Cx<'_>, status: u16, duration_ms: f64) -> String {
    let log = &cx.log;
    let mut line = crate::encoding::JsonObject::with_capacity(256);
    line.str("level", if status >= 500 { "error" } else { "info" })
        .str("request_id", &cx.request_id)
        .str("method", &cx.head.method)
        // No query string: queries may carry things not meant for logs.
        .str("path", &cx.head.path)
        .str_or_null("route", cx.route.map(|r| r.name.as_str()))
        .uint("status", u64::from(status))
        .float("duration_ms", duration_ms)
        .opt_str("problem", log.problem)
        .opt_str("api_key", cx.api_key.as_deref())
        .opt_str("identity", log.identity.as_deref())
        .opt_str("token", log.token);
    if let Some(ms) = log.idp_ms {
        line.float("idp_ms", ms);
    }
    if let Some(ttl) = log.token_ttl_s {
        line.float("token_ttl_s", ttl.floor());
    }
    line.opt_str("token_error", log.token_error.as_deref());
    if log.token_renewed {
        line.bool("token_renewed", true);
    }
    line.opt_str("breaker", log.breaker)
        .opt_str("breaker_scope", log.breaker_scope)
        .opt_str("stored", log.stored.as_deref())
        .opt_str("unavailable", log.problem_avoided);
    if let Some(status) = log.backend_status {
        line.uint("backend_status", u64::from(status));
    }
    line.opt_str("backend_detail", log.backend_detail.as_deref());
    if let Some((size, leader)) = &log.batch {
        line.uint("batch", *size as u64).str("batch_leader", leader);
    }
    // A minted URL is named by its blob, permission and expiry: never the URL (a credential).
    line.opt_str("key", log.key);
    if let Some(minted) = &log.minted {
        line.str("blob", &minted.blob)
            .str("sas_permission", minted.permission)
            .str("sas_expires", &minted.expires);
    }
    line.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log line as serde_json's derive wrote it before [`log_line`] wrote it by hand.
    fn reference_line(cx: &Cx<'_>, status: u16, duration_ms: f64) -> String {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            level: &'static str,
            request_id: &'a str,
            method: &'a str,
            path: &'a str,
            route: Option<&'a str>,
            status: u16,
            duration_ms: f64,
            #[serde(skip_serializing_if = "Option::is_none")]
            problem: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            api_key: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            identity: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            token: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            idp_ms: Option<f64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            token_ttl_s: Option<f64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            token_error: Option<&'a str>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            token_renewed: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            breaker: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            breaker_scope: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            stored: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            unavailable: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            backend_status: Option<u16>,
            #[serde(skip_serializing_if = "Option::is_none")]
            backend_detail: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            batch: Option<usize>,
            #[serde(skip_serializing_if = "Option::is_none")]
            batch_leader: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            key: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            blob: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            sas_permission: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            sas_expires: Option<&'a str>,
        }
        let log = &cx.log;
        serde_json::to_string(&Line {
            level: if status >= 500 { "error" } else { "info" },
            request_id: &cx.request_id,
            method: &cx.head.method,
            path: &cx.head.path,
            route: cx.route.map(|r| r.name.as_str()),
            status,
            duration_ms,
            problem: log.problem,
            api_key: cx.api_key.as_deref(),
            identity: log.identity.as_deref(),
            token: log.token,
            idp_ms: log.idp_ms,
            token_ttl_s: log.token_ttl_s.map(f64::floor),
            token_error: log.token_error.as_deref(),
            token_renewed: log.token_renewed,
            breaker: log.breaker,
            breaker_scope: log.breaker_scope,
            stored: log.stored.as_deref(),
            unavailable: log.problem_avoided,
            backend_status: log.backend_status,
            backend_detail: log.backend_detail.as_deref(),
            batch: log.batch.as_ref().map(|(n, _)| *n),
            batch_leader: log.batch.as_ref().map(|(_, l)| l.as_str()),
            key: log.key,
            blob: log.minted.as_ref().map(|m| m.blob.as_str()),
            sas_permission: log.minted.as_ref().map(|m| m.permission),
            sas_expires: log.minted.as_ref().map(|m| m.expires.as_str()),
        })
        .unwrap()
    }

    #[test]
    fn log_line_is_the_json_serde_wrote() {
        let strange = "a\"b\\c\nd\re\tf\u{1}\u{8}\u{c}\u{1f}\u{7f}é漢😀</script>";
        let head = RequestHead {
            method: "POST".into(),
            path: format!("/sb/{strange}"),
            ..Default::default()
        };
        let durations = [
            0.0,
            -0.0,
            1.0,
            12.0,
            2.5,
            -3.0,
            1e15,
            1e16,
            123456789.0,
            f64::NAN,
        ];
        for (i, duration) in durations.into_iter().enumerate() {
            let mut cx = Cx {
                head: &head,
                request_id: format!("req-{i}{strange}"),
                route: None,
                params: Vec::new(),
                query: Vec::new(),
                api_key: (i % 2 == 0).then(|| format!("key{strange}")),
                claims: None,
                log: LogFields::default(),
            };
            if i % 3 != 0 {
                cx.log = LogFields {
                    problem: Some("backend-unavailable"),
                    identity: Some("orders".into()),
                    token: Some("cache"),
                    idp_ms: Some(duration * 3.0),
                    token_ttl_s: Some(3599.7 + duration),
                    token_error: Some(format!("no {strange}")),
                    backend_status: Some(503),
                    backend_detail: Some(strange.into()),
                    token_renewed: i % 2 == 1,
                    breaker: Some("open"),
                    breaker_scope: Some("host"),
                    retry_after: Some(7),
                    stored: Some("queued".into()),
                    caller_stream: false,
                    problem_avoided: Some("backend-unavailable"),
                    batch: Some((i + 2, format!("leader{strange}"))),
                    batch_follower: i % 2 == 0,
                    key: Some("waited"),
                    minted: Some(crate::exchange::Minted {
                        blob: format!("t/{strange}"),
                        permission: "create",
                        expires: "2026-12-07T14:00:00Z".into(),
                    }),
                };
            }
            for status in [200, 404, 503] {
                assert_eq!(
                    log_line(&cx, status, duration),
                    reference_line(&cx, status, duration),
                    "duration {duration}, status {status}"
                );
            }
            let line: Value = serde_json::from_str(&log_line(&cx, 202, duration)).unwrap();
            assert_eq!(line["request_id"], Value::from(cx.request_id.clone()));
        }
    }

    #[test]
    fn request_id_keeps_sane_ids_only() {
        assert_eq!(
            request_id(Some("0af7651916cd43dd8448eb211c80319c")),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(request_id(Some("a b")), None);
        assert_eq!(request_id(Some("")), None);
        assert_eq!(request_id(Some("x\n{\"forged\":1}")), None);
        assert_eq!(request_id(Some(&"a".repeat(129))), None);
        assert_eq!(request_id(None), None);
    }
}
