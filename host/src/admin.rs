//! The admin HTTP listener: what operators and Kubernetes ask of a running host.
//!
//! | path | answers |
//! |---|---|
//! | `GET /healthz` | 200 while the process runs (liveness) |
//! | `GET /readyz` | 200 once plugins are loaded and until shutdown begins, else 503 (readiness) |
//! | `GET /metrics` | Prometheus metrics (OpenMetrics text) |
//! | `GET /plugins` | the loaded chains as JSON (name, routes, plugins), and each plugin: chain, name, file, SHA-256, contract version, load time, phases, body delivery, what each needs from Envoy's `processing_mode`, settings, call counts |
//! | `POST /reload` | reloads plugins and configuration now; 200 with what loaded, or 500 with why not |
//!
//! The read endpoints answer anyone who reaches the listener (the scrape path). `POST`
//! endpoints answer only a client presenting `admin_token_file`'s token as a bearer token, or,
//! without one configured, a connection from 127.0.0.1 or ::1 ([`AdminAccess`]): 401 or 403
//! otherwise, counted, and logged within a budget ([`REFUSAL_LINES_PER_SECOND`]).
//!
//! A client that connects and says nothing is cut off after [`HEADER_READ_TIMEOUT`], and at
//! most [`MAX_CONNECTIONS`] are served at once: one more closes the oldest, so a flood of idle
//! connections never keeps Kubernetes' probes (a new, short connection each) from an answer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::access::{AdminAccess, Refusal};
use crate::config::{FailurePolicy, UnknownChain};
use crate::http::Delivery;
use crate::metrics::{Metrics, OUTCOMES};
use crate::record::{RecordError, RecordRequest, Recorder};
use crate::registry::Registry;
use wasm_extproc_core::log_budget::LogBudget;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct State {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub shutting_down: Arc<AtomicBool>,
    pub recorder: Arc<Recorder>,
    /// Who may change the host's state.
    pub access: AdminAccess,
    /// How many refusals may be logged.
    pub refusal_lines: Arc<LogBudget>,
}

impl State {
    /// The budget for refusal lines an admin listener starts with.
    pub fn refusal_lines() -> Arc<LogBudget> {
        Arc::new(LogBudget::new(
            "admin".into(),
            "refusals".into(),
            REFUSAL_LINES_PER_SECOND,
            prometheus_client::metrics::counter::Counter::default(),
        ))
    }
}

/// How long a client may take to send a request's headers: a probe or a scrape sends them at
/// once.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once: room for every scraper, probe and operator, and a bound on what
/// idle ones hold.
pub const MAX_CONNECTIONS: usize = 256;
/// Refused requests logged per second, in bursts of as many; the rest are counted only, with
/// a line now and then saying how many went unlogged.
pub const REFUSAL_LINES_PER_SECOND: u32 = 10;

/// The connections being served, oldest first, each with what ends it.
#[derive(Debug, Default)]
struct Connections {
    next: u64,
    open: VecDeque<(u64, CancellationToken)>,
}

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: State,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Mutex::new(Connections::default()));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!("admin accept failed: {error}");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let state = state.clone();
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(route(&state, peer, request).await) }
        });
        // HTTP/1.1, what probes and scrapers speak: its header-read timeout runs from the
        // connection's first moment (a protocol-sniffing server would wait for a first byte).
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        let (id, ended) = {
            let mut all = connections.lock().expect("not poisoned");
            if all.open.len() >= MAX_CONNECTIONS
                && let Some((_, oldest)) = all.open.pop_front()
            {
                oldest.cancel();
            }
            let id = all.next;
            all.next += 1;
            let ended = CancellationToken::new();
            all.open.push_back((id, ended.clone()));
            (id, ended)
        };
        let connections = connections.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = ended.cancelled() => {}
            }
            let mut all = connections.lock().expect("not poisoned");
            all.open.retain(|(open, _)| *open != id);
        });
    }
    graceful.shutdown().await;
    Ok(())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{value:#}\n"))))
        .expect("valid response")
}

async fn route(
    state: &State,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.method() == Method::POST
        && let Err(refusal) = state.access.admit(
            peer,
            request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
    {
        return refused(state, peer, request.uri().path(), &refusal);
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.shutting_down.load(Ordering::SeqCst) {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else if state.registry.current().is_none() {
                text(StatusCode::SERVICE_UNAVAILABLE, "plugins not loaded\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(state.metrics.render())))
            .expect("valid response"),
        (&Method::GET, "/plugins") => json(StatusCode::OK, &plugins(state)),
        (&Method::POST, "/reload") => match state.registry.reload().await {
            Ok(summary) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "generation": summary.generation,
                    "plugins": summary.plugins,
                    "compiled": summary.compiled,
                }),
            ),
            Err(error) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({ "error": format!("{error:#}") }),
            ),
        },
        (&Method::GET, "/record") => json(
            StatusCode::OK,
            &serde_json::json!(state.recorder.statuses()),
        ),
        (&Method::POST, "/record") => record(state, request.uri().query().unwrap_or("")),
        (_, "/healthz" | "/readyz" | "/metrics" | "/plugins" | "/reload" | "/record") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `POST /record?chain=NAME...`: starts (or restarts) a chain's recording, or stops it.
fn record(state: &State, query: &str) -> Response<Full<Bytes>> {
    let error = |status, message: String| json(status, &serde_json::json!({ "error": message }));
    let exists = |chain: &str| {
        state
            .registry
            .current()
            .is_some_and(|generation| generation.chains().iter().any(|c| c.name() == chain))
    };
    match RecordRequest::from_query(query) {
        Err(message) => error(StatusCode::BAD_REQUEST, message),
        // Only a chain the host serves: the name goes into a file name and a log line.
        Ok(RecordRequest::Start(chain, _)) if !exists(&chain) => error(
            StatusCode::NOT_FOUND,
            format!("no chain named {chain:?} is loaded (GET /plugins lists them)"),
        ),
        Ok(RecordRequest::Start(chain, over)) => match state.recorder.start(&chain, Some(over)) {
            Ok(status) => json(StatusCode::OK, &serde_json::json!(status)),
            Err(failure @ RecordError::TooMany) => {
                error(StatusCode::TOO_MANY_REQUESTS, failure.to_string())
            }
            Err(failure) => error(StatusCode::CONFLICT, failure.to_string()),
        },
        Ok(RecordRequest::Stop(chain)) => match state.recorder.stop(&chain) {
            Some(status) => json(StatusCode::OK, &serde_json::json!(status)),
            None => error(
                StatusCode::NOT_FOUND,
                format!("chain {chain:?} is not recording"),
            ),
        },
    }
}

/// The answer to a state-changing request `access` turned away, logged and counted.
fn refused(
    state: &State,
    peer: SocketAddr,
    path: &str,
    refusal: &Refusal,
) -> Response<Full<Bytes>> {
    state.metrics.refused("admin", refusal.reason());
    let logged = state.refusal_lines.admit(std::time::Instant::now());
    if let Some(unlogged) = logged.summary {
        tracing::warn!(
            unlogged,
            "admin requests refused and not logged (over {REFUSAL_LINES_PER_SECOND} lines a \
             second; all are counted in wasm_extproc_refused_total)"
        );
    }
    if logged.write {
        tracing::warn!(%peer, path, reason = refusal.reason(), "admin request refused");
    }
    match refusal {
        Refusal::Unauthorized(_) => Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(hyper::header::WWW_AUTHENTICATE, "Bearer realm=\"wasm-extproc admin\"")
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(
                "this endpoint needs the admin token: Authorization: Bearer <admin_token_file's content>\n",
            )))
            .expect("valid response"),
        Refusal::NotLocal => text(
            StatusCode::FORBIDDEN,
            "this endpoint answers only local connections (127.0.0.1, ::1: kubectl port-forward \
             or exec) unless the host has an admin_token_file\n",
        ),
        Refusal::TokenUnavailable(why) => {
            tracing::error!("admin token unavailable: {why}");
            text(StatusCode::SERVICE_UNAVAILABLE, "admin token unavailable\n")
        }
    }
}

fn plugins(state: &State) -> serde_json::Value {
    let Some(generation) = state.registry.current() else {
        return serde_json::json!({ "generation": null, "plugins": [] });
    };
    let plugins: Vec<serde_json::Value> = generation
        .plugins()
        .map(|plugin| {
            let registration = plugin.registration();
            let settings = plugin.settings();
            let delivery = |d: Delivery| match d {
                Delivery::Chunks => "chunks",
                Delivery::Whole => "whole",
            };
            let calls: serde_json::Map<String, serde_json::Value> = OUTCOMES
                .into_iter()
                .map(|outcome| {
                    (
                        outcome.to_string(),
                        state
                            .metrics
                            .chain_plugin_outcomes(plugin.chain(), plugin.name(), outcome)
                            .into(),
                    )
                })
                .collect();
            serde_json::json!({
                "chain": plugin.chain(),
                "name": plugin.name(),
                "path": plugin.path().display().to_string(),
                "sha256": plugin.digest(),
                "contract": plugin.contract().version(),
                "signature": plugin.signature().to_string(),
                "loaded_at_unix": plugin
                    .loaded_at()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default(),
                "phases": registration.phases.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                "request_body": delivery(registration.request_body),
                "response_body": delivery(registration.response_body),
                "needs_from_envoy": registration.envoy_needs(),
                // A shadow runs beside the plugin it names: no policy of its own applies, as its
                // failures touch nothing but its own metrics.
                "mode": if settings.shadows.is_some() { "shadow" } else { "serve" },
                "shadows": settings.shadows,
                "failure_policy": match (&settings.shadows, settings.failure_policy) {
                    (Some(_), _) => None,
                    (None, FailurePolicy::Open) => Some("fail-open".to_string()),
                    (None, FailurePolicy::Closed { status }) => {
                        Some(format!("fail-closed ({status})"))
                    }
                },
                "timeout_ms": settings.budget.timeout.as_millis() as u64,
                "memory_limit_bytes": settings.budget.memory_limit_bytes,
                // Names only: a secret's value never leaves the plugins granted it.
                "secrets": settings.secrets,
                "calls": calls,
            })
        })
        .collect();
    let chains: Vec<serde_json::Value> = generation
        .chains()
        .iter()
        .enumerate()
        .map(|(index, chain)| {
            serde_json::json!({
                "name": chain.name(),
                "routes": generation.routes_of(index),
                "plugins": chain.plugins().iter().map(|p| p.name()).collect::<Vec<_>>(),
                "shadows": chain
                    .shadows()
                    .iter()
                    .map(|shadow| serde_json::json!({
                        "name": shadow.plugin.name(),
                        "beside": chain.plugins()[shadow.beside].name(),
                    }))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "generation": generation.number,
        "plugins_dir": generation.plugins_dir.display().to_string(),
        "unknown_chain": match generation.unknown_chain {
            UnknownChain::Default => "default",
            UnknownChain::Reject => "reject",
        },
        "chains": chains,
        "plugins": plugins,
    })
}
