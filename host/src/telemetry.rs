//! Logging and tracing.
//!
//! Logs: `tracing` to stderr, as text for people or JSON for log pipelines. `RUST_LOG` filters
//! (default `info`). Text is coloured only on a terminal: a container's log, a pipe or a file
//! gets plain lines, with no escape codes for the log pipeline to carry.
//!
//! Traces (`[tracing]`): OpenTelemetry spans over OTLP/gRPC. Envoy's ext_proc filter passes its
//! trace context (`traceparent`) in each stream's initial metadata; the host continues that
//! trace with one span per stream ([`STREAM_SPAN`]) and a child span per plugin call
//! ([`wasm_extproc_core::chain::CALL_SPAN`]), and follows Envoy's sampling decision: a stream
//! Envoy did not sample, or that came without a trace, is not recorded. The spans live under
//! the target [`TRACE_TARGET`] at `TRACE` level, which only the OpenTelemetry layer enables:
//! with tracing off no layer wants them, and they cost what a disabled `tracing` call site
//! costs -- one cached check.

use std::io::IsTerminal;

use anyhow::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use wasm_extproc_core::chain::{CALL_SPAN, TRACE_TARGET};

use crate::config::{FileTracing, LogFormat};

/// The name of the span each ext_proc stream gets.
pub const STREAM_SPAN: &str = "ext_proc stream";

/// What keeps spans flowing: shut it down at exit so the last batch reaches the collector.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Sends what is buffered, then stops.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("wasm-extproc: flushing spans at exit failed: {error}");
        }
    }

    /// Sends what is buffered now.
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

/// Logs to stderr and, with `tracing` configured, spans to its collector.
pub fn init(format: LogFormat, tracing: Option<&FileTracing>) -> anyhow::Result<Option<Tracing>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let mut layers = vec![logs];
    let tracing = match tracing {
        Some(settings) => {
            let (spans, tracing) = layer(settings)?;
            layers.push(spans);
            Some(tracing)
        }
        None => None,
    };
    // A second init (tests starting several hosts) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(tracing)
}

/// The OpenTelemetry layer for `settings`: only the host's trace spans, batched to the OTLP
/// collector, sampled as the parent was.
pub fn layer(
    settings: &FileTracing,
) -> anyhow::Result<(Box<dyn Layer<Registry> + Send + Sync>, Tracing)> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&settings.otlp_endpoint)
        .build()
        .with_context(|| format!("[tracing] otlp_endpoint {}", settings.otlp_endpoint))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(
                    settings
                        .service_name
                        .clone()
                        .unwrap_or_else(|| "wasm-extproc".into()),
                )
                .build(),
        )
        .build();
    let tracer = provider.tracer("wasm-extproc");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target(TRACE_TARGET, LevelFilter::TRACE))
        .boxed();
    Ok((layer, Tracing { provider }))
}

/// The trace context Envoy sent in a stream's initial metadata (W3C `traceparent`), if any.
pub fn remote_context(metadata: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    struct Metadata<'a>(&'a tonic::metadata::MetadataMap);
    impl Extractor for Metadata<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|value| value.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0
                .keys()
                .filter_map(|key| match key {
                    tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                    tonic::metadata::KeyRef::Binary(_) => None,
                })
                .collect()
        }
    }
    TraceContextPropagator::new().extract(&Metadata(metadata))
}
