//! `cargo xtask reliability`: the measured proof that a failing plugin costs exactly what its
//! policy says and nothing else.
//!
//! Real Envoy, the release host binary, the echo upstream. The chain is `10-flaky` (traps on
//! every request whose `x-request-id` is divisible by 100: 1%) and `20-asm`. Each request
//! carries its number as `x-request-id`, so which requests fail is known in advance. Run once
//! with the flaky plugin fail-open and once fail-closed, and report responses by status, ASM
//! tags seen at the client and at the upstream, lost and duplicated requests, the host's RSS at
//! start, peak and end, and Envoy's ext_proc counters.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{self, Envoy};
use extproc_testkit::fixtures::{ASM_DEMO, FLAKY};

use crate::release_host::{self, ReleaseHost};
use crate::{cargo, run as run_command, target_dir};

const FAIL_EVERY: u64 = 100;
const HOST_PORT: u16 = 19002;
const ADMIN_PORT: u16 = 19003;

/// What one run saw.
#[derive(Debug, Default)]
struct Outcome {
    statuses: BTreeMap<u16, u64>,
    tagged_responses: u64,
    upstream_requests: u64,
    upstream_tagged: u64,
    duplicated: u64,
    lost: u64,
    wrong_status: u64,
    rss_start_kib: u64,
    rss_peak_kib: u64,
    rss_end_kib: u64,
    envoy_counters: BTreeMap<String, u64>,
    seconds: f64,
}

pub fn run(requests: u64, concurrency: usize) -> anyhow::Result<()> {
    run_command(cargo().args(["build", "--release", "--package", "wasm-extproc"]))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut report = String::new();
    writeln!(
        report,
        "{requests} requests at concurrency {concurrency} through Envoy 1.40.0 -> wasm-extproc \
         (release) [10-flaky: traps when x-request-id % {FAIL_EVERY} == 0, 20-asm] -> echo upstream.\n"
    )?;
    for policy in ["fail-open", "fail-closed"] {
        let outcome = runtime.block_on(one_run(policy, requests, concurrency))?;
        let expected_failures = requests / FAIL_EVERY;
        let expected_ok = if policy == "fail-open" {
            requests
        } else {
            requests - expected_failures
        };
        writeln!(report, "### {policy}\n")?;
        writeln!(report, "| measure | value | expected |")?;
        writeln!(report, "|---|---|---|")?;
        writeln!(report, "| requests sent | {requests} | |")?;
        for (status, count) in &outcome.statuses {
            let expected = match (status, policy) {
                (200, _) => expected_ok.to_string(),
                (500, "fail-closed") => expected_failures.to_string(),
                _ => "0".to_string(),
            };
            writeln!(report, "| responses {status} | {count} | {expected} |")?;
        }
        writeln!(
            report,
            "| a 500 where 200 was due, or the reverse | {} | 0 |",
            outcome.wrong_status
        )?;
        writeln!(
            report,
            "| responses with `x-ext-proc-header: hello-from-asm` | {} | {expected_ok} |",
            outcome.tagged_responses
        )?;
        writeln!(
            report,
            "| requests at the upstream | {} | {expected_ok} |",
            outcome.upstream_requests
        )?;
        writeln!(
            report,
            "| ... with `x-ext-proc-header: hello-to-asm` | {} | all |",
            outcome.upstream_tagged
        )?;
        writeln!(
            report,
            "| lost (200 at the client, never at the upstream) | {} | 0 |",
            outcome.lost
        )?;
        writeln!(
            report,
            "| duplicated at the upstream | {} | 0 |",
            outcome.duplicated
        )?;
        writeln!(
            report,
            "| host RSS start / peak / end | {} / {} / {} MiB | flat |",
            outcome.rss_start_kib / 1024,
            outcome.rss_peak_kib / 1024,
            outcome.rss_end_kib / 1024
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
            requests as f64 / outcome.seconds
        )?;
    }
    let path = target_dir().join("reliability.md");
    std::fs::write(&path, &report)?;
    println!("{report}");
    eprintln!("written to {}", path.display());
    Ok(())
}

async fn one_run(policy: &str, requests: u64, concurrency: usize) -> anyhow::Result<Outcome> {
    let host = ReleaseHost::start(
        &[
            ("10-flaky.wasm", &FLAKY.path()),
            ("20-asm.wasm", &ASM_DEMO.path()),
        ],
        &format!("[plugins.10-flaky]\nconfig = \"{FAIL_EVERY}\"\nfailure_policy = \"{policy}\"\n"),
        (HOST_PORT, ADMIN_PORT),
        "error",
    )?;
    let (address, pid) = (host.address, host.pid());
    let rss_kib = |pid| release_host::rss_kib(pid).unwrap_or(0);

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
    let rss_start = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(rss_start));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let warmup_seen = upstream.seen().len();

    let next = Arc::new(AtomicU64::new(1));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (envoy, next) = (envoy.clone(), next.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    if id > requests {
                        break;
                    }
                    let id_text = id.to_string();
                    let response = envoy
                        .request("GET", "/headers", &[("x-request-id", &id_text)], Vec::new())
                        .await;
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
    tokio::time::sleep(Duration::from_secs(1)).await;
    sampling.store(false, Ordering::Relaxed);
    sampler.join().ok();
    outcome.rss_start_kib = rss_start;
    outcome.rss_peak_kib = peak.load(Ordering::Relaxed);
    outcome.rss_end_kib = rss_kib(pid);

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
    if outcome.statuses.values().sum::<u64>() != requests {
        bail!("not every request got a response");
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
