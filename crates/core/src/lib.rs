//! The core of azure-edge-gateway: plain Rust with no `worker` types, tested on the host.
//!
//! - [`policy`]: the model of `policy.json`; with the `compile` feature, reading, validation
//!   and the compiler that build.rs runs; [`policy::prepared`] is what the worker loads.
//! - [`pipeline`]: the phases of one request, run by one driver over an I/O interface that
//!   the edge implements (and the tests fake).
//! - [`exchange`]: what the driver, the backends and the edge share: that I/O interface
//!   ([`exchange::Io`]), the per-request context, the caller's answer, the [`exchange::Backend`]
//!   trait.
//! - [`routing`], [`template`], [`inbound`], [`identity`], [`backend`], [`breaker`],
//!   [`coalesce`]: what the phases use.

pub mod backend;
pub mod breaker;
pub mod coalesce;
pub mod crypto;
pub mod encoding;
pub mod exchange;
pub mod fasthash;
pub mod identity;
pub mod inbound;
pub mod pipeline;
pub mod policy;
pub mod problem;
pub mod retry;
pub mod routing;
pub mod sas;
pub mod store;
pub mod template;
pub mod time;
