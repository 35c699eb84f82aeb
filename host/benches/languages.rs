//! What a plugin costs in each language: component size, compile time cold, load time warm
//! (from the compilation cache), and the per-stream work -- instantiate, both header phases,
//! drop -- for the ASM demo plugin built in Rust, C, JavaScript and Python.
//!
//!     cargo xtask build-plugins && cargo bench -p wasm-extproc --bench languages
//!
//! Prints a Markdown table (medians; the machine is shared, so compare ratios) and writes it to
//! target/bench/languages.md.

#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasm_extproc::config::Config;
use wasm_extproc::http::{ExchangeContext, HeaderMap, Message, Phase};
use wasm_extproc::runtime::{PoolLimits, Runtime};

const LANGUAGES: [(&str, &str); 4] = [
    ("Rust", "asm_demo"),
    ("C", "asm_demo_c"),
    ("JavaScript", "asm_demo_js"),
    ("Python", "asm_demo_py"),
];

fn components() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("wasm32-wasip2/release")
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn runtime(cache: Option<&Path>) -> Runtime {
    Runtime::new(PoolLimits {
        max_instances: 100,
        max_memory_bytes: 128 << 20,
        cache_dir: cache.map(Path::to_path_buf),
    })
    .expect("runtime")
}

/// Request headers as Envoy sends them for a typical API call.
fn request_headers() -> Message {
    let entries = [
        (":authority", "httpbin.default.svc.cluster.local:8000"),
        (":path", "/headers"),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "6b8e9f3a-2c1d-4e5f-8a9b-0c1d2e3f4a5b"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-sampled", "1"),
        ("x-envoy-attempt-count", "1"),
    ];
    Message::Headers {
        headers: HeaderMap::from_entries(
            entries.map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        ),
        end_of_stream: true,
    }
}

fn response_headers() -> Message {
    let entries = [
        (":status", "200"),
        ("content-type", "application/json"),
        ("content-length", "512"),
        ("date", "Thu, 26 Nov 2026 10:00:00 GMT"),
        ("server", "envoy"),
        ("x-envoy-upstream-service-time", "2"),
    ];
    Message::Headers {
        headers: HeaderMap::from_entries(
            entries.map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        ),
        end_of_stream: false,
    }
}

fn main() {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings = {
        let config = Config::from_toml(
            "[defaults]\ntimeout_ms = 1000\nmemory_limit_mib = 128\n",
            Path::new("bench.toml"),
        )
        .unwrap();
        config.defaults.clone()
    };
    let mut table = String::from(
        "| language | component | compile, cold | load, warm (cache) | instantiate + 2 header calls | ratio to Rust |\n|---|---|---|---|---|---|\n",
    );
    let mut rust_stream = None;
    for (language, name) in LANGUAGES {
        let path = components().join(format!("{name}.wasm"));
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!(
                "{} missing: run `cargo xtask build-plugins`",
                path.display()
            );
            continue;
        };
        let size = bytes.len();
        let heavy = size > 1 << 20;

        // Loads the component into a fresh engine (caching in `cache`, if any); how long it took.
        let load = |cache: Option<&Path>| {
            let runtime = runtime(cache);
            let started = Instant::now();
            tokio
                .block_on(runtime.load(
                    name,
                    &path,
                    Runtime::read(&path).unwrap(),
                    settings.clone(),
                ))
                .unwrap();
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
        let plugin = tokio
            .block_on(runtime.load(name, &path, Runtime::read(&path).unwrap(), settings.clone()))
            .unwrap();
        let context = Arc::new(ExchangeContext::default());
        let check = |_: &Message, _: &wasm_extproc::runtime::Outcome| Ok(());
        let iterations = if heavy { 300 } else { 3000 };
        let stream = median(tokio.block_on(async {
            let mut samples = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let (request, response) = (request_headers(), response_headers());
                let started = Instant::now();
                let mut instance = plugin.instantiate().await.unwrap();
                let (_, result) = instance
                    .call(Phase::RequestHeaders, request, &context, &check)
                    .await;
                result.unwrap();
                let (_, result) = instance
                    .call(Phase::ResponseHeaders, response, &context, &check)
                    .await;
                result.unwrap();
                drop(instance);
                samples.push(started.elapsed());
            }
            samples
        }));
        let rust = *rust_stream.get_or_insert(stream);
        table.push_str(&format!(
            "| {language} | {:.0} KiB | {:.1} ms | {:.1} ms | {:.1} µs | {:.1}x |\n",
            size as f64 / 1024.0,
            cold.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3,
            stream.as_secs_f64() * 1e6,
            stream.as_secs_f64() / rust.as_secs_f64(),
        ));
    }
    print!("{table}");
    let out = components().join("../../bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("languages.md"), &table).unwrap();
}
