//! azure-edge-gateway: a Cloudflare Worker that writes to Azure services on behalf of callers
//! that hold no Azure credential.
//!
//! The crate has two halves (README, "Layout"):
//! - a pure core, plain Rust tested on the host: [`policy`] (model and validation),
//!   [`routing`], [`template`], [`problem`] and [`pipeline`], the request's life as data;
//! - a thin edge, [`edge`], compiled only for wasm32: the one place that names `worker` types.

pub mod backend;
pub mod encoding;
pub mod identity;
pub mod inbound;
pub mod pipeline;
pub mod policy;
pub mod problem;
pub mod retry;
pub mod routing;
pub mod sha256;
pub mod template;
pub mod time;

#[cfg(target_arch = "wasm32")]
pub mod edge;
