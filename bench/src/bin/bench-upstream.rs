//! The benchmark's upstream: the least an HTTP server can do, so what is measured is the proxy
//! in front of it.
//!
//! Every request gets 200 and a small fixed JSON body, after `--delay-ms` if set (an upstream
//! that takes its time keeps exchanges in flight, as the concurrency benchmark needs). The
//! request's `x-ext-proc-header`, if any, comes back as `x-upstream-saw`, so the harness can
//! check that a setup tagged the request on its way in without the upstream recording
//! anything. It speaks HTTP/1.1 and, with prior knowledge, HTTP/2: Envoy then needs one
//! connection for many requests in flight.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const BODY: &[u8] = br#"{"ok":true}"#;
const TAGGED: &str = "x-ext-proc-header";
const SAW: &str = "x-upstream-saw";
/// Requests in flight on one HTTP/2 connection: more than the benchmark ever holds.
const MAX_STREAMS: u32 = 100_000;

#[derive(Debug, Parser)]
#[command(name = "bench-upstream")]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How long each answer takes.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

async fn answer(
    request: Request<Incoming>,
    delay: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(tag) = request.headers().get(TAGGED) {
        headers.insert(SAW, tag.clone());
    }
    Ok(response)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let delay = Duration::from_millis(cli.delay_ms);
    let listener = TcpListener::bind(cli.listen).await?;
    eprintln!("bench-upstream: listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        // Envoy keeps its upstream connections open; small answers must not wait on Nagle.
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, delay));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // hyper refuses streams past 200 at once on a connection by default, which Envoy
            // reports as 503s: a slow upstream holds far more.
            builder.http2().max_concurrent_streams(MAX_STREAMS);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
