//! A circuit breaker per backend host, per isolate: after `failures` consecutive failed calls
//! (the backend unavailable after its retries: 5xx, 429, timeouts, network errors) within
//! `window`, calls to that host fail fast for `cooldown`; then one call goes through as a probe,
//! and its outcome closes the breaker or opens it again.
//!
//! Pure state, no I/O and no clock of its own: the driver asks before a call and reports after.

use crate::fasthash::FastMap;

use serde::{Deserialize, Serialize};

/// A route's breaker settings, resolved at build time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker; 0: no breaker.
    pub failures: u32,
    /// The failures must fall within this many milliseconds of the first.
    pub window_ms: f64,
    /// How long an open breaker fails calls fast, in milliseconds.
    pub cooldown_ms: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: DEFAULT_FAILURES,
            window_ms: f64::from(DEFAULT_WINDOW_SECONDS) * 1000.0,
            cooldown_ms: f64::from(DEFAULT_COOLDOWN_SECONDS) * 1000.0,
        }
    }
}

pub const DEFAULT_FAILURES: u32 = 5;
pub const DEFAULT_WINDOW_SECONDS: u32 = 30;
pub const DEFAULT_COOLDOWN_SECONDS: u32 = 30;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed {
        failures: u32,
        since: f64,
    },
    Open {
        until: f64,
    },
    /// The cooldown is over; `probing` while the one probe call is in flight.
    HalfOpen {
        probing: bool,
    },
}

/// What the breaker says about a call about to be made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Go ahead (`probe`: this call decides whether the breaker closes).
    Call { probe: bool },
    /// Fail fast: the host is considered down for this many more milliseconds.
    Open { retry_in_ms: f64 },
}

impl Admission {
    /// The breaker's state for the log line.
    pub fn log_state(self) -> &'static str {
        match self {
            Admission::Call { probe: false } => "closed",
            Admission::Call { probe: true } => "probe",
            Admission::Open { .. } => "open",
        }
    }
}

/// The outcome of an admitted call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The host answered (whatever the status: a 4xx is the request's fault, not the host's).
    Answered,
    /// The host was unavailable after the call's retries.
    Failed,
    /// The call never reached the host (no token, a refused value): it says nothing.
    NotSent,
}

/// The breakers of one isolate, by host.
#[derive(Debug, Default)]
pub struct Breakers {
    hosts: FastMap<String, State>,
}

impl Breakers {
    /// Whether a call to `host` may go now.
    pub fn admit(&mut self, host: &str, config: &BreakerConfig, now: f64) -> Admission {
        if config.failures == 0 {
            return Admission::Call { probe: false };
        }
        // On the request path: the host's name is copied only the first time it is seen.
        if !self.hosts.contains_key(host) {
            let closed = State::Closed {
                failures: 0,
                since: now,
            };
            self.hosts.insert(host.to_owned(), closed);
        }
        let Some(state) = self.hosts.get_mut(host) else {
            return Admission::Call { probe: false };
        };
        match *state {
            State::Closed { .. } => Admission::Call { probe: false },
            State::Open { until } if now < until => Admission::Open {
                retry_in_ms: until - now,
            },
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                Admission::Call { probe: true }
            }
            State::HalfOpen { probing: true } => Admission::Open {
                retry_in_ms: config.cooldown_ms.min(1000.0),
            },
        }
    }

    /// Records the outcome of a call `admit` let through.
    pub fn record(
        &mut self,
        host: &str,
        config: &BreakerConfig,
        admitted: Admission,
        outcome: Outcome,
        now: f64,
    ) {
        if config.failures == 0 {
            return;
        }
        let Some(state) = self.hosts.get_mut(host) else {
            return;
        };
        let probe = matches!(admitted, Admission::Call { probe: true });
        *state = match (*state, outcome) {
            (State::HalfOpen { .. }, Outcome::Answered) if probe => State::Closed {
                failures: 0,
                since: now,
            },
            (State::HalfOpen { .. }, Outcome::Failed) if probe => State::Open {
                until: now + config.cooldown_ms,
            },
            (State::HalfOpen { .. }, Outcome::NotSent) if probe => {
                State::HalfOpen { probing: false }
            }
            (State::Closed { .. }, Outcome::Answered) => State::Closed {
                failures: 0,
                since: now,
            },
            (State::Closed { failures, since }, Outcome::Failed) => {
                let (failures, since) = if failures == 0 || now - since > config.window_ms {
                    (1, now)
                } else {
                    (failures + 1, since)
                };
                if failures >= config.failures {
                    State::Open {
                        until: now + config.cooldown_ms,
                    }
                } else {
                    State::Closed { failures, since }
                }
            }
            (state, _) => state,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: BreakerConfig = BreakerConfig {
        failures: 3,
        window_ms: 10_000.0,
        cooldown_ms: 5_000.0,
    };

    fn call(b: &mut Breakers, now: f64, outcome: Outcome) -> Admission {
        let admitted = b.admit("h", &CONFIG, now);
        if matches!(admitted, Admission::Call { .. }) {
            b.record("h", &CONFIG, admitted, outcome, now);
        }
        admitted
    }

    #[test]
    fn opens_after_consecutive_failures_fails_fast_then_probes_once() {
        let mut b = Breakers::default();
        for t in [0.0, 1.0, 2.0] {
            assert_eq!(
                call(&mut b, t, Outcome::Failed),
                Admission::Call { probe: false }
            );
        }
        assert_eq!(
            call(&mut b, 1_002.0, Outcome::Answered),
            Admission::Open {
                retry_in_ms: 4_000.0
            }
        );
        // The cooldown is over: one probe; a second caller meanwhile fails fast.
        let probe = b.admit("h", &CONFIG, 5_003.0);
        assert_eq!(probe, Admission::Call { probe: true });
        assert!(matches!(
            b.admit("h", &CONFIG, 5_004.0),
            Admission::Open { .. }
        ));
        b.record("h", &CONFIG, probe, Outcome::Answered, 5_010.0);
        assert_eq!(
            call(&mut b, 5_011.0, Outcome::Answered),
            Admission::Call { probe: false }
        );
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_an_answer_resets_the_count() {
        let mut b = Breakers::default();
        for t in [0.0, 1.0, 2.0] {
            call(&mut b, t, Outcome::Failed);
        }
        let probe = b.admit("h", &CONFIG, 6_000.0);
        b.record("h", &CONFIG, probe, Outcome::Failed, 6_001.0);
        assert!(matches!(
            b.admit("h", &CONFIG, 10_000.0),
            Admission::Open { .. }
        ));
        // Two failures, an answer, two failures: never three in a row.
        let mut b = Breakers::default();
        for outcome in [
            Outcome::Failed,
            Outcome::Failed,
            Outcome::Answered,
            Outcome::Failed,
            Outcome::Failed,
        ] {
            assert!(matches!(call(&mut b, 0.0, outcome), Admission::Call { .. }));
        }
        assert!(matches!(b.admit("h", &CONFIG, 1.0), Admission::Call { .. }));
    }

    #[test]
    fn failures_outside_the_window_start_a_new_count_and_a_probe_not_sent_frees_the_slot() {
        let mut b = Breakers::default();
        call(&mut b, 0.0, Outcome::Failed);
        call(&mut b, 1.0, Outcome::Failed);
        call(&mut b, 20_000.0, Outcome::Failed);
        call(&mut b, 20_001.0, Outcome::Failed);
        assert!(matches!(
            b.admit("h", &CONFIG, 20_002.0),
            Admission::Call { .. }
        ));
        let mut b = Breakers::default();
        for t in [0.0, 1.0, 2.0] {
            call(&mut b, t, Outcome::Failed);
        }
        let probe = b.admit("h", &CONFIG, 6_000.0);
        b.record("h", &CONFIG, probe, Outcome::NotSent, 6_001.0);
        assert_eq!(
            b.admit("h", &CONFIG, 6_002.0),
            Admission::Call { probe: true }
        );
        // No breaker at all with failures = 0.
        let off = BreakerConfig {
            failures: 0,
            ..CONFIG
        };
        let mut b = Breakers::default();
        for _ in 0..10 {
            let a = b.admit("h", &off, 0.0);
            b.record("h", &off, a, Outcome::Failed, 0.0);
        }
        assert_eq!(b.admit("h", &off, 0.0), Admission::Call { probe: false });
    }
}
