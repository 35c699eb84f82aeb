//! Hostile plugins and hostile input: every failure stays inside its own phase and stream,
//! handled by policy, logged with plugin, phase and kind, and the host's memory stays bounded.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use extproc_testkit::fixtures::{
    ASM_DEMO, Component, FLAKY, FLOOD, MEMORY_HOG, RECURSE, SLOW, SPIN, STATEFUL, TRAP,
};
use extproc_testkit::grpc::{self, ExtProcStream};
use extproc_testkit::host::RunningHost;
use prost::Message;
use wasm_extproc::http::Phase;

use super::phases::sets;

fn header_sets(answer: &ProcessingResponse) -> Vec<(String, String)> {
    match answer.response.as_ref().unwrap() {
        Response::RequestHeaders(h) | Response::ResponseHeaders(h) => {
            sets(&h.response.as_ref().unwrap().header_mutation)
        }
        other => panic!("headers answer expected, got {other:?}"),
    }
}

fn immediate(answer: &ProcessingResponse) -> (i32, String) {
    match answer.response.as_ref().unwrap() {
        Response::ImmediateResponse(r) => (r.status.unwrap().code, r.details.clone()),
        other => panic!("immediate response expected, got {other:?}"),
    }
}

fn asm() -> Vec<(String, String)> {
    vec![("x-ext-proc-header".to_string(), "hello-to-asm".to_string())]
}

/// `faulty` (as `10-faulty`, fail-open, with `settings`) in front of the ASM plugin. Envoy is
/// said to wait 5 s, so budgets can be generous where an unoptimised test build needs it.
async fn chain(faulty: Component, settings: &str) -> RunningHost {
    RunningHost::start(
        &[("10-faulty", faulty), ("20-asm", ASM_DEMO)],
        &format!(
            "[envoy]\nmessage_timeout_ms = 5000\n\
             [plugins.10-faulty]\nfailure_policy = \"fail-open\"\n{settings}\n"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_in_the_zoo_costs_only_its_own_phase() {
    // (fixture, settings, the outcome the host records, what survives of the plugin's output)
    let zoo: [(Component, &str, &str); 11] = [
        (TRAP, "config = \"panic\"", "trap"),
        (TRAP, "config = \"unreachable\"", "trap"),
        (SPIN, "timeout_ms = 50", "deadline"),
        (MEMORY_HOG, "memory_limit_mib = 16", "memory_limit"),
        (RECURSE, "", "trap"),
        // Copying 10 MiB out of the guest takes a while in an unoptimised test build.
        (
            FLOOD,
            "config = \"value\"\ntimeout_ms = 2000",
            "invalid_output",
        ),
        (
            FLOOD,
            "config = \"count\"\ntimeout_ms = 2000",
            "invalid_output",
        ),
        // The host's own bounds stop these inside the call (the guard, which would refuse
        // the output afterwards as invalid_output, never sees them).
        (FLOOD, "config = \"entries\"\ntimeout_ms = 2000", "trap"),
        (FLOOD, "config = \"bytes\"\ntimeout_ms = 2000", "trap"),
        (FLOOD, "config = \"metadata\"\ntimeout_ms = 2000", "trap"),
        // Close to its deadline, but inside it: no failure at all.
        (SLOW, "config = \"10\"\ntimeout_ms = 50", "ok"),
    ];
    for (fixture, settings, outcome) in zoo {
        let host = chain(fixture, settings).await;
        let mut stream = ExtProcStream::connect(host.address).await;
        let answer = stream
            .exchange(grpc::request_headers(&[(":path", "/")], false))
            .await;
        let mut expected = asm();
        if outcome == "ok" {
            expected.push(("x-slow".to_string(), "done".to_string()));
            expected.sort();
        }
        let mut got = header_sets(&answer);
        got.sort();
        assert_eq!(got, expected, "{} ({settings})", fixture.name());
        assert_eq!(
            host.metrics()
                .plugin_calls("10-faulty", Phase::RequestHeaders, outcome),
            1,
            "{} ({settings})",
            fixture.name()
        );
        // The same stream goes on: the response is processed normally.
        let answer = stream
            .exchange(grpc::response_headers(&[(":status", "200")], true))
            .await;
        assert_eq!(
            header_sets(&answer),
            [(
                "x-ext-proc-header".to_string(),
                "hello-from-asm".to_string()
            )]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_through_a_flaky_plugin_fail_exactly_where_it_fails() {
    // One in five fails: with the breaker on, five failures could line up in a row and
    // quarantine it, which is not what this test is about.
    let host = chain(FLAKY, "config = \"5\"\nbreaker_threshold = 0").await;
    let answers = futures::future::join_all((1..=60).map(|id| {
        let address = host.address;
        async move {
            let mut stream = ExtProcStream::connect(address).await;
            let id = id.to_string();
            let answer = stream
                .exchange(grpc::request_headers(&[("x-request-id", &id)], true))
                .await;
            (id, header_sets(&answer))
        }
    }))
    .await;
    for (id, mut got) in answers {
        got.sort();
        let mut expected = asm();
        if id.parse::<u32>().unwrap() % 5 != 0 {
            expected.push(("x-flaky".to_string(), "passed".to_string()));
        }
        expected.sort();
        assert_eq!(got, expected, "request {id}");
    }
    let metrics = host.metrics();
    assert_eq!(
        metrics.plugin_calls("10-faulty", Phase::RequestHeaders, "trap"),
        12
    );
    assert_eq!(
        metrics.plugin_calls("10-faulty", Phase::RequestHeaders, "ok"),
        48
    );
    assert_eq!(
        metrics.plugin_calls("20-asm", Phase::RequestHeaders, "ok"),
        60
    );
}

/// Opens a stream and sends request headers with `x-request-id: id` (the request not yet ended,
/// so the stream and its instances stay open); returns the stream and the answer.
async fn open_with_id(host: &RunningHost, id: u32) -> (ExtProcStream, ProcessingResponse) {
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(grpc::request_headers(
            &[("x-request-id", &id.to_string())],
            false,
        ))
        .await;
    (stream, answer)
}

/// The flaky plugin's answer to a request with `x-request-id: id`, from the client
/// `10.0.0.CLIENT` as Envoy's `source.address` says.
async fn flaky_answer(host: &RunningHost, id: u32, client: u8) -> ProcessingResponse {
    let mut stream = ExtProcStream::connect(host.address).await;
    stream
        .exchange(grpc::from(
            grpc::request_headers(&[("x-request-id", &id.to_string())], true),
            &format!("10.0.0.{client}:4000"),
        ))
        .await
}

/// The flaky plugin failing on even ids (503), its breaker tripping after three failures in a
/// row from three clients, for `backoff_ms`.
async fn flaky_breaking_after_three(backoff_ms: u64) -> RunningHost {
    RunningHost::start(
        &[("flaky", FLAKY)],
        &format!(
            "[plugins.flaky]\nconfig = \"2\"\nfailure_status = 503\n\
             breaker_threshold = 3\nbreaker_backoff_ms = {backoff_ms}\n"
        ),
    )
    .await
}

fn passed() -> Vec<(String, String)> {
    vec![("x-flaky".to_string(), "passed".to_string())]
}

#[tokio::test]
async fn a_plugin_failing_for_several_clients_is_quarantined_for_them_then_probed() {
    // Fails on even ids. Three failures in a row, from three clients, quarantine it for 300 ms.
    let host = flaky_breaking_after_three(300).await;
    for (id, client) in [(2, 1), (4, 2), (6, 3)] {
        assert_eq!(
            immediate(&flaky_answer(&host, id, client).await),
            (503, "wasm_extproc_plugin_failed:flaky:trap".to_string())
        );
    }
    // Quarantined for the clients it failed for: not called at all -- even a request it would
    // pass gets the policy.
    for (id, client) in [(1, 1), (3, 2)] {
        assert_eq!(
            immediate(&flaky_answer(&host, id, client).await),
            (
                503,
                "wasm_extproc_plugin_failed:flaky:quarantined".to_string()
            )
        );
    }
    let metrics = host.metrics();
    assert_eq!(
        metrics.plugin_calls("flaky", Phase::RequestHeaders, "quarantined"),
        2
    );
    assert_eq!(
        metrics.plugin_calls("flaky", Phase::RequestHeaders, "trap"),
        3
    );

    // After the back-off, a probe: it passes, and the plugin serves again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(header_sets(&flaky_answer(&host, 5, 1).await), passed());
    assert_eq!(header_sets(&flaky_answer(&host, 7, 2).await), passed());
    // Failing again fails as usual, not as quarantined.
    assert_eq!(
        immediate(&flaky_answer(&host, 8, 3).await).1,
        "wasm_extproc_plugin_failed:flaky:trap"
    );
}

#[tokio::test]
async fn one_client_cannot_quarantine_a_plugin_and_a_new_client_ends_a_quarantine() {
    let host = flaky_breaking_after_three(60_000).await;
    // One client failing it twenty times in a row: each of its requests fails for itself, and
    // the plugin serves everyone as before -- that client included.
    for id in (2..=40).step_by(2) {
        assert_eq!(
            immediate(&flaky_answer(&host, id, 1).await).1,
            "wasm_extproc_plugin_failed:flaky:trap"
        );
    }
    assert_eq!(header_sets(&flaky_answer(&host, 41, 2).await), passed());
    assert_eq!(header_sets(&flaky_answer(&host, 43, 1).await), passed());
    // Three clients trip it; a fourth, which never failed, is still called, passes, and the
    // plugin serves everybody again.
    for (id, client) in [(42, 1), (44, 2), (46, 3)] {
        flaky_answer(&host, id, client).await;
    }
    assert!(
        immediate(&flaky_answer(&host, 45, 1).await)
            .1
            .ends_with(":quarantined")
    );
    assert_eq!(header_sets(&flaky_answer(&host, 47, 4).await), passed());
    assert_eq!(header_sets(&flaky_answer(&host, 49, 1).await), passed());
    let metrics = host.metrics();
    assert_eq!(
        metrics.plugin_calls("flaky", Phase::RequestHeaders, "quarantined"),
        1
    );
}

/// Collects what the host logs on this thread.
#[derive(Clone, Default)]
pub(super) struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Captures what is logged on this thread at `level` and above, until the guard drops.
    pub(super) fn on_this_thread(
        level: tracing::Level,
    ) -> (Captured, tracing::subscriber::DefaultGuard) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }
}

impl Captured {
    /// Everything logged so far.
    pub(super) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn failures_are_logged_with_plugin_phase_and_kind_and_quarantine_once() {
    // The runtime is single-threaded: the host's tasks log on this thread.
    let (captured, _guard) = Captured::on_this_thread(tracing::Level::WARN);

    let host = RunningHost::start(
        &[("trap", TRAP)],
        "[plugins.trap]\nbreaker_threshold = 2\nbreaker_min_clients = 2\n\
         breaker_backoff_ms = 60000\n",
    )
    .await;
    // From two clients, in turn: enough for a run of two failures to trip the breaker.
    for i in 0..10 {
        let mut stream = ExtProcStream::connect(host.address).await;
        stream
            .exchange(grpc::from(
                grpc::request_headers(&[(":path", "/")], true),
                &format!("10.0.0.{}:4000", i % 2),
            ))
            .await;
    }
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("plugin failed"))
        .collect();
    assert_eq!(failures.len(), 2, "{log}");
    for line in failures {
        for field in [
            "chain=\"default\"",
            "plugin=\"trap\"",
            "phase=\"request_headers\"",
            "kind=\"trap\"",
            "policy=\"fail-closed\"",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }
    let quarantined: Vec<&str> = log.lines().filter(|l| l.contains("quarantined")).collect();
    assert_eq!(
        quarantined.len(),
        1,
        "logged once per quarantine, not per request: {log}"
    );
    assert_eq!(
        host.metrics()
            .plugin_calls("trap", Phase::RequestHeaders, "quarantined"),
        8
    );
}

#[tokio::test]
async fn a_full_instance_pool_is_a_policy_decision_not_a_crash() {
    // Two instances at most; each open stream holds one until it ends.
    let host = RunningHost::start(
        &[("stateful", STATEFUL)],
        "[runtime]\nmax_instances = 2\n[plugins.stateful]\nfailure_status = 503\n",
    )
    .await;
    let mut held = Vec::new();
    for i in 0..2 {
        let (stream, answer) = open_with_id(&host, i).await;
        assert!(matches!(answer.response, Some(Response::RequestHeaders(_))));
        held.push(stream);
    }
    let (_third, answer) = open_with_id(&host, 2).await;
    assert_eq!(
        immediate(&answer),
        (
            503,
            "wasm_extproc_plugin_failed:stateful:instantiate".to_string()
        )
    );
    // Streams end, instances return to the pool, and a full pool is not the plugin's fault:
    // no quarantine.
    drop(held);
    let metrics = host.metrics();
    tokio::time::timeout(Duration::from_secs(5), async {
        while metrics.active_streams() > 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let (_fourth, answer) = open_with_id(&host, 3).await;
    assert!(
        matches!(answer.response, Some(Response::RequestHeaders(_))),
        "{answer:?}"
    );
}

#[tokio::test]
async fn malformed_unknown_and_oversized_messages_get_a_clear_status() {
    let host = RunningHost::start(&[("asm", ASM_DEMO)], "").await;

    // Not protobuf at all.
    let status = grpc::send_raw(host.address, vec![vec![0xff, 0xff, 0xff, 0x0f, 0x01]])
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(
        status
            .message()
            .starts_with("cannot read ProcessingRequest: "),
        "{}",
        status.message()
    );

    // Valid protobuf, but only a field this version does not know (field 99): no phase set.
    let status = grpc::send_raw(host.address, vec![vec![0x98, 0x06, 0x01]])
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("no request set"),
        "{}",
        status.message()
    );

    // Over the 8 MiB message limit.
    let huge = grpc::request_body(&vec![b'x'; 9 << 20], true).encode_to_vec();
    let status = grpc::send_raw(host.address, vec![huge]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");

    // Each of those ended only its own stream.
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    assert_eq!(header_sets(&answer), asm());
    assert_eq!(host.metrics().active_streams(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_streams_cost_no_instances_and_leave_nothing_behind() {
    let host = RunningHost::start(&[("asm", ASM_DEMO)], "").await;
    let mut client = grpc::connect(host.address).await;
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(ExtProcStream::open(&mut client).await);
    }
    let metrics = host.metrics();
    tokio::time::timeout(Duration::from_secs(10), async {
        while metrics.active_streams() < 2000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every stream is served");
    // No message, no instance: the plugin was never instantiated.
    let instantiated = metrics.render();
    assert!(
        !instantiated
            .contains("wasm_extproc_plugin_instantiate_duration_seconds_count{chain=\"default\",plugin=\"asm\"}"),
        "an idle stream instantiated a plugin"
    );
    // The client vanishes: every stream's task ends.
    drop(idle);
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), async {
        while metrics.active_streams() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("streams of a vanished client are cleaned up");
    let mut stream = ExtProcStream::connect(host.address).await;
    assert_eq!(
        header_sets(
            &stream
                .exchange(grpc::request_headers(&[(":path", "/")], true))
                .await
        ),
        asm()
    );
}

#[tokio::test]
async fn a_client_that_vanishes_mid_exchange_leaves_no_instance_behind() {
    let host =
        RunningHost::start(&[("stateful", STATEFUL)], "[runtime]\nmax_instances = 1\n").await;
    for i in 0..5 {
        let (stream, answer) = open_with_id(&host, i).await;
        // With one instance in the pool, this only works if the previous stream's was freed.
        assert!(
            matches!(answer.response, Some(Response::RequestHeaders(_))),
            "{i}: {answer:?}"
        );
        drop(stream);
        let metrics = host.metrics();
        tokio::time::timeout(Duration::from_secs(5), async {
            while metrics.active_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
    }
}

/// A plugin logging in a loop writes its budget's worth of lines, not megabytes per request:
/// the rest are dropped and counted, one summary line says so, and its calls still succeed.
#[tokio::test(flavor = "current_thread")]
async fn a_plugin_logging_in_a_loop_stays_within_its_log_budget() {
    const REQUESTS: u64 = 20;
    const LINES_PER_CALL: u64 = 10_000;
    const BUDGET: u64 = 50;
    // The runtime is single-threaded: the host's tasks, and the plugin, log on this thread.
    let (captured, _guard) = Captured::on_this_thread(tracing::Level::INFO);
    // Before the load: the budget starts full when the plugin is loaded.
    let started = std::time::Instant::now();
    let host = RunningHost::start(
        &[("flood", FLOOD)],
        &format!(
            "[envoy]\nmessage_timeout_ms = 10000\n\
             [plugins.flood]\nconfig = \"log\"\ntimeout_ms = 5000\n\
             log_lines_per_second = {BUDGET}\n"
        ),
    )
    .await;
    for _ in 0..REQUESTS {
        let mut stream = ExtProcStream::connect(host.address).await;
        stream
            .exchange(grpc::request_headers(&[(":path", "/")], true))
            .await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let metrics = host.metrics();
    assert_eq!(
        metrics.plugin_calls("flood", Phase::RequestHeaders, "ok"),
        REQUESTS
    );
    let suppressed = metrics.log_lines_suppressed("default", "flood").get();
    let written = REQUESTS * LINES_PER_CALL - suppressed;
    // One second's worth at once, then the rate.
    let most = BUDGET + (BUDGET as f64 * elapsed).ceil() as u64;
    assert!(
        (BUDGET..=most).contains(&written),
        "{written} lines written in {elapsed:.1} s on a budget of {BUDGET} a second \
         ({suppressed} suppressed)"
    );
    // What reached the log: exactly the lines the metric says were written, and a summary
    // (the first as soon as a line was dropped), not the 20 MB the plugin tried to write.
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines = log.lines().filter(|l| l.contains("flood line")).count() as u64;
    assert_eq!(lines, written);
    let summaries: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("log lines suppressed"))
        .collect();
    assert!(
        !summaries.is_empty() && summaries.len() as f64 <= 1.0 + elapsed / 5.0,
        "{summaries:?}"
    );
    assert!(summaries[0].contains("plugin flood: 1 log lines suppressed"));
    assert!(
        log.len() < 300 * (most as usize + summaries.len() + 50),
        "{} bytes of log",
        log.len()
    );
}

/// A body replacement over 16 MiB is refused inside the call: the plugin fails, and fail-open
/// the chunk goes on as it came.
#[tokio::test]
async fn a_body_replacement_past_sixteen_mib_is_refused() {
    let host = RunningHost::start(
        &[("flood", FLOOD)],
        "[plugins.flood]\nconfig = \"body\"\nfailure_policy = \"fail-open\"\ntimeout_ms = 2000\n\
         memory_limit_mib = 64\n[envoy]\nmessage_timeout_ms = 5000\n",
    )
    .await;
    let mut stream = ExtProcStream::connect(host.address).await;
    stream
        .exchange(grpc::request_headers(&[(":path", "/")], false))
        .await;
    let answer = stream.exchange(grpc::request_body(b"small", true)).await;
    match answer.response.unwrap() {
        Response::RequestBody(body) => assert!(
            body.response.unwrap_or_default().body_mutation.is_none(),
            "the chunk goes on unchanged"
        ),
        other => panic!("request body answer expected, got {other:?}"),
    }
    assert_eq!(
        host.metrics()
            .plugin_calls("flood", Phase::RequestBody, "trap"),
        1
    );
}

/// A stream that sends its request headers and then nothing holds its plugins' instances only
/// until `stream_idle_timeout_ms`: then it is ended, counted, and the instances go back to the
/// pool.
#[tokio::test]
async fn an_idle_stream_is_ended_and_its_instances_freed() {
    let host = RunningHost::start(&[("asm", ASM_DEMO)], "stream_idle_timeout_ms = 500\n").await;
    let mut idle = ExtProcStream::connect(host.address).await;
    let answer = idle
        .exchange(grpc::request_headers(&[(":path", "/")], false))
        .await;
    assert_eq!(header_sets(&answer), asm());
    // The plugin still has the response headers to come: its instance is held.
    let metrics = host.metrics();
    assert_eq!(metrics.pool().in_use.get(), 1);
    let started = std::time::Instant::now();
    let ended = idle
        .next()
        .await
        .expect_err("the host ends the idle stream");
    assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    assert!(
        ended.message().contains("stream_idle_timeout_ms"),
        "{ended:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(metrics.pool().in_use.get(), 0);
    assert_eq!(metrics.idle_streams_ended(), 1);
    // A stream that keeps talking is served as long as it needs.
    let mut busy = ExtProcStream::connect(host.address).await;
    busy.exchange(grpc::request_headers(&[(":path", "/")], false))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = busy
        .exchange(grpc::response_headers(&[(":status", "200")], true))
        .await;
    assert!(matches!(
        answer.response,
        Some(Response::ResponseHeaders(_))
    ));
    assert_eq!(metrics.idle_streams_ended(), 1);
}

/// Bodies held for whole-body plugins count against one budget for the whole host: a body
/// there is no room for gets the plugins' failure policy (kind `body_budget`), counted, and
/// nothing else is disturbed -- the body held meanwhile is answered, and the next one fits.
#[tokio::test]
async fn bodies_past_the_hosts_budget_get_the_policy_and_the_host_serves_on() {
    use super::phases::full_duplex_request;
    use extproc_testkit::fixtures::JSON_REDACT;
    const MIB: usize = 1 << 20;
    let host = RunningHost::start(
        &[("redact", JSON_REDACT)],
        "[runtime]\nmax_body_bytes_in_flight = 8388608\n\
         [plugins.redact]\nconfig = \"password\"\nfailure_status = 503\ntimeout_ms = 2000\n\
         [envoy]\nmessage_timeout_ms = 5000\n",
    )
    .await;
    let part = |n: usize| {
        let mut json = br#"{"password":"hunter2","pad":""#.to_vec();
        json.extend(vec![b'a'; n]);
        json
    };
    // Stream A holds 5 MiB of a body for the plugin.
    let mut a = full_duplex_request(&host).await;
    a.send(grpc::request_body(&part(5 * MIB), false)).await;
    // Stream B's 5 MiB do not fit beside it: the plugin's policy answers.
    let mut b = full_duplex_request(&host).await;
    b.send(grpc::request_body(&part(5 * MIB), false)).await;
    let refused = b.next().await.unwrap().expect("an answer");
    assert_eq!(
        immediate(&refused),
        (
            503,
            "wasm_extproc_plugin_failed:redact:body_budget".to_string()
        )
    );
    // A completes, redacted.
    a.send(grpc::request_body(br#""}"#, true)).await;
    let redacted = streamed_body(&mut a).await;
    assert!(
        redacted.starts_with(br#"{"pad":"#),
        "{}",
        String::from_utf8_lossy(&redacted[..40])
    );
    assert!(!redacted.windows(7).any(|w| w == b"hunter2"));
    // With A done, a body of the same size fits again.
    let mut c = full_duplex_request(&host).await;
    c.send(grpc::request_body(&part(5 * MIB), false)).await;
    c.send(grpc::request_body(br#""}"#, true)).await;
    let answer = c.next().await.unwrap().expect("an answer");
    assert!(
        !matches!(answer.response, Some(Response::ImmediateResponse(_))),
        "{answer:?}"
    );
    let metrics = host.metrics();
    assert_eq!(metrics.bodies_over_budget(), 1);
    assert_eq!(metrics.plugin_outcomes("redact", "body_budget"), 1);
}

/// What the host answered of a `FULL_DUPLEX_STREAMED` request body, until its end.
async fn streamed_body(stream: &mut ExtProcStream) -> Vec<u8> {
    use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
    let mut body = Vec::new();
    loop {
        let answer = stream
            .next()
            .await
            .unwrap()
            .expect("answers until the body");
        if let Some(Response::RequestBody(answer)) = &answer.response {
            let mutation = answer.response.as_ref().unwrap().body_mutation.as_ref();
            if let Some(Mutation::StreamedResponse(s)) = mutation.and_then(|m| m.mutation.as_ref())
            {
                body.extend_from_slice(&s.body);
                if s.end_of_stream {
                    return body;
                }
            }
        }
    }
}

/// A fail-open plugin holding part of a body when the budget runs out is skipped, and what it
/// held flows on unchanged with the rest: nothing is lost.
#[tokio::test]
async fn a_body_held_when_the_budget_runs_out_flows_on_unchanged() {
    use super::phases::full_duplex_request;
    use extproc_testkit::fixtures::JSON_REDACT;
    const MIB: usize = 1 << 20;
    let host = RunningHost::start(
        &[("redact", JSON_REDACT)],
        "[runtime]\nmax_body_bytes_in_flight = 8388608\n\
         [plugins.redact]\nconfig = \"password\"\nfailure_policy = \"fail-open\"\n\
         timeout_ms = 2000\n[envoy]\nmessage_timeout_ms = 5000\n",
    )
    .await;
    let mut sent = br#"{"password":"hunter2","pad":""#.to_vec();
    sent.extend(vec![b'a'; 3 * MIB]);
    let mut a = full_duplex_request(&host).await;
    a.send(grpc::request_body(&sent, false)).await;
    // B fills the budget but for half a megabyte.
    let b = full_duplex_request(&host).await;
    b.send(grpc::request_body(&vec![b' '; 4 * MIB + MIB / 2], false))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A's next megabyte has no room: the plugin is skipped, A's body flows on whole.
    let more = vec![b'b'; MIB];
    a.send(grpc::request_body(&more, false)).await;
    a.send(grpc::request_body(br#""}"#, true)).await;
    sent.extend(&more);
    sent.extend(br#""}"#);
    let received = streamed_body(&mut a).await;
    assert!(
        received == sent,
        "{} bytes of {}: first difference at {:?}, ends {:?}",
        received.len(),
        sent.len(),
        received.iter().zip(&sent).position(|(a, b)| a != b),
        String::from_utf8_lossy(&received[received.len() - 20..])
    );
    assert_eq!(host.metrics().plugin_outcomes("redact", "body_budget"), 1);
    drop(b);
}

/// The idle timeout is about streams nobody talks on, not slow upstreams: a response a second
/// in coming (five times Envoy's 200 ms `message_timeout`, which does not cover the wait
/// between phases) is served whole, inside an idle timeout of two.
#[tokio::test]
async fn a_slow_upstream_is_served_inside_the_idle_timeout() {
    use extproc_testkit::envoy::Envoy;
    use extproc_testkit::service::Service;
    let host = RunningHost::start(&[("asm", ASM_DEMO)], "stream_idle_timeout_ms = 2000\n").await;
    let upstream = Service::start(
        Duration::from_secs(1),
        Arc::new(|_: &[u8]| (200, "slow".to_string())),
    )
    .await
    .unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    let started = std::time::Instant::now();
    let response = envoy.get("/slow").await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(response.status, 200, "{}", envoy.log());
    assert_eq!(
        response.header_values("x-ext-proc-header"),
        ["hello-from-asm"]
    );
    assert_eq!(host.metrics().idle_streams_ended(), 0);
}
