//! Recording live exchanges through Envoy (`POST /record`), then replaying the recording with
//! `wasm-extproc test`: against the plugins that served it, and against a candidate.

use std::path::Path;
use std::time::Duration;

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, HTTP_FILTERS, lua_filter, request};
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

/// The file a started recording writes, as `POST /record` answered.
fn recording_file(started: &extproc_testkit::envoy::HttpResponse) -> std::path::PathBuf {
    started.json().unwrap()["file"].as_str().unwrap().into()
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
    let file = recording_file(&started);
    let file = file.as_path();
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

/// A recording replays green against the chain that recorded it, with or without its bodies:
/// left out, the body phases' answers (here the upper-cased body's new `content-length`) are
/// no part of what the replay, which sends no body, must give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_rewriting_chain_replays_its_own_recording_with_or_without_bodies() {
    use extproc_testkit::envoy::{EnvoyConfig, HttpRequest};
    use extproc_testkit::fixtures::SHOUT;
    let records = tempfile::tempdir().unwrap();
    let toml = format!(
        "[record]\ndir = {:?}\n",
        records.path().display().to_string()
    );
    let host = RunningHost::start(&[("shout", SHOUT)], &toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let config = EnvoyConfig::default()
        .mode("request_body_mode", "BUFFERED")
        .mode("response_body_mode", "BUFFERED");
    let envoy = Envoy::start_with(&config, host.address, upstream.address)
        .await
        .unwrap();
    for bodies in [false, true] {
        let started = request(
            host.admin,
            "POST",
            &format!("/record?chain=default&sample=1&max_exchanges=1&bodies={bodies}"),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            started.status,
            200,
            "{}",
            String::from_utf8_lossy(&started.body)
        );
        let file = recording_file(&started);
        let response = envoy
            .send(&HttpRequest::new("POST", "/echo").body(b"quiet words".to_vec()))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        let text = recorded(&file, 1).await;
        assert_eq!(
            text.contains("QUIET WORDS"),
            bodies,
            "bodies = {bodies}: {text}"
        );
        let (summary, report) = replay(host.plugins_dir(), &file).await;
        assert_eq!(
            (summary.exchanges, summary.failed),
            (1, 0),
            "bodies = {bodies}: {report}\n{text}"
        );
    }
}

/// `POST /record` records only chains that exist, into files the host names inside `[record]
/// dir`, readable by the host's user only: a chain name that is a path writes nothing, inside
/// the directory or out.
#[tokio::test]
async fn recordings_are_confined_to_their_directory_and_to_chains_that_exist() {
    use std::os::unix::fs::PermissionsExt;
    let top = tempfile::tempdir().unwrap();
    let records = top.path().join("records");
    let toml = format!("[record]\ndir = {:?}\n", records.display().to_string());
    let host = RunningHost::start(&[("asm", ASM_DEMO)], &toml).await;
    let admin = host.admin;
    let post = |query: String| async move {
        request(admin, "POST", &format!("/record?{query}"), &[], Vec::new())
            .await
            .unwrap()
    };
    let outside = top.path().join("escaped");
    for chain in [
        "../escaped",
        "../../escaped",
        outside.to_str().unwrap(),
        "nope",
        "default/../..",
    ] {
        let query = format!(
            "chain={}&sample=1",
            form_urlencoded::byte_serialize(chain.as_bytes()).collect::<String>()
        );
        let refused = post(query).await;
        assert_eq!(refused.status, 404, "{chain}");
        let said = refused.json().unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(said.contains("no chain named"), "{said}");
    }
    let listed: Vec<_> = std::fs::read_dir(top.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(listed.iter().all(|name| name == "records"), "{listed:?}");
    if records.exists() {
        assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
    }

    let started = post("chain=default&sample=1".into()).await;
    assert_eq!(started.status, 200);
    let file = recording_file(&started);
    let file = file.as_path();
    assert_eq!(file.parent(), Some(records.as_path()));
    let mode = std::fs::metadata(file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

/// A recording writes no secret: not the configured headers' values (`x-api-key` among the
/// defaults), not the attributes that carry headers or configured ones, not configured
/// metadata.
#[tokio::test]
async fn recordings_redact_secrets_in_headers_attributes_and_metadata() {
    use extproc_testkit::envoy::EnvoyConfig;
    let records = tempfile::tempdir().unwrap();
    let toml = format!(
        "[record]\ndir = {:?}\nchains = [\"default\"]\nsample = 1.0\n\
         redact_attributes = [\"request.path\"]\nredact_metadata = [\"secrets:token\"]\n",
        records.path().display().to_string()
    );
    let host = RunningHost::start(&[("asm", ASM_DEMO)], &toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let config = EnvoyConfig::default()
        .filter("request_attributes: [request.path, source.address]")
        .filter(
            "metadata_options: { forwarding_namespaces: { untyped: [secrets, envoy.filters.http.jwt_authn] } }",
        )
        .edit(
            HTTP_FILTERS,
            &lua_filter(
                r#"local m = request_handle:streamInfo():dynamicMetadata()
m:set("secrets", "token", "s3cret-metadata")
m:set("secrets", "region", "eu-1")
m:set("envoy.filters.http.jwt_authn", "payload", "s3cret-claims")"#,
            ),
        );
    let envoy = Envoy::start_with(&config, host.address, upstream.address)
        .await
        .unwrap();
    let response = envoy
        .request(
            "GET",
            "/orders/7",
            &[
                ("authorization", "Bearer s3cret-token"),
                ("x-api-key", "s3cret-key"),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", envoy.log());
    let file = std::fs::read_dir(records.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = recorded(&file, 1).await;
    assert!(!text.contains("s3cret"), "{text}");
    // What is not secret stays, so the exchange replays.
    assert!(text.contains("eu-1"), "{text}");
    assert!(text.contains("source.address: 127.0.0.1:"), "{text}");
    for redacted in [
        "request.path: '[redacted]'",
        "token: '[redacted]'",
        "payload: '[redacted]'",
        "x-api-key: '[redacted]'",
    ] {
        assert!(text.contains(redacted), "{redacted}: {text}");
    }
}

/// Streams of a recorded chain keep no body in memory when the recording keeps none, and no
/// more than the recording may hold when it does: 200 MiB uploaded through a recorded chain
/// move the host's resident memory by a few MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_stream_holds_no_body_it_does_not_write() {
    use extproc_testkit::envoy::{EnvoyConfig, HttpRequest};
    use extproc_testkit::fixtures::SHOUT;
    use extproc_testkit::process::{HostProcess, Profile};
    const MIB: usize = 1 << 20;
    for (bodies, written) in [(false, true), (true, false)] {
        let records = tempfile::tempdir().unwrap();
        let host = HostProcess::start(
            Profile::Test,
            &[("10-shout.wasm", &SHOUT.path())],
            &format!(
                "[defaults]\ntimeout_ms = 2000\n[envoy]\nmessage_timeout_ms = 10000\n\
                 [record]\ndir = {:?}\nchains = [\"default\"]\nsample = 1.0\nbodies = {bodies}\n\
                 max_bytes = 1048576\n",
                records.path().display().to_string()
            ),
            None,
            "warn",
        )
        .unwrap();
        let upstream = EchoServer::start().await.unwrap();
        // Envoy's buffer at 1 MiB: each chunk it streams to the host is at most that.
        let config = EnvoyConfig::default()
            .mode("request_body_mode", "STREAMED")
            .edit(
                "      per_connection_buffer_limit_bytes: 8388608\n      filter_chains:",
                "      per_connection_buffer_limit_bytes: 1048576\n      filter_chains:",
            );
        let envoy = Envoy::start_with(&config, host.address, upstream.address)
            .await
            .unwrap();
        // Upper-case bytes: the plugin sees every chunk and has nothing to change.
        let upload = |chunks: usize| {
            HttpRequest::new("POST", "/upload")
                .chunked(vec![vec![b'A'; MIB]; chunks])
                .paced(Duration::ZERO)
        };
        assert_eq!(envoy.send(&upload(4)).await.unwrap().status, 200);
        let before = host.rss_kib().unwrap();
        let response = envoy.send(&upload(200)).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body.len(), 200 * MIB);
        let grown = host.rss_kib().unwrap().saturating_sub(before);
        assert!(
            grown < 8 * 1024,
            "bodies = {bodies}: the host grew by {grown} KiB over a 200 MiB upload"
        );
        // Both exchanges are recorded without bodies; with bodies kept, neither fits 1 MiB.
        let status = request(host.admin, "GET", "/record", &[], Vec::new())
            .await
            .unwrap()
            .json()
            .unwrap();
        let status = &status[0];
        if written {
            assert_eq!(status["exchanges"], 2, "{status}");
        } else {
            assert_eq!(status["too_large"], 2, "{status}");
            assert_eq!(status["exchanges"], 0, "{status}");
        }
    }
}
