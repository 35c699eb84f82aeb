//! The same plugin in four languages, through a real Envoy: the claim that plugin authors can
//! use the language they know holds only where it is tested. Built from source by
//! `cargo xtask build-plugins` (see `plugins/examples/`).

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, EnvoyConfig, HttpRequest};
use extproc_testkit::fixtures::{
    API_KEY_JS, ASM_DEMO, ASM_DEMO_C, ASM_DEMO_JS, ASM_DEMO_PY, Component, JSON_REWRITE_PY,
    RAISE_ERROR_PY, THROW_JS, TRAP, TRAP_BUNDLED,
};
use extproc_testkit::grpc::{self, ExtProcStream};
use extproc_testkit::host::RunningHost;

use super::hostile::Captured;

/// JavaScript and Python components are megabytes of interpreter: compiling them takes seconds
/// in an unoptimised test build, and a call takes longer than a Rust plugin's.
const GENEROUS: &str =
    "[envoy]\nmessage_timeout_ms = 5000\n[defaults]\ntimeout_ms = 1000\nmemory_limit_mib = 128\n";

async fn through_envoy(
    plugins: &[(&str, Component)],
    toml: &str,
    config: EnvoyConfig,
) -> (RunningHost, EchoServer, Envoy) {
    let host = RunningHost::start(plugins, &format!("{GENEROUS}{toml}")).await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start_with(&config, host.address, upstream.address)
        .await
        .unwrap();
    (host, upstream, envoy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_asm_demo_gives_the_same_result_in_every_language() {
    for plugin in [ASM_DEMO, ASM_DEMO_JS, ASM_DEMO_PY, ASM_DEMO_C] {
        let (_host, upstream, envoy) =
            through_envoy(&[("asm", plugin)], "", EnvoyConfig::default()).await;
        for _ in 0..3 {
            tagged_both_ways(&envoy, plugin).await;
        }
        assert_eq!(upstream.seen().len(), 3);
    }
}

/// One request through Envoy, tagged on the way in (as the upstream echoes it) and on the way
/// back, as the ASM demo promises.
async fn tagged_both_ways(envoy: &Envoy, plugin: Component) {
    let response = envoy.get("/headers").await.unwrap();
    assert_eq!(response.status, 200, "{}", plugin.name());
    assert_eq!(
        response.header_values("x-ext-proc-header"),
        ["hello-from-asm"],
        "{}",
        plugin.name()
    );
    let echoed = response.json().unwrap();
    assert_eq!(
        echoed["headers"]["X-Ext-Proc-Header"],
        "hello-to-asm",
        "{}",
        plugin.name()
    );
}

/// `isolation = "reuse"` with an interpreter: the instance that served one exchange serves the
/// next (the JavaScript engine's and Python's state carry over), and every exchange still comes
/// out as the plugin promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interpreted_plugins_serve_exchange_after_exchange_from_one_reused_instance() {
    for plugin in [ASM_DEMO_JS, ASM_DEMO_PY] {
        let (host, upstream, envoy) = through_envoy(
            &[("asm", plugin)],
            "[plugins.asm]\nisolation = \"reuse\"\n",
            EnvoyConfig::default(),
        )
        .await;
        for _ in 0..4 {
            tagged_both_ways(&envoy, plugin).await;
        }
        assert_eq!(upstream.seen().len(), 4);
        let exposition = host.metrics().render();
        let instantiated = exposition
            .lines()
            .find_map(|line| {
                line.strip_prefix(
                    "wasm_extproc_plugin_instantiate_duration_seconds_count{chain=\"default\",plugin=\"asm\"} ",
                )
            })
            .unwrap_or_else(|| panic!("{exposition}"));
        assert_eq!(
            instantiated,
            "1",
            "{}: one instance for four exchanges",
            plugin.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_api_key_check_answers_401_without_a_valid_key() {
    let (_host, upstream, envoy) = through_envoy(
        &[("10-keys", API_KEY_JS), ("20-asm", ASM_DEMO)],
        "[plugins.10-keys]\nconfig = '{\"header\": \"X-Api-Key\", \"keys\": [\"k-123\"]}'\n",
        EnvoyConfig::default(),
    )
    .await;
    let missing = envoy.get("/headers").await.unwrap();
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.json().unwrap()["error"],
        "missing or invalid x-api-key"
    );
    let wrong = envoy
        .request("GET", "/headers", &[("x-api-key", "k-999")], Vec::new())
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    assert!(upstream.seen().is_empty());

    let allowed = envoy
        .request("GET", "/headers", &[("x-api-key", "k-123")], Vec::new())
        .await
        .unwrap();
    assert_eq!(allowed.status, 200);
    let seen = &upstream.seen()[0];
    assert_eq!(seen.header("x-api-key"), None, "the key is not passed on");
    assert_eq!(
        seen.header("x-ext-proc-header").as_deref(),
        Some("hello-to-asm")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_json_rewrite_edits_whole_request_bodies() {
    let (_host, upstream, envoy) = through_envoy(
        &[("rewrite", JSON_REWRITE_PY)],
        "[plugins.rewrite]\nconfig = '{\"source\": \"mesh\"}'\n",
        EnvoyConfig::default().mode("request_body_mode", "BUFFERED"),
    )
    .await;
    let response = envoy
        .send(
            &HttpRequest::new("POST", "/anything")
                .header("content-type", "application/json")
                .body(br#"{"order":42}"#.to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(upstream.seen()[0].body, br#"{"order":42,"source":"mesh"}"#);
    // Not JSON: untouched.
    let response = envoy
        .request("POST", "/anything", &[], b"plain text".to_vec())
        .await
        .unwrap();
    assert_eq!(response.body, b"plain text");
}

#[tokio::test]
async fn compiled_plugins_are_cached_across_restarts() {
    let cache = tempfile::tempdir().unwrap();
    let dir = extproc_testkit::host::plugin_dir(&[("10-js", ASM_DEMO_JS), ("20-rust", ASM_DEMO)]);
    let toml = format!(
        "[runtime]\nmax_instances = 1000\ncache_dir = {:?}\n",
        cache.path().display().to_string()
    );
    let config = extproc_testkit::host::config(dir.path(), &toml);

    let first = wasm_extproc::Host::load(&config).await.unwrap();
    assert_eq!(
        first.compile_cache_stats(),
        Some((0, 2)),
        "a cold start compiles both"
    );
    drop(first);
    let second = wasm_extproc::Host::load(&config).await.unwrap();
    assert_eq!(
        second.compile_cache_stats(),
        Some((2, 0)),
        "a restart compiles nothing"
    );
    assert_eq!(second.current().unwrap().default_chain().plugins().len(), 2);
}

/// What a JavaScript or Python plugin prints, and the exception that fails it (message and
/// stack), reach the host's log, tagged with the plugin, the phase and the stream, beside the
/// host's own line about the failure.
#[tokio::test(flavor = "current_thread")]
async fn prints_and_uncaught_exceptions_reach_the_log() {
    // The runtime is single-threaded: the host and the plugins log on this thread.
    let (captured, _guard) = Captured::on_this_thread(tracing::Level::INFO);
    // (plugin, what the log must show); fail-open, so one request reaches all three.
    let cases: [(&str, &[&str]); 3] = [
        (
            "10-throw",
            &[
                "throw fixture: request headers seen",
                "boom from the throw fixture",
                "boom@",
            ],
        ),
        ("20-undefined", &["throw fixture: request headers seen"]),
        (
            "30-raise",
            &[
                "raise fixture: request headers seen",
                "Traceback",
                "ValueError: boom from the raise fixture",
            ],
        ),
    ];
    // The two JavaScript plugins are the same file: with the tests' shared compile cache,
    // compiled once.
    let host = RunningHost::start(
        &[
            ("10-throw", THROW_JS),
            ("20-undefined", THROW_JS),
            ("30-raise", RAISE_ERROR_PY),
        ],
        &format!(
            "{GENEROUS}failure_policy = \"fail-open\"\n\
             [plugins.10-throw]\nconfig = \"throw\"\n\
             [plugins.20-undefined]\nconfig = \"undefined\"\n\
             [runtime]\nmax_instances = 100\n"
        ),
    )
    .await;
    let log = log_of_one_exchange(&host, &captured).await;
    for (plugin, expected) in cases {
        let from_plugin = trapped_and_logged(&host, &log, plugin);
        for text in expected {
            assert!(
                from_plugin
                    .iter()
                    .any(|line| line.contains(text) && line.contains("phase=\"request_headers\"")),
                "{plugin}: no line with {text:?} in\n{log}"
            );
        }
    }
}

/// A Rust panic's message and location reach the log as one error line, on both targets the
/// templates and fixtures build for: `wasm32-unknown-unknown` has no stderr at all, and WASI's
/// default hook adds a `RUST_BACKTRACE` hint that does nothing in a component.
#[tokio::test(flavor = "current_thread")]
async fn a_rust_panic_reaches_the_log_on_every_target() {
    let (captured, _guard) = Captured::on_this_thread(tracing::Level::INFO);
    let host = RunningHost::start(
        &[("10-wasi", TRAP), ("20-bundled", TRAP_BUNDLED)],
        "[defaults]\nfailure_policy = \"fail-open\"\n",
    )
    .await;
    let log = log_of_one_exchange(&host, &captured).await;
    for plugin in ["10-wasi", "20-bundled"] {
        let from_plugin = trapped_and_logged(&host, &log, plugin);
        assert!(
            from_plugin.iter().any(|line| line.contains("ERROR")
                && line.contains("phase=\"request_headers\"")
                && line.contains("panicked at ")
                && line.contains("src/lib.rs:")
                && line.contains("trap fixture: panicking as asked")),
            "{plugin}: no error line with the panic's location and message in\n{log}"
        );
        assert!(
            !from_plugin
                .iter()
                .any(|line| line.contains("RUST_BACKTRACE")),
            "{plugin}: a backtrace hint in\n{log}"
        );
    }
}

/// Checks that `plugin` trapped once; its lines in `log`.
fn trapped_and_logged<'a>(host: &RunningHost, log: &'a str, plugin: &str) -> Vec<&'a str> {
    assert_eq!(
        host.metrics().plugin_outcomes(plugin, "trap"),
        1,
        "{plugin}"
    );
    log.lines()
        .filter(|line| line.contains(&format!("plugin=\"{plugin}\"")))
        .collect()
}

/// What the host logged while it served one exchange of request headers.
async fn log_of_one_exchange(host: &RunningHost, captured: &Captured) -> String {
    let mut stream = ExtProcStream::connect(host.address).await;
    stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    captured.text()
}
