//! What plugins' state and outbound calls cost, in process, seen from the plugin: one handler
//! call making `N` state operations (or one HTTP request), less the same call making none,
//! divided by `N`. The backends: the embedded store, and a real Redis (`redis-server`) on
//! loopback; the HTTP server is a local hyper server answering a few bytes.
//!
//!     cargo xtask build-plugins && cargo bench -p extproc-bench --bench state
//!
//! Prints a Markdown table (medians; the machine is shared, so compare within a run) and
//! writes it to target/bench/state.md.

#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use extproc_testkit::fixtures::{CALL_OUT, Component, KV_PROBE};
use extproc_testkit::redis::Redis;
use extproc_testkit::service::Service;
use wasm_extproc::config::Settings;
use wasm_extproc::http::{ExchangeContext, HeaderMap, Message, Phase};
use wasm_extproc::kv::{self, Backend, KvSettings};
use wasm_extproc::metrics::Metrics;
use wasm_extproc::runtime::{CapabilitySettings, Plugin, PoolLimits, Runtime};

/// State operations per measured call.
const OPERATIONS: u32 = 100;
/// Calls per sample, and samples per figure.
const CALLS: usize = 20;
const SAMPLES: usize = 31;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn request() -> Message {
    Message::Headers {
        headers: HeaderMap::from_entries([
            (":method".to_string(), b"GET".to_vec()),
            (":path".to_string(), b"/".to_vec()),
        ]),
        end_of_stream: true,
    }
}

struct Bench {
    tokio: tokio::runtime::Runtime,
}

impl Bench {
    fn runtime(&self, kv: KvSettings) -> Runtime {
        let _entered = self.tokio.enter();
        Runtime::new(
            PoolLimits {
                max_instances: 16,
                max_wasi_instances: 16,
                instance_wait: Duration::ZERO,
                max_memory_bytes: 64 << 20,
                cache_dir: None,
                capabilities: CapabilitySettings {
                    state: kv,
                    ..Default::default()
                },
            },
            &Metrics::new(),
        )
        .expect("runtime")
    }

    /// `component` loaded into `runtime` with the plugin settings `toml` gives it.
    fn load(&self, runtime: &Runtime, component: Component, toml: &str) -> Plugin {
        let settings = Settings::from_toml(
            &format!("[defaults]\ntimeout_ms = 5000\n{toml}"),
            Path::new("bench.toml"),
        )
        .expect("benchmark config");
        let plugin_settings = settings.settings_for("default", "probe").clone();
        let path = component.path();
        self.tokio
            .block_on(runtime.load(
                "default",
                "probe",
                &path,
                Runtime::read(&path).expect("run `cargo xtask build-plugins`"),
                plugin_settings,
            ))
            .expect("load")
    }

    /// The median time of one request-headers call of `plugin`, on one instance kept across
    /// calls (the instance's creation is not what is measured).
    fn per_call(&self, plugin: &Plugin) -> Duration {
        self.tokio.block_on(async {
            let context = Arc::new(ExchangeContext::default());
            let mut instance = plugin
                .instantiate(Instant::now(), Instant::now())
                .await
                .expect("instantiate");
            let call = async |instance: &mut _| {
                let (_, _, result) = wasm_extproc::runtime::Instance::call(
                    instance,
                    Phase::RequestHeaders,
                    request(),
                    None,
                    &context,
                    Instant::now(),
                )
                .await;
                result.expect("call");
            };
            for _ in 0..CALLS {
                call(&mut instance).await;
            }
            let mut samples = Vec::with_capacity(SAMPLES);
            for _ in 0..SAMPLES {
                let started = Instant::now();
                for _ in 0..CALLS {
                    call(&mut instance).await;
                }
                samples.push(started.elapsed() / CALLS as u32);
            }
            median(samples)
        })
    }

    /// What one state operation costs on `kv`: a call making `OPERATIONS` of them, less a call
    /// making none, per operation.
    fn state(&self, kv: KvSettings, operation: &str) -> (Duration, Duration) {
        let runtime = self.runtime(kv);
        let config = |n| format!("[plugins.probe]\nconfig = \"bench:{operation}:{n}\"\n");
        let none = self.per_call(&self.load(&runtime, KV_PROBE, &config(0)));
        let some = self.per_call(&self.load(&runtime, KV_PROBE, &config(OPERATIONS)));
        (some.saturating_sub(none) / OPERATIONS, none)
    }
}

fn micros(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let bench = Bench {
        tokio: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio"),
    };
    let redis = Redis::start().expect("redis-server: `cargo xtask test` installs it");
    let memory = KvSettings::default();
    let shared = KvSettings {
        backend: Backend::Redis {
            url: redis.url(),
            pool_size: 1,
            connect_timeout: Duration::from_secs(1),
            prefix: kv::DEFAULT_PREFIX.into(),
        },
        timeout: Duration::from_secs(1),
        ..KvSettings::default()
    };
    let mut table = String::from(
        "| what the plugin does | backend | per operation | the call without it |\n|---|---|---|---|\n",
    );
    for (kv, backend) in [(memory, "embedded (memory)"), (shared, "Redis on loopback")] {
        for (operation, name) in [
            ("get", "`get`"),
            ("increment", "`atomics.increment`"),
            ("window", "`state.increment-in-window`"),
        ] {
            let (each, call) = bench.state(kv.clone(), operation);
            table.push_str(&format!(
                "| {name} | {backend} | {} | {} |\n",
                micros(each),
                micros(call)
            ));
        }
    }
    drop(redis);

    let server = bench.tokio.block_on(Service::start(
        Duration::ZERO,
        Arc::new(|_: &[u8]| (200, "{}".into())),
    ));
    let server = server.expect("server");
    let runtime = bench.runtime(KvSettings::default());
    let origin = server.origin();
    let call_out = bench.load(
        &runtime,
        CALL_OUT,
        &format!("[plugins.probe]\nconfig = \"{origin}/\"\nhttp_allow = [\"{origin}\"]\n"),
    );
    let nothing = bench.load(
        &runtime,
        KV_PROBE,
        "[plugins.probe]\nconfig = \"bench:get:0\"\n",
    );
    let with = bench.per_call(&call_out);
    let without = bench.per_call(&nothing);
    table.push_str(&format!(
        "| one HTTP GET (`wasi:http`), a new connection each | local hyper server | {} | {} |\n",
        micros(with.saturating_sub(without)),
        micros(without)
    ));
    println!("{table}");
    let out = common::tables();
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(out.join("state.md"), table).expect("write state.md");
}
