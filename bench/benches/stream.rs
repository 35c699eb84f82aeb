//! In-process costs of the Wasm work, with criterion:
//!
//! - `stream/asm_demo`: what one ext_proc stream costs the bundled plugin -- instantiate from
//!   the pre-linked component, run both header phases, drop the instance -- and
//!   `stream/asm_demo_wasip2`, the same plugin built for wasm32-wasip2 (with WASI imports);
//!   `stream/instantiate` is instantiate + drop alone;
//! - `chain/N`: the same exchange through the host's chain with N plugins (1 to 16), and
//!   `chain_reused/N` with `isolation = "reuse"` (instances kept across streams);
//! - `body/MODE/SIZE`: a body plugin reading and replacing bodies of 1 KiB to 1 MiB, sent whole
//!   (`BUFFERED`) or in 16 KiB chunks (`STREAMED`).
//!
//! `cargo xtask bench` builds the components, runs this with the rest of the suite and writes
//! BENCHMARKS.md; once the components are built, this alone is:
//!
//! ```text
//! cargo bench -p extproc-bench --bench stream
//! ```
//!

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{BUNDLED, WASI, components, request_headers, response_headers};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wasm_extproc_core::chain::StreamChain;
use wasm_extproc_core::config::{DEFAULT_CHAIN, Isolation, Settings};
use wasm_extproc_core::http::{
    BodyChunk, BodyMode, Changes, Decision, ExchangeContext, Message, Phase,
};
use wasm_extproc_core::metrics::Metrics;
use wasm_extproc_core::registry::{Chain, Generation};
use wasm_extproc_core::runtime::{Plugin, PoolLimits, Runtime};

/// Chain lengths measured.
const CHAIN_LENGTHS: [usize; 5] = [1, 2, 4, 8, 16];
/// Body sizes measured.
const BODY_SIZES: [usize; 5] = [1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
/// How Envoy cuts a streamed body (its default read size).
const CHUNK: usize = 16 << 10;

/// The host's configuration for these benchmarks: generous budgets, so a slow machine does not
/// turn a measurement into a deadline failure.
fn config() -> Settings {
    Settings::from_toml(
        "[defaults]\ntimeout_ms = 1000\nmemory_limit_mib = 64\n",
        Path::new("bench.toml"),
    )
    .expect("benchmark config")
}

struct Bench {
    tokio: tokio::runtime::Runtime,
    runtime: Runtime,
    config: Settings,
}

impl Bench {
    fn new() -> Bench {
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio");
        let runtime = Runtime::new(
            PoolLimits {
                max_instances: 1000,
                max_wasi_instances: 1000,
                instance_wait: Duration::ZERO,
                max_memory_bytes: 64 << 20,
                cache_dir: None,
                capabilities: Default::default(),
            },
            &Metrics::new(),
        )
        .expect("runtime");
        Bench {
            tokio,
            runtime,
            config: config(),
        }
    }

    fn load(&self, target: &str, name: &str) -> Plugin {
        let path = components(target).join(format!("{name}.wasm"));
        let bytes = Runtime::read(&path).unwrap_or_else(|e| {
            panic!("{e}: run `cargo xtask bench` (it builds every component it needs)");
        });
        self.tokio
            .block_on(self.runtime.load(
                DEFAULT_CHAIN,
                name,
                &path,
                bytes,
                self.config.defaults.clone(),
            ))
            .expect("load plugin")
    }

    /// A generation whose chain is `plugin` `n` times, under different names.
    fn generation(&self, plugin: &Plugin, n: usize, isolation: Isolation) -> Arc<Generation> {
        let mut settings = plugin.settings().clone();
        settings.isolation = isolation;
        let plugins = (0..n)
            .map(|i| {
                plugin.reconfigured(
                    DEFAULT_CHAIN,
                    &format!("{}-{i}", plugin.name()),
                    settings.clone(),
                )
            })
            .collect();
        let chain = Chain::new(DEFAULT_CHAIN, plugins, &Metrics::new(), Duration::ZERO);
        Arc::new(Generation::new(
            1,
            vec![chain],
            &self.config,
            None,
            &Metrics::new(),
        ))
    }
}

/// The messages of one exchange, made outside the measured time: turning Envoy's protobufs
/// into them is the gRPC layer's work, which the end-to-end benchmark counts.
fn exchange() -> (Message, Message) {
    (request_headers(), response_headers())
}

fn per_stream(c: &mut Criterion) {
    let bench = Bench::new();
    let bundled = bench.load(BUNDLED, "asm_demo");
    let context = Arc::new(ExchangeContext::default());
    let mut group = c.benchmark_group("stream");
    group.bench_function("instantiate", |b| {
        b.to_async(&bench.tokio).iter(|| async {
            drop(
                bundled
                    .instantiate(Instant::now(), Instant::now())
                    .await
                    .expect("instantiate"),
            );
        });
    });
    let wasip2 = bench.load(WASI, "asm_demo");
    for (label, plugin) in [("asm_demo", &bundled), ("asm_demo_wasip2", &wasip2)] {
        group.bench_function(label, |b| {
            b.to_async(&bench.tokio).iter_batched(
                exchange,
                |(request, response)| async {
                    let mut instance = plugin
                        .instantiate(Instant::now(), Instant::now())
                        .await
                        .expect("instantiate");
                    let (request, _, result) = instance
                        .call(
                            Phase::RequestHeaders,
                            request,
                            None,
                            &context,
                            Instant::now(),
                        )
                        .await;
                    result.expect("request headers");
                    let (response, _, result) = instance
                        .call(
                            Phase::ResponseHeaders,
                            response,
                            None,
                            &context,
                            Instant::now(),
                        )
                        .await;
                    result.expect("response headers");
                    drop(instance);
                    (request, response)
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();

    // What the plugin did, checked once outside the measurement.
    bench.tokio.block_on(async {
        let mut instance = bundled
            .instantiate(Instant::now(), Instant::now())
            .await
            .expect("instantiate");
        let (message, _, result) = instance
            .call(
                Phase::RequestHeaders,
                request_headers(),
                None,
                &context,
                Instant::now(),
            )
            .await;
        result.expect("request headers");
        assert!(matches!(&message, Message::Headers { headers, .. }
            if headers.get("x-ext-proc-header") == Some(b"hello-to-asm".as_slice())));
    });
}

fn chain_length(c: &mut Criterion) {
    let bench = Bench::new();
    let plugin = bench.load(BUNDLED, "asm_demo");
    let context = Arc::new(ExchangeContext::default());
    for (group, isolation) in [
        ("chain", Isolation::Exchange),
        ("chain_reused", Isolation::Reuse),
    ] {
        chain_group(c, &bench, &plugin, &context, group, isolation);
    }
}

/// A stream's exchange through chains of 1 to 16 copies of `plugin`.
fn chain_group(
    c: &mut Criterion,
    bench: &Bench,
    plugin: &Plugin,
    context: &Arc<ExchangeContext>,
    group: &str,
    isolation: Isolation,
) {
    let mut group = c.benchmark_group(group);
    for n in CHAIN_LENGTHS {
        let generation = bench.generation(plugin, n, isolation);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.to_async(&bench.tokio).iter_batched(
                exchange,
                |(request, response)| async {
                    let mut chain = StreamChain::new(generation.clone(), 0);
                    let request = chain
                        .run(Phase::RequestHeaders, request, BodyMode::None, context)
                        .await;
                    assert!(matches!(request.decision, Decision::Continue(_)));
                    let response = chain
                        .run(Phase::ResponseHeaders, response, BodyMode::None, context)
                        .await;
                    assert!(matches!(response.decision, Decision::Continue(_)));
                    drop(chain);
                    (request, response)
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn body_throughput(c: &mut Criterion) {
    let bench = Bench::new();
    let plugin = bench.load(WASI, "shout");
    let generation = bench.generation(&plugin, 1, Isolation::Exchange);
    let context = Arc::new(ExchangeContext::default());
    for mode in [BodyMode::Buffered, BodyMode::Streamed] {
        let label = match mode {
            BodyMode::Buffered => "buffered",
            _ => "streamed",
        };
        let mut group = c.benchmark_group(format!("body/{label}"));
        group.measurement_time(Duration::from_secs(4));
        for size in BODY_SIZES {
            let body = vec![b'a'; size];
            let chunk = match mode {
                BodyMode::Buffered => size,
                _ => CHUNK,
            };
            group.throughput(Throughput::Bytes(size as u64));
            // The messages as the gRPC layer hands them over, made outside the measured time.
            let messages = || -> Vec<Message> {
                let pieces = body.chunks(chunk).count();
                body.chunks(chunk)
                    .enumerate()
                    .map(|(i, piece)| {
                        Message::Body(BodyChunk::new(piece.to_vec(), i + 1 == pieces))
                    })
                    .collect()
            };
            group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
                b.to_async(&bench.tokio).iter_batched(
                    messages,
                    |messages| async {
                        let mut chain = StreamChain::new(generation.clone(), 0);
                        let mut out = Vec::with_capacity(messages.len());
                        for message in messages {
                            let verdict =
                                chain.run(Phase::RequestBody, message, mode, &context).await;
                            match verdict.decision {
                                Decision::Continue(Changes::Body(body)) => out.push(body),
                                other => panic!("body not passed on: {other:?}"),
                            }
                        }
                        assert_eq!(out[0].data.first(), Some(&b'A'));
                        drop(chain);
                        out
                    },
                    BatchSize::LargeInput,
                );
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = per_stream, chain_length, body_throughput
}
criterion_main!(benches);
