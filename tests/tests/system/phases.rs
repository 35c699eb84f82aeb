//! Playing Envoy over gRPC: every phase gets the matching answer, plugins run in file-name
//! order and each sees the changes of those before it.

use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HeaderMutation, ProcessingResponse, body_mutation,
};
use extproc_testkit::fixtures::{ASM_DEMO, TAGGER};
use extproc_testkit::grpc::{self, ExtProcStream};
use extproc_testkit::host::RunningHost;

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
    let mut stream = ExtProcStream::open(&mut client).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    assert_eq!(
        sets(&common(&answer).header_mutation),
        [("x-ext-proc-header".to_string(), "hello-to-asm".to_string())]
    );
}
