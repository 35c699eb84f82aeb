//! `wasm-extproc dev`: a plugin through a real Envoy on this machine in one command, as a
//! plugin author starts it.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use extproc_testkit::envoy::{self, request};
use extproc_testkit::fixtures::{ASM_DEMO, ASM_V2};
use extproc_testkit::process::{KillOnDrop, Profile, binary};

/// `dev` on a plugin file: the curl it prints goes through Envoy, the plugin and the echo
/// upstream; the file rebuilt in place is reloaded; Ctrl-C stops Envoy with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_a_plugin_through_envoy_and_reloads_it_when_rebuilt() {
    let project = tempfile::tempdir().unwrap();
    let plugin = project.path().join("my-plugin.wasm");
    std::fs::copy(ASM_DEMO.path(), &plugin).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut dev = KillOnDrop(
        Command::new(binary(Profile::Test).unwrap())
            .args(["dev", "--port", &port.to_string(), "--envoy"])
            .arg(envoy::binary())
            .arg(&plugin)
            .env("RUST_LOG", "warn")
            .env_remove("WASM_EXTPROC_CONFIG")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // It says what to try once Envoy listens.
    let mut lines = BufReader::new(dev.0.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("dev exited before printing its curl")
            .unwrap();
        if let Some(url) = line.strip_prefix("dev: try  curl -i ") {
            break url.to_string();
        }
    };
    assert_eq!(url, format!("http://127.0.0.1:{port}/anything"));
    let listener: SocketAddr = ([127, 0, 0, 1], port).into();
    let tags = |response: &envoy::HttpResponse| {
        let echoed = response.json().unwrap();
        (
            response.header_values("x-ext-proc-header").join(","),
            echoed["headers"]["x-ext-proc-header"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let response = request(listener, "GET", "/anything", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        tags(&response),
        ("hello-from-asm".into(), "hello-to-asm".into())
    );

    // Rebuilt in place: the next requests see the new version.
    std::fs::copy(ASM_V2.path(), &plugin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = request(listener, "GET", "/anything", &[], Vec::new())
            .await
            .unwrap();
        if tags(&response) == ("hello-from-asm-v2".into(), "hello-to-asm-v2".into()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reloaded: {:?}",
            tags(&response)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Ctrl-C stops it, and Envoy with it.
    let pid = dev.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while dev.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "dev did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(listener).is_ok() {
        assert!(
            Instant::now() < deadline,
            "Envoy still listens after dev stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
