//! Plugins' outbound HTTP: `wasi:http/outgoing-handler` (wasmtime-wasi-http), so that each
//! language's own client works (`fetch` in JavaScript, the `wasi` crate in Rust), held to what
//! the operator allowed.
//!
//! A request goes out only to an origin on the plugin's `http_allow` list; anything else is
//! refused here, before any DNS lookup or connection, with `HTTP-request-denied`. It must
//! finish within nine tenths of the plugin's call budget (connecting, the first byte and the
//! whole body alike: a guest waiting on the network cannot be interrupted by the epoch
//! deadline, so the host bounds the wait, and leaves the plugin the rest to answer), its
//! response body is capped, and a plugin has at most so many requests in flight. Each request
//! is counted per plugin and destination.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::{
    Error, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
};

use wasmtime::component::{Linker, ResourceTable};

use super::capability::{Call, Capability, Host, PluginId};
use crate::config::{HttpSettings, Origin, PluginSettings, Settings};
use crate::metrics::{Metrics, latency_histogram};

/// Where a request to an allowed origin goes out, other than straight there: a front end's
/// own proxy (in Envoy's process, Envoy's HTTP callouts). Called on the thread running the
/// guest, inside its call, when the request is sent.
pub trait Way: Send + Sync {
    /// Sends `request` to `origin` this way, to be answered by `deadline`; or hands it back
    /// to go straight to the origin.
    fn send(
        &self,
        origin: &Origin,
        request: http::Request<WasiBody>,
        deadline: Instant,
    ) -> Result<Answer, Box<http::Request<WasiBody>>>;
}

/// The response a [`Way`] will have.
pub type Answer = Pin<Box<dyn Future<Output = Result<http::Response<WasiBody>, Error>> + Send>>;

/// The process's [`Way`], if a front end set one.
static WAY: OnceLock<Box<dyn Way>> = OnceLock::new();

/// Sets the process's [`Way`] out for outbound requests, once.
pub fn set_way(way: Box<dyn Way>) {
    if WAY.set(way).is_err() {
        tracing::warn!("an outbound way was set already; the first one stays");
    }
}

/// Outbound HTTP, to the origins each plugin's settings allow.
pub struct Outbound {
    families: Families,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutboundLabels {
    chain: String,
    plugin: String,
    destination: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabels {
    chain: String,
    plugin: String,
    destination: String,
}

/// Its series: requests by result, and their durations.
#[derive(Clone)]
pub struct Families {
    requests: Family<OutboundLabels, Counter>,
    seconds: Family<DestinationLabels, Histogram, fn() -> Histogram>,
}

impl Families {
    pub fn register(metrics: &Metrics) -> Families {
        Families {
            requests: metrics.family(
                "outbound_requests",
                "HTTP requests plugins made, by plugin, destination (an allowed origin, or \
                 not_allowed) and result (ok, denied, limit, timeout, error; body_too_large \
                 counts a response whose body passed the cap)",
                Family::default,
            ),
            seconds: metrics.family(
                "outbound_request_duration_seconds",
                "Time from a plugin's HTTP request to its response's headers, by plugin and \
                 destination",
                || Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            ),
        }
    }
}

impl Capability for Outbound {
    type Settings = ();
    type Grant = Arc<PluginHttp>;
    type Store = StoreHttp;

    fn settings(_: &Settings) {}

    fn new((): &(), metrics: &Arc<Metrics>) -> anyhow::Result<Outbound> {
        Ok(Outbound {
            families: Families::register(metrics),
        })
    }

    fn link<T: Host<Self>>(linker: &mut Linker<T>) -> anyhow::Result<()> {
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker).map_err(super::to_anyhow)
    }

    fn grant(&self, plugin: PluginId<'_>, settings: &PluginSettings) -> Arc<PluginHttp> {
        Arc::new(PluginHttp::new(
            settings.http.clone(),
            self.families.clone(),
            plugin.chain.into(),
            plugin.name.into(),
        ))
    }

    fn store(grant: &Arc<PluginHttp>) -> StoreHttp {
        StoreHttp::new(grant.clone())
    }
}

/// How a request ended, as counted.
pub const RESULTS: [&str; 6] = [
    "ok",
    "denied",
    "limit",
    "timeout",
    "error",
    "body_too_large",
];

/// One plugin's outbound HTTP: its allowed origins, its share of connections, its counters.
pub struct PluginHttp {
    settings: HttpSettings,
    in_flight: Arc<Semaphore>,
    families: Families,
    chain: Arc<str>,
    plugin: Arc<str>,
    /// Per allowed origin (and one more for refused destinations): counters by result, and
    /// the duration histogram.
    series: Vec<Series>,
}

#[derive(Default)]
struct Series {
    results: [OnceLock<Counter>; RESULTS.len()],
    seconds: OnceLock<Histogram>,
}

/// The destination label of a request to no allowed origin: bounded, whatever the plugin tries.
const REFUSED: &str = "not_allowed";

impl PluginHttp {
    pub fn new(
        settings: HttpSettings,
        families: Families,
        chain: Arc<str>,
        plugin: Arc<str>,
    ) -> Self {
        let series = (0..=settings.allow.len())
            .map(|_| Series::default())
            .collect();
        PluginHttp {
            in_flight: Arc::new(Semaphore::new(settings.max_concurrent as usize)),
            settings,
            families,
            chain,
            plugin,
            series,
        }
    }

    fn destination(&self, index: usize) -> String {
        self.settings
            .allow
            .get(index)
            .map_or_else(|| REFUSED.to_string(), Origin::to_string)
    }

    fn count(&self, index: usize, result: &'static str) {
        let at = RESULTS.iter().position(|r| *r == result).unwrap_or(0);
        self.series[index].results[at]
            .get_or_init(|| {
                let labels = OutboundLabels {
                    chain: self.chain.to_string(),
                    plugin: self.plugin.to_string(),
                    destination: self.destination(index),
                    result,
                };
                self.families.requests.get_or_create(&labels).clone()
            })
            .inc();
    }

    fn took(&self, index: usize, took: Duration) {
        self.series[index]
            .seconds
            .get_or_init(|| {
                let labels = DestinationLabels {
                    chain: self.chain.to_string(),
                    plugin: self.plugin.to_string(),
                    destination: self.destination(index),
                };
                self.families.seconds.get_or_create(&labels).clone()
            })
            .observe(took.as_secs_f64());
    }

    /// The allowed origin `uri` goes to, by index; or why it is refused.
    fn allowed(&self, uri: &http::Uri) -> Result<usize, &'static str> {
        // `http://user@allowed-host/` names an allowed host, but credentials in a URL are
        // never what an operator allowed: refused here, before anything resolves it.
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err("the URL carries user information");
        }
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri.host().ok_or("the URL has no host")?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        self.settings
            .allow
            .iter()
            .position(|o| o.matches(https, host, port))
            .ok_or("the origin is not in http_allow")
    }
}

/// The hooks of one store: the plugin's rules, and when the current call's requests must be
/// over (set each time the guest reaches `wasi:http`; `None` before).
pub struct Hooks {
    pub plugin: Arc<PluginHttp>,
    pub deadline: Option<Instant>,
}

type Sent = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Sent {
        let plugin = self.plugin.clone();
        let deadline = self.deadline.unwrap_or_else(Instant::now);
        // What is refused is refused now; what is allowed may start now (on the guest's
        // thread: a front end's own way needs that), and is waited for below.
        let checked = (|| {
            let index = match plugin.allowed(request.uri()) {
                Ok(index) => index,
                Err(reason) => {
                    tracing::debug!(
                        chain = &*plugin.chain,
                        plugin = &*plugin.plugin,
                        reason,
                        "outbound request denied"
                    );
                    plugin.count(plugin.settings.allow.len(), "denied");
                    return Err(Error::HttpRequestDenied);
                }
            };
            let Ok(permit) = plugin.in_flight.clone().try_acquire_owned() else {
                plugin.count(index, "limit");
                return Err(Error::ConnectionLimitReached);
            };
            let started = Instant::now();
            let left = deadline.saturating_duration_since(started);
            if left.is_zero() {
                plugin.count(index, "timeout");
                return Err(Error::ConnectionTimeout);
            }
            let origin = &plugin.settings.allow[index];
            let way = match WAY.get() {
                Some(way) => way.send(origin, request, deadline),
                None => Err(Box::new(request)),
            };
            Ok((index, permit, started, left, way))
        })();
        Box::new(async move {
            let (index, permit, started, left, way) = checked?;
            let sent = match way {
                Ok(answer) => {
                    tokio::time::timeout_at(deadline.into(), async move {
                        let response = answer.await?;
                        let io: Box<dyn Future<Output = Result<(), Error>> + Send> =
                            Box::new(async { Ok(()) });
                        Ok((response, io))
                    })
                    .await
                }
                Err(request) => {
                    // Every wait the guest asked for, but none past the call's end.
                    let within =
                        |asked: Option<Duration>| Some(asked.map_or(left, |a| a.min(left)));
                    let options = RequestOptions {
                        connect_timeout: within(options.and_then(|o| o.connect_timeout)),
                        first_byte_timeout: within(options.and_then(|o| o.first_byte_timeout)),
                        between_bytes_timeout: within(
                            options.and_then(|o| o.between_bytes_timeout),
                        ),
                    };
                    tokio::time::timeout_at(deadline.into(), async move {
                        let (response, io) =
                            wasmtime_wasi_http::default_send_request(*request, Some(options))
                                .await?;
                        let response = response.map(|b| b.boxed_unsync());
                        let io: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(io);
                        Ok((response, io))
                    })
                    .await
                }
            };
            let (response, io) = match sent {
                Ok(Ok(sent)) => sent,
                Ok(Err(e)) => {
                    let timeout = matches!(
                        e,
                        Error::ConnectionTimeout
                            | Error::ConnectionReadTimeout
                            | Error::HttpResponseTimeout
                    );
                    plugin.count(index, if timeout { "timeout" } else { "error" });
                    return Err(e);
                }
                Err(_) => {
                    plugin.count(index, "timeout");
                    return Err(Error::HttpResponseTimeout);
                }
            };
            plugin.count(index, "ok");
            plugin.took(index, started.elapsed());
            let (head, inner) = response.into_parts();
            let body = Bounded {
                inner: inner.boxed_unsync(),
                left: plugin.settings.max_response_bytes,
                limit: plugin.settings.max_response_bytes,
                deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
                plugin: plugin.clone(),
                index,
                _permit: permit,
            };
            Ok((http::Response::from_parts(head, body.boxed_unsync()), io))
        })
    }
}

/// What a store keeps for `wasi:http`: the context and the hooks.
pub struct StoreHttp {
    pub ctx: WasiHttpCtx,
    pub hooks: Hooks,
}

impl StoreHttp {
    pub fn new(plugin: Arc<PluginHttp>) -> StoreHttp {
        StoreHttp {
            ctx: WasiHttpCtx::new(),
            hooks: Hooks {
                plugin,
                deadline: None,
            },
        }
    }
}

/// The share of a call's budget an outbound request may take: the rest is the plugin's, to
/// handle the answer, or the error if the request ran out of time.
const REQUEST_SHARE: f64 = 0.9;

impl StoreHttp {
    /// What `wasi:http` works on during a call on `call`'s budget: the context, the hooks
    /// (which learn when the call's requests must be over) and the store's resource table.
    pub fn view<'a>(&'a mut self, table: &'a mut ResourceTable, call: Call) -> WasiHttpCtxView<'a> {
        self.hooks.deadline = Some(call.share_ends(REQUEST_SHARE));
        WasiHttpCtxView {
            ctx: &mut self.ctx,
            table,
            hooks: &mut self.hooks,
        }
    }
}

/// A response body read within the plugin's limits: its size cap and the call's deadline. It
/// holds the plugin's in-flight permit until it is dropped.
struct Bounded {
    inner: WasiBody,
    left: u64,
    limit: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    plugin: Arc<PluginHttp>,
    index: usize,
    _permit: OwnedSemaphorePermit,
}

impl Body for Bounded {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            let index = self.index;
            self.plugin.count(index, "timeout");
            return Poll::Ready(Some(Err(Error::HttpResponseTimeout)));
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > self.left {
                let index = self.index;
                self.plugin.count(index, "body_too_large");
                return Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(self.limit)))));
            }
            self.left -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_origins_without_credentials_pass() {
        let plugin = PluginHttp::new(
            HttpSettings {
                allow: vec![Origin::parse("http://idp.example:8080").unwrap()],
                ..HttpSettings::default()
            },
            Families::register(&Metrics::new()),
            "default".into(),
            "10-token".into(),
        );
        let uri = |text: &str| text.parse::<http::Uri>().unwrap();
        assert_eq!(
            plugin.allowed(&uri("http://idp.example:8080/introspect")),
            Ok(0)
        );
        assert_eq!(plugin.allowed(&uri("http://IDP.example:8080/")), Ok(0));
        for (denied, reason) in [
            ("http://user@idp.example:8080/", "user information"),
            ("http://user:pass@idp.example:8080/", "user information"),
            ("http://idp.example:8081/", "not in http_allow"),
            ("https://idp.example:8080/", "not in http_allow"),
            ("http://other.example:8080/", "not in http_allow"),
        ] {
            let refused = plugin.allowed(&uri(denied)).unwrap_err();
            assert!(refused.contains(reason), "{denied}: {refused}");
        }
    }
}
