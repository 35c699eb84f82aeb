//! What open streams cost the host in memory: its resident set with 1 to 10,000 ext_proc
//! streams open at once, each as Envoy leaves one while the upstream works on the request --
//! request headers answered (so the plugin's instance is live and holds the stream's state),
//! response headers not yet sent. A second series opens the streams without sending anything
//! (no instance yet: what a stream costs before its first message).
//!
//! Each count gets a fresh host (release build, bundled ASM plugin only) so the allocator's
//! caches from a larger count never flatter a smaller one. The host's RSS is read from
//! /proc/PID/status after the streams settle, and the per-stream figure is the growth over the
//! same host's RSS with no stream open, divided by the count.

use std::time::Duration;

use anyhow::bail;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use extproc_testkit::fixtures::ASM_DEMO;
use extproc_testkit::grpc::{self, ExtProcStream};
use serde::{Deserialize, Serialize};

use extproc_testkit::process::{HostProcess, Profile, rss_kib};

const HOST_PORT: u16 = 19602;
const ADMIN_PORT: u16 = 19603;
/// Streams per HTTP/2 connection, as Envoy multiplexes them.
const STREAMS_PER_CONNECTION: usize = 100;
/// Streams opened at once while building up a count.
const OPEN_CONCURRENCY: usize = 200;
/// Time for the host to finish what the last streams started before RSS is read.
const SETTLE: Duration = Duration::from_secs(2);

/// How far the streams got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamState {
    /// Opened, no message sent: no plugin instance yet.
    Opened,
    /// Request headers answered, response headers still to come: the plugin's instance is live.
    InFlight,
}

impl StreamState {
    pub fn label(self) -> &'static str {
        match self {
            StreamState::Opened => "opened, no message yet",
            StreamState::InFlight => "request headers answered, response pending",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub state: StreamState,
    pub streams: usize,
    /// The host's RSS with no stream open, then with `streams` open.
    pub idle_kib: u64,
    pub rss_kib: u64,
}

impl Point {
    pub fn per_stream_kib(&self) -> f64 {
        self.rss_kib.saturating_sub(self.idle_kib) as f64 / self.streams as f64
    }
}

pub fn run(counts: &[usize]) -> anyhow::Result<Vec<Point>> {
    let most = counts.iter().copied().max().unwrap_or(1);
    let runtime = tokio::runtime::Runtime::new()?;
    let mut points = Vec::new();
    for state in [StreamState::InFlight, StreamState::Opened] {
        for &streams in counts {
            let point = runtime.block_on(measure(most, state, streams))?;
            eprintln!(
                "rss: {streams:>6} streams {:<44} host RSS {:>7} KiB (idle {:>6} KiB): {:.1} KiB per stream",
                state.label(),
                point.rss_kib,
                point.idle_kib,
                point.per_stream_kib()
            );
            points.push(point);
        }
    }
    Ok(points)
}

async fn measure(most: usize, state: StreamState, streams: usize) -> anyhow::Result<Point> {
    // Room for every stream's instance; the default pool (1,000) would refuse the largest count.
    // Not much more: the pool reserves 8 GiB of address space per instance (two 4 GiB memory
    // slots, so bounds checks compile away), and 47 bits hold about 12,000 of them.
    let mut host = HostProcess::start(
        Profile::Dist,
        &[("10-asm-demo.wasm", &ASM_DEMO.path())],
        &format!("[runtime]\nmax_instances = {}\n", most + 200),
        Some((HOST_PORT, ADMIN_PORT)),
        "warn",
    )?;
    let (pid, address) = (host.pid(), host.address);

    // One whole exchange first, so the idle figure includes what the first stream initialises.
    let mut warm = ExtProcStream::connect(address).await;
    warm.exchange(grpc::request_headers(&[(":path", "/")], false))
        .await;
    warm.exchange(grpc::response_headers(&[(":status", "200")], false))
        .await;
    drop(warm.close());
    tokio::time::sleep(SETTLE).await;
    let idle_kib = rss_kib(pid)?;

    let mut clients = Vec::new();
    for _ in 0..streams.div_ceil(STREAMS_PER_CONNECTION) {
        clients.push(grpc::connect(address).await);
    }
    let mut open = Vec::with_capacity(streams);
    for batch in (0..streams).collect::<Vec<_>>().chunks(OPEN_CONCURRENCY) {
        let opening = batch.iter().map(|&i| {
            let mut client = clients[i / STREAMS_PER_CONNECTION].clone();
            async move {
                let mut stream = ExtProcStream::open(&mut client).await;
                if state == StreamState::InFlight {
                    let answer = stream
                        .exchange(grpc::request_headers(&[(":path", "/")], false))
                        .await;
                    // Anything but the plugin's answer (a full pool answers 500) would leave
                    // the stream without an instance, and the figure meaningless.
                    if !matches!(answer.response, Some(Response::RequestHeaders(_))) {
                        bail!("stream {i} got {answer:?} instead of the plugin's answer");
                    }
                }
                Ok(stream)
            }
        });
        for stream in futures::future::join_all(opening).await {
            open.push(stream?);
        }
    }
    tokio::time::sleep(SETTLE).await;
    let rss_kib = rss_kib(pid)?;
    if let Some(status) = host.process.0.try_wait()? {
        bail!("wasm-extproc exited with {status} while {streams} streams were open");
    }
    drop(open);
    Ok(Point {
        state,
        streams,
        idle_kib,
        rss_kib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_stream_is_growth_over_idle() {
        let point = Point {
            state: StreamState::InFlight,
            streams: 100,
            idle_kib: 20_000,
            rss_kib: 26_400,
        };
        assert_eq!(point.per_stream_kib(), 64.0);
    }
}
