//! The guide's result through a real Envoy: the ASM demo plugin tags the request the upstream
//! sees and the response the client sees.

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::Envoy;
use extproc_testkit::fixtures::ASM_DEMO;
use extproc_testkit::host::RunningHost;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_headers_shows_both_asm_headers() {
    let host = RunningHost::start(&[("asm-demo", ASM_DEMO)], "").await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();

    let response = envoy.get("/headers").await.unwrap();

    assert_eq!(response.status, 200, "{}", envoy.log());
    // What `curl -i` shows in the guide: the response header set on the way back...
    assert_eq!(
        response.header_values("x-ext-proc-header"),
        ["hello-from-asm"]
    );
    // ...and, in httpbin's echo of the request, the header set on the way in.
    let echoed = response.json().unwrap();
    assert_eq!(
        echoed["headers"]["X-Ext-Proc-Header"], "hello-to-asm",
        "{echoed}"
    );
    assert_eq!(upstream.seen().len(), 1);

    // Envoy saw no ext_proc failures.
    assert_eq!(
        envoy
            .counter("http.ingress_http.ext_proc.streams_failed")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        envoy
            .counter("http.ingress_http.ext_proc.failure_mode_allowed")
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_of_many_is_tagged_once() {
    let host = RunningHost::start(&[("asm-demo", ASM_DEMO)], "").await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();

    let requests = (0..40).map(|i| {
        let envoy = &envoy;
        async move {
            envoy
                .request(
                    "POST",
                    &format!("/anything/{i}"),
                    &[("x-ext-proc-header", "from-client")],
                    b"payload".to_vec(),
                )
                .await
                .unwrap()
        }
    });
    let responses = futures::future::join_all(requests).await;

    for response in &responses {
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header_values("x-ext-proc-header"),
            ["hello-from-asm"]
        );
        assert_eq!(response.body, b"payload");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 40);
    for request in seen {
        // The client's own value was replaced, not appended to.
        let values: Vec<_> = request
            .headers
            .iter()
            .filter(|(n, _)| n == "x-ext-proc-header")
            .map(|(_, v)| v.as_slice())
            .collect();
        assert_eq!(values, [&b"hello-to-asm"[..]], "{}", request.path);
    }
}
