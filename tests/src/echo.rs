//! An httpbin-like upstream, recording every request it saw so tests can check what reached it:
//!
//! - `GET /headers` answers `{"headers": {...}}` with the request's headers in httpbin's
//!   Title-Case;
//! - `GET /generate?bytes=N` answers N bytes of lower-case text, and with `&json` a JSON object
//!   of about N bytes with a `password` field (see [`generated`]); gzip-encoded when the
//!   request accepts gzip, as real servers do, or always with `&encoding=gzip`; with
//!   `&encoding=br` it claims brotli (for a reader that must refuse what it cannot read);
//! - any other path echoes the request body back; with `?chunked` in pieces, without a
//!   `content-length` (chunked transfer over HTTP/1.1).
//!
//! Over HTTP/2, a request that ends with trailers gets `x-upstream-trailer: seen` trailers back.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The path, with the query if there was one.
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl Seen {
    /// The first value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// What `GET /generate?bytes=N` answers: lower-case letters, or with `json` an object
/// `{"pad":"aaa...","password":"hunter2"}` padded to about N bytes.
pub fn generated(bytes: usize, json: bool) -> Vec<u8> {
    if json {
        let overhead = r#"{"pad":"","password":"hunter2"}"#.len();
        let pad = "a".repeat(bytes.saturating_sub(overhead));
        format!(r#"{{"pad":"{pad}","password":"hunter2"}}"#).into_bytes()
    } else {
        (0..bytes).map(|i| b'a' + (i % 26) as u8).collect()
    }
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
        let recorder = seen.clone();
        serve(
            listener,
            stop.clone(),
            service_fn(move |request| handle(request, recorder.clone())),
        );
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

    /// Removes and returns the request received for `path` (query included), if one was: for
    /// tests that send many requests concurrently and must not keep every body.
    pub fn take(&self, path_and_query: &str) -> Option<Seen> {
        let mut seen = self.seen.lock().expect("not poisoned");
        let index = seen.iter().position(|s| s.path == path_and_query)?;
        Some(seen.swap_remove(index))
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// Accepts connections on `listener` until `stop` is cancelled, serving each (HTTP/1.1 or
/// HTTP/2) with `service`.
pub(crate) fn serve<S, B>(listener: TcpListener, stop: CancellationToken, service: S)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                () = stop.cancelled() => return,
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// How many pieces a `?chunked` echo is sent in.
const ECHO_PIECES: usize = 5;

async fn handle(
    request: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let collected = body.collect().await.ok();
    let trailers: Vec<(String, Vec<u8>)> = collected
        .as_ref()
        .and_then(|c| c.trailers())
        .map(|t| {
            t.iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
    let headers: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    seen.lock().expect("not poisoned").push(Seen {
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        headers: headers.clone(),
        body: body.to_vec(),
        trailers: trailers.clone(),
    });
    let full = |bytes: Bytes| Full::new(bytes).boxed();
    let response = match parts.uri.path() {
        "/headers" => {
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
                .body(full(Bytes::from(format!("{json:#}\n"))))
        }
        "/generate" => {
            let query = parts.uri.query().unwrap_or_default();
            let bytes = query
                .split('&')
                .find_map(|p| p.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let json = query.split('&').any(|p| p == "json");
            let accepts_gzip = headers.iter().any(|(n, v)| {
                n == "accept-encoding" && String::from_utf8_lossy(v).contains("gzip")
            });
            let encoding = query
                .split('&')
                .find_map(|p| p.strip_prefix("encoding="))
                .or(accepts_gzip.then_some("gzip"));
            let body = generated(bytes, json);
            let builder = Response::builder().header(
                "content-type",
                if json {
                    "application/json"
                } else {
                    "text/plain"
                },
            );
            match encoding {
                Some("gzip") => builder
                    .header("content-encoding", "gzip")
                    .body(full(Bytes::from(gzip(&body)))),
                Some(other) => builder
                    .header("content-encoding", other)
                    .body(full(Bytes::from(body))),
                None => builder.body(full(Bytes::from(body))),
            }
        }
        _ if !trailers.is_empty() => {
            let mut response_trailers = hyper::HeaderMap::new();
            response_trailers.insert(
                "x-upstream-trailer",
                hyper::header::HeaderValue::from_static("seen"),
            );
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(body)),
                Ok(Frame::trailers(response_trailers)),
            ];
            Response::builder()
                .header("content-type", "application/octet-stream")
                .body(StreamBody::new(futures::stream::iter(frames)).boxed())
        }
        _ if parts
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "chunked")) =>
        {
            let pieces = body.len().div_ceil(ECHO_PIECES).max(1);
            let frames: Vec<_> = body
                .chunks(pieces)
                .map(|piece| Ok::<_, Infallible>(Frame::data(body.slice_ref(piece))))
                .collect();
            Response::builder()
                .header("content-type", "application/octet-stream")
                .body(StreamBody::new(futures::stream::iter(frames)).boxed())
        }
        _ => Response::builder()
            .header("content-type", "application/octet-stream")
            .body(full(body)),
    };
    Ok(response.expect("valid response"))
}

/// `bytes`, gzip-encoded.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

/// `bytes`, gzip-decoded.
pub fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut decoded = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut decoded)?;
    Ok(decoded)
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
