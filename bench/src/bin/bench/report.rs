//! BENCHMARKS.md and its plots, from one run's results.

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::concurrency::Level;
use super::counts::Counted;
use super::e2e::{ScenarioResult, median};
use super::micro::Estimates;
use super::overload::{self, Overloaded};
use super::rss::{Point, StreamState};

/// Targets the figures are held to: the host against the native server (ratios in one run),
/// and its own costs.
const TARGET_CPU_FIXED_RATE: f64 = 1.15;
const TARGET_CPU_CLOSED_LOOP: f64 = 1.0;
const TARGET_RPS: f64 = 0.87;
const TARGET_ENVOY_CPU: f64 = 1.05;
const TARGET_STREAM_US: f64 = 10.0;
const TARGET_PER_PLUGIN_US: f64 = 3.0;
const TARGET_FOUR_PLUGINS: f64 = 1.5;
const TARGET_STREAM_KIB: f64 = 32.0;
/// The in-process module against Envoy's Lua filter (the in-process issue): Envoy's CPU per
/// request, and requests per second.
const TARGET_IN_PROCESS_CPU: f64 = 1.3;
const TARGET_IN_PROCESS_RPS: f64 = 0.8;
/// Host CPU per request with the ASM plugin in JavaScript, and in Python, against Rust (closed
/// loop), and the host's peak RSS with either at 16 streams in flight.
const TARGET_JAVASCRIPT: f64 = 3.0;
const TARGET_PYTHON: f64 = 6.0;
const TARGET_INTERPRETED_RSS_MIB: f64 = 120.0;

/// Everything one `cargo xtask bench` measured, kept beside the report (bench/results.json) so
/// the report can be rendered again without measuring again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub machine: String,
    pub command: String,
    pub e2e: Vec<ScenarioResult>,
    pub fixed_rate: u64,
    pub e2e_duration_s: u64,
    pub e2e_rounds: usize,
    pub e2e_connections: usize,
    pub micro: Estimates,
    pub rss: Vec<Point>,
    /// Exchanges in flight: connections through Envoy behind a slow upstream.
    #[serde(default)]
    pub concurrency: Vec<Level>,
    /// The languages benchmark's table (bench/benches/languages.rs), as it printed it.
    pub languages: Option<String>,
    /// The state and outbound benchmark's table (bench/benches/state.rs), as it printed it.
    #[serde(default)]
    pub state: Option<String>,
    /// Instructions and system calls per request, by setup and process.
    #[serde(default)]
    pub counts: Vec<Counted>,
    /// More clients than the machine serves, every round.
    #[serde(default)]
    pub overload: Vec<Overloaded>,
    /// Parts measured again since (`--only`), each with its date and machine.
    #[serde(default)]
    pub later: Vec<String>,
}

impl Results {
    /// Nothing measured yet, for a run of `duration`-second loads.
    pub fn empty(duration: u64) -> Results {
        Results {
            date: String::new(),
            machine: String::new(),
            command: String::new(),
            e2e: Vec::new(),
            fixed_rate: 0,
            e2e_duration_s: duration,
            e2e_rounds: 0,
            e2e_connections: 0,
            micro: Estimates::new(),
            rss: Vec::new(),
            concurrency: Vec::new(),
            languages: None,
            state: None,
            counts: Vec::new(),
            overload: Vec::new(),
            later: Vec::new(),
        }
    }
}

const COLORS: [RGBColor; 4] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
];

/// Writes `report` (Markdown) and its plots into `plots` (linked relative to the report).
pub fn write(results: &Results, report: &Path, plots: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(plots)?;
    let base = report.parent().unwrap_or(Path::new("."));
    let link = |name: &str| -> String {
        let path = plots.join(name);
        path.strip_prefix(base)
            .unwrap_or(&path)
            .display()
            .to_string()
    };
    let mut md = String::new();
    writeln!(
        md,
        "# Benchmarks\n\nWhat the Wasm sandbox costs, side by side with a native ext_proc server and \
         Envoy's own filters, on one machine in one run. Regenerate everything (figures, plots, \
         this file) with:\n\n    {}\n\nMeasured {} on {}. The machine is shared and noisy: \
         every figure is a median, and the ratios between setups measured in the same run are \
         what to compare. Raw figures, every round included: [bench/results.json](bench/results.json).\n",
        results.command, results.date, results.machine
    )?;
    if !results.later.is_empty() {
        writeln!(
            md,
            "Measured again since, the rest as above: {}.\n",
            results.later.join("; ")
        )?;
    }

    md.push_str(&summary(results));
    if !results.e2e.is_empty() {
        e2e_section(results, &mut md, &link, plots)?;
    }
    micro_section(results, &mut md, &link, plots)?;
    counts_section(results, &mut md)?;
    rss_section(results, &mut md, &link, plots)?;
    concurrency_section(results, &mut md, &link, plots)?;
    overload_section(results, &mut md)?;
    if let Some(table) = &results.languages {
        writeln!(
            md,
            "## Plugin languages\n\nThe ASM demo plugin built in each language \
             (`bench/benches/languages.rs`): component size, compile time cold and from the \
             compilation cache, and the per-stream work (instantiate + both header phases; \
             these components import WASI), taken apart: instantiating and dropping alone, and \
             the two calls alone on an instance kept from stream to stream (`isolation = \
             \"reuse\"`). What a fresh instance's first calls cost beyond the two is the \
             stream figure minus the other two.\n\n{table}"
        )?;
    }
    if let Some(table) = &results.state {
        writeln!(
            md,
            "## State and outbound calls\n\nWhat a plugin's state operations and HTTP \
             requests cost, seen from the plugin (`bench/benches/state.rs`): a request-headers \
             call making 100 operations, less the same call making none, per operation; the \
             call itself on an instance kept across calls, for scale. The embedded store is \
             the default backend; Redis (`redis-server` from Debian) and the HTTP server (hyper) \
             run on loopback on the same machine, so their figures are the host's share of a \
             round trip plus the server's, without a network.\n\n{table}"
        )?;
    }
    md.push_str(WHERE_THE_TIME_GOES);
    std::fs::write(report, md)?;
    Ok(())
}

/// The targets, each met or not.
fn summary(results: &Results) -> String {
    let mut rows = Vec::new();
    let mut row = |what: String, measured: String, target: String, met: bool| {
        rows.push(format!(
            "| {what} | {measured} | {target} | {} |",
            if met { "met" } else { "**missed**" }
        ));
    };
    let by_key = |key: &str| results.e2e.iter().find(|s| s.key == key);
    if let (Some(wasm), Some(native)) = (by_key("wasm"), by_key("native")) {
        let ratio = |w: f64, n: f64| format!("{w:.1} vs {n:.1} µs: {:.2}×", w / n);
        let (w, n) = (cpu(wasm, "ext_proc"), cpu(native, "ext_proc"));
        row(
            format!(
                "(c) host vs (d) native: ext_proc CPU per request at {} req/s",
                results.fixed_rate
            ),
            ratio(w, n),
            format!("≤ {TARGET_CPU_FIXED_RATE:.2}×"),
            w <= n * TARGET_CPU_FIXED_RATE,
        );
        let (wc, nc) = (closed_cpu(wasm, "ext_proc"), closed_cpu(native, "ext_proc"));
        if wc > 0.0 && nc > 0.0 {
            row(
                "(c) vs (d): ext_proc CPU per request, closed loop".into(),
                ratio(wc, nc),
                format!("≤ {TARGET_CPU_CLOSED_LOOP:.2}×"),
                wc <= nc * TARGET_CPU_CLOSED_LOOP,
            );
        }
        let rps = wasm.closed.rps / native.closed.rps;
        row(
            "(c) vs (d): req/s, closed loop".into(),
            format!(
                "{:.0} vs {:.0}: {rps:.2}×",
                wasm.closed.rps, native.closed.rps
            ),
            format!("≥ {TARGET_RPS:.2}×"),
            rps >= TARGET_RPS,
        );
        let (we, ne) = (cpu(wasm, "envoy"), cpu(native, "envoy"));
        row(
            format!(
                "Envoy's CPU per request behind (c) vs behind (d), at {} req/s",
                results.fixed_rate
            ),
            ratio(we, ne),
            format!("≤ {TARGET_ENVOY_CPU:.2}×"),
            we <= ne * TARGET_ENVOY_CPU,
        );
        for (key, what) in [
            ("wasm4", "fresh instances"),
            ("wasm4-reuse", "`isolation = \"reuse\"`"),
        ] {
            if let Some(four) = by_key(key) {
                let f = cpu(four, "ext_proc");
                row(
                    format!(
                        "host CPU per request with 4 plugins vs 1 ({what}), at {} req/s",
                        results.fixed_rate
                    ),
                    format!("{f:.1} vs {w:.1} µs: {:.2}×", f / w),
                    format!("≤ {TARGET_FOUR_PLUGINS:.1}×"),
                    f <= w * TARGET_FOUR_PLUGINS,
                );
            }
        }
    }
    if let (Some(module), Some(lua)) = (by_key("in-process"), by_key("lua")) {
        let (m, l) = (cpu(module, "envoy"), cpu(lua, "envoy"));
        row(
            format!(
                "(e) in-process vs (b) Lua: Envoy's CPU per request at {} req/s",
                results.fixed_rate
            ),
            format!("{m:.1} vs {l:.1} µs: {:.2}×", m / l),
            format!("≤ {TARGET_IN_PROCESS_CPU:.1}×"),
            m <= l * TARGET_IN_PROCESS_CPU,
        );
        let (mc, lc) = (closed_cpu(module, "envoy"), closed_cpu(lua, "envoy"));
        if mc > 0.0 && lc > 0.0 {
            row(
                "(e) vs (b): Envoy's CPU per request, closed loop".into(),
                format!("{mc:.1} vs {lc:.1} µs: {:.2}×", mc / lc),
                format!("≤ {TARGET_IN_PROCESS_CPU:.1}×"),
                mc <= lc * TARGET_IN_PROCESS_CPU,
            );
        }
        let rps = module.closed.rps / lua.closed.rps;
        row(
            "(e) vs (b): req/s, closed loop".into(),
            format!(
                "{:.0} vs {:.0}: {rps:.2}×",
                module.closed.rps, lua.closed.rps
            ),
            format!("≥ {TARGET_IN_PROCESS_RPS:.1}×"),
            rps >= TARGET_IN_PROCESS_RPS,
        );
    }
    if let Some(rust) = by_key("wasm") {
        let base = closed_cpu(rust, "ext_proc");
        for (key, language, target) in [
            ("wasm-js", "JavaScript", TARGET_JAVASCRIPT),
            (
                "wasm-js-reuse",
                "JavaScript, `isolation = \"reuse\"`",
                TARGET_JAVASCRIPT,
            ),
            ("wasm-py", "Python", TARGET_PYTHON),
            (
                "wasm-py-reuse",
                "Python, `isolation = \"reuse\"`",
                TARGET_PYTHON,
            ),
        ] {
            let Some(s) = by_key(key) else { continue };
            let host = closed_cpu(s, "ext_proc");
            row(
                format!("host CPU per request, ASM plugin in {language} vs Rust, closed loop"),
                format!("{host:.1} vs {base:.1} µs: {:.2}×", host / base),
                format!("≤ {target:.0}×"),
                host <= base * target,
            );
            if let Some(kib) = s.ext_proc_peak_rss_kib {
                let mib = kib as f64 / 1024.0;
                row(
                    format!(
                        "host peak RSS, ASM plugin in {language}, {} streams in flight",
                        results.e2e_connections
                    ),
                    format!("{mib:.0} MiB"),
                    format!("≤ {TARGET_INTERPRETED_RSS_MIB:.0} MiB"),
                    mib <= TARGET_INTERPRETED_RSS_MIB,
                );
            }
        }
    }
    if let Some(stream) = results.micro.get("stream/asm_demo") {
        row(
            "Wasm work per stream, bundled plugin (instantiate + both header phases)".into(),
            format!("{:.1} µs", stream.micros()),
            format!("≤ {TARGET_STREAM_US:.0} µs"),
            stream.micros() <= TARGET_STREAM_US,
        );
    }
    for (group, what) in [
        ("chain", "fresh instance per stream (default)"),
        ("chain_reused", "`isolation = \"reuse\"`"),
    ] {
        if let Some((slope, _)) = chain_fit(&results.micro, group) {
            row(
                format!("Each additional plugin in the chain, {what}"),
                format!("{slope:.1} µs"),
                format!("≤ {TARGET_PER_PLUGIN_US:.0} µs, linear"),
                slope <= TARGET_PER_PLUGIN_US,
            );
        }
    }
    if !results.concurrency.is_empty() {
        let errors = |key: &str, connections: usize| {
            results
                .concurrency
                .iter()
                .find(|l| l.key == key && l.connections == connections)
                .map(|l| l.load.errors)
        };
        let mut levels: Vec<usize> = results.concurrency.iter().map(|l| l.connections).collect();
        levels.dedup();
        let clean: Vec<usize> = levels
            .iter()
            .copied()
            .filter(|&c| errors("native", c) == Some(0))
            .collect();
        let host_failed: Vec<String> = clean
            .iter()
            .filter(|&&c| errors("wasm", c) != Some(0))
            .map(|c| c.to_string())
            .collect();
        row(
            "Exchanges in flight through Envoy: errors where the native server has none".into(),
            if host_failed.is_empty() {
                format!(
                    "0 at {} connections",
                    clean
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                format!("errors at {} connections", host_failed.join(", "))
            },
            "0".into(),
            host_failed.is_empty(),
        );
    }
    if let Some(point) = largest(&results.rss, StreamState::InFlight) {
        row(
            format!(
                "RSS per open stream ({} streams, exchange in flight)",
                point.streams
            ),
            format!("{:.1} KiB", point.per_stream_kib()),
            format!("≤ {TARGET_STREAM_KIB:.0} KiB"),
            point.per_stream_kib() <= TARGET_STREAM_KIB,
        );
    }
    format!(
        "## Targets\n\n| what | measured | target | |\n|---|---|---|---|\n{}\n\n",
        rows.join("\n")
    )
}

/// `process`'s CPU per request at the fixed rate.
fn cpu(scenario: &ScenarioResult, process: &str) -> f64 {
    of_process(&scenario.cpu_us_per_request, process)
}

/// `process`'s CPU per request in the closed loop; 0 where it was not recorded.
fn closed_cpu(scenario: &ScenarioResult, process: &str) -> f64 {
    of_process(&scenario.closed_cpu_us_per_request, process)
}

fn of_process(figures: &[(String, f64)], process: &str) -> f64 {
    figures
        .iter()
        .find(|(p, _)| p == process)
        .map_or(0.0, |(_, us)| *us)
}

/// Whether the setup `key` is measured in the closed loop only.
fn closed_loop_only(key: &str) -> bool {
    super::e2e::SETUPS
        .iter()
        .any(|s| s.key == key && s.closed_loop_only)
}

/// Whether the setup `key` has a plugin calling out.
fn calls_out(key: &str) -> bool {
    super::e2e::SETUPS
        .iter()
        .any(|s| s.key == key && s.calls_out)
}

/// A plugin waiting on the network, over ext_proc and in Envoy's process, beside the same
/// setups without it.
fn calling_out_e2e(results: &Results, md: &mut String) -> anyhow::Result<()> {
    let by_key = |key: &str| results.e2e.iter().find(|s| s.key == key);
    let rows: Vec<&ScenarioResult> = ["wasm", "wasm-call", "in-process", "in-process-call"]
        .into_iter()
        .filter_map(by_key)
        .collect();
    if !rows.iter().any(|s| calls_out(&s.key)) {
        return Ok(());
    }
    writeln!(
        md,
        "### A plugin waiting on the network, in both modes\n\n\
         After the ASM plugin, the `call-out` test fixture: on each request's headers, a GET to \
         the upstream through `wasi:http` (a connection per call), waited for inside the call. \
         Over ext_proc (co) the host waits; in Envoy's process (eo) the request leaves from the \
         module's own thread, the worker serves its other streams meanwhile, and Envoy's \
         scheduler brings the stream back (README, \"Waiting holds no worker\"). Closed loop \
         only (`wrk`, {} connections); the upstream serves the calls too.\n\n\
         | setup | req/s | p50 / p99 ms | CPU µs/req: envoy | ext_proc | upstream | envoy + ext_proc |\n\
         |---|---|---|---|---|---|---|",
        results.e2e_connections
    )?;
    for s in rows {
        let (envoy, host) = (closed_cpu(s, "envoy"), closed_cpu(s, "ext_proc"));
        let has_host = s
            .closed_cpu_us_per_request
            .iter()
            .any(|(p, _)| p == "ext_proc");
        writeln!(
            md,
            "| {} | {:.0} | {:.2} / {:.2} | {:.1} | {} | {:.1} | {:.1} |",
            s.label,
            s.closed.rps,
            s.closed.p50_ms,
            s.closed.p99_ms,
            envoy,
            if has_host {
                format!("{host:.1}")
            } else {
                "-".into()
            },
            closed_cpu(s, "upstream"),
            envoy + host,
        )?;
    }
    md.push('\n');
    Ok(())
}

/// The ASM plugin in each language through Envoy, closed loop: the languages issue's figures.
fn languages_e2e(results: &Results, rust: &ScenarioResult, md: &mut String) -> anyhow::Result<()> {
    let languages: Vec<&ScenarioResult> = results
        .e2e
        .iter()
        .filter(|s| closed_loop_only(&s.key) && !calls_out(&s.key))
        .collect();
    if languages.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "### The plugin's language, end to end\n\n\
         (c) with the ASM plugin built in JavaScript (componentize-js) and Python \
         (componentize-py), fresh per stream (the default) and with `isolation = \"reuse\"`; \
         `memory_limit_mib = 128` and a compilation cache. Closed loop only (`wrk`, {} \
         connections: as many streams in flight), so that these setups do not set the fixed rate \
         for the others. Host RSS: its peak after the run.\n\n\
         With a fresh instance per exchange (the default) both stay far above Rust, and what \
         bounds them is the interpreter starting on a fresh instance, not the handlers: the \
         \"Plugin languages\" table below takes a stream apart in process -- instantiating and \
         dropping (Python's 18 MB image is the bulk of it), the two calls on a reused instance \
         (tens of microseconds), and the rest of a fresh stream, the first calls into a fresh \
         instance, where the engine touches its snapshot's heap for the first time (a `perf` \
         profile of the JavaScript stream puts about a third of that in guest page faults, the \
         rest in the engine's own first-call work). Neither is WASI's wiring: Python built with \
         its WASI imports stubbed out costs the same (the table's last row). Keeping more of the \
         image resident between instances (`linear_memory_keep_resident` at 32 MiB) did not \
         move it either; the QuickJS \
         backend (`jco componentize --backend qjs`, 1.7 MB) cannot serve this contract (its \
         synchronous build returns with a lent handle still open, which the component model \
         forbids). `isolation = \"reuse\"` keeps instances from one exchange to the next, and \
         with it both languages meet their CPU targets; it trades away fresh state per exchange \
         (for plugins that keep none) and holds the idle instances' heaps (the RSS column).\n\n\
         | setup | req/s | host CPU µs/req | ratio to Rust | Envoy CPU µs/req | host peak RSS |\n\
         |---|---|---|---|---|---|",
        results.e2e_connections
    )?;
    for s in std::iter::once(rust).chain(languages) {
        let host = closed_cpu(s, "ext_proc");
        writeln!(
            md,
            "| {} | {:.0} | {:.1} | {:.2}× | {:.1} | {} |",
            s.label,
            s.closed.rps,
            host,
            host / closed_cpu(rust, "ext_proc"),
            closed_cpu(s, "envoy"),
            s.ext_proc_peak_rss_kib
                .map_or("-".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
        )?;
    }
    md.push('\n');
    Ok(())
}

fn e2e_section(
    results: &Results,
    md: &mut String,
    link: &dyn Fn(&str) -> String,
    plots: &Path,
) -> anyhow::Result<()> {
    let processes = ["envoy", "upstream", "ext_proc"];
    writeln!(
        md,
        "## End to end, through Envoy 1.40\n\n\
         The ASM demo's job (`x-ext-proc-header: hello-to-asm` on every request, \
         `hello-from-asm` on every response) done by Envoy alone (a, no header work), its Lua \
         filter (b), this host (c; with four copies of the plugin in the chain, fresh per stream \
         (c4) or reused (c4r); with Envoy streaming response bodies `FULL_DUPLEX_STREAMED` (cf), \
         where the host answers the body chunk its plugin never sees; with tracing on in Envoy and \
         the host (ct), spans going to a stand-in collector in the benchmark's process) and a \
         native Rust ext_proc server (d). Envoy (`--concurrency 1`), the upstream (`bench-upstream`) and the ext_proc \
         server share core 0 (`taskset`); the load generator has core 1. Every Envoy \
         configuration is `deploy/envoy/envoy.yaml`, with the ext_proc filter removed (a), \
         swapped for Lua (b), or pointed at the server measured. Each check request must come \
         back tagged before a setup is measured. {} rounds of {} s per setup and load, setups \
         interleaved within each round; medians.\n\n\
         Closed loop: `wrk` with {} connections, as fast as the setup goes. Fixed rate: `hey` at \
         {} req/s for every setup. CPU: each process's user + system time over the run, per \
         request (at the fixed rate unless the column says closed loop).\n",
        results.e2e_rounds, results.e2e_duration_s, results.e2e_connections, results.fixed_rate
    )?;
    writeln!(
        md,
        "| setup | req/s (closed) | p50 / p99 ms (closed) | p50 / p99 ms ({} req/s) | errors | CPU µs/req: envoy | upstream | ext_proc | total | ext_proc, closed loop |\n|---|---|---|---|---|---|---|---|---|---|",
        results.fixed_rate
    )?;
    // The interpreted plugins' setups, measured in the closed loop only, have a table of their
    // own below.
    let main: Vec<&ScenarioResult> = results
        .e2e
        .iter()
        .filter(|s| !closed_loop_only(&s.key))
        .collect();
    for s in &main {
        let cpus: Vec<f64> = processes.iter().map(|p| cpu(s, p)).collect();
        let has_ext_proc = s.cpu_us_per_request.iter().any(|(p, _)| p == "ext_proc");
        let closed_ext_proc = closed_cpu(s, "ext_proc");
        writeln!(
            md,
            "| {} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {} | {:.1} | {:.1} | {} | {:.1} | {} |",
            s.label,
            s.closed.rps,
            s.closed.p50_ms,
            s.closed.p99_ms,
            s.fixed.p50_ms,
            s.fixed.p99_ms,
            s.closed.errors + s.fixed.errors,
            cpus[0],
            cpus[1],
            if has_ext_proc {
                format!("{:.1}", cpus[2])
            } else {
                "-".into()
            },
            cpus.iter().sum::<f64>(),
            if has_ext_proc && closed_ext_proc > 0.0 {
                format!("{closed_ext_proc:.1}")
            } else {
                "-".into()
            },
        )?;
    }
    let by_key = |key: &str| results.e2e.iter().find(|s| s.key == key);
    if let (Some(wasm), Some(native), Some(envoy), Some(lua)) = (
        by_key("wasm"),
        by_key("native"),
        by_key("envoy"),
        by_key("lua"),
    ) {
        writeln!(
            md,
            "\nRatios: (c)/(d) req/s {:.2}, ext_proc CPU {:.2}, Envoy CPU {:.2}; \
             (c)/(b) req/s {:.2}; (b)/(a) req/s {:.2}.\n",
            wasm.closed.rps / native.closed.rps,
            cpu(wasm, "ext_proc") / cpu(native, "ext_proc"),
            cpu(wasm, "envoy") / cpu(native, "envoy"),
            wasm.closed.rps / lua.closed.rps,
            lua.closed.rps / envoy.closed.rps,
        )?;
        if let Some(module) = by_key("in-process") {
            writeln!(
                md,
                "In Envoy's process the same plugin costs (e) - (a): Envoy {:+.1} µs per request \
                 at the fixed rate, against (b) - (a) = {:+.1} µs for Lua and (c) - (a) = \
                 {:+.1} µs (Envoy) {:+.1} µs (host) over ext_proc. (e)/(b) req/s {:.2}.\n",
                cpu(module, "envoy") - cpu(envoy, "envoy"),
                cpu(lua, "envoy") - cpu(envoy, "envoy"),
                cpu(wasm, "envoy") - cpu(envoy, "envoy"),
                cpu(wasm, "ext_proc"),
                module.closed.rps / lua.closed.rps,
            )?;
        }
        if let Some(traced) = by_key("wasm-traced") {
            writeln!(
                md,
                "Tracing on -- Envoy's OpenTelemetry tracer sampling every request, the host \
                 continuing each trace with a stream span and a span per plugin call, both \
                 exporting over OTLP/gRPC -- costs (ct) - (c): ext_proc {:+.1} µs ({:.2}×), \
                 Envoy {:+.1} µs per request at the fixed rate; (ct)/(c) req/s {:.2}. Tracing \
                 off is (c) itself: the trace call sites are in every build, disabled.\n",
                cpu(traced, "ext_proc") - cpu(wasm, "ext_proc"),
                cpu(traced, "ext_proc") / cpu(wasm, "ext_proc"),
                cpu(traced, "envoy") - cpu(wasm, "envoy"),
                traced.closed.rps / wasm.closed.rps,
            )?;
        }
        if let Some(full_duplex) = by_key("wasm-fd") {
            writeln!(
                md,
                "Answering the response body chunk the plugin never sees, where Envoy streams \
                 bodies `FULL_DUPLEX_STREAMED` (and the host may not close the stream early, \
                 see the README), costs (cf) - (c): ext_proc {:+.1} µs, Envoy {:+.1} µs per \
                 request at the fixed rate.\n",
                cpu(full_duplex, "ext_proc") - cpu(wasm, "ext_proc"),
                cpu(full_duplex, "envoy") - cpu(wasm, "envoy"),
            )?;
        }
    }
    if let Some(rust) = by_key("wasm") {
        languages_e2e(results, rust, md)?;
        calling_out_e2e(results, md)?;
    }
    let names: Vec<String> = main.iter().map(|s| short(&s.key)).collect();
    bar_chart(
        &plots.join("e2e-throughput.svg"),
        "Requests per second, closed loop (higher is better)",
        "req/s",
        &names,
        &[("req/s", main.iter().map(|s| s.closed.rps).collect())],
        false,
    )?;
    bar_chart(
        &plots.join("e2e-cpu.svg"),
        &format!(
            "CPU per request at {} req/s (lower is better)",
            results.fixed_rate
        ),
        "µs per request",
        &names,
        &processes
            .iter()
            .map(|p| (*p, main.iter().map(|s| cpu(s, p)).collect()))
            .collect::<Vec<_>>(),
        true,
    )?;
    bar_chart(
        &plots.join("e2e-latency.svg"),
        &format!("Latency at {} req/s (lower is better)", results.fixed_rate),
        "ms",
        &names,
        &[
            ("p50", main.iter().map(|s| s.fixed.p50_ms).collect()),
            ("p99", main.iter().map(|s| s.fixed.p99_ms).collect()),
        ],
        false,
    )?;
    writeln!(
        md,
        "![throughput]({})\n![CPU per request]({})\n![latency]({})\n",
        link("e2e-throughput.svg"),
        link("e2e-cpu.svg"),
        link("e2e-latency.svg")
    )?;
    Ok(())
}

fn short(key: &str) -> String {
    match key {
        "envoy" => "(a) Envoy alone",
        "lua" => "(b) Lua filter",
        "wasm" => "(c) wasm-extproc",
        "wasm4" => "(c4) 4 plugins",
        "wasm4-reuse" => "(c4r) 4, reused",
        "wasm-fd" => "(cf) full duplex",
        "wasm-traced" => "(ct) traced",
        "native" => "(d) native ext_proc",
        "in-process" => "(e) in-process",
        other => other,
    }
    .to_string()
}

fn micro_section(
    results: &Results,
    md: &mut String,
    link: &dyn Fn(&str) -> String,
    plots: &Path,
) -> anyhow::Result<()> {
    let us = |id: &str| results.micro.get(id).map(|e| e.micros());
    writeln!(
        md,
        "## In process (criterion, `bench/benches/stream.rs`)\n\n\
         One stream's Wasm work for the bundled plugin: instantiate from the pre-linked \
         component (pooling allocator), run both header phases on 12 request and 6 response \
         headers, drop the instance. The bundled plugins build for `wasm32-unknown-unknown` and \
         import nothing from WASI; `asm_demo_wasip2` is the same source built for \
         `wasm32-wasip2`, as a plugin needing WASI would be.\n\n\
         | per stream | median |\n|---|---|"
    )?;
    for (id, what) in [
        ("stream/instantiate", "instantiate + drop, no call"),
        (
            "stream/asm_demo",
            "bundled ASM plugin: instantiate + 2 header phases + drop",
        ),
        (
            "stream/asm_demo_wasip2",
            "the same, built for wasm32-wasip2",
        ),
    ] {
        if let Some(v) = us(id) {
            writeln!(md, "| {what} | {v:.1} µs |")?;
        }
    }
    let series = |group: &str| -> Vec<(f64, f64)> {
        (0..=16)
            .filter_map(|n| us(&format!("{group}/{n}")).map(|v| (n as f64, v)))
            .collect()
    };
    let (chain, reused) = (series("chain"), series("chain_reused"));
    if let Some((slope, intercept)) = chain_fit(&results.micro, "chain") {
        writeln!(
            md,
            "\nThe same exchange through the host's chain (`chain::StreamChain`: breaker, guard, \
             metrics and rollback journal included) with N copies of the plugin, each a fresh \
             instance per stream (the default), and with `isolation = \"reuse\"` (an instance \
             that served a stream serves the next):\n\n\
             | plugins | per stream | per plugin | reused: per stream | per plugin |\n\
             |---|---|---|---|---|"
        )?;
        for (n, v) in &chain {
            let again = reused.iter().find(|(m, _)| m == n).map(|(_, v)| *v);
            writeln!(
                md,
                "| {n} | {v:.1} µs | {:.1} µs | {} | {} |",
                v / n,
                again.map_or("-".into(), |r| format!("{r:.1} µs")),
                again.map_or("-".into(), |r| format!("{:.1} µs", r / n)),
            )?;
        }
        writeln!(
            md,
            "\nLeast-squares fit: {intercept:.1} µs + {slope:.1} µs per plugin{}.\n",
            chain_fit(&results.micro, "chain_reused").map_or(String::new(), |(s, i)| format!(
                "; reused, {i:.1} µs + {s:.1} µs per plugin"
            ))
        )?;
        let mut lines = vec![("fresh instance per stream", chain.clone())];
        if !reused.is_empty() {
            lines.push(("isolation = reuse", reused.clone()));
        }
        lines.push((
            "target: 10 µs + 3 µs per extra plugin",
            chain
                .iter()
                .map(|(n, _)| (*n, TARGET_STREAM_US + TARGET_PER_PLUGIN_US * (n - 1.0)))
                .collect(),
        ));
        line_chart(
            &plots.join("chain.svg"),
            "Cost per stream against chain length",
            "plugins in the chain",
            "µs per stream",
            false,
            &lines,
        )?;
        writeln!(md, "![chain]({})\n", link("chain.svg"))?;
    }
    let body = |mode: &str| -> Vec<(f64, f64, f64)> {
        let prefix = format!("body/{mode}/");
        let mut points: Vec<(f64, f64, f64)> = results
            .micro
            .iter()
            .filter_map(|(id, e)| {
                let size: f64 = id.strip_prefix(&prefix)?.parse().ok()?;
                Some((size, e.micros(), e.mib_per_second()?))
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    let (buffered, streamed) = (body("buffered"), body("streamed"));
    if !buffered.is_empty() {
        writeln!(
            md,
            "Bodies through a plugin that reads each body message and replaces it (the `shout` \
             fixture, upper-casing), sent whole (`BUFFERED`: one message) or in 16 KiB chunks \
             (`STREAMED`), one instance per stream:\n\n\
             | body | BUFFERED | MiB/s | STREAMED | MiB/s |\n|---|---|---|---|---|"
        )?;
        for ((size, b_us, b_rate), (_, s_us, s_rate)) in buffered.iter().zip(&streamed) {
            writeln!(
                md,
                "| {} | {b_us:.1} µs | {b_rate:.0} | {s_us:.1} µs | {s_rate:.0} |",
                human_bytes(*size)
            )?;
        }
        line_chart(
            &plots.join("body.svg"),
            "Body throughput through a plugin",
            "body size (bytes, log scale)",
            "MiB/s",
            true,
            &[
                ("BUFFERED", buffered.iter().map(|p| (p.0, p.2)).collect()),
                ("STREAMED", streamed.iter().map(|p| (p.0, p.2)).collect()),
            ],
        )?;
        writeln!(md, "\n![body throughput]({})\n", link("body.svg"))?;
    }
    Ok(())
}

fn counts_section(results: &Results, md: &mut String) -> anyhow::Result<()> {
    if results.counts.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Work per request: instructions and system calls\n\n\
         What a request costs each process in counts that do not move with the machine's \
         load (`--only counts`, `bench/src/bin/bench/counts.rs`): instructions under \
         callgrind (1,000 requests one at a time after 200 to warm up; the ext_proc server's \
         and the in-process module's instance pools made small enough for valgrind), and \
         system calls under strace (992 requests from 16 connections at 160 req/s). The \
         setups are those of the end-to-end table; \"over (a)\" is Envoy's work beyond \
         Envoy alone's, plus the ext_proc server's. `ioctl` is wasmtime finding the pages an \
         instance dirtied (PAGEMAP_SCAN) when its memory goes back to the pool; \
         `clock_nanosleep` is the epoch ticker, on a clock while plugins run rather than per request. \
         Each process's dump is kept (`target/bench/callgrind/SETUP.PROCESS.callgrind`): \
         `callgrind_annotate` on it says where the instructions went.\n\n\
         | setup | process | instructions | over (a) | system calls | of which |\n\
         |---|---|---|---|---|---|"
    )?;
    let alone = results
        .counts
        .iter()
        .find(|c| c.setup == "envoy" && c.process == "envoy");
    for counted in &results.counts {
        let label = results
            .e2e
            .iter()
            .find(|s| s.key == counted.setup)
            .map_or(counted.setup.clone(), |s| s.label.clone());
        let over = match (counted.process.as_str(), alone) {
            ("envoy", Some(alone)) if counted.setup != "envoy" => format!(
                "{:+.1}k",
                (counted.instructions_per_request - alone.instructions_per_request) / 1e3
            ),
            ("ext_proc", _) => format!("{:+.1}k", counted.instructions_per_request / 1e3),
            _ => "-".into(),
        };
        let calls: Vec<String> = counted
            .syscalls
            .iter()
            .map(|(name, per)| format!("{name} {per:.2}"))
            .collect();
        writeln!(
            md,
            "| {label} | {} | {:.1}k | {over} | {:.2} | {} |",
            counted.process,
            counted.instructions_per_request / 1e3,
            counted.syscalls_per_request,
            calls.join(", "),
        )?;
    }
    md.push('\n');
    if let (Some(off), Some(on)) = (
        ext_proc_counted(results, "wasm"),
        ext_proc_counted(results, "wasm-traced"),
    ) {
        writeln!(
            md,
            "Tracing on, the host runs {:.1}k instructions per request against {:.1}k with it \
             off: {:.2}× (three spans per request, exported over OTLP/gRPC).\n",
            on.instructions_per_request / 1e3,
            off.instructions_per_request / 1e3,
            on.instructions_per_request / off.instructions_per_request
        )?;
    }
    items_table(results, md)
}

/// The ext_proc server's counts in `setup`, if counted.
fn ext_proc_counted<'a>(results: &'a Results, setup: &str) -> Option<&'a Counted> {
    results
        .counts
        .iter()
        .find(|c| c.setup == setup && c.process == "ext_proc")
}

/// The host's and the native server's instructions per request by item, side by side.
fn items_table(results: &Results, md: &mut String) -> anyhow::Result<()> {
    let server =
        |setup: &str| ext_proc_counted(results, setup).filter(|counted| !counted.items.is_empty());
    let (Some(host), Some(native)) = (server("wasm"), server("native")) else {
        return Ok(());
    };
    writeln!(
        md,
        "Where the ext_proc servers' instructions go, per request, from the same dumps \
         (`callgrind_annotate --inclusive=yes`: each item is the work under the functions \
         `bench/src/bin/bench/counts.rs` names for it, none inside another; the rest is the \
         ext_proc protocol, conversions, the chain, futures and allocation). Valgrind counts \
         each byte a `rep stos` or `rep movs` moves as an instruction: glibc's `memset` and \
         `memcpy` of a few KiB (the pool clearing a page of a table or a memory for the next \
         stream) weigh more here than their time does:\n\n\
         | item | host | native server | host - native |\n|---|---|---|---|"
    )?;
    let shown = |count: Option<f64>| count.map_or("-".to_string(), |c| format!("{:.1}k", c / 1e3));
    let mut rest = (
        host.instructions_per_request,
        native.instructions_per_request,
    );
    for ((label, in_host), (_, in_native)) in host.items.iter().zip(&native.items) {
        rest.0 -= in_host.unwrap_or(0.0);
        rest.1 -= in_native.unwrap_or(0.0);
        let difference = in_host.unwrap_or(0.0) - in_native.unwrap_or(0.0);
        writeln!(
            md,
            "| {label} | {} | {} | {:+.1}k |",
            shown(*in_host),
            shown(*in_native),
            difference / 1e3
        )?;
    }
    writeln!(
        md,
        "| the rest | {} | {} | {:+.1}k |\n| **total** | **{}** | **{}** | **{:+.1}k** |\n",
        shown(Some(rest.0)),
        shown(Some(rest.1)),
        (rest.0 - rest.1) / 1e3,
        shown(Some(host.instructions_per_request)),
        shown(Some(native.instructions_per_request)),
        (host.instructions_per_request - native.instructions_per_request) / 1e3
    )?;
    Ok(())
}

fn rss_section(
    results: &Results,
    md: &mut String,
    link: &dyn Fn(&str) -> String,
    plots: &Path,
) -> anyhow::Result<()> {
    if results.rss.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Memory against open streams\n\n\
         The host's RSS (release build, bundled plugin) with N ext_proc streams open at once, \
         over HTTP/2 connections of 100 streams each: with the request headers answered and the \
         response still to come (the plugin's instance is live, as while the upstream works), \
         and opened with no message yet. A fresh host per figure; per stream is the growth \
         over the same host with no stream open.\n\n\
         | streams | in flight: RSS | per stream | opened: RSS | per stream |\n|---|---|---|---|---|"
    )?;
    let series =
        |state| -> Vec<&Point> { results.rss.iter().filter(|p| p.state == state).collect() };
    let (in_flight, opened) = (series(StreamState::InFlight), series(StreamState::Opened));
    for point in &in_flight {
        let other = opened.iter().find(|o| o.streams == point.streams);
        writeln!(
            md,
            "| {} | {:.1} MiB | {:.1} KiB | {} | {} |",
            point.streams,
            point.rss_kib as f64 / 1024.0,
            point.per_stream_kib(),
            other.map_or("-".into(), |o| format!(
                "{:.1} MiB",
                o.rss_kib as f64 / 1024.0
            )),
            other.map_or("-".into(), |o| format!("{:.1} KiB", o.per_stream_kib())),
        )?;
    }
    let to_line = |points: &[&Point]| -> Vec<(f64, f64)> {
        points
            .iter()
            .map(|p| (p.streams as f64, p.rss_kib as f64 / 1024.0))
            .collect()
    };
    line_chart(
        &plots.join("rss.svg"),
        "Host RSS against open streams",
        "open streams (log scale)",
        "RSS, MiB",
        true,
        &[
            (
                "request headers answered, response pending",
                to_line(&in_flight),
            ),
            ("opened, no message yet", to_line(&opened)),
        ],
    )?;
    writeln!(md, "\n![RSS]({})\n", link("rss.svg"))?;
    Ok(())
}

fn concurrency_section(
    results: &Results,
    md: &mut String,
    link: &dyn Fn(&str) -> String,
    plots: &Path,
) -> anyhow::Result<()> {
    if results.concurrency.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Exchanges in flight\n\n\
         N connections through Envoy (pinned as above), opened over 2 s, each sending its next \
         request when the last is answered (`bench/src/bin/hold-load.rs`), to an upstream that \
         answers after 2 s, for {} s each: every connection's exchange holds its ext_proc \
         stream, and the host a plugin instance, while the upstream works. The host runs with its \
         shipped settings (`[runtime] max_instances = 14000`); Envoy's circuit breakers are \
         raised on both clusters and it reaches the upstream over HTTP/2, so that neither \
         Envoy's limits nor its file descriptors (20,000 per process here) are what is \
         measured. Errors are answers other than 200 and requests that got none.\n\n\
         | connections | host: errors | p50 / p99 ms | req/s | peak RSS | native: errors | p50 / p99 ms | req/s | peak RSS |\n\
         |---|---|---|---|---|---|---|---|---|",
        results.e2e_duration_s
    )?;
    let mut levels: Vec<usize> = results.concurrency.iter().map(|l| l.connections).collect();
    levels.dedup();
    let find = |key: &str, c: usize| {
        results
            .concurrency
            .iter()
            .find(|l| l.key == key && l.connections == c)
    };
    let cells = |level: Option<&Level>| match level {
        Some(l) => format!(
            "{} | {:.0} / {:.0} | {:.0} | {:.0} MiB",
            l.load.errors,
            l.load.p50_ms,
            l.load.p99_ms,
            l.load.rps,
            l.peak_rss_kib as f64 / 1024.0
        ),
        None => "- | - | - | -".into(),
    };
    for &c in &levels {
        writeln!(
            md,
            "| {c} | {} | {} |",
            cells(find("wasm", c)),
            cells(find("native", c))
        )?;
    }
    let series = |key: &str, figure: fn(&Level) -> f64| -> Vec<(f64, f64)> {
        levels
            .iter()
            .filter_map(|&c| find(key, c).map(|l| (c as f64, figure(l))))
            .collect()
    };
    line_chart(
        &plots.join("concurrency.svg"),
        "p99 latency against exchanges in flight (upstream: 2 s)",
        "connections (log scale)",
        "p99, ms",
        true,
        &[
            ("wasm-extproc", series("wasm", |l| l.load.p99_ms)),
            ("native server", series("native", |l| l.load.p99_ms)),
        ],
    )?;
    writeln!(
        md,
        "\n![exchanges in flight]({})\n",
        link("concurrency.svg")
    )?;
    Ok(())
}

fn overload_section(results: &Results, md: &mut String) -> anyhow::Result<()> {
    if results.overload.is_empty() {
        return Ok(());
    }
    let rounds = results.overload.iter().map(|r| r.round).max().unwrap_or(0) + 1;
    writeln!(
        md,
        "## Overload\n\n\
         More clients than this machine serves (`bench/src/bin/bench/overload.rs`): Envoy with a \
         worker per core, the upstream and the ext_proc server share both cores, unpinned, \
         the load generator (`hold-load`) pinned to core 1 as above; Envoy's circuit breakers raised as above; the host with its shipped settings \
         and the bundled plugin, alternating with the native server, {rounds} rounds. \
         *slow-upstream*: 3,000 connections opened over 2 s to an upstream that answers after \
         1 s, for 8 s; *closed-loop*: 2,000 connections to an upstream that answers at once, \
         for 10 s; *heavy-plugin*: 1,000 connections to an upstream that answers at once, for \
         10 s, the host's chain ending in a plugin that computes about a millisecond per \
         request (the `slow` test fixture, `cpu:1`), far past what the cores do: the host with \
         its overload policy (new streams refused while work waits Envoy's `message_timeout` \
         for a worker) against the same host never shedding. Failed: answers other than 2xx (an ext_proc message failed) and requests \
         with no answer, summed over the rounds; messages failed by gRPC status in brackets: 4 \
         is Envoy's `message_timeout` (200 ms) expiring, 14 (UNAVAILABLE) what the host's \
         shedding answers but also what Envoy reports for a stream it could not open or that \
         was reset (it appears with shedding off too), 13 an internal error; and, for the host, how \
         many of its streams it shed itself (`refused_total{{reason=\"overload\"}}`, scraped at \
         the end of each run). Message \
         latency: how long Envoy waited for each headers message's answer, from its access log \
         (`ExtProcLoggingInfo`), queueing in the server included; a message that failed counts \
         as slower than any answer (\"failed\" where a percentile falls on one); medians over \
         rounds; req/s: requests completed per second, median; CPU: the ext_proc server's and \
         Envoy's CPU time per request completed, median.\n\n\
         | load | server | failed requests | req/s | messages failed | message p50 | p99 | p99.9 | slowest answer | CPU µs/request: server, Envoy |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    )?;
    for load in overload::LOADS {
        for &server in load.servers {
            let runs: Vec<&Overloaded> = results
                .overload
                .iter()
                .filter(|r| r.load == load.key && r.server == server)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let requests: u64 = runs.iter().map(|r| r.requests).sum();
            let failed: u64 = runs.iter().map(|r| r.failed).sum();
            let messages: u64 = runs
                .iter()
                .map(|r| r.messages.answered + r.messages.failed)
                .sum();
            let failed_messages: u64 = runs.iter().map(|r| r.messages.failed).sum();
            let mut by_status = std::collections::BTreeMap::<u32, u64>::new();
            for run in &runs {
                for (status, count) in &run.messages.failed_by_status {
                    *by_status.entry(*status).or_default() += count;
                }
            }
            let by_status = if by_status.is_empty() {
                String::new()
            } else {
                let each: Vec<String> = by_status
                    .iter()
                    .map(|(status, count)| format!("{status}: {count}"))
                    .collect();
                format!(" [{}]", each.join(", "))
            };
            let shed: Option<u64> = runs.iter().map(|r| r.shed).sum();
            let by_status = match shed {
                Some(shed) => format!("{by_status}; {shed} shed by the host"),
                None => by_status,
            };
            let median_of = |figure: fn(&Overloaded) -> Option<u64>| {
                let mut values: Vec<u64> =
                    runs.iter().map(|r| figure(r).unwrap_or(u64::MAX)).collect();
                values.sort_unstable();
                let middle = values[values.len() / 2];
                overload::millis((middle != u64::MAX).then_some(middle))
            };
            let mut slowest: Vec<u64> = runs.iter().map(|r| r.messages.max_us).collect();
            slowest.sort_unstable();
            let rate = median(
                runs.iter()
                    .map(|r| r.requests as f64 / load.duration.as_secs_f64())
                    .collect(),
            );
            let cpu = |process: &str| {
                median(
                    runs.iter()
                        .filter_map(|r| {
                            r.cpu_us_per_request
                                .iter()
                                .find(|(name, _)| name == process)
                                .map(|(_, us)| *us)
                        })
                        .collect(),
                )
            };
            writeln!(
                md,
                "| {} | {} | {failed} of {requests} ({:.2}%) | {rate:.0} | {failed_messages} of {messages}{by_status} | {} | {} | {} | {:.1} ms | {:.0}, {:.0} |",
                load.key,
                overload::server_label(server),
                100.0 * failed as f64 / requests.max(1) as f64,
                median_of(|r| r.messages.p50_us),
                median_of(|r| r.messages.p99_us),
                median_of(|r| r.messages.p999_us),
                slowest[slowest.len() / 2] as f64 / 1000.0,
                cpu("ext_proc"),
                cpu("envoy"),
            )?;
        }
    }
    md.push('\n');
    Ok(())
}

/// Least-squares line through `group/N` (`chain`, `chain_reused`): (µs per plugin, µs fixed).
fn chain_fit(micro: &Estimates, group: &str) -> Option<(f64, f64)> {
    let points: Vec<(f64, f64)> = (1..=64)
        .filter_map(|n| {
            micro
                .get(&format!("{group}/{n}"))
                .map(|e| (n as f64, e.micros()))
        })
        .collect();
    if points.len() < 2 {
        return None;
    }
    let count = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / count;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / count;
    let covariance: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let variance: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let slope = covariance / variance;
    Some((slope, mean_y - slope * mean_x))
}

fn largest(points: &[Point], state: StreamState) -> Option<&Point> {
    points
        .iter()
        .filter(|p| p.state == state)
        .max_by_key(|p| p.streams)
}

fn human_bytes(bytes: f64) -> String {
    if bytes >= (1 << 20) as f64 {
        format!("{:.0} MiB", bytes / (1 << 20) as f64)
    } else {
        format!("{:.0} KiB", bytes / 1024.0)
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn canvas(path: &Path) -> anyhow::Result<Area<'_>> {
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    Ok(root)
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting: {error}")
}

/// The series' names, top left.
fn legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

/// Bars per category: side by side, or stacked.
fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(&str, Vec<f64>)],
    stacked: bool,
) -> anyhow::Result<()> {
    let root = canvas(path)?;
    let top = (0..categories.len())
        .map(|i| {
            let values = series.iter().map(|(_, v)| v.get(i).copied().unwrap_or(0.0));
            if stacked {
                values.sum::<f64>()
            } else {
                values.fold(0.0, f64::max)
            }
        })
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((0..categories.len()).into_segmented(), 0.0..top.max(1e-9))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => categories.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(plot_error)?;
    let width = chart.plotting_area().dim_in_pixel().0 as f64 / categories.len() as f64;
    let slot = (width * 0.7) / if stacked { 1.0 } else { series.len() as f64 };
    let pad = width * 0.15;
    for (k, (name, values)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let bars = values.iter().enumerate().map(|(i, &v)| {
            let base = if stacked {
                series[..k]
                    .iter()
                    .map(|(_, v)| v.get(i).copied().unwrap_or(0.0))
                    .sum()
            } else {
                0.0
            };
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), base),
                    (SegmentValue::Exact(i + 1), base + v),
                ],
                color.filled(),
            );
            let left = if stacked { pad } else { pad + slot * k as f64 };
            let right = width - left - slot;
            bar.set_margin(0, 0, left.max(0.0) as u32, right.max(0.0) as u32);
            bar
        });
        chart
            .draw_series(bars)
            .map_err(plot_error)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    if series.len() > 1 {
        legend(&mut chart)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Lines with points; `log_x` for sizes and counts that span decades.
fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    log_x: bool,
    series: &[(&str, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let root = canvas(path)?;
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|p| p.0));
    let (low, high) = xs.fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(x), h.max(x)));
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.15;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .draw()
                .map_err(plot_error)?;
            for (k, (name, points)) in series.iter().enumerate() {
                let color = COLORS[k % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        color.stroke_width(2),
                    ))
                    .map_err(plot_error)?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(plot_error)?;
            }
            legend(&mut chart)?;
        }};
    }
    if log_x {
        draw!(
            builder
                .build_cartesian_2d((low..high * 1.5).log_scale(), 0.0..top)
                .map_err(plot_error)?
        );
    } else {
        draw!(
            builder
                .build_cartesian_2d(low - 0.5..high + 0.5, 0.0..top)
                .map_err(plot_error)?
        );
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// What the profiles say about the figures above; see the section's commands to repeat them.
const WHERE_THE_TIME_GOES: &str = "## Where the time goes

### The host's CPU per request, item by item

The release host with the bundled plugin under `wrk -c16` through Envoy (closed loop, pinned as
in the end-to-end runs), before and after the stream path was rebuilt, and the native server
for comparison. Each run's CPU per request is measured from /proc; the split comes from a
`perf record -e cpu-clock --call-graph dwarf` profile of the same setup, each sample attributed
to the first item (in this order) found in its call stack. The profile of the old host
attributes calls made on a fiber less well (unwinding stops at the fiber's stack), so its Wasm
rows are approximate; their sum is not. The same split in instructions, which do not move with
the machine's load, is rerun with every `--only counts` (the items under \"Work per request\"
above).

| item, µs per request | before | after | native server |
|---|---|---|---|
| epoch ticker thread | 1.3 | 0.2 | - |
| instance drop (memory reset: a `PAGEMAP_SCAN` ioctl per instance) | 3.9 | 3.4 | - |
| instantiation | 1.2 | 3.0 | - |
| guest calls, host functions included | 2.0 | 1.0 | - |
| chain: breaker, guard, metrics, rollback | 5.3 | 2.3 | - |
| protobuf decode / encode | 2.4 | 2.3 | 2.2 |
| protocol, conversions, the stream's step | 4.6 | 2.3 | - |
| a task and a channel per stream | 0.4 | 0.4 (hyper's own) | - |
| send: `writev` and TCP (3 writes per request before, 2 after) | 11.7 | 8.6 | 7.7 |
| receive: `recv` and TCP | 0.9 | 0.8 | 0.8 |
| HTTP/2 and gRPC framing | 10.1 | 9.5 | 7.0 |
| wake-ups: epoll, scheduler | 4.1 | 4.1 | 4.1 |
| other (allocator, std) | 0.9 | 0.4 | - |
| **total** | **48.7** | **38.2** | **21.8** |

What changed, and why:

- **Wake-ups.** The epoch ticker woke every millisecond whatever happened. On these virtual
  machines a wake-up costs about 20 µs of CPU: 2% of a core with no traffic at all, and ~16 µs
  per request at 1,200 req/s (with 0.83 of the host's 1.08 context switches per request). It
  now ticks only while a guest call runs, looks every 10 ms otherwise and parks after 100 ms of
  quiet (`runtime/epoch.rs`): 0.04 wake-ups per request under load, none when idle.
- **Frames and syscalls.** Each stream's answers used to travel through a spawned task and a
  channel, so the stream's last answer and its closing trailers went out in separate
  `writev`s; polled by hyper's own task (`futures::stream::unfold` over the stream's state),
  they now leave in one: 2 writes per request, as for the native server (counted with
  `strace -c -f`; before: writev 3.0, ioctl 1.0, clock_nanosleep 0.51 per request; after:
  writev 2.0, ioctl 1.0, clock_nanosleep 0.04). `mode_override` goes out once per stream.
  Closing the stream early then costs nothing measurable: letting Envoy end it instead gave
  37.1 and 38.2 µs against 38.5 and 36.6 µs with the close (two alternating runs each, host
  CPU per request; Envoy 68.8 / 69.9 against 69.6 / 66.2 µs), so the host keeps closing where
  it is safe.
- **Guest entry.** Plugins importing nothing from WASI are instantiated and called directly
  instead of on a fiber per call, and a stream type-checks only the handlers it calls.
- **Allocations.** Header sections keep a journal of changes instead of a copy for rollback;
  the guard checks a call's own changes and hands them to the answer; metric series are
  resolved once per plugin per generation.

### What bounds the rest

- **A fresh instance per plugin per stream** costs about 4.1 µs in process
  (`stream/instantiate`): taking memory, tables and vmctx from the pool and initialising them,
  registering the component's modules with a new store, and at the end restoring the memory
  the guest dirtied (one `PAGEMAP_SCAN` ioctl per memory, ~1.3 µs whatever the memory's size:
  a 64 KiB stack instead of 1 MiB changed nothing) and freeing the store's bookkeeping. This is
  the price of the per-exchange isolation the host promises, and why each extra plugin adds
  about 6 µs in process and 7-9 µs end to end; `isolation = \"reuse\"` removes it
  (1.4 µs per extra plugin) for plugins that keep no state.
- **The gRPC path** (HTTP/2 framing, protobuf, two `writev`s and the wake-ups) is the same
  work the native server does, and is most of what remains on both sides.
- **Envoy** spends about the same per request behind the host as behind the native server
  now; at low rates it spends more per request behind either, as do both servers (less
  batching per wake-up).
";
