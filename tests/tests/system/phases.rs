//! Playing Envoy over gRPC: every phase gets the matching answer, plugins run in file-name
//! order and each sees the changes of those before it.

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HeaderMutation, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
    body_mutation,
};
use extproc_testkit::fixtures::{ASM_DEMO, JSON_REDACT, SLOW, TAGGER};
use extproc_testkit::grpc::{self, ExtProcStream};
use extproc_testkit::host::RunningHost;
use wasm_extproc::http::Phase;

/// `(key, raw_value as text)` of every header a mutation sets, in order.
pub fn sets(mutation: &Option<HeaderMutation>) -> Vec<(String, String)> {
    mutation
        .iter()
        .flat_map(|m| &m.set_headers)
        .map(|o| {
            let h = o.header.as_ref().unwrap();
            assert!(h.value.is_empty(), "values travel in raw_value");
            (
                h.key.clone(),
                String::from_utf8(h.raw_value.clone()).unwrap(),
            )
        })
        .collect()
}

fn common(response: &ProcessingResponse) -> &CommonResponse {
    match response.response.as_ref().unwrap() {
        Response::RequestHeaders(h) | Response::ResponseHeaders(h) => h.response.as_ref().unwrap(),
        Response::RequestBody(b) | Response::ResponseBody(b) => b.response.as_ref().unwrap(),
        other => panic!("not a headers or body response: {other:?}"),
    }
}

fn body_of(response: &ProcessingResponse) -> Vec<u8> {
    match &common(response).body_mutation.as_ref().unwrap().mutation {
        Some(body_mutation::Mutation::Body(body)) => body.clone(),
        other => panic!("no body replacement: {other:?}"),
    }
}

#[tokio::test]
async fn all_six_phases_get_their_own_answer_through_a_two_plugin_chain() {
    // File names decide the order: "a-first" runs before "b-second".
    let host = RunningHost::start(
        &[("b-second", TAGGER), ("a-first", TAGGER)],
        "[plugins.a-first]\nconfig = \"one\"\n[plugins.b-second]\nconfig = \"two\"\n",
    )
    .await;
    let mut stream = ExtProcStream::connect(host.address).await;

    let answer = stream
        .exchange(grpc::request_headers(
            &[(":path", "/"), ("x-chain", "envoy")],
            false,
        ))
        .await;
    assert!(matches!(answer.response, Some(Response::RequestHeaders(_))));
    assert_eq!(
        sets(&common(&answer).header_mutation),
        [("x-chain".to_string(), "envoy,one,two".to_string())]
    );

    let answer = stream.exchange(grpc::request_body(b"body:", false)).await;
    assert!(matches!(answer.response, Some(Response::RequestBody(_))));
    assert_eq!(body_of(&answer), b"body:onetwo");

    let answer = stream
        .exchange(grpc::request_trailers(&[("x-checksum", "abc")]))
        .await;
    let Some(Response::RequestTrailers(trailers)) = &answer.response else {
        panic!("request trailers answer expected: {answer:?}");
    };
    assert_eq!(
        sets(&trailers.header_mutation),
        [("x-chain".to_string(), "one,two".to_string())]
    );

    let answer = stream
        .exchange(grpc::response_headers(&[(":status", "200")], false))
        .await;
    assert!(matches!(
        answer.response,
        Some(Response::ResponseHeaders(_))
    ));
    assert_eq!(
        sets(&common(&answer).header_mutation),
        [("x-chain".to_string(), "one,two".to_string())]
    );

    let answer = stream.exchange(grpc::response_body(b"", false)).await;
    assert!(matches!(answer.response, Some(Response::ResponseBody(_))));
    assert_eq!(body_of(&answer), b"onetwo");

    let answer = stream.exchange(grpc::response_trailers(&[])).await;
    let Some(Response::ResponseTrailers(trailers)) = &answer.response else {
        panic!("response trailers answer expected: {answer:?}");
    };
    assert_eq!(
        sets(&trailers.header_mutation),
        [("x-chain".to_string(), "one,two".to_string())]
    );
}

#[tokio::test]
async fn phases_no_plugin_handles_are_answered_unchanged() {
    let host = RunningHost::start(&[("asm-demo", ASM_DEMO)], "").await;
    let mut stream = ExtProcStream::connect(host.address).await;

    let answer = stream
        .exchange(grpc::request_body(b"untouched", true))
        .await;
    assert!(matches!(answer.response, Some(Response::RequestBody(_))));
    assert_eq!(common(&answer).body_mutation, None);

    let answer = stream
        .exchange(grpc::response_headers(&[(":status", "204")], true))
        .await;
    assert_eq!(
        sets(&common(&answer).header_mutation),
        [(
            "x-ext-proc-header".to_string(),
            "hello-from-asm".to_string()
        )]
    );
}

#[tokio::test]
async fn observability_mode_messages_get_no_answer() {
    let host = RunningHost::start(&[("asm-demo", ASM_DEMO)], "").await;
    let mut stream = ExtProcStream::connect(host.address).await;

    let mut observed = grpc::request_headers(&[(":path", "/")], true);
    observed.observability_mode = true;
    stream.send(observed).await;
    // The next answer on the stream is for the next, ordinary message.
    let answer = stream
        .exchange(grpc::response_headers(&[(":status", "200")], true))
        .await;
    assert!(
        matches!(answer.response, Some(Response::ResponseHeaders(_))),
        "{answer:?}"
    );
}

#[tokio::test]
async fn out_of_order_and_empty_messages_end_the_stream_with_a_clear_status() {
    let host = RunningHost::start(&[("asm-demo", ASM_DEMO)], "").await;
    let mut client = grpc::connect(host.address).await;

    let mut stream = ExtProcStream::open(&mut client).await;
    stream
        .exchange(grpc::request_headers(&[(":path", "/")], false))
        .await;
    stream
        .send(grpc::request_headers(&[(":path", "/")], false))
        .await;
    let status = stream.next().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "request_headers arrived after request_headers in the same direction"
    );

    let mut stream = ExtProcStream::open(&mut client).await;
    stream.send(Default::default()).await;
    let status = stream.next().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("no request set"),
        "{}",
        status.message()
    );

    // The host is unaffected: a new stream is served normally.
    assert_asm_still_served(&host).await;
}

/// A fresh stream through the ASM plugin is served normally.
async fn assert_asm_still_served(host: &RunningHost) {
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    assert_eq!(
        sets(&common(&answer).header_mutation),
        [("x-ext-proc-header".to_string(), "hello-to-asm".to_string())]
    );
}

#[tokio::test]
async fn response_headers_may_come_while_the_request_body_still_streams() {
    let host = RunningHost::start(&[("tag", TAGGER)], "[plugins.tag]\nconfig = \"t\"\n").await;
    let mut stream = ExtProcStream::begin(host.address).await;
    stream.exchange(grpc::request_body(b"a", false)).await;
    // The upstream answered early (e.g. 413 or a stream): the response starts, the request
    // body goes on.
    let answer = stream
        .exchange(grpc::response_headers(&[(":status", "200")], false))
        .await;
    assert!(matches!(
        answer.response,
        Some(Response::ResponseHeaders(_))
    ));
    let answer = stream.exchange(grpc::request_body(b"b", true)).await;
    assert_eq!(body_of(&answer), b"bt");
    let answer = stream.exchange(grpc::response_body(b"c", true)).await;
    assert_eq!(body_of(&answer), b"ct");
}

#[tokio::test]
async fn envoy_going_away_mid_stream_leaves_the_host_serving() {
    let host = RunningHost::start(&[("asm-demo", ASM_DEMO)], "").await;
    for _ in 0..20 {
        let stream = ExtProcStream::begin(host.address).await;
        // Envoy resets the stream (client went away) before the response.
        drop(stream);
    }
    assert_asm_still_served(&host).await;
}

#[tokio::test]
async fn the_host_closes_the_stream_once_no_plugin_needs_anything_more() {
    let host = RunningHost::start(&[("asm-demo", ASM_DEMO)], "").await;
    let mut stream = ExtProcStream::begin(host.address).await;
    stream
        .exchange(grpc::response_headers(&[(":status", "200")], false))
        .await;
    // Nothing the ASM plugin handles can follow: the host ends the stream with OK.
    assert!(stream.next().await.unwrap().is_none());
}

fn with_modes(
    mut request: ProcessingRequest,
    request_body: BodySendMode,
    response_body: BodySendMode,
) -> ProcessingRequest {
    request.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: request_body as i32,
        response_body_mode: response_body as i32,
        ..ProtocolConfiguration::default()
    });
    request
}

#[tokio::test]
async fn headers_answers_switch_off_what_no_plugin_needs() {
    let host = RunningHost::start(&[("asm-demo", ASM_DEMO)], "").await;
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(with_modes(
            grpc::request_headers(&[(":path", "/")], false),
            BodySendMode::Buffered,
            BodySendMode::Streamed,
        ))
        .await;
    let mode = answer.mode_override.expect("a mode override");
    assert_eq!(mode.request_body_mode, BodySendMode::None as i32);
    assert_eq!(mode.response_body_mode, BodySendMode::None as i32);
    assert_eq!(mode.response_header_mode, HeaderSendMode::Send as i32);
    assert_eq!(mode.request_trailer_mode, HeaderSendMode::Skip as i32);
    assert_eq!(mode.response_trailer_mode, HeaderSendMode::Skip as i32);
}

fn streamed_pieces(answer: &ProcessingResponse) -> (Vec<u8>, bool) {
    match &common(answer).body_mutation.as_ref().unwrap().mutation {
        Some(body_mutation::Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
        other => panic!("streamed response expected: {other:?}"),
    }
}

/// A stream whose request headers said: request bodies come FULL_DUPLEX_STREAMED. Their
/// answer waits while a plugin holds the body whole: it is open to the body handlers.
pub(super) async fn full_duplex_request(host: &RunningHost) -> ExtProcStream {
    let stream = ExtProcStream::connect(host.address).await;
    stream
        .send(with_modes(
            grpc::request_headers(&[(":path", "/")], false),
            BodySendMode::FullDuplexStreamed,
            BodySendMode::None,
        ))
        .await;
    stream
}

/// The next answer, which must be the one to the request headers; its header mutation.
async fn request_headers_answer(stream: &mut ExtProcStream) -> Option<HeaderMutation> {
    let answer = stream.next().await.unwrap().expect("the headers' answer");
    match answer.response {
        Some(Response::RequestHeaders(headers)) => headers.response.unwrap().header_mutation,
        other => panic!("the request headers' answer expected first: {other:?}"),
    }
}

#[tokio::test]
async fn whole_bodies_are_held_in_full_duplex_mode_and_let_go_at_the_end_or_at_trailers() {
    let host = RunningHost::start(
        &[("redact", JSON_REDACT)],
        "[plugins.redact]\nconfig = \"password\"\n",
    )
    .await;

    // Ends with end-of-stream: nothing is answered until then; then the headers, with what the
    // body handler set in them, and the redacted whole.
    let mut stream = full_duplex_request(&host).await;
    stream
        .send(grpc::request_body(br#"{"user":"al","pass"#, false))
        .await;
    stream
        .send(grpc::request_body(br#"word":"hunter2"}"#, true))
        .await;
    assert_eq!(
        sets(&request_headers_answer(&mut stream).await),
        [
            ("accept-encoding".to_string(), "identity".to_string()),
            ("x-redacted".to_string(), "1".to_string())
        ]
    );
    let answer = stream
        .next()
        .await
        .unwrap()
        .expect("an answer at the end of the body");
    assert_eq!(
        streamed_pieces(&answer),
        (br#"{"password":"[REDACTED]","user":"al"}"#.to_vec(), true)
    );

    // Ends with trailers: the held body goes out, then the trailers' answer.
    let mut stream = full_duplex_request(&host).await;
    stream
        .send(grpc::request_body(br#"{"password":"#, false))
        .await;
    stream.send(grpc::request_body(br#""x"}"#, false)).await;
    stream
        .send(grpc::request_trailers(&[("x-checksum", "1")]))
        .await;
    // The body, whole JSON though trailers follow, is redacted; the headers go on with it.
    assert_eq!(
        sets(&request_headers_answer(&mut stream).await),
        [
            ("accept-encoding".to_string(), "identity".to_string()),
            ("x-redacted".to_string(), "1".to_string())
        ]
    );
    let body = stream.next().await.unwrap().unwrap();
    assert_eq!(
        streamed_pieces(&body),
        (br#"{"password":"[REDACTED]"}"#.to_vec(), false)
    );
    let trailers = stream.next().await.unwrap().unwrap();
    assert!(
        matches!(trailers.response, Some(Response::RequestTrailers(_))),
        "{trailers:?}"
    );
}

/// Past 8 MiB held for a whole-body plugin, the plugin fails (`body_too_large`) and, fail-open,
/// everything held flows on unchanged: nothing is lost.
#[tokio::test]
async fn a_held_body_past_eight_mib_fails_the_plugin_and_loses_nothing() {
    let host = RunningHost::start(
        &[("redact", JSON_REDACT)],
        "[plugins.redact]\nconfig = \"password\"\nfailure_policy = \"fail-open\"\n",
    )
    .await;
    let mut stream = full_duplex_request(&host).await;
    let chunk = |i: u8| vec![b'a' + i; 1 << 20];
    let mut sent = Vec::new();
    for i in 0..9 {
        stream.send(grpc::request_body(&chunk(i), false)).await;
        sent.extend(chunk(i));
    }
    stream.send(grpc::request_body(b"end", true)).await;
    sent.extend(b"end");
    // The plugin failed, so its hold on the headers ended: their answer comes first.
    request_headers_answer(&mut stream).await;
    let mut received = Vec::new();
    let mut ended = false;
    while !ended {
        let answer = stream.next().await.unwrap().expect("answers until the end");
        let (piece, end_of_stream) = streamed_pieces(&answer);
        received.extend(piece);
        ended = end_of_stream;
    }
    assert!(
        received == sent,
        "{} bytes of {} came back",
        received.len(),
        sent.len()
    );
    assert_eq!(
        host.metrics()
            .plugin_calls("redact", Phase::RequestBody, "body_too_large"),
        1
    );
}

#[tokio::test]
async fn a_full_duplex_body_no_plugin_needs_is_answered_chunk_by_chunk_before_the_close() {
    // Envoy hands FULL_DUPLEX_STREAMED chunks over without keeping them: the host may not
    // close after the response headers, though the ASM plugin needs nothing more.
    let host = RunningHost::start(&[("asm-demo", ASM_DEMO)], "").await;
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(with_modes(
            grpc::request_headers(&[(":path", "/")], true),
            BodySendMode::None,
            BodySendMode::FullDuplexStreamed,
        ))
        .await;
    let mode = answer.mode_override.expect("a mode override");
    assert_eq!(
        mode.response_body_mode,
        BodySendMode::FullDuplexStreamed as i32,
        "a full-duplex body is never switched off"
    );
    assert_eq!(mode.response_trailer_mode, HeaderSendMode::Send as i32);
    stream
        .exchange(grpc::response_headers(&[(":status", "200")], false))
        .await;
    let answer = stream.exchange(grpc::response_body(b"abc", false)).await;
    assert_eq!(streamed_pieces(&answer), (b"abc".to_vec(), false));
    let answer = stream.exchange(grpc::response_body(b"def", true)).await;
    assert_eq!(streamed_pieces(&answer), (b"def".to_vec(), true));
    // Now nothing can come: the host ends the stream with OK.
    assert!(stream.next().await.unwrap().is_none());
}

#[tokio::test]
async fn a_phase_whose_budget_exceeds_envoys_timeout_asks_for_more_time_first() {
    let host = RunningHost::start(
        &[("slow", SLOW)],
        "[envoy]\nmessage_timeout_ms = 100\nmax_message_timeout_ms = 1000\n\
         [plugins.slow]\nconfig = \"1\"\ntimeout_ms = 150\n",
    )
    .await;
    let mut stream = ExtProcStream::connect(host.address).await;
    stream
        .send(grpc::request_headers(&[(":path", "/")], true))
        .await;
    let first = stream.next().await.unwrap().unwrap();
    let timeout = first.override_message_timeout.expect("a timeout override");
    // 150 ms of budget, 1 ms of deadline precision, 20 ms of waiting for a full instance pool
    // ([runtime] instance_wait_ms), and one message_timeout more.
    assert_eq!((timeout.seconds, timeout.nanos), (0, 271_000_000));
    assert!(first.response.is_none());
    let second = stream.next().await.unwrap().unwrap();
    assert!(matches!(second.response, Some(Response::RequestHeaders(_))));
}
