//! A plugin that traps, loops or eats memory costs only the current phase of its own stream,
//! as its failure policy says; other streams, and the host, carry on. Plugin state lives for
//! exactly one stream.

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use extproc_testkit::fixtures::{
    ASM_DEMO, Component, MEMORY_HOG, SANDBOX_PROBE, SPIN, STATEFUL, TRAP,
};
use extproc_testkit::grpc::{self, ExtProcStream};
use extproc_testkit::host::RunningHost;

use super::phases::sets;

/// The headers an answer sets, by name (the order of changes to different names does not
/// matter to Envoy).
fn header_sets(answer: &ProcessingResponse) -> Vec<(String, String)> {
    match answer.response.as_ref().unwrap() {
        Response::RequestHeaders(h) | Response::ResponseHeaders(h) => {
            let mut sets = sets(&h.response.as_ref().unwrap().header_mutation);
            sets.sort();
            sets
        }
        other => panic!("headers answer expected, got {other:?}"),
    }
}

fn asm(value: &str) -> Vec<(String, String)> {
    vec![("x-ext-proc-header".to_string(), value.to_string())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_carries_from_request_to_response_and_never_across_streams() {
    let host = RunningHost::start(&[("stateful", STATEFUL)], "").await;
    let mut client = grpc::connect(host.address).await;

    // Open every stream and send every request before any response, so the streams' instances
    // are all alive at once.
    let mut streams = Vec::new();
    for i in 0..24 {
        let mut stream = ExtProcStream::open(&mut client).await;
        stream
            .exchange(grpc::request_headers(
                &[("x-request-id", &format!("req-{i}"))],
                true,
            ))
            .await;
        streams.push(stream);
    }
    let answers = futures::future::join_all(
        streams
            .iter_mut()
            .map(|stream| stream.exchange(grpc::response_headers(&[(":status", "200")], true))),
    )
    .await;
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(
            header_sets(answer),
            [
                ("x-hook-calls".to_string(), "2".to_string()),
                ("x-seen-request-id".to_string(), format!("req-{i}")),
            ]
        );
    }
}

/// The hook-call counter the `stateful` fixture reports after `streams` exchanges one after
/// the other through a host with `settings` for it.
async fn hook_calls_after(streams: usize, settings: &str) -> Vec<String> {
    let host = RunningHost::start(&[("stateful", STATEFUL)], settings).await;
    let mut client = grpc::connect(host.address).await;
    let mut counts = Vec::new();
    for i in 0..streams {
        let mut stream = ExtProcStream::open(&mut client).await;
        stream
            .exchange(grpc::request_headers(
                &[("x-request-id", &format!("req-{i}"))],
                true,
            ))
            .await;
        let answer = stream
            .exchange(grpc::response_headers(&[(":status", "200")], true))
            .await;
        let sets = header_sets(&answer);
        assert!(
            sets.contains(&("x-seen-request-id".to_string(), format!("req-{i}"))),
            "{sets:?}"
        );
        counts.extend(
            sets.into_iter()
                .filter(|(name, _)| name == "x-hook-calls")
                .map(|(_, value)| value),
        );
        // Envoy ends each stream; the next one starts after.
        drop(stream.close());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    counts
}

#[tokio::test]
async fn by_default_no_instance_serves_two_exchanges_and_reuse_is_opt_in() {
    // Default: every exchange gets a fresh instance, so the fixture's global counter starts
    // over each time.
    assert_eq!(hook_calls_after(4, "").await, ["2", "2", "2", "2"]);
    // `isolation = "reuse"`: the instance that served one exchange serves the next, and its
    // globals carry over -- what the setting gives up, seen from the plugin.
    let reused = hook_calls_after(4, "[plugins.stateful]\nisolation = \"reuse\"\n").await;
    assert_eq!(reused, ["2", "4", "6", "8"]);
}

/// Starts `faulty` (as `10-faulty`) in front of the ASM plugin with `settings` for it.
async fn chain_with(faulty: Component, settings: &str) -> RunningHost {
    RunningHost::start(
        &[("10-faulty", faulty), ("20-asm", ASM_DEMO)],
        &format!("[plugins.10-faulty]\n{settings}\n"),
    )
    .await
}

#[tokio::test]
async fn fail_open_skips_a_trapping_plugin_and_drops_its_changes() {
    for config in ["panic", "unreachable"] {
        let host = chain_with(
            TRAP,
            &format!("failure_policy = \"fail-open\"\nconfig = \"{config}\""),
        )
        .await;
        let mut client = grpc::connect(host.address).await;
        let mut stream = ExtProcStream::open(&mut client).await;

        // The trap plugin set x-trap-was-here before it trapped: that change must not leak.
        let answer = stream
            .exchange(grpc::request_headers(&[(":path", "/")], false))
            .await;
        assert_eq!(header_sets(&answer), asm("hello-to-asm"), "{config}");
        let answer = stream
            .exchange(grpc::response_headers(&[(":status", "200")], true))
            .await;
        assert_eq!(header_sets(&answer), asm("hello-from-asm"), "{config}");
    }
}

fn immediate(answer: &ProcessingResponse) -> (i32, String) {
    match answer.response.as_ref().unwrap() {
        Response::ImmediateResponse(r) => (r.status.unwrap().code, r.details.clone()),
        other => panic!("immediate response expected, got {other:?}"),
    }
}

#[tokio::test]
async fn fail_closed_answers_with_the_configured_status() {
    let host = chain_with(
        TRAP,
        "failure_policy = \"fail-closed\"\nfailure_status = 503",
    )
    .await;
    let mut client = grpc::connect(host.address).await;
    let mut stream = ExtProcStream::open(&mut client).await;

    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    assert_eq!(
        immediate(&answer),
        (503, "wasm_extproc_plugin_failed:10-faulty:trap".to_string())
    );

    // The next stream meets the same plugin afresh and gets the same policy.
    let mut stream = ExtProcStream::open(&mut client).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    assert_eq!(immediate(&answer).0, 503);
}

#[tokio::test]
async fn the_default_policy_is_fail_closed_with_500() {
    let host = chain_with(TRAP, "").await;
    let mut client = grpc::connect(host.address).await;
    let mut stream = ExtProcStream::open(&mut client).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    assert_eq!(immediate(&answer).0, 500);
}

/// Runs a stream that trips the faulty plugin next to one that never reaches it (the faulty
/// fixtures handle only request headers). Returns the faulty stream's answer.
///
/// With `healthy_first`, the healthy stream must finish while the faulty one is still
/// misbehaving. The tests run the host, the guest and both clients on one thread, so that can
/// only happen if the misbehaving guest yields.
async fn next_to_a_healthy_stream(host: &RunningHost, healthy_first: bool) -> ProcessingResponse {
    let mut client = grpc::connect(host.address).await;
    let mut faulty = ExtProcStream::open(&mut client).await;
    faulty
        .send(grpc::request_headers(&[(":path", "/faulty")], true))
        .await;

    let mut healthy = ExtProcStream::open(&mut client).await;
    let healthy_answer = healthy.exchange(grpc::response_headers(&[(":status", "200")], true));
    if healthy_first {
        tokio::select! {
            biased;
            answer = healthy_answer => assert_eq!(header_sets(&answer), asm("hello-from-asm")),
            _ = faulty.next() => panic!("the faulty stream was answered before the healthy one"),
        }
        faulty
            .next()
            .await
            .expect("no error status")
            .expect("an answer")
    } else {
        let (answer, faulty_answer) = tokio::join!(healthy_answer, faulty.next());
        assert_eq!(header_sets(&answer), asm("hello-from-asm"));
        faulty_answer.expect("no error status").expect("an answer")
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_looping_plugin_is_stopped_at_its_deadline() {
    let host = RunningHost::start(
        &[("10-faulty", SPIN), ("20-asm", ASM_DEMO)],
        "[envoy]\nmessage_timeout_ms = 5000\n[plugins.10-faulty]\ntimeout_ms = 1500\nfailure_policy = \"fail-open\"\n",
    )
    .await;
    let answer = next_to_a_healthy_stream(&host, true).await;
    assert_eq!(header_sets(&answer), asm("hello-to-asm"));

    let host = chain_with(SPIN, "timeout_ms = 30").await;
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    assert_eq!(
        immediate(&answer),
        (
            500,
            "wasm_extproc_plugin_failed:10-faulty:deadline".to_string()
        )
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_memory_hog_is_stopped_at_its_memory_limit() {
    let host = chain_with(MEMORY_HOG, "memory_limit_mib = 16\nfailure_status = 507").await;
    let answer = next_to_a_healthy_stream(&host, false).await;
    assert_eq!(
        immediate(&answer),
        (
            507,
            "wasm_extproc_plugin_failed:10-faulty:memory_limit".to_string()
        )
    );

    let host = chain_with(
        MEMORY_HOG,
        "memory_limit_mib = 16\nfailure_policy = \"fail-open\"",
    )
    .await;
    let mut client = grpc::connect(host.address).await;
    for _ in 0..3 {
        let mut stream = ExtProcStream::open(&mut client).await;
        let answer = stream
            .exchange(grpc::request_headers(&[(":path", "/")], true))
            .await;
        assert_eq!(header_sets(&answer), asm("hello-to-asm"));
    }
}

#[tokio::test]
async fn plugins_see_no_environment_arguments_or_filesystem() {
    let host = RunningHost::start(&[("probe", SANDBOX_PROBE)], "").await;
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    let mut report = header_sets(&answer);
    report.sort();
    let expected: Vec<(String, String)> = [
        ("x-args", "0"),
        ("x-env-vars", "0"),
        ("x-root-dir", "denied"),
        ("x-tmp-file", "denied"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(report, expected);
}

/// A plugin that tries the network (TCP connect, UDP send) to a listener on this machine is
/// refused by the host, and nothing reaches the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_get_no_network() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = tcp.local_addr().unwrap();
    let udp = tokio::net::UdpSocket::bind(target).await.unwrap();
    let host = RunningHost::start(
        &[("probe", SANDBOX_PROBE)],
        &format!("[plugins.probe]\nconfig = \"{target}\"\n"),
    )
    .await;
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    let report: std::collections::BTreeMap<String, String> =
        header_sets(&answer).into_iter().collect();
    assert_eq!(report["x-tcp"], "denied: PermissionDenied", "{report:?}");
    assert_eq!(report["x-udp"], "denied: PermissionDenied", "{report:?}");
    // Nothing arrived, however long one waits for it.
    let mut datagram = [0u8; 64];
    let arrived = tokio::time::timeout(std::time::Duration::from_millis(300), async {
        tokio::select! {
            accepted = tcp.accept() => format!("a TCP connection from {:?}", accepted.map(|(_, a)| a)),
            received = udp.recv_from(&mut datagram) => format!("a datagram from {:?}", received.map(|(_, a)| a)),
        }
    })
    .await;
    assert!(arrived.is_err(), "{arrived:?}");
}
