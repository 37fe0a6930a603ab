//! One token fetch as a state machine: which credential to send, whether to retry, how long
//! to wait. The edge performs each [`Step`] and reports back; nothing here sleeps or sends.
//!
//! - a transient failure (429, 5xx, network, timeout) is retried with back-off that honours
//!   `Retry-After`, within the [`RetryPolicy`]'s attempts and time budget;
//! - a refused credential (invalid or expired secret, failed assertion, or a Worker secret that
//!   is not set) moves on to the identity's second secret, when one is configured: during a
//!   rotation either secret may be the one Entra knows. The fetch starts with the credential
//!   that last worked (the edge remembers it per identity), so once the second secret has taken
//!   over, refreshes do not pay a refused sign-in at Entra for the first one each time;
//! - anything else ends the fetch with its error.

use super::endpoint::{Token, TokenError};
use crate::retry::RetryPolicy;

/// What the edge should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send a token request with credential number `credential` (0: `secret`, 1: `next_secret`).
    Send { credential: usize },
    /// Wait this many milliseconds, then call [`TokenFetch::resume`].
    Sleep(f64),
    /// The fetch is over.
    Done(Result<Token, TokenError>),
}

/// A fetch in progress.
#[derive(Debug, Clone)]
pub struct TokenFetch {
    credentials: usize,
    credential: usize,
    /// How many credentials have been tried (each at most once).
    tried: usize,
    attempts: u32,
    started_at: f64,
    retry: RetryPolicy,
}

impl TokenFetch {
    /// `credentials`: how many the identity has (1, or 2 during a rotation); `first`: the one
    /// to try first, the one that worked last time (0 when none has yet).
    pub fn new(
        credentials: usize,
        first: usize,
        retry: RetryPolicy,
        now: f64,
    ) -> (TokenFetch, Step) {
        let credentials = credentials.max(1);
        let credential = if first < credentials { first } else { 0 };
        let fetch = TokenFetch {
            credentials,
            credential,
            tried: 1,
            attempts: 0,
            started_at: now,
            retry,
        };
        (fetch, Step::Send { credential })
    }

    /// The credential the last [`Step::Send`] asked for.
    pub fn credential(&self) -> usize {
        self.credential
    }

    /// After a [`Step::Sleep`]: send again with the same credential.
    pub fn resume(&self) -> Step {
        Step::Send {
            credential: self.credential,
        }
    }

    /// The result of the request just sent. `jitter` in [0, 1).
    pub fn on_result(&mut self, result: Result<Token, TokenError>, now: f64, jitter: f64) -> Step {
        self.attempts += 1;
        let error = match result {
            Ok(token) => return Step::Done(Ok(token)),
            Err(e) => e,
        };
        let refused = error.is_bad_credential() || matches!(error, TokenError::Credential { .. });
        if refused && self.tried < self.credentials {
            self.tried += 1;
            self.credential = (self.credential + 1) % self.credentials;
            return Step::Send {
                credential: self.credential,
            };
        }
        if let TokenError::Transient {
            retry_after_secs, ..
        } = &error
        {
            let retry_after_ms = retry_after_secs.map(|s| s as f64 * 1000.0);
            if let Some(delay) =
                self.retry
                    .next_delay(self.attempts, now - self.started_at, retry_after_ms, jitter)
            {
                return Step::Sleep(delay);
            }
        }
        Step::Done(Err(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token {
            access_token: "t".into(),
            obtained_at: 0.0,
            expires_at: 3_600_000.0,
        }
    }

    fn bad_secret() -> TokenError {
        TokenError::Rejected {
            status: 401,
            error: "invalid_client".into(),
            aadsts: Some(7_000_215),
        }
    }

    fn throttled(secs: Option<u64>) -> TokenError {
        TokenError::Transient {
            status: Some(429),
            retry_after_secs: secs,
            reason: "429".into(),
        }
    }

    #[test]
    fn the_credential_that_worked_last_is_tried_first_and_the_other_only_when_refused() {
        // Rotation done: the second secret worked last time, so it goes first.
        let (mut f, step) = TokenFetch::new(2, 1, RetryPolicy::default(), 0.0);
        assert_eq!(step, Step::Send { credential: 1 });
        assert_eq!(f.on_result(Ok(token()), 10.0, 0.5), Step::Done(Ok(token())));
        // Refused in turn (rotated back): the first is tried, once.
        let (mut f, _) = TokenFetch::new(2, 1, RetryPolicy::default(), 0.0);
        assert_eq!(
            f.on_result(Err(bad_secret()), 10.0, 0.5),
            Step::Send { credential: 0 }
        );
        assert_eq!(f.credential(), 0);
        assert_eq!(
            f.on_result(Err(bad_secret()), 20.0, 0.5),
            Step::Done(Err(bad_secret())),
            "each credential is tried at most once per fetch"
        );
        // A remembered index beyond the identity's credentials starts at the first.
        let (_, step) = TokenFetch::new(1, 1, RetryPolicy::default(), 0.0);
        assert_eq!(step, Step::Send { credential: 0 });
    }

    #[test]
    fn success_at_once() {
        let (mut f, step) = TokenFetch::new(1, 0, RetryPolicy::default(), 0.0);
        assert_eq!(step, Step::Send { credential: 0 });
        assert_eq!(f.on_result(Ok(token()), 10.0, 0.5), Step::Done(Ok(token())));
    }

    #[test]
    fn a_refused_first_secret_rotates_to_the_second() {
        let (mut f, _) = TokenFetch::new(2, 0, RetryPolicy::default(), 0.0);
        assert_eq!(
            f.on_result(Err(bad_secret()), 10.0, 0.5),
            Step::Send { credential: 1 }
        );
        assert_eq!(f.credential(), 1);
        assert_eq!(f.on_result(Ok(token()), 20.0, 0.5), Step::Done(Ok(token())));
        // A first secret that is not set at all also moves on.
        let (mut f, _) = TokenFetch::new(2, 0, RetryPolicy::default(), 0.0);
        let unset = TokenError::Credential {
            reason: "not set".into(),
        };
        assert_eq!(
            f.on_result(Err(unset), 1.0, 0.5),
            Step::Send { credential: 1 }
        );
    }

    #[test]
    fn both_secrets_refused_ends_with_the_refusal() {
        let (mut f, _) = TokenFetch::new(2, 0, RetryPolicy::default(), 0.0);
        f.on_result(Err(bad_secret()), 10.0, 0.5);
        assert_eq!(
            f.on_result(Err(bad_secret()), 20.0, 0.5),
            Step::Done(Err(bad_secret()))
        );
        // Without a second secret, a refusal is final at once.
        let (mut f, _) = TokenFetch::new(1, 0, RetryPolicy::default(), 0.0);
        assert_eq!(
            f.on_result(Err(bad_secret()), 10.0, 0.5),
            Step::Done(Err(bad_secret()))
        );
    }

    #[test]
    fn transient_failures_retry_honouring_retry_after_then_give_up() {
        let (mut f, _) = TokenFetch::new(1, 0, RetryPolicy::default(), 0.0);
        assert_eq!(
            f.on_result(Err(throttled(Some(2))), 10.0, 0.5),
            Step::Sleep(2_000.0)
        );
        assert_eq!(f.resume(), Step::Send { credential: 0 });
        assert_eq!(
            f.on_result(Err(throttled(None)), 2_100.0, 1.0),
            Step::Sleep(400.0)
        );
        assert_eq!(
            f.on_result(Err(throttled(Some(1))), 2_600.0, 0.5),
            Step::Done(Err(throttled(Some(1))))
        );
    }

    #[test]
    fn a_retry_after_beyond_the_budget_ends_the_fetch_at_once() {
        let (mut f, _) = TokenFetch::new(1, 0, RetryPolicy::default(), 0.0);
        assert_eq!(
            f.on_result(Err(throttled(Some(60))), 10.0, 0.5),
            Step::Done(Err(throttled(Some(60))))
        );
    }

    #[test]
    fn a_rejection_other_than_the_credential_is_not_retried() {
        let (mut f, _) = TokenFetch::new(2, 0, RetryPolicy::default(), 0.0);
        let scope = TokenError::Rejected {
            status: 400,
            error: "invalid_scope".into(),
            aadsts: Some(70_011),
        };
        assert_eq!(
            f.on_result(Err(scope.clone()), 10.0, 0.5),
            Step::Done(Err(scope))
        );
    }
}
