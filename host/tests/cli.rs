//! Start-up failures as an operator sees them: one line naming what is wrong, and an exit
//! code a supervisor can act on.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::built;

fn host(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasm-extproc"))
        .args(["--admin-listen", "off"])
        .args(args)
        .env("RUST_LOG", "off")
        .env_remove("WASM_EXTPROC_CONFIG")
        .output()
        .expect("binary runs")
}

fn one_line(output: &Output) -> String {
    let stderr = String::from_utf8(output.stderr.clone()).unwrap();
    assert_eq!(stderr.lines().count(), 1, "exactly one line: {stderr:?}");
    stderr.trim_end().to_string()
}

fn write(dir: &Path, name: &str, contents: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

#[test]
fn invalid_configuration_exits_64_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "host.toml",
        b"listen = \"127.0.0.1:0\"\n[defaults]\ntimeout = 5\n",
    );
    let output = host(&["--config", &config]);
    assert_eq!(output.status.code(), Some(64));
    assert_eq!(
        one_line(&output),
        format!(
            "wasm-extproc: config file {config} (line 3): unknown field `timeout`, expected one of `config`, `failure_policy`, `failure_status`, `timeout_ms`, `memory_limit_mib`, `breaker_threshold`, `breaker_min_clients`, `breaker_window_ms`, `breaker_backoff_ms`, `isolation`, `log_lines_per_second`, `mode`, `shadows`, `kv_namespaces`, `http_allow`, `http_max_concurrent`, `http_max_response_bytes`, `secrets`"
        )
    );
}

#[test]
fn a_broken_plugin_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = write(dir.path(), "10-broken.wasm", b"this is not wasm");
    let output = host(&[
        "--plugins-dir",
        &dir.path().display().to_string(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let line = one_line(&output);
    assert!(
        line.starts_with(&format!(
            "wasm-extproc: {plugin}: not a valid WebAssembly component: "
        )),
        "{line}"
    );
}

#[test]
fn a_missing_plugins_directory_stops_start_up_naming_it() {
    let output = host(&[
        "--plugins-dir",
        "/no/such/plugins",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        one_line(&output),
        "wasm-extproc: plugins directory /no/such/plugins: No such file or directory (os error 2)"
    );
}

#[test]
fn an_instance_pool_the_kernel_could_not_hold_is_named_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "host.toml",
        b"listen = \"127.0.0.1:0\"\n[runtime]\nmax_instances = 1000000\n",
    );
    let output = host(&["--config", &config, "--plugins-dir", "/no/such/plugins"]);
    assert_eq!(output.status.code(), Some(1));
    let line = one_line(&output);
    assert!(
        line.starts_with(
            "wasm-extproc: [runtime] max_instances = 1000000 and max_wasi_instances = 2000 need \
             about 4007000 memory mappings when the pool is full, but the kernel allows "
        ) && line
            .ends_with("(vm.max_map_count): lower them, or raise vm.max_map_count on the node"),
        "{line}"
    );
}

#[test]
fn an_unknown_flag_is_a_usage_error() {
    let output = host(&["--plugin-dir", "/x"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn check_validates_every_plugin_without_serving() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built("asm_demo"), dir.path().join("10-asm.wasm")).unwrap();
    std::fs::copy(built("bearer_auth"), dir.path().join("20-auth.wasm")).unwrap();
    std::fs::copy(built("json_redact"), dir.path().join("25-redact.wasm")).unwrap();
    let plugins = dir.path().display().to_string();
    let output = host(&["check", "--plugins-dir", &plugins]);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("ok  10-asm  "), "{stderr}");
    assert!(stderr.contains("ok  20-auth  "), "{stderr}");
    assert!(stderr.contains("3 plugin(s)"), "{stderr}");
    // What each plugin needs from Envoy's ext_proc filter.
    let needs = |name: &str| {
        stderr
            .lines()
            .find(|l| l.starts_with(&format!("ok  {name}  ")))
            .and_then(|l| l.split_once("needs from Envoy's processing_mode: "))
            .map(|(_, needs)| needs.to_string())
            .unwrap_or_else(|| panic!("{stderr}"))
    };
    assert_eq!(needs("10-asm"), "its defaults (headers sent)");
    assert_eq!(
        needs("25-redact"),
        "request_body_mode: BUFFERED, or FULL_DUPLEX_STREAMED with trailers SEND; \
         response_body_mode: BUFFERED, or FULL_DUPLEX_STREAMED with trailers SEND"
    );

    std::fs::copy(built("wrong_contract"), dir.path().join("30-old.wasm")).unwrap();
    let output = host(&["check", "--plugins-dir", &plugins]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        one_line(&output).contains("30-old.wasm: built against wasm-extproc:processor@0.0.9"),
        "{}",
        one_line(&output)
    );
}

/// `check` says which plugins are shadows, and beside which plugin each runs.
#[test]
fn check_names_each_shadow_and_the_plugin_it_runs_beside() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(built("asm_demo"), plugins.join("10-asm.wasm")).unwrap();
    std::fs::copy(built("asm_demo"), plugins.join("20-candidate.wasm")).unwrap();
    let config = write(
        dir.path(),
        "host.toml",
        format!(
            "listen = \"127.0.0.1:0\"\nplugins_dir = {:?}\n\
             [plugins.20-candidate]\nmode = \"shadow\"\nshadows = \"10-asm\"\n",
            plugins.display().to_string()
        )
        .as_bytes(),
    );
    let output = host(&["check", "--config", &config]);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("ok  10-asm  "), "{stderr}");
    assert!(
        stderr.contains("ok  20-candidate (shadow of 10-asm: compared, never applied)  "),
        "{stderr}"
    );
}

/// With `require_signatures`, only plugins signed by a trusted key load: `check` says who
/// signed each, and an unsigned or altered plugin stops start-up (exit 1) naming the file.
#[test]
fn only_plugins_signed_by_a_trusted_key_load_when_signatures_are_required() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let (secret, public) = (dir.path().join("team.key"), dir.path().join("team.pub"));
    let run = |args: &[&str]| {
        let output = host(args);
        let stderr = String::from_utf8(output.stderr.clone()).unwrap();
        (output.status.code(), stderr)
    };
    let (code, stderr) = run(&[
        "keygen",
        "--secret-key",
        &secret.display().to_string(),
        "--public-key",
        &public.display().to_string(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let asm = plugins.join("10-asm.wasm");
    std::fs::copy(built("asm_demo"), &asm).unwrap();
    let auth = plugins.join("20-auth.wasm");
    std::fs::copy(built("bearer_auth"), &auth).unwrap();
    // One embedded, one detached (auth.wasm.sig beside it).
    for (plugin, detached) in [(&asm, false), (&auth, true)] {
        let mut args = vec!["sign", "--secret-key"];
        let secret = secret.display().to_string();
        let plugin = plugin.display().to_string();
        args.push(&secret);
        if detached {
            args.push("--detached");
        }
        args.push(&plugin);
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(0), "{stderr}");
    }
    let config = write(
        dir.path(),
        "host.toml",
        format!(
            "listen = \"127.0.0.1:0\"\nplugins_dir = {:?}\n\
             [signing]\nrequire_signatures = true\ntrusted_keys = [{:?}]\n",
            plugins.display().to_string(),
            public.display().to_string()
        )
        .as_bytes(),
    );
    let (code, stderr) = run(&["check", "--config", &config]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr.matches("signed by team.pub").count(), 2, "{stderr}");
    let (code, stderr) = run(&[
        "verify",
        "--public-key",
        &public.display().to_string(),
        &asm.display().to_string(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");

    // Unsigned: refused at start-up, by name and reason.
    std::fs::copy(built("json_redact"), plugins.join("30-redact.wasm")).unwrap();
    let output = host(&["--config", &config]);
    assert_eq!(output.status.code(), Some(1));
    let line = one_line(&output);
    assert!(
        line.contains("30-redact.wasm: not signed (no signature section, no 30-redact.wasm.sig)"),
        "{line}"
    );
    std::fs::remove_file(plugins.join("30-redact.wasm")).unwrap();

    // Altered after signing: its last byte changed.
    let mut bytes = std::fs::read(&asm).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    std::fs::write(&asm, bytes).unwrap();
    let output = host(&["check", "--config", &config]);
    assert_eq!(output.status.code(), Some(1));
    let line = one_line(&output);
    assert!(
        line.contains(
            "10-asm.wasm: signed by none of the trusted keys, or changed after it was signed"
        ),
        "{line}"
    );
}

#[test]
fn logs_can_be_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built("asm_demo"), dir.path().join("asm.wasm")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wasm-extproc"))
        .args(["check", "--log-format", "json", "--plugins-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let logged: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("each log line is a JSON object"))
        .collect();
    let compiled = logged
        .iter()
        .find(|l| l["message"] == "compiled plugin")
        .expect("a compiled-plugin event");
    assert_eq!(compiled["plugin"], "asm");
    assert_eq!(compiled["level"], "INFO");
}

/// Starts the host serving `plugins` with `extra` arguments, logging at info to a pipe, and
/// waits until it listens.
fn serving(plugins: &Path, extra: &[&str]) -> std::process::Child {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_wasm-extproc"))
        .args(["--admin-listen", "off", "--listen", &listen])
        .args(extra)
        .arg("--plugins-dir")
        .arg(plugins)
        .env("RUST_LOG", "info")
        .env_remove("WASM_EXTPROC_CONFIG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the host never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

fn send_signal(child: &std::process::Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built("asm_demo"), dir.path().join("asm.wasm")).unwrap();
    let child = serving(dir.path(), &[]);
    send_signal(&child, "TERM");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SIGTERM; shutting down"), "{stderr}");
}

#[test]
fn sighup_reloads_the_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(built("asm_demo"), plugins.join("10-asm.wasm")).unwrap();
    // No watching: only the signal can make it reload.
    let config = write(dir.path(), "host.toml", b"watch = false\n");
    let mut child = serving(&plugins, &["--config", &config]);
    let mut wait_for = log_lines(&mut child);
    let loaded = wait_for("plugin chain loaded");
    // A pipe gets plain text: no colour codes for a log pipeline to carry.
    assert!(!loaded.contains('\x1b'), "{loaded:?}");
    assert!(loaded.contains("generation=1"), "{loaded}");
    std::fs::copy(built("tagger"), plugins.join("20-tag.wasm")).unwrap();
    send_signal(&child, "HUP");
    wait_for("SIGHUP; reloading");
    let loaded = wait_for("plugin chain loaded");
    assert!(
        loaded.contains("generation=2") && loaded.contains("plugins=2"),
        "{loaded}"
    );
    send_signal(&child, "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Reads `child`'s log up to the next line containing the text asked for, and returns it.
fn log_lines(child: &mut std::process::Child) -> impl FnMut(&str) -> String + use<> {
    let mut log = std::io::BufReader::new(child.stderr.take().unwrap());
    move |text: &str| {
        let mut line = String::new();
        loop {
            line.clear();
            let read = std::io::BufRead::read_line(&mut log, &mut line).unwrap();
            assert!(read > 0, "the log ended before {text:?}");
            if line.contains(text) {
                return line;
            }
        }
    }
}

#[test]
fn a_sighup_during_start_up_reloads_once_the_plugins_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built("asm_demo"), dir.path().join("10-asm.wasm")).unwrap();
    let config = write(dir.path(), "host.toml", b"watch = false\n");
    // Listening, the plugins perhaps still compiling: SIGHUP's default would end the process.
    let mut child = serving(dir.path(), &["--config", &config]);
    send_signal(&child, "HUP");
    let mut wait_for = log_lines(&mut child);
    assert!(wait_for("plugin chain loaded").contains("generation=1"));
    wait_for("SIGHUP; reloading");
    assert!(wait_for("plugin chain loaded").contains("generation=2"));
    send_signal(&child, "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn budgets_adding_up_past_envoys_message_timeout_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    for name in ["10-a", "20-b"] {
        std::fs::copy(built("asm_demo"), plugins.join(format!("{name}.wasm"))).unwrap();
    }
    let plugins = plugins.display().to_string();
    // Two header plugins of 100 ms each, and one wait for a full pool, against Envoy's
    // default 200 ms message_timeout.
    let tight = write(dir.path(), "tight.toml", b"[defaults]\ntimeout_ms = 100\n");
    let output = host(&["check", "--config", &tight, "--plugins-dir", &plugins]);
    assert_eq!(output.status.code(), Some(1));
    let line = one_line(&output);
    assert!(
        line.contains("the budgets of the plugins handling request_headers add up to")
            && line.contains("10-a (100 ms), 20-b (100 ms)")
            && line.contains("but Envoy waits 200 ms for an answer"),
        "{line}"
    );
    // The same plugins fit when Envoy may be asked for more (max_message_timeout).
    let room = write(
        dir.path(),
        "room.toml",
        b"[defaults]\ntimeout_ms = 100\n[envoy]\nmax_message_timeout_ms = 500\n",
    );
    let output = host(&["check", "--config", &room, "--plugins-dir", &plugins]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_file_that_is_not_a_component_gets_what_it_is_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().display().to_string();
    // (file contents, what the line must say)
    let cases: [(&[u8], &str); 3] = [
        (
            b"#!/bin/sh\necho not a plugin\n",
            "not WebAssembly: it starts with \"#!/bin/sh\\x0aecho n\"",
        ),
        // The smallest core module: what `cargo build --target wasm32-unknown-unknown` gives
        // without the component linker.
        (
            b"\0asm\x01\0\0\0",
            "a core WebAssembly module, not a component: build it for `wasm32-wasip2`",
        ),
        (b"\0asm", "4 bytes, too short for WebAssembly"),
    ];
    for (contents, expected) in cases {
        write(dir.path(), "10-plugin.wasm", contents);
        let output = host(&["check", "--plugins-dir", &plugins]);
        assert_eq!(output.status.code(), Some(1));
        let line = one_line(&output);
        assert!(
            line.contains("10-plugin.wasm: not a valid WebAssembly component: ")
                && line.contains(expected)
                && line.contains("plugins/README.md"),
            "{line}"
        );
    }
}

#[test]
fn the_readme_usage_line_names_every_flag() {
    let help = Command::new(env!("CARGO_BIN_EXE_wasm-extproc"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let usage = readme
        .split("## Running the host")
        .nth(1)
        .and_then(|section| section.split("```").nth(1))
        .expect("a usage block under \"Running the host\"");
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|word| word.starts_with("--"))
        .map(|word| word.trim_end_matches(','))
        .filter(|flag| !["--help", "--version"].contains(flag))
        .collect();
    assert!(flags.len() >= 6, "{help}");
    for flag in flags {
        assert!(usage.contains(flag), "the README's usage line lacks {flag}");
    }
}

/// Each subcommand's `--help` sets the server's own flags apart, under a heading that says
/// they do nothing there.
#[test]
fn subcommands_help_sets_the_servers_own_flags_apart() {
    for command in ["check", "test", "new", "dev"] {
        let output = Command::new(env!("CARGO_BIN_EXE_wasm-extproc"))
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8(output.stdout).unwrap();
        let (own, serving) = help
            .split_once("Serving (without a subcommand; the others ignore these):")
            .unwrap_or_else(|| panic!("{command}:\n{help}"));
        for flag in ["--listen", "--admin-listen", "--admin-token-file"] {
            assert!(
                !own.contains(flag),
                "{command}: {flag} among its own:\n{help}"
            );
            assert!(serving.contains(flag), "{command}: {flag}:\n{help}");
        }
    }
}
