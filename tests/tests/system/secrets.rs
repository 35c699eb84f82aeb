//! Secrets through Envoy: a plugin reads the secrets the operator maps to files and grants it
//! (`wasi:config/store`), as the files hold them now; a secret's value shows nowhere the host
//! writes -- `/plugins`, the log, a recording.

use std::path::Path;
use std::time::Duration;

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, HttpResponse, request};
use extproc_testkit::fixtures::{ASM_DEMO, BEARER_AUTH};
use extproc_testkit::host::RunningHost;

use super::hostile::Captured;

/// Replaces the file at `path` the way the kubelet updates a Secret volume: the new content
/// appears at once, never half written.
fn rotate(path: &Path, content: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, content).unwrap();
    std::fs::rename(&next, path).unwrap();
}

async fn with_token(envoy: &Envoy, token: &str) -> HttpResponse {
    envoy
        .request(
            "GET",
            "/headers",
            &[("authorization", &format!("Bearer {token}"))],
            Vec::new(),
        )
        .await
        .unwrap()
}

/// bearer-auth takes its tokens from a mounted file instead of its configuration; a rotated
/// file takes effect without a restart or a reload (the old token refused, the new one let
/// through); and neither token shows in `/plugins`, the host's log or a recording of the very
/// requests that carried them.
#[tokio::test]
async fn bearer_auth_takes_its_tokens_from_a_secret_and_follows_its_rotation() {
    let (captured, _guard) = Captured::on_this_thread(tracing::Level::TRACE);
    let mounted = tempfile::tempdir().unwrap();
    let tokens = mounted.path().join("tokens");
    std::fs::write(&tokens, "first-t0ken\nspare-t0ken\n").unwrap();
    let records = tempfile::tempdir().unwrap();
    let toml = format!(
        "[secrets]\napi-tokens = {:?}\n\
         [plugins.10-auth]\nconfig = \"realm=api;tokens_secret=api-tokens\"\n\
         secrets = [\"api-tokens\"]\n\
         [record]\ndir = {:?}\n",
        tokens.display().to_string(),
        records.path().display().to_string()
    );
    let host = RunningHost::start(&[("10-auth", BEARER_AUTH), ("20-asm", ASM_DEMO)], &toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    let started = request(
        host.admin,
        "POST",
        "/record?chain=default&sample=1&max_exchanges=100",
        &[],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(started.status, 200);
    let recording: std::path::PathBuf = started.json().unwrap()["file"].as_str().unwrap().into();

    assert_eq!(with_token(&envoy, "first-t0ken").await.status, 200);
    assert_eq!(with_token(&envoy, "spare-t0ken").await.status, 200);
    assert_eq!(with_token(&envoy, "second-t0ken").await.status, 401);
    assert_eq!(envoy.get("/headers").await.unwrap().status, 401);

    rotate(&tokens, "second-t0ken\n");
    let mut rotated = false;
    for _ in 0..100 {
        if with_token(&envoy, "second-t0ken").await.status == 200 {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the rotated token was never accepted");
    assert_eq!(with_token(&envoy, "first-t0ken").await.status, 401);
    assert!(
        host.metrics().render().contains(
            r#"wasm_extproc_secret_refreshes_total{secret="api-tokens",result="changed"} 1"#
        ),
        "one change counted"
    );

    let listing = request(host.admin, "GET", "/plugins", &[], Vec::new())
        .await
        .unwrap();
    let auth = listing.json().unwrap()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "10-auth")
        .cloned()
        .unwrap();
    assert_eq!(auth["secrets"], serde_json::json!(["api-tokens"]));

    let stopped = request(
        host.admin,
        "POST",
        "/record?chain=default&stop=true",
        &[],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(stopped.status, 200);
    let mut recorded = String::new();
    for _ in 0..200 {
        recorded = std::fs::read_to_string(&recording).unwrap_or_default();
        if recorded.matches("\n  - name: ").count() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(recorded.contains("/headers"), "{recorded}");
    let log = captured.text();
    assert!(log.contains("10-auth"), "the log was captured:\n{log}");
    for (what, text) in [
        (
            "/plugins",
            String::from_utf8_lossy(&listing.body).into_owned(),
        ),
        ("the log", log),
        ("the recording", recorded),
    ] {
        assert!(
            !text.contains("t0ken"),
            "a secret's value in {what}:\n{text}"
        );
    }
}

/// A plugin reads only what it was granted: bearer-auth told to take its tokens from a secret
/// it was not granted accepts none of them (and says why in the log), and a grant of a secret
/// no `[secrets]` entry defines is refused at start, naming it.
#[tokio::test]
async fn a_secret_not_granted_reads_as_absent_and_an_undefined_grant_is_refused() {
    let (captured, _guard) = Captured::on_this_thread(tracing::Level::WARN);
    let mounted = tempfile::tempdir().unwrap();
    let tokens = mounted.path().join("tokens");
    std::fs::write(&tokens, "only-for-others").unwrap();
    let toml = format!(
        "[secrets]\napi-tokens = {:?}\n\
         [plugins.10-auth]\nconfig = \"realm=api;tokens_secret=api-tokens\"\n",
        tokens.display().to_string()
    );
    let host = RunningHost::start(&[("10-auth", BEARER_AUTH)], &toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    assert_eq!(with_token(&envoy, "only-for-others").await.status, 401);
    assert!(upstream.seen().is_empty());
    let log = captured.text();
    assert!(
        log.contains("the secret \"api-tokens\" was not granted to this plugin"),
        "{log}"
    );

    let undefined = wasm_extproc::config::Settings::from_toml(
        "[plugins.10-auth]\nsecrets = [\"api-token\"]\n",
        Path::new("host.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        undefined.contains("[plugins.10-auth]: secrets: no secret named \"api-token\""),
        "{undefined}"
    );
}
