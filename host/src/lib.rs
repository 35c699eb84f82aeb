//! An Envoy `ext_proc` server that runs WebAssembly component plugins.
//!
//! # Layout
//!
//! - [`config`]: flags and TOML, parsed once into types that cannot be wrong.
//! - [`registry`]: which `.wasm` files form the chain, in which order.
//! - [`runtime`]: the only module that speaks wasmtime -- engine, pooling allocator, linker,
//!   budgets, and the host side of `wit/processor.wit`.
//! - [`chain`]: one phase of one stream through the chain, with each plugin's failure policy.
//! - [`ext_proc`]: the gRPC service -- a pure protocol state machine, conversions to and from
//!   Envoy's protobufs, and the per-stream task around them.
//! - [`http`]: the host's own types for headers, bodies and verdicts, shared by all of the above.
//! - [`metrics`], [`telemetry`], [`shutdown`]: counters, logs and signals.
//!
//! # Request flow
//!
//! ```text
//! Envoy ext_proc filter ──gRPC stream──▶ ext_proc::service (one task per stream)
//!    ProcessingRequest ─▶ convert::inbound ─▶ protocol::accept ─▶ chain::StreamChain::run
//!                                                                  │ for each plugin that handles the phase:
//!                                                                  │   instantiate on first use (pooling allocator)
//!                                                                  │   runtime::Instance::call (deadline, memory limit)
//!                                                                  │   failure ─▶ policy: skip plugin, or answer with an error
//!    ProcessingResponse ◀─ convert::outbound ◀─ Verdict (continue with changes | immediate response)
//! ```
//!
//! Components are compiled and linked once, at load ([`runtime::Plugin`]); every stream gets
//! fresh instances, so plugin state lives for one HTTP exchange and never leaks into another.

pub mod chain;
pub mod config;
pub mod ext_proc;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Config;
use config::EnvoySettings;
use metrics::Metrics;
use registry::Chain;
use runtime::{PoolLimits, Runtime};

/// Largest ext_proc message accepted or sent. Envoy buffers bodies up to its connection buffer
/// limit (1 MiB by default) before sending them whole in BUFFERED mode; this leaves room for
/// raised limits without letting one message hold unbounded memory.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// A loaded host: the runtime and the plugin chain, ready to serve.
#[derive(Debug)]
pub struct Host {
    // Field order matters: the chain's instances must go before the runtime's engine ticker.
    chain: Arc<Chain>,
    envoy: EnvoySettings,
    metrics: Arc<Metrics>,
    _runtime: Runtime,
}

impl Host {
    /// Builds the runtime and loads every plugin. Fails, naming the file and the reason, if
    /// any plugin cannot be loaded.
    pub async fn load(config: &Config) -> anyhow::Result<Host> {
        let runtime = Runtime::new(PoolLimits {
            max_instances: config.max_instances,
            max_memory_bytes: config.max_memory_limit_bytes(),
        })?;
        let chain = registry::load_chain(&runtime, config).await?;
        Ok(Host {
            chain: Arc::new(chain),
            envoy: config.envoy.clone(),
            metrics: Metrics::new(),
            _runtime: runtime,
        })
    }

    /// The loaded chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// The host's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves ext_proc and gRPC health on `listener` until `shutdown` completes, then lets
    /// in-flight streams finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let service = ext_proc::ExtProcService::new(
            self.chain.clone(),
            self.envoy.clone(),
            self.metrics.clone(),
        );
        let ext_proc = ExternalProcessorServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        health
            .set_serving::<ExternalProcessorServer<ext_proc::ExtProcService>>()
            .await;
        tracing::info!(
            address = %listener.local_addr()?,
            plugins = self.chain.plugins().len(),
            "serving ext_proc"
        );
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(ext_proc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await?;
        Ok(())
    }
}
