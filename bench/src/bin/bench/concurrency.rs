//! Exchanges in flight: thousands of connections through Envoy to an upstream that takes
//! 2 s to answer, so that every connection's exchange holds its ext_proc stream (and the
//! host its plugin's instance) the whole time -- the host with its shipped settings, side by
//! side with the native server. Errors (anything but 200, and requests that got no answer),
//! latency, and the ext_proc server's peak RSS per level. The load (`hold-load`) opens its
//! connections over two seconds, as clients arrive, instead of all in one instant.
//!
//! `cargo xtask test` runs a reduced form (the host alone, 2,000 connections for 10 s) and
//! fails on any error.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::e2e::load::{load_generator, output_of};
use super::e2e::{Binaries, Load, Running, SETUPS, Setup, Variation};

/// Connections through Envoy at once, each with an exchange in flight.
pub const LEVELS: [usize; 4] = [1_000, 2_000, 5_000, 10_000];
/// How long the upstream takes: every connection's exchange is in flight nearly all the time,
/// and 10,000 connections ask for no more than the 5,000 requests a second one core serves
/// through Envoy here (what is measured is how many exchanges the servers hold, not how fast
/// they go).
const UPSTREAM_DELAY: Duration = Duration::from_secs(2);
/// What the test command runs.
pub const CHECK_CONNECTIONS: usize = 2_000;
pub const CHECK_DURATION: Duration = Duration::from_secs(10);

/// One server at one level.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Level {
    /// `wasm` or `native`.
    pub key: String,
    pub connections: usize,
    pub load: Load,
    /// Answers by status.
    #[serde(default)]
    pub statuses: BTreeMap<u16, u64>,
    /// The ext_proc server's peak resident set over the run.
    pub peak_rss_kib: u64,
}

/// What `hold-load` prints.
#[derive(Debug, Deserialize)]
struct HoldReport {
    requests: u64,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `connections` connections through `listener`, opened over 2 s, for `duration`.
pub(super) fn hold(
    binaries: &Binaries,
    listener: std::net::SocketAddr,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<(Load, BTreeMap<u16, u64>)> {
    let program = binaries.hold_load.to_string_lossy().into_owned();
    let output = output_of(load_generator(&program).args([
        "--target".to_string(),
        listener.to_string(),
        "--connections".to_string(),
        connections.to_string(),
        "--duration".to_string(),
        duration.as_secs().to_string(),
    ]))?;
    let report: HoldReport = serde_json::from_str(output.trim())
        .with_context(|| format!("cannot read hold-load's report: {output}"))?;
    Ok((
        Load {
            requests: report.requests,
            errors: report.errors,
            rps: report.rps,
            p50_ms: report.p50_ms,
            p99_ms: report.p99_ms,
        },
        report.statuses,
    ))
}

fn setup(key: &str) -> &'static Setup {
    SETUPS
        .iter()
        .find(|s| s.key == key)
        .expect("the setup exists")
}

/// One server, one level.
fn measure(
    key: &str,
    connections: usize,
    duration: Duration,
    binaries: &Binaries,
) -> anyhow::Result<Level> {
    measure_running(key, connections, duration, binaries).map(|(level, _)| level)
}

/// [`measure`], with the servers still running, for their logs.
fn measure_running(
    key: &str,
    connections: usize,
    duration: Duration,
    binaries: &Binaries,
) -> anyhow::Result<(Level, Running)> {
    let running = Running::start_with(
        setup(key),
        binaries,
        Variation {
            upstream_delay: UPSTREAM_DELAY,
            many_in_flight: true,
            ..Variation::default()
        },
    )?;
    let (load, statuses) = hold(binaries, running.listener, connections, duration)?;
    let peak_rss_kib = running.peak_rss_kib("ext_proc")?;
    let level = Level {
        key: key.into(),
        connections,
        load,
        statuses,
        peak_rss_kib,
    };
    eprintln!(
        "bench: {key:<6} {connections:>6} connections: {:.0} req/s, p50 {:.1} ms, p99 {:.1} ms, \
         {} requests, {} errors (answers by status: {:?}); ext_proc peak RSS {} MiB",
        level.load.rps,
        level.load.p50_ms,
        level.load.p99_ms,
        level.load.requests,
        level.load.errors,
        level.statuses,
        peak_rss_kib / 1024
    );
    Ok((level, running))
}

/// Every level, the host and the native server in turn.
pub fn run(duration: Duration) -> anyhow::Result<Vec<Level>> {
    let binaries = Binaries::find(super::e2e::MEASURED_PROFILE)?;
    let mut levels = Vec::new();
    for connections in LEVELS {
        for key in ["wasm", "native"] {
            levels.push(measure(key, connections, duration, &binaries)?);
        }
    }
    Ok(levels)
}

/// The reduced form: the host with its shipped settings holds `CHECK_CONNECTIONS` exchanges
/// in flight through Envoy with no error.
pub fn check() -> anyhow::Result<()> {
    // The release build the tests share (the benchmark measures the image's LTO build).
    let binaries = Binaries::find("release")?;
    let (level, running) = measure_running("wasm", CHECK_CONNECTIONS, CHECK_DURATION, &binaries)
        .context("the concurrency check")?;
    if level.load.errors > 0 || level.load.requests == 0 {
        bail!(
            "{} connections through Envoy for {:?}: {} errors in {} requests; the servers' \
             logs:\n{}",
            CHECK_CONNECTIONS,
            CHECK_DURATION,
            level.load.errors,
            level.load.requests,
            running.logs()
        );
    }
    Ok(())
}
