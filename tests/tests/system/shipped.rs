//! The fixture zoo at the settings the project ships, through a real Envoy in both modes: the
//! README's defaults (20 ms per call, fail-closed with 500, Envoy's 200 ms `message_timeout`)
//! with none of the other test modules' generous budgets. Only the instance pool is smaller
//! than shipped, since many tests share one process's address space.

use extproc_testkit::deployment::{Case, Deployment, Mode};
use extproc_testkit::envoy::first_access_log_line;
use extproc_testkit::fixtures::{
    ASM_DEMO, Component, FLOOD, MEMORY_HOG, MISBEHAVE, RECURSE, SLOW, SPIN, TRAP,
};

/// Empty tables: the shipped defaults, not the test harness's relaxed ones.
const SHIPPED: &str = "[defaults]\n[envoy]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hostile_plugin_costs_its_request_a_500_before_the_upstream() {
    // (fixture, its settings, the failure kinds it may end with)
    let zoo: [(Component, &str, &[&str]); 7] = [
        (TRAP, "config = \"panic\"", &["trap"]),
        (TRAP, "config = \"unreachable\"", &["trap"]),
        (SPIN, "", &["deadline"]),
        // Growing to the 32 MiB ceiling a MiB at a time can outlast 20 ms in an unoptimised
        // test build on a busy machine: stopped either way, before the upstream.
        (MEMORY_HOG, "", &["memory_limit", "deadline"]),
        (RECURSE, "", &["trap"]),
        (MISBEHAVE, "config = \"bad-name\"", &["invalid_output"]),
        // The guard refuses the 10 MiB header; an unoptimised test build may spend its 20 ms
        // copying it out of the guest first.
        (FLOOD, "config = \"value\"", &["invalid_output", "deadline"]),
    ];
    for mode in Mode::BOTH {
        for (fixture, settings, kinds) in zoo {
            let label = format!("{mode:?} {} ({settings})", fixture.name());
            let dir = tempfile::tempdir().unwrap();
            let access_log = dir.path().join("access.log");
            let case = Case::new(
                &[("10-faulty", fixture), ("20-asm", ASM_DEMO)],
                &format!("{SHIPPED}[plugins.10-faulty]\n{settings}\n"),
            )
            .access_log(&access_log);
            let d = Deployment::start(mode, &case).await;
            let response = d.envoy.get("/headers").await.unwrap();
            assert_eq!(response.status, 500, "{label}");
            assert!(
                response.header_values("x-ext-proc-header").is_empty(),
                "{label}"
            );
            assert!(d.upstream.seen().is_empty(), "{label}: upstream touched");
            let line = first_access_log_line(&access_log).await;
            assert!(
                kinds
                    .iter()
                    .any(|kind| line == format!("500 wasm_extproc_plugin_failed:10-faulty:{kind}")),
                "{label}: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_plugins_and_one_near_its_budget_serve_every_request() {
    let case = Case::new(
        &[("10-slow", SLOW), ("20-asm", ASM_DEMO)],
        &format!("{SHIPPED}[plugins.10-slow]\nconfig = \"2\"\n"),
    );
    for mode in Mode::BOTH {
        let d = Deployment::start(mode, &case).await;
        for _ in 0..20 {
            let response = d.envoy.get("/headers").await.unwrap();
            let json = response.assert_tagged_by_asm(&format!("{mode:?}"));
            assert_eq!(json["headers"]["X-Slow"], "done", "{mode:?}");
        }
        assert_eq!(d.upstream.seen().len(), 20, "{mode:?}");
    }
}
