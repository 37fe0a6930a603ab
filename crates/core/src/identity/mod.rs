//! Identities: OAuth2 client-credentials tokens, the stand-in for a managed identity.
//!
//! - [`endpoint`]: the token request for an identity and audience, and what an answer means;
//! - [`cache`]: the per-isolate token cache as a state machine over a clock the caller
//!   passes in: single-flight misses, refresh ahead, stale-on-failure, eviction.

pub mod cache;
pub mod endpoint;
pub mod fetch;

pub use endpoint::{Token, TokenError, TokenKey};
