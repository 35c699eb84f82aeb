//! The tonic service. Each ext_proc stream gets a task that owns its plugin instances, reads
//! Envoy's messages, checks them against the protocol, runs the chain and answers.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, Answering};
use super::protocol::{ProtocolError, StreamProtocol};
use crate::chain::{Situation, StreamChain};
use crate::http::{Decision, ExchangeContext, Phase, Verdict};
use crate::metrics::Metrics;
use crate::registry::{Generation, Registry};

/// Answers waiting to be written to one stream. Envoy waits for each answer before it sends
/// the next message of a direction, so a couple of slots is plenty.
const OUTBOUND_BUFFER: usize = 4;

/// The ext_proc service over the registry's current plugin chain.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutting_down: Arc<AtomicBool>,
}

impl ExtProcService {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutting_down: Arc<AtomicBool>,
    ) -> Self {
        ExtProcService {
            registry,
            metrics,
            shutting_down,
        }
    }
}

type Outbound = mpsc::Sender<Result<ProcessingResponse, Status>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("shutting down"));
        }
        // The generation current now serves the whole stream, whatever reloads happen.
        let generation = self
            .registry
            .current()
            .ok_or_else(|| Status::unavailable("plugins are still loading"))?;
        let inbound = request.into_inner();
        let (outbound, receiver) = mpsc::channel(OUTBOUND_BUFFER);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _active = metrics.stream_opened();
            let stream = serve_stream(generation, metrics.clone(), inbound, outbound.clone());
            let task = AssertUnwindSafe(stream);
            if let Err(panic) = task.catch_unwind().await {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(%message, "stream task panicked; ending the stream");
                let _ = outbound
                    .send(Err(Status::internal("ext_proc host error")))
                    .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Serves one ext_proc stream until Envoy closes it, breaks the protocol or goes away, or
/// until no phase any plugin handles can still arrive.
async fn serve_stream(
    generation: Arc<Generation>,
    metrics: Arc<Metrics>,
    mut inbound: Streaming<ProcessingRequest>,
    outbound: Outbound,
) {
    let mut protocol = StreamProtocol::new();
    let mut plugins = StreamChain::new(generation.clone(), metrics.clone());
    let mut exchange = Arc::new(ExchangeContext::default());
    loop {
        let received = tokio::select! {
            received = inbound.message() => received,
            // Envoy reset the stream: stop now and drop the instances.
            () = outbound.closed() => return,
        };
        let request = match received {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(status) if is_transport_loss(&status) => {
                // The connection broke (Envoy restarted, the network dropped): nobody is left
                // to answer.
                tracing::debug!("ext_proc stream lost: {}", status.message());
                return;
            }
            Err(status) => {
                tracing::warn!("unreadable ext_proc message: {}", status.message());
                let _ = outbound.send(Err(unreadable(&status))).await;
                return;
            }
        };
        let mut message = match convert::inbound(request) {
            Ok(message) => message,
            Err(error) => return refuse(&outbound, &error).await,
        };
        if let Err(error) = protocol.observe(&message) {
            return refuse(&outbound, &error).await;
        }
        let phase = message.phase;
        metrics.message_received(phase);
        tracing::trace!(
            %phase,
            attributes = ?message.attributes,
            metadata = ?message.metadata,
            envoy_modes = ?message.envoy_modes,
            "ext_proc message"
        );
        if !message.attributes.is_empty() || !message.metadata.is_empty() {
            let context = Arc::make_mut(&mut exchange);
            context.attributes.append(&mut message.attributes);
            context.metadata.append(&mut message.metadata);
        }
        let direction = phase.direction();
        let check = |m: &_, o: &_| generation.guard.check(phase, m, o);
        let situation = Situation {
            exchange: &exchange,
            body_mode: protocol.body_mode(direction),
            check: &check,
        };
        let answering =
            |phase: Phase, protocol: &StreamProtocol, plugins: &StreamChain| Answering {
                body_mode: protocol.body_mode(direction),
                content_length: protocol.content_length(direction),
                mode_override: protocol.mode_override(phase, plugins.live_phases()),
            };

        // Trailers end a streamed body: plugins holding it for a whole-body call get it now,
        // and what they make of it goes out before the trailers' answer.
        if phase == direction.trailers() && plugins.is_holding(direction) {
            let body_phase = direction.body();
            let flushed = plugins.flush(direction, &situation).await;
            let answer = answering(body_phase, &protocol, &plugins);
            let replies = respond(&mut protocol, body_phase, flushed, &answer);
            if !send(&outbound, replies).await || protocol.is_answered() {
                return;
            }
        }
        if let Some(timeout) = extra_time(&generation, phase)
            && !message.observability
            && !send(&outbound, vec![convert::more_time(timeout)]).await
        {
            return;
        }

        let verdict = plugins.run(phase, message.message, &situation).await;
        if message.observability {
            // Envoy neither waits for nor reads an answer in observability mode.
            continue;
        }
        let answer = answering(phase, &protocol, &plugins);
        let replies = respond(&mut protocol, phase, verdict, &answer);
        if !send(&outbound, replies).await || protocol.is_answered() {
            return;
        }
        if protocol.may_close(plugins.live_phases()) {
            // Nothing any plugin handles can still come, and Envoy holds a copy of whatever
            // is in flight: closing the stream tells Envoy to carry on without the host.
            tracing::trace!("no phase left for the plugins; closing the stream");
            return;
        }
    }
}

fn respond(
    protocol: &mut StreamProtocol,
    phase: Phase,
    verdict: Verdict,
    answering: &Answering,
) -> Vec<ProcessingResponse> {
    if matches!(verdict.decision, Decision::Respond(_)) {
        protocol.answered();
    }
    convert::replies(phase, verdict, answering)
}

async fn send(outbound: &Outbound, replies: Vec<ProcessingResponse>) -> bool {
    for reply in replies {
        if outbound.send(Ok(reply)).await.is_err() {
            return false;
        }
    }
    true
}

async fn refuse(outbound: &Outbound, error: &ProtocolError) {
    tracing::warn!("ext_proc protocol error: {error}");
    let _ = outbound.send(Err(protocol_status(error))).await;
}

/// How long to ask Envoy to wait for `phase`, when the plugins' budgets add up to more than
/// its `message_timeout` (start-up checked that `max_message_timeout` covers them).
fn extra_time(generation: &Generation, phase: Phase) -> Option<Duration> {
    let envoy = &generation.envoy;
    let budget = generation.chain.budget(phase);
    let max = envoy.max_message_timeout?;
    (budget >= envoy.message_timeout).then(|| (budget + envoy.message_timeout).min(max))
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
