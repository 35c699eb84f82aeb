//! An ext_proc client that plays Envoy against the host, one message at a time.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse,
    processing_request::Request,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// How long a test waits for one answer before calling the host stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the host.
pub async fn connect(address: SocketAddr) -> ExternalProcessorClient<Channel> {
    ExternalProcessorClient::connect(format!("http://{address}"))
        .await
        .expect("host reachable")
}

/// One ext_proc stream, as Envoy would drive it.
#[derive(Debug)]
pub struct ExtProcStream {
    sender: mpsc::Sender<ProcessingRequest>,
    answers: Streaming<ProcessingResponse>,
}

impl ExtProcStream {
    pub async fn open(client: &mut ExternalProcessorClient<Channel>) -> ExtProcStream {
        Self::try_open(client).await.expect("stream opens")
    }

    /// Opens a stream, or returns the status the host refused it with.
    pub async fn try_open(
        client: &mut ExternalProcessorClient<Channel>,
    ) -> Result<ExtProcStream, tonic::Status> {
        let (sender, receiver) = mpsc::channel(16);
        let answers = client
            .process(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        Ok(ExtProcStream { sender, answers })
    }

    /// Connects and opens a stream, or returns the status the host refused it with.
    pub async fn try_connect(address: SocketAddr) -> Result<ExtProcStream, tonic::Status> {
        Self::try_open(&mut connect(address).await).await
    }

    /// Connects to the host at `address` and opens one stream.
    pub async fn connect(address: SocketAddr) -> ExtProcStream {
        Self::open(&mut connect(address).await).await
    }

    /// Connects, opens a stream and exchanges request headers for `/` with more to come: a
    /// stream with an exchange in flight.
    pub async fn begin(address: SocketAddr) -> ExtProcStream {
        let mut stream = Self::connect(address).await;
        stream
            .exchange(request_headers(&[(":path", "/")], false))
            .await;
        stream
    }

    /// Sends a message without waiting for an answer.
    pub async fn send(&self, request: ProcessingRequest) {
        self.sender.send(request).await.expect("stream open");
    }

    /// The next answer, or the status the host ended the stream with; `Ok(None)` when the
    /// host closed the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<ProcessingResponse>, tonic::Status> {
        tokio::time::timeout(ANSWER_TIMEOUT, self.answers.message())
            .await
            .expect("host answers in time")
    }

    /// Sends a message and returns its answer.
    pub async fn exchange(&mut self, request: ProcessingRequest) -> ProcessingResponse {
        self.send(request).await;
        self.next()
            .await
            .expect("no error status")
            .expect("an answer")
    }

    /// Ends the client side, as Envoy does when the exchange is over.
    pub fn close(self) -> Streaming<ProcessingResponse> {
        self.answers
    }
}

fn header_map(headers: &[(&str, &str)]) -> Option<HeaderMap> {
    Some(HeaderMap {
        headers: headers
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                raw_value: v.as_bytes().to_vec(),
                ..HeaderValue::default()
            })
            .collect(),
    })
}

fn wrap(request: Request) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        ..ProcessingRequest::default()
    }
}

/// `request` as Envoy sends it for a client at `address` (`10.0.0.7:51234`): with the
/// `source.address` attribute.
pub fn from(mut request: ProcessingRequest, address: &str) -> ProcessingRequest {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    request.attributes.insert(
        "envoy.filters.http.ext_proc".into(),
        Struct {
            fields: [(
                "source.address".to_string(),
                Value {
                    kind: Some(Kind::StringValue(address.into())),
                },
            )]
            .into(),
        },
    );
    request
}

pub fn request_headers(headers: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    wrap(Request::RequestHeaders(HttpHeaders {
        headers: header_map(headers),
        end_of_stream,
        ..HttpHeaders::default()
    }))
}

pub fn response_headers(headers: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    wrap(Request::ResponseHeaders(HttpHeaders {
        headers: header_map(headers),
        end_of_stream,
        ..HttpHeaders::default()
    }))
}

pub fn request_body(body: &[u8], end_of_stream: bool) -> ProcessingRequest {
    wrap(Request::RequestBody(HttpBody {
        body: body.to_vec(),
        end_of_stream,
        ..HttpBody::default()
    }))
}

pub fn response_body(body: &[u8], end_of_stream: bool) -> ProcessingRequest {
    wrap(Request::ResponseBody(HttpBody {
        body: body.to_vec(),
        end_of_stream,
        ..HttpBody::default()
    }))
}

pub fn request_trailers(trailers: &[(&str, &str)]) -> ProcessingRequest {
    wrap(Request::RequestTrailers(HttpTrailers {
        trailers: header_map(trailers),
    }))
}

pub fn response_trailers(trailers: &[(&str, &str)]) -> ProcessingRequest {
    wrap(Request::ResponseTrailers(HttpTrailers {
        trailers: header_map(trailers),
    }))
}

/// Passes bytes through untouched, so tests can send what no protobuf encoder would.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug)]
pub struct RawEncoder;

#[derive(Debug)]
pub struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// Opens a Process stream, sends `messages` as raw gRPC message bodies, and returns the status
/// the host ended the stream with (or the raw answers, if it answered them).
pub async fn send_raw(
    address: SocketAddr,
    messages: Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("valid uri")
        .connect()
        .await
        .expect("host reachable");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
    );
    let request = tonic::Request::new(futures::stream::iter(messages));
    let mut answers = grpc.streaming(request, path, RawCodec).await?.into_inner();
    let mut received = Vec::new();
    while let Some(answer) = tokio::time::timeout(ANSWER_TIMEOUT, answers.message())
        .await
        .expect("host answers in time")?
    {
        received.push(answer);
    }
    Ok(received)
}
