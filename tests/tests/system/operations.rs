//! Running it like infrastructure: hot reload of the plugin volume and the configuration,
//! gRPC health and the admin endpoints, exact metrics, TLS and mutual TLS, Unix sockets.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{Envoy, EnvoyConfig, request};
use extproc_testkit::fixtures::{ASM_DEMO, ASM_V2, TAGGER};
use extproc_testkit::grpc::{self, ExtProcStream};
use extproc_testkit::host::RunningHost;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::phases::sets;

/// How long a test waits for the host to notice a file change and reload.
const RELOAD_WAIT: Duration = Duration::from_secs(15);

/// Waits until the host has completed `count` successful loads (start-up included).
async fn wait_for_loads(host: &RunningHost, count: u64) {
    let metrics = host.metrics();
    tokio::time::timeout(RELOAD_WAIT, async {
        while metrics.reloads("ok") < count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no reload #{count} within {RELOAD_WAIT:?}"));
}

/// Replaces `path` atomically with `bytes`, as deployment tools do: write beside, rename over.
pub(super) fn replace_file(path: &Path, bytes: &[u8]) {
    let temporary = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// The value the ASM-like plugin in the chain sets on request headers, over gRPC.
async fn request_tag(host: &RunningHost) -> String {
    let mut stream = ExtProcStream::connect(host.address).await;
    let answer = stream
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;
    let Some(Response::RequestHeaders(headers)) = answer.response else {
        panic!("headers answer expected");
    };
    sets(&headers.response.unwrap().header_mutation)[0]
        .1
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_a_plugin_under_load_loses_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("asm.wasm");
    std::fs::write(&plugin, ASM_DEMO.bytes()).unwrap();
    let host = RunningHost::start_in(dir.path(), "").await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();

    let swapped = Arc::new(AtomicBool::new(false));
    let clients = (0..8).map(|_| {
        let (envoy, swapped) = (&envoy, swapped.clone());
        async move {
            let mut seen = Vec::new();
            // Keep going until well after the swap, so both versions serve.
            let mut after_swap = 0;
            while after_swap < 40 {
                let response = envoy.get("/headers").await.unwrap();
                assert_eq!(
                    response.status,
                    200,
                    "{}",
                    String::from_utf8_lossy(&response.body)
                );
                let tag = response.header_values("x-ext-proc-header").join(",");
                let echoed = response.json().unwrap()["headers"]["X-Ext-Proc-Header"].clone();
                seen.push((tag, echoed.as_str().unwrap_or_default().to_string()));
                if swapped.load(Ordering::SeqCst) {
                    after_swap += 1;
                }
            }
            seen
        }
    });
    let swap = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        replace_file(&plugin, &ASM_V2.bytes());
        wait_for_loads(&host, 2).await;
        swapped.store(true, Ordering::SeqCst);
    };
    let (results, ()) = tokio::join!(futures::future::join_all(clients), swap);

    let all: Vec<(String, String)> = results.into_iter().flatten().collect();
    let (mut old, mut new) = (0, 0);
    for (response_tag, request_tag) in &all {
        match (response_tag.as_str(), request_tag.as_str()) {
            ("hello-from-asm", "hello-to-asm") => old += 1,
            ("hello-from-asm-v2", "hello-to-asm-v2") => new += 1,
            // A stream that started before the swap finishes on the old version; a request
            // whose stream started after it is tagged by the new one both ways.
            other => panic!("a request carried {other:?}"),
        }
    }
    assert!(old > 0 && new > 0, "old {old}, new {new}");
    assert_eq!(old + new, all.len());
    assert_eq!(host.metrics().reloads("error"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_data_swap_reloads_the_plugins() {
    // What the kubelet does: real files in a timestamped directory, `..data` pointing at it,
    // and each visible file a symlink through `..data`. An update writes a new directory and
    // swaps `..data` in one rename.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_11_26_10_00_00.1")).unwrap();
    std::fs::write(
        root.join("..2026_11_26_10_00_00.1/asm.wasm"),
        ASM_DEMO.bytes(),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_11_26_10_00_00.1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/asm.wasm", root.join("asm.wasm")).unwrap();
    let host = RunningHost::start_in(root, "").await;
    assert_eq!(request_tag(&host).await, "hello-to-asm");

    std::fs::create_dir(root.join("..2026_11_26_10_05_00.2")).unwrap();
    std::fs::write(
        root.join("..2026_11_26_10_05_00.2/asm.wasm"),
        ASM_V2.bytes(),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_11_26_10_05_00.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_11_26_10_00_00.1")).unwrap();

    wait_for_loads(&host, 2).await;
    assert_eq!(request_tag(&host).await, "hello-to-asm-v2");
}

/// With an admin token configured, `POST /reload` answers only a client presenting it: without
/// it (or with another) 401, counted, and nothing reloads.
#[tokio::test]
async fn a_reload_without_the_admin_token_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("asm.wasm"), ASM_DEMO.bytes()).unwrap();
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "s3cret\n").unwrap();
    let host = RunningHost::start_in(
        dir.path(),
        &format!("admin_token_file = {:?}\nwatch = false\n", token.path()),
    )
    .await;
    std::fs::write(dir.path().join("asm.wasm"), ASM_V2.bytes()).unwrap();
    let loads = host.metrics().reloads("ok");

    for (headers, reason) in [
        (vec![], "missing_token"),
        (vec![("authorization", "Bearer guess")], "wrong_token"),
    ] {
        let response = request(host.admin, "POST", "/reload", &headers, Vec::new())
            .await
            .unwrap();
        assert_eq!(response.status, 401, "{reason}");
        assert_eq!(
            response.header_values("www-authenticate"),
            ["Bearer realm=\"wasm-extproc admin\""]
        );
        assert_eq!(host.metrics().refusals("admin", reason), 1);
    }
    assert_eq!(host.metrics().reloads("ok"), loads);
    assert_eq!(request_tag(&host).await, "hello-to-asm");
    // Reading stays open to the scrape path.
    let response = request(host.admin, "GET", "/plugins", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    let response = request(
        host.admin,
        "POST",
        "/reload",
        &[("authorization", "Bearer s3cret")],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(request_tag(&host).await, "hello-to-asm-v2");
}

/// With `require_signatures`, a reload that brings an unsigned (or altered) plugin is rejected
/// by name and reason, and the signed chain keeps serving.
#[tokio::test]
async fn a_reload_bringing_an_unsigned_plugin_is_rejected_and_the_signed_chain_serves() {
    let keys = tempfile::tempdir().unwrap();
    let pair = wasmsign2::KeyPair::generate();
    let public = keys.path().join("team.pub");
    pair.pk.to_file(&public).unwrap();
    let sign = |bytes: Vec<u8>| {
        let module = wasmsign2::Module::deserialize(&mut std::io::Cursor::new(bytes)).unwrap();
        let mut signed = Vec::new();
        pair.sk
            .sign(module, None)
            .unwrap()
            .serialize(&mut signed)
            .unwrap();
        signed
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("asm.wasm"), sign(ASM_DEMO.bytes())).unwrap();
    let host = RunningHost::start_in(
        dir.path(),
        &format!(
            "watch = false\n[signing]\nrequire_signatures = true\ntrusted_keys = [{:?}]\n",
            public.display().to_string()
        ),
    )
    .await;
    assert_eq!(request_tag(&host).await, "hello-to-asm");

    for (bytes, reason) in [
        (ASM_V2.bytes(), "not signed"),
        (
            {
                let mut altered = sign(ASM_V2.bytes());
                *altered.last_mut().unwrap() ^= 0xff;
                altered
            },
            "changed after it was signed",
        ),
    ] {
        replace_file(&dir.path().join("asm.wasm"), &bytes);
        let response = request(host.admin, "POST", "/reload", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(response.status, 500, "{reason}");
        let error = response.json().unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            error.contains("asm.wasm: ") && error.contains(reason),
            "{error}"
        );
        assert_eq!(request_tag(&host).await, "hello-to-asm", "{reason}");
    }

    replace_file(&dir.path().join("asm.wasm"), &sign(ASM_V2.bytes()));
    host.load().await.unwrap();
    assert_eq!(request_tag(&host).await, "hello-to-asm-v2");
}

#[tokio::test]
async fn a_broken_file_is_rejected_and_the_previous_chain_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("10-asm.wasm"), ASM_DEMO.bytes()).unwrap();
    let host = RunningHost::start_in(dir.path(), "watch = false\n").await;

    // Half-written, or simply wrong: the whole reload is refused, by file name.
    std::fs::write(dir.path().join("20-new.wasm"), &ASM_V2.bytes()[..1000]).unwrap();
    let response = request(host.admin, "POST", "/reload", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(response.status, 500);
    let error = response.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("20-new.wasm: not a valid WebAssembly component"),
        "{error}"
    );
    assert_eq!(host.metrics().reloads("error"), 1);
    assert_eq!(request_tag(&host).await, "hello-to-asm");

    // Completed: the next reload takes it, and compiles only what is new.
    std::fs::write(dir.path().join("20-new.wasm"), ASM_V2.bytes()).unwrap();
    let response = request(host.admin, "POST", "/reload", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let summary = response.json().unwrap();
    assert_eq!(
        (summary["generation"].as_u64(), summary["compiled"].as_u64()),
        (Some(2), Some(1))
    );

    // Removed: gone from the chain.
    std::fs::remove_file(dir.path().join("10-asm.wasm")).unwrap();
    host.load().await.unwrap();
    assert_eq!(request_tag(&host).await, "hello-to-asm-v2");
}

/// A file written in pieces, 50 ms apart (well within 250 ms), is loaded once, whole: the watcher
/// waits for the directory to go quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_reloads_once_after_the_quiet_period() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("asm.wasm"), ASM_DEMO.bytes()).unwrap();
    let host = RunningHost::start_in(dir.path(), "").await;
    // Served, so watching: the host watches from the moment it serves.
    assert_eq!(request_tag(&host).await, "hello-to-asm");
    let bytes = ASM_V2.bytes();
    let mut file = std::fs::File::create(dir.path().join("asm.wasm")).unwrap();
    let started = std::time::Instant::now();
    for piece in bytes.chunks(bytes.len().div_ceil(4)) {
        std::io::Write::write_all(&mut file, piece).unwrap();
        file.sync_all().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(file);
    wait_for_loads(&host, 2).await;
    assert!(started.elapsed() >= Duration::from_millis(4 * 50 + 250));
    assert_eq!(request_tag(&host).await, "hello-to-asm-v2");
    // Nothing half-written was ever loaded, and nothing more is.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let metrics = host.metrics();
    assert_eq!((metrics.reloads("ok"), metrics.reloads("error")), (2, 0));
}

/// A file caught half-written (the writer paused longer than the quiet period) is rejected and
/// the previous chain keeps serving; the write that completes it brings the reload that takes
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_file_is_rejected_then_taken_when_complete() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("asm.wasm"), ASM_DEMO.bytes()).unwrap();
    let host = RunningHost::start_in(dir.path(), "").await;
    // Served, so watching: the host watches from the moment it serves.
    assert_eq!(request_tag(&host).await, "hello-to-asm");
    let bytes = ASM_V2.bytes();
    let (first, rest) = bytes.split_at(bytes.len() / 2);
    let mut file = std::fs::File::create(dir.path().join("asm.wasm")).unwrap();
    std::io::Write::write_all(&mut file, first).unwrap();
    file.sync_all().unwrap();
    let metrics = host.metrics();
    tokio::time::timeout(RELOAD_WAIT, async {
        while metrics.reloads("error") == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the half-written file is tried, and rejected");
    assert_eq!(request_tag(&host).await, "hello-to-asm");
    std::io::Write::write_all(&mut file, rest).unwrap();
    drop(file);
    wait_for_loads(&host, 2).await;
    assert_eq!(request_tag(&host).await, "hello-to-asm-v2");
}

#[tokio::test]
async fn streams_in_flight_finish_on_the_version_they_started_with() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("asm.wasm"), ASM_DEMO.bytes()).unwrap();
    let host = RunningHost::start_in(dir.path(), "watch = false\n").await;
    let mut before = ExtProcStream::connect(host.address).await;
    before
        .exchange(grpc::request_headers(&[(":path", "/")], true))
        .await;

    std::fs::write(dir.path().join("asm.wasm"), ASM_V2.bytes()).unwrap();
    host.load().await.unwrap();

    let answer = before
        .exchange(grpc::response_headers(&[(":status", "200")], true))
        .await;
    let Some(Response::ResponseHeaders(headers)) = answer.response else {
        panic!("headers answer expected");
    };
    assert_eq!(
        sets(&headers.response.unwrap().header_mutation)[0].1,
        "hello-from-asm"
    );
    assert_eq!(request_tag(&host).await, "hello-to-asm-v2");
}

/// A host started from a configuration file that serves the tagger with `tag`, in a directory
/// of its own (`plugins/` beside `host.toml`); and how to write that file again with another
/// tag, the way deployment tools replace files.
async fn tagger_from_file(tag: &str) -> (tempfile::TempDir, impl Fn(&str) + use<>, RunningHost) {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(plugins.join("tag.wasm"), TAGGER.bytes()).unwrap();
    let config = dir.path().join("host.toml");
    let write_config = move |tag: &str| {
        replace_file(
            &config,
            format!(
                "plugins_dir = {:?}\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 [runtime]\nmax_instances = 1000\n[plugins.tag]\nconfig = \"{tag}\"\n",
                plugins.display().to_string()
            )
            .as_bytes(),
        )
    };
    write_config(tag);
    let host = RunningHost::start_from_file(&dir.path().join("host.toml")).await;
    (dir, write_config, host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_changes_are_picked_up_from_the_file() {
    let (_dir, write_config, host) = tagger_from_file("first").await;
    assert_eq!(request_tag(&host).await, "first");

    write_config("second");
    wait_for_loads(&host, 2).await;
    assert_eq!(request_tag(&host).await, "second");
    let listing = request(host.admin, "GET", "/plugins", &[], Vec::new())
        .await
        .unwrap();
    let listing = listing.json().unwrap();
    assert_eq!(listing["generation"], 2);
}

/// Only what a reload reads triggers one: a log and a pid file beside the configuration file,
/// and notes beside the plugins, changing all the time, never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_files_beside_the_configuration_and_the_plugins_trigger_no_reload() {
    let (dir, write_config, host) = tagger_from_file("first").await;
    let plugins = dir.path().join("plugins");
    // Served, so watching: the host watches from the moment it serves.
    assert_eq!(request_tag(&host).await, "first");
    let busy = [
        dir.path().join("host.log"),
        dir.path().join("host.pid"),
        plugins.join("NOTES.txt"),
        plugins.join(".tag.wasm.swp"),
    ];
    for round in 0..40 {
        for file in &busy {
            let mut open = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .unwrap();
            std::io::Write::write_all(&mut open, format!("line {round}\n").as_bytes()).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Two quiet periods after the last write: any reload would have started by now.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let metrics = host.metrics();
    assert_eq!((metrics.reloads("ok"), metrics.reloads("error")), (1, 0));
    // The configuration file itself still counts.
    write_config("second");
    wait_for_loads(&host, 2).await;
    assert_eq!(request_tag(&host).await, "second");
}

async fn health(address: std::net::SocketAddr, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(address).await);
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap();
    response.into_inner().status()
}

async fn channel(address: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

const EXT_PROC: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_loading_and_shutdown() {
    let mut host =
        RunningHost::start_unloaded(&[("asm", ASM_DEMO)], "shutdown_grace_ms = 10000\n").await;

    // Before the plugins are loaded.
    for service in ["", EXT_PROC] {
        assert_eq!(
            health(host.address, service).await,
            ServingStatus::NotServing
        );
    }
    let readyz = request(host.admin, "GET", "/readyz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(readyz.status, 503);
    let early = ExtProcStream::try_connect(host.address).await.unwrap_err();
    assert_eq!(
        (early.code(), early.message()),
        (tonic::Code::Unavailable, "plugins are still loading")
    );

    // Loaded.
    host.load().await.unwrap();
    for service in ["", EXT_PROC] {
        assert_eq!(health(host.address, service).await, ServingStatus::Serving);
    }
    assert_eq!(
        request(host.admin, "GET", "/readyz", &[], Vec::new())
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        request(host.admin, "GET", "/healthz", &[], Vec::new())
            .await
            .unwrap()
            .status,
        200
    );

    // Shutting down, with a stream in flight and a health watch open.
    let mut in_flight = ExtProcStream::connect(host.address).await;
    in_flight
        .exchange(grpc::request_headers(&[(":path", "/")], false))
        .await;
    let mut watcher = HealthClient::new(channel(host.address).await);
    let mut watch = watcher
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    host.begin_shutdown();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    assert_eq!(health(host.address, "").await, ServingStatus::NotServing);
    assert_eq!(
        request(host.admin, "GET", "/readyz", &[], Vec::new())
            .await
            .unwrap()
            .status,
        503
    );
    let status = ExtProcStream::try_connect(host.address).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unavailable, "shutting down")
    );

    // The stream in flight finishes normally; then the host stops.
    let answer = in_flight
        .exchange(grpc::response_headers(&[(":status", "200")], true))
        .await;
    assert!(matches!(
        answer.response,
        Some(Response::ResponseHeaders(_))
    ));
    drop(in_flight);
    tokio::time::timeout(Duration::from_secs(10), host.stop())
        .await
        .expect("the host stops once the last stream is done")
        .unwrap();
}

#[tokio::test]
async fn a_stream_that_never_finishes_is_cut_off_after_the_grace_period() {
    let mut host = RunningHost::start(&[("asm", ASM_DEMO)], "shutdown_grace_ms = 300\n").await;
    let mut stuck = ExtProcStream::connect(host.address).await;
    stuck
        .exchange(grpc::request_headers(&[(":path", "/")], false))
        .await;
    host.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), host.stop())
        .await
        .expect("the grace period ends the wait")
        .unwrap();
}

/// The metrics deploy/monitoring's dashboard and alert rules query
/// (`deploy/monitoring/metrics.txt`, which deploy/tests keeps in step with them) are all in a
/// running host's `/metrics`, each of the type its suffix says.
#[tokio::test]
async fn the_dashboard_and_the_alerts_query_only_metrics_the_host_exports() {
    let host = RunningHost::start(&[("asm", ASM_DEMO)], "").await;
    // A plugin's series appear with its first call.
    request_tag(&host).await;
    let exposition = request(host.admin, "GET", "/metrics", &[], Vec::new())
        .await
        .unwrap();
    let exposition = String::from_utf8(exposition.body).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring/metrics.txt");
    let queried = std::fs::read_to_string(&path).unwrap();
    let names: Vec<&str> = queried.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        let (family, kind) = if let Some(base) = name.strip_suffix("_total") {
            (base, "counter")
        } else if let Some(base) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
        {
            (base, "histogram")
        } else {
            (name, "gauge")
        };
        assert!(
            exposition.contains(&format!("# TYPE {family} {kind}\n")),
            "{name} ({kind} {family}) is not in /metrics:\n{exposition}"
        );
    }
}

/// The value of the series `name{labels}` in a Prometheus text exposition.
fn metric(text: &str, series: &str) -> f64 {
    extproc_testkit::series::scraped(text, series)
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_happened() {
    let host = RunningHost::start(&[("asm", ASM_DEMO)], "").await;
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start(host.address, upstream.address).await.unwrap();
    for _ in 0..7 {
        assert_eq!(envoy.get("/headers").await.unwrap().status, 200);
    }
    let scrape = request(host.admin, "GET", "/metrics", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(scrape.status, 200);
    assert!(scrape.header_values("content-type")[0].starts_with("application/openmetrics-text"));
    let text = String::from_utf8(scrape.body).unwrap();
    for (series, value) in [
        (
            "wasm_extproc_messages_received_total{phase=\"request_headers\"}",
            7.0,
        ),
        (
            "wasm_extproc_messages_received_total{phase=\"response_headers\"}",
            7.0,
        ),
        (
            "wasm_extproc_message_duration_seconds_count{phase=\"request_headers\"}",
            7.0,
        ),
        (
            "wasm_extproc_message_duration_seconds_count{phase=\"response_headers\"}",
            7.0,
        ),
        (
            "wasm_extproc_message_duration_seconds_count{phase=\"request_body\"}",
            0.0,
        ),
        (
            "wasm_extproc_plugin_calls_total{chain=\"default\",plugin=\"asm\",phase=\"request_headers\",outcome=\"ok\"}",
            7.0,
        ),
        (
            "wasm_extproc_plugin_calls_total{chain=\"default\",plugin=\"asm\",phase=\"response_headers\",outcome=\"ok\"}",
            7.0,
        ),
        (
            "wasm_extproc_plugin_call_duration_seconds_count{chain=\"default\",plugin=\"asm\",phase=\"request_headers\"}",
            7.0,
        ),
        (
            "wasm_extproc_plugin_instantiate_duration_seconds_count{chain=\"default\",plugin=\"asm\"}",
            7.0,
        ),
        ("wasm_extproc_streams_total", 7.0),
        ("wasm_extproc_active_streams", 0.0),
        ("wasm_extproc_reloads_total{result=\"ok\"}", 1.0),
    ] {
        assert_eq!(metric(&text, series), value, "{series}");
    }

    let listing = request(host.admin, "GET", "/plugins", &[], Vec::new())
        .await
        .unwrap();
    let listing = listing.json().unwrap();
    let plugin = &listing["plugins"][0];
    assert_eq!(plugin["name"], "asm");
    assert_eq!(
        plugin["phases"],
        serde_json::json!(["request_headers", "response_headers"])
    );
    assert_eq!(plugin["needs_from_envoy"], serde_json::json!([]));
    assert_eq!(plugin["calls"]["ok"], 14);
    assert_eq!(plugin["calls"]["trap"], 0);
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(ASM_DEMO.bytes()))
    };
    assert_eq!(plugin["sha256"], expected);
}

/// The identity the test Envoy's client certificate carries, beside the DNS name `envoy`.
const ENVOY_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway";

/// A CA, a server certificate for 127.0.0.1, the Envoy's client certificate (`envoy`,
/// [`ENVOY_IDENTITY`]) and another client's (`stranger`), written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf whose issuer name equals its own looks self-signed.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "wasm-extproc test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        write("ca.crt", ca.pem());
        for (name, names) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
            ),
            ("client", vec!["envoy".to_string()]),
            ("stranger", vec!["stranger".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            if name == "client" {
                params
                    .subject_alt_names
                    .push(SanType::URI(ENVOY_IDENTITY.try_into().unwrap()));
            }
            let cert = params.signed_by(&key, &issuer).unwrap();
            write(&format!("{name}.crt"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn host_settings(&self, mutual: bool) -> String {
        let mut text = format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            self.path("server.crt"),
            self.path("server.key")
        );
        if mutual {
            text.push_str(&format!("client_ca = {:?}\n", self.path("ca.crt")));
        }
        text
    }

    /// A TLS connection to the host at `address`, presenting the certificate `identity`
    /// (`client`, `stranger`) if any.
    async fn client(
        &self,
        address: std::net::SocketAddr,
        identity: Option<&str>,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        let ca =
            tonic::transport::Certificate::from_pem(std::fs::read(self.path("ca.crt")).unwrap());
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name("localhost");
        if let Some(name) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                std::fs::read(self.path(&format!("{name}.crt"))).unwrap(),
                std::fs::read(self.path(&format!("{name}.key"))).unwrap(),
            ));
        }
        tonic::transport::Channel::from_shared(format!("https://localhost:{}", address.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
    }

    /// Envoy's ext_proc cluster over TLS, presenting the client certificate.
    fn envoy(&self) -> EnvoyConfig {
        EnvoyConfig::default().edit(
            "    - name: ext_proc\n      type: STATIC\n",
            &format!(
                "    - name: ext_proc
      type: STATIC
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{ filename: {} }}
                private_key: {{ filename: {} }}
            validation_context:
              trusted_ca: {{ filename: {} }}
",
                self.path("client.crt"),
                self.path("client.key"),
                self.path("ca.crt")
            ),
        )
    }
}

/// Envoy with [`Pki::envoy`]'s client certificate in front of `host`: the guide's header comes
/// back.
async fn assert_envoy_served_over_tls(pki: &Pki, host: &RunningHost, label: &str) {
    let upstream = EchoServer::start().await.unwrap();
    let envoy = Envoy::start_with(&pki.envoy(), host.address, upstream.address)
        .await
        .unwrap();
    let response = envoy.get("/headers").await.unwrap();
    assert_eq!(response.status, 200, "{label}: {}", envoy.log());
    assert_eq!(
        response.header_values("x-ext-proc-header"),
        ["hello-from-asm"],
        "{label}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_end_to_end_with_envoy() {
    let pki = Pki::new();
    for mutual in [false, true] {
        let host = RunningHost::start(&[("asm", ASM_DEMO)], &pki.host_settings(mutual)).await;
        assert_envoy_served_over_tls(&pki, &host, &format!("mutual={mutual}")).await;

        // A plaintext client gets nowhere.
        let plaintext = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::connect(format!("http://{}", host.address));
        let refused = match plaintext.await {
            Err(_) => true,
            Ok(mut client) => {
                let (_sender, receiver) = tokio::sync::mpsc::channel(1);
                client
                    .process(tokio_stream::wrappers::ReceiverStream::new(receiver))
                    .await
                    .is_err()
            }
        };
        assert!(refused, "mutual={mutual}: plaintext accepted");

        // A TLS client without a certificate is refused when TLS is mutual.
        let served = match pki.client(host.address, None).await {
            Err(_) => false,
            Ok(channel) => {
                let mut client = HealthClient::new(channel);
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok()
            }
        };
        assert_eq!(
            served, !mutual,
            "mutual={mutual}: a client without a certificate"
        );
    }
}

/// On top of mutual TLS, `allowed_client_sans` admits only the identities it names: Envoy's is
/// served; a client the CA also signed, with another name, is refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_client_identities_may_open_streams() {
    let pki = Pki::new();
    let settings = format!(
        "{}allowed_client_sans = [\"{ENVOY_IDENTITY}\"]\n",
        pki.host_settings(true)
    );
    let host = RunningHost::start(&[("asm", ASM_DEMO)], &settings).await;
    assert_envoy_served_over_tls(&pki, &host, "an allowed identity").await;
    assert_eq!(host.metrics().refusals("ext_proc", "identity"), 0);

    let channel = pki
        .client(host.address, Some("stranger"))
        .await
        .expect("TLS admits the stranger: the CA signed it");
    let mut client = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(channel);
    let (_sender, receiver) = tokio::sync::mpsc::channel(1);
    let refused = client
        .process(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .expect_err("the stranger's stream must be refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("\"stranger\""), "{refused:?}");
    assert_eq!(host.metrics().refusals("ext_proc", "identity"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_reaches_the_host_over_a_unix_socket() {
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("ext_proc.sock");
    let host = RunningHost::start(
        &[("asm", ASM_DEMO)],
        &format!("listen = \"unix:{}\"\n", socket.display()),
    )
    .await;
    let upstream = EchoServer::start().await.unwrap();
    let placeholder = "127.0.0.1:1".parse().unwrap();
    let config = EnvoyConfig::default().edit(
        "socket_address: { address: 127.0.0.1, port_value: 1 }",
        &format!("pipe: {{ path: {} }}", socket.display()),
    );
    let envoy = Envoy::start_with(&config, placeholder, upstream.address)
        .await
        .unwrap();
    let response = envoy.get("/headers").await.unwrap();
    assert_eq!(response.status, 200, "{}", envoy.log());
    assert_eq!(
        response.header_values("x-ext-proc-header"),
        ["hello-from-asm"]
    );
    drop(host);
}

/// The admin listener holds under misuse: a flood of connections that say nothing never keeps
/// `/readyz` from answering (past the cap, the oldest is closed), such a connection is cut off
/// after the header-read timeout, and refused requests are logged within a budget, counted all.
#[tokio::test(flavor = "current_thread")]
async fn the_admin_listener_holds_under_idle_connections_and_refusal_floods() {
    use tokio::io::AsyncReadExt;
    use wasm_extproc::admin::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, REFUSAL_LINES_PER_SECOND};

    use super::hostile::Captured;
    let (captured, _guard) = Captured::on_this_thread(tracing::Level::WARN);
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "s3cret\n").unwrap();
    let host = RunningHost::start(
        &[("asm", ASM_DEMO)],
        &format!("admin_token_file = {:?}\n", token.path()),
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 50 {
        idle.push(tokio::net::TcpStream::connect(host.admin).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let ready = request(host.admin, "GET", "/readyz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(ready.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The oldest idle connections were closed to make room.
    async fn closed(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(within, stream.read(&mut buffer)).await;
        matches!(read, Ok(Ok(0) | Err(_)))
    }
    assert!(closed(&mut idle[0], Duration::from_secs(1)).await);
    // The newest are cut off once the header-read timeout passes.
    let waited = std::time::Instant::now();
    let last = idle.last_mut().unwrap();
    assert!(closed(last, HEADER_READ_TIMEOUT + Duration::from_secs(2)).await);
    assert!(waited.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_secs(1));
    drop(idle);

    for _ in 0..50 {
        let refused = request(host.admin, "POST", "/reload", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(refused.status, 401);
    }
    assert_eq!(host.metrics().refusals("admin", "missing_token"), 50);
    let log = captured.text();
    let lines = log.matches("admin request refused").count();
    assert!(
        (1..=REFUSAL_LINES_PER_SECOND as usize).contains(&lines),
        "{lines} lines: {log}"
    );
    assert!(
        log.contains("admin requests refused and not logged"),
        "{log}"
    );
}
