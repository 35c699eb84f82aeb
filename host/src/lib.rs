//! An Envoy `ext_proc` server that runs WebAssembly component plugins.
//!
//! # Layout
//!
//! - [`config`]: flags and TOML, parsed once into types that cannot be wrong.
//! - [`registry`]: which `.wasm` files form the chain, in which order; reloads.
//! - [`runtime`]: the only module that speaks wasmtime -- engine, pooling allocator, linker,
//!   budgets, and the host side of `wit/processor.wit`.
//! - [`chain`]: one phase of one stream through the chain, with each plugin's failure policy;
//!   [`breaker`] quarantines plugins that keep failing.
//! - [`ext_proc`]: the gRPC service -- a pure protocol state machine, conversions to and from
//!   Envoy's protobufs, and the per-stream task around them.
//! - [`http`]: the host's own types for headers, bodies and verdicts, shared by all of the above.
//! - [`admin`]: the HTTP admin listener -- health, readiness, metrics, plugins, reload.
//! - [`server`]: the [`Host`] -- listeners, serving, health, draining at shutdown.
//! - [`metrics`], [`telemetry`], [`shutdown`]: counters, logs and signals.
//!
//! # Request flow
//!
//! ```text
//! Envoy ext_proc filter ──gRPC stream──▶ ext_proc::service (the stream's answers, polled by
//!                                         hyper's own task; the registry's current generation)
//!    ProcessingRequest ─▶ ext_proc::exchange::Exchange::handle (one step per message)
//!                           convert::inbound ─▶ protocol::observe ─▶ chain::StreamChain::run
//!                                                                  │ for each plugin that handles the phase:
//!                                                                  │   breaker admits? instantiate on first use (pooling allocator)
//!                                                                  │   runtime::Instance::call (deadline, memory limit)
//!                                                                  │   guard::check its changes: keep, or roll back
//!                                                                  │   failure ─▶ policy: skip plugin, or answer with an error
//!    ProcessingResponse(s) ◀─ convert::replies ◀─ Verdict (continue | held | immediate response)
//!                             (+ mode_override; the stream closes once nothing needed can come)
//! ```
//!
//! Components are compiled and linked once per version ([`runtime::Plugin`]); every stream gets
//! fresh instances, so plugin state lives for one HTTP exchange and never leaks into another.

pub mod admin;
pub mod breaker;
pub mod chain;
pub mod config;
pub mod ext_proc;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod shutdown;
pub mod telemetry;

pub use config::Config;
pub use server::{Host, Listener, Listeners};

/// Largest ext_proc message accepted or sent. Envoy buffers bodies up to its connection buffer
/// limit before sending them whole in BUFFERED mode; 8 MiB leaves room for raised limits
/// without letting one message hold unbounded memory.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
