//! Plugins calling out over HTTP (`wasi:http/outgoing-handler`), through Envoy: a token check
//! cached in the state store, a JavaScript plugin using `fetch`, a destination not on the
//! allow-list refused before any connection, a slow one cut at the plugin's budget.

use extproc_testkit::series::CapabilitySeries as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, HttpResponse};
use extproc_testkit::fixtures::{POLICY_CHECK_JS, TOKEN_INTROSPECT};
use extproc_testkit::host::RunningHost;
use extproc_testkit::service::Service;

/// An OAuth introspection endpoint: `good` is active for alice for another minute, anything
/// else is inactive.
pub(super) async fn introspection(delay: Duration) -> Service {
    Service::start(
        delay,
        Arc::new(|body: &[u8]| {
            let form = String::from_utf8_lossy(body);
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 60;
            if form.split('&').any(|p| p == "token=good") {
                (
                    200,
                    format!(r#"{{"active":true,"sub":"alice","exp":{exp}}}"#),
                )
            } else {
                (200, r#"{"active":false}"#.into())
            }
        }),
    )
    .await
    .unwrap()
}

pub(super) async fn with_token(envoy: &Envoy, token: Option<&str>) -> HttpResponse {
    let header = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = header
        .iter()
        .map(|h| ("authorization", h.as_str()))
        .collect();
    envoy
        .request("GET", "/headers", &headers, Vec::new())
        .await
        .unwrap()
}

/// A token is checked with the endpoint once, then answered from the state store; an inactive
/// or missing token is refused before the upstream.
#[tokio::test]
async fn a_token_check_calls_the_endpoint_once_and_caches_the_answer() {
    let endpoint = introspection(Duration::ZERO).await;
    let toml = format!(
        "[plugins.10-token]\nconfig = \"endpoint={}/introspect\"\nhttp_allow = [\"{}\"]\n",
        endpoint.origin(),
        endpoint.origin()
    );
    let host = RunningHost::start(&[("10-token", TOKEN_INTROSPECT)], &toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();

    for _ in 0..3 {
        let response = with_token(&envoy, Some("good")).await;
        assert_eq!(response.status, 200, "{}", envoy.log());
        assert_eq!(
            response.json().unwrap()["headers"]["X-Auth-Subject"],
            "alice"
        );
    }
    assert_eq!(endpoint.received(), 1, "the answer was cached");
    for token in [Some("revoked"), Some("revoked"), None] {
        let response = with_token(&envoy, token).await;
        assert_eq!(response.status, 401, "{token:?}");
        assert!(response.header_values("www-authenticate")[0].starts_with("Bearer error="));
    }
    assert_eq!(endpoint.received(), 2, "the inactive answer was cached too");
    let metrics = host.metrics();
    let origin = format!("http://{}", endpoint.address);
    assert_eq!(
        metrics.outbound_requests("default", "10-token", &origin, "ok"),
        2
    );
    assert!(
        metrics
            .render()
            .contains("wasm_extproc_outbound_request_duration_seconds_count")
    );
}

/// A JavaScript plugin's own `fetch` goes out through the host, to an allowed policy service.
#[tokio::test]
async fn a_javascript_plugin_calls_out_with_fetch() {
    let policy = Service::start(
        Duration::ZERO,
        Arc::new(|body: &[u8]| {
            let input: serde_json::Value = serde_json::from_slice(body).unwrap();
            let allowed = input["input"]["user"] == "alice" && input["input"]["method"] == "GET";
            (200, format!(r#"{{"result":{allowed}}}"#))
        }),
    )
    .await
    .unwrap();
    let toml = format!(
        "[runtime]\nmax_instances = 64\nmax_wasi_instances = 16\n\
         [plugins.10-policy]\nconfig = '{{\"url\": \"{}/v1/data/httpapi/allow\"}}'\n\
         http_allow = [\"{}\"]\nmemory_limit_mib = 128\ntimeout_ms = 5000\n",
        policy.origin(),
        policy.origin()
    );
    let host = RunningHost::start(&[("10-policy", POLICY_CHECK_JS)], &toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    let alice = envoy
        .request("GET", "/headers", &[("x-user", "alice")], Vec::new())
        .await
        .unwrap();
    assert_eq!(alice.status, 200, "{}", envoy.log());
    let bob = envoy
        .request("GET", "/headers", &[("x-user", "bob")], Vec::new())
        .await
        .unwrap();
    assert_eq!(bob.status, 403);
    assert_eq!(bob.body, br#"{"error":"forbidden by policy"}"#);
    assert_eq!(policy.received(), 2);
}

/// An origin the plugin was not allowed is refused in the host, before any connection; a
/// destination slower than the plugin's budget is cut when the budget ends (100 ms, inside
/// Envoy's 200 ms `message_timeout`, so the plugin's answer is what the client gets). Either
/// way the plugin sees an error and answers by its own choice (here 503).
#[tokio::test]
async fn a_destination_not_allowed_is_refused_and_a_slow_one_is_cut_at_the_budget() {
    let upstream = EchoServer::start().await.unwrap();
    let endpoint = introspection(Duration::ZERO).await;
    let elsewhere = "http://127.0.0.1:1";
    let toml = format!(
        "[plugins.10-token]\nconfig = \"endpoint={}/introspect\"\nhttp_allow = [\"{elsewhere}\"]\n",
        endpoint.origin()
    );
    let host = RunningHost::start(&[("10-token", TOKEN_INTROSPECT)], &toml).await;
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    assert_eq!(with_token(&envoy, Some("good")).await.status, 503);
    assert_eq!(endpoint.received(), 0, "no connection was made");
    let metrics = host.metrics();
    assert_eq!(
        metrics.outbound_requests("default", "10-token", "not_allowed", "denied"),
        1
    );

    let slow = introspection(Duration::from_secs(3)).await;
    let toml = format!(
        "[defaults]\ntimeout_ms = 100\n[envoy]\nmessage_timeout_ms = 200\n\
         [plugins.10-token]\nconfig = \"endpoint={}/introspect\"\nhttp_allow = [\"{}\"]\n",
        slow.origin(),
        slow.origin()
    );
    let host = RunningHost::start(&[("10-token", TOKEN_INTROSPECT)], &toml).await;
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    let started = Instant::now();
    let response = with_token(&envoy, Some("good")).await;
    let took = started.elapsed();
    assert_eq!(response.status, 503, "{}", envoy.log());
    assert!(
        took < Duration::from_secs(2),
        "cut at the budget, not the service: {took:?}"
    );
    assert_eq!(slow.received(), 1);
    assert_eq!(
        host.metrics()
            .outbound_requests("default", "10-token", &slow.origin(), "timeout"),
        1,
        "{}",
        host.metrics().render()
    );
}

/// A response body past the plugin's cap, and a request past its share of connections, are
/// errors the plugin sees (here: 503), counted per destination.
#[tokio::test]
async fn response_bodies_and_requests_in_flight_are_capped() {
    let upstream = EchoServer::start().await.unwrap();
    let big = Service::start(
        Duration::ZERO,
        Arc::new(|_: &[u8]| {
            (
                200,
                format!(r#"{{"active":true,"pad":"{}"}}"#, "x".repeat(4096)),
            )
        }),
    )
    .await
    .unwrap();
    let toml = format!(
        "[plugins.10-token]\nconfig = \"endpoint={}/introspect\"\nhttp_allow = [\"{}\"]\n\
         http_max_response_bytes = 1024\n",
        big.origin(),
        big.origin()
    );
    let host = RunningHost::start(&[("10-token", TOKEN_INTROSPECT)], &toml).await;
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    assert_eq!(with_token(&envoy, Some("good")).await.status, 503);
    let metrics = host.metrics();
    let counted = |result| metrics.outbound_requests("default", "10-token", &big.origin(), result);
    assert_eq!((counted("ok"), counted("body_too_large")), (1, 1));

    // One request at a time: the second of two at once is refused while the first waits on a
    // slow endpoint (inside Envoy's 200 ms message timeout).
    let slow = introspection(Duration::from_millis(100)).await;
    let toml = format!(
        "[defaults]\ntimeout_ms = 150\n[envoy]\nmessage_timeout_ms = 200\n\
         [plugins.10-token]\nconfig = \"endpoint={}/introspect\"\nhttp_allow = [\"{}\"]\n\
         http_max_concurrent = 1\n",
        slow.origin(),
        slow.origin()
    );
    let host = RunningHost::start(&[("10-token", TOKEN_INTROSPECT)], &toml).await;
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    let (first, second) = tokio::join!(
        with_token(&envoy, Some("good")),
        with_token(&envoy, Some("other"))
    );
    let mut statuses = [first.status, second.status];
    statuses.sort();
    let metrics = host.metrics();
    let counted = |result| metrics.outbound_requests("default", "10-token", &slow.origin(), result);
    assert_eq!(counted("limit"), 1, "{}", metrics.render());
    assert_eq!(statuses[1], 503);
    assert_eq!(slow.received(), 1);
}

/// A client that makes the check fail (here the endpoint is down) with `on_error=allow` is let
/// through, but never with the subject it claimed: the upstream sees no `x-auth-subject` unless
/// the plugin checked one.
#[tokio::test]
async fn a_failed_check_never_forwards_the_clients_own_subject() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = format!(
        "[plugins.10-token]\nconfig = \"endpoint=http://{closed}/introspect;on_error=allow\"\n\
         http_allow = [\"http://{closed}\"]\n"
    );
    let host = RunningHost::start(&[("10-token", TOKEN_INTROSPECT)], &toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    let response = envoy
        .request(
            "GET",
            "/headers",
            &[
                ("authorization", "Bearer junk"),
                ("x-auth-subject", "admin"),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", envoy.log());
    let seen = upstream.seen().last().unwrap().clone();
    assert_eq!(seen.header("x-auth-subject"), None, "{:?}", seen.headers);
    let origin = format!("http://{closed}");
    assert_eq!(
        host.metrics()
            .outbound_requests("default", "10-token", &origin, "error"),
        1,
        "{}",
        host.metrics().render()
    );
}
