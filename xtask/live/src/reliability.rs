//! `cargo xtask reliability`: the measured proof that a failing plugin costs exactly what its
//! policy says and nothing else.
//!
//! Real Envoy, the release host binary, the echo upstream. The chain is `10-flaky` (traps on
//! every request whose `x-request-id` is divisible by 100: 1%) and `20-asm`. Each request
//! carries its number as `x-request-id`, so which requests fail is known in advance. Run once
//! with the flaky plugin fail-open and once fail-closed, and report responses by status, ASM
//! tags seen at the client and at the upstream, lost and duplicated requests, the host's RSS and
//! open file descriptors over the run, and Envoy's ext_proc counters. Any figure off what it
//! must be fails the command, after the report is written: `cargo xtask test` runs it small.
//! `--soak SECONDS` keeps the load on for that long instead, sampling memory and descriptors.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{self, Envoy};
use extproc_testkit::fixtures::{ASM_DEMO, FLAKY};
use extproc_testkit::process::{self, HostProcess, Profile};
use xtask::{cargo, run as run_command, target_dir};

const FAIL_EVERY: u64 = 100;
const HOST_PORT: u16 = 19002;
const ADMIN_PORT: u16 = 19003;

/// How much growth still counts as flat, from the start of the measured run to its end (the
/// pool's first instances, allocator caches): a leak of a few hundred bytes per request
/// passes it only on short runs, which is what the soak is for.
const FLAT_RSS_KIB: u64 = 16 * 1024;
const FLAT_FDS: u64 = 16;

/// Envoy's ext_proc counters a healthy run may move; any other one (`streams_failed`,
/// `message_timeouts`, `rejected_header_mutations`, ...) is an error.
const EXPECTED_COUNTERS: [&str; 5] = [
    "immediate_responses_sent",
    "stream_msgs_received",
    "stream_msgs_sent",
    "streams_closed",
    "streams_started",
];

/// How long the load lasts.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// This many requests, as fast as the concurrency allows.
    Requests(u64),
    /// As many requests as fit in this long (the soak).
    For(Duration),
}

/// The host's memory and descriptors at one moment of the run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    requests: u64,
    rss_kib: u64,
    fds: u64,
}

/// What one run saw.
#[derive(Debug, Default)]
struct Outcome {
    requests: u64,
    statuses: BTreeMap<u16, u64>,
    tagged_responses: u64,
    upstream_requests: u64,
    upstream_tagged: u64,
    duplicated: u64,
    lost: u64,
    wrong_status: u64,
    rss_peak_kib: u64,
    /// From the start of the measured run to a second after its end.
    series: Vec<Sample>,
    envoy_counters: BTreeMap<String, u64>,
    seconds: f64,
}

impl Outcome {
    fn first(&self) -> Sample {
        self.series[0]
    }
    fn last(&self) -> Sample {
        self.series[self.series.len() - 1]
    }

    /// Requests that must fail (their ids divisible by 100), and those due a 200.
    fn expected(&self, policy: &str) -> (u64, u64) {
        let failures = self.requests / FAIL_EVERY;
        match policy {
            "fail-open" => (0, self.requests),
            _ => (failures, self.requests - failures),
        }
    }

    /// Every figure that is off what it must be.
    fn violations(&self, policy: &str) -> Vec<String> {
        let (failures, ok) = self.expected(policy);
        let mut off = Vec::new();
        let mut expect = |what: &str, got: u64, want: u64| {
            if got != want {
                off.push(format!("{policy}: {what}: {got}, expected {want}"));
            }
        };
        expect(
            "responses 200",
            self.statuses.get(&200).copied().unwrap_or(0),
            ok,
        );
        expect(
            "responses 500",
            self.statuses.get(&500).copied().unwrap_or(0),
            failures,
        );
        expect(
            "responses of any other status",
            self.statuses
                .iter()
                .filter(|(status, _)| ![200, 500].contains(*status))
                .map(|(_, n)| n)
                .sum(),
            0,
        );
        expect(
            "a 500 where 200 was due, or the reverse",
            self.wrong_status,
            0,
        );
        expect(
            "responses tagged by the ASM plugin",
            self.tagged_responses,
            ok,
        );
        expect("requests at the upstream", self.upstream_requests, ok);
        expect("... tagged", self.upstream_tagged, ok);
        expect("lost", self.lost, 0);
        expect("duplicated", self.duplicated, 0);
        for (name, value) in &self.envoy_counters {
            if !EXPECTED_COUNTERS.contains(&name.as_str()) {
                off.push(format!("{policy}: Envoy counted {name} {value}"));
            }
        }
        let (first, last) = (self.first(), self.last());
        if last.rss_kib > first.rss_kib + FLAT_RSS_KIB {
            off.push(format!(
                "{policy}: host RSS grew from {} to {} MiB",
                first.rss_kib / 1024,
                last.rss_kib / 1024
            ));
        }
        if last.fds > first.fds + FLAT_FDS {
            off.push(format!(
                "{policy}: host file descriptors grew from {} to {}",
                first.fds, last.fds
            ));
        }
        off
    }
}

pub fn run(load: Load, concurrency: usize) -> anyhow::Result<()> {
    run_command(cargo().args(["build", "--release", "--package", "wasm-extproc"]))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut report = String::new();
    let amount = match load {
        Load::Requests(n) => format!("{n} requests"),
        Load::For(time) => format!("{} s of requests", time.as_secs()),
    };
    writeln!(
        report,
        "{amount} at concurrency {concurrency} through Envoy 1.40.0 -> wasm-extproc \
         (release) [10-flaky: traps when x-request-id % {FAIL_EVERY} == 0, 20-asm] -> echo upstream.\n"
    )?;
    let mut violations = Vec::new();
    for policy in ["fail-open", "fail-closed"] {
        let outcome = runtime.block_on(one_run(policy, load, concurrency))?;
        write_outcome(&mut report, policy, &outcome)?;
        violations.extend(outcome.violations(policy));
    }
    let path = target_dir().join("reliability.md");
    std::fs::write(&path, &report)?;
    println!("{report}");
    eprintln!("written to {}", path.display());
    if !violations.is_empty() {
        bail!("reliability: {}", violations.join("; "));
    }
    Ok(())
}

fn write_outcome(report: &mut String, policy: &str, outcome: &Outcome) -> anyhow::Result<()> {
    let (failures, ok) = outcome.expected(policy);
    writeln!(report, "**{policy}**\n")?;
    writeln!(report, "| measure | value | expected |")?;
    writeln!(report, "|---|---|---|")?;
    writeln!(report, "| requests sent | {} | |", outcome.requests)?;
    for (status, count) in &outcome.statuses {
        let expected = match status {
            200 => ok,
            500 => failures,
            _ => 0,
        };
        writeln!(report, "| responses {status} | {count} | {expected} |")?;
    }
    let rows = [
        (
            "a 500 where 200 was due, or the reverse",
            outcome.wrong_status,
            "0".to_string(),
        ),
        (
            "responses with `x-ext-proc-header: hello-from-asm`",
            outcome.tagged_responses,
            ok.to_string(),
        ),
        (
            "requests at the upstream",
            outcome.upstream_requests,
            ok.to_string(),
        ),
        (
            "... with `x-ext-proc-header: hello-to-asm`",
            outcome.upstream_tagged,
            "all".to_string(),
        ),
        (
            "lost (200 at the client, never at the upstream)",
            outcome.lost,
            "0".to_string(),
        ),
        (
            "duplicated at the upstream",
            outcome.duplicated,
            "0".to_string(),
        ),
    ];
    for (what, value, expected) in rows {
        writeln!(report, "| {what} | {value} | {expected} |")?;
    }
    let (first, last) = (outcome.first(), outcome.last());
    writeln!(
        report,
        "| host RSS start / peak / end | {} / {} / {} MiB | end within {} MiB of start |",
        first.rss_kib / 1024,
        outcome.rss_peak_kib / 1024,
        last.rss_kib / 1024,
        FLAT_RSS_KIB / 1024
    )?;
    writeln!(
        report,
        "| host open file descriptors start / end | {} / {} | end within {FLAT_FDS} of start |",
        first.fds, last.fds
    )?;
    let counters: Vec<String> = outcome
        .envoy_counters
        .iter()
        .map(|(name, value)| format!("`{name}` {value}"))
        .collect();
    writeln!(
        report,
        "| Envoy ext_proc counters | {} | no errors |",
        counters.join(", ")
    )?;
    writeln!(
        report,
        "| wall time | {:.1} s ({:.0} req/s) | |\n",
        outcome.seconds,
        outcome.requests as f64 / outcome.seconds
    )?;
    if outcome.series.len() > 3 {
        writeln!(report, "| time | requests so far | host RSS | open fds |")?;
        writeln!(report, "|---|---|---|---|")?;
        for sample in &outcome.series {
            writeln!(
                report,
                "| {} s | {} | {:.1} MiB | {} |",
                sample.at.as_secs(),
                sample.requests,
                sample.rss_kib as f64 / 1024.0,
                sample.fds
            )?;
        }
        writeln!(report)?;
    }
    Ok(())
}

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count() as u64)
}

async fn one_run(policy: &str, load: Load, concurrency: usize) -> anyhow::Result<Outcome> {
    let host = HostProcess::start(
        Profile::Release,
        &[
            ("10-flaky.wasm", &FLAKY.path()),
            ("20-asm.wasm", &ASM_DEMO.path()),
        ],
        &format!("[plugins.10-flaky]\nconfig = \"{FAIL_EVERY}\"\nfailure_policy = \"{policy}\"\n"),
        Some((HOST_PORT, ADMIN_PORT)),
        "error",
    )?;
    let (address, pid) = (host.address, host.pid());
    let rss_kib = move || process::rss_kib(pid).unwrap_or(0);

    let upstream = EchoServer::start().await?;
    let config = envoy::render_config(0, address, upstream.address, 0)?;
    let envoy = Arc::new(Envoy::start_with_config(&config).await?);

    // Warm up (connections, first instances), then measure from a settled state. Warm-up ids
    // are never divisible by 100, so nothing fails before the measured run.
    for i in 0..50u64 {
        let id = (10_000_001 + i).to_string();
        envoy
            .request("GET", "/warmup", &[("x-request-id", &id)], Vec::new())
            .await?;
    }
    let counters_before = ext_proc_counters(&envoy).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warmup_seen = upstream.seen().len();

    // Memory and descriptors: the peak every 20 ms, a sample for the series every
    // `sample_every` (a handful over a short run, one every 30 s over a soak).
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let sample_every = match load {
        Load::Requests(_) => Duration::from_secs(1),
        Load::For(time) => (time / 20).max(Duration::from_secs(1)),
    };
    let series = Arc::new(Mutex::new(vec![Sample {
        at: Duration::ZERO,
        requests: 0,
        rss_kib: rss_kib(),
        fds: fds(pid),
    }]));
    let peak = Arc::new(AtomicU64::new(rss_kib()));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, series, done) =
            (peak.clone(), sampling.clone(), series.clone(), done.clone());
        std::thread::spawn(move || {
            let mut next_sample = sample_every;
            while sampling.load(Ordering::Relaxed) {
                let rss = rss_kib();
                peak.fetch_max(rss, Ordering::Relaxed);
                if started.elapsed() >= next_sample {
                    series.lock().unwrap().push(Sample {
                        at: next_sample,
                        requests: done.load(Ordering::Relaxed),
                        rss_kib: rss,
                        fds: fds(pid),
                    });
                    next_sample += sample_every;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let next = Arc::new(AtomicU64::new(1));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (envoy, next, done) = (envoy.clone(), next.clone(), done.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    if let Load::For(time) = load
                        && started.elapsed() >= time
                    {
                        break;
                    }
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    if let Load::Requests(requests) = load
                        && id > requests
                    {
                        break;
                    }
                    let id_text = id.to_string();
                    let response = envoy
                        .request("GET", "/headers", &[("x-request-id", &id_text)], Vec::new())
                        .await;
                    done.fetch_add(1, Ordering::Relaxed);
                    results.push((id, response));
                }
                results
            })
        })
        .collect();
    let mut outcome = Outcome::default();
    let mut status_of = HashMap::new();
    for worker in workers {
        for (id, response) in worker.await? {
            let response = response?;
            outcome.requests += 1;
            *outcome.statuses.entry(response.status).or_default() += 1;
            if response.header_values("x-ext-proc-header") == ["hello-from-asm"] {
                outcome.tagged_responses += 1;
            }
            let should_fail = policy == "fail-closed" && id % FAIL_EVERY == 0;
            if (response.status == 500) != should_fail {
                outcome.wrong_status += 1;
            }
            status_of.insert(id, response.status);
        }
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    // Ids were handed out one by one: every request sent has an id up to the count.
    if status_of.len() as u64 != outcome.requests
        || status_of.keys().max().copied().unwrap_or(0) != outcome.requests
    {
        bail!(
            "the requests sent are not numbered 1 to {}",
            outcome.requests
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    sampling.store(false, Ordering::Relaxed);
    sampler.join().ok();
    outcome.rss_peak_kib = peak.load(Ordering::Relaxed);
    let mut series = std::mem::take(&mut *series.lock().unwrap());
    series.push(Sample {
        at: started.elapsed(),
        requests: outcome.requests,
        rss_kib: rss_kib(),
        fds: fds(pid),
    });
    outcome.series = series;

    let mut seen_ids: HashMap<u64, u64> = HashMap::new();
    for request in upstream.seen().into_iter().skip(warmup_seen) {
        outcome.upstream_requests += 1;
        if request.header("x-ext-proc-header").as_deref() == Some("hello-to-asm") {
            outcome.upstream_tagged += 1;
        }
        if let Some(id) = request.header("x-request-id").and_then(|v| v.parse().ok()) {
            *seen_ids.entry(id).or_default() += 1;
        }
    }
    outcome.duplicated = seen_ids.values().filter(|n| **n > 1).count() as u64;
    outcome.lost = status_of
        .iter()
        .filter(|(id, status)| **status == 200 && !seen_ids.contains_key(id))
        .count() as u64;
    // Only what the measured run added.
    for (name, value) in ext_proc_counters(&envoy).await? {
        let delta = value - counters_before.get(&name).copied().unwrap_or(0);
        if delta > 0 {
            outcome.envoy_counters.insert(name, delta);
        }
    }
    Ok(outcome)
}

/// Envoy's `http.ingress_http.ext_proc.*` counters.
async fn ext_proc_counters(envoy: &Envoy) -> anyhow::Result<BTreeMap<String, u64>> {
    let stats = envoy.admin_get("/stats?filter=ext_proc").await?;
    Ok(stats
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            let short = name.strip_prefix("http.ingress_http.ext_proc.")?;
            Some((short.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss_kib: u64, fds: u64) -> Sample {
        Sample {
            at: Duration::ZERO,
            requests: 0,
            rss_kib,
            fds,
        }
    }

    /// A fail-closed run of 1,000 requests that went exactly as it must.
    fn clean() -> Outcome {
        Outcome {
            requests: 1_000,
            statuses: BTreeMap::from([(200, 990), (500, 10)]),
            tagged_responses: 990,
            upstream_requests: 990,
            upstream_tagged: 990,
            series: vec![sample(30_000, 20), sample(34_000, 21)],
            envoy_counters: BTreeMap::from([("streams_started".to_string(), 1_000)]),
            ..Outcome::default()
        }
    }

    #[test]
    fn a_clean_run_passes_and_every_kind_of_fault_fails_it() {
        assert_eq!(clean().violations("fail-closed"), Vec::<String>::new());
        // (what the violation says, the fault)
        type Fault = (&'static str, fn(&mut Outcome));
        let faults: [Fault; 7] = [
            ("lost", |o| o.lost = 1),
            ("duplicated", |o| o.duplicated = 1),
            ("responses 500", |o| {
                o.statuses.insert(500, 9);
                o.statuses.insert(503, 1);
            }),
            ("where 200 was due", |o| o.wrong_status = 1),
            ("Envoy counted streams_failed", |o| {
                o.envoy_counters.insert("streams_failed".into(), 1);
            }),
            ("RSS grew", |o| {
                o.series[1].rss_kib = 30_000 + FLAT_RSS_KIB + 1
            }),
            ("descriptors grew", |o| o.series[1].fds = 20 + FLAT_FDS + 1),
        ];
        for (what, fault) in faults {
            let mut outcome = clean();
            fault(&mut outcome);
            let violations = outcome.violations("fail-closed");
            assert!(
                violations.iter().any(|v| v.contains(what)),
                "{what}: {violations:?}"
            );
        }
        // Fail-open expects no 500 at all.
        assert!(!clean().violations("fail-open").is_empty());
    }
}
