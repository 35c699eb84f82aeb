//! `wasm-extproc test` as a plugin author runs it: exchange files played through real
//! components without Envoy, a readable report, and exit codes a CI job can act on.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{built, repo};

/// `wasm-extproc test ARGS`, with budgets roomy enough for interpreters on a machine busy
/// with other tests (a Python plugin's first call can take longer than the default 20 ms).
fn test(args: &[&str]) -> Output {
    test_with(args, "")
}

/// `test`, with `more` added to its configuration file.
fn test_with(args: &[&str], more: &str) -> Output {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!("[defaults]\ntimeout_ms = 2000\n[envoy]\nmessage_timeout_ms = 5000\n{more}"),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_wasm-extproc"))
        .arg("test")
        .arg("--config")
        .arg(config.path())
        .args(args)
        .env("RUST_LOG", "off")
        .env_remove("WASM_EXTPROC_CONFIG")
        // Compiled components kept across tests and runs: the JavaScript and Python ones take
        // seconds each to compile, and several files play through the same ones.
        // (The system tests' hosts share the same directory: the test kit's
        // `fixtures::compile_cache`.)
        .env(
            "WASM_EXTPROC_CACHE_DIR",
            support::target_dir().join("tmp/compile-cache"),
        )
        .output()
        .expect("binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every exchange file the project ships, against every component it describes.
#[test]
fn the_shipped_exchange_files_pass() {
    // Component, its configuration string, the exchange file, and a host configuration file
    // (for the state store's bounds or an allowed endpoint) where the file needs one.
    let cases: [(&str, Option<&str>, &str, Option<&str>); 12] = [
        ("asm_demo", None, "plugins/asm-demo/exchanges.yaml", None),
        ("asm_demo_js", None, "plugins/asm-demo/exchanges.yaml", None),
        ("asm_demo_py", None, "plugins/asm-demo/exchanges.yaml", None),
        ("asm_demo_c", None, "plugins/asm-demo/exchanges.yaml", None),
        (
            "bearer_auth",
            Some("realm=api;tokens=s3cret"),
            "plugins/bearer-auth/exchanges.yaml",
            None,
        ),
        (
            "json_redact",
            Some("password,ssn"),
            "plugins/json-redact/exchanges.yaml",
            None,
        ),
        (
            "json_redact",
            Some("password,ssn"),
            "plugins/json-redact/hostile.exchanges.yaml",
            None,
        ),
        (
            "rate_limit",
            Some("limit=2;window_ms=60000"),
            "plugins/rate-limit/exchanges.yaml",
            None,
        ),
        (
            "rate_limit",
            Some("limit=2;window_ms=60000;key_header=x-api-key"),
            "plugins/rate-limit/hostile.exchanges.yaml",
            Some("plugins/rate-limit/hostile.toml"),
        ),
        (
            "token_introspect",
            Some("endpoint=http://127.0.0.1:9/introspect;on_error=allow"),
            "plugins/token-introspect/hostile.exchanges.yaml",
            Some("plugins/token-introspect/hostile.toml"),
        ),
        (
            "api_key_js",
            Some(r#"{"header": "x-api-key", "keys": ["key-1", "key-2"]}"#),
            "plugins/examples/javascript/api-key.exchanges.yaml",
            None,
        ),
        (
            "json_rewrite_py",
            Some(r#"{"source": "mesh"}"#),
            "plugins/examples/python/json_rewrite.exchanges.yaml",
            None,
        ),
    ];
    for (component, config, file, host_config) in cases {
        let plugin = built(component);
        let file = repo(file);
        let more = host_config
            .map(|f| std::fs::read_to_string(repo(f)).unwrap())
            .unwrap_or_default();
        let mut args = vec!["--plugin", plugin.to_str().unwrap()];
        if let Some(config) = config {
            args.extend(["--plugin-config", config]);
        }
        args.push(file.to_str().unwrap());
        let output = test_with(&args, &more);
        let stdout = text(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{component} {}:\n{stdout}{}",
            file.display(),
            text(&output.stderr)
        );
        assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
}

fn exchange_file(dir: &Path, yaml: &str) -> String {
    let path = dir.join("exchanges.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

const ASM_EXCHANGE: &str = r#"exchanges:
  - name: tagged
    request:
      headers: { ":method": GET, ":path": /, ":authority": httpbin }
    response:
      headers: { ":status": "200" }
    expect:
      request_headers: { set: { x-ext-proc-header: hello } }
"#;

/// A plugin that does not do what the file expects: exit 1, and the report shows the field,
/// the expected and the actual value, and what each phase produced.
#[test]
fn a_difference_fails_with_the_expected_and_the_actual_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = exchange_file(dir.path(), ASM_EXCHANGE);
    let plugin = built("asm_demo");
    let output = test(&["--plugin", plugin.to_str().unwrap(), &file]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("FAIL {file}: tagged  (chain default)")),
        "{stdout}"
    );
    assert!(stdout.contains("✗ request_headers.set"), "{stdout}");
    assert!(
        stdout.contains("expected: x-ext-proc-header: hello\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("actual  : x-ext-proc-header: hello-to-asm\n"),
        "{stdout}"
    );
    // What came out, ready to paste as the expectation.
    assert!(
        stdout.contains(
            "       response_headers:\n         set:\n           x-ext-proc-header: hello-from-asm\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 exchange(s), 0 passed, 1 failed"),
        "{stdout}"
    );
}

/// A plugin's failure is part of what comes out: expected, it passes; unexpected, it fails
/// the exchange, whatever else the file says.
#[test]
fn failures_are_compared_with_the_policy_they_lead_to() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = built("trap");
    let expected = exchange_file(
        dir.path(),
        r#"exchanges:
  - name: trap, fail-closed
    request:
      headers: { ":method": GET, ":path": /, ":authority": a }
    expect:
      failures: { trap: trap }
      immediate_response: { status: 500 }
"#,
    );
    let output = test(&["--plugin", plugin.to_str().unwrap(), &expected]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stdout));

    let unexpected = exchange_file(
        dir.path(),
        r#"exchanges:
  - name: trap unnoticed
    request:
      headers: { ":method": GET, ":path": /, ":authority": a }
    expect:
      request_headers: { set: {} }
"#,
    );
    let output = test(&["--plugin", plugin.to_str().unwrap(), &unexpected]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("✗ failures"), "{stdout}");
    assert!(stdout.contains("actual  : trap: trap"), "{stdout}");
    assert!(stdout.contains("✗ immediate_response"), "{stdout}");
}

/// The file's mistakes are named with the file, the line and the field, and nothing runs.
#[test]
fn exchange_file_errors_name_the_file_the_line_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = built("asm_demo");
    let cases = [
        (
            "exchanges:\n  - name: typo\n    request:\n      headers: {}\n      bdy: x\n",
            "line 5, column 7: exchanges[0].request: unknown field `bdy`",
        ),
        (
            "envoy:\n  processing_mode:\n    request_body_mode: SOMETIMES\nexchanges: []\n",
            "line 3, column 24: envoy.processing_mode.request_body_mode: unknown variant `SOMETIMES`",
        ),
        ("exchanges: []\n", "exchanges: the file has none"),
        (
            "exchanges:\n  - name: two bodies\n    request:\n      headers: {}\n      body: a\n      body_base64: YQ==\n",
            "exchanges[0] (\"two bodies\").request: give one of body, body_base64 and body_file",
        ),
        (
            "exchanges:\n  - name: lost\n    request:\n      headers: {}\n      body_file: nowhere.json\n",
            "exchanges[0] (\"lost\").request: body_file ",
        ),
    ];
    for (yaml, expected) in cases {
        let file = exchange_file(dir.path(), yaml);
        let output = test(&["--plugin", plugin.to_str().unwrap(), &file]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{yaml}\n{stderr}");
        assert!(
            stderr.starts_with(&format!("wasm-extproc: {file}: {expected}")),
            "{yaml}\n{stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "nothing ran: {}",
            text(&output.stdout)
        );
    }
}

fn new(name: &str, lang: &str, dir: &Path) -> PathBuf {
    let output = Command::new(env!("CARGO_BIN_EXE_wasm-extproc"))
        .args(["new", name, "--lang", lang, "--dir"])
        .arg(dir)
        .args(["--sdk", repo("plugins/sdk").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    dir.join(name)
}

/// From `wasm-extproc new` to a passing `wasm-extproc test`, in each language, with the
/// toolchains `cargo xtask build-plugins` installs: a test per language, so that the runner
/// builds them side by side.
#[test]
fn the_rust_template_builds_and_passes_its_own_exchange_file() {
    template_builds_and_passes_its_own_exchange_file("rust");
}

#[test]
fn the_javascript_template_builds_and_passes_its_own_exchange_file() {
    template_builds_and_passes_its_own_exchange_file("javascript");
}

#[test]
fn the_python_template_builds_and_passes_its_own_exchange_file() {
    template_builds_and_passes_its_own_exchange_file("python");
}

#[test]
fn the_c_template_builds_and_passes_its_own_exchange_file() {
    template_builds_and_passes_its_own_exchange_file("c");
}

fn template_builds_and_passes_its_own_exchange_file(lang: &str) {
    let dir = tempfile::tempdir().unwrap();
    let target = support::target_dir();
    let tools = target.join("tools");
    let name = format!("my-{lang}-plugin");
    let project = new(&name, lang, dir.path());
    // The Rust template resolves its dependencies as the bundled plugins do (a fresh
    // resolution would take whatever was published since), and shares their build: the
    // same profile, target and versions, compiled once.
    if lang == "rust" {
        std::fs::copy(repo("plugins/Cargo.lock"), project.join("Cargo.lock")).unwrap();
    }
    let built = Command::new("bash")
        .arg(project.join("build.sh"))
        .env("CARGO_TARGET_DIR", &target)
        .env(
            "COMPONENTIZE_JS",
            tools.join("jco/node_modules/.bin/componentize-js"),
        )
        .env("COMPONENTIZE_PY", tools.join("py/bin/componentize-py"))
        .env("WIT_BINDGEN", tools.join("cargo/bin/wit-bindgen"))
        .env("JCO", tools.join("jco/node_modules/.bin/jco"))
        .output()
        .unwrap();
    assert_eq!(
        built.status.code(),
        Some(0),
        "{lang}: {}{}",
        text(&built.stdout),
        text(&built.stderr)
    );
    let plugin = project.join(format!("{name}.wasm"));
    let exchanges = project.join("exchanges.yaml");
    let output = test(&[
        "--plugin",
        plugin.to_str().unwrap(),
        exchanges.to_str().unwrap(),
    ]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{lang}: {stdout}");
    assert!(
        stdout.contains("2 exchange(s), 2 passed, 0 failed"),
        "{stdout}"
    );
}

/// With no cache directory configured, `test` keeps compiled plugins in the user's cache: a
/// plugin is compiled at the first run and read back at the next, which adds nothing to the
/// cache. Where the cache lives does not depend on the plugin's language: the bundled Rust
/// plugin compiles in milliseconds, where a JavaScript one would spend some 15 s of CPU here
/// (`languages::compiled_plugins_are_cached_across_restarts` shows a JavaScript plugin kept
/// across a restart).
#[test]
fn test_keeps_compiled_plugins_in_the_users_cache_by_default() {
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join(".cache/wasm-extproc");
    let entries = |dir: &Path| -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    found.push(path);
                }
            }
        }
        found.sort();
        found
    };
    let run = || {
        let output = Command::new(env!("CARGO_BIN_EXE_wasm-extproc"))
            .arg("test")
            .arg("--plugin")
            .arg(built("asm_demo"))
            .arg(repo("plugins/asm-demo/exchanges.yaml"))
            .env("RUST_LOG", "off")
            .env("HOME", home.path())
            .env_remove("XDG_CACHE_HOME")
            .env_remove("WASM_EXTPROC_CACHE_DIR")
            .env_remove("WASM_EXTPROC_CONFIG")
            .output()
            .expect("binary runs");
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    };
    run();
    let first = entries(&cache);
    assert!(!first.is_empty(), "nothing cached in {}", cache.display());
    run();
    assert_eq!(entries(&cache), first, "the second run compiled again");
}

/// A template's build script names a tool it cannot find, and how to get it, before it runs
/// anything.
#[test]
fn a_template_build_names_the_tool_it_cannot_find() {
    let dir = tempfile::tempdir().unwrap();
    for (lang, variable, advice) in [
        (
            "python",
            "COMPONENTIZE_PY",
            "pip install componentize-py==0.25.1",
        ),
        (
            "javascript",
            "COMPONENTIZE_JS",
            "npm install @bytecodealliance/componentize-js@0.23.0",
        ),
        ("c", "WIT_BINDGEN", "cargo install wit-bindgen-cli@0.61.1"),
    ] {
        let project = new(&format!("missing-{lang}"), lang, dir.path());
        let built = Command::new("bash")
            .arg(project.join("build.sh"))
            .env(variable, "/nowhere/tool")
            .output()
            .unwrap();
        let stderr = text(&built.stderr);
        assert_eq!(built.status.code(), Some(127), "{lang}: {stderr}");
        assert!(
            stderr.starts_with("build.sh: /nowhere/tool not found: ") && stderr.contains(advice),
            "{lang}: {stderr}"
        );
    }
}

/// What a plugin logs while an exchange plays shows in that exchange's report, and not on
/// the log's stream: here the JavaScript fixture's `console.log`, then its uncaught
/// exception.
#[test]
fn plugin_log_lines_show_under_their_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let file = exchange_file(
        dir.path(),
        r#"exchanges:
  - name: throws
    request:
      headers: { ":method": GET, ":path": /, ":authority": a }
"#,
    );
    let output = test(&[
        "--plugin",
        built("throw_js").to_str().unwrap(),
        "--plugin-config",
        "throw",
        &file,
    ]);
    let stdout = text(&output.stdout);
    let report = stdout
        .split_once(": throws  (chain default)")
        .map(|(_, report)| report)
        .unwrap_or_else(|| panic!("{stdout}"));
    let log = report
        .split_once("     plugin log:\n")
        .map(|(_, log)| log)
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        log.contains("INFO throw_js request_headers (stdout): throw fixture: request headers seen"),
        "{stdout}"
    );
    assert!(log.contains("boom from the throw fixture"), "{stdout}");
    assert!(
        !text(&output.stderr).contains("request headers seen"),
        "{}",
        text(&output.stderr)
    );
}

/// A removal of a header the message did not carry is still what came out (Envoy is asked to
/// remove it, in case it holds one it did not forward), and the report says so.
#[test]
fn a_removal_of_a_header_the_message_lacked_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let file = exchange_file(
        dir.path(),
        r#"exchanges:
  - name: no subject sent
    request:
      headers: { ":method": GET, ":path": /, ":authority": a, authorization: Bearer junk }
    expect:
      request_headers:
        remove: [x-auth-subject]
"#,
    );
    let output = test_with(
        &[
            "--plugin",
            built("token_introspect").to_str().unwrap(),
            "--plugin-config",
            "endpoint=http://127.0.0.1:9/introspect;on_error=allow",
            &file,
        ],
        "[plugins.token_introspect]\nhttp_allow = [\"http://127.0.0.1:9\"]\n",
    );
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "     removed from the request without being in it: x-auth-subject (Envoy is still \
             asked to remove them, in case it holds them without forwarding them)\n"
        ),
        "{stdout}"
    );
}
