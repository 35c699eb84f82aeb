//! Traces through a real Envoy: Envoy's OpenTelemetry tracer and the host's `[tracing]` export
//! to one collector, and the host's spans continue Envoy's trace.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, EnvoyConfig};
use extproc_testkit::fixtures::ASM_DEMO;
use extproc_testkit::host::RunningHost;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tracing_subscriber::layer::SubscriberExt;
use wasm_extproc::config::FileTracing;
use wasm_extproc::telemetry::{CALL_SPAN, STREAM_SPAN};

/// A stand-in for an OpenTelemetry collector: keeps every span it is sent, with its service.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start(self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

/// Envoy tracing every request with its OpenTelemetry tracer, exporting to `collector`.
fn traced_envoy(collector: std::net::SocketAddr) -> EnvoyConfig {
    EnvoyConfig::default()
        .edit(
            "                stat_prefix: ingress_http\n",
            "                stat_prefix: ingress_http
                tracing:
                  provider:
                    name: envoy.tracers.opentelemetry
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                      grpc_service:
                        envoy_grpc:
                          cluster_name: otlp
                      service_name: envoy
",
        )
        .edit(
            "  clusters:\n",
            &format!(
                "  clusters:
    - name: otlp
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {{}}
      load_assignment:
        cluster_name: otlp
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: 127.0.0.1, port_value: {} }}
",
                collector.port()
            ),
        )
}

/// The host's spans join Envoy's trace: its stream span is a child of the span Envoy made for
/// the ext_proc call, in the same trace, and each plugin call is a child of the stream span.
/// On the test's own thread: the host's spans go to a subscriber set for this test alone.
#[tokio::test(flavor = "current_thread")]
async fn the_hosts_spans_continue_envoys_trace() {
    let collector = Collector::default();
    let address = collector.clone().start().await;
    let (layer, tracing) = wasm_extproc::telemetry::layer(&FileTracing {
        otlp_endpoint: format!("http://{address}"),
        service_name: Some("wasm-extproc".into()),
    })
    .unwrap();
    let _traced = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));

    let host = RunningHost::start(&[("asm", ASM_DEMO)], "").await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start_with(&traced_envoy(address), host.address, upstream.address)
        .await
        .unwrap();
    let response = envoy.get("/headers").await.unwrap();
    assert_eq!(response.status, 200, "{}", envoy.log());
    tracing.flush();

    // Envoy exports on its own timer (every 5 s).
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = collector.spans();
        let from = |service: &str| spans.iter().any(|(s, _)| s.contains(service));
        if from("envoy") && from("wasm-extproc") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        tracing.flush();
    }
    let named = |name: &str| -> Vec<&Span> {
        spans
            .iter()
            .map(|(_, span)| span)
            .filter(|span| span.name == name)
            .collect()
    };
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
    }
}
