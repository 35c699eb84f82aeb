//! What the host refuses to start with, and what it says.

use extproc_testkit::fixtures::{ASM_DEMO, CONTRACT_0_2, CONTRACT_0_3, NO_ANSWER, WRONG_CONTRACT};
use extproc_testkit::host::{config, plugin_dir};
use wasm_extproc::Host;
use wasm_extproc::runtime::Contract;

async fn load_error(dir: &std::path::Path, toml: &str) -> String {
    let error = Host::load(&config(dir, toml))
        .await
        .expect_err("load must fail");
    format!("{error:#}")
}

#[tokio::test]
async fn a_component_built_against_another_contract_is_refused_by_name() {
    let dir = plugin_dir(&[("old", WRONG_CONTRACT)]);
    let error = load_error(dir.path(), "").await;
    assert!(
        error.contains("old.wasm: built against wasm-extproc:processor@0.0.9"),
        "{error}"
    );
    assert!(
        error.contains("this host speaks wasm-extproc:processor@0.4.0, 0.3.0 and 0.2.0"),
        "{error}"
    );
}

/// Asking a plugin what it handles runs on the load budget, not the per-call one: long enough
/// for an interpreter's snapshot to start on a busy machine, short enough that a plugin that
/// never answers stops the load with its name.
#[tokio::test]
async fn a_plugin_that_never_says_what_it_handles_is_refused_by_name_within_the_load_budget() {
    let dir = plugin_dir(&[("10-good", ASM_DEMO), ("20-silent", NO_ANSWER)]);
    let started = std::time::Instant::now();
    let error = load_error(dir.path(), "[plugins.\"20-silent\"]\ntimeout_ms = 5\n").await;
    let waited = started.elapsed();
    assert!(
        error.contains(
            "20-silent.wasm: failed while the host asked what it handles (register): ran past \
             its 1s deadline"
        ),
        "{error}"
    );
    assert!(waited < std::time::Duration::from_secs(10), "{waited:?}");
}

#[tokio::test]
async fn plugins_built_against_the_previous_contract_load_beside_current_ones() {
    let dir = plugin_dir(&[
        ("10-current", ASM_DEMO),
        ("20-previous", CONTRACT_0_3),
        ("30-older", CONTRACT_0_2),
    ]);
    let host = Host::load(&config(dir.path(), "")).await.unwrap();
    let generation = host.current().unwrap();
    let contracts: Vec<_> = generation
        .default_chain()
        .plugins()
        .iter()
        .map(|p| (p.name().to_string(), p.contract()))
        .collect();
    assert_eq!(
        contracts,
        [
            ("10-current".to_string(), Contract::V0_4),
            ("20-previous".to_string(), Contract::V0_3),
            ("30-older".to_string(), Contract::V0_2)
        ]
    );
}

#[tokio::test]
async fn a_file_that_is_not_a_component_is_refused_by_name() {
    let dir = plugin_dir(&[("10-good", ASM_DEMO)]);
    std::fs::write(dir.path().join("20-broken.wasm"), b"\0asm garbage").unwrap();
    let error = load_error(dir.path(), "").await;
    assert!(
        error.contains("20-broken.wasm: not a valid WebAssembly component"),
        "{error}"
    );
    assert!(!error.contains('\n'), "one line: {error}");
}

#[tokio::test]
async fn settings_for_a_plugin_that_is_not_there_are_refused() {
    let dir = plugin_dir(&[("asm-demo", ASM_DEMO)]);
    let error = load_error(dir.path(), "[plugins.asm]\nconfig = \"x\"\n").await;
    assert!(error.starts_with("config has [plugins.asm] but"), "{error}");
    assert!(
        error.ends_with("has no asm.wasm (found: asm-demo)"),
        "{error}"
    );
}

#[tokio::test]
async fn settings_for_a_chain_or_a_chains_plugin_that_is_not_there_are_refused() {
    let dir = plugin_dir(&[("asm", ASM_DEMO), ("checkout/auth", ASM_DEMO)]);
    let error = load_error(dir.path(), "[chains.search]\nroutes = [\"s\"]\n").await;
    assert!(
        error.starts_with("config has [chains.search] but")
            && error.ends_with("has no subdirectory search with .wasm files"),
        "{error}"
    );
    let error = load_error(
        dir.path(),
        "[chains.checkout.plugins.asm]\nconfig = \"x\"\n",
    )
    .await;
    assert!(
        error.starts_with("config has [chains.checkout.plugins.asm] but")
            && error.ends_with("checkout has no asm.wasm (found: auth)"),
        "{error}"
    );
    // A plugin's own settings may name a plugin of any chain.
    let host = Host::load(&config(dir.path(), "[plugins.auth]\nconfig = \"x\"\n"))
        .await
        .unwrap();
    let generation = host.current().unwrap();
    let names: Vec<_> = generation.chains().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["default", "checkout"]);
    assert_eq!(generation.chain(1).plugins()[0].settings().config, "x");
}

#[tokio::test]
async fn an_empty_plugin_directory_is_refused() {
    let dir = plugin_dir(&[]);
    let error = load_error(dir.path(), "").await;
    assert!(error.contains("no .wasm files"), "{error}");
}

#[tokio::test]
async fn the_loaded_chain_knows_which_phases_its_plugins_handle() {
    let dir = plugin_dir(&[("asm-demo", ASM_DEMO)]);
    let host = Host::load(&config(dir.path(), "")).await.unwrap();
    let generation = host.current().unwrap();
    let phases: Vec<_> = generation
        .default_chain()
        .phases()
        .iter()
        .map(|p| p.as_str())
        .collect();
    assert_eq!(phases, ["request_headers", "response_headers"]);
}

#[tokio::test]
async fn a_component_importing_what_the_host_does_not_provide_is_refused_by_name() {
    let dir = plugin_dir(&[("vault", extproc_testkit::fixtures::BAD_IMPORT)]);
    let error = load_error(dir.path(), "").await;
    assert!(
        error.contains("vault.wasm: imports `acme:vault/secrets`"),
        "{error}"
    );
    assert!(
        error.contains("which this host does not provide"),
        "{error}"
    );
}
