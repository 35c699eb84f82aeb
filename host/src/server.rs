//! The [`Host`]: its listeners, the gRPC and admin servers, health, and draining at shutdown.
//! `serve` takes its listeners and a shutdown future, so tests bind `127.0.0.1:0` and stop
//! cleanly.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::server::HealthReporter;

use crate::access::{AdminAccess, ClientIdentities};
use crate::admin;
use crate::config::{Config, ListenAddr};
use crate::ext_proc::overload::Overload;
use crate::ext_proc::{ExtProcServer, ExtProcService};
use crate::metrics::Metrics;
use crate::record::Recorder;
use crate::registry::{self, ConfigSource, Generation, Mode, Registry, ReloadSummary};
use crate::runtime::{PoolLimits, Runtime};

/// How long closing listeners may take once draining is over.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections accepted on `listener`, ready for gRPC. Every ext_proc exchange is a small
/// write answered by a small write: with Nagle's algorithm on, each answer waits for Envoy's
/// delayed ACK of the one before, some 40 ms per exchange. tonic sets `TCP_NODELAY` only on
/// listeners it binds itself, so a listener bound here (before plugins load, for the health
/// probes) must ask for it.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The host: the runtime, the plugin registry, metrics and health.
pub struct Host {
    config: Config,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    health: HealthReporter,
    shutting_down: Arc<AtomicBool>,
    /// The ext_proc streams being served: shutdown waits for them.
    streams: TaskTracker,
    /// Recordings of live exchanges (`[record]`, `POST /record`).
    recorder: Arc<Recorder>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// Where the host listens.
#[derive(Debug)]
pub struct Listeners {
    pub ext_proc: Listener,
    /// The admin HTTP listener, if enabled.
    pub admin: Option<TcpListener>,
}

/// The gRPC listener: TCP, or a Unix domain socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub async fn bind(address: &ListenAddr) -> anyhow::Result<Listener> {
        match address {
            ListenAddr::Tcp(address) => TcpListener::bind(address)
                .await
                .map(Listener::Tcp)
                .with_context(|| format!("cannot listen on {address}")),
            ListenAddr::Unix(path) => {
                // A socket left by a previous run would make bind fail.
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove stale socket {}", path.display())
                    })?;
                }
                UnixListener::bind(path)
                    .map(|l| Listener::Unix(l, path.clone()))
                    .with_context(|| format!("cannot listen on unix:{}", path.display()))
            }
        }
    }

    /// What to tell people: the bound address.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(listener) => listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

impl Listeners {
    /// Binds the listeners the configuration names.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let ext_proc = Listener::bind(&config.listen).await?;
        let admin = match config.admin_listen {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on {address} (admin)"))?,
            ),
            None => None,
        };
        Ok(Listeners { ext_proc, admin })
    }
}

impl Host {
    /// A host whose reloads re-use `config` as it is (plugins are re-read, settings are not).
    pub fn new(config: Config) -> anyhow::Result<Host> {
        let fixed = config.settings.clone();
        Self::with_source(config, Box::new(move || Ok(fixed.clone())))
    }

    /// A host whose reloads read their configuration from `source` (the file and flags again).
    pub fn with_source(config: Config, source: ConfigSource) -> anyhow::Result<Host> {
        let metrics = Metrics::new();
        let runtime = Runtime::new(PoolLimits::of(&config.settings), &metrics)?;
        let registry = Arc::new(Registry::new(
            Arc::new(runtime),
            source,
            metrics.clone(),
            Mode::ExtProc,
        ));
        let recorder = Arc::new(Recorder::new(config.record.clone())?);
        Ok(Host {
            config,
            registry,
            metrics,
            health: HealthReporter::new(),
            shutting_down: Arc::new(AtomicBool::new(false)),
            streams: TaskTracker::new(),
            recorder,
        })
    }

    /// A host with its plugins loaded: fails, naming the file and the reason, if any plugin
    /// cannot be loaded.
    pub async fn load(config: &Config) -> anyhow::Result<Host> {
        let host = Host::new(config.clone())?;
        host.reload().await?;
        Ok(host)
    }

    /// Loads the plugins (again). On failure the current chain, if any, keeps serving.
    pub async fn reload(&self) -> anyhow::Result<ReloadSummary> {
        let summary = self.registry.reload().await?;
        if !self.shutting_down.load(Ordering::SeqCst) {
            self.set_health(tonic_health::ServingStatus::Serving).await;
        }
        Ok(summary)
    }

    /// The generation new streams get; `None` before the first load.
    pub fn current(&self) -> Option<Arc<Generation>> {
        self.registry.current()
    }

    /// Compilation cache hits and misses so far; `None` without `cache_dir`.
    pub fn compile_cache_stats(&self) -> Option<(usize, usize)> {
        self.registry.runtime().cache_stats()
    }

    /// The host's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Whether new streams would be served: plugins loaded, not shutting down.
    pub fn is_ready(&self) -> bool {
        self.registry.current().is_some() && !self.shutting_down.load(Ordering::SeqCst)
    }

    async fn set_health(&self, status: tonic_health::ServingStatus) {
        self.health.set_service_status("", status).await;
        self.health
            .set_service_status(<ExtProcServer as tonic::server::NamedService>::NAME, status)
            .await;
    }

    /// Serves ext_proc and gRPC health (and the admin listener) until `shutdown` completes.
    /// Health says NOT_SERVING until the plugins are loaded ([`reload`](Self::reload)), and
    /// again as soon as `shutdown` completes; then new streams are refused and in-flight ones
    /// get the configured grace period to finish.
    pub async fn serve(
        &self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        if !self.is_ready() {
            self.set_health(tonic_health::ServingStatus::NotServing)
                .await;
        }
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.health.clone()),
        );
        // The lag is measured for as long as the host serves.
        let overload = Overload::new(self.config.shed_after, &self.metrics);
        let _probe = AbortOnDropHandle::new(tokio::spawn(overload.clone().probe()));
        let ext_proc = ExtProcServer::new(
            ExtProcService::new(
                self.registry.clone(),
                self.metrics.clone(),
                self.shutting_down.clone(),
                self.streams.clone(),
                self.recorder.clone(),
                ClientIdentities::new(
                    self.config
                        .tls
                        .as_ref()
                        .map_or(&[][..], |tls| &tls.allowed_client_sans),
                ),
                overload,
            )
            .idle_timeout(self.config.stream_idle_timeout),
        );

        let settings = &self.config.settings;
        let _watch = match (settings.watch, settings.plugins_dir.is_dir()) {
            (true, true) => Some(registry::watch(
                self.registry.clone(),
                &settings.plugins_dir,
                self.config.file.as_deref(),
            )?),
            _ => None,
        };

        // Shutdown: health goes NOT_SERVING and readiness fails at once, new streams are
        // refused (UNAVAILABLE), and in-flight ones get the grace period to finish. The
        // listeners stay open meanwhile, so health checks and probes see the change; then
        // they close.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let grace = self.config.shutdown_grace;
        let draining = async {
            shutdown.await;
            self.shutting_down.store(true, Ordering::SeqCst);
            self.set_health(tonic_health::ServingStatus::NotServing)
                .await;
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                active_streams = self.streams.len(),
                "shutting down: refusing new streams, letting in-flight ones finish"
            );
            self.streams.close();
            if tokio::time::timeout(grace, self.streams.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    active_streams = self.streams.len(),
                    "grace period over; closing the remaining streams"
                );
            }
            let _ = stop.send(true);
        };
        let wait_stop = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|s| *s).await;
        };

        let admin = listeners.admin.map(|listener| {
            tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving admin");
            admin::serve(
                listener,
                admin::State {
                    registry: self.registry.clone(),
                    metrics: self.metrics.clone(),
                    shutting_down: self.shutting_down.clone(),
                    recorder: self.recorder.clone(),
                    access: AdminAccess {
                        token_file: self.config.admin_token_file.clone(),
                    },
                    refusal_lines: admin::State::refusal_lines(),
                },
                wait_stop(stopped.clone()),
            )
        });

        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.config.tls {
            let mut settings =
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(ca) = &tls.client_ca_pem {
                settings = settings.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder
                .tls_config(settings)
                .context("invalid TLS certificate or key")?;
        }
        let router = builder.add_service(health_service).add_service(ext_proc);
        tracing::info!(
            address = %listeners.ext_proc.describe(),
            tls = self.config.tls.is_some(),
            "serving ext_proc"
        );
        let grpc = async {
            let signal = wait_stop(stopped.clone());
            match listeners.ext_proc {
                Listener::Tcp(listener) => {
                    router
                        .serve_with_incoming_shutdown(incoming(listener), signal)
                        .await
                }
                Listener::Unix(listener, _) => {
                    router
                        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal)
                        .await
                }
            }
        };
        let serving = async {
            let admin = async {
                match admin {
                    Some(admin) => admin.await,
                    None => Ok(()),
                }
            };
            let (grpc, admin) = tokio::join!(grpc, admin);
            grpc?;
            admin
        };
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => return result,
            () = draining => {}
        }
        // The listeners are closing; connections still open (streams past the grace period)
        // get a moment to see it, then are dropped.
        match tokio::time::timeout(CLOSE_TIMEOUT, serving).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;

    /// Without `TCP_NODELAY` every ext_proc answer after the first waits out a delayed ACK.
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut incoming = incoming(listener);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
