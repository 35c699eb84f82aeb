//! The tonic service: a thin loop that reads Envoy's messages, hands each to the stream's
//! [`Exchange`] and sends what it answers.
//!
//! A stream's answers are the stream of its [`Serving`] state, polled by the task hyper
//! already runs for each HTTP/2 stream: no task or channel of its own, and the stream's
//! instances are dropped the moment Envoy resets it (hyper drops the response stream).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::{FutureExt, Stream};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::{Request, Response, Status, Streaming};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::exchange::{Accepted, CHAIN_METADATA, Exchange, Then};
use super::observe::{Observer, StreamObserver};
use super::overload::Overload;
use super::protocol::ProtocolError;
use crate::access::ClientIdentities;
use crate::metrics::{Metrics, StreamGuard};
use crate::registry::Registry;
use crate::telemetry::{STREAM_SPAN, TRACE_TARGET, remote_context};

/// The ext_proc service over the registry's current plugin chain.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutting_down: Arc<AtomicBool>,
    /// Every stream being served: shutdown waits for them.
    streams: TaskTracker,
    /// Which client certificates may open streams.
    identities: ClientIdentities,
    /// Whoever watches streams (the recorder).
    observer: Arc<dyn Observer>,
    /// How long a stream may wait for Envoy's next message.
    idle_timeout: Duration,
    /// When new streams are refused for the host's lag.
    overload: Arc<Overload>,
}

impl ExtProcService {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutting_down: Arc<AtomicBool>,
        streams: TaskTracker,
        observer: Arc<dyn Observer>,
        identities: ClientIdentities,
        overload: Arc<Overload>,
    ) -> Self {
        ExtProcService {
            overload,
            registry,
            metrics,
            shutting_down,
            streams,
            identities,
            observer,
            idle_timeout: crate::config::DEFAULT_STREAM_IDLE_TIMEOUT,
        }
    }

    /// Streams that wait longer than `timeout` for Envoy's next message are ended.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }
}

/// The answers of one stream.
pub type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = Answers;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Answers>, Status> {
        self.identities.admit(&request, &self.metrics)?;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("shutting down"));
        }
        if let Some(lag) = self.overload.shedding() {
            self.metrics.refused("ext_proc", "overload");
            return Err(Status::unavailable(format!(
                "overloaded: work waits {} ms for a worker, at or over [overload] \
                 shed_after_ms ({} ms); new streams are refused until it catches up",
                lag.as_millis(),
                self.overload.shed_after().unwrap_or_default().as_millis()
            )));
        }
        // The generation current now serves the whole stream, whatever reloads happen.
        let generation = self
            .registry
            .current()
            .ok_or_else(|| Status::unavailable("plugins are still loading"))?;
        // The chain Envoy's route asked for, if it did.
        let requested = request
            .metadata()
            .get(CHAIN_METADATA)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        // Continues Envoy's trace when a trace layer is on (`[tracing]`); else disabled.
        let span = tracing::trace_span!(
            target: TRACE_TARGET,
            STREAM_SPAN,
            otel.kind = "server",
            chain = tracing::field::Empty,
        );
        if !span.is_disabled() {
            let _ = span.set_parent(remote_context(request.metadata()));
        }
        // Boxed: the stream's state moves in and out of each poll of `unfold` as a pointer.
        let serving = Box::new(Serving {
            exchange: Exchange::new(generation, self.metrics.clone(), requested.as_deref()),
            inbound: request.into_inner(),
            pending: Vec::new().into_iter(),
            next: Next::Read,
            _active: self.metrics.stream_opened(),
            _tracked: self.streams.token(),
            observer: self
                .observer
                .is_observing()
                .then(|| self.observer.clone().observe()),
            idle: Idle {
                timeout: self.idle_timeout,
                timer: None,
                metrics: self.metrics.clone(),
            },
        });
        if !span.is_disabled() {
            span.record("chain", serving.exchange.chain_name());
        }
        self.overload.stream_opened();
        // The stream's span is entered while its work runs: for each poll of an answer, by
        // reference (`Instrument` would take a clone of it for each answer, and enter it again
        // to drop each finished future).
        let answers = futures::stream::unfold((serving, span), |(mut serving, span)| async move {
            let answer = {
                let mut answering = std::pin::pin!(serving.next_answer());
                std::future::poll_fn(|cx| {
                    let _entered = span.enter();
                    answering.as_mut().poll(cx)
                })
                .await?
            };
            Some((answer, (serving, span)))
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

/// One stream being served.
struct Serving {
    inbound: Streaming<ProcessingRequest>,
    exchange: Exchange,
    /// Answers of the last message not sent yet.
    pending: std::vec::IntoIter<ProcessingResponse>,
    next: Next,
    _active: StreamGuard,
    _tracked: TaskTrackerToken,
    /// The watch over this stream, if something watches it.
    observer: Option<Box<dyn StreamObserver>>,
    idle: Idle,
}

/// How long the stream may wait for Envoy's next message, and the one timer that watches: made
/// the first time a read has to wait, and re-armed only when it fires early (a stream waits
/// between phases, so a timer per wait would cost every message a timer of its own).
struct Idle {
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    metrics: Arc<Metrics>,
}

impl Drop for Serving {
    /// A watched stream's watch hears of its end, however it ends.
    fn drop(&mut self) {
        if let Some(observer) = self.observer.take() {
            observer.ended(self.exchange.chain_name());
        }
    }
}

/// What the stream does once its pending answers are sent.
enum Next {
    /// Read Envoy's next message.
    Read,
    /// Run the plugins on a message already accepted (its early answer has gone out).
    Process(Box<Accepted>),
    /// End with OK.
    Close,
    /// End with this status.
    Fail(Status),
}

impl Serving {
    /// The next answer to send; `None` ends the stream with OK.
    async fn next_answer(&mut self) -> Option<Result<ProcessingResponse, Status>> {
        loop {
            if let Some(answer) = self.pending.next() {
                return Some(Ok(answer));
            }
            let accepted = match std::mem::replace(&mut self.next, Next::Close) {
                Next::Read => {
                    let request = match self.read().await {
                        Ok(Some(request)) => request,
                        Ok(None) => return None,
                        Err(status) => return Some(Err(status)),
                    };
                    if let Some(observer) = &mut self.observer {
                        observer.received(&request);
                    }
                    let exchange = &mut self.exchange;
                    let accepting = async {
                        #[cfg(test)]
                        tests::panic_if_asked(&request);
                        exchange.accept(request)
                    };
                    match contained(accepting).await {
                        Ok(Ok(mut accepted)) => match accepted.more_time.take() {
                            Some(more_time) => {
                                self.next = Next::Process(Box::new(accepted));
                                return Some(Ok(more_time));
                            }
                            None => accepted,
                        },
                        Ok(Err(error)) => {
                            tracing::warn!("ext_proc protocol error: {error}");
                            return Some(Err(protocol_status(&error)));
                        }
                        Err(status) => return Some(Err(status)),
                    }
                }
                Next::Process(accepted) => *accepted,
                Next::Close => return None,
                Next::Fail(status) => return Some(Err(status)),
            };
            self.next = match contained(self.exchange.process(accepted)).await {
                Ok(step) => {
                    if let Some(observer) = &mut self.observer
                        && observer
                            .answered(self.exchange.chain_name(), &step.answers)
                            .is_break()
                    {
                        self.observer = None;
                    }
                    self.pending = step.answers.into_iter();
                    match step.then {
                        Then::Continue => Next::Read,
                        Then::Close => Next::Close,
                    }
                }
                Err(status) => Next::Fail(status),
            };
        }
    }

    /// Envoy's next message; `None` when it ended the stream or the connection is gone.
    async fn read(&mut self) -> Result<Option<ProcessingRequest>, Status> {
        // Most messages are there already: no timer unless the stream has to wait.
        let received = match self.inbound.message().now_or_never() {
            Some(received) => received,
            None => self.wait_for_message().await?,
        };
        match received {
            Ok(request) => Ok(request),
            Err(status) if is_transport_loss(&status) => {
                // The connection broke (Envoy restarted, the network dropped): nobody is left
                // to answer.
                tracing::debug!("ext_proc stream lost: {}", status.message());
                Ok(None)
            }
            Err(status) => {
                tracing::warn!("unreadable ext_proc message: {}", status.message());
                Err(unreadable(&status))
            }
        }
    }
}

impl Serving {
    /// Waits for Envoy's next message, for the idle timeout at most: a stream that sends
    /// nothing that long is ended, and its instances go back to the pool.
    async fn wait_for_message(
        &mut self,
    ) -> Result<Result<Option<ProcessingRequest>, Status>, Status> {
        let Serving { inbound, idle, .. } = self;
        let deadline = tokio::time::Instant::now() + idle.timeout;
        let timer = idle
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            tokio::select! {
                biased;
                received = inbound.message() => return Ok(received),
                () = timer.as_mut() => {
                    if tokio::time::Instant::now() >= deadline {
                        idle.metrics.idle_stream_ended();
                        tracing::debug!(
                            timeout_ms = idle.timeout.as_millis() as u64,
                            "ext_proc stream idle too long: ended"
                        );
                        return Err(Status::deadline_exceeded(format!(
                            "no message from Envoy for {} ms (stream_idle_timeout_ms): the \
                             stream is ended and its plugin instances freed",
                            idle.timeout.as_millis()
                        )));
                    }
                    // Armed by an earlier wait: this one ends later.
                    timer.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// Runs `work`, turning a panic in the host's own code into the end of this stream only. Not
/// an `async fn`: one would hold `work` twice in its state (the argument and the awaited
/// future), and the stream's future is built anew for every answer.
fn contained<T>(work: impl Future<Output = T>) -> impl Future<Output = Result<T, Status>> {
    AssertUnwindSafe(work).catch_unwind().map(|caught| {
        caught.map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%message, "serving a stream panicked; ending the stream");
            Status::internal("ext_proc host error")
        })
    })
}

/// The status for a message that breaks the protocol; the only place one is built.
fn protocol_status(error: &ProtocolError) -> Status {
    match error {
        ProtocolError::EmptyRequest => Status::invalid_argument(error.to_string()),
        ProtocolError::OutOfOrder { .. }
        | ProtocolError::AfterImmediateResponse { .. }
        | ProtocolError::AfterEndOfStream { .. } => Status::failed_precondition(error.to_string()),
    }
}

/// tonic reports a broken HTTP/2 stream or connection this way; every other error while
/// reading (undecodable protobuf, a message over the size limit) is about the message itself.
fn is_transport_loss(status: &Status) -> bool {
    status.code() == tonic::Code::Cancelled || status.message().starts_with("h2 protocol error")
}

fn unreadable(status: &Status) -> Status {
    Status::new(
        status.code(),
        format!("cannot read ProcessingRequest: {}", status.message()),
    )
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::HttpHeaders;
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Inbound;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;
    use crate::config::Config;
    use crate::server::{Host, Listener, Listeners};

    /// The request path that makes the host's own code panic, in test builds only: no plugin
    /// can, so this is how a test gets a panic into the middle of serving a stream.
    const PANIC_PATH: &[u8] = b"/test-only/panic";

    pub(super) fn panic_if_asked(request: &ProcessingRequest) {
        if let Some(Inbound::RequestHeaders(headers)) = &request.request
            && headers
                .headers
                .iter()
                .flat_map(|h| &h.headers)
                .any(|h| h.key == ":path" && h.raw_value == PANIC_PATH)
        {
            panic!("asked to panic");
        }
    }

    fn request_headers(path: &[u8]) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(Inbound::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue {
                        key: ":path".into(),
                        raw_value: path.to_vec(),
                        ..HeaderValue::default()
                    }],
                }),
                end_of_stream: false,
                ..HttpHeaders::default()
            })),
            ..ProcessingRequest::default()
        }
    }

    /// The bundled plugin, as `cargo xtask build-plugins` builds it.
    fn bundled_plugin() -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
        let path = target.join("wasm32-unknown-unknown/release/asm_demo.wasm");
        assert!(
            path.is_file(),
            "{} missing: run `cargo xtask build-plugins`",
            path.display()
        );
        path
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_while_serving_ends_only_its_own_stream_with_internal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(bundled_plugin(), dir.path().join("asm.wasm")).unwrap();
        let text = format!(
            "plugins_dir = {:?}\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"off\"\n\
             [runtime]\nmax_instances = 100\nmax_wasi_instances = 10\n",
            dir.path().display().to_string()
        );
        let config = Config::from_toml(&text, Path::new("test.toml")).unwrap();
        let host = Arc::new(Host::new(config.clone()).unwrap());
        host.reload().await.unwrap();
        let listeners = Listeners::bind(&config).await.unwrap();
        let Listener::Tcp(listener) = &listeners.ext_proc else {
            panic!("a TCP listener");
        };
        let address = listener.local_addr().unwrap();
        let serving = host.clone();
        tokio::spawn(async move { serving.serve(listeners, std::future::pending()).await });

        let mut client = ExternalProcessorClient::connect(format!("http://{address}"))
            .await
            .unwrap();
        let mut open = async || {
            let (sender, receiver) = tokio::sync::mpsc::channel(4);
            let answers = client
                .process(ReceiverStream::new(receiver))
                .await
                .unwrap()
                .into_inner();
            (sender, answers)
        };
        // A healthy stream with an exchange in flight, then one that panics, on the same
        // connection.
        let (healthy, mut healthy_answers) = open().await;
        healthy.send(request_headers(b"/")).await.unwrap();
        assert!(healthy_answers.message().await.unwrap().is_some());
        let (doomed, mut doomed_answers) = open().await;
        doomed.send(request_headers(PANIC_PATH)).await.unwrap();
        let status = doomed_answers.message().await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert_eq!(status.message(), "ext_proc host error");
        // The healthy stream carries on, and new streams are served.
        healthy
            .send(ProcessingRequest {
                request: Some(Inbound::ResponseHeaders(HttpHeaders::default())),
                ..ProcessingRequest::default()
            })
            .await
            .unwrap();
        assert!(healthy_answers.message().await.unwrap().is_some());
        let (fresh, mut fresh_answers) = open().await;
        fresh.send(request_headers(b"/")).await.unwrap();
        assert!(fresh_answers.message().await.unwrap().is_some());
        // Only the fresh stream is still open: the healthy one ended after its response
        // headers (nothing more for the plugin), the doomed one left nothing behind.
        assert_eq!(host.metrics().active_streams(), 1);
    }
}
