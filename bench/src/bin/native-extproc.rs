//! The bundled ASM plugin's job as a plain Rust ext_proc server, with no Wasm in the way: the
//! baseline the benchmark holds wasm-extproc against.
//!
//! It is what one would write for this one job without the host, in the shape of the Alibaba
//! Cloud Service Mesh guide's Go server: every message on a stream gets its answer at once,
//! request headers with `x-ext-proc-header: hello-to-asm` set, response headers with
//! `hello-from-asm`, bodies and trailers with an empty answer so Envoy never waits on one. It
//! keeps each stream open until Envoy closes it, and asks for no change of processing mode.

use std::net::SocketAddr;
use std::pin::Pin;

use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Answer;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    ProcessingResponse, TrailersResponse,
};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

const HEADER: &str = "x-ext-proc-header";

#[derive(Debug, Parser)]
#[command(name = "native-extproc")]
struct Cli {
    /// Address of the gRPC listener.
    #[arg(long, default_value = "127.0.0.1:9002")]
    listen: SocketAddr,
}

#[derive(Debug)]
struct AsmDemo;

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for AsmDemo {
    type ProcessStream = Answers;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Answers>, Status> {
        // One answer per message, in order: Envoy sends the next message of a direction only
        // after the previous one is answered, so nothing needs buffering or a task of its own.
        let answers = request.into_inner().map(|message| answer(message?));
        Ok(Response::new(Box::pin(answers)))
    }
}

fn answer(message: ProcessingRequest) -> Result<ProcessingResponse, Status> {
    let response = match message.request {
        Some(Phase::RequestHeaders(_)) => Answer::RequestHeaders(set_header("hello-to-asm")),
        Some(Phase::ResponseHeaders(_)) => Answer::ResponseHeaders(set_header("hello-from-asm")),
        Some(Phase::RequestBody(_)) => Answer::RequestBody(BodyResponse::default()),
        Some(Phase::ResponseBody(_)) => Answer::ResponseBody(BodyResponse::default()),
        Some(Phase::RequestTrailers(_)) => Answer::RequestTrailers(TrailersResponse::default()),
        Some(Phase::ResponseTrailers(_)) => Answer::ResponseTrailers(TrailersResponse::default()),
        None => return Err(Status::invalid_argument("a message with no phase set")),
    };
    Ok(ProcessingResponse {
        response: Some(response),
        ..Default::default()
    })
}

/// Sets `x-ext-proc-header` to `value`, carried in `raw_value`, which Envoy 1.40 requires of
/// header mutations.
fn set_header(value: &str) -> HeadersResponse {
    HeadersResponse {
        response: Some(CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: HEADER.into(),
                        raw_value: value.as_bytes().to_vec(),
                        ..Default::default()
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    eprintln!("native-extproc: serving ext_proc on {}", cli.listen);
    tonic::transport::Server::builder()
        .add_service(ExternalProcessorServer::new(AsmDemo))
        .serve(cli.listen)
        .await?;
    Ok(())
}
