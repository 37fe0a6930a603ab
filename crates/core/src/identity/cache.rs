//! The leases of one isolate (tokens; Storage's user delegation keys), as a state machine: the
//! caller says what time it is and what happened; the cache says what to do. No I/O, no clock,
//! no randomness of its own. [`TokenCache`] is it for tokens, by token endpoint, client and
//! scope; the valet routes hold user delegation keys in one of their own
//! ([`crate::sas::KeyCache`]).
//!
//! Per key:
//! - **miss**: the first caller becomes the *leader* and fetches ([`Lookup::Fetch`]); every
//!   other caller is told to [`Lookup::Wait`] and look again, so any number of concurrent
//!   misses make one token request;
//! - **hit**: a token is served while it is *usable* (before its expiry minus a safety
//!   margin). Once a share of its lifetime has passed (`refresh_ahead`, with jitter), the next
//!   caller gets it with `refresh: true` and refreshes in the background; others keep hitting;
//! - **stale on failure**: a failed refresh keeps the old token, usable until its margin, and
//!   the next refresh waits a back-off; an expired token is never returned;
//! - **failure without a token**: remembered for a short back-off, so waiting callers get the
//!   error at once instead of each hammering the identity provider;
//! - **eviction**: a backend's 401 for a token removes it ([`TokenCache::evict`]).

use std::hash::Hash;

use crate::fasthash::FastMap;
use crate::time::within;

use super::endpoint::{Token, TokenError, TokenKey};

/// What a [`Cache`] holds: a value obtained at a time and good until its expiry.
pub trait Lease: Clone {
    fn obtained_at(&self) -> f64;
    fn expires_at(&self) -> f64;
    fn lifetime_ms(&self) -> f64 {
        self.expires_at() - self.obtained_at()
    }
}

/// Why a fetch failed, remembered for a back-off: the source's own `Retry-After`, if it gave
/// one, sets its length.
pub trait Failure: Clone {
    fn retry_after_secs(&self) -> Option<u64>;
}

impl Lease for Token {
    fn obtained_at(&self) -> f64 {
        self.obtained_at
    }
    fn expires_at(&self) -> f64 {
        self.expires_at
    }
}

impl Failure for TokenError {
    fn retry_after_secs(&self) -> Option<u64> {
        match self {
            TokenError::Transient {
                retry_after_secs, ..
            } => *retry_after_secs,
            _ => None,
        }
    }
}

/// Tuning, shared by all keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheConfig {
    /// A token stops being served this long before it expires: `margin_share` of its
    /// lifetime, kept between `min_margin_ms` and `max_margin_ms` (and under half the
    /// lifetime). It covers clock skew, the time a request takes to reach Azure, and the
    /// rounding of `expires_in` to whole seconds: a token's real `exp` can be up to a second
    /// earlier than the one computed from `expires_in`.
    pub min_margin_ms: f64,
    pub max_margin_ms: f64,
    pub margin_share: f64,
    /// Refresh-ahead jitter: ± this share of the lifetime around the refresh point.
    pub jitter_share: f64,
    /// After a failure, how long before the next attempt when the provider named no time.
    pub failure_backoff_ms: f64,
    /// A leader that has not completed after this long is presumed gone; the next caller leads.
    pub leader_timeout_ms: f64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            min_margin_ms: 2_000.0,
            max_margin_ms: 60_000.0,
            margin_share: 0.1,
            jitter_share: 0.05,
            failure_backoff_ms: 5_000.0,
            leader_timeout_ms: 30_000.0,
        }
    }
}

/// What a caller should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup<V = Token, E = TokenError> {
    /// Use this value. With `refresh: true` the caller is also the refresh leader: it should
    /// fetch a new one (in the background, where it can) and report with [`Cache::complete`].
    Hit { value: V, refresh: bool },
    /// No usable value and nobody fetching: fetch, then [`Cache::complete`].
    Fetch,
    /// Another caller is fetching: wait a moment and look again.
    Wait,
    /// The last fetch failed moments ago and there is no usable value.
    Failed(E),
}

#[derive(Debug)]
struct Entry<V, E> {
    value: Option<V>,
    /// When the current token should be refreshed (and, after a failed refresh, retried).
    refresh_at: f64,
    /// Since when a leader has been fetching.
    fetching_since: Option<f64>,
    /// A recent failure and until when it is the answer.
    failure: Option<(E, f64)>,
}

impl<V, E> Default for Entry<V, E> {
    fn default() -> Self {
        Entry {
            value: None,
            refresh_at: 0.0,
            fetching_since: None,
            failure: None,
        }
    }
}

/// Leases by key, for one isolate.
#[derive(Debug)]
pub struct Cache<K, V, E> {
    config: CacheConfig,
    entries: FastMap<K, Entry<V, E>>,
}

/// Tokens by token endpoint, client and scope.
pub type TokenCache = Cache<TokenKey, Token, TokenError>;

impl<K, V, E> Default for Cache<K, V, E> {
    fn default() -> Self {
        Cache {
            config: CacheConfig::default(),
            entries: FastMap::default(),
        }
    }
}

/// Whether `lease` may still be handed out at `now` (its margin before expiry not reached).
fn usable<V: Lease>(c: &CacheConfig, lease: &V, now: f64) -> bool {
    let lifetime = lease.lifetime_ms();
    let margin =
        within(lifetime * c.margin_share, c.min_margin_ms, c.max_margin_ms).min(lifetime / 2.0);
    now < lease.expires_at() - margin
}

impl<K: Hash + Eq + Clone, V: Lease, E: Failure> Cache<K, V, E> {
    pub fn new(config: CacheConfig) -> Self {
        Cache {
            config,
            entries: FastMap::default(),
        }
    }

    /// What to do for `key` at `now`.
    pub fn lookup(&mut self, key: &K, now: f64) -> Lookup<V, E> {
        let leader_timeout = self.config.leader_timeout_ms;
        let config = self.config;
        // The key is copied only the first time it is seen.
        if !self.entries.contains_key(key) {
            self.entries.insert(key.clone(), Entry::default());
        }
        let Some(entry) = self.entries.get_mut(key) else {
            return Lookup::Fetch;
        };
        let usable = entry
            .value
            .as_ref()
            .filter(|t| usable(&config, *t, now))
            .cloned();
        let leader_alive = entry
            .fetching_since
            .is_some_and(|since| now - since < leader_timeout);
        if let Some(token) = usable {
            let refresh = now >= entry.refresh_at && !leader_alive;
            if refresh {
                entry.fetching_since = Some(now);
            }
            return Lookup::Hit {
                value: token,
                refresh,
            };
        }
        if leader_alive {
            return Lookup::Wait;
        }
        if let Some((error, until)) = &entry.failure {
            if now < *until {
                return Lookup::Failed(error.clone());
            }
        }
        entry.fetching_since = Some(now);
        Lookup::Fetch
    }

    /// The leader's report. `jitter` is a random number in [0, 1) for the refresh point.
    pub fn complete(
        &mut self,
        key: &K,
        result: Result<V, E>,
        now: f64,
        refresh_share: f64,
        jitter: f64,
    ) {
        let config = self.config;
        let entry = self.entries.entry(key.clone()).or_default();
        entry.fetching_since = None;
        match result {
            Ok(token) => {
                let lifetime = token.lifetime_ms();
                let share = refresh_share + config.jitter_share * (2.0 * jitter - 1.0);
                entry.refresh_at = token.obtained_at() + lifetime * within(share, 0.05, 0.95);
                entry.value = Some(token);
                entry.failure = None;
            }
            Err(error) => {
                let backoff = match error.retry_after_secs() {
                    Some(s) => (s as f64 * 1000.0).min(300_000.0),
                    None => config.failure_backoff_ms,
                };
                // Keep any token we have (it is served while usable); retry the refresh later.
                entry.refresh_at = now + backoff;
                entry.failure = Some((error, now + backoff));
            }
        }
    }

    /// Forgets the value of `key` if `refused` says it is the one that was refused, so the
    /// next caller fetches anew; a newer value that replaced it meanwhile is kept.
    pub fn evict_if(&mut self, key: &K, refused: impl Fn(&V) -> bool) -> bool {
        match self.entries.get_mut(key) {
            Some(entry) if entry.value.as_ref().is_some_and(refused) => {
                entry.value = None;
                entry.refresh_at = 0.0;
                true
            }
            _ => false,
        }
    }
}

impl TokenCache {
    /// A backend refused this token (401): forget it, so the next request fetches anew.
    /// A newer token that replaced it meanwhile is kept.
    pub fn evict(&mut self, key: &TokenKey, access_token: &str) -> bool {
        self.evict_if(key, |t| *t.access_token == *access_token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFETIME: f64 = 3_600_000.0; // one hour
    const T0: f64 = 1_000_000_000.0;

    fn key() -> TokenKey {
        TokenKey {
            token_url: "https://login/t/oauth2/v2.0/token".into(),
            client_id: "c".into(),
            scope: "s/.default".into(),
        }
    }

    fn token(name: &str, obtained_at: f64) -> Token {
        Token {
            access_token: name.into(),
            obtained_at,
            expires_at: obtained_at + LIFETIME,
        }
    }

    fn transient(retry_after_secs: Option<u64>) -> TokenError {
        TokenError::Transient {
            status: Some(503),
            retry_after_secs,
            reason: "down".into(),
        }
    }

    /// A cache holding token "a" obtained at T0, refresh point exactly at half its life.
    fn warm() -> TokenCache {
        let mut cache = TokenCache::default();
        assert_eq!(cache.lookup(&key(), T0), Lookup::Fetch);
        cache.complete(&key(), Ok(token("a", T0)), T0, 0.5, 0.5);
        cache
    }

    fn hit(token_name: &str, refresh: bool, obtained_at: f64) -> Lookup {
        Lookup::Hit {
            value: token(token_name, obtained_at),
            refresh,
        }
    }

    #[test]
    fn a_miss_makes_one_leader_and_everyone_else_waits() {
        let mut cache = TokenCache::default();
        assert_eq!(cache.lookup(&key(), T0), Lookup::Fetch);
        for i in 0..199 {
            assert_eq!(cache.lookup(&key(), T0 + f64::from(i)), Lookup::Wait);
        }
        cache.complete(&key(), Ok(token("a", T0)), T0 + 50.0, 0.5, 0.5);
        assert_eq!(cache.lookup(&key(), T0 + 60.0), hit("a", false, T0));
    }

    #[test]
    fn a_vanished_leader_is_replaced_after_its_timeout() {
        let mut cache = TokenCache::default();
        assert_eq!(cache.lookup(&key(), T0), Lookup::Fetch);
        assert_eq!(cache.lookup(&key(), T0 + 29_999.0), Lookup::Wait);
        assert_eq!(cache.lookup(&key(), T0 + 30_000.0), Lookup::Fetch);
    }

    #[test]
    fn hits_until_the_refresh_point_then_one_background_refresh() {
        let mut cache = warm();
        assert_eq!(
            cache.lookup(&key(), T0 + LIFETIME * 0.49),
            hit("a", false, T0)
        );
        // Past half-life: the first caller refreshes, the others keep the cached token.
        assert_eq!(
            cache.lookup(&key(), T0 + LIFETIME * 0.5),
            hit("a", true, T0)
        );
        assert_eq!(
            cache.lookup(&key(), T0 + LIFETIME * 0.5 + 10_000.0),
            hit("a", false, T0)
        );
        let now = T0 + LIFETIME * 0.5 + 20_000.0;
        cache.complete(&key(), Ok(token("b", now)), now, 0.5, 0.5);
        assert_eq!(cache.lookup(&key(), now + 1.0), hit("b", false, now));
    }

    #[test]
    fn the_refresh_point_is_jittered_within_bounds() {
        for (jitter, share) in [(0.0, 0.45), (0.999_999, 0.55)] {
            let mut cache = TokenCache::default();
            cache.lookup(&key(), T0);
            cache.complete(&key(), Ok(token("a", T0)), T0, 0.5, jitter);
            let refresh_at = T0 + LIFETIME * share;
            assert_eq!(
                cache.lookup(&key(), refresh_at - 1_000.0),
                hit("a", false, T0)
            );
            assert_eq!(
                cache.lookup(&key(), refresh_at + 1_000.0),
                hit("a", true, T0)
            );
        }
    }

    #[test]
    fn a_failed_refresh_serves_the_stale_token_until_its_margin_never_after() {
        let mut cache = warm();
        let refresh = T0 + LIFETIME * 0.6;
        assert_eq!(cache.lookup(&key(), refresh), hit("a", true, T0));
        cache.complete(&key(), Err(transient(None)), refresh + 10.0, 0.5, 0.5);
        // Still served, and no new refresh before the back-off (5 s) has passed.
        assert_eq!(cache.lookup(&key(), refresh + 1_000.0), hit("a", false, T0));
        assert_eq!(cache.lookup(&key(), refresh + 5_010.0), hit("a", true, T0));
        cache.complete(
            &key(),
            Err(transient(Some(30))),
            refresh + 5_020.0,
            0.5,
            0.5,
        );
        // Margin: min(60 s, 10% of an hour) = 60 s before expiry.
        let margin_start = T0 + LIFETIME - 60_000.0;
        assert_eq!(cache.lookup(&key(), margin_start - 1.0), hit("a", true, T0));
        cache.complete(
            &key(),
            Err(transient(Some(30))),
            margin_start - 1.0,
            0.5,
            0.5,
        );
        // Inside the margin the token is never served; the recent failure is the answer.
        assert!(matches!(
            cache.lookup(&key(), margin_start),
            Lookup::Failed(TokenError::Transient { .. })
        ));
        assert!(matches!(
            cache.lookup(&key(), margin_start + 29_000.0),
            Lookup::Failed(_)
        ));
        // Once the back-off is over, a new fetch is tried.
        assert_eq!(cache.lookup(&key(), margin_start + 30_000.0), Lookup::Fetch);
    }

    #[test]
    fn a_failure_without_a_token_answers_waiters_at_once_for_its_backoff() {
        let mut cache = TokenCache::default();
        assert_eq!(cache.lookup(&key(), T0), Lookup::Fetch);
        assert_eq!(cache.lookup(&key(), T0 + 1.0), Lookup::Wait);
        let rejected = TokenError::Rejected {
            status: 401,
            error: "invalid_client".into(),
            aadsts: Some(7_000_215),
        };
        cache.complete(&key(), Err(rejected.clone()), T0 + 20.0, 0.5, 0.5);
        assert_eq!(cache.lookup(&key(), T0 + 21.0), Lookup::Failed(rejected));
        assert_eq!(cache.lookup(&key(), T0 + 20.0 + 5_000.0), Lookup::Fetch);
    }

    #[test]
    fn short_lived_tokens_keep_a_margin_of_at_least_two_seconds() {
        let mut cache = TokenCache::default();
        cache.lookup(&key(), T0);
        let short = Token {
            access_token: "s".into(),
            obtained_at: T0,
            expires_at: T0 + 10_000.0,
        };
        cache.complete(&key(), Ok(short.clone()), T0, 0.5, 0.5);
        assert_eq!(
            cache.lookup(&key(), T0 + 7_999.0),
            Lookup::Hit {
                value: short,
                refresh: true
            }
        );
        // 10% of 10 s is 1 s, below the 2 s floor (expires_in is rounded to whole seconds):
        // at 8 s the token is no longer served.
        assert_eq!(cache.lookup(&key(), T0 + 8_000.0), Lookup::Wait);
    }

    #[test]
    fn a_401_evicts_that_token_but_not_a_newer_one() {
        let mut cache = warm();
        assert!(!cache.evict(&key(), "not-a"));
        assert!(cache.evict(&key(), "a"));
        assert_eq!(cache.lookup(&key(), T0 + 1.0), Lookup::Fetch);
        cache.complete(&key(), Ok(token("b", T0 + 2.0)), T0 + 2.0, 0.5, 0.5);
        assert!(
            !cache.evict(&key(), "a"),
            "a late 401 for the old token keeps the new one"
        );
        assert_eq!(cache.lookup(&key(), T0 + 3.0), hit("b", false, T0 + 2.0));
    }

    #[test]
    fn keys_are_independent() {
        let mut cache = warm();
        let other = TokenKey {
            scope: "https://servicebus.azure.net/.default".into(),
            ..key()
        };
        assert_eq!(cache.lookup(&other, T0 + 1.0), Lookup::Fetch);
        assert_eq!(cache.lookup(&key(), T0 + 1.0), hit("a", false, T0));
    }
}
