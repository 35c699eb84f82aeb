//! Load held: the shipped settings carry 10,000 exchanges in flight at once; a full instance
//! pool makes a stream wait a moment before its plugin's policy applies; a plugin's instance
//! goes back to the pool as soon as nothing it handles can still arrive.

use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use extproc_testkit::fixtures::{ASM_DEMO, BEARER_AUTH};
use extproc_testkit::grpc::{self, ExtProcStream};
use extproc_testkit::host::RunningHost;
use futures::future::join_all;

/// Exchanges held in flight at once on the shipped settings.
const IN_FLIGHT: usize = 10_000;
/// Streams per HTTP/2 connection, as Envoy multiplexes them.
const STREAMS_PER_CONNECTION: usize = 100;

fn tag(answer: &ProcessingResponse) -> Option<String> {
    let common = match answer.response.as_ref()? {
        Response::RequestHeaders(h) | Response::ResponseHeaders(h) => h.response.as_ref()?,
        _ => return None,
    };
    common
        .header_mutation
        .as_ref()?
        .set_headers
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == "x-ext-proc-header")
        .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_exchanges_in_flight_on_the_shipped_settings_are_all_answered() {
    // An empty [runtime] table: the defaults operators get (not the test harness's smaller
    // pool).
    let host = RunningHost::start(&[("asm", ASM_DEMO)], "[runtime]\n").await;
    let mut clients = Vec::new();
    for _ in 0..IN_FLIGHT.div_ceil(STREAMS_PER_CONNECTION) {
        clients.push(grpc::connect(host.address).await);
    }
    // Every exchange gets its request headers answered and then waits, as behind a slow
    // upstream, so that all their instances are alive at once.
    let mut streams = Vec::with_capacity(IN_FLIGHT);
    for batch in (0..IN_FLIGHT).collect::<Vec<_>>().chunks(500) {
        let opened = join_all(batch.iter().map(|&i| {
            let mut client = clients[i / STREAMS_PER_CONNECTION].clone();
            async move {
                let mut stream = ExtProcStream::open(&mut client).await;
                let answer = stream
                    .exchange(grpc::request_headers(&[(":path", "/")], false))
                    .await;
                (stream, tag(&answer))
            }
        }))
        .await;
        for (stream, tag) in opened {
            assert_eq!(tag.as_deref(), Some("hello-to-asm"));
            streams.push(stream);
        }
    }
    let pool = host.metrics().pool();
    assert_eq!(pool.in_use.get(), IN_FLIGHT as i64);
    assert_eq!(pool.exhausted.get(), 0);

    // Then every upstream answers.
    for batch in streams.chunks_mut(500) {
        let answers = join_all(
            batch
                .iter_mut()
                .map(|s| s.exchange(grpc::response_headers(&[(":status", "200")], false))),
        )
        .await;
        for answer in answers {
            assert_eq!(tag(&answer).as_deref(), Some("hello-from-asm"));
        }
    }
    assert_eq!(host.metrics().plugin_outcomes("asm", "instantiate"), 0);
    drop(streams);
    tokio::time::timeout(Duration::from_secs(10), async {
        while pool.in_use.get() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every instance back in the pool");
}

#[tokio::test]
async fn a_full_pool_makes_a_stream_wait_for_an_instance_to_come_free() {
    let host = RunningHost::start(
        &[("asm", ASM_DEMO)],
        "[runtime]\nmax_instances = 1\ninstance_wait_ms = 5000\n",
    )
    .await;
    let mut first = ExtProcStream::connect(host.address).await;
    first
        .exchange(grpc::request_headers(&[(":path", "/")], false))
        .await;
    // The only instance is taken: the second stream's request waits...
    let mut second = ExtProcStream::connect(host.address).await;
    let waiting = second.exchange(grpc::request_headers(&[(":path", "/")], false));
    // ... until the first exchange ends and gives its instance back.
    let finishing = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        first
            .exchange(grpc::response_headers(&[(":status", "200")], false))
            .await
    };
    let (answer, _) = tokio::join!(waiting, finishing);
    assert_eq!(tag(&answer).as_deref(), Some("hello-to-asm"));
    let pool = host.metrics().pool();
    assert_eq!((pool.waits.get(), pool.exhausted.get()), (1, 0));
}

#[tokio::test]
async fn an_instance_goes_back_to_the_pool_once_nothing_it_handles_can_come() {
    // The auth plugin handles request headers only; one instance in the pool, no waiting.
    let host = RunningHost::start(
        &[("auth", BEARER_AUTH)],
        "[runtime]\nmax_instances = 1\ninstance_wait_ms = 0\n[plugins.auth]\nconfig = \"tokens=t\"\n",
    )
    .await;
    let pool = host.metrics().pool();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = ExtProcStream::connect(host.address).await;
        let answer = stream
            .exchange(grpc::request_headers(
                &[(":path", "/"), ("authorization", "Bearer t")],
                false,
            ))
            .await;
        assert!(
            matches!(answer.response, Some(Response::RequestHeaders(_))),
            "{answer:?}"
        );
        // The exchange goes on (its response is still to come), its plugin's instance does not.
        assert_eq!(pool.in_use.get(), 0);
        streams.push(stream);
    }
    assert_eq!(host.metrics().plugin_outcomes("auth", "instantiate"), 0);
}
