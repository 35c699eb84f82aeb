//! The end-to-end half of the benchmark: the ASM demo's job -- `x-ext-proc-header:
//! hello-to-asm` on every request, `hello-from-asm` on every response -- done four ways behind
//! a real Envoy, and loaded with Debian's load generators.
//!
//! - (a) `envoy`: Envoy alone, no header work: the floor every other setup stands on.
//! - (b) `lua`: Envoy's in-process Lua filter: the cheapest way to do the job at all.
//! - (c) `wasm`: Envoy's ext_proc filter -> wasm-extproc with only the bundled ASM plugin.
//! - (c4) `wasm4`: the same with four copies of the plugin in the chain, each a fresh instance
//!   per stream; (c4r) `wasm4-reuse`, the four with `isolation = "reuse"`.
//! - (cf) `wasm-fd`: (c) with Envoy streaming response bodies `FULL_DUPLEX_STREAMED`: the host
//!   answers the body chunk the plugin never sees, where it used to close the stream.
//! - (ct) `wasm-traced`: (c) with tracing on: Envoy's OpenTelemetry tracer samples every
//!   request and the host continues each trace (`[tracing]`), both exporting to a stand-in
//!   collector in the benchmark's process; (ct) minus (c) is what tracing on costs.
//! - (d) `native`: the same filter -> `native-extproc`, the job in plain Rust, so (c) minus (d)
//!   is what the Wasm host costs over writing the server by hand.
//! - (e) `in-process`: the bundled plugin in Envoy's process, through the dynamic module
//!   (`deploy/envoy/envoy-in-process.yaml`): no ext_proc hop, so against (b) it is what the
//!   sandbox costs over Lua.
//!
//! Every Envoy configuration is `deploy/envoy/envoy.yaml`, as operators run it, with the
//! ext_proc filter taken out (a) or swapped for Lua (b), or `deploy/envoy/envoy-in-process.yaml`
//! (e). The servers -- Envoy with one worker,
//! the upstream, the ext_proc server -- share core 0 and the load generator has core 1, so it
//! never competes with what it measures. Only the setup being measured runs: the host's epoch
//! ticker, idle, would otherwise steal from the others. Each round measures the four setups in
//! turn, closed loop first (wrk: as fast as they go), then all at one fixed rate (hey), so a
//! drift on the machine spreads over every setup instead of landing on one; reported figures
//! are medians over rounds. CPU per request is each server's utime+stime over the fixed-rate
//! run divided by the requests completed: at equal load, unlike the closed loop, where the
//! shared core is always full and the sum is just the inverse of the throughput.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use extproc_testkit::envoy::{self, EnvoyConfig};
use extproc_testkit::fixtures::{ASM_DEMO, BUNDLED_TARGET, CALL_OUT, SLOW_BUNDLED, WASI_TARGET};
use extproc_testkit::otlp::Collector;
use extproc_testkit::repo_root;
use serde::{Deserialize, Serialize};

use extproc_testkit::process::{KillOnDrop, wait_until_ready};

use xtask::target_dir;

pub(super) mod load;

use load::{hey, output_of, warm_up, wrk};

/// The core Envoy, the upstream and the ext_proc server share.
const SERVER_CORE: &str = "0";
/// Where a run's Envoy logs its ext_proc messages, in the run's directory.
const MESSAGE_LOG: &str = "messages.log";
/// How long a server may take to listen; Envoy is the slowest, at about a second.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

const TAG_HEADER: &str = "x-ext-proc-header";
const REQUEST_TAG: &str = "hello-to-asm";
const RESPONSE_TAG: &str = "hello-from-asm";
/// Where `bench-upstream` shows the `x-ext-proc-header` it received.
const UPSTREAM_SAW: &str = "x-upstream-saw";

/// The ext_proc filter's entry in `deploy/envoy/envoy.yaml` runs from this line to the
/// router's.
const EXT_PROC_FILTER: &str = "                  - name: envoy.filters.http.ext_proc\n";
const ROUTER_FILTER: &str = "                  - name: envoy.filters.http.router\n";
/// Setup (b): the job in Envoy's own Lua filter, in the ext_proc filter's place.
const LUA_FILTER: &str = r#"                  - name: envoy.filters.http.lua
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
                      default_source_code:
                        inline_string: |
                          function envoy_on_request(request_handle)
                            request_handle:headers():replace("x-ext-proc-header", "hello-to-asm")
                          end
                          function envoy_on_response(response_handle)
                            response_handle:headers():replace("x-ext-proc-header", "hello-from-asm")
                          end
"#;

/// What a load generator measured in one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Load {
    /// Responses received, whatever their status.
    pub requests: u64,
    /// Responses other than 2xx (wrk: other than 2xx or 3xx) and requests that got none.
    pub errors: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One setup's figures: medians over rounds, and every round as measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// `envoy`, `lua`, `wasm`, `wasm4`, `wasm4-reuse`, `wasm-fd`, `wasm-traced`, `native` or
    /// `in-process`.
    pub key: String,
    pub label: String,
    /// Closed loop (wrk).
    pub closed: Load,
    /// At the fixed rate, the same for every setup (hey).
    pub fixed: Load,
    /// Per server process (`envoy`, `upstream`, `ext_proc` where there is one): CPU time in
    /// µs per request completed, over the fixed-rate run.
    pub cpu_us_per_request: Vec<(String, f64)>,
    /// The same over the closed-loop run.
    #[serde(default)]
    pub closed_cpu_us_per_request: Vec<(String, f64)>,
    /// The ext_proc server's peak resident set after the closed-loop run, KiB.
    #[serde(default)]
    pub ext_proc_peak_rss_kib: Option<u64>,
    pub rounds: Vec<RoundResult>,
}

/// One round of one setup, as measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundResult {
    pub closed: Load,
    pub fixed: Load,
    pub cpu_us_per_request: Vec<(String, f64)>,
    #[serde(default)]
    pub closed_cpu_us_per_request: Vec<(String, f64)>,
    #[serde(default)]
    pub ext_proc_peak_rss_kib: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Length of each measured run.
    pub duration: Duration,
    pub rounds: usize,
    /// wrk's connections, and hey's workers (each with a connection of its own).
    pub connections: usize,
    /// Requests per second for the fixed-rate runs; `None`: half the slowest setup's
    /// closed-loop throughput in the first round.
    pub fixed_rate: Option<u64>,
}

/// Measures the four setups; returns their figures in the order (a) to (d), and the fixed
/// rate used, in requests per second.
pub fn run(options: &Options) -> anyhow::Result<(Vec<ScenarioResult>, u64)> {
    if options.rounds == 0 || options.connections == 0 || options.duration.as_secs() == 0 {
        bail!("the benchmark needs at least one round, one connection and a duration of 1 s");
    }
    let binaries = Binaries::find(MEASURED_PROFILE)?;
    let tick_us = 1e6 / clock_ticks_per_second()?;
    let mut fixed_rate = options.fixed_rate;
    let mut rounds: Vec<Vec<RoundResult>> = SETUPS.iter().map(|_| Vec::new()).collect();
    for round in 1..=options.rounds {
        let mut closed = Vec::new();
        for setup in &SETUPS {
            let running = Running::start(setup, &binaries)?;
            let (load, cpu) =
                running.measure(options, tick_us, || wrk(running.listener, options))?;
            progress(round, options.rounds, setup, "closed loop", &load, &cpu);
            let rss = running.peak_rss_kib("ext_proc").ok();
            closed.push((load, cpu, rss));
        }
        let rate = *fixed_rate.get_or_insert_with(|| {
            let rate = default_fixed_rate(
                SETUPS
                    .iter()
                    .zip(&closed)
                    .filter(|(setup, _)| !setup.closed_loop_only)
                    .map(|(_, (load, _, _))| load.rps),
            );
            eprintln!("bench: fixed rate for every setup: {rate} req/s");
            rate
        });
        for ((setup, (closed, closed_cpu, rss)), rounds) in
            SETUPS.iter().zip(closed).zip(&mut rounds)
        {
            if setup.closed_loop_only {
                rounds.push(RoundResult {
                    fixed: closed.clone(),
                    cpu_us_per_request: closed_cpu.clone(),
                    closed,
                    closed_cpu_us_per_request: closed_cpu,
                    ext_proc_peak_rss_kib: rss,
                });
                continue;
            }
            let running = Running::start(setup, &binaries)?;
            let (fixed, cpu_us_per_request) =
                running.measure(options, tick_us, || hey(running.listener, rate, options))?;
            progress(
                round,
                options.rounds,
                setup,
                "fixed rate",
                &fixed,
                &cpu_us_per_request,
            );
            rounds.push(RoundResult {
                closed,
                fixed,
                cpu_us_per_request,
                closed_cpu_us_per_request: closed_cpu,
                ext_proc_peak_rss_kib: rss,
            });
        }
    }
    let results = SETUPS
        .iter()
        .zip(rounds)
        .map(|(setup, rounds)| ScenarioResult {
            key: setup.key.into(),
            label: setup.label.into(),
            closed: Load::median(rounds.iter().map(|r| &r.closed)),
            fixed: Load::median(rounds.iter().map(|r| &r.fixed)),
            cpu_us_per_request: median_per_process(&rounds, |r| &r.cpu_us_per_request),
            closed_cpu_us_per_request: median_per_process(&rounds, |r| {
                &r.closed_cpu_us_per_request
            }),
            ext_proc_peak_rss_kib: {
                let peaks: Vec<f64> = rounds
                    .iter()
                    .filter_map(|r| r.ext_proc_peak_rss_kib)
                    .map(|k| k as f64)
                    .collect();
                (!peaks.is_empty()).then(|| median(peaks) as u64)
            },
            rounds,
        })
        .collect();
    Ok((results, fixed_rate.expect("set in the first round")))
}

/// One way of doing the job.
#[derive(Debug)]
pub(super) struct Setup {
    pub(super) key: &'static str,
    label: &'static str,
    filter: Filter,
    /// Envoy streams response bodies to the processor `FULL_DUPLEX_STREAMED`.
    full_duplex_response: bool,
    /// Envoy traces every request and the host exports its spans, to a [`SpanSink`].
    traced: bool,
    /// Measured in the closed loop only: a setup far slower than the others (an interpreted
    /// plugin) would set the fixed rate for all of them.
    pub(super) closed_loop_only: bool,
    /// After the ASM plugin, one that calls out on each request's headers (the `call-out`
    /// test fixture: a GET to the upstream, through `wasi:http`), waiting on the network
    /// inside its call.
    pub(super) calls_out: bool,
}

/// What stands in Envoy's filter chain before the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    Nothing,
    Lua,
    ExtProc(Processor),
    /// The bundled plugin in Envoy, through the dynamic module.
    InProcess,
}

/// The ext_proc server behind the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Processor {
    /// wasm-extproc with this many copies of the ASM plugin, built in `language`.
    Wasm {
        plugins: usize,
        reuse: bool,
        language: Language,
    },
    Native,
}

/// The language the ASM plugin is built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Language {
    /// The bundled plugin.
    Rust,
    /// `plugins/examples/javascript/asm-demo.js` (componentize-js).
    JavaScript,
    /// `plugins/examples/python/asm_demo.py` (componentize-py).
    Python,
}

impl Language {
    /// The component, as the build leaves it.
    fn component(self, binaries: &Binaries) -> anyhow::Result<PathBuf> {
        let name = match self {
            Language::Rust => return Ok(binaries.asm_plugin.clone()),
            Language::JavaScript => "asm_demo_js",
            Language::Python => "asm_demo_py",
        };
        built(
            target_dir()
                .join(WASI_TARGET)
                .join("release")
                .join(format!("{name}.wasm")),
            "cargo xtask build-plugins",
        )
    }
}

/// The ASM plugin, fresh per stream or reused, in `language`: measured in the closed loop.
const fn interpreted(
    key: &'static str,
    label: &'static str,
    language: Language,
    reuse: bool,
) -> Setup {
    Setup {
        key,
        label,
        filter: Filter::ExtProc(Processor::Wasm {
            plugins: 1,
            reuse,
            language,
        }),
        full_duplex_response: false,
        traced: false,
        closed_loop_only: true,
        calls_out: false,
    }
}

/// The ASM plugin and, after it, the plugin that calls out: measured in the closed loop.
const fn calling_out(key: &'static str, label: &'static str, filter: Filter) -> Setup {
    Setup {
        key,
        label,
        filter,
        full_duplex_response: false,
        traced: false,
        closed_loop_only: true,
        calls_out: true,
    }
}

pub(super) static SETUPS: [Setup; 15] = [
    Setup {
        key: "envoy",
        label: "(a) Envoy alone, no header work",
        filter: Filter::Nothing,
        full_duplex_response: false,
        traced: false,
        closed_loop_only: false,
        calls_out: false,
    },
    Setup {
        key: "lua",
        label: "(b) Envoy's in-process Lua filter",
        filter: Filter::Lua,
        full_duplex_response: false,
        traced: false,
        closed_loop_only: false,
        calls_out: false,
    },
    Setup {
        key: "wasm",
        label: "(c) ext_proc -> wasm-extproc + ASM plugin",
        filter: Filter::ExtProc(Processor::Wasm {
            plugins: 1,
            reuse: false,
            language: Language::Rust,
        }),
        full_duplex_response: false,
        traced: false,
        closed_loop_only: false,
        calls_out: false,
    },
    Setup {
        key: "wasm4",
        label: "(c4) wasm-extproc, 4 plugins in the chain",
        filter: Filter::ExtProc(Processor::Wasm {
            plugins: 4,
            reuse: false,
            language: Language::Rust,
        }),
        full_duplex_response: false,
        traced: false,
        closed_loop_only: false,
        calls_out: false,
    },
    Setup {
        key: "wasm4-reuse",
        label: "(c4r) wasm-extproc, 4 plugins, isolation = reuse",
        filter: Filter::ExtProc(Processor::Wasm {
            plugins: 4,
            reuse: true,
            language: Language::Rust,
        }),
        full_duplex_response: false,
        traced: false,
        closed_loop_only: false,
        calls_out: false,
    },
    Setup {
        key: "wasm-fd",
        label: "(cf) wasm-extproc + ASM, FULL_DUPLEX_STREAMED response bodies",
        filter: Filter::ExtProc(Processor::Wasm {
            plugins: 1,
            reuse: false,
            language: Language::Rust,
        }),
        full_duplex_response: true,
        traced: false,
        closed_loop_only: false,
        calls_out: false,
    },
    Setup {
        key: "wasm-traced",
        label: "(ct) wasm-extproc + ASM, traced (Envoy and host export spans)",
        filter: Filter::ExtProc(Processor::Wasm {
            plugins: 1,
            reuse: false,
            language: Language::Rust,
        }),
        full_duplex_response: false,
        traced: true,
        closed_loop_only: false,
        calls_out: false,
    },
    Setup {
        key: "native",
        label: "(d) ext_proc -> native Rust server",
        filter: Filter::ExtProc(Processor::Native),
        full_duplex_response: false,
        traced: false,
        closed_loop_only: false,
        calls_out: false,
    },
    Setup {
        key: "in-process",
        label: "(e) wasm-extproc in Envoy's process + ASM plugin",
        filter: Filter::InProcess,
        full_duplex_response: false,
        traced: false,
        closed_loop_only: false,
        calls_out: false,
    },
    // A plugin that waits on the network: an outbound GET per request, in both modes. Each
    // call opens a connection of its own, so these are far slower than the others: measured
    // in the closed loop only.
    calling_out(
        "wasm-call",
        "(co) wasm-extproc + ASM + a plugin calling out (a GET per request)",
        Filter::ExtProc(Processor::Wasm {
            plugins: 1,
            reuse: false,
            language: Language::Rust,
        }),
    ),
    calling_out(
        "in-process-call",
        "(eo) in Envoy's process: ASM + a plugin calling out (a GET per request)",
        Filter::InProcess,
    ),
    interpreted(
        "wasm-js",
        "(cj) wasm-extproc + the ASM plugin in JavaScript",
        Language::JavaScript,
        false,
    ),
    interpreted(
        "wasm-js-reuse",
        "(cjr) wasm-extproc + JavaScript, isolation = reuse",
        Language::JavaScript,
        true,
    ),
    interpreted(
        "wasm-py",
        "(cp) wasm-extproc + the ASM plugin in Python",
        Language::Python,
        false,
    ),
    interpreted(
        "wasm-py-reuse",
        "(cpr) wasm-extproc + Python, isolation = reuse",
        Language::Python,
        true,
    ),
];

impl Setup {
    /// Whether requests and responses come back tagged.
    fn tags(&self) -> bool {
        self.filter != Filter::Nothing
    }

    /// `deploy/envoy/envoy.yaml`, with the ext_proc filter kept, removed or replaced; or
    /// `deploy/envoy/envoy-in-process.yaml` with the plugins in `plugins`.
    fn envoy_config(&self, plugins: &Path, module_toml: &str) -> anyhow::Result<EnvoyConfig> {
        let config = EnvoyConfig::default();
        if self.filter == Filter::InProcess {
            return Ok(config.in_process(plugins, module_toml));
        }
        if let Filter::ExtProc(_) = self.filter {
            if self.full_duplex_response {
                return Ok(config
                    .mode("response_body_mode", "FULL_DUPLEX_STREAMED")
                    .mode("response_trailer_mode", "SEND"));
            }
            return Ok(config);
        }
        let path = repo_root().join("deploy/envoy/envoy.yaml");
        let yaml = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let filter = ext_proc_filter(&yaml)
            .with_context(|| format!("{} has no ext_proc filter", path.display()))?;
        let replacement = if self.filter == Filter::Lua {
            LUA_FILTER
        } else {
            ""
        };
        Ok(config.edit(filter, replacement))
    }
}

/// The ext_proc filter's entry in an Envoy configuration: its `- name:` line up to the router's.
fn ext_proc_filter(yaml: &str) -> Option<&str> {
    let start = yaml.find(EXT_PROC_FILTER)?;
    let length = yaml[start..].find(ROUTER_FILTER)?;
    Some(&yaml[start..start + length])
}

/// The programs the benchmark runs, found before anything starts.
#[derive(Debug)]
pub(super) struct Binaries {
    envoy: PathBuf,
    wasm_extproc: PathBuf,
    asm_plugin: PathBuf,
    native_extproc: PathBuf,
    upstream: PathBuf,
    /// The in-process module, `libwasm_extproc_module.so`.
    module: PathBuf,
    /// The load that holds many exchanges in flight (concurrency runs).
    pub(super) hold_load: PathBuf,
}

/// The cargo profile the benchmarks measure: what the image ships.
pub const MEASURED_PROFILE: &str = "dist";

impl Binaries {
    /// The binaries cargo built in `profile` (its directory under the target directory); the
    /// host and the module from elsewhere if `WASM_EXTPROC_BIN` or `WASM_EXTPROC_MODULE_DIR`
    /// say so, to measure another build of them against the same baselines.
    pub(super) fn find(profile: &str) -> anyhow::Result<Binaries> {
        let release = target_dir().join(profile);
        let build = |package: &str| format!("cargo build --profile {profile} -p {package}");
        let module_dir = std::env::var_os("WASM_EXTPROC_MODULE_DIR")
            .map_or_else(|| release.clone(), PathBuf::from);
        Ok(Binaries {
            envoy: envoy::binary(),
            wasm_extproc: match std::env::var_os("WASM_EXTPROC_BIN") {
                Some(path) if Path::new(&path).is_file() => PathBuf::from(path),
                Some(path) => bail!("WASM_EXTPROC_BIN: {} is no file", path.display()),
                None => built(release.join("wasm-extproc"), &build("wasm-extproc"))?,
            },
            // As the container image ships it (deploy/build.sh).
            asm_plugin: built(
                target_dir()
                    .join(BUNDLED_TARGET)
                    .join("release")
                    .join(format!("{}.wasm", ASM_DEMO.name())),
                "cargo xtask build-plugins",
            )?,
            native_extproc: built(release.join("native-extproc"), &build("extproc-bench"))?,
            upstream: built(release.join("bench-upstream"), &build("extproc-bench"))?,
            hold_load: built(release.join("hold-load"), &build("extproc-bench"))?,
            // Checked by the setups that load it (`Binaries::module_dir`): the concurrency
            // check in `cargo xtask test` runs without it.
            module: module_dir.join("libwasm_extproc_module.so"),
        })
    }

    /// The directory holding the in-process module, for `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`.
    fn module_dir(&self) -> anyhow::Result<&Path> {
        let dir = self.module.parent().expect("a file has a directory");
        let profile = dir.file_name().unwrap_or_default().to_string_lossy();
        built(
            self.module.clone(),
            &format!("cargo build --profile {profile} -p wasm-extproc-module"),
        )?;
        Ok(self.module.parent().expect("a file has a directory"))
    }
}

/// valgrind's callgrind, following the exec of Envoy's launcher into its binary, seeing the
/// code wasmtime compiles into anonymous memory, and writing function names in full into every
/// dump (a dump after the counters were zeroed then reads on its own in `callgrind_annotate`).
const CALLGRIND: [&str; 5] = [
    "valgrind",
    "--tool=callgrind",
    "--trace-children=yes",
    "--smc-check=all-non-file",
    "--compress-strings=no",
];

/// Where callgrind writes the profiles of server `name` (`%p`: its pid; dumps add `.N`).
pub(super) fn callgrind_out(dir: &Path, name: &str) -> String {
    format!("{}/{name}.%p.callgrind", dir.display())
}

/// `path` if it exists, or an error saying which command builds it.
fn built(path: PathBuf, how: &str) -> anyhow::Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(anyhow::anyhow!(
            "{} is missing: build it with `{how}`",
            path.display()
        ))
    }
}

/// A server process on the servers' core, its stderr in a file; killed when dropped.
struct Server {
    name: &'static str,
    process: KillOnDrop,
    log: PathBuf,
}

impl Server {
    /// Starts `program` under `taskset` (which execs it, so the pid is the server's own).
    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[&str],
        dir: &Path,
    ) -> anyhow::Result<Server> {
        Self::spawn_with(name, program, args, dir, &[], Variation::default())
    }

    /// [`spawn`](Self::spawn), with `env` set, on the cores `variation` gives the servers, and
    /// under callgrind if it says so (the profiles in `dir`, named after the server and the
    /// pid).
    fn spawn_with(
        name: &'static str,
        program: &Path,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &Path)],
        variation: Variation,
    ) -> anyhow::Result<Server> {
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new("taskset");
        command.args(["-c", &variation.server_cores()]);
        let callgrind = variation.under_callgrind;
        if callgrind {
            command
                .args(CALLGRIND)
                .arg(format!("--callgrind-out-file={}", callgrind_out(dir, name)));
        }
        let child = command
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {} under taskset", program.display()))?;
        Ok(Server {
            name,
            process: KillOnDrop(child),
            log,
        })
    }

    fn wait_listening(&mut self, address: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while TcpStream::connect(address).is_err() {
            if let Some(status) = self.process.0.try_wait()? {
                bail!("{} exited with {status}: {}", self.name, self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {address} within {STARTUP_TIMEOUT:?}: {}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// utime + stime so far, in clock ticks.
    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/stat", self.process.0.id());
        let stat =
            std::fs::read_to_string(&path).with_context(|| format!("{} is gone", self.name))?;
        parse_cpu_ticks(&stat)
            .with_context(|| format!("cannot read utime and stime from {path}: {stat}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A setup's servers, running; stopped when dropped.
pub(super) struct Running {
    setup: &'static Setup,
    /// Envoy's listener.
    pub(super) listener: SocketAddr,
    /// Envoy, the upstream, and the ext_proc server if the setup has one.
    servers: Vec<Server>,
    /// Where a traced setup's spans go.
    sink: Option<SpanSink>,
    /// The host's admin listener, in the setups that run the host.
    host_admin: Option<SocketAddr>,
    dir: tempfile::TempDir,
}

/// How a run departs from the plain end-to-end setup.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Variation {
    /// How long the upstream takes to answer: exchanges stay in flight meanwhile.
    pub upstream_delay: Duration,
    /// Envoy reaches the upstream over HTTP/2 with its circuit breakers raised, so that
    /// thousands of requests in flight need neither thousands of connections nor trip
    /// Envoy's default limit of 1,024.
    pub many_in_flight: bool,
    /// Envoy and the ext_proc server run under callgrind (`--trace-children`: Envoy's
    /// launcher execs the binary), with instance pools small enough for valgrind's address
    /// space.
    pub under_callgrind: bool,
    /// The servers share every core, Envoy with a worker per core, instead of core 0 with
    /// one: the machine saturated as a node is, not one core measured.
    pub all_cores: bool,
    /// Envoy logs each request's status and its ext_proc messages' round trips
    /// ([`MESSAGE_LOG_FORMAT`]) to [`Running::message_log`].
    pub message_log: bool,
    /// After the host's plugins, one that computes this many million loop iterations on each
    /// request's headers, holding its worker (the `slow` test fixture, built for the bundled
    /// plugins' target).
    pub heavy_plugin: Option<u32>,
    /// The host's `[overload] shed_after_ms`, if not its default (0: never shed).
    pub shed_after_ms: Option<u64>,
}

impl Variation {
    /// The cores the servers run on, as taskset takes them.
    fn server_cores(self) -> String {
        if self.all_cores {
            format!("0-{}", envoy_workers(self) - 1)
        } else {
            SERVER_CORE.to_string()
        }
    }
}

/// Envoy's workers: one, or one per core.
fn envoy_workers(variation: Variation) -> usize {
    if variation.all_cores {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        1
    }
}

/// The access log line of [`Variation::message_log`]: the response's status, then, for the
/// request's and the response's headers message, how long Envoy waited for the answer (µs)
/// and the gRPC status of the call, `-` where there was none (ext_proc's filter state,
/// `ExtProcLoggingInfo`).
pub(super) const MESSAGE_LOG_FORMAT: &str = "%RESPONSE_CODE% \
    %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_header_latency_us)% \
    %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_header_call_status)% \
    %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:response_header_latency_us)% \
    %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:response_header_call_status)%";

/// Under callgrind, code runs some fifty times slower: plugins' budgets (a `[defaults]` line)
/// and Envoy's wait for each answer grow to match; instance pools shrink (`[runtime]` lines)
/// to fit valgrind's address space, where each instance reserves gigabytes.
const CALLGRIND_PLUGIN_TIMEOUT: &str = "timeout_ms = 5000\n";
const CALLGRIND_POOL: &str = "max_instances = 4\nmax_wasi_instances = 1\n";
const CALLGRIND_MESSAGE_TIMEOUT: (&str, &str) = ("message_timeout: 0.2s", "message_timeout: 20s");
const CALLGRIND_ENVOY: &str = "[envoy]\nmessage_timeout_ms = 20000\n";

/// The line of the deploy file's listener before its filters.
const FILTER_CHAINS: &str = "      filter_chains:\n";
/// A line of the deploy file's upstream cluster, where its circuit breakers go.
const UPSTREAM_BUFFER_LIMIT: &str =
    "      # The same limit for response bodies held in BUFFERED mode.\n";
/// Circuit breakers for the upstream cluster in the concurrency runs (the ext_proc cluster has
/// its own in the deploy file).
const UPSTREAM_FOR_MANY: &str = "      circuit_breakers:
        thresholds:
          - priority: DEFAULT
            max_requests: 100000
            max_pending_requests: 100000
";

impl Running {
    /// Starts the upstream, the ext_proc server and Envoy, and checks that a request through
    /// them is tagged as the setup promises.
    fn start(setup: &'static Setup, binaries: &Binaries) -> anyhow::Result<Running> {
        Self::start_with(setup, binaries, Variation::default())
    }

    /// [`start`](Self::start), varied.
    pub(super) fn start_with(
        setup: &'static Setup,
        binaries: &Binaries,
        variation: Variation,
    ) -> anyhow::Result<Running> {
        let dir = tempfile::tempdir()?;
        let upstream_address = loopback(free_port()?);
        let delay = variation.upstream_delay.as_millis().to_string();
        let mut upstream = Server::spawn(
            "upstream",
            &binaries.upstream,
            &[
                "--listen",
                &upstream_address.to_string(),
                "--delay-ms",
                &delay,
            ],
            dir.path(),
        )?;
        upstream.wait_listening(upstream_address)?;

        let sink = setup.traced.then(SpanSink::start).transpose()?;
        // Setups without ext_proc still render the file's ext_proc cluster; nothing listens there.
        let ext_proc_address = loopback(free_port()?);
        let listen = ext_proc_address.to_string();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins)?;
        if setup.filter == Filter::InProcess {
            std::fs::copy(&binaries.asm_plugin, plugins.join("10-asm-demo.wasm"))?;
        }
        // The settings of the plugin that calls out, in either mode.
        let mut call_out = String::new();
        if setup.calls_out {
            std::fs::copy(CALL_OUT.path(), plugins.join("20-call-out.wasm"))?;
            call_out = format!(
                "[plugins.20-call-out]\nconfig = \"http://{upstream_address}/\"\n\
                 http_allow = [\"http://{upstream_address}\"]\ntimeout_ms = 100\n"
            );
        }
        let mut host_admin = None;
        let ext_proc = match setup.filter {
            Filter::ExtProc(Processor::Wasm {
                plugins: count,
                reuse,
                language,
            }) => {
                let component = language.component(binaries)?;
                for i in 0..count {
                    let file = plugins.join(format!("{}-asm-demo.wasm", 10 + i));
                    std::fs::copy(&component, file)?;
                }
                let config = dir.path().join("host.toml");
                let isolation = if reuse { "reuse" } else { "exchange" };
                let mut defaults = format!("isolation = \"{isolation}\"\n");
                let mut runtime = String::new();
                if language != Language::Rust {
                    // An interpreter's heap lives in the instance's memory (plugins/README.md);
                    // compiled code is kept across the rounds' restarts, as an operator's
                    // cache_dir keeps it across a pod's.
                    let cache = target_dir().join("bench/compile-cache");
                    defaults += "memory_limit_mib = 128\n";
                    runtime += &format!("cache_dir = {:?}\n", cache.display().to_string());
                }
                if variation.under_callgrind {
                    defaults += CALLGRIND_PLUGIN_TIMEOUT;
                    runtime += CALLGRIND_POOL;
                }
                let mut toml = format!("[defaults]\n{defaults}[runtime]\n{runtime}{call_out}");
                if let Some(millions) = variation.heavy_plugin {
                    std::fs::copy(SLOW_BUNDLED.path(), plugins.join("90-slow.wasm"))?;
                    toml += &format!(
                        "[plugins.90-slow]\nconfig = \"cpu:{millions}\"\ntimeout_ms = 100\n"
                    );
                }
                if let Some(ms) = variation.shed_after_ms {
                    toml += &format!("[overload]\nshed_after_ms = {ms}\n");
                }
                if variation.under_callgrind {
                    toml += CALLGRIND_ENVOY;
                }
                if let Some(sink) = &sink {
                    toml += &format!("[tracing]\notlp_endpoint = \"http://{}\"\n", sink.address);
                }
                std::fs::write(&config, toml)?;
                let admin = loopback(free_port()?);
                let mut host = Server::spawn_with(
                    "ext_proc",
                    &binaries.wasm_extproc,
                    &[
                        "--config",
                        &config.to_string_lossy(),
                        "--listen",
                        &listen,
                        "--admin-listen",
                        &admin.to_string(),
                        "--plugins-dir",
                        &plugins.to_string_lossy(),
                    ],
                    dir.path(),
                    &[],
                    variation,
                )?;
                wait_until_ready(admin, &mut host.process.0).with_context(|| host.log())?;
                host_admin = Some(admin);
                Some(host)
            }
            Filter::ExtProc(Processor::Native) => {
                let mut native = Server::spawn_with(
                    "ext_proc",
                    &binaries.native_extproc,
                    &["--listen", &listen],
                    dir.path(),
                    &[],
                    variation,
                )?;
                native.wait_listening(ext_proc_address)?;
                Some(native)
            }
            Filter::Nothing | Filter::Lua | Filter::InProcess => None,
        };

        let listener = loopback(free_port()?);
        let mut module_toml = if variation.under_callgrind {
            format!("[defaults]\n{CALLGRIND_PLUGIN_TIMEOUT}[runtime]\n{CALLGRIND_POOL}")
        } else {
            String::new()
        };
        module_toml += &call_out;
        let mut envoy_config = setup.envoy_config(&plugins, &module_toml)?;
        if variation.under_callgrind && matches!(setup.filter, Filter::ExtProc(_)) {
            let (from, to) = CALLGRIND_MESSAGE_TIMEOUT;
            envoy_config = envoy_config.edit(from, to);
        }
        if let Some(sink) = &sink {
            envoy_config = envoy_config.traced(sink.address);
        }
        if variation.message_log {
            envoy_config =
                envoy_config.access_log_as(&dir.path().join(MESSAGE_LOG), MESSAGE_LOG_FORMAT);
        }
        if variation.many_in_flight {
            envoy_config = envoy_config
                .upstream_http2()
                .edit(
                    UPSTREAM_BUFFER_LIMIT,
                    &format!("{UPSTREAM_FOR_MANY}{UPSTREAM_BUFFER_LIMIT}"),
                )
                // Thousands of clients connect at once: a longer accept queue than 128.
                .edit(
                    FILTER_CHAINS,
                    &format!("      tcp_backlog_size: 16384\n{FILTER_CHAINS}"),
                );
        }
        let config = envoy_config.render(
            listener.port(),
            ext_proc_address,
            upstream_address,
            free_port()?,
        )?;
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config)?;
        let module_search_path = match setup.filter {
            Filter::InProcess => {
                vec![("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", binaries.module_dir()?)]
            }
            _ => vec![],
        };
        let workers = envoy_workers(variation).to_string();
        let mut envoy = Server::spawn_with(
            "envoy",
            &binaries.envoy,
            &[
                "-c",
                &config_path.to_string_lossy(),
                "--concurrency",
                &workers,
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ],
            dir.path(),
            &module_search_path,
            variation,
        )?;
        envoy
            .wait_listening(listener)
            .context("Envoy is installed by `cargo xtask setup`")?;

        let running = Running {
            setup,
            listener,
            servers: [envoy, upstream].into_iter().chain(ext_proc).collect(),
            sink,
            host_admin,
            dir,
        };
        running.check()?;
        Ok(running)
    }

    /// One request through Envoy: 200, and tagged both ways unless the setup does no header
    /// work, in which case not at all.
    fn check(&self) -> anyhow::Result<()> {
        let response = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(envoy::request(self.listener, "GET", "/", &[], Vec::new()))
            .with_context(|| format!("{}: no answer through Envoy", self.setup.key))?;
        let expected = |tag: &'static str| if self.setup.tags() { vec![tag] } else { vec![] };
        let saw = response.header_values(UPSTREAM_SAW);
        let tagged = response.header_values(TAG_HEADER);
        if response.status != 200
            || saw != expected(REQUEST_TAG)
            || tagged != expected(RESPONSE_TAG)
        {
            bail!(
                "{}: GET / through Envoy answered {} with {UPSTREAM_SAW} {saw:?} and \
                 {TAG_HEADER} {tagged:?}; expected 200 with {:?} and {:?}",
                self.setup.label,
                response.status,
                expected(REQUEST_TAG),
                expected(RESPONSE_TAG),
            );
        }
        if let Some(sink) = &self.sink {
            sink.wait_for_both()
                .with_context(|| format!("{}: {}", self.setup.label, self.logs()))?;
        }
        Ok(())
    }

    /// Every server's log.
    pub(super) fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|server| format!("{}: {}", server.name, server.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Warms the setup up, then runs `load` and counts each server's CPU time over it.
    fn measure(
        &self,
        options: &Options,
        tick_us: f64,
        load: impl FnOnce() -> anyhow::Result<Load>,
    ) -> anyhow::Result<(Load, Vec<(String, f64)>)> {
        warm_up(self.listener, options)?;
        let (load, cpu) = self.cpu_over(tick_us, load)?;
        let cpu = cpu
            .into_iter()
            .map(|(name, us)| (name, us / load.requests.max(1) as f64))
            .collect();
        Ok((load, cpu))
    }

    /// Runs `load`; each server's CPU time (utime + stime) over it, µs, `tick_us` a clock tick.
    pub(super) fn cpu_over<T>(
        &self,
        tick_us: f64,
        load: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, Vec<(String, f64)>)> {
        let before = self.cpu_ticks()?;
        let measured = load()?;
        let after = self.cpu_ticks()?;
        let cpu = self
            .servers
            .iter()
            .zip(before.into_iter().zip(after))
            .map(|(server, (before, after))| {
                (server.name.to_string(), (after - before) as f64 * tick_us)
            })
            .collect();
        Ok((measured, cpu))
    }

    fn cpu_ticks(&self) -> anyhow::Result<Vec<u64>> {
        self.servers.iter().map(Server::cpu_ticks).collect()
    }

    /// The processes a request costs work in, by name: Envoy, and the ext_proc server if the
    /// setup has one (not the upstream, the same in every setup).
    pub(super) fn measured(&self) -> Vec<(&'static str, u32)> {
        self.servers
            .iter()
            .filter(|server| server.name != "upstream")
            .map(|server| (server.name, server.process.0.id()))
            .collect()
    }

    /// The host's counter `series` (a full series name, labels included, as its `/metrics`
    /// writes it); `None` where the setup runs no host.
    pub(super) fn host_counter(&self, series: &str) -> anyhow::Result<Option<u64>> {
        let Some(admin) = self.host_admin else {
            return Ok(None);
        };
        let scrape = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(envoy::request(admin, "GET", "/metrics", &[], Vec::new()))
            .context("the host's /metrics")?;
        let value =
            extproc_testkit::series::scraped(&String::from_utf8_lossy(&scrape.body), series)
                .with_context(|| format!("no {series} in the host's /metrics"))?;
        Ok(Some(value as u64))
    }

    /// Envoy's log of each request and its ext_proc messages ([`Variation::message_log`]).
    pub(super) fn message_log(&self) -> PathBuf {
        self.dir.path().join(MESSAGE_LOG)
    }

    /// The setup's own directory: its configuration, logs and profiles.
    pub(super) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The peak resident set of the server called `name` so far.
    pub(super) fn peak_rss_kib(&self, name: &str) -> anyhow::Result<u64> {
        let server = self
            .servers
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no {name} in this setup"))?;
        let path = format!("/proc/{}/status", server.process.0.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("{name} is gone"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmHWM in {path}"))
    }
}

/// A stand-in OpenTelemetry collector for the traced setup, on a runtime of its own in the
/// benchmark's process: it receives what a collector would and keeps only a count.
struct SpanSink {
    collector: Collector,
    address: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

/// Envoy and the host each export on a 5 s timer.
const FIRST_SPANS_TIMEOUT: Duration = Duration::from_secs(15);

impl SpanSink {
    fn start() -> anyhow::Result<SpanSink> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let collector = Collector::default();
        let address = runtime.block_on(collector.clone().start());
        Ok(SpanSink {
            collector,
            address,
            _runtime: runtime,
        })
    }

    /// Waits until spans from both Envoy and the host arrived: tracing is on end to end.
    fn wait_for_both(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + FIRST_SPANS_TIMEOUT;
        loop {
            let spans = self.collector.spans();
            let from = |service: &str| spans.iter().any(|(s, _)| s.contains(service));
            if from("envoy") && from("wasm-extproc") {
                self.collector.clear();
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no spans from {} within {FIRST_SPANS_TIMEOUT:?}",
                    if from("envoy") { "the host" } else { "Envoy" }
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A port nothing listens on now: the kernel's pick for a socket at once released.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `getconf CLK_TCK`: the unit of /proc's CPU times.
pub(super) fn clock_ticks_per_second() -> anyhow::Result<f64> {
    let ticks = output_of(Command::new("getconf").arg("CLK_TCK"))?;
    ticks
        .trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK said {ticks:?}"))
}

/// utime + stime (fields 14 and 15) from a `/proc/PID/stat` line. The command name in
/// field 2 may hold spaces and parentheses, so fields count from its closing one.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, fields) = stat.rsplit_once(')')?;
    let mut fields = fields.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Half the slowest setup's closed-loop throughput, rounded down to a multiple of 100: a load
/// every setup carries with room to spare, so latency is not queueing.
fn default_fixed_rate(closed_loop_rps: impl Iterator<Item = f64>) -> u64 {
    let slowest = closed_loop_rps.fold(f64::INFINITY, f64::min);
    let half = (slowest / 2.0) as u64;
    (half / 100 * 100).max(100)
}

impl Load {
    /// Each figure's median, on its own.
    fn median<'a>(loads: impl Iterator<Item = &'a Load> + Clone) -> Load {
        let of = |figure: fn(&Load) -> f64| median(loads.clone().map(figure).collect());
        Load {
            requests: of(|l| l.requests as f64).round() as u64,
            errors: of(|l| l.errors as f64).round() as u64,
            rps: of(|l| l.rps),
            p50_ms: of(|l| l.p50_ms),
            p99_ms: of(|l| l.p99_ms),
        }
    }
}

/// Each process's median CPU per request over the rounds, of the run `of` picks.
fn median_per_process(
    rounds: &[RoundResult],
    of: impl Fn(&RoundResult) -> &Vec<(String, f64)>,
) -> Vec<(String, f64)> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    of(first)
        .iter()
        .map(|(name, _)| {
            let values = rounds
                .iter()
                .flat_map(&of)
                .filter(|(n, _)| n == name)
                .map(|(_, us)| *us)
                .collect();
            (name.clone(), median(values))
        })
        .collect()
}

/// The middle value; the mean of the middle two for an even count.
pub(super) fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

fn progress(
    round: usize,
    rounds: usize,
    setup: &Setup,
    run: &str,
    load: &Load,
    cpu: &[(String, f64)],
) {
    let cpu: Vec<String> = cpu
        .iter()
        .map(|(name, us)| format!("{name} {us:.1}"))
        .collect();
    eprintln!(
        "bench: round {round}/{rounds} {:<7} {run}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, \
         {} requests, {} errors; CPU µs/request: {}",
        setup.key,
        load.rps,
        load.p50_ms,
        load.p99_ms,
        load.requests,
        load.errors,
        cpu.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        // /proc/PID/stat of a process named `a) b`, utime 250, stime 31.
        let stat = "4242 (a) b) S 1 4242 4242 0 -1 4194560 3046 0 0 0 250 31 0 0 20 0 9 0 \
                    1274719 1171456000 10500 18446744073709551615 1 1 0 0 0 0 0 4096 17663 \
                    0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(281));
        assert_eq!(parse_cpu_ticks("4242 (truncated) S 1"), None);
    }

    #[test]
    fn the_fixed_rate_is_half_the_slowest_setup_in_hundreds() {
        assert_eq!(
            default_fixed_rate([9876.5, 4321.0, 7000.0].into_iter()),
            2100
        );
        assert_eq!(default_fixed_rate([150.0].into_iter()), 100);
    }

    #[test]
    fn medians_take_each_figure_on_its_own() {
        let load = |rps, p99_ms| Load {
            requests: 10,
            errors: 0,
            rps,
            p50_ms: 1.0,
            p99_ms,
        };
        let loads = [
            load(3.0, 9.0),
            load(1.0, 7.0),
            load(2.0, 8.0),
            load(4.0, 1.0),
        ];
        let median = Load::median(loads.iter());
        assert_eq!((median.rps, median.p99_ms, median.requests), (2.5, 7.5, 10));
    }

    #[test]
    fn each_setup_gets_its_filter_in_the_ext_proc_filters_place() {
        let render = |setup: &Setup| {
            let address = loopback(9);
            setup
                .envoy_config(Path::new("/plugins"), "")
                .unwrap()
                .render(1, address, address, 2)
                .unwrap()
        };
        for setup in &SETUPS {
            let ext_proc = matches!(setup.filter, Filter::ExtProc(_));
            let lua = setup.filter == Filter::Lua;
            let config = render(setup);
            // In the filter chain (routes may still carry its per-route settings).
            assert_eq!(
                config.contains("- name: envoy.filters.http.ext_proc"),
                ext_proc,
                "{config}"
            );
            assert_eq!(config.contains("envoy.filters.http.lua"), lua, "{config}");
            assert_eq!(
                config.contains("envoy.filters.http.dynamic_modules"),
                setup.filter == Filter::InProcess,
                "{config}"
            );
            assert!(config.contains(ROUTER_FILTER), "{config}");
            assert_eq!(
                config.contains("response_body_mode: FULL_DUPLEX_STREAMED"),
                setup.full_duplex_response,
                "{config}"
            );
        }
    }
}
