//! The service as tonic serves it: the one gRPC method, with each stream's buffers sized for
//! what ext_proc sends.
//!
//! The server envoy-types generates encodes and decodes with tonic's default codec, which gives
//! every stream two 8 KiB buffers from the start: one Envoy's messages are read into, one the
//! answers are encoded in. An ext_proc stream carries headers of a few hundred bytes each way
//! and stays open while the upstream works, so with thousands of streams open those buffers
//! were most of what a stream cost in memory. Here they start at [`STREAM_BUFFER_BYTES`] and
//! grow, as tonic's do, for a message that needs more (a body chunk, up to
//! [`MAX_MESSAGE_BYTES`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{Body, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::{ProstDecoder, ProstEncoder};

use super::service::{Answers, ExtProcService};
use crate::MAX_MESSAGE_BYTES;

/// Where each stream's read and write buffers start (tonic's default: 8 KiB each).
pub const STREAM_BUFFER_BYTES: usize = 1024;
/// How much encoded answer tonic gathers before handing it to HTTP/2 (its default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;
/// The method's path, as gRPC routes it.
const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

/// `envoy.service.ext_proc.v3.ExternalProcessor`, served by an [`ExtProcService`].
#[derive(Debug, Clone)]
pub struct ExtProcServer {
    service: Arc<ExtProcService>,
}

impl ExtProcServer {
    pub fn new(service: ExtProcService) -> Self {
        ExtProcServer {
            service: Arc::new(service),
        }
    }
}

impl NamedService for ExtProcServer {
    const NAME: &'static str = "envoy.service.ext_proc.v3.ExternalProcessor";
}

type Answer =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl<B> Service<http::Request<B>> for ExtProcServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Answer {
        if request.uri().path() != PROCESS_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let process = Process(self.service.clone());
        Box::pin(async move {
            let mut grpc = Grpc::new(StreamCodec)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.streaming(process, request).await)
        })
    }
}

/// The method, as tonic calls it.
struct Process(Arc<ExtProcService>);

impl StreamingService<ProcessingRequest> for Process {
    type Response = ProcessingResponse;
    type ResponseStream = Answers;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Answers>, Status>> + Send>>;

    fn call(&mut self, request: Request<Streaming<ProcessingRequest>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.process(request).await })
    }
}

/// Protobuf, as tonic's own codec, with a stream's buffers starting at [`STREAM_BUFFER_BYTES`].
#[derive(Debug, Clone, Copy)]
struct StreamCodec;

impl StreamCodec {
    fn buffers() -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
    }
}

impl Codec for StreamCodec {
    type Encode = ProcessingResponse;
    type Decode = ProcessingRequest;
    type Encoder = ProstEncoder<ProcessingResponse>;
    type Decoder = ProstDecoder<ProcessingRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(Self::buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(Self::buffers())
    }
}
