//! A closed-loop load that holds many exchanges in flight: `--connections` HTTP/1.1
//! connections, opened evenly over `--ramp` (thousands of clients do not all arrive in the same
//! millisecond), each sending its next request as soon as the last is answered, until
//! `--duration` is over. Prints one JSON object: requests answered, errors (by status, and
//! requests that got no answer), and latency percentiles.
//!
//! wrk opens every connection at once, which on a two-core machine measures the first burst's
//! queue rather than how many exchanges the servers hold.

#![expect(clippy::print_stdout, reason = "the report is the program's output")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
#[command(name = "hold-load")]
struct Cli {
    /// The server to load.
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    connections: usize,
    /// How long to keep sending, in seconds (from the first connection).
    #[arg(long)]
    duration: u64,
    /// Over how many seconds the connections open.
    #[arg(long, default_value_t = 2)]
    ramp: u64,
}

/// What one connection saw.
#[derive(Debug, Default)]
struct Tally {
    latencies_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    unanswered: u64,
}

async fn connection(target: SocketAddr, start: Instant, until: Instant) -> Tally {
    let mut tally = Tally::default();
    tokio::time::sleep_until(start.into()).await;
    let Ok(stream) = TcpStream::connect(target).await else {
        tally.unanswered += 1;
        return tally;
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        tally.unanswered += 1;
        return tally;
    };
    tokio::spawn(connection);
    while Instant::now() < until {
        let request = Request::get("/")
            .header("host", target.to_string())
            .body(Empty::<Bytes>::new())
            .expect("valid request");
        let sent = Instant::now();
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                if response.into_body().collect().await.is_err() {
                    tally.unanswered += 1;
                    break;
                }
                *tally.statuses.entry(status).or_default() += 1;
                tally.latencies_us.push(sent.elapsed().as_micros() as u64);
            }
            Err(_) => {
                tally.unanswered += 1;
                break;
            }
        }
    }
    tally
}

fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index] as f64 / 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let began = Instant::now();
    let until = began + Duration::from_secs(cli.duration);
    let ramp = Duration::from_secs(cli.ramp);
    let tasks: Vec<_> = (0..cli.connections)
        .map(|i| {
            let start = began + ramp.mul_f64(i as f64 / cli.connections as f64);
            tokio::spawn(connection(cli.target, start, until))
        })
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await?;
        all.latencies_us.extend(tally.latencies_us);
        all.unanswered += tally.unanswered;
        for (status, count) in tally.statuses {
            *all.statuses.entry(status).or_default() += count;
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let answered: u64 = all.statuses.values().sum();
    let not_ok: u64 = all
        .statuses
        .iter()
        .filter(|(status, _)| !(200..300).contains(*status))
        .map(|(_, count)| count)
        .sum();
    let report = serde_json::json!({
        "requests": answered,
        "errors": not_ok + all.unanswered,
        "unanswered": all.unanswered,
        "statuses": all.statuses,
        "rps": answered as f64 / elapsed,
        "p50_ms": percentile_ms(&all.latencies_us, 0.50),
        "p99_ms": percentile_ms(&all.latencies_us, 0.99),
    });
    println!("{report}");
    Ok(())
}
