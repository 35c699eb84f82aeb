//! Overload through Envoy: while the host runs too far behind, new streams are refused and
//! Envoy's `failure_mode_allow` decides what their requests get; the streams in progress are
//! answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, EnvoyConfig};
use extproc_testkit::fixtures::SLOW_BUNDLED;
use extproc_testkit::host::RunningHost;

/// Clients sending one request after another, more than the host's two workers keep up with.
const CLIENTS: usize = 40;
/// How long they keep sending.
const LOAD: Duration = Duration::from_secs(2);

/// A plugin that computes some 20 ms per request, holding its worker (no fiber; a budget far
/// above it, so that a busy test machine cannot make it fail), on a host with two workers,
/// forty clients sending back to back: work waits longer than `shed_after_ms` (50) and new streams are refused;
/// Envoy, failing open, passes their requests on unprocessed. Every request is answered 200
/// and reaches the upstream; exactly those the host counted as refused pass without the
/// plugin's header, as many as Envoy let through for a failed stream; none waited out Envoy's
/// message_timeout; and some were served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_host_runs_behind_new_streams_are_refused_and_envoy_decides() {
    let host = RunningHost::start(
        &[("slow", SLOW_BUNDLED)],
        "[envoy]\nmessage_timeout_ms = 5000\n\
         [overload]\nshed_after_ms = 50\n\
         [plugins.slow]\nconfig = \"cpu:30\"\n\
         timeout_ms = 2000\n",
    )
    .await;
    let upstream = EchoServer::start().await.unwrap();
    let config = EnvoyConfig::default()
        .edit("failure_mode_allow: false", "failure_mode_allow: true")
        .edit("message_timeout: 0.2s", "message_timeout: 5s");
    let envoy = Arc::new(
        Envoy::start_with(&config, host.address, upstream.address)
            .await
            .unwrap(),
    );

    let until = Instant::now() + LOAD;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let envoy = envoy.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while Instant::now() < until {
                    let path = format!("/client-{client}/{}", statuses.len());
                    statuses.push(envoy.get(&path).await.unwrap().status);
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for client in clients {
        statuses.extend(client.await.unwrap());
    }

    assert!(
        statuses.iter().all(|&status| status == 200),
        "{statuses:?}\n{}",
        envoy.log()
    );
    let seen = upstream.seen();
    assert_eq!(
        seen.len(),
        statuses.len(),
        "every request reached the upstream"
    );
    let unprocessed = seen.iter().filter(|s| s.header("x-slow").is_none()).count() as u64;
    let refused = host.metrics().refusals("ext_proc", "overload");
    assert!(refused > 0, "nothing was shed in {} requests", seen.len());
    assert!(
        unprocessed < seen.len() as u64,
        "every one of {} requests was shed",
        seen.len()
    );
    assert_eq!(unprocessed, refused, "the requests shed are those refused");
    assert_eq!(
        envoy
            .counter("http.ingress_http.ext_proc.failure_mode_allowed")
            .await
            .unwrap(),
        refused,
        "Envoy passed on each refused stream's request"
    );
    assert_eq!(
        envoy
            .counter("http.ingress_http.ext_proc.message_timeouts")
            .await
            .unwrap(),
        0
    );
}
