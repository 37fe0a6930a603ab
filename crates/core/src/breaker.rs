//! Circuit breakers, per isolate, scoped so that no single caller, resource or route can make the
//! gateway refuse the calls of others.
//!
//! Every call's outcome is evidence tagged with where it came from: the route, the **caller**
//! (the API key's name, else the token's issuer and subject, else the client address, an IPv6
//! one by its /64) and the **resource** (the path of the URL sent to Azure). A breaker refuses a
//! set of calls (a *scope*), and only failures inside that set count towards opening it. To
//! refuse calls of every caller, the failures must come from more than one caller; to refuse
//! calls for every resource, from more than one resource: in such a *shared* scope one caller,
//! and one resource, counts for at most half of the failures that open it (`⌈n/2⌉` of `n`), so
//! the others must have failed `⌊n/2⌋` times in a row as well.
//!
//! | scope             | refuses                                   | opens after (`n`: the route's `failures`)  |
//! |-------------------|-------------------------------------------|--------------------------------------------|
//! | `caller_resource` | one caller on one resource of the route   | `n` failures of that caller there          |
//! | `caller`          | one caller on the whole route ¹            | `max(n, 2)`, at most half on one resource  |
//! | `resource`        | every caller on one resource of the route ¹ | `max(n, 2)`, at most half from one caller |
//! | `route`           | every caller on the route                 | `max(n, 2)`, at most half from one caller (and ¹ on one resource) |
//! | `host`            | every route with a breaker on the backend's origin | 5 within 30 s (the gateway's, never a route's), at most 3 from one caller and 3 on one resource |
//!
//! ¹ Only on routes whose backend URL path is built from the request (a blob name, an
//! `azure_rest` path value): on the others there is one resource, and `caller` is
//! `caller_resource`, `resource` is `route`.
//!
//! Failures count within the route's `window` of the first, and an answered call in a scope
//! clears that scope's count ("consecutive"). An open breaker refuses for the route's `cooldown`
//! or, when every failure that opened it carried Azure's `Retry-After` (clamped to
//! [`crate::retry::RETRY_AFTER_SECS`]), for the shortest of those; a route reads the host's
//! breaker with its own cool-down. Then it lets probes through, one per caller at a time: an
//! answered probe closes it; failed probes open it again when they would open it from scratch
//! with `n` = 1 (a caller's own scope) or 2 (a shared one: two callers, and two resources where
//! the scope spans resources). So one caller whose own calls keep failing cannot hold a shared
//! breaker open by being the probe that fails.
//!
//! Memory is bounded: route and host breakers by the policy; the other scopes are created by a
//! failure only (a call that finds nothing open passes without touching the map), in one map of
//! at most [`MAX_TRACKED`] entries that drops the least recently touched (an eighth or more) when
//! full. Keys are 64-bit hashes of the caller and resource, seeded per isolate, so a caller can
//! neither choose collisions nor grow a key's size.
//!
//! Pure state, no I/O and no clock of its own: the driver asks before a call and reports after.

use std::hash::Hasher;

use serde_json::Value;

use crate::fasthash::{FastHasher, FastMap};
use crate::policy::{BreakerConfig, DEFAULT_FAILURES, DEFAULT_WINDOW_SECONDS};
use crate::problem::Problem;

/// What opens a host's breaker, whatever its routes' own settings.
pub const HOST_FAILURES: u32 = DEFAULT_FAILURES;
pub const HOST_WINDOW_MS: f64 = DEFAULT_WINDOW_SECONDS as f64 * 1000.0;
/// Most per-caller and per-resource breakers held at once.
pub const MAX_TRACKED: usize = 4096;
/// A probe not reported within this time is taken as lost (its request was cancelled), and
/// another caller may probe.
pub const PROBE_EXPIRY_MS: f64 = 60_000.0;
/// `Retry-After` of a call refused because the probes allowed are in flight.
const PROBE_BUSY_MS: f64 = 1_000.0;
/// Distinct callers (resources) counted one by one in a shared scope; beyond this many the
/// failures are broad enough, and further ones count without a cap.
const TALLY_MAX: usize = 8;

/// Whom an open breaker refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// One caller on one resource of the route.
    CallerResource,
    /// One caller on the route.
    Caller,
    /// Every caller on one resource of the route.
    Resource,
    /// Every caller on the route.
    Route,
    /// Every route with a breaker on the backend's origin.
    Host,
}

impl Scope {
    /// From the narrowest to the broadest.
    pub const ALL: [Scope; 5] = [
        Scope::CallerResource,
        Scope::Caller,
        Scope::Resource,
        Scope::Route,
        Scope::Host,
    ];

    /// As the log line and the caller's problem name it.
    pub fn name(self) -> &'static str {
        match self {
            Scope::CallerResource => "caller_resource",
            Scope::Caller => "caller",
            Scope::Resource => "resource",
            Scope::Route => "route",
            Scope::Host => "host",
        }
    }

    /// Whether an open breaker of this scope refuses callers other than those whose calls
    /// failed.
    pub fn shared(self) -> bool {
        !matches!(self, Scope::CallerResource | Scope::Caller)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What opens a breaker of one scope.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    /// Counted failures that open it.
    pub failures: u32,
    /// Within this many milliseconds of the first.
    pub window_ms: f64,
    /// At most this many of them from one caller (`None`: no limit, the scope is one caller's).
    pub per_caller: Option<u32>,
    /// At most this many on one resource (`None`: no limit).
    pub per_resource: Option<u32>,
}

impl Rule {
    /// What opens it again after its cool-down, from the probes' failures alone.
    fn reopen(self) -> Rule {
        let shared = self.per_caller.is_some() || self.per_resource.is_some();
        Rule {
            failures: if shared { 2 } else { 1 },
            window_ms: self.window_ms,
            per_caller: self.per_caller.map(|_| 1),
            per_resource: self.per_resource.map(|_| 1),
        }
    }

    /// Probes let through at once after the cool-down (one per caller).
    fn probes(self) -> usize {
        self.reopen().failures as usize
    }
}

impl BreakerConfig {
    /// What opens the breaker of `scope` for this route's calls; `None` when the route's calls
    /// are not counted in that scope (no breaker, or a scope that is another one here).
    pub fn rule(&self, scope: Scope) -> Option<Rule> {
        if self.failures == 0 {
            return None;
        }
        let shared = self.failures.max(2);
        let half = Some(shared.div_ceil(2));
        let window_ms = self.window_ms;
        let rule = |failures, per_caller, per_resource| Rule {
            failures,
            window_ms,
            per_caller,
            per_resource,
        };
        Some(match scope {
            Scope::CallerResource => rule(self.failures, None, None),
            Scope::Caller if self.many_resources => rule(shared, None, half),
            Scope::Resource if self.many_resources => rule(shared, half, None),
            Scope::Caller | Scope::Resource => return None,
            Scope::Route => rule(shared, half, if self.many_resources { half } else { None }),
            Scope::Host => Rule {
                failures: HOST_FAILURES,
                window_ms: HOST_WINDOW_MS,
                per_caller: Some(HOST_FAILURES.div_ceil(2)),
                per_resource: Some(HOST_FAILURES.div_ceil(2)),
            },
        })
    }
}

/// Who is calling, as the breakers tell callers apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// The name of the API key that let the caller in.
    ApiKey(&'a str),
    /// A validated token's issuer and subject.
    Subject { issuer: &'a str, subject: &'a str },
    /// The client address (`CF-Connecting-IP`); an IPv6 address counts by its /64, the block
    /// one subscriber is usually given.
    Address(&'a str),
    /// The gateway itself, delivering stored requests.
    Gateway,
    /// Nothing tells this caller apart from others.
    Unknown,
}

/// One call, as the breakers key it: hashes of its route, host, caller and resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    route: u64,
    host: u64,
    caller: u64,
    resource: u64,
    /// A delivery of a stored request: the gateway sending again what a caller sent, so its
    /// failures are that caller's evidence, not a second caller's (see [`Breakers::record`]).
    delivery: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    CallerResource(u64, u64, u64),
    Caller(u64, u64),
    Resource(u64, u64),
    Route(u64),
    Host(u64),
}

impl Call {
    fn key(&self, scope: Scope) -> Key {
        match scope {
            Scope::CallerResource => Key::CallerResource(self.route, self.caller, self.resource),
            Scope::Caller => Key::Caller(self.route, self.caller),
            Scope::Resource => Key::Resource(self.route, self.resource),
            Scope::Route => Key::Route(self.route),
            Scope::Host => Key::Host(self.host),
        }
    }
}

/// What the breakers say about a call about to be made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Go ahead; `probes`: the scopes (bits) this call probes after their cool-down.
    Call { probes: u8 },
    /// Fail fast: the breaker of `scope` is open for this many more milliseconds.
    Open { retry_in_ms: f64, scope: Scope },
}

impl Admission {
    /// The breaker's state for the log line.
    pub fn log_state(self) -> &'static str {
        match self {
            Admission::Call { probes: 0 } => "closed",
            Admission::Call { .. } => "probe",
            Admission::Open { .. } => "open",
        }
    }

    /// The scope that refused the call, or the broadest one it probes.
    pub fn scope(self) -> Option<Scope> {
        match self {
            Admission::Open { scope, .. } => Some(scope),
            Admission::Call { probes } => {
                Scope::ALL.into_iter().rev().find(|s| probes & s.bit() != 0)
            }
        }
    }
}

/// The outcome of an admitted call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The host answered (whatever the status: a 4xx is the request's fault, not the host's).
    Answered,
    /// The host was unavailable after the call's retries; `retry_after_ms`: what Azure's last
    /// answer asked for, clamped.
    Failed { retry_after_ms: Option<f64> },
    /// The call never reached the host (no token, a refused value, the caller's own stream):
    /// it says nothing.
    NotSent,
}

/// Failures counted towards a rule.
#[derive(Debug, Clone, Default, PartialEq)]
struct Evidence {
    failures: u32,
    since: f64,
    /// The shortest `Retry-After` of the failures counted, unless one of them had none.
    asked_ms: Option<f64>,
    unasked: bool,
    callers: Tally,
    resources: Tally,
}

/// How many counted failures each caller (resource) has, for the first [`TALLY_MAX`].
#[derive(Debug, Clone, Default, PartialEq)]
struct Tally(Vec<(u64, u32)>);

impl Tally {
    fn allows(&self, id: u64, cap: Option<u32>) -> bool {
        cap.is_none_or(|cap| {
            self.0
                .iter()
                .find(|(k, _)| *k == id)
                .is_none_or(|(_, n)| *n < cap)
        })
    }

    fn add(&mut self, id: u64, cap: Option<u32>) {
        if cap.is_none() {
            return;
        }
        if let Some((_, n)) = self.0.iter_mut().find(|(k, _)| *k == id) {
            *n += 1;
        } else if self.0.len() < TALLY_MAX {
            self.0.push((id, 1));
        }
    }
}

impl Evidence {
    /// Counts a failure (unless its caller or resource has its share already); whether the
    /// rule is now met.
    fn add(&mut self, rule: Rule, call: &Call, asked_ms: Option<f64>, now: f64) -> bool {
        if self.failures == 0 || now - self.since > rule.window_ms {
            *self = Evidence {
                since: now,
                ..Evidence::default()
            };
        }
        if !self.callers.allows(call.caller, rule.per_caller)
            || !self.resources.allows(call.resource, rule.per_resource)
        {
            return false;
        }
        self.callers.add(call.caller, rule.per_caller);
        self.resources.add(call.resource, rule.per_resource);
        self.failures += 1;
        match asked_ms {
            Some(ms) => self.asked_ms = Some(self.asked_ms.map_or(ms, |a| a.min(ms))),
            None => self.unasked = true,
        }
        self.failures >= rule.failures
    }

    fn asked(&self) -> Option<f64> {
        if self.unasked {
            None
        } else {
            self.asked_ms
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Closed(Evidence),
    Open {
        at: f64,
        /// Azure's ask, instead of the route's cool-down.
        asked_ms: Option<f64>,
        /// Probes in flight: caller, since.
        probes: Vec<(u64, f64)>,
        /// Failed probes.
        failed: Evidence,
    },
}

impl State {
    fn opened(at: f64, asked_ms: Option<f64>) -> State {
        State::Open {
            at,
            asked_ms,
            probes: Vec::new(),
            failed: Evidence::default(),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    /// When it was last touched, in [`Breakers::touches`].
    touched: u64,
}

enum View {
    Pass,
    Probe,
    Refuse(f64),
}

/// The breakers of one isolate.
#[derive(Debug, Default)]
pub struct Breakers {
    seed: Option<u64>,
    /// Route and host breakers: as many as the policy has routes and hosts.
    shared: FastMap<Key, Entry>,
    /// Per caller and per resource: at most [`MAX_TRACKED`].
    tracked: FastMap<Key, Entry>,
    /// Counts touches: the order in which entries were last touched.
    touches: u64,
}

impl Breakers {
    /// The keys of a call. `random` (in [0, 1)) seeds this isolate's hashes, once.
    pub fn call(
        &mut self,
        route: &str,
        host: &str,
        caller: Caller<'_>,
        resource: &str,
        random: impl FnOnce() -> f64,
    ) -> Call {
        let seed = *self
            .seed
            .get_or_insert_with(|| (random() * 9_007_199_254_740_992.0) as u64 ^ 0x5bd1_e995);
        let hash = |write: &dyn Fn(&mut FastHasher)| {
            let mut h = FastHasher::seeded(seed);
            write(&mut h);
            h.finish()
        };
        Call {
            route: hash(&|h| h.write(route.as_bytes())),
            host: hash(&|h| h.write(host.as_bytes())),
            caller: hash(&|h| write_caller(h, caller)),
            resource: hash(&|h| h.write(resource.as_bytes())),
            delivery: matches!(caller, Caller::Gateway),
        }
    }

    fn map(&mut self, scope: Scope) -> &mut FastMap<Key, Entry> {
        match scope {
            Scope::Route | Scope::Host => &mut self.shared,
            _ => &mut self.tracked,
        }
    }

    /// Whether `call` may go now.
    pub fn admit(&mut self, call: &Call, config: &BreakerConfig, now: f64) -> Admission {
        let mut refused: Option<(f64, Scope)> = None;
        let mut probes = 0u8;
        for scope in Scope::ALL {
            let Some(rule) = config.rule(scope) else {
                continue;
            };
            let Some(entry) = self.map(scope).get_mut(&call.key(scope)) else {
                continue;
            };
            let view = match &mut entry.state {
                State::Closed(_) => View::Pass,
                State::Open {
                    at,
                    asked_ms,
                    probes,
                    ..
                } => {
                    let until = *at + asked_ms.unwrap_or(config.cooldown_ms);
                    if now < until {
                        View::Refuse(until - now)
                    } else {
                        probes.retain(|(_, since)| now - since < PROBE_EXPIRY_MS);
                        let busy = probes.iter().any(|(c, _)| *c == call.caller)
                            || probes.len() >= rule.probes();
                        if busy {
                            View::Refuse(PROBE_BUSY_MS.min(config.cooldown_ms))
                        } else {
                            View::Probe
                        }
                    }
                }
            };
            match view {
                View::Pass => {}
                View::Probe => probes |= scope.bit(),
                // The longest refusal is the one that holds; the broader scope on a tie.
                View::Refuse(ms) => {
                    if refused.is_none_or(|(longest, _)| ms >= longest) {
                        refused = Some((ms, scope));
                    }
                }
            }
        }
        if let Some((retry_in_ms, scope)) = refused {
            return Admission::Open { retry_in_ms, scope };
        }
        for scope in Scope::ALL.into_iter().filter(|s| probes & s.bit() != 0) {
            self.touches += 1;
            let touched = self.touches;
            if let Some(entry) = self.map(scope).get_mut(&call.key(scope)) {
                entry.touched = touched;
                if let State::Open { probes, .. } = &mut entry.state {
                    probes.push((call.caller, now));
                }
            }
        }
        Admission::Call { probes }
    }

    /// Records the outcome of a call `admit` let through.
    pub fn record(
        &mut self,
        call: &Call,
        config: &BreakerConfig,
        admitted: Admission,
        outcome: Outcome,
        now: f64,
    ) {
        let Admission::Call { probes } = admitted else {
            return;
        };
        for scope in Scope::ALL {
            let Some(rule) = config.rule(scope) else {
                continue;
            };
            let probed = probes & scope.bit() != 0;
            let key = call.key(scope);
            // A delivery's failure counts for the deliveries' own scopes only: it is a caller's
            // request sent again, and counted as a second caller it would let one caller and the
            // redelivery of its own stored requests open a breaker shared with everyone. For the
            // shared scopes it says nothing (a probe slot it held is given back).
            let shared = matches!(scope, Scope::Resource | Scope::Route | Scope::Host);
            let outcome = match outcome {
                Outcome::Failed { .. } if call.delivery && shared => Outcome::NotSent,
                other => other,
            };
            match outcome {
                Outcome::Answered => self.answered(scope, key, call.caller, probed),
                Outcome::NotSent => {
                    if let Some(Entry {
                        state: State::Open { probes, .. },
                        ..
                    }) = self.map(scope).get_mut(&key)
                    {
                        probes.retain(|(c, _)| !(probed && *c == call.caller));
                    }
                }
                Outcome::Failed { retry_after_ms } => {
                    self.failed(scope, key, rule, call, probed, retry_after_ms, now)
                }
            }
        }
    }

    fn answered(&mut self, scope: Scope, key: Key, caller: u64, probed: bool) {
        let map = self.map(scope);
        let close = match map.get(&key).map(|e| &e.state) {
            None => false,
            Some(State::Closed(_)) => true,
            Some(State::Open { probes, .. }) => probed && probes.iter().any(|(c, _)| *c == caller),
        };
        if close {
            map.remove(&key);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn failed(
        &mut self,
        scope: Scope,
        key: Key,
        rule: Rule,
        call: &Call,
        probed: bool,
        retry_after_ms: Option<f64>,
        now: f64,
    ) {
        let tracked = !matches!(scope, Scope::Route | Scope::Host);
        if tracked && !self.tracked.contains_key(&key) {
            self.make_room();
        }
        self.touches += 1;
        let touched = self.touches;
        let entry = self.map(scope).entry(key).or_insert_with(|| Entry {
            state: State::Closed(Evidence::default()),
            touched,
        });
        entry.touched = touched;
        match &mut entry.state {
            State::Closed(evidence) => {
                if evidence.add(rule, call, retry_after_ms, now) {
                    entry.state = State::opened(now, evidence.asked());
                }
            }
            State::Open { probes, failed, .. } => {
                let held = probes.iter().any(|(c, _)| *c == call.caller);
                if !(probed && held) {
                    // A call let through before it opened: it says nothing about now.
                    return;
                }
                probes.retain(|(c, _)| *c != call.caller);
                if failed.add(rule.reopen(), call, retry_after_ms, now) {
                    entry.state = State::opened(now, failed.asked());
                }
            }
        }
    }

    /// Drops the least recently touched tracked breakers (an eighth or more) when they are at the
    /// limit.
    fn make_room(&mut self) {
        if self.tracked.len() < MAX_TRACKED {
            return;
        }
        // The last 7/8 × MAX_TRACKED touches touched at most that many entries: the others
        // (at least an eighth) go.
        let keep_from = self
            .touches
            .saturating_sub((MAX_TRACKED - MAX_TRACKED / 8) as u64);
        self.tracked.retain(|_, e| e.touched > keep_from);
    }

    /// How many per-caller and per-resource breakers are held.
    pub fn tracked(&self) -> usize {
        self.tracked.len()
    }
}

fn write_caller(h: &mut FastHasher, caller: Caller<'_>) {
    match caller {
        Caller::ApiKey(name) => {
            h.write_u8(1);
            h.write(name.as_bytes());
        }
        Caller::Subject { issuer, subject } => {
            h.write_u8(2);
            h.write(issuer.as_bytes());
            h.write_u8(0xff);
            h.write(subject.as_bytes());
        }
        Caller::Address(ip) => match ip.trim().parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
                h.write_u8(3);
                for segment in &v6.segments()[..4] {
                    h.write_u64(u64::from(*segment));
                }
            }
            Ok(addr) => {
                // IPv4, or IPv4 mapped into IPv6: the same caller either way.
                h.write_u8(4);
                match addr.to_canonical() {
                    std::net::IpAddr::V4(v4) => h.write(&v4.octets()),
                    std::net::IpAddr::V6(v6) => h.write(&v6.octets()),
                }
            }
            Err(_) => {
                h.write_u8(5);
                h.write(ip.as_bytes());
            }
        },
        Caller::Gateway => h.write_u8(6),
        Caller::Unknown => h.write_u8(7),
    }
}

/// A call not made: recent calls in `scope` found Azure unavailable.
pub fn circuit_open(retry_in_ms: f64, scope: Scope) -> Problem {
    let seconds = (retry_in_ms / 1000.0).ceil().max(1.0) as u64;
    let whose = match scope {
        Scope::CallerResource => "Your recent calls for this resource found Azure unavailable, so the gateway is not calling Azure for it on your behalf",
        Scope::Caller => "Your recent calls on this route found Azure unavailable for several resources, so the gateway is not calling Azure on this route on your behalf",
        Scope::Resource => "Recent calls of several callers for this resource found Azure unavailable, so the gateway is not calling Azure for it",
        Scope::Route => "Recent calls of several callers on this route found Azure unavailable, so the gateway is not calling Azure on this route",
        Scope::Host => "Recent calls of several callers found this Azure service unavailable, so the gateway is not calling it",
    };
    Problem::new(
        503,
        "backend-circuit-open",
        "Azure is unavailable",
        format!("{whose} for {seconds} s; nothing was sent. Retry after the time in Retry-After."),
    )
    .with_header("retry-after", seconds.to_string())
    .with_extension("breaker_scope", Value::from(scope.name()))
}

/// What Azure asked for, as the breakers honour it (clamped like a caller's `Retry-After`).
pub fn asked_ms(retry_after: Option<u64>) -> Option<f64> {
    retry_after.map(|s| crate::retry::caller_retry_after(Some(s)) as f64 * 1000.0)
}

/// The resource a backend URL names, as the breakers count it: its path, without the query.
pub fn resource_of(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let rest = url.get(after_scheme..).unwrap_or("");
    let path = rest.find('/').map_or("", |i| rest.get(i..).unwrap_or(""));
    path.split('?').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route of many resources: opens its own scopes after 4 failures in 10 s, for 5 s.
    const MANY: BreakerConfig = BreakerConfig {
        failures: 4,
        window_ms: 10_000.0,
        cooldown_ms: 5_000.0,
        many_resources: true,
    };
    /// A route to one resource (a queue).
    const ONE: BreakerConfig = BreakerConfig {
        many_resources: false,
        ..MANY
    };

    struct Gw {
        b: Breakers,
    }

    impl Gw {
        fn new() -> Gw {
            Gw {
                b: Breakers::default(),
            }
        }

        fn call(&mut self, route: &str, caller: &str, resource: &str) -> Call {
            self.b
                .call(route, "https://h", Caller::ApiKey(caller), resource, || {
                    0.25
                })
        }

        /// One call start to end.
        fn go(
            &mut self,
            config: &BreakerConfig,
            (route, caller, resource): (&str, &str, &str),
            outcome: Outcome,
            now: f64,
        ) -> Admission {
            let call = self.call(route, caller, resource);
            let admitted = self.b.admit(&call, config, now);
            if matches!(admitted, Admission::Call { .. }) {
                self.b.record(&call, config, admitted, outcome, now);
            }
            admitted
        }

        fn admit(
            &mut self,
            config: &BreakerConfig,
            who: (&str, &str, &str),
            now: f64,
        ) -> Admission {
            let call = self.call(who.0, who.1, who.2);
            self.b.admit(&call, config, now)
        }
    }

    const FAIL: Outcome = Outcome::Failed {
        retry_after_ms: None,
    };
    const OK: Outcome = Outcome::Answered;

    fn open(a: Admission) -> Option<Scope> {
        match a {
            Admission::Open { scope, .. } => Some(scope),
            Admission::Call { .. } => None,
        }
    }

    #[test]
    fn one_caller_and_the_redelivery_of_its_stored_requests_open_no_shared_breaker() {
        let mut g = Gw::new();
        let delivery = |g: &mut Gw, resource: &str| {
            g.b.call("r", "https://h", Caller::Gateway, resource, || 0.25)
        };
        // Caller a fails on many resources; the gateway's deliveries of what it stored fail too.
        for t in 0..20 {
            let t = f64::from(t);
            g.go(&MANY, ("r", "a", &format!("/x{t}")), FAIL, t);
            let call = delivery(&mut g, &format!("/x{t}"));
            let admitted = g.b.admit(&call, &MANY, t);
            if matches!(admitted, Admission::Call { .. }) {
                g.b.record(&call, &MANY, admitted, FAIL, t);
            }
        }
        // Caller b, who never failed, is still called, on any resource.
        assert_eq!(
            g.admit(&MANY, ("r", "b", "/x3"), 30.0),
            Admission::Call { probes: 0 }
        );
        assert_eq!(
            g.admit(&MANY, ("r", "b", "/y"), 30.0),
            Admission::Call { probes: 0 }
        );
        // The deliveries themselves back off (their own scope).
        let call = delivery(&mut g, "/x1");
        assert_eq!(open(g.b.admit(&call, &MANY, 31.0)), Some(Scope::Caller));
    }

    #[test]
    fn one_caller_failing_one_resource_is_refused_there_alone_however_often_it_fails() {
        let mut g = Gw::new();
        for t in 0..50 {
            g.go(&MANY, ("r", "a", "/bad"), FAIL, f64::from(t));
        }
        assert_eq!(
            open(g.admit(&MANY, ("r", "a", "/bad"), 60.0)),
            Some(Scope::CallerResource)
        );
        // The same caller's other resources, the same resource for another caller, another
        // route of the same host: all called.
        assert_eq!(
            g.admit(&MANY, ("r", "a", "/good"), 61.0),
            Admission::Call { probes: 0 }
        );
        assert_eq!(
            g.admit(&MANY, ("r", "b", "/bad"), 62.0),
            Admission::Call { probes: 0 }
        );
        assert_eq!(
            g.admit(&MANY, ("s", "b", "/x"), 63.0),
            Admission::Call { probes: 0 }
        );
        // On a route to one resource, the same: another caller is called.
        let mut g = Gw::new();
        for t in 0..50 {
            g.go(&ONE, ("q", "a", "/q/messages"), FAIL, f64::from(t));
        }
        assert_eq!(
            open(g.admit(&ONE, ("q", "a", "/q/messages"), 60.0)),
            Some(Scope::CallerResource)
        );
        assert_eq!(
            g.admit(&ONE, ("q", "b", "/q/messages"), 61.0),
            Admission::Call { probes: 0 }
        );
    }

    #[test]
    fn a_shared_breaker_needs_the_others_to_fail_half_as_often_as_the_threshold() {
        let mut g = Gw::new();
        // Caller a: any number of failures on /a counts 2 (half of 4) towards the route.
        for t in 0..20 {
            g.go(&MANY, ("r", "a", "/a"), FAIL, f64::from(t));
        }
        // One failure of b on /b: 3 counted, not 4.
        g.go(&MANY, ("r", "b", "/b"), FAIL, 30.0);
        assert_eq!(
            g.admit(&MANY, ("r", "c", "/c"), 31.0),
            Admission::Call { probes: 0 }
        );
        // A second from b: open for everyone, with the route's cool-down (the route's 4, and
        // the host's 5 as well: 3 from a, 2 from b).
        g.go(&MANY, ("r", "b", "/b2"), FAIL, 32.0);
        assert_eq!(
            g.admit(&MANY, ("r", "c", "/c"), 33.0),
            Admission::Open {
                retry_in_ms: 4_999.0,
                scope: Scope::Host
            }
        );
        // Two callers on one resource open that resource for everyone, not the route.
        let mut g = Gw::new();
        for (t, caller) in ["a", "a", "b", "b"].into_iter().enumerate() {
            g.go(&MANY, ("r", caller, "/gone"), FAIL, t as f64);
        }
        assert_eq!(
            open(g.admit(&MANY, ("r", "c", "/gone"), 10.0)),
            Some(Scope::Resource)
        );
        assert_eq!(
            g.admit(&MANY, ("r", "c", "/fine"), 11.0),
            Admission::Call { probes: 0 }
        );
        // One caller failing on two resources: refused on the whole route, alone.
        let mut g = Gw::new();
        for (t, resource) in ["/1", "/2", "/1", "/2"].into_iter().enumerate() {
            g.go(&MANY, ("r", "a", resource), FAIL, t as f64);
        }
        assert_eq!(
            open(g.admit(&MANY, ("r", "a", "/3"), 10.0)),
            Some(Scope::Caller)
        );
        assert_eq!(
            g.admit(&MANY, ("r", "b", "/3"), 11.0),
            Admission::Call { probes: 0 }
        );
    }

    #[test]
    fn an_answer_clears_the_count_of_its_scopes_and_old_failures_fall_out_of_the_window() {
        let mut g = Gw::new();
        for (t, caller, resource) in [(0, "a", "/a"), (1, "a", "/a"), (2, "b", "/b")] {
            g.go(&MANY, ("r", caller, resource), FAIL, f64::from(t));
        }
        // Someone is answered: the route's count starts again.
        g.go(&MANY, ("r", "c", "/c"), OK, 3.0);
        g.go(&MANY, ("r", "b", "/b"), FAIL, 4.0);
        assert_eq!(
            g.admit(&MANY, ("r", "d", "/d"), 5.0),
            Admission::Call { probes: 0 }
        );
        // Failures spread over more than the window never add up.
        let mut g = Gw::new();
        for (t, caller, resource) in [
            (0, "a", "/a"),
            (1, "b", "/b"),
            (20_000, "a", "/a"),
            (20_001, "b", "/b"),
        ] {
            g.go(&MANY, ("r", caller, resource), FAIL, f64::from(t));
        }
        assert_eq!(
            g.admit(&MANY, ("r", "d", "/d"), 20_002.0),
            Admission::Call { probes: 0 }
        );
    }

    #[test]
    fn a_routes_own_settings_never_open_the_host_and_the_host_opens_on_the_gateways_rule() {
        let strict = BreakerConfig {
            failures: 1,
            window_ms: 10_000.0,
            cooldown_ms: 3_600_000.0,
            many_resources: true,
        };
        let mut g = Gw::new();
        g.go(&strict, ("strict", "a", "/x"), FAIL, 0.0);
        // Its own caller and resource are refused for an hour; nobody else anywhere.
        assert_eq!(
            g.admit(&strict, ("strict", "a", "/x"), 1.0),
            Admission::Open {
                retry_in_ms: 3_599_999.0,
                scope: Scope::CallerResource
            }
        );
        assert_eq!(
            g.admit(&strict, ("strict", "b", "/y"), 2.0),
            Admission::Call { probes: 0 }
        );
        assert_eq!(
            g.admit(&MANY, ("other", "a", "/x"), 3.0),
            Admission::Call { probes: 0 }
        );
        // Five failures from three callers on three resources, across two routes: the host
        // opens for every route, each with its own cool-down.
        let mut g = Gw::new();
        for (t, (route, caller, resource)) in [
            ("r", "a", "/1"),
            ("s", "b", "/2"),
            ("r", "c", "/3"),
            ("s", "a", "/4"),
            ("r", "b", "/5"),
        ]
        .into_iter()
        .enumerate()
        {
            g.go(&MANY, (route, caller, resource), FAIL, t as f64);
        }
        assert_eq!(
            g.admit(&strict, ("strict", "z", "/z"), 10.0),
            Admission::Open {
                retry_in_ms: 3_599_994.0,
                scope: Scope::Host
            }
        );
        assert_eq!(
            g.admit(&MANY, ("t", "z", "/z"), 10.0),
            Admission::Open {
                retry_in_ms: 4_994.0,
                scope: Scope::Host
            }
        );
    }

    #[test]
    fn azures_retry_after_sets_the_open_time_when_every_failure_carried_one() {
        let asked = |s: f64| Outcome::Failed {
            retry_after_ms: Some(s * 1000.0),
        };
        let mut g = Gw::new();
        for (t, s) in [(0.0, 60.0), (1.0, 45.0), (2.0, 90.0), (3.0, 50.0)] {
            g.go(&MANY, ("r", "a", "/a"), asked(s), t);
        }
        // Open at 3 for the shortest ask, 45 s: not the route's 5 s cool-down.
        assert_eq!(
            g.admit(&MANY, ("r", "a", "/a"), 1_003.0),
            Admission::Open {
                retry_in_ms: 44_000.0,
                scope: Scope::CallerResource
            }
        );
        // One failure without an ask: the cool-down.
        let mut g = Gw::new();
        for (t, outcome) in [
            (0.0, asked(60.0)),
            (1.0, FAIL),
            (2.0, asked(60.0)),
            (3.0, asked(60.0)),
        ] {
            g.go(&MANY, ("r", "a", "/a"), outcome, t);
        }
        assert_eq!(
            g.admit(&MANY, ("r", "a", "/a"), 1_003.0),
            Admission::Open {
                retry_in_ms: 4_000.0,
                scope: Scope::CallerResource
            }
        );
    }

    /// A real outage opens the route; then Azure is back except for caller a's resource.
    fn outage_then_cool_down(g: &mut Gw) {
        for (t, caller, resource) in [
            (0, "a", "/q"),
            (1, "b", "/q"),
            (2, "c", "/q"),
            (3, "d", "/q"),
        ] {
            g.go(&ONE, ("q", caller, resource), FAIL, f64::from(t));
        }
        assert_eq!(
            open(g.admit(&ONE, ("q", "e", "/q"), 10.0)),
            Some(Scope::Route)
        );
    }

    #[test]
    fn after_the_cool_down_one_callers_failing_probe_does_not_open_it_again_for_others() {
        let mut g = Gw::new();
        outage_then_cool_down(&mut g);
        // a probes first and fails; b probes next and is answered: closed for everyone.
        assert!(matches!(
            g.go(&ONE, ("q", "a", "/q"), FAIL, 5_004.0),
            Admission::Call { probes } if probes != 0
        ));
        // a again, at once: its probe is done, but one caller's failures do not re-open it.
        assert!(matches!(
            g.go(&ONE, ("q", "a", "/q"), FAIL, 5_005.0),
            Admission::Call { .. }
        ));
        assert_eq!(
            g.go(&ONE, ("q", "b", "/q"), OK, 5_006.0).log_state(),
            "probe"
        );
        assert_eq!(
            g.admit(&ONE, ("q", "e", "/q"), 5_007.0),
            Admission::Call { probes: 0 }
        );
        // A real outage still: two callers' probes fail, and it is open again.
        let mut g = Gw::new();
        outage_then_cool_down(&mut g);
        g.go(&ONE, ("q", "a", "/q"), FAIL, 5_004.0);
        g.go(&ONE, ("q", "b", "/q"), FAIL, 5_005.0);
        assert_eq!(
            g.admit(&ONE, ("q", "e", "/q"), 5_006.0),
            Admission::Open {
                retry_in_ms: 4_999.0,
                scope: Scope::Route
            }
        );
    }

    #[test]
    fn probes_go_one_per_caller_and_a_lost_probe_frees_its_place() {
        let mut g = Gw::new();
        outage_then_cool_down(&mut g);
        let first = g.admit(&ONE, ("q", "a", "/q"), 5_004.0);
        assert_eq!(first.log_state(), "probe");
        // a's second call waits; b may probe meanwhile; c waits for one of them.
        assert_eq!(
            g.admit(&ONE, ("q", "a", "/q"), 5_005.0),
            Admission::Open {
                retry_in_ms: 1_000.0,
                scope: Scope::Route
            }
        );
        let second = g.admit(&ONE, ("q", "b", "/q"), 5_006.0);
        assert_eq!(second.log_state(), "probe");
        assert!(open(g.admit(&ONE, ("q", "c", "/q"), 5_007.0)).is_some());
        // Neither ever reports (their requests were cancelled): after a minute others probe.
        assert_eq!(
            g.admit(&ONE, ("q", "c", "/q"), 5_006.0 + PROBE_EXPIRY_MS)
                .log_state(),
            "probe"
        );
        // A probe that was never sent frees its place at once.
        let mut g = Gw::new();
        outage_then_cool_down(&mut g);
        let call = g.call("q", "a", "/q");
        let probe = g.b.admit(&call, &ONE, 5_004.0);
        g.b.record(&call, &ONE, probe, Outcome::NotSent, 5_005.0);
        assert_eq!(
            g.admit(&ONE, ("q", "a", "/q"), 5_006.0).log_state(),
            "probe"
        );
    }

    #[test]
    fn a_callers_own_breaker_opens_again_on_its_one_failed_probe() {
        let mut g = Gw::new();
        for t in 0..4 {
            g.go(&ONE, ("q", "a", "/q"), FAIL, f64::from(t));
        }
        assert_eq!(
            g.go(&ONE, ("q", "a", "/q"), FAIL, 5_004.0).log_state(),
            "probe"
        );
        assert_eq!(
            g.admit(&ONE, ("q", "a", "/q"), 5_005.0),
            Admission::Open {
                retry_in_ms: 4_999.0,
                scope: Scope::CallerResource
            }
        );
        // … and closes on an answered one.
        assert_eq!(
            g.go(&ONE, ("q", "a", "/q"), OK, 10_004.0).log_state(),
            "probe"
        );
        assert_eq!(
            g.admit(&ONE, ("q", "a", "/q"), 10_005.0),
            Admission::Call { probes: 0 }
        );
    }

    #[test]
    fn a_caller_cycling_through_resources_cannot_grow_memory_without_limit() {
        // A new caller on a new resource each time (each failure makes three breakers: the
        // caller's on the resource, the caller's, the resource's), an answer between them.
        let mut g = Gw::new();
        for i in 0..(3 * MAX_TRACKED) {
            let t = 2.0 * i as f64;
            g.go(&MANY, ("r", &format!("c{i}"), &format!("/{i}")), FAIL, t);
            g.go(&MANY, ("r", "b", "/ok"), OK, t + 1.0);
            assert!(g.b.tracked() <= MAX_TRACKED, "{} at {i}", g.b.tracked());
        }
        assert!(g.b.tracked() > MAX_TRACKED / 2, "{}", g.b.tracked());
        assert!(
            g.b.shared.is_empty(),
            "the answers closed the route and host"
        );
        // The newest are kept: the last caller is still counted on its resource.
        let last = 3 * MAX_TRACKED - 1;
        let key = g
            .call("r", &format!("c{last}"), &format!("/{last}"))
            .key(Scope::CallerResource);
        assert!(g.b.tracked.contains_key(&key));
        // Answered calls that find nothing open leave nothing behind.
        let mut g = Gw::new();
        for i in 0..1000 {
            g.go(&MANY, ("r", "a", &format!("/{i}")), OK, f64::from(i));
        }
        assert_eq!((g.b.tracked(), g.b.shared.len()), (0, 0));
    }

    #[test]
    fn callers_are_told_apart_by_key_subject_or_address_an_ipv6_one_by_its_64() {
        let mut b = Breakers::default();
        let mut caller = |c| b.call("r", "h", c, "/x", || 0.5).caller;
        let v6a = caller(Caller::Address("2001:db8:1:2:aaaa::1"));
        assert_eq!(v6a, caller(Caller::Address("2001:db8:1:2:ffff::9")));
        assert_ne!(v6a, caller(Caller::Address("2001:db8:1:3::1")));
        assert_eq!(
            caller(Caller::Address("::ffff:192.0.2.1")),
            caller(Caller::Address("192.0.2.1"))
        );
        assert_ne!(
            caller(Caller::Address("192.0.2.1")),
            caller(Caller::Address("192.0.2.2"))
        );
        assert_ne!(
            caller(Caller::ApiKey("a")),
            caller(Caller::Subject {
                issuer: "",
                subject: "a"
            })
        );
        assert_ne!(
            caller(Caller::Subject {
                issuer: "i1",
                subject: "s"
            }),
            caller(Caller::Subject {
                issuer: "i2",
                subject: "s"
            })
        );
        // Another isolate hashes with another seed.
        let other = Breakers::default()
            .call("r", "h", Caller::ApiKey("a"), "/x", || 0.75)
            .caller;
        assert_ne!(other, caller(Caller::ApiKey("a")));
    }

    #[test]
    fn no_breaker_at_all_with_failures_0() {
        let off = BreakerConfig {
            failures: 0,
            ..MANY
        };
        let mut g = Gw::new();
        for t in 0..10 {
            g.go(&off, ("r", "a", "/a"), FAIL, f64::from(t));
        }
        assert_eq!(
            g.admit(&off, ("r", "a", "/a"), 11.0),
            Admission::Call { probes: 0 }
        );
        assert_eq!((g.b.tracked(), g.b.shared.len()), (0, 0));
    }
}
