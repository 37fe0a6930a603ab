//! The core of azure-edge-gateway: plain Rust with no `worker` types, tested on the host.
//!
//! - [`policy`]: the model of `policy.json`; with the `compile` feature, reading, validation
//!   and the compiler that build.rs runs; [`policy::prepared`] is what the worker loads.
//! - [`pipeline`]: the phases of one request, run by one driver over an I/O interface that
//!   the edge implements (and the tests fake).
//! - [`routing`], [`template`], [`inbound`], [`identity`], [`backend`], [`breaker`],
//!   [`coalesce`]: what the phases use.

pub mod backend;
pub mod breaker;
pub mod coalesce;
pub mod crypto;
pub mod encoding;
pub mod fasthash;
pub mod identity;
pub mod inbound;
pub mod pipeline;
pub mod policy;
pub mod problem;
pub mod retry;
pub mod routing;
pub mod store;
pub mod template;
pub mod time;
