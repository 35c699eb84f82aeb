//! The benchmark's upstream: the least an HTTP/1.1 server can do, so what is measured is the
//! proxy in front of it.
//!
//! Every request gets 200 and a small fixed JSON body. The request's `x-ext-proc-header`, if
//! any, comes back as `x-upstream-saw`, so the harness can check that a setup tagged the
//! request on its way in without the upstream recording anything.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] = br#"{"ok":true}"#;
const TAGGED: &str = "x-ext-proc-header";
const SAW: &str = "x-upstream-saw";

#[derive(Debug, Parser)]
#[command(name = "bench-upstream")]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
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
    let listener = TcpListener::bind(cli.listen).await?;
    eprintln!("bench-upstream: listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        // Envoy keeps its upstream connections open; small answers must not wait on Nagle.
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
