//! The wasm-extproc plugins in Envoy's own process: an HTTP filter for Envoy's dynamic modules
//! (`envoy.filters.http.dynamic_modules`), built as `libwasm_extproc_module.so`.
//!
//! The same `.wasm` files, the same TOML and the same chain as the ext_proc server
//! (`wasm-extproc-core` is shared); what changes is how messages arrive. Envoy calls this
//! filter for each HTTP stream's headers, body chunks and trailers on the worker thread that
//! owns the stream, and the chain runs right there: no gRPC, no second process. A plugin that
//! waits inside a call (outbound HTTP, Redis) is suspended there instead, and the stream
//! resumes on its worker when the answer comes (see [`exchange`]).
//!
//! # Layout
//!
//! - [`abi`]: Envoy's C ABI, declared by hand for the calls this module makes; the ABI
//!   version it was written for.
//! - [`envoy`]: safe wrappers over one stream's callbacks ([`envoy::EnvoyStream`]), its
//!   scheduler, and plugins' requests through Envoy's clusters ([`envoy::EnvoyWay`]) -- with
//!   [`abi`] and [`hooks`], the only code with `unsafe`.
//! - [`exchange`]: one stream's logic -- which hook runs which phase, the chain its route
//!   names, body holding, header and body changes, immediate responses, messages in flight
//!   and what waits behind them -- over an [`exchange::Envoy`] trait.
//! - [`worker`]: a chain whose plugins never wait, run to completion on the Envoy worker
//!   thread that calls a hook.
//! - [`filter_config`]: one filter configuration: its settings, its registry of plugins,
//!   reloads, a route's configuration; the process-wide runtime the configurations share, and
//!   the module's own thread.
//! - [`stats`]: the core's metrics as Envoy stats.
//! - [`logging`]: `tracing` into Envoy's log.
//! - [`hooks`]: the `extern "C"` functions Envoy calls, each a thin, panic-proof shim.

/// Envoy links tcmalloc, whose allocation sampling walks the stack, and plugins that import
/// WASI run on wasmtime fiber stacks, where that walk faults: the module's own allocations
/// never reach Envoy's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod abi;
mod envoy;
mod exchange;
mod filter_config;
mod hooks;
mod logging;
mod stats;
mod worker;
