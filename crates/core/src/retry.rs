//! Bounded retries that honour `Retry-After`, for the token endpoint and (later) backends.
//!
//! The policy only decides; the edge sleeps. A retry happens when the attempt count and the
//! time budget both allow it; a `Retry-After` longer than what is left of the budget ends the
//! retries at once, so the caller gets a prompt 503 carrying that `Retry-After` instead of a
//! request that hangs.

/// Retry limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included.
    pub max_attempts: u32,
    /// Time from the first attempt after which no new attempt starts.
    pub budget_ms: f64,
    /// First backoff; doubled after each attempt.
    pub base_delay_ms: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            budget_ms: 10_000.0,
            base_delay_ms: 200.0,
        }
    }
}

impl RetryPolicy {
    /// How long to wait before the next attempt, or `None` to stop. `attempts` is how many
    /// have been made; `retry_after_ms` what the server asked for; `jitter` in [0, 1).
    pub fn next_delay(
        &self,
        attempts: u32,
        elapsed_ms: f64,
        retry_after_ms: Option<f64>,
        jitter: f64,
    ) -> Option<f64> {
        if attempts >= self.max_attempts {
            return None;
        }
        let backoff = self.base_delay_ms * f64::from(1u32 << attempts.saturating_sub(1).min(10));
        // Full jitter on our own backoff; the server's Retry-After is a floor, not jittered.
        let delay = match retry_after_ms {
            Some(ra) => ra.max(backoff * 0.5),
            None => backoff * (0.5 + jitter * 0.5),
        };
        (elapsed_ms + delay <= self.budget_ms).then_some(delay)
    }
}

/// Parses `Retry-After` as delta-seconds (the form Azure and Entra send). An HTTP-date or
/// garbage gives `None`, and the caller falls back to its own backoff.
pub fn parse_retry_after_secs(value: Option<&str>) -> Option<u64> {
    value.and_then(|v| v.trim().parse::<u64>().ok())
}

/// The `Retry-After` a caller is told, and an open circuit breaker honours, when Azure (or
/// Entra) asked for a time: at least 1 s, so that `0` does not invite a loop of immediate
/// retries; at most 5 minutes, past which a wait says "down for a while" no better than 300
/// does, and a caller that obeyed a day (or `99999999999`) would never come back. Azure's
/// throttling asks for seconds to a few minutes (Resource Manager's 429s, Storage's and
/// Service Bus's server-busy answers); the token cache backs off at most 5 minutes as well.
pub const RETRY_AFTER_SECS: std::ops::RangeInclusive<u64> = 1..=300;

/// The caller's `Retry-After` for what Azure asked (`None`: 5 s), within [`RETRY_AFTER_SECS`].
pub fn caller_retry_after(asked_secs: Option<u64>) -> u64 {
    asked_secs
        .unwrap_or(5)
        .clamp(*RETRY_AFTER_SECS.start(), *RETRY_AFTER_SECS.end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_within_attempts_and_budget() {
        let p = RetryPolicy::default();
        assert_eq!(p.next_delay(1, 0.0, None, 1.0), Some(200.0));
        assert_eq!(p.next_delay(2, 300.0, None, 1.0), Some(400.0));
        assert_eq!(
            p.next_delay(3, 900.0, None, 0.0),
            None,
            "attempts exhausted"
        );
        assert_eq!(
            p.next_delay(1, 9_950.0, None, 1.0),
            None,
            "budget exhausted"
        );
    }

    #[test]
    fn honours_retry_after_or_gives_up_when_it_exceeds_the_budget() {
        let p = RetryPolicy::default();
        assert_eq!(p.next_delay(1, 0.0, Some(2_000.0), 0.3), Some(2_000.0));
        assert_eq!(p.next_delay(1, 0.0, Some(60_000.0), 0.3), None);
        assert_eq!(parse_retry_after_secs(Some(" 60 ")), Some(60));
        assert_eq!(
            parse_retry_after_secs(Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
    }

    #[test]
    fn what_azure_asks_reaches_callers_between_1_and_300_seconds() {
        assert_eq!(caller_retry_after(Some(0)), 1);
        assert_eq!(caller_retry_after(Some(17)), 17);
        assert_eq!(caller_retry_after(Some(99_999_999_999)), 300);
        assert_eq!(caller_retry_after(None), 5);
    }
}
