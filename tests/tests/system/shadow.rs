//! Shadow mode through Envoy: a candidate plugin runs beside the serving one on live traffic,
//! compared and never applied.

use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, request};
use extproc_testkit::fixtures::{ASM_DEMO, ASM_V2, Component, GATE, SPIN, TRAP};
use extproc_testkit::host::RunningHost;

/// Serves the ASM plugin with `shadow` beside it, configured with `config`; sends one request
/// through Envoy and checks that the client and the upstream see exactly what the ASM plugin
/// alone gives them. Returns the host, for its metrics.
async fn beside_asm(shadow: Component, config: &str) -> RunningHost {
    let toml = format!(
        "[plugins.20-candidate]\nmode = \"shadow\"\nshadows = \"10-asm\"\ntimeout_ms = 100\n\
         config = \"{config}\"\n"
    );
    let host = RunningHost::start(&[("10-asm", ASM_DEMO), ("20-candidate", shadow)], &toml).await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    let response = envoy.get("/headers").await.unwrap();
    let name = shadow.name();
    assert_eq!(response.status, 200, "{name}: {}", envoy.log());
    assert_eq!(
        response.header_values("x-ext-proc-header"),
        ["hello-from-asm"],
        "{name}"
    );
    assert!(response.header_values("x-gate").is_empty(), "{name}");
    let echoed = response.json().unwrap();
    assert_eq!(
        echoed["headers"]["X-Ext-Proc-Header"], "hello-to-asm",
        "{name}: the upstream saw {echoed}"
    );
    host
}

/// A shadow that traps, loops past its budget or answers 403 changes nothing the client or
/// the upstream sees; its failure or its different answer is counted against it.
#[tokio::test]
async fn a_failing_or_refusing_shadow_changes_nothing_the_client_or_the_upstream_sees() {
    for (shadow, config, failure) in [
        (TRAP, "", Some("trap")),
        (SPIN, "", Some("deadline")),
        (GATE, "request_headers", None),
    ] {
        let host = beside_asm(shadow, config).await;
        let metrics = host.metrics();
        let counted = |kind| metrics.shadow_failures("default", "20-candidate", kind);
        match failure {
            Some(kind) => {
                assert_eq!(counted(kind), 1, "{}: {}", shadow.name(), metrics.render());
                assert_eq!(metrics.shadow_differences("default", "20-candidate"), 0);
            }
            None => {
                // 403 where the ASM plugin tags the request; nothing where it tags the
                // response.
                assert_eq!(metrics.shadow_differences("default", "20-candidate"), 2);
                assert_eq!(counted("trap") + counted("deadline"), 0);
            }
        }
        // The serving plugin ran, and was never failed for the shadow's sake.
        assert_eq!(
            metrics.plugin_outcomes("10-asm", "ok"),
            2,
            "{}",
            shadow.name()
        );
        assert_eq!(metrics.plugin_outcomes("10-asm", "trap"), 0);
    }
}

/// A candidate that tags differently is compared on every call and counted as different;
/// one that does the same is not. The exposition names the series operators alert on.
#[tokio::test]
async fn a_shadows_differences_are_counted_per_call() {
    let host = beside_asm(ASM_V2, "").await;
    let metrics = host.metrics();
    assert_eq!(metrics.shadow_differences("default", "20-candidate"), 2);
    assert!(
        metrics.render().contains(
            "wasm_extproc_shadow_differences_total{chain=\"default\",plugin=\"20-candidate\"} 2"
        ),
        "{}",
        metrics.render()
    );

    let host = beside_asm(ASM_DEMO, "").await;
    let metrics = host.metrics();
    assert_eq!(metrics.shadow_differences("default", "20-candidate"), 0);
    assert_eq!(metrics.plugin_outcomes("20-candidate", "ok"), 2);
}

/// A shadow must name a plugin its chain serves with: otherwise the load fails naming the
/// file, and (on reload) the chain already serving goes on.
#[tokio::test]
async fn a_shadow_of_no_serving_plugin_is_refused_at_load() {
    let host = RunningHost::start_unloaded(
        &[("10-asm", ASM_DEMO), ("20-candidate", ASM_V2)],
        "[plugins.20-candidate]\nmode = \"shadow\"\nshadows = \"10-auth\"\n",
    )
    .await;
    let error = format!("{:#}", host.load().await.unwrap_err());
    assert!(
        error.contains("20-candidate.wasm: mode = \"shadow\" beside \"10-auth\", which chain \"default\" does not serve with (its plugins: 10-asm)"),
        "{error}"
    );
}

/// Operators see a shadow as one: `/plugins` gives its mode and the plugin it runs beside, no
/// failure policy (none applies to it), and its chain lists it apart from the plugins that
/// serve.
#[tokio::test]
async fn the_admin_listing_shows_each_shadow_and_what_it_runs_beside() {
    let host = RunningHost::start(
        &[("10-asm", ASM_DEMO), ("20-candidate", ASM_V2)],
        "[plugins.20-candidate]\nmode = \"shadow\"\nshadows = \"10-asm\"\n",
    )
    .await;
    let listing = request(host.admin, "GET", "/plugins", &[], Vec::new())
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        listing["chains"][0]["plugins"],
        serde_json::json!(["10-asm"])
    );
    assert_eq!(
        listing["chains"][0]["shadows"],
        serde_json::json!([{"name": "20-candidate", "beside": "10-asm"}])
    );
    let plugin = |name: &str| {
        listing["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {listing}"))
            .clone()
    };
    let candidate = plugin("20-candidate");
    assert_eq!(candidate["mode"], "shadow", "{candidate}");
    assert_eq!(candidate["shadows"], "10-asm", "{candidate}");
    assert!(candidate["failure_policy"].is_null(), "{candidate}");
    let serving = plugin("10-asm");
    assert_eq!(serving["mode"], "serve", "{serving}");
    assert!(serving["shadows"].is_null(), "{serving}");
    assert!(serving["failure_policy"].is_string(), "{serving}");
}
