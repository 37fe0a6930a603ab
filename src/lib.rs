//! azure-edge-gateway: a Cloudflare Worker that writes to Azure services on behalf of callers
//! that hold no Azure credential.
//!
//! Two halves (docs/architecture.md):
//! - the core, [`aeg_core`] (crates/core): the policy and its compiler, and the phases of a
//!   request as plain Rust, re-exported here;
//! - the edge, [`edge`], compiled only for wasm32: the one place that touches JavaScript. It
//!   reads the request once, performs the I/O the core asks for, and writes the answer and
//!   the log line.

pub use aeg_core::*;

#[cfg(target_arch = "wasm32")]
pub mod edge;

pub mod allocator;

/// The wasm's allocator: small blocks from free lists, the rest from the default ([`allocator`]).
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: allocator::SizeClasses<std::alloc::System> =
    allocator::SizeClasses::new(std::alloc::System);
