//! Recording live exchanges through Envoy (`POST /record`), then replaying the recording with
//! `wasm-extproc test`: against the plugins that served it, and against a candidate.

use std::path::Path;
use std::time::Duration;

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, request};
use extproc_testkit::fixtures::{ASM_DEMO, ASM_V2};
use extproc_testkit::host::{RunningHost, config};
use wasm_extproc::authoring::{self, Summary};

/// Waits until the recording at `path` holds `count` exchanges (a thread writes them).
async fn recorded(path: &Path, count: usize) -> String {
    for _ in 0..200 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.matches("\n  - name: ").count() >= count {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never held {count} exchanges", path.display());
}

/// Plays `file` through the plugins in `plugins`; the summary and the report.
async fn replay(plugins: &Path, file: &Path) -> (Summary, String) {
    let mut report = Vec::new();
    let summary = authoring::test(&config(plugins, ""), &[file.to_path_buf()], &mut report)
        .await
        .unwrap();
    (summary, String::from_utf8(report).unwrap())
}

/// A chain records the exchanges Envoy sends while asked to, up to the count asked for, with
/// sensitive headers redacted; replayed, the recording passes against the plugin that served
/// it, and a candidate that tags differently fails on every exchange, showing how.
#[tokio::test]
async fn recorded_exchanges_replay_against_the_serving_plugins_and_a_candidate() {
    let records = tempfile::tempdir().unwrap();
    let toml = format!(
        "[record]\ndir = {:?}\nredact_headers = [\"X-Api-Key\"]\n",
        records.path().display().to_string()
    );
    let host = RunningHost::start(&[("asm", ASM_DEMO)], &toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    let admin = host.admin;
    let post = |query: &str| {
        let path = format!("/record?{query}");
        async move { request(admin, "POST", &path, &[], Vec::new()).await }
    };

    assert_eq!(envoy.get("/before").await.unwrap().status, 200);
    assert_eq!(
        post("sample=1").await.unwrap().status,
        400,
        "chain= is required"
    );
    assert_eq!(post("chain=default&stop=true").await.unwrap().status, 404);
    let started = post("chain=default&sample=1&max_exchanges=3")
        .await
        .unwrap();
    assert_eq!(started.status, 200);
    let file = started.json().unwrap()["file"]
        .as_str()
        .unwrap()
        .to_string();
    let file = Path::new(&file);
    assert!(file.starts_with(records.path()), "{}", file.display());

    let secrets = [
        ("authorization", "Bearer s3cret-token"),
        ("cookie", "session=s3cret-cookie"),
        ("x-api-key", "s3cret-key"),
    ];
    for i in 0..4 {
        let response = envoy
            .request("GET", &format!("/orders/{i}"), &secrets, Vec::new())
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }
    let text = recorded(file, 3).await;
    // Three asked for: the fourth is not recorded, and the recording has ended.
    assert_eq!(text.matches("\n  - name: ").count(), 3, "{text}");
    assert!(
        !text.contains("/orders/3") && !text.contains("/before"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
    assert_eq!(text.matches("[redacted]").count(), 9, "{text}");
    let status = request(host.admin, "GET", "/record", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(status.json().unwrap(), serde_json::json!([]));

    let (summary, report) = replay(host.plugins_dir(), file).await;
    assert_eq!((summary.exchanges, summary.failed), (3, 0), "{report}");
    assert!(report.contains("#1 GET /orders/0"), "{report}");

    let candidate = tempfile::tempdir().unwrap();
    let candidate_file = candidate.path().join("asm-v2.wasm");
    std::fs::copy(ASM_V2.path(), &candidate_file).unwrap();
    let compared = authoring::with_candidate(host.plugins_dir(), &candidate_file, None).unwrap();
    let (summary, report) = replay(compared.path(), file).await;
    assert_eq!((summary.exchanges, summary.failed), (3, 3), "{report}");
    assert!(
        report.contains("expected: x-ext-proc-header: hello-to-asm\n")
            && report.contains("actual  : x-ext-proc-header: hello-to-asm-v2\n"),
        "{report}"
    );
}
