//! Output Envoy would reject or silently drop is refused at the plugin that produced it, under
//! that plugin's failure policy -- never a 500 from Envoy nobody can explain.

use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::Envoy;
use extproc_testkit::fixtures::{ASM_DEMO, MISBEHAVE};
use extproc_testkit::grpc::{self, ExtProcStream};
use extproc_testkit::host::RunningHost;
use wasm_extproc::http::Phase;

use super::phases::sets;

const CASES: [&str; 7] = [
    "bad-name",
    "crlf-value",
    "set-host",
    "set-x-envoy",
    "remove-path",
    "huge-header",
    "bad-status",
];

async fn host(case: &str, policy: &str) -> RunningHost {
    RunningHost::start(
        &[("10-misbehave", MISBEHAVE), ("20-asm", ASM_DEMO)],
        &format!("[plugins.10-misbehave]\nconfig = \"{case}\"\nfailure_policy = \"{policy}\"\n"),
    )
    .await
}

#[tokio::test]
async fn invalid_output_fails_the_plugin_and_drops_its_changes() {
    for case in CASES {
        let host = host(case, "fail-open").await;
        let mut stream = ExtProcStream::connect(host.address).await;
        let answer = stream
            .exchange(grpc::request_headers(
                &[(":path", "/"), ("host", "example")],
                true,
            ))
            .await;
        let Some(Response::RequestHeaders(headers)) = &answer.response else {
            panic!("{case}: headers answer expected, got {answer:?}");
        };
        // Only the ASM plugin's change survives: x-misbehave-tried was rolled back with the rest.
        assert_eq!(
            sets(&headers.response.as_ref().unwrap().header_mutation),
            [("x-ext-proc-header".to_string(), "hello-to-asm".to_string())],
            "{case}"
        );
        assert_eq!(
            host.metrics()
                .plugin_calls("10-misbehave", Phase::RequestHeaders, "invalid_output"),
            1,
            "{case}"
        );
    }
}

#[tokio::test]
async fn under_fail_closed_invalid_output_is_an_explained_error() {
    let host = host("crlf-value", "fail-closed").await;
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    let Some(Response::ImmediateResponse(response)) = answer.response else {
        panic!("immediate response expected");
    };
    assert_eq!(response.status.unwrap().code, 500);
    assert_eq!(
        response.details,
        "wasm_extproc_plugin_failed:10-misbehave:invalid_output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_a_refused_header_never_becomes_a_mystery_500() {
    let host = host("set-host", "fail-open").await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    let response = envoy.get("/headers").await.unwrap();
    assert_eq!(response.status, 200);
    let seen = &upstream.seen()[0];
    assert_ne!(seen.header("host").as_deref(), Some("evil.example"));
    assert_eq!(seen.header("x-misbehave-tried"), None);
    assert_eq!(
        seen.header("x-ext-proc-header").as_deref(),
        Some("hello-to-asm")
    );
    assert_eq!(
        envoy
            .counter("http.ingress_http.ext_proc.rejected_header_mutations")
            .await
            .unwrap(),
        0
    );
}
