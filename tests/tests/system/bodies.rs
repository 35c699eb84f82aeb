//! Bodies through a real Envoy, in every body mode and both directions: passed through
//! unchanged, replaced chunk by chunk, and replaced whole -- checked byte for byte at the
//! upstream and at the client.

use extproc_testkit::echo::{EchoServer, generated};
use extproc_testkit::envoy::{Envoy, EnvoyConfig, HttpRequest, HttpResponse};
use extproc_testkit::fixtures::{BODY_PROBE, Component, JSON_REDACT, SHOUT};
use extproc_testkit::host::RunningHost;

const MODES: [&str; 4] = [
    "BUFFERED",
    "STREAMED",
    "BUFFERED_PARTIAL",
    "FULL_DUPLEX_STREAMED",
];
const SIZES: [usize; 4] = [0, 1, 64 * 1024, 1 << 20];

/// Both directions in `mode`; `FULL_DUPLEX_STREAMED` needs trailers sent.
fn config(mode: &'static str) -> EnvoyConfig {
    let config = EnvoyConfig::default()
        .mode("request_body_mode", mode)
        .mode("response_body_mode", mode);
    if mode == "FULL_DUPLEX_STREAMED" {
        config
            .mode("request_trailer_mode", "SEND")
            .mode("response_trailer_mode", "SEND")
    } else {
        config
    }
}

struct Setup {
    _host: RunningHost,
    upstream: EchoServer,
    envoy: Envoy,
}

/// Parsing and re-serialising a 1 MiB JSON body takes longer than the default 20 ms.
const BODY_PLUGIN_SETTINGS: &str = "timeout_ms = 150";

async fn setup(plugin: Component, config_string: &str, mode: &'static str) -> Setup {
    let host = RunningHost::start(
        &[("body", plugin)],
        &format!("[plugins.body]\nconfig = \"{config_string}\"\n{BODY_PLUGIN_SETTINGS}\n"),
    )
    .await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start_with(&config(mode), host.address, upstream.address)
        .await
        .unwrap();
    Setup {
        _host: host,
        upstream,
        envoy,
    }
}

/// A POST of `chunks` (one chunk: a plain body; several: a chunked upload). Returns the client's
/// response and the body the upstream received.
async fn upload(setup: &Setup, chunks: Vec<Vec<u8>>, label: &str) -> (HttpResponse, Vec<u8>) {
    let json = chunks.first().and_then(|c| c.first()) == Some(&b'{');
    let content_type = if json {
        "application/json"
    } else {
        "text/plain"
    };
    let request = HttpRequest::new("POST", "/anything").header("content-type", content_type);
    let request = if chunks.len() == 1 {
        request.body(chunks.concat())
    } else {
        request.chunked(chunks)
    };
    let response = setup.envoy.send(&request).await.unwrap();
    assert_eq!(
        response.status,
        200,
        "{label}: {}",
        String::from_utf8_lossy(&response.body)
    );
    let received = setup
        .upstream
        .seen()
        .last()
        .expect("reached the upstream")
        .body
        .clone();
    (response, received)
}

/// A GET whose response body the upstream generates.
async fn download(setup: &Setup, bytes: usize, json: bool, label: &str) -> HttpResponse {
    let path = format!("/generate?bytes={bytes}{}", if json { "&json" } else { "" });
    let response = setup.envoy.get(&path).await.unwrap();
    assert_eq!(response.status, 200, "{label}");
    response
}

/// The body split into five uneven chunks, sent with pauses: a chunked upload.
pub(super) fn in_chunks(body: &[u8]) -> Vec<Vec<u8>> {
    let cut = body.len() / 5 + 7;
    body.chunks(cut).map(<[u8]>::to_vec).collect()
}

/// A content-length, where the client got one, must match the body.
pub(super) fn assert_length_fits(response: &HttpResponse, label: &str) {
    for value in response.header_values("content-length") {
        assert_eq!(
            value,
            response.body.len().to_string(),
            "{label}: content-length"
        );
    }
}

pub(super) fn assert_same(got: &[u8], want: &[u8], label: &str) {
    assert!(
        got == want,
        "{label}: {} bytes, expected {} (first difference at {:?})",
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_pass_through_unchanged_in_every_mode_and_direction() {
    for mode in MODES {
        // Text is not JSON, so the redaction plugin leaves it alone -- after holding it whole
        // where Envoy streams in FULL_DUPLEX_STREAMED mode.
        let setup = setup(JSON_REDACT, "password", mode).await;
        for size in SIZES {
            let label = format!("{mode}, {size} bytes");
            let body = generated(size, false);
            let (response, received) = upload(&setup, vec![body.clone()], &label).await;
            assert_same(&received, &body, &format!("{label}, at the upstream"));
            assert_same(&response.body, &body, &format!("{label}, at the client"));
            assert_length_fits(&response, &label);

            let response = download(&setup, size, false, &label).await;
            assert_same(&response.body, &body, &format!("{label}, response"));
        }
        let body = generated(100_000, false);
        let label = format!("{mode}, chunked upload");
        let (response, received) = upload(&setup, in_chunks(&body), &label).await;
        assert_same(&received, &body, &label);
        assert_same(&response.body, &body, &label);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_are_replaced_in_every_mode_and_direction() {
    for mode in MODES {
        let setup = setup(SHOUT, "", mode).await;
        for size in SIZES {
            let label = format!("{mode}, {size} bytes");
            let body = generated(size, false);
            let shouted = body.to_ascii_uppercase();
            let (response, received) = upload(&setup, vec![body.clone()], &label).await;
            assert_same(&received, &shouted, &format!("{label}, at the upstream"));
            assert_length_fits(&response, &label);

            let response = download(&setup, size, false, &label).await;
            assert_same(&response.body, &shouted, &format!("{label}, response"));
            assert_length_fits(&response, &label);
        }
        let body = generated(100_000, false);
        let label = format!("{mode}, chunked upload");
        let (_, received) = upload(&setup, in_chunks(&body), &label).await;
        assert_same(&received, &body.to_ascii_uppercase(), &label);
    }
}

pub(super) fn redacted(bytes: usize) -> Vec<u8> {
    let text = String::from_utf8(generated(bytes, true)).unwrap();
    text.replace("\"hunter2\"", "\"[REDACTED]\"").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_bodies_are_replaced_where_envoy_sends_them_whole_or_lets_the_host_hold_them() {
    for mode in ["BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED"] {
        let setup = setup(JSON_REDACT, "password", mode).await;
        for size in [100, 64 * 1024, 1 << 20] {
            let label = format!("{mode}, {size} bytes");
            let (response, received) = upload(&setup, vec![generated(size, true)], &label).await;
            assert_same(
                &received,
                &redacted(size),
                &format!("{label}, at the upstream"),
            );
            // The body handler set a header from what it found in the body (one password).
            let seen = setup.upstream.seen().last().unwrap().clone();
            assert_eq!(
                seen.header("x-redacted").as_deref(),
                Some("1"),
                "{label}, at the upstream"
            );
            assert_same(
                &response.body,
                &redacted(size),
                &format!("{label}, at the client"),
            );
            assert_length_fits(&response, &label);

            let response = download(&setup, size, true, &label).await;
            assert_same(
                &response.body,
                &redacted(size),
                &format!("{label}, response"),
            );
            assert_eq!(
                response.header_values("x-redacted"),
                ["1"],
                "{label}, response"
            );
            assert_length_fits(&response, &label);
        }
        let label = format!("{mode}, chunked upload");
        let (_, received) = upload(&setup, in_chunks(&generated(200_000, true)), &label).await;
        assert_same(&received, &redacted(200_000), &label);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_streamed_mode_a_whole_body_plugin_sees_chunks_and_refuses_json_it_cannot_read() {
    // Envoy answers STREAMED chunks one by one, so the host cannot hold them back: the plugin
    // sees part of a JSON body, cannot parse it, and refuses it rather than let a secret by.
    let setup = setup(JSON_REDACT, "password", "STREAMED").await;
    let body = generated(200_000, true);
    let request = HttpRequest::new("POST", "/anything")
        .header("content-type", "application/json")
        .chunked(in_chunks(&body));
    let response = setup.envoy.send(&request).await.unwrap();
    assert_eq!(response.status, 413, "{}", setup.envoy.log());
    for seen in setup.upstream.seen() {
        let text = String::from_utf8_lossy(&seen.body).into_owned();
        assert!(!text.contains("hunter2"), "the upstream got {text}");
    }
}

/// Body handlers get the headers exactly where changes to them still reach the upstream: when
/// Envoy holds them for the body (`BUFFERED`, `BUFFERED_PARTIAL`), not where they went on
/// before it (`STREAMED`, and `FULL_DUPLEX_STREAMED` chunks no plugin holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_handlers_get_the_headers_exactly_where_changes_to_them_still_count() {
    for (mode, lent) in [
        ("BUFFERED", true),
        ("BUFFERED_PARTIAL", true),
        ("STREAMED", false),
        ("FULL_DUPLEX_STREAMED", false),
    ] {
        let setup = setup(BODY_PROBE, "", mode).await;
        let response = setup
            .envoy
            .send(&HttpRequest::new("POST", "/anything").body(generated(1000, false)))
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{mode}");
        let report = response.json().unwrap();
        assert_eq!(report["headers"].as_bool(), Some(lent), "{mode}: {report}");
    }
}

/// In `BUFFERED_PARTIAL` mode a body larger than Envoy's buffer limit reaches the plugin cut at
/// the limit, with `end-of-stream` false; one that fits comes whole, with `end-of-stream` true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_partial_cuts_at_envoys_buffer_limit_with_end_of_stream_false() {
    const LIMIT: usize = 64 * 1024;
    let host = RunningHost::start(&[("probe", BODY_PROBE)], "").await;
    let upstream = EchoServer::start().await.unwrap();
    let config = EnvoyConfig::default()
        .mode("request_body_mode", "BUFFERED_PARTIAL")
        // The listener's limit (the file sets the upstream cluster's too).
        .edit(
            "      per_connection_buffer_limit_bytes: 8388608\n      filter_chains:",
            &format!("      per_connection_buffer_limit_bytes: {LIMIT}\n      filter_chains:"),
        );
    let envoy = Envoy::start_with(&config, host.address, upstream.address)
        .await
        .unwrap();
    // The SDK's `Action::respond_with`: status, content type, body and extra headers.
    let seen = |response: HttpResponse| {
        assert_eq!(response.status, 200);
        assert_eq!(response.header_values("content-type"), ["application/json"]);
        assert_eq!(response.header_values("x-body-probe"), ["request_body"]);
        let report = response.json().unwrap();
        (
            report["bytes"].as_u64().unwrap() as usize,
            report["end_of_stream"].as_bool().unwrap(),
        )
    };
    let small = HttpRequest::new("POST", "/anything").body(generated(1000, false));
    assert_eq!(seen(envoy.send(&small).await.unwrap()), (1000, true));
    let large = HttpRequest::new("POST", "/anything").chunked(
        generated(1 << 20, false)
            .chunks(16 * 1024)
            .map(<[u8]>::to_vec)
            .collect(),
    );
    let (bytes, end_of_stream) = seen(envoy.send(&large).await.unwrap());
    assert!(!end_of_stream);
    assert!(
        (LIMIT / 2..=2 * LIMIT).contains(&bytes),
        "{bytes} bytes handed over at a {LIMIT}-byte limit"
    );
    assert!(upstream.seen().is_empty());
}

/// No secret gets past the redaction in a compressed body: the upstream is asked for bodies
/// the plugin reads, gzip bodies are read and sent on gzip, and a body in an encoding the
/// plugin cannot read is refused -- both ways, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_redacted_or_refused_never_passed_unread() {
    use extproc_testkit::echo::{gunzip, gzip};
    let host = RunningHost::start(
        &[("body", JSON_REDACT)],
        &format!("[plugins.body]\nconfig = \"password\"\n{BODY_PLUGIN_SETTINGS}\n"),
    )
    .await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start_with(&config("BUFFERED"), host.address, upstream.address)
        .await
        .unwrap();
    let get =
        |path: &'static str| HttpRequest::new("GET", path).header("accept-encoding", "gzip, br");

    // The client accepts gzip; the upstream is asked for identity, and the client gets the
    // body redacted.
    let response = envoy.send(&get("/generate?bytes=2000&json")).await.unwrap();
    assert_eq!(response.status, 200);
    let seen = upstream.seen().last().unwrap().clone();
    assert_eq!(seen.header("accept-encoding").as_deref(), Some("identity"));
    assert_same(&response.body, &redacted(2000), "asked for identity");

    // An upstream that compresses anyway: read, redacted, and sent on gzip.
    let response = envoy
        .send(&get("/generate?bytes=2000&json&encoding=gzip"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header_values("content-encoding"), ["gzip"]);
    assert_same(
        &gunzip(&response.body).unwrap(),
        &redacted(2000),
        "gzip response",
    );
    assert_length_fits(&response, "gzip response");

    // An encoding it cannot read: refused, not passed.
    let response = envoy
        .send(&get("/generate?bytes=2000&json&encoding=br"))
        .await
        .unwrap();
    assert_eq!(response.status, 502);
    assert!(!String::from_utf8_lossy(&response.body).contains("hunter2"));

    // A gzip upload: the upstream gets it redacted, still gzip.
    let upload = HttpRequest::new("POST", "/anything")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip(&generated(5000, true)));
    let response = envoy.send(&upload).await.unwrap();
    assert_eq!(response.status, 200);
    let seen = upstream.seen().last().unwrap().clone();
    assert_same(
        &gunzip(&seen.body).unwrap(),
        &redacted(5000),
        "gzip upload, at the upstream",
    );
    let upload = HttpRequest::new("POST", "/anything")
        .header("content-type", "application/json")
        .header("content-encoding", "br")
        .body(generated(5000, true));
    assert_eq!(envoy.send(&upload).await.unwrap().status, 415);

    let metrics = host.metrics();
    assert_eq!(metrics.plugin_responses("default", "body", 502), 1);
    assert_eq!(metrics.plugin_responses("default", "body", 415), 1);
}
