//! Overload: more clients than this machine can serve, the host and the native server side by
//! side. Envoy with a worker per core, the upstream and the ext_proc server share every core
//! (nothing pinned), with the concurrency runs' raised circuit breakers, and the host with its
//! shipped settings. Two loads from `hold-load`:
//!
//! - `slow-upstream`: 3,000 connections to an upstream that answers after 1 s, for 8 s: a burst
//!   of new streams while thousands are in flight;
//! - `closed-loop`: 2,000 connections to an upstream that answers at once, for 10 s: every
//!   core busy, each connection's next request the moment the last is answered;
//! - `heavy-plugin`: the closed loop with 1,000 connections, the host's chain ending in a plugin
//!   that computes about a millisecond per request: far more work than the cores do, the host
//!   with its overload policy against the same host never shedding (no native server: it has
//!   no such plugin).
//!
//! What counts is what fails: answers other than 2xx (every one of them, at this load, Envoy's
//! `message_timeout` expiring on an ext_proc message), and how long Envoy waited for each
//! headers message's answer, from Envoy's own access log (`ExtProcLoggingInfo`): the time a
//! message spends queued in the server is in it, as Envoy's timeout sees it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::concurrency::hold;
use super::e2e::{Binaries, MEASURED_PROFILE, Running, SETUPS, Variation, clock_ticks_per_second};

/// One load past what the machine serves.
#[derive(Debug, Clone, Copy)]
pub struct Saturation {
    pub key: &'static str,
    pub connections: usize,
    pub upstream_delay: Duration,
    pub duration: Duration,
    /// The host's chain ends in a plugin computing this many million iterations per request.
    pub heavy_plugin: Option<u32>,
    /// The servers compared: `wasm`, `native`, or the host with another overload threshold
    /// ([`shed_after_ms`]).
    pub servers: &'static [&'static str],
}

pub const LOADS: [Saturation; 3] = [
    Saturation {
        key: "slow-upstream",
        connections: 3_000,
        upstream_delay: Duration::from_secs(1),
        duration: Duration::from_secs(8),
        heavy_plugin: None,
        servers: &["wasm", "native"],
    },
    Saturation {
        key: "closed-loop",
        connections: 2_000,
        upstream_delay: Duration::ZERO,
        duration: Duration::from_secs(10),
        heavy_plugin: None,
        servers: &["wasm", "native"],
    },
    Saturation {
        key: "heavy-plugin",
        connections: 1_000,
        upstream_delay: Duration::ZERO,
        duration: Duration::from_secs(10),
        heavy_plugin: Some(1),
        servers: &["wasm", "wasm-shed-at-50", "wasm-never-shed"],
    },
];

/// The host's count of streams it shed.
const SHED_SERIES: &str = "wasm_extproc_refused_total{listener=\"ext_proc\",reason=\"overload\"}";

/// Longer than Envoy takes to write out its access log.
const ACCESS_LOG_FLUSH: Duration = Duration::from_millis(2_500);

/// Each server key: the setup it runs, how the report names it, and the host's `[overload]
/// shed_after_ms` where it is not the default.
const SERVER_KEYS: [(&str, &str, &str, Option<u64>); 4] = [
    ("wasm", "wasm", "host", None),
    (
        "wasm-shed-at-50",
        "wasm",
        "host, shedding at 50 ms",
        Some(50),
    ),
    ("wasm-never-shed", "wasm", "host, never shedding", Some(0)),
    ("native", "native", "native", None),
];

fn server(key: &str) -> (&'static str, &'static str, Option<u64>) {
    SERVER_KEYS
        .iter()
        .find(|(k, ..)| *k == key)
        .map(|&(_, setup, label, shed)| (setup, label, shed))
        .expect("a known server key")
}

/// How the report names a server.
pub fn server_label(key: &str) -> &'static str {
    server(key).1
}

/// One server under one load, one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overloaded {
    /// `wasm`, `wasm-never-shed` or `native`.
    pub server: String,
    /// [`Saturation::key`].
    pub load: String,
    pub round: usize,
    /// Requests answered or failed.
    pub requests: u64,
    /// Answers other than 2xx, and requests that got none.
    pub failed: u64,
    /// Answers by status.
    pub statuses: BTreeMap<u16, u64>,
    pub messages: Messages,
    /// New streams the host refused for its lag (`refused_total{reason="overload"}`); `None`
    /// for the native server.
    #[serde(default)]
    pub shed: Option<u64>,
    /// Per server process (`envoy`, `upstream`, `ext_proc`): CPU time in µs per request
    /// completed, over the run.
    #[serde(default)]
    pub cpu_us_per_request: Vec<(String, f64)>,
}

/// The headers messages of one run, as Envoy saw them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Messages {
    /// Answered with gRPC OK.
    pub answered: u64,
    /// Ended otherwise: Envoy's `message_timeout` (DEADLINE_EXCEEDED) or the server's error.
    pub failed: u64,
    /// Over every message, a failed one counted as slower than any answer: a percentile that
    /// falls on a failed message is `None`.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
    /// The slowest answer.
    pub max_us: u64,
    /// The failed messages by gRPC status: 4 (DEADLINE_EXCEEDED) is Envoy's `message_timeout`;
    /// 14 (UNAVAILABLE) the host shedding a new stream, or Envoy failing to open or keep one.
    #[serde(default)]
    pub failed_by_status: BTreeMap<u32, u64>,
    /// How long Envoy had waited when a message failed, median, where it says.
    #[serde(default)]
    pub failed_p50_us: Option<u64>,
}

/// Every load, each server in turn, `rounds` times.
pub fn run(rounds: usize) -> anyhow::Result<Vec<Overloaded>> {
    let binaries = Binaries::find(MEASURED_PROFILE)?;
    let mut runs = Vec::new();
    for round in 0..rounds {
        for load in LOADS {
            for &server in load.servers {
                runs.push(measure(server, load, round, &binaries)?);
            }
        }
    }
    Ok(runs)
}

fn measure(
    server: &str,
    load: Saturation,
    round: usize,
    binaries: &Binaries,
) -> anyhow::Result<Overloaded> {
    let (key, _, shed_after_ms) = self::server(server);
    let setup = SETUPS
        .iter()
        .find(|s| s.key == key)
        .expect("the setup exists");
    let running = Running::start_with(
        setup,
        binaries,
        Variation {
            upstream_delay: load.upstream_delay,
            many_in_flight: true,
            all_cores: true,
            message_log: true,
            heavy_plugin: load.heavy_plugin,
            shed_after_ms,
            ..Variation::default()
        },
    )?;
    let tick_us = 1e6 / clock_ticks_per_second()?;
    let ((measured, statuses), cpu) = running.cpu_over(tick_us, || {
        hold(binaries, running.listener, load.connections, load.duration)
    })?;
    // Envoy flushes its access log's buffer every second (`file_flush_interval_msec`).
    std::thread::sleep(ACCESS_LOG_FLUSH);
    let messages = read_messages(&running.message_log())?;
    let shed = running.host_counter(SHED_SERIES)?;
    drop(running);
    let run = Overloaded {
        server: server.into(),
        load: load.key.into(),
        round,
        requests: measured.requests,
        failed: measured.errors,
        statuses,
        messages,
        shed,
        cpu_us_per_request: cpu
            .into_iter()
            .map(|(name, us)| (name, us / measured.requests.max(1) as f64))
            .collect(),
    };
    eprintln!(
        "bench: overload {:<13} {server:<15} round {round}: {} of {} requests failed; messages: \
         {} answered, {} failed {:?} after {}, p50 {} p99 {} p99.9 {} max {:.1} ms; streams \
         shed by the host {:?}; CPU µs per request {:?}",
        load.key,
        run.failed,
        run.requests,
        run.messages.answered,
        run.messages.failed,
        run.messages.failed_by_status,
        millis(run.messages.failed_p50_us),
        millis(run.messages.p50_us),
        millis(run.messages.p99_us),
        millis(run.messages.p999_us),
        run.messages.max_us as f64 / 1000.0,
        run.shed,
        run.cpu_us_per_request,
    );
    Ok(run)
}

/// A latency for the report: ms, or that it failed.
pub fn millis(us: Option<u64>) -> String {
    match us {
        Some(us) => format!("{:.1} ms", us as f64 / 1000.0),
        None => "failed".into(),
    }
}

fn read_messages(log: &Path) -> anyhow::Result<Messages> {
    let text = std::fs::read_to_string(log)
        .with_context(|| format!("Envoy's message log {}", log.display()))?;
    Ok(messages(&text))
}

/// The headers messages in the access log's lines ([`super::e2e::MESSAGE_LOG_FORMAT`]): the
/// request's and the response's, each a latency and a gRPC status; `-` where the message was
/// never sent.
fn messages(log: &str) -> Messages {
    // An answer's latency; a failed message as u64::MAX, slower than any answer.
    let mut latencies = Vec::new();
    let mut failed_by_status = BTreeMap::new();
    let mut failed_latencies = Vec::new();
    for line in log.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        for pair in fields.get(1..).unwrap_or_default().chunks(2) {
            let [latency, status] = pair else { continue };
            match (latency.parse::<u64>(), status.parse::<u32>()) {
                (Ok(us), Ok(0)) => latencies.push(us),
                (latency, Ok(status)) => {
                    latencies.push(u64::MAX);
                    *failed_by_status.entry(status).or_insert(0) += 1;
                    failed_latencies.extend(latency.ok());
                }
                _ => {}
            }
        }
    }
    failed_latencies.sort_unstable();
    latencies.sort_unstable();
    let at = |q: f64| -> Option<u64> {
        let last = latencies.len().checked_sub(1)?;
        let value = latencies[((last as f64) * q).round() as usize];
        (value != u64::MAX).then_some(value)
    };
    let failed = latencies.iter().filter(|&&l| l == u64::MAX).count() as u64;
    Messages {
        answered: latencies.len() as u64 - failed,
        failed,
        p50_us: at(0.5),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: latencies
            .iter()
            .copied()
            .filter(|&l| l != u64::MAX)
            .max()
            .unwrap_or(0),
        failed_by_status,
        failed_p50_us: failed_latencies.get(failed_latencies.len() / 2).copied(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_messages_count_as_slower_than_every_answer() {
        let mut log = String::new();
        for us in 1..=98 {
            log.push_str(&format!("200 {us} 0 {} 0\n", us + 1000));
        }
        // A request whose headers message timed out (DEADLINE_EXCEEDED), so no response
        // message; one whose response message did.
        log.push_str("500 200000 4 - -\n");
        log.push_str("504 50 0 - 4\n");
        let m = messages(&log);
        assert_eq!(m.answered, 98 * 2 + 1);
        assert_eq!(m.failed, 2);
        assert_eq!(m.failed_by_status, BTreeMap::from([(4, 2)]));
        assert_eq!(m.failed_p50_us, Some(200_000));
        assert_eq!(m.max_us, 1098);
        // 199 messages, 99 of them under 100 µs: the median is the fastest response message.
        assert_eq!(m.p50_us, Some(1001));
        assert_eq!(m.p99_us, Some(1098));
        // The slowest two in a thousand fall on the failed.
        assert_eq!(m.p999_us, None);
    }

    #[test]
    fn an_empty_log_has_no_percentiles() {
        let m = messages("");
        assert_eq!(m, Messages::default());
    }
}
