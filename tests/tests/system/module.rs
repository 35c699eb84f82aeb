//! What only the in-process mode has: loading inside Envoy (a configuration that cannot load is
//! refused, with the reason in Envoy's log), the server's settings it ignores, its log lines in
//! Envoy's log, and its metrics as Envoy stats.

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, EnvoyConfig};
use extproc_testkit::fixtures::{ASM_DEMO, Component, TRAP};
use extproc_testkit::host::plugin_dir;

/// Starts Envoy with `plugins` in-process under `toml`.
async fn start(
    plugins: &[(&str, Component)],
    toml: &str,
) -> (anyhow::Result<Envoy>, EchoServer, tempfile::TempDir) {
    let dir = plugin_dir(plugins);
    let upstream = EchoServer::start().await.unwrap();
    let config = EnvoyConfig::default().in_process(dir.path(), toml);
    let envoy = Envoy::start_with(&config, upstream.address, upstream.address).await;
    (envoy, upstream, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_that_cannot_load_is_refused_with_the_reason() {
    // (plugins, configuration, what Envoy's error must say)
    type Refusal = (
        &'static [(&'static str, Component)],
        &'static str,
        &'static str,
    );
    let cases: [Refusal; 4] = [
        (
            &[("asm", ASM_DEMO)],
            "[defaults]\ntimeout_ms = 0\n",
            "[defaults]: timeout_ms must be at least 1",
        ),
        (
            &[("asm", ASM_DEMO)],
            "[plugins.missing]\nconfig = \"x\"\n",
            "config has [plugins.missing] but",
        ),
        (
            &[("asm", ASM_DEMO)],
            "[module]\nrequest_attributes = [\"request.nope\"]\n",
            "\"request.nope\" is not an attribute",
        ),
        (&[], "", "no .wasm files"),
    ];
    for (plugins, toml, reason) in cases {
        let (envoy, _upstream, _dir) = start(plugins, toml).await;
        let error = format!("{:#}", envoy.expect_err(toml));
        assert!(
            error.contains("Failed to initialize dynamic module"),
            "{toml}: {error}"
        );
        assert!(error.contains("configuration refused"), "{toml}: {error}");
        assert!(error.contains(reason), "{toml}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_component_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.wasm"), b"not wasm").unwrap();
    let upstream = EchoServer::start().await.unwrap();
    let config = EnvoyConfig::default().in_process(dir.path(), "");
    let error = format!(
        "{:#}",
        Envoy::start_with(&config, upstream.address, upstream.address)
            .await
            .unwrap_err()
    );
    assert!(error.contains("broken.wasm"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_settings_are_ignored_with_a_warning() {
    let (envoy, _upstream, _dir) = start(
        &[("asm", ASM_DEMO)],
        "listen = \"0.0.0.0:9002\"\nshutdown_grace_ms = 5\n",
    )
    .await;
    let envoy = envoy.unwrap();
    let response = envoy.get("/headers").await.unwrap();
    assert_eq!(
        response.header_values("x-ext-proc-header"),
        ["hello-from-asm"]
    );
    let log = wait_for_log(&envoy, "have no meaning in-process").await;
    assert!(log.contains("listen, shutdown_grace_ms"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_reach_envoys_log_and_stats() {
    let (envoy, _upstream, _dir) = start(
        &[("10-trap", TRAP), ("20-asm", ASM_DEMO)],
        "[plugins.10-trap]\nfailure_policy = \"fail-open\"\n",
    )
    .await;
    let envoy = envoy.unwrap();
    for _ in 0..3 {
        assert_eq!(envoy.get("/headers").await.unwrap().status, 200);
    }
    let log = wait_for_log(&envoy, "plugin failed").await;
    assert!(log.contains("10-trap"), "{log}");
    assert!(log.contains("kind=\"trap\""), "{log}");
    // Stats trail by up to a second and are refreshed when a stream ends.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    envoy.get("/headers").await.unwrap();
    let prometheus = envoy.admin_get("/stats/prometheus").await.unwrap();
    let trap_calls = prometheus
        .lines()
        .find(|l| {
            l.starts_with("envoy_dynamicmodulescustom_plugin_calls{")
                && l.contains("plugin=\"10-trap\"")
                && l.contains("outcome=\"trap\"")
        })
        .unwrap_or_else(|| panic!("no trap series: {prometheus}"));
    assert!(trap_calls.ends_with(" 4"), "{trap_calls}");
    assert!(
        prometheus.contains("envoy_dynamicmodulescustom_streams{} 4")
            || prometheus.contains("envoy_dynamicmodulescustom_streams 4"),
        "{prometheus}"
    );
}

/// Envoy's log once it contains `text` (the module writes from a thread of its own).
async fn wait_for_log(envoy: &Envoy, text: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = envoy.log();
        if log.contains(text) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{text:?} never logged: {log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
