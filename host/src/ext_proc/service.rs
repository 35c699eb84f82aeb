//! The tonic service. Each ext_proc stream gets a task that owns its plugin instances, reads
//! Envoy's messages, checks them against the protocol, runs the chain and answers.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::protocol::{ProtocolError, StreamProtocol};
use crate::chain::StreamChain;
use crate::http::Verdict;
use crate::registry::Chain;

/// Answers waiting to be written to one stream. Envoy waits for each answer before it sends
/// the next message of a direction, so a couple of slots is plenty.
const OUTBOUND_BUFFER: usize = 4;

/// The ext_proc service over a loaded plugin chain.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    chain: Arc<Chain>,
}

impl ExtProcService {
    pub fn new(chain: Arc<Chain>) -> Self {
        ExtProcService { chain }
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
        let inbound = request.into_inner();
        let (outbound, receiver) = mpsc::channel(OUTBOUND_BUFFER);
        let chain = self.chain.clone();
        tokio::spawn(async move {
            let task = AssertUnwindSafe(serve_stream(chain, inbound, outbound.clone()));
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

/// Serves one ext_proc stream until Envoy closes it, breaks the protocol or goes away.
async fn serve_stream(
    chain: Arc<Chain>,
    mut inbound: Streaming<ProcessingRequest>,
    outbound: Outbound,
) {
    let mut protocol = StreamProtocol::new();
    let mut plugins = StreamChain::new(chain);
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
        let inbound = match convert::inbound(request)
            .and_then(|inbound| protocol.accept(inbound.phase).map(|()| inbound))
        {
            Ok(inbound) => inbound,
            Err(error) => {
                tracing::warn!("ext_proc protocol error: {error}");
                let _ = outbound.send(Err(protocol_status(&error))).await;
                return;
            }
        };
        let verdict = plugins.run(inbound.phase, inbound.message).await;
        if inbound.observability {
            // Envoy neither waits for nor reads an answer in observability mode.
            continue;
        }
        if matches!(verdict, Verdict::Respond(_)) {
            protocol.answered();
        }
        if outbound
            .send(Ok(convert::outbound(inbound.phase, verdict)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The status for a message that breaks the protocol; the only place one is built.
fn protocol_status(error: &ProtocolError) -> Status {
    match error {
        ProtocolError::EmptyRequest => Status::invalid_argument(error.to_string()),
        ProtocolError::OutOfOrder { .. } | ProtocolError::AfterImmediateResponse { .. } => {
            Status::failed_precondition(error.to_string())
        }
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
