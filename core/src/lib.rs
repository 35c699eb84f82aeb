//! The plugin runtime both wasm-extproc front ends share: the ext_proc server
//! (`wasm-extproc`) and the in-process Envoy module (`wasm-extproc-module`).
//!
//! Nothing here knows how messages reach it. A front end turns what Envoy gives it into
//! [`http::Message`]s, hands each to its [`stream::Stream`], and turns the [`stream::Turn`]
//! of [`http::Verdict`]s back into what Envoy understands.
//!
//! # Layout
//!
//! - [`config`]: the TOML both front ends read, parsed once into types that cannot be wrong.
//! - [`registry`]: which `.wasm` files form the chains, in which order; reloads;
//!   [`signing`] checks who signed them.
//! - [`runtime`]: the only module that speaks wasmtime -- engine, pooling allocator, linker,
//!   budgets, and the host side of `wit/processor.wit`.
//! - [`stream`]: one stream's rules, for both front ends: what the plugins still want, headers
//!   kept back for body handlers, instances given back early, when the stream may end.
//! - [`chain`]: one phase of one stream through the chain, with each plugin's failure policy;
//!   [`breaker`] quarantines plugins that keep failing; [`log_budget`] bounds what they log;
//!   [`bodies`] bounds the body bytes all streams hold together.
//! - [`kv`]: state plugins keep between exchanges (`wasi:keyvalue`, the contract's `state`),
//!   in memory or in Redis; [`secrets`]: values the operator keeps in files, granted by name.
//! - [`guard`]: keeps plugins' changes inside what Envoy accepts.
//! - [`http`]: the types for headers, bodies and verdicts, shared by all of the above.
//! - [`metrics`]: counters and histograms, in Prometheus form.
//!
//! Components are compiled and linked once per version ([`runtime::Plugin`]); by default every
//! stream gets fresh instances, so plugin state lives for one HTTP exchange and never leaks into
//! another; what must outlive it goes through [`kv`], namespaced and bounded. A plugin set to
//! `isolation = "reuse"` ([`config::Isolation::Reuse`]) trades that isolation for speed: an
//! instance that served an exchange without failing may serve later ones.

pub mod bodies;
pub mod breaker;
pub mod chain;
pub mod config;
pub mod guard;
pub mod http;
pub mod kv;
pub mod log_budget;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod secrets;
pub mod signing;
pub mod stream;
