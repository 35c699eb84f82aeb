//! Traces through a real Envoy: Envoy's OpenTelemetry tracer and the host's `[tracing]` export
//! to one collector, and the host's spans continue Envoy's trace.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, EnvoyConfig};
use extproc_testkit::fixtures::{ASM_DEMO, Component, TRAP};
use extproc_testkit::host::RunningHost;
use extproc_testkit::otlp::Collector;
use opentelemetry_proto::tonic::trace::v1::Span;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer, Registry};
use wasm_extproc::config::{FileTracing, LogFormat};
use wasm_extproc::telemetry::{CALL_SPAN, STREAM_SPAN};

/// The host's spans join Envoy's trace: its stream span is a child of the span Envoy made for
/// the ext_proc call, in the same trace, and each plugin call is a child of the stream span.
/// On the test's own thread: the host's spans go to a subscriber set for this test alone.
#[tokio::test(flavor = "current_thread")]
async fn the_hosts_spans_continue_envoys_trace() {
    let traced = Traced::start(("asm", ASM_DEMO), vec![]).await;
    let response = traced.envoy.get("/headers").await.unwrap();
    assert_eq!(response.status, 200, "{}", traced.envoy.log());
    let spans = traced.spans_from_both().await;
    let named = |name: &str| named(&spans, name);
    let streams = named(STREAM_SPAN);
    assert_eq!(streams.len(), 1, "{spans:#?}");
    let stream = streams[0];
    let envoys: Vec<&Span> = spans
        .iter()
        .filter(|(service, _)| service.contains("envoy"))
        .map(|(_, span)| span)
        .collect();
    let parent = envoys
        .iter()
        .find(|span| span.span_id == stream.parent_span_id)
        .unwrap_or_else(|| panic!("the stream span's parent is not Envoy's: {spans:#?}"));
    assert_eq!(parent.trace_id, stream.trace_id);

    let calls = named(CALL_SPAN);
    assert_eq!(calls.len(), 2, "both header phases: {spans:#?}");
    for call in calls {
        assert_eq!(call.trace_id, stream.trace_id);
        assert_eq!(call.parent_span_id, stream.span_id);
        let attribute = |key: &str| {
            call.attributes
                .iter()
                .find(|a| a.key == key)
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default()
        };
        assert!(attribute("plugin").contains("asm"), "{call:?}");
        assert!(attribute("outcome").contains("ok"), "{call:?}");
        // The host's fields, and nothing the tracing layer would add on its own (target,
        // source location, thread, busy and idle time): each is work and bytes on every span.
        // (`instantiate_us` on the call that made the stream's instance only.)
        let mut keys: Vec<&str> = call.attributes.iter().map(|a| a.key.as_str()).collect();
        keys.retain(|key| *key != "instantiate_us");
        keys.sort_unstable();
        assert_eq!(keys, ["chain", "outcome", "phase", "plugin"], "{call:?}");
    }
    let mut keys: Vec<&str> = stream.attributes.iter().map(|a| a.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["chain"], "{stream:?}");
}

/// With tracing on, a line the host logs inside a recorded trace ends with the trace's id and
/// the current span's: a plugin's failure leads to the request's trace, in JSON (top-level
/// fields) and in text. Lines logged outside a trace carry none.
#[tokio::test(flavor = "current_thread")]
async fn log_lines_inside_a_trace_carry_its_ids() {
    let (json, text) = (Lines::default(), Lines::default());
    let logs = vec![
        wasm_extproc::telemetry::logs(LogFormat::Json, "info", json.clone(), false, true),
        wasm_extproc::telemetry::logs(LogFormat::Text, "info", text.clone(), false, true),
    ];
    let traced = Traced::start(("trap", TRAP), logs).await;
    tracing::info!("before any stream");

    let response = traced.envoy.get("/headers").await.unwrap();
    assert_eq!(response.status, 500, "fail-closed: {}", traced.envoy.log());
    let spans = traced.spans_from_both().await;
    let streams = named(&spans, STREAM_SPAN);
    assert_eq!(streams.len(), 1, "{spans:#?}");
    let (trace_id, span_id) = (
        hex::encode(&streams[0].trace_id),
        hex::encode(&streams[0].span_id),
    );

    let lines: Vec<serde_json::Value> = json
        .lines()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let failure = lines
        .iter()
        .find(|line| {
            line["message"]
                .as_str()
                .unwrap_or("")
                .contains("plugin failed")
        })
        .unwrap_or_else(|| panic!("no failure logged: {lines:#?}"));
    assert_eq!(failure["plugin"], "trap", "{failure}");
    assert_eq!(failure["trace_id"], trace_id.as_str(), "{failure}");
    assert_eq!(failure["span_id"], span_id.as_str(), "{failure}");
    let before = lines
        .iter()
        .find(|line| line["message"] == "before any stream")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(before.get("trace_id").is_none(), "{before}");

    let text = text.lines();
    let failure = text
        .iter()
        .find(|line| line.contains("plugin failed"))
        .unwrap_or_else(|| panic!("no failure logged: {text:#?}"));
    assert!(
        failure.ends_with(&format!(" trace_id={trace_id} span_id={span_id}")),
        "{failure}"
    );
    let before = text
        .iter()
        .find(|line| line.contains("before any stream"))
        .unwrap();
    assert!(!before.contains("trace_id"), "{before}");
}

/// Log output kept in memory, a line at a time.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Lines {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl std::io::Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for Lines {
    type Writer = Lines;
    fn make_writer(&'w self) -> Lines {
        self.clone()
    }
}

/// `plugin` in a host behind an Envoy that traces every request, Envoy's spans and the host's
/// going to one stand-in collector. The host's spans, and the `logs` layers, go to a subscriber
/// set for the test's own thread.
struct Traced {
    collector: Collector,
    tracing: wasm_extproc::telemetry::Tracing,
    envoy: Envoy,
    _host: RunningHost,
    _upstream: EchoServer,
    _subscriber: tracing::subscriber::DefaultGuard,
}

impl Traced {
    async fn start(
        plugin: (&str, Component),
        logs: Vec<Box<dyn Layer<Registry> + Send + Sync>>,
    ) -> Traced {
        let collector = Collector::default();
        let address = collector.clone().start().await;
        let (spans, tracing) = wasm_extproc::telemetry::layer(&FileTracing {
            otlp_endpoint: format!("http://{address}"),
            service_name: Some("wasm-extproc".into()),
        })
        .unwrap();
        let layers: Vec<_> = logs.into_iter().chain([spans]).collect();
        let subscriber =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(layers));
        let host = RunningHost::start(&[plugin], "").await;
        let upstream = EchoServer::start().await.unwrap();
        let envoy = Envoy::start_with(
            &EnvoyConfig::default().traced(address),
            host.address,
            upstream.address,
        )
        .await
        .unwrap();
        Traced {
            collector,
            tracing,
            envoy,
            _host: host,
            _upstream: upstream,
            _subscriber: subscriber,
        }
    }

    /// The spans received once both Envoy's and the host's arrived. Envoy exports on its own
    /// timer (every 5 s); the host's are flushed here.
    async fn spans_from_both(&self) -> Vec<(String, Span)> {
        self.tracing.flush();
        let mut spans = Vec::new();
        for _ in 0..100 {
            spans = self.collector.spans();
            let from = |service: &str| spans.iter().any(|(s, _)| s.contains(service));
            if from("envoy") && from("wasm-extproc") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.tracing.flush();
        }
        spans
    }
}

/// The spans called `name`.
fn named<'a>(spans: &'a [(String, Span)], name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .map(|(_, span)| span)
        .filter(|span| span.name == name)
        .collect()
}
