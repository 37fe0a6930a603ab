//! The fake I/O of the request driver, shared by the host tests (tests/driver.rs) and the
//! cost meter (bench/cost): a fake clock, fake secrets, a fake rate limiter, fake Azure
//! replies answered at once, a record of everything that would have been sent, and
//! [`block_on`] to run the driver over it. One copy, included by both with `#[path]`.

// Each includer uses a part of it.
#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use azure_edge_gateway::exchange::{
    BackendRequest, BodyError, Grant, Io, Limit, NoToken, OutBody, Reply, RequestHead, SendError,
};
use azure_edge_gateway::identity::{Token, TokenKey};
use azure_edge_gateway::policy::prepared::TokenTarget;
use azure_edge_gateway::policy::JwtAlgorithm;
use azure_edge_gateway::problem::Problem;
use serde_json::Value;

/// Runs a future whose I/O is all fake (it never waits on anything real).
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// Runs several futures at once, round robin, until all are done (as an isolate runs the
/// requests in flight): with [`Fake::concurrent`], each send and sleep lets the others run.
pub fn block_on_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut cx = Context::from_waker(Waker::noop());
    while outs.iter().any(Option::is_none) {
        for (future, out) in futures.iter_mut().zip(outs.iter_mut()) {
            if out.is_none() {
                if let Poll::Ready(done) = future.as_mut().poll(&mut cx) {
                    *out = Some(done);
                }
            }
        }
    }
    outs.into_iter().map(Option::unwrap).collect()
}

/// Pending once, then ready: lets the other futures of [`block_on_all`] run.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            Poll::Pending
        }
    }
}

/// What the fake Azure saw: one request.
#[derive(Debug, Clone)]
pub struct Sent {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub token: Option<String>,
    pub body: Vec<u8>,
    /// The caller's stream passed through, with this length.
    pub stream: Option<u64>,
    pub limit: Limit,
}

impl Sent {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A fake Azure reply: status, headers, body; or no reply at all.
pub type FakeReply = Result<(u16, Vec<(String, String)>, String), SendError>;

#[derive(Default)]
pub struct Fake {
    /// Sends (once recorded, before their answer) and sleeps let other requests run once, so that
    /// requests run with [`block_on_all`] are in flight together.
    pub concurrent: bool,
    pub clock: Cell<f64>,
    pub uuids: Cell<u32>,
    /// How many times the CSPRNG was asked (each answer differs).
    pub random_fills: Cell<u32>,
    pub secrets: HashMap<String, String>,
    pub secret_reads: Cell<u32>,
    pub body: Option<Vec<u8>>,
    pub body_pos: Cell<usize>,
    pub replies: RefCell<VecDeque<FakeReply>>,
    /// Replies by URL: a send whose URL contains the text gets this one, every time (before
    /// `replies`).
    pub by_url: RefCell<Vec<(String, FakeReply)>>,
    pub sent: RefCell<Vec<Sent>>,
    pub tokens_asked: Cell<u32>,
    pub no_token: Option<Problem>,
    pub rate_allowed: Cell<Option<bool>>,
    pub jwks: Option<String>,
    pub jwks_fetches: Cell<u32>,
    pub verify_ok: bool,
    pub evicted: RefCell<Vec<String>>,
    /// Store-and-forward: what was put on the queue (binding, stored request, body).
    pub enqueued: RefCell<Vec<(String, String, Vec<u8>)>>,
    /// Store-and-forward's consumer: the dead letters (binding, reason as JSON).
    pub dead_letters: RefCell<Vec<(String, Value)>>,
    /// The dead-letter queue refuses, with this error.
    pub dead_letter_refused: Option<String>,
    /// The limit of each reply body the core read.
    pub text_limits: RefCell<Vec<u32>>,
}

impl Fake {
    pub fn new() -> Fake {
        Fake {
            clock: Cell::new(1_700_000_000_000.0),
            verify_ok: true,
            ..Fake::default()
        }
    }

    pub fn with_body(mut self, body: &[u8]) -> Fake {
        self.body = Some(body.to_vec());
        self
    }

    pub fn reply(self, status: u16, headers: &[(&str, &str)], body: &str) -> Fake {
        self.replies.borrow_mut().push_back(Ok((
            status,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body.to_owned(),
        )));
        self
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.sent.borrow().clone()
    }

    /// Every send whose URL contains `part` gets this reply from now on.
    pub fn answer_for(&self, part: &str, reply: FakeReply) {
        self.by_url.borrow_mut().insert(0, (part.to_owned(), reply));
    }
}

impl Io for Fake {
    type Bytes = Vec<u8>;
    type Stream = String;

    fn now(&self) -> f64 {
        // Each look at the clock moves it on a little, as time does.
        self.clock.set(self.clock.get() + 1.0);
        self.clock.get()
    }

    fn uuid(&self) -> String {
        self.uuids.set(self.uuids.get() + 1);
        format!("00000000-0000-4000-8000-{:012}", self.uuids.get())
    }

    fn random(&self) -> f64 {
        0.5
    }

    fn fill_random(&self, out: &mut [u8]) {
        // Distinct on every call, as a CSPRNG's would be.
        self.random_fills.set(self.random_fills.get() + 1);
        let seed = self.random_fills.get().to_le_bytes();
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = seed[i % seed.len()] ^ (i as u8);
        }
    }

    fn secret(&self, name: &str) -> Option<String> {
        self.secret_reads.set(self.secret_reads.get() + 1);
        self.secrets.get(name).cloned()
    }

    async fn rate_limit(&self, _binding: &str, _key: &str) -> Result<bool, bool> {
        match self.rate_allowed.get() {
            Some(allowed) => Ok(allowed),
            None => Err(true),
        }
    }

    async fn fetch_jwks(&self, _url: &str, _limit: u32) -> Result<String, &'static str> {
        self.jwks_fetches.set(self.jwks_fetches.get() + 1);
        self.jwks
            .clone()
            .ok_or("the key set URL could not be reached")
    }

    async fn verify(&self, _alg: JwtAlgorithm, _jwk: &Value, _data: &[u8], _sig: &[u8]) -> bool {
        self.verify_ok
    }

    async fn token(&self, target: &TokenTarget) -> Result<Grant, NoToken> {
        self.tokens_asked.set(self.tokens_asked.get() + 1);
        if let Some(problem) = &self.no_token {
            return Err(NoToken {
                problem: problem.clone(),
                log: "unavailable".into(),
            });
        }
        Ok(Grant {
            token: Token {
                // A new token after an eviction (as the isolate's cache would fetch one).
                access_token: match self.evicted.borrow().len() {
                    0 => format!("token-for-{}", target.identity),
                    n => format!("token-for-{}-{}", target.identity, n + 1),
                }
                .into(),
                obtained_at: 0.0,
                expires_at: self.clock.get() + 3_600_000.0,
            },
            source: "cache",
            idp_ms: None,
        })
    }

    fn evict_token(&self, _key: &TokenKey, access_token: &str) {
        self.evicted.borrow_mut().push(access_token.to_owned());
    }

    async fn read_body(&self, limit: u64) -> Result<Option<(Vec<u8>, u64)>, BodyError> {
        match &self.body {
            None => Ok(None),
            Some(b) if b.len() as u64 > limit => Err(BodyError::TooLarge(b.len() as u64)),
            Some(b) => Ok(Some((b.clone(), b.len() as u64))),
        }
    }

    fn bytes(&self, body: &Vec<u8>) -> Vec<u8> {
        body.clone()
    }

    async fn keep_text(&self, text: String, _release: Option<&Vec<u8>>) -> Option<Vec<u8>> {
        Some(text.into_bytes())
    }

    async fn next_block(
        &self,
        block_bytes: u32,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, u64)>, BodyError> {
        let Some(body) = &self.body else {
            return Ok(None);
        };
        let at = self.body_pos.get();
        if at >= body.len() {
            return Ok(None);
        }
        let end = (at + block_bytes as usize).min(body.len());
        if end as u64 > limit {
            return Err(BodyError::TooLarge(end as u64));
        }
        self.body_pos.set(end);
        Ok(Some((body[at..end].to_vec(), (end - at) as u64)))
    }

    async fn send(
        &self,
        request: &BackendRequest,
        token: Option<&str>,
        body: OutBody<'_, Vec<u8>>,
        limit: Limit,
    ) -> Result<Reply<String>, SendError> {
        azure_edge_gateway::backend::check(request).map_err(SendError::Unsendable)?;
        let (bytes, stream) = match body {
            OutBody::None => (Vec::new(), None),
            OutBody::Bytes(b) => (b.clone(), None),
            OutBody::Text(t) => (t.as_bytes().to_vec(), None),
            OutBody::CallerStream { length } => (Vec::new(), Some(length)),
        };
        self.sent.borrow_mut().push(Sent {
            method: request.method,
            url: request.url.clone(),
            headers: request.headers.clone(),
            token: token.map(str::to_owned),
            body: bytes,
            stream,
            limit,
        });
        // Out on the wire: the answer is not back yet.
        if self.concurrent {
            YieldOnce(false).await;
        }
        let by_url = self
            .by_url
            .borrow()
            .iter()
            .find(|(part, _)| request.url.contains(part.as_str()))
            .map(|(_, reply)| reply.clone());
        let reply = match by_url {
            Some(reply) => reply,
            None => self.replies.borrow_mut().pop_front().unwrap_or(Ok((
                201,
                Vec::new(),
                String::new(),
            ))),
        };
        reply.map(|(status, headers, body)| Reply {
            status,
            headers,
            body: Some(body),
        })
    }

    async fn text(&self, body: String, limit: u32) -> Result<String, BodyError> {
        self.text_limits.borrow_mut().push(limit);
        if let Some(why) = body.strip_prefix("<broken>") {
            return Err(BodyError::Unreadable(why.to_owned()));
        }
        if body.len() > limit as usize {
            // As the edge: it stops reading past the limit and says how much it saw.
            return Err(BodyError::TooLarge(limit as u64 + 1));
        }
        Ok(body)
    }

    /// The clock moves on by `ms`; with [`Fake::concurrent`], the others run once meanwhile.
    async fn sleep(&self, ms: f64) {
        self.clock.set(self.clock.get() + ms);
        if self.concurrent {
            YieldOnce(false).await;
        }
    }

    async fn enqueue(
        &self,
        binding: &str,
        stored: &str,
        body: OutBody<'_, Vec<u8>>,
        max_body: usize,
    ) -> Result<(), String> {
        let bytes = match body {
            OutBody::Bytes(b) => b.clone(),
            OutBody::Text(t) => t.as_bytes().to_vec(),
            _ => Vec::new(),
        };
        if bytes.len() > max_body {
            return Err("too large".into());
        }
        self.enqueued
            .borrow_mut()
            .push((binding.to_owned(), stored.to_owned(), bytes));
        Ok(())
    }

    async fn dead_letter(&self, binding: &str, why: &str) -> Result<(), String> {
        if let Some(not) = &self.dead_letter_refused {
            return Err(not.clone());
        }
        let why: Value = serde_json::from_str(why).expect("a dead letter's reason is JSON");
        self.dead_letters
            .borrow_mut()
            .push((binding.to_owned(), why));
        Ok(())
    }
}

pub fn request(method: &str, path: &str, headers: &[(&str, &str)], has_body: bool) -> RequestHead {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    RequestHead {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect(),
        has_body,
    }
}
