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

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::{FutureExt, Stream};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::{Request, Response, Status, Streaming};

use super::exchange::{Accepted, Exchange, Then};
use super::protocol::ProtocolError;
use crate::metrics::{Metrics, StreamGuard};
use crate::registry::Registry;

/// The ext_proc service over the registry's current plugin chain.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutting_down: Arc<AtomicBool>,
    /// Every stream being served: shutdown waits for them.
    streams: TaskTracker,
}

impl ExtProcService {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutting_down: Arc<AtomicBool>,
        streams: TaskTracker,
    ) -> Self {
        ExtProcService {
            registry,
            metrics,
            shutting_down,
            streams,
        }
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
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("shutting down"));
        }
        // The generation current now serves the whole stream, whatever reloads happen.
        let generation = self
            .registry
            .current()
            .ok_or_else(|| Status::unavailable("plugins are still loading"))?;
        // Boxed: the stream's state moves in and out of each poll of `unfold` as a pointer.
        let serving = Box::new(Serving {
            inbound: request.into_inner(),
            exchange: Exchange::new(generation, self.metrics.clone()),
            pending: Vec::new().into_iter(),
            next: Next::Read,
            _active: self.metrics.stream_opened(),
            _tracked: self.streams.token(),
        });
        let answers = futures::stream::unfold(serving, |mut serving| async move {
            let answer = serving.next_answer().await?;
            Some((answer, serving))
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
                    let exchange = &mut self.exchange;
                    match contained(async { exchange.accept(request) }).await {
                        Ok(Ok(mut accepted)) => match accepted.ahead.take() {
                            Some(ahead) => {
                                self.next = Next::Process(Box::new(accepted));
                                return Some(Ok(ahead));
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
        match self.inbound.message().await {
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

/// Runs `work`, turning a panic in the host's own code into the end of this stream only.
async fn contained<T>(work: impl Future<Output = T>) -> Result<T, Status> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%message, "serving a stream panicked; ending the stream");
            Status::internal("ext_proc host error")
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
