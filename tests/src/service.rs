//! A service plugins call out to (an OAuth introspection endpoint, a policy service): answers
//! each request with what a function of its body says, after an optional delay, and counts the
//! requests it received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the service answers a request body with: a status and a JSON body.
pub type Answer = Arc<dyn Fn(&[u8]) -> (u16, String) + Send + Sync>;

/// A running service. Stops when dropped.
pub struct Service {
    pub address: SocketAddr,
    received: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Serves on a loopback port, answering after `delay`.
    pub async fn start(delay: Duration, answer: Answer) -> std::io::Result<Service> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let received = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let counter = received.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let (counter, answer) = (counter.clone(), answer.clone());
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let body = request.into_body().collect().await.ok();
                let body = body.map(|b| b.to_bytes()).unwrap_or_default();
                // Tokio's timer has a millisecond's grain: no timer at all for no delay.
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let (status, json) = answer(&body);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(json)))
                        .expect("valid response"),
                )
            }
        });
        crate::echo::serve(listener, stop.clone(), service);
        Ok(Service {
            address,
            received,
            stop,
        })
    }

    /// The origin plugins are allowed to call: `http://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.address)
    }

    /// How many requests it has received.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
