//! The rest of an exchange through a real Envoy: immediate responses from any phase, only the
//! phases plugins need, trailers over HTTP/2, and more time for slow phases. (Attributes,
//! metadata and route cache clearing are in `conformance.rs`, in both modes.)

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, EnvoyConfig, HttpRequest, first_access_log_line};
use extproc_testkit::fixtures::{
    ASM_DEMO, BEARER_AUTH, Component, GATE, JSON_REDACT, SLOW, TAGGER, TRAP,
};
use extproc_testkit::host::RunningHost;
use wasm_extproc::http::{Direction, Phase};

struct Setup {
    host: RunningHost,
    upstream: EchoServer,
    envoy: Envoy,
}

async fn setup(plugins: &[(&str, Component)], toml: &str, config: EnvoyConfig) -> Setup {
    let host = RunningHost::start(plugins, toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start_with(&config, host.address, upstream.address)
        .await
        .unwrap();
    Setup {
        host,
        upstream,
        envoy,
    }
}

fn buffered_everything() -> EnvoyConfig {
    EnvoyConfig::default()
        .mode("request_body_mode", "BUFFERED")
        .mode("response_body_mode", "BUFFERED")
        .mode("request_trailer_mode", "SEND")
        .mode("response_trailer_mode", "SEND")
}

/// From each of the six phases (Envoy holding the response while its body and trailers are
/// processed): the client gets the plugin's answer, the upstream is reached only for response
/// phases, the plugin after the responding one never runs in that phase, and Envoy's access
/// log shows the plugin's details.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_answer_immediately_from_any_phase() {
    for phase in Phase::ALL {
        let name = phase.as_str();
        let dir = tempfile::tempdir().unwrap();
        let access_log = dir.path().join("access.log");
        let setup = setup(
            &[("10-gate", GATE), ("20-tag", TAGGER)],
            &format!("[plugins.10-gate]\nconfig = \"{name}\"\n[plugins.20-tag]\nconfig = \"T\"\n"),
            buffered_everything()
                .upstream_http2()
                .access_log(&access_log),
        )
        .await;
        let request = HttpRequest::new("POST", "/anything")
            .http2()
            .chunked(vec![b"pay".to_vec(), b"load".to_vec()])
            .trailer("x-client-trailer", "yes");
        let response = setup.envoy.send(&request).await.unwrap();
        assert_eq!(response.status, 403, "{name}");
        assert_eq!(response.header_values("x-gate"), [name]);
        assert_eq!(response.body, format!("blocked at {name}").as_bytes());
        let reached_upstream = !setup.upstream.seen().is_empty();
        assert_eq!(
            reached_upstream,
            phase.direction() == Direction::Response,
            "{name}"
        );
        // The plugin after the gate ran in every phase before, never in the one answered.
        let metrics = setup.host.metrics();
        for earlier in Phase::ALL {
            let calls = metrics.plugin_calls("20-tag", earlier, "ok");
            let expected = u64::from((earlier as usize) < (phase as usize));
            assert_eq!(calls, expected, "20-tag in {earlier:?}, answered at {name}");
        }
        // Envoy writes the access log line when the stream ends, just after the answer.
        let logged = first_access_log_line(&access_log).await;
        assert_eq!(logged, format!("403 gate_{name}"));
    }
}

/// A gRPC client sees the plugin's gRPC status, and the body as its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_sees_the_immediate_responses_grpc_status() {
    let setup = setup(
        &[("gate", GATE)],
        "[plugins.gate]\nconfig = \"request_headers\"\n",
        EnvoyConfig::default(),
    )
    .await;
    let request = HttpRequest::new("POST", "/pkg.Service/Method")
        .http2()
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0, 0, 0, 0, 0]);
    let response = setup.envoy.send(&request).await.unwrap();
    // gRPC carries the failure in grpc-status, not the HTTP status (a trailers-only answer).
    assert_eq!(response.status, 200);
    assert_eq!(response.header_values("grpc-status"), ["7"]);
    assert_eq!(
        response.header_values("grpc-message"),
        ["blocked at request_headers"]
    );
    assert!(setup.upstream.seen().is_empty());
}

/// A plugin failing under `fail-closed` is named, with the failure's kind, where an operator
/// looks: Envoy's access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_closed_failure_names_plugin_and_kind_in_envoys_access_log() {
    let dir = tempfile::tempdir().unwrap();
    let access_log = dir.path().join("access.log");
    let setup = setup(
        &[("10-trap", TRAP), ("20-asm", ASM_DEMO)],
        "[plugins.10-trap]\nfailure_status = 503\n",
        EnvoyConfig::default().access_log(&access_log),
    )
    .await;
    let response = setup.envoy.get("/headers").await.unwrap();
    assert_eq!(response.status, 503);
    assert!(setup.upstream.seen().is_empty());
    assert_eq!(
        first_access_log_line(&access_log).await,
        "503 wasm_extproc_plugin_failed:10-trap:trap"
    );
}

/// A body plugin behind the guide's filter (body modes `NONE`) would silently never run: the
/// host says so once per chain and direction, with the setting to change, and counts the
/// streams.
#[tokio::test(flavor = "current_thread")]
async fn a_body_plugin_behind_an_envoy_sending_no_body_is_named_once() {
    let (captured, _guard) = super::hostile::Captured::on_this_thread(tracing::Level::WARN);
    let setup = setup(
        &[("10-redact", JSON_REDACT), ("20-asm", ASM_DEMO)],
        "[plugins.10-redact]\nconfig = \"password\"\n",
        EnvoyConfig::default(),
    )
    .await;
    for _ in 0..3 {
        let response = setup
            .envoy
            .send(&HttpRequest::new("POST", "/anything").body(br#"{"password":"x"}"#.to_vec()))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }
    let metrics = setup.host.metrics();
    assert_eq!(metrics.bodies_not_sent(Direction::Request), 3);
    let log = captured.text();
    let notices: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Envoy's ext_proc filter sends none"))
        .collect();
    let requests: Vec<&&str> = notices
        .iter()
        .filter(|l| l.contains("processing_mode.request_body_mode to BUFFERED"))
        .collect();
    assert_eq!(requests.len(), 1, "{log}");
    assert!(requests[0].contains("10-redact"), "{log}");
}

/// In `observability_mode` Envoy sends every message without waiting: the plugins run on each,
/// and nothing they change reaches the request or the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_observability_mode_plugins_run_and_change_nothing() {
    let setup = setup(
        &[("asm", ASM_DEMO)],
        "",
        EnvoyConfig::default().filter("observability_mode: true"),
    )
    .await;
    for _ in 0..3 {
        let response = setup.envoy.get("/headers").await.unwrap();
        assert_eq!(response.status, 200);
        assert!(response.header_values("x-ext-proc-header").is_empty());
    }
    assert!(
        setup
            .upstream
            .seen()
            .iter()
            .all(|r| !r.headers.iter().any(|(n, _)| n == "x-ext-proc-header"))
    );
    // Envoy does not wait for the host, so the calls may land just after the responses.
    let metrics = setup.host.metrics();
    let ran = |phase| metrics.plugin_calls("asm", phase, "ok");
    for _ in 0..200 {
        if ran(Phase::RequestHeaders) == 3 && ran(Phase::ResponseHeaders) == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        (ran(Phase::RequestHeaders), ran(Phase::ResponseHeaders)),
        (3, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_auth_example_answers_401_before_the_upstream() {
    let setup = setup(
        &[("10-auth", BEARER_AUTH), ("20-asm", ASM_DEMO)],
        "[plugins.10-auth]\nconfig = \"realm=api;tokens=s3cret,other\"\n",
        EnvoyConfig::default(),
    )
    .await;

    let denied = setup.envoy.get("/headers").await.unwrap();
    assert_eq!(denied.status, 401);
    assert_eq!(
        denied.header_values("www-authenticate"),
        ["Bearer realm=\"api\""]
    );
    assert_eq!(denied.body, br#"{"error":"unauthorized"}"#);
    let wrong = setup
        .envoy
        .request(
            "GET",
            "/headers",
            &[("authorization", "Bearer guess")],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    assert!(
        setup.upstream.seen().is_empty(),
        "the upstream was never touched"
    );

    let allowed = setup
        .envoy
        .request(
            "GET",
            "/headers",
            &[("authorization", "Bearer s3cret")],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(allowed.status, 200);
    assert_eq!(
        allowed.header_values("x-ext-proc-header"),
        ["hello-from-asm"]
    );
    assert_eq!(setup.upstream.seen().len(), 1);
}

fn body_and_trailer_messages(host: &RunningHost) -> u64 {
    [
        Phase::RequestBody,
        Phase::RequestTrailers,
        Phase::ResponseBody,
        Phase::ResponseTrailers,
    ]
    .into_iter()
    .map(|p| host.metrics().messages_received(p))
    .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sends_no_body_when_no_plugin_needs_one() {
    // Envoy is told to buffer and send both bodies and trailers; the ASM plugin handles
    // headers only, so the host switches the rest off with mode_override.
    let setup = setup(&[("asm", ASM_DEMO)], "", buffered_everything()).await;
    for size in [10, 300_000] {
        let body = vec![b'x'; size];
        let response = setup
            .envoy
            .request("POST", "/anything", &[], body.clone())
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, body);
        assert_eq!(
            response.header_values("x-ext-proc-header"),
            ["hello-from-asm"]
        );
    }
    let metrics = setup.host.metrics();
    assert_eq!(metrics.messages_received(Phase::RequestHeaders), 2);
    assert_eq!(metrics.messages_received(Phase::ResponseHeaders), 2);
    assert_eq!(body_and_trailer_messages(&setup.host), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mode_override_the_host_closes_the_stream_once_nothing_is_left() {
    // Envoy may not take mode_override here; the auth plugin needs request headers only, so
    // the host closes the stream after answering them and Envoy carries on without it.
    let config =
        buffered_everything().edit("allow_mode_override: true", "allow_mode_override: false");
    let setup = setup(
        &[("auth", BEARER_AUTH)],
        "[plugins.auth]\nconfig = \"tokens=t\"\n",
        config,
    )
    .await;
    let body = vec![b'y'; 200_000];
    let response = setup
        .envoy
        .request(
            "POST",
            "/anything",
            &[("authorization", "Bearer t")],
            body.clone(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, body);
    assert_eq!(setup.upstream.seen()[0].body, body);
    assert_eq!(body_and_trailer_messages(&setup.host), 0);
    assert_eq!(
        setup
            .envoy
            .counter("http.ingress_http.ext_proc.streams_failed")
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_cross_an_http2_exchange_in_both_directions() {
    let config = EnvoyConfig::default()
        .mode("request_trailer_mode", "SEND")
        .mode("response_trailer_mode", "SEND")
        .upstream_http2();
    let setup = setup(
        &[("tag", TAGGER)],
        "[plugins.tag]\nconfig = \"T\"\n",
        config,
    )
    .await;
    let request = HttpRequest::new("POST", "/anything")
        .http2()
        .header("content-type", "application/grpc")
        .chunked(vec![b"pay".to_vec(), b"load".to_vec()])
        .trailer("x-client-trailer", "yes");
    let response = setup.envoy.send(&request).await.unwrap();

    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"payload");
    let seen = &setup.upstream.seen()[0];
    let trailer = |name: &str| {
        seen.trailers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(trailer("x-client-trailer").as_deref(), Some("yes"));
    assert_eq!(
        trailer("x-chain").as_deref(),
        Some("T"),
        "request trailers changed by the plugin"
    );
    let mut trailers = response.trailers.clone();
    trailers.sort();
    assert_eq!(
        trailers,
        [
            ("x-chain".to_string(), "T".to_string()),
            ("x-upstream-trailer".to_string(), "seen".to_string()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_phase_asks_envoy_for_more_time() {
    // 300 ms of work against Envoy's 200 ms message_timeout: the host asks for more, within
    // the filter's max_message_timeout.
    let config = EnvoyConfig::default().filter("max_message_timeout: 2s");
    let setup = setup(
        &[("slow", SLOW)],
        "[envoy]\nmessage_timeout_ms = 200\nmax_message_timeout_ms = 2000\n\
         [plugins.slow]\nconfig = \"300\"\ntimeout_ms = 600\n",
        config,
    )
    .await;
    let response = setup.envoy.get("/headers").await.unwrap();
    assert_eq!(response.status, 200, "{}", setup.envoy.log());
    assert_eq!(
        setup.upstream.seen()[0].header("x-slow").as_deref(),
        Some("done")
    );
    assert_eq!(
        setup
            .envoy
            .counter("http.ingress_http.ext_proc.message_timeouts")
            .await
            .unwrap(),
        0
    );
}
