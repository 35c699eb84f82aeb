//! Per-route chains through a real Envoy running deploy/envoy/envoy.yaml's routes: `/checkout`
//! names the chain `checkout` in its stream's initial metadata, `/static` has ext_proc
//! disabled, everything else gets the default chain. The same in Envoy's process, with
//! deploy/envoy/envoy-in-process.yaml's routes (`in_envoys_process_*`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use extproc_testkit::deployment::{Case, Deployment, Mode};
use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, EnvoyConfig, HttpResponse, first_access_log_line};
use extproc_testkit::fixtures::{ASM_DEMO, ASM_V2, BEARER_AUTH, Component, TAGGER};
use extproc_testkit::host::RunningHost;
use wasm_extproc::http::Phase;

use super::operations::replace_file;

/// The tagger in both chains, configured per chain: the tag says which chain ran.
const TAGGERS: &str = "[plugins.tag]\nconfig = \"everyone\"\n\
                       [chains.checkout.plugins.tag]\nconfig = \"checkout\"\n";

/// A third chain, `search`, serving the route named `default` (by `[chains.NAME] routes`).
const SEARCH_PLUGINS: [(&str, Component); 3] = [
    ("tag", TAGGER),
    ("checkout/tag", TAGGER),
    ("search/tag", TAGGER),
];
const SEARCH: &str = "[chains.search]\nroutes = [\"default\"]\n\
                      [chains.search.plugins.tag]\nconfig = \"search\"\n";

fn tag(response: &HttpResponse) -> String {
    response.header_values("x-chain").join(",")
}

async fn envoy_for(host: &RunningHost, config: &EnvoyConfig) -> (Envoy, EchoServer) {
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start_with(config, host.address, upstream.address)
        .await
        .unwrap();
    (envoy, upstream)
}

/// The ext_proc streams Envoy has opened, from its own counters.
async fn streams_started(envoy: &Envoy) -> u64 {
    let stats = envoy
        .admin_get("/stats?filter=ext_proc.streams_started")
        .await
        .unwrap();
    stats
        .lines()
        .find_map(|line| line.split_once("ext_proc.streams_started: "))
        .map_or(0, |(_, n)| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_gets_its_chain_and_a_disabled_route_opens_no_stream() {
    let host = RunningHost::start(&[("tag", TAGGER), ("checkout/tag", TAGGER)], TAGGERS).await;
    let (envoy, upstream) = envoy_for(&host, &EnvoyConfig::default()).await;

    assert_eq!(tag(&envoy.get("/headers").await.unwrap()), "everyone");
    assert_eq!(tag(&envoy.get("/checkout/cart").await.unwrap()), "checkout");
    let metrics = host.metrics();
    for chain in ["default", "checkout"] {
        assert_eq!(
            metrics.chain_plugin_calls(chain, "tag", Phase::RequestHeaders, "ok"),
            1,
            "{chain}"
        );
    }

    let before = streams_started(&envoy).await;
    assert_eq!(before, 2);
    let response = envoy.get("/static/logo.png").await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(tag(&response), "");
    assert_eq!(upstream.seen().last().unwrap().path, "/static/logo.png");
    assert_eq!(
        streams_started(&envoy).await,
        before,
        "no stream for /static"
    );
    assert_eq!(metrics.active_streams(), 0);

    // The admin listing knows the chains.
    let listing = extproc_testkit::envoy::request(host.admin, "GET", "/plugins", &[], Vec::new())
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        listing["chains"],
        serde_json::json!([
            {"name": "default", "routes": [], "plugins": ["tag"], "shadows": []},
            {"name": "checkout", "routes": [], "plugins": ["tag"], "shadows": []},
        ])
    );
    assert_eq!(listing["plugins"][1]["chain"], "checkout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_naming_an_unknown_chain_gets_the_configured_answer() {
    let nowhere = EnvoyConfig::default().edit("value: checkout\n", "value: nowhere\n");

    // By default: the default chain, said once and counted.
    let host = RunningHost::start(&[("tag", TAGGER), ("checkout/tag", TAGGER)], TAGGERS).await;
    let (envoy, _upstream) = envoy_for(&host, &nowhere).await;
    for _ in 0..2 {
        assert_eq!(tag(&envoy.get("/checkout/cart").await.unwrap()), "everyone");
    }
    assert_eq!(host.metrics().unknown_chains("default"), 2);

    // Rejected: the host answers 500, the upstream never sees it, Envoy's log says why.
    let log = tempfile::tempdir().unwrap();
    let access_log = log.path().join("access.log");
    let host = RunningHost::start(
        &[("tag", TAGGER), ("checkout/tag", TAGGER)],
        &format!("unknown_chain = \"reject\"\n{TAGGERS}"),
    )
    .await;
    let (envoy, upstream) = envoy_for(&host, &nowhere.access_log(&access_log)).await;
    let response = envoy.get("/checkout/cart").await.unwrap();
    assert_eq!(response.status, 500);
    assert!(upstream.seen().is_empty());
    assert_eq!(
        first_access_log_line(&access_log).await,
        "500 wasm_extproc_unknown_chain"
    );
    assert_eq!(host.metrics().unknown_chains("reject"), 1);
    // Other routes are served as ever.
    assert_eq!(tag(&envoy.get("/headers").await.unwrap()), "everyone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_name_picks_the_chain_when_envoy_sends_it() {
    let host = RunningHost::start(&SEARCH_PLUGINS, &format!("{TAGGERS}{SEARCH}")).await;
    let config =
        EnvoyConfig::default().filter("request_attributes: [xds.route_name, source.address]");
    let (envoy, _upstream) = envoy_for(&host, &config).await;
    // The route `default` maps to `search`; `/checkout` names its chain, which comes first.
    assert_eq!(tag(&envoy.get("/headers").await.unwrap()), "search");
    assert_eq!(tag(&envoy.get("/checkout/cart").await.unwrap()), "checkout");
}

/// One chain's plugin replaced while both routes take traffic: no request fails, each route's
/// requests see only their own chain's plugins, and the new version takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_one_chain_under_traffic_loses_nothing_and_never_crosses_chains() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("checkout")).unwrap();
    std::fs::write(dir.path().join("tag.wasm"), TAGGER.bytes()).unwrap();
    std::fs::write(dir.path().join("checkout/asm.wasm"), ASM_DEMO.bytes()).unwrap();
    let host = RunningHost::start_in(dir.path(), "[plugins.tag]\nconfig = \"everyone\"\n").await;
    let (envoy, _upstream) = envoy_for(&host, &EnvoyConfig::default()).await;
    let envoy = Arc::new(envoy);

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = |path: &'static str| {
        let (envoy, stop) = (envoy.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let response = envoy.get(path).await.unwrap();
                assert_eq!(response.status, 200, "{path}");
                seen.push((
                    tag(&response),
                    response.header_values("x-ext-proc-header").join(","),
                ));
            }
            seen
        })
    };
    let (checkout, others) = (traffic("/checkout/cart"), traffic("/headers"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    replace_file(&dir.path().join("checkout/asm.wasm"), &ASM_V2.bytes());
    let switched = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let response = envoy.get("/checkout/cart").await.unwrap();
            if response.header_values("x-ext-proc-header") == ["hello-from-asm-v2"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (checkout, others) = (checkout.await.unwrap(), others.await.unwrap());
    switched.expect("the checkout chain's new version serves");
    assert!(checkout.len() > 10 && others.len() > 10);
    for (chain_tag, asm) in &checkout {
        assert_eq!(chain_tag, "", "the default chain's tagger ran on /checkout");
        assert!(
            asm == "hello-from-asm" || asm == "hello-from-asm-v2",
            "{asm:?}"
        );
    }
    for (chain_tag, asm) in &others {
        assert_eq!(chain_tag, "everyone");
        assert_eq!(asm, "", "the checkout chain ran on /headers");
    }
}

/// The host switches off, per stream, what the stream's own chain does not need: a chain that
/// handles request headers only gets no response phases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_that_needs_only_request_headers_gets_no_response_phases() {
    let host = RunningHost::start(
        &[("tag", TAGGER), ("checkout/auth", BEARER_AUTH)],
        "[plugins.tag]\nconfig = \"everyone\"\n\
         [chains.checkout.plugins.auth]\nconfig = \"tokens=s3cret\"\n",
    )
    .await;
    let (envoy, _upstream) = envoy_for(&host, &EnvoyConfig::default()).await;
    let metrics = host.metrics();
    let response_headers = || metrics.messages_received(Phase::ResponseHeaders);

    let request = extproc_testkit::envoy::HttpRequest::new("GET", "/checkout/cart")
        .header("authorization", "Bearer s3cret");
    assert_eq!(envoy.send(&request).await.unwrap().status, 200);
    assert_eq!(
        envoy.get("/checkout/cart").await.unwrap().status,
        401,
        "the checkout chain's auth plugin ran"
    );
    assert_eq!(response_headers(), 0);

    assert_eq!(tag(&envoy.get("/headers").await.unwrap()), "everyone");
    assert_eq!(response_headers(), 1);
}

/// The routes of deploy/envoy/envoy-in-process.yaml, plugins in Envoy's process: `/checkout`'s
/// configuration of the filter names the chain `checkout`, Envoy takes the filter out of
/// `/static`'s streams, everything else gets the default chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_envoys_process_each_route_gets_its_chain_and_a_disabled_route_runs_no_plugin() {
    let case = Case::new(&[("tag", TAGGER), ("checkout/tag", TAGGER)], TAGGERS);
    let d = Deployment::start(Mode::InProcess, &case).await;
    assert_eq!(tag(&d.envoy.get("/headers").await.unwrap()), "everyone");
    assert_eq!(
        tag(&d.envoy.get("/checkout/cart").await.unwrap()),
        "checkout"
    );
    let response = d.envoy.get("/static/logo.png").await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(tag(&response), "");
    assert_eq!(d.upstream.seen().last().unwrap().path, "/static/logo.png");
    // Per chain, as over ext_proc: /headers and the count's own request to / in the default
    // chain (not /static), /checkout/cart in `checkout`.
    let calls = d.module_stats("phase.request_headers.outcome.ok").await;
    assert_eq!(
        calls,
        [
            (
                "plugin_calls.chain.checkout.plugin.tag.phase.request_headers.outcome.ok".into(),
                1
            ),
            (
                "plugin_calls.chain.default.plugin.tag.phase.request_headers.outcome.ok".into(),
                2
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_envoys_process_a_route_naming_an_unknown_chain_gets_the_configured_answer() {
    let plugins = [("tag", TAGGER), ("checkout/tag", TAGGER)];
    let nowhere =
        |toml: &str| Case::new(&plugins, toml).edit("chain = \"checkout\"", "chain = \"nowhere\"");
    // By default: the default chain, said once and counted.
    let d = Deployment::start(Mode::InProcess, &nowhere(TAGGERS)).await;
    for _ in 0..2 {
        assert_eq!(
            tag(&d.envoy.get("/checkout/cart").await.unwrap()),
            "everyone"
        );
    }
    assert_eq!(
        d.module_stats("unknown_chain_streams").await,
        [("unknown_chain_streams.answer.default".to_string(), 2)]
    );

    // Rejected: 500 before the upstream, and Envoy's log says why.
    let log = tempfile::tempdir().unwrap();
    let access_log = log.path().join("access.log");
    let case = nowhere(&format!("unknown_chain = \"reject\"\n{TAGGERS}")).access_log(&access_log);
    let d = Deployment::start(Mode::InProcess, &case).await;
    let response = d.envoy.get("/checkout/cart").await.unwrap();
    assert_eq!(response.status, 500);
    assert!(d.upstream.seen().is_empty());
    assert_eq!(
        first_access_log_line(&access_log).await,
        "500 wasm_extproc_unknown_chain"
    );
    assert_eq!(tag(&d.envoy.get("/headers").await.unwrap()), "everyone");
    assert_eq!(
        d.module_stats("unknown_chain_streams").await,
        [("unknown_chain_streams.answer.reject".to_string(), 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_envoys_process_the_route_name_picks_the_chain() {
    let case = Case::new(&SEARCH_PLUGINS, &format!("{TAGGERS}{SEARCH}"));
    let d = Deployment::start(Mode::InProcess, &case).await;
    // The route `default` maps to `search`; `/checkout` names its chain, which comes first.
    assert_eq!(tag(&d.envoy.get("/headers").await.unwrap()), "search");
    assert_eq!(
        tag(&d.envoy.get("/checkout/cart").await.unwrap()),
        "checkout"
    );
}
