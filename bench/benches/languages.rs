//! What a plugin costs in each language: component size, compile time cold, load time warm
//! (from the compilation cache), and the per-stream work -- instantiate, both header phases,
//! drop -- for the ASM demo plugin built in Rust, C, JavaScript and Python; and that work taken
//! apart: instantiating and dropping alone (the memory image, the engine's start-up), and the
//! two handler calls alone on an instance kept from stream to stream (`isolation = "reuse"`).
//!
//!     cargo xtask build-plugins && cargo bench -p extproc-bench --bench languages
//!
//! Prints a Markdown table (medians; the machine is shared, so compare ratios) and writes it to
//! target/bench/languages.md.

#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{WASI, components, request_headers, response_headers, tables};
use wasm_extproc_core::config::{DEFAULT_CHAIN, Settings};
use wasm_extproc_core::http::{ExchangeContext, Message, Phase};
use wasm_extproc_core::metrics::Metrics;
use wasm_extproc_core::runtime::{Instance, PoolLimits, Runtime};

const LANGUAGES: [(&str, &str); 5] = [
    ("Rust", "asm_demo"),
    ("C", "asm_demo_c"),
    ("JavaScript", "asm_demo_js"),
    ("Python", "asm_demo_py"),
    ("Python, WASI stubbed (`--stub-wasi`)", "asm_demo_py_stub"),
];

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// What a stream with this plugin does between instantiating and dropping it.
async fn both_header_calls(
    instance: &mut Instance,
    context: &Arc<ExchangeContext>,
    (request, response): (Message, Message),
) {
    for (phase, message) in [
        (Phase::RequestHeaders, request),
        (Phase::ResponseHeaders, response),
    ] {
        let (_, _, result) = instance
            .call(phase, message, None, context, Instant::now())
            .await;
        result.unwrap();
    }
}

fn runtime(cache: Option<&Path>) -> Runtime {
    Runtime::new(
        PoolLimits {
            max_instances: 100,
            max_wasi_instances: 100,
            instance_wait: Duration::ZERO,
            max_memory_bytes: 128 << 20,
            cache_dir: cache.map(Path::to_path_buf),
            capabilities: Default::default(),
        },
        &Metrics::new(),
    )
    .expect("runtime")
}

fn main() {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings = {
        let config = Settings::from_toml(
            "[defaults]\ntimeout_ms = 1000\nmemory_limit_mib = 128\n",
            Path::new("bench.toml"),
        )
        .unwrap();
        config.defaults.clone()
    };
    let mut table = String::from(
        "| language | component | compile, cold | load, warm (cache) | instantiate + 2 header calls | ratio to Rust | of which instantiate + drop | 2 header calls, instance reused |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut rust_stream = None;
    for (language, name) in LANGUAGES {
        let path = components(WASI).join(format!("{name}.wasm"));
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!(
                "{} missing: run `cargo xtask build-plugins`",
                path.display()
            );
            continue;
        };
        let size = bytes.len();
        let heavy = size > 1 << 20;

        let plugin_in = |runtime: &Runtime| {
            tokio
                .block_on(runtime.load(
                    DEFAULT_CHAIN,
                    name,
                    &path,
                    Runtime::read(&path).unwrap(),
                    settings.clone(),
                ))
                .unwrap()
        };
        // Loads the component into a fresh engine (caching in `cache`, if any); how long it took.
        let load = |cache: Option<&Path>| {
            let runtime = runtime(cache);
            let started = Instant::now();
            plugin_in(&runtime);
            started.elapsed()
        };
        // Cold: no cache, compiling from the bytes.
        let cold = median((0..if heavy { 2 } else { 5 }).map(|_| load(None)).collect());
        // Warm: the cache already holds the component.
        let cache = tempfile::tempdir().unwrap();
        load(Some(cache.path()));
        let warm = median((0..5).map(|_| load(Some(cache.path()))).collect());

        // Per stream: what the host does for one HTTP exchange with this plugin.
        let runtime = runtime(None);
        let plugin = plugin_in(&runtime);
        let context = Arc::new(ExchangeContext::default());
        let iterations = if heavy { 300 } else { 3000 };
        let stream = median(tokio.block_on(async {
            let mut samples = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let messages = (request_headers(), response_headers());
                let started = Instant::now();
                let mut instance = plugin
                    .instantiate(Instant::now(), Instant::now())
                    .await
                    .unwrap();
                both_header_calls(&mut instance, &context, messages).await;
                drop(instance);
                samples.push(started.elapsed());
            }
            samples
        }));
        let instantiate = median(tokio.block_on(async {
            let mut samples = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let started = Instant::now();
                let instance = plugin
                    .instantiate(Instant::now(), Instant::now())
                    .await
                    .unwrap();
                drop(instance);
                samples.push(started.elapsed());
            }
            samples
        }));
        let reused = median(tokio.block_on(async {
            let mut instance = plugin
                .instantiate(Instant::now(), Instant::now())
                .await
                .unwrap();
            let mut samples = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let messages = (request_headers(), response_headers());
                let started = Instant::now();
                both_header_calls(&mut instance, &context, messages).await;
                samples.push(started.elapsed());
            }
            samples
        }));
        let rust = *rust_stream.get_or_insert(stream);
        table.push_str(&format!(
            "| {language} | {:.0} KiB | {:.1} ms | {:.1} ms | {:.1} µs | {:.1}x | {:.1} µs | {:.1} µs |\n",
            size as f64 / 1024.0,
            cold.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3,
            stream.as_secs_f64() * 1e6,
            stream.as_secs_f64() / rust.as_secs_f64(),
            instantiate.as_secs_f64() * 1e6,
            reused.as_secs_f64() * 1e6,
        ));
    }
    print!("{table}");
    let out = tables();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("languages.md"), &table).unwrap();
}
