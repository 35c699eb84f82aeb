//! An httpbin-like upstream: `GET /headers` answers `{"headers": {...}}` with the request's
//! headers in httpbin's Title-Case; any other path echoes the request body back. It also
//! records every request it saw, so tests can check what reached the upstream.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// A running echo server. Stops when dropped.
#[derive(Debug)]
pub struct EchoServer {
    pub address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
}

impl EchoServer {
    pub async fn start() -> std::io::Result<EchoServer> {
        Self::bind("127.0.0.1:0".parse().expect("address")).await
    }

    pub async fn bind(address: SocketAddr) -> std::io::Result<EchoServer> {
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (recorder, stopping) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    () = stopping.cancelled() => return,
                };
                let recorder = recorder.clone();
                let service = service_fn(move |request| handle(request, recorder.clone()));
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(EchoServer {
            address,
            seen,
            stop,
        })
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn handle(
    request: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    seen.lock().expect("not poisoned").push(Seen {
        path: parts.uri.path().to_string(),
        headers: headers.clone(),
        body: body.to_vec(),
    });
    let response = if parts.uri.path() == "/headers" {
        let mut echoed = BTreeMap::new();
        for (name, value) in &headers {
            echoed.insert(
                title_case(name),
                String::from_utf8_lossy(value).into_owned(),
            );
        }
        let json = serde_json::json!({ "headers": echoed });
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!("{json:#}\n"))))
    } else {
        Response::builder()
            .header("content-type", "application/octet-stream")
            .body(Full::new(body))
    };
    Ok(response.expect("valid response"))
}

/// `x-ext-proc-header` -> `X-Ext-Proc-Header`, as httpbin shows names.
pub fn title_case(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}
