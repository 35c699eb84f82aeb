//! Logging and tracing.
//!
//! Logs: `tracing` to stderr, as text for people or JSON for log pipelines. `RUST_LOG` filters
//! (default `info`; `warn` for `wasm-extproc test`, whose report is its output). Text is coloured only on a terminal: a container's log, a pipe or a file
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
//!
//! With tracing on, a line logged inside a recorded trace ends with that trace's `trace_id` and
//! the current span's `span_id` (W3C hex; top-level fields in JSON), so a log pipeline can join
//! a plugin's failure to the request's trace. Without `[tracing]` the log formatters are the
//! plain ones.

use std::io::IsTerminal;

use anyhow::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_log::{AsLog, LogTracer};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
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

/// Logs to stderr (filtered by `RUST_LOG`, else `default_filter`) and, with `tracing`
/// configured, spans to its collector.
pub fn init(
    format: LogFormat,
    default_filter: &str,
    tracing: Option<&FileTracing>,
) -> anyhow::Result<Option<Tracing>> {
    init_with(format, default_filter, tracing, Vec::new())
}

/// [`init`], with `more` layers beside the log (`test`'s plugin log).
pub fn init_with(
    format: LogFormat,
    default_filter: &str,
    tracing: Option<&FileTracing>,
    more: Vec<Box<dyn Layer<Registry> + Send + Sync>>,
) -> anyhow::Result<Option<Tracing>> {
    let (spans, tracing) = match tracing {
        Some(settings) => {
            let (spans, tracing) = layer(settings)?;
            (Some(spans), Some(tracing))
        }
        None => (None, None),
    };
    let ansi = std::io::stderr().is_terminal();
    let logs = logs(
        format,
        default_filter,
        std::io::stderr,
        ansi,
        tracing.is_some(),
    );
    let (subscriber, log_level) = assemble(logs, spans, more);
    // A second init (tests starting several hosts) keeps the first subscriber.
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        let _ = LogTracer::builder().with_max_level(log_level).init();
    }
    Ok(tracing)
}

/// The subscriber of these layers, and the level at which `log` records reach it.
///
/// `log` records (wasmtime logs through `log`, a dozen calls per exchange) can only reach the
/// log layers: the trace layer takes spans of `TRACE_TARGET`, which no record is. So `log`'s own
/// level is theirs, not the trace layer's TRACE, which would send each of wasmtime's
/// `log::trace!` calls through the subscriber only to be dropped there.
fn assemble(
    logs: Box<dyn Layer<Registry> + Send + Sync>,
    spans: Option<Box<dyn Layer<Registry> + Send + Sync>>,
    more: Vec<Box<dyn Layer<Registry> + Send + Sync>>,
) -> (
    impl tracing::Subscriber + Send + Sync,
    tracing_log::log::LevelFilter,
) {
    let log_level = std::iter::once(&logs)
        .chain(&more)
        .map(|layer| layer.max_level_hint().unwrap_or(LevelFilter::TRACE))
        .max()
        .unwrap_or(LevelFilter::OFF);
    let subscriber = tracing_subscriber::registry().with(
        std::iter::once(logs)
            .chain(spans)
            .chain(more)
            .collect::<Vec<_>>(),
    );
    (subscriber, log_level.as_log())
}

/// The log layer: `format` lines to `writer`, filtered by `RUST_LOG` (else `default_filter`);
/// with `trace_ids`, lines logged inside a recorded trace carry its ids.
pub fn logs<W>(
    format: LogFormat,
    default_filter: &str,
    writer: W,
    ansi: bool,
    trace_ids: bool,
) -> Box<dyn Layer<Registry> + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match (format, trace_ids) {
        (LogFormat::Text, false) => fmt.with_filter(filter).boxed(),
        (LogFormat::Json, false) => fmt.json().flatten_event(true).with_filter(filter).boxed(),
        (LogFormat::Text, true) => {
            let text = tracing_subscriber::fmt::format().with_ansi(ansi);
            fmt.event_format(TraceIds {
                inner: text,
                json: false,
            })
            .with_filter(filter)
            .boxed()
        }
        (LogFormat::Json, true) => {
            let json = tracing_subscriber::fmt::format().json().flatten_event(true);
            fmt.json()
                .event_format(TraceIds {
                    inner: json,
                    json: true,
                })
                .with_filter(filter)
                .boxed()
        }
    }
}

/// An event format that appends the current trace's ids to what `inner` writes, on lines
/// logged inside a recorded (sampled) trace; other lines are `inner`'s unchanged.
struct TraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for TraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = current_trace() else {
            return self.inner.format_event(context, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(context, Writer::new(&mut line), event)?;
        let body = line.trim_end_matches('\n');
        let ending = &line[body.len()..];
        match body.strip_suffix('}').filter(|_| self.json) {
            Some(object) => write!(
                writer,
                "{object},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}{ending}"
            ),
            None => write!(
                writer,
                "{body} trace_id={trace_id} span_id={span_id}{ending}"
            ),
        }
    }
}

/// The ids of the trace being recorded where the caller is, and of its innermost span: the
/// OpenTelemetry layer makes a span's context current while the span is entered.
fn current_trace() -> Option<(TraceId, SpanId)> {
    opentelemetry::Context::map_current(|context| {
        let span = context.span();
        let ids = span.span_context();
        (ids.is_valid() && ids.is_sampled()).then(|| (ids.trace_id(), ids.span_id()))
    })
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
        // A span carries the fields the host gives it and nothing else: the layer's own
        // additions (the `tracing` target, the source file and line, the thread, busy and idle
        // time, clocked at every poll that enters the span) cost each span work and export
        // bytes and say nothing about the exchange.
        .with_target(false)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
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

#[cfg(test)]
mod tests {
    use tracing::Subscriber;
    use tracing_log::log;

    use super::*;

    #[tokio::test]
    async fn log_records_are_filtered_at_the_logs_level_whatever_the_trace_layer_takes() {
        let settings = FileTracing {
            otlp_endpoint: "http://127.0.0.1:9".into(),
            service_name: None,
        };
        let (spans, _tracing) = layer(&settings).unwrap();
        let logs = logs(LogFormat::Text, "info", std::io::sink, false, true);
        let (subscriber, log_level) = assemble(logs, Some(spans), Vec::new());
        // The trace layer takes its spans at TRACE...
        assert_eq!(subscriber.max_level_hint(), Some(LevelFilter::TRACE));
        // ... and `log` records below the logs' INFO stop at `log`'s own filter.
        assert_eq!(log_level, log::LevelFilter::Info);

        let logs = logs_at("debug");
        let (_, log_level) = assemble(logs, None, vec![logs_at("warn")]);
        assert_eq!(log_level, log::LevelFilter::Debug);
    }

    fn logs_at(filter: &str) -> Box<dyn Layer<Registry> + Send + Sync> {
        logs(LogFormat::Text, filter, std::io::sink, false, false)
    }
}
