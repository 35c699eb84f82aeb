//! What one request costs in work that does not depend on how busy the machine is: the
//! instructions each process runs (callgrind) and the system calls it makes (strace) per
//! request, for Envoy alone, Lua, the host, the native server and the module in Envoy's
//! process. Time per request on a shared virtual machine moves with its neighbours; these
//! counts do not, so a change on the stream path shows in them whatever the machine's day.
//!
//! Instructions: each setup's Envoy and ext_proc server run under callgrind; after a warm-up
//! the counters are zeroed, `REQUESTS` requests go through one at a time, and the counters are
//! dumped, and each dump kept in `target/bench/callgrind/` for `callgrind_annotate`. System calls: the same setup without valgrind, strace attached to each process for
//! `REQUESTS` requests from 16 connections at a modest rate (as the fixed-rate runs send them).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::e2e::load::{load_generator, output_of};
use super::e2e::{Binaries, MEASURED_PROFILE, Running, SETUPS, Setup, Variation, callgrind_out};

/// The setups counted: the baselines, the two ways of running the bundled plugin, and the host
/// with tracing on (its spans' cost, beside `wasm`'s).
const COUNTED: [&str; 6] = [
    "envoy",
    "lua",
    "wasm",
    "wasm-traced",
    "native",
    "in-process",
];
/// Requests per count: enough that start-up work left in the counters is noise.
const REQUESTS: u64 = 1_000;
/// Requests before counting: connection pools filled, instances and caches warm.
const WARM_UP_REQUESTS: u64 = 200;
/// The rate the strace runs send at, in requests per second per connection.
const STRACE_RATE_PER_CONNECTION: u64 = 10;
const STRACE_CONNECTIONS: u64 = 16;
/// Time for strace to attach to every thread before the load starts.
const ATTACH: Duration = Duration::from_secs(1);

/// One process's work per request in one setup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counted {
    /// The setup's key in the end-to-end table.
    pub setup: String,
    /// `envoy` or `ext_proc`.
    pub process: String,
    pub instructions_per_request: f64,
    pub syscalls_per_request: f64,
    /// The system calls made at least once per ten requests, by name, per request.
    pub syscalls: Vec<(String, f64)>,
    /// For an ext_proc server: its instructions per request by [`ITEMS`], each the inclusive
    /// count of the item's outermost function found in the dump (`None`: not found, e.g.
    /// inlined away or no Wasm in the process).
    #[serde(default)]
    pub items: Items,
}

/// Instructions per request by item: each item's label and count, if found.
pub type Items = Vec<(String, Option<f64>)>;

/// Where an ext_proc server's instructions go, in parts that do not overlap (none runs inside
/// another): each a label and the functions that stand for it in a dump, the outermost found
/// counting. The build links with LTO, so where one function is inlined another name may hold
/// the same work. What no item covers is the rest: the ext_proc protocol, the conversions, the
/// chain, futures and allocation.
pub const ITEMS: [(&str, &[&str]); 7] = [
    (
        "Wasm: instantiation (pool slot, store, instance)",
        &["wasm_extproc_core::runtime::Plugin::instantiate_within"],
    ),
    (
        "Wasm: instance drop (memory and tables reset for the next stream)",
        &["core::ptr::drop_in_place<wasm_extproc_core::runtime::Instance>"],
    ),
    (
        "Wasm: the two header calls, host functions included",
        &[
            "wasm_extproc_core::runtime::Instance::call",
            "wasmtime::runtime::component::func::Func::call_raw",
        ],
    ),
    (
        "protobuf: decoding Envoy's messages",
        &["<tonic_prost::codec::ProstDecoder<U> as tonic::codec::Decoder>::decode"],
    ),
    (
        "protobuf: encoding the answers",
        &[
            "<tonic_prost::codec::ProstEncoder<T> as tonic::codec::Encoder>::encode",
            "prost::message::Message::encode",
        ],
    ),
    (
        "HTTP/2 connection: frames read and written, HPACK",
        &["h2::proto::connection::Connection<T,P,B>::poll"],
    ),
    (
        "tokio: waiting for work (I/O driver, timers, waking tasks)",
        &["tokio::runtime::scheduler::multi_thread::worker::Context::park_internal"],
    ),
];

/// Counts every setup of [`COUNTED`].
pub fn run() -> anyhow::Result<Vec<Counted>> {
    xtask::setup::profilers()?;
    let binaries = Binaries::find(MEASURED_PROFILE)?;
    let kept = xtask::target_dir().join("bench/callgrind");
    std::fs::create_dir_all(&kept).with_context(|| kept.display().to_string())?;
    let mut counted = Vec::new();
    for key in COUNTED {
        let setup = SETUPS
            .iter()
            .find(|s| s.key == key)
            .with_context(|| format!("no setup {key}"))?;
        let instructions = instructions(setup, &binaries, &kept)?;
        let syscalls = syscalls(setup, &binaries)?;
        for (process, instructions, items) in instructions {
            let (total, by_name) = syscalls
                .iter()
                .find(|(name, ..)| *name == process)
                .map(|(_, total, by_name)| (*total, by_name.clone()))
                .unwrap_or_default();
            eprintln!(
                "bench: {key} {process}: {:.1}k instructions, {total:.2} system calls per request",
                instructions / 1e3
            );
            counted.push(Counted {
                setup: key.into(),
                process: process.into(),
                instructions_per_request: instructions,
                syscalls_per_request: total,
                syscalls: by_name,
                items,
            });
        }
    }
    Ok(counted)
}

/// Instructions per request in each measured process of `setup`, under callgrind. Each
/// process's dump of the measured requests is kept in `kept` as `SETUP.PROCESS.callgrind`, for
/// `callgrind_annotate` to say where they went.
fn instructions(
    setup: &'static Setup,
    binaries: &Binaries,
    kept: &Path,
) -> anyhow::Result<Vec<(&'static str, f64, Items)>> {
    let running = Running::start_with(
        setup,
        binaries,
        Variation {
            under_callgrind: true,
            ..Variation::default()
        },
    )?;
    let url = format!("http://{}/", running.listener);
    sequential(&url, WARM_UP_REQUESTS)?;
    for (_, pid) in running.measured() {
        callgrind_control("-z", pid)?;
    }
    sequential(&url, REQUESTS)?;
    let mut counts = Vec::new();
    for (name, pid) in running.measured() {
        callgrind_control("-d", pid)?;
        let dump = newest_dump(running.dir(), name, pid)?;
        let copy = kept.join(format!("{}.{name}.callgrind", setup.key));
        std::fs::copy(&dump, &copy).with_context(|| copy.display().to_string())?;
        let total = dumped_total(&dump)?;
        let items = if name == "ext_proc" {
            items(&copy)?
        } else {
            Vec::new()
        };
        counts.push((name, total as f64 / REQUESTS as f64, items));
    }
    Ok(counts)
}

/// `requests` requests, one at a time, every one answered 200.
fn sequential(url: &str, requests: u64) -> anyhow::Result<()> {
    let report =
        output_of(load_generator("hey").args(["-n", &requests.to_string(), "-c", "1", url]))?;
    let answered = status_200(&report);
    if answered != requests {
        bail!("{answered} of {requests} requests to {url} answered 200:\n{report}");
    }
    Ok(())
}

/// The count on hey's `[200]` line.
fn status_200(report: &str) -> u64 {
    report
        .lines()
        .find_map(|line| line.trim().strip_prefix("[200]"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn callgrind_control(command: &str, pid: u32) -> anyhow::Result<()> {
    output_of(Command::new("callgrind_control").args([command, &pid.to_string()]))
        .map(drop)
        .with_context(|| format!("callgrind_control {command} {pid}"))
}

/// The newest dump callgrind wrote for process `pid`.
fn newest_dump(dir: &Path, name: &str, pid: u32) -> anyhow::Result<String> {
    let prefix = callgrind_out(dir, name).replace("%p", &pid.to_string());
    (1..)
        .map(|n| format!("{prefix}.{n}"))
        .take_while(|path| Path::new(path).is_file())
        .last()
        .with_context(|| format!("callgrind wrote no dump at {prefix}.N"))
}

/// The instructions counted in callgrind's `dump`.
fn dumped_total(dump: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(dump).with_context(|| dump.to_string())?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{dump} has no totals line"))
}

/// The instructions per request of each of [`ITEMS`] in `dump`, from `callgrind_annotate`'s
/// inclusive counts.
fn items(dump: &Path) -> anyhow::Result<Items> {
    let annotated = output_of(
        Command::new("callgrind_annotate")
            .args(["--inclusive=yes", "--threshold=100"])
            .arg(dump),
    )
    .with_context(|| format!("callgrind_annotate {}", dump.display()))?;
    Ok(items_in(&annotated, REQUESTS))
}

/// [`ITEMS`] in `annotated` (callgrind_annotate's inclusive listing), per request.
fn items_in(annotated: &str, requests: u64) -> Items {
    // Lines such as `22,834,675 (12.11%)  ???:path::to::function [/object]`.
    let functions: Vec<(u64, &str)> = annotated
        .lines()
        .filter_map(|line| {
            let (count, rest) = line.trim_start().split_once(' ')?;
            let count = count.replace(',', "").parse().ok()?;
            let (_, function) = rest.split_once(':')?;
            Some((count, function))
        })
        .collect();
    ITEMS
        .iter()
        .map(|(label, names)| {
            let outermost = functions
                .iter()
                .filter(|(_, function)| names.iter().any(|name| function.starts_with(name)))
                .map(|(count, _)| *count)
                .max();
            (
                label.to_string(),
                outermost.map(|count| count as f64 / requests as f64),
            )
        })
        .collect()
}

/// Per measured process: its system calls per request, in all and by name.
type Syscalls = Vec<(&'static str, f64, Vec<(String, f64)>)>;

/// System calls per request in each measured process of `setup`, under strace.
fn syscalls(setup: &'static Setup, binaries: &Binaries) -> anyhow::Result<Syscalls> {
    let running = Running::start_with(setup, binaries, Variation::default())?;
    let url = format!("http://{}/", running.listener);
    sequential(&url, WARM_UP_REQUESTS)?;
    let mut tracers = Vec::new();
    for (name, pid) in running.measured() {
        let out = running.dir().join(format!("{name}.strace"));
        let tracer = Command::new("strace")
            .args(["-f", "-c", "-p", &pid.to_string(), "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("strace")?;
        tracers.push((name, tracer, out));
    }
    std::thread::sleep(ATTACH);
    // hey sends `-n` divided among its connections.
    let requests = REQUESTS / STRACE_CONNECTIONS * STRACE_CONNECTIONS;
    let report = output_of(load_generator("hey").args([
        "-n",
        &requests.to_string(),
        "-c",
        &STRACE_CONNECTIONS.to_string(),
        "-q",
        &STRACE_RATE_PER_CONNECTION.to_string(),
        &url,
    ]))?;
    let answered = status_200(&report);
    if answered != requests {
        bail!("{answered} of {requests} requests answered 200 under strace:\n{report}");
    }
    let mut counts = Vec::new();
    for (name, mut tracer, out) in tracers {
        // strace prints its summary when interrupted.
        output_of(Command::new("kill").args(["-INT", &tracer.id().to_string()]))?;
        tracer.wait()?;
        let summary = std::fs::read_to_string(&out).with_context(|| out.display().to_string())?;
        let (total, by_name) = parse_strace_summary(&summary)
            .with_context(|| format!("cannot read strace's summary:\n{summary}"))?;
        let per = |calls: u64| calls as f64 / requests as f64;
        let by_name = by_name
            .into_iter()
            .map(|(name, calls)| (name, per(calls)))
            .filter(|(_, per_request)| *per_request >= 0.1)
            .collect();
        counts.push((name, per(total), by_name));
    }
    Ok(counts)
}

/// strace `-c`'s table: the total calls and the calls of each system call, most first.
fn parse_strace_summary(summary: &str) -> Option<(u64, Vec<(String, u64)>)> {
    let mut by_name = Vec::new();
    let mut total = None;
    for line in summary.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors,] syscall
        if fields.len() < 5 || fields[0].parse::<f64>().is_err() {
            continue;
        }
        let calls: u64 = fields[3].parse().ok()?;
        let name = fields.last()?.to_string();
        if name == "total" {
            total = Some(calls);
        } else {
            by_name.push((name, calls));
        }
    }
    by_name.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
    Some((total?, by_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strace_summary_gives_the_total_and_each_call_most_first() {
        let summary = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 52.63    0.000010           0      2000           sendto
 40.00    0.000008           0      4000        12 readv
  7.37    0.000001           0        17           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.000019           0      6017        12 total
";
        let (total, by_name) = parse_strace_summary(summary).expect("a summary");
        assert_eq!(total, 6017);
        assert_eq!(
            by_name,
            vec![
                ("readv".to_string(), 4000),
                ("sendto".to_string(), 2000),
                ("epoll_wait".to_string(), 17)
            ]
        );
    }

    #[test]
    fn each_item_counts_its_outermost_function_and_a_missing_one_says_so() {
        let annotated = "\
--------------------------------------------------------------------------------
188,588,305 (100.0%)  PROGRAM TOTALS
22,834,675 (12.11%)  ???:wasm_extproc_core::runtime::Plugin::instantiate_within::{{closure}} [/x]
 9,126 ( 0.00%)  ???:wasm_extproc_core::runtime::Plugin::instantiate_within::{{closure}}::{{closure}} [/x]
3,350,970 ( 3.09%)  ???:<tonic_prost::codec::ProstEncoder<T> as tonic::codec::Encoder>::encode [/x]
1,400,000 ( 1.29%)  ???:prost::message::Message::encode [/x]
";
        let items = items_in(annotated, 1_000);
        assert_eq!(items.len(), ITEMS.len());
        assert_eq!(items[0].1, Some(22_834.675));
        // Two names for the same work, nested: the outer one.
        let encode = items
            .iter()
            .find(|(label, _)| label.contains("encoding"))
            .unwrap();
        assert_eq!(encode.1, Some(3_350.97));
        let calls = items
            .iter()
            .find(|(label, _)| label.contains("header calls"))
            .unwrap();
        assert_eq!(calls.1, None);
    }

    #[test]
    fn hey_reports_its_200s() {
        let report = "Status code distribution:\n  [200]\t1000 responses\n  [503]\t2 responses\n";
        assert_eq!(status_200(report), 1000);
        assert_eq!(status_200("no distribution"), 0);
    }
}
