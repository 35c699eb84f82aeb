//! An Envoy `ext_proc` server that runs WebAssembly component plugins.
//!
//! The plugins, their runtime and the chain live in `wasm-extproc-core`, which the in-process
//! module shares; this crate is the ext_proc front end over it. The core's modules are
//! re-exported here under their own names.
//!
//! # Layout
//!
//! - [`config`]: flags and TOML, parsed once into types that cannot be wrong (the server's
//!   listeners over the core's shared settings).
//! - [`ext_proc`]: the gRPC service -- a pure protocol state machine, conversions to and from
//!   Envoy's protobufs, and the per-stream task around them.
//! - [`admin`]: the HTTP admin listener -- health, readiness, metrics, plugins, reload,
//!   recordings.
//! - [`record`]: live exchanges written down as exchange files; it observes the streams
//!   through [`ext_proc::observe`], which the service calls without knowing who listens.
//! - [`server`]: the [`Host`] -- listeners, serving, health, draining at shutdown.
//! - [`telemetry`], [`shutdown`]: logs and signals.
//! - [`authoring`]: `wasm-extproc test` -- exchange files played through the plugins without
//!   Envoy.
//! - From the core: [`registry`] (the chain on disk, reloads), [`runtime`] (wasmtime),
//!   [`chain`] (one message through the plugins), [`guard`], [`breaker`], [`http`],
//!   [`metrics`].
//!
//! # Request flow
//!
//! ```text
//! Envoy ext_proc filter ──gRPC stream──▶ ext_proc::service (the stream's answers, polled by
//!                                         hyper's own task; the registry's current generation)
//!    ProcessingRequest ─▶ ext_proc::exchange::Exchange::{accept, process} (one step per message)
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
//! Components are compiled and linked once per version ([`runtime::Plugin`]); by default every
//! stream gets fresh instances, so plugin state lives for one HTTP exchange and never leaks into
//! another. A plugin set to `isolation = "reuse"` gives up that isolation for speed: an instance
//! that served an exchange without failing may serve later ones, its globals and heap carried
//! over ([`Isolation::Reuse`](wasm_extproc_core::config::Isolation::Reuse)).

pub mod access;
pub mod admin;
pub mod authoring;
pub mod config;
pub mod dev;
pub mod ext_proc;
pub mod record;
pub mod server;
pub mod shutdown;
pub mod telemetry;

pub use config::Config;
pub use server::{Host, Listener, Listeners};
pub use wasm_extproc_core::{
    breaker, chain, guard, http, kv, metrics, registry, runtime, secrets, signing, stream,
};

pub use wasm_extproc_core::http::MAX_MESSAGE_BYTES;
