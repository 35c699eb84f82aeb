//! A real Envoy, configured from `deploy/envoy/envoy.yaml` -- the same file operators use --
//! with its ports pointed at this test's host and upstream; or, for the in-process mode, from
//! `deploy/envoy/envoy-in-process.yaml` with the test's plugins and settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};

/// The listener, ext_proc, upstream and admin ports as written in `deploy/envoy/envoy.yaml`.
const LISTENER_PORT: &str = "port_value: 8000";
const EXT_PROC_PORT: &str = "port_value: 9002";
const UPSTREAM_PORT: &str = "port_value: 8080";
const ADMIN_PORT: &str = "port_value: 9901";

/// How long Envoy may take to start listening.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The Envoy binary: `$ENVOY_BIN`, else the one `cargo xtask` installs, else `envoy` on PATH.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(path);
    }
    let installed = crate::repo_root().join("target/tools/envoy/bin/envoy");
    if installed.is_file() {
        return installed;
    }
    PathBuf::from("envoy")
}

/// `deploy/envoy/envoy.yaml` with its ports replaced. `listener` 0 lets the kernel choose.
pub fn render_config(
    listener: u16,
    ext_proc: SocketAddr,
    upstream: SocketAddr,
    admin: u16,
) -> anyhow::Result<String> {
    EnvoyConfig::default().render(listener, ext_proc, upstream, admin)
}

/// The directory holding `libwasm_extproc_module.so`, the in-process module:
/// `$WASM_EXTPROC_MODULE_DIR`, else the target directory of the tests' own profile.
pub fn module_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WASM_EXTPROC_MODULE_DIR") {
        return PathBuf::from(dir);
    }
    let dir = crate::fixtures::target_dir().join(crate::PROFILE_DIR);
    let release = if crate::PROFILE_DIR == "release" {
        " --release"
    } else {
        ""
    };
    assert!(
        dir.join("libwasm_extproc_module.so").is_file(),
        "{}/libwasm_extproc_module.so is missing: run `cargo build{release} -p \
         wasm-extproc-module` (or `cargo xtask test`) first",
        dir.display()
    );
    dir
}

/// The plugins and settings of an Envoy that runs them in-process.
#[derive(Debug, Clone)]
pub struct InProcess {
    pub plugins_dir: PathBuf,
    /// The module's TOML, after `plugins_dir`.
    pub toml: String,
}

/// The line of `deploy/envoy/envoy-in-process.yaml`'s filter config the test's settings
/// replace.
const MODULE_CONFIG_ANCHOR: &str = "                          plugins_dir = \"/plugins\"\n";
/// The `[module]` table `deploy/envoy/envoy-in-process.yaml` writes after `plugins_dir`: a
/// test's own `[module]` replaces it.
const SHIPPED_MODULE: &str = "                          [module]
                          # The client's address: the crash-loop breaker tells clients apart
                          # by it, the bundled rate limit counts by it.
                          request_attributes = [\"source.address\"]
";

/// Variations on `deploy/envoy/envoy.yaml` for tests: the processing mode and extra filter
/// settings. Each change replaces a line the file must contain exactly once, so the file and
/// the tests cannot drift apart silently.
#[derive(Debug, Clone, Default)]
pub struct EnvoyConfig {
    /// Run the plugins in Envoy (`deploy/envoy/envoy-in-process.yaml`) instead of over ext_proc.
    pub in_process: Option<InProcess>,
    /// `(field, value)` pairs of `processing_mode`, e.g. `("request_body_mode", "BUFFERED")`.
    pub processing_mode: Vec<(&'static str, &'static str)>,
    /// Extra lines for the ext_proc filter's `typed_config`, e.g. `"request_attributes: [request.path]"`.
    pub filter_settings: Vec<String>,
    /// Speak HTTP/2 to the upstream (needed to carry trailers).
    pub upstream_http2: bool,
    /// Free-form `(text, replacement)` edits; `text` must occur exactly once.
    pub edits: Vec<(String, String)>,
}

const ACCESS_LOG_ANCHOR: &str = "                stat_prefix: ingress_http\n";
const FILTER_ANCHOR: &str = "                      failure_mode_allow: false\n";
/// The line before the HTTP filters of `deploy/envoy/envoy.yaml`, where a filter that runs
/// before the plugins' goes ([`lua_filter`]).
pub const HTTP_FILTERS: &str = "                http_filters:\n";

/// What replaces [`HTTP_FILTERS`] to run `on_request` (Lua, with `request_handle`) before the
/// plugins: to set dynamic metadata they read, say.
pub fn lua_filter(on_request: &str) -> String {
    let body: String = on_request
        .lines()
        .map(|line| format!("                            {line}\n"))
        .collect();
    format!(
        "{HTTP_FILTERS}                  - name: envoy.filters.http.lua
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
                      default_source_code:
                        inline_string: |
                          function envoy_on_request(request_handle)
{body}                          end
"
    )
}

/// The attributes `deploy/envoy/envoy.yaml` has its ext_proc filter send.
const SHIPPED_ATTRIBUTES: &str = "                      request_attributes: [source.address]\n";
const UPSTREAM_ANCHOR: &str = "    - name: httpbin\n      type: STATIC\n";
/// The clusters' list with the static cluster `name` to `address` first, `options` (protocol
/// options, indented as a cluster's fields) among its settings.
fn cluster_yaml(name: &str, address: SocketAddr, options: &str) -> String {
    format!(
        "{CLUSTERS_START}    - name: {name}
      type: STATIC
      connect_timeout: 1s
{options}      load_assignment:
        cluster_name: {name}
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: {}, port_value: {} }}
",
        address.ip(),
        address.port()
    )
}

const HTTP2_OPTIONS: &str = "      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
";

impl EnvoyConfig {
    /// Sets one `processing_mode` field.
    pub fn mode(mut self, field: &'static str, value: &'static str) -> Self {
        self.processing_mode.push((field, value));
        self
    }

    /// Replaces `text`, which must occur exactly once in the file.
    pub fn edit(mut self, text: &str, replacement: &str) -> Self {
        self.edits.push((text.into(), replacement.into()));
        self
    }

    /// Runs the plugins in `plugins_dir` in Envoy's process, with the module settings `toml`.
    pub fn in_process(mut self, plugins_dir: &Path, toml: &str) -> Self {
        self.in_process = Some(InProcess {
            plugins_dir: plugins_dir.to_path_buf(),
            toml: toml.into(),
        });
        self
    }

    /// Writes an access log line per request to `path`: `%RESPONSE_CODE%
    /// %RESPONSE_CODE_DETAILS%`, what an operator reads to tell why a request was answered.
    pub fn access_log(self, path: &Path) -> Self {
        self.access_log_as(path, "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS%")
    }

    /// Writes an access log line per request to `path` in `format` (Envoy's command
    /// operators, without the newline; no double quotes).
    pub fn access_log_as(self, path: &Path, format: &str) -> Self {
        let log = format!(
            "{ACCESS_LOG_ANCHOR}\
             {indent}access_log:\n\
             {indent}  - name: envoy.access_loggers.file\n\
             {indent}    typed_config:\n\
             {indent}      \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n\
             {indent}      path: {path:?}\n\
             {indent}      log_format:\n\
             {indent}        text_format_source:\n\
             {indent}          inline_string: \"{format}\\n\"\n",
            indent = " ".repeat(16),
            path = path.display().to_string(),
        );
        self.edit(ACCESS_LOG_ANCHOR, &log)
    }

    /// Traces every request with Envoy's OpenTelemetry tracer (service `envoy`), exporting
    /// over OTLP/gRPC to `collector`. Envoy passes the trace on to the ext_proc stream.
    pub fn traced(self, collector: SocketAddr) -> Self {
        let tracing = format!(
            "{ACCESS_LOG_ANCHOR}\
             {indent}tracing:\n\
             {indent}  provider:\n\
             {indent}    name: envoy.tracers.opentelemetry\n\
             {indent}    typed_config:\n\
             {indent}      \"@type\": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig\n\
             {indent}      grpc_service:\n\
             {indent}        envoy_grpc:\n\
             {indent}          cluster_name: otlp\n\
             {indent}      service_name: envoy\n",
            indent = " ".repeat(16),
        );
        self.edit(ACCESS_LOG_ANCHOR, &tracing).edit(
            CLUSTERS_START,
            &cluster_yaml("otlp", collector, HTTP2_OPTIONS),
        )
    }

    /// Adds the cluster `name`, HTTP/1.1 to `address`.
    pub fn cluster(self, name: &str, address: SocketAddr) -> Self {
        self.edit(CLUSTERS_START, &cluster_yaml(name, address, ""))
    }

    /// Speaks HTTP/2 to the upstream.
    pub fn upstream_http2(mut self) -> Self {
        self.upstream_http2 = true;
        self
    }

    /// Adds one line to the filter's settings.
    pub fn filter(mut self, line: impl Into<String>) -> Self {
        self.filter_settings.push(line.into());
        self
    }

    pub fn render(
        &self,
        listener: u16,
        ext_proc: SocketAddr,
        upstream: SocketAddr,
        admin: u16,
    ) -> anyhow::Result<String> {
        let file = match self.in_process {
            Some(_) => "deploy/envoy/envoy-in-process.yaml",
            None => "deploy/envoy/envoy.yaml",
        };
        let path = crate::repo_root().join(file);
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let mut edits: Vec<(String, String)> = vec![
            (LISTENER_PORT.into(), format!("port_value: {listener}")),
            (
                UPSTREAM_PORT.into(),
                format!("port_value: {}", upstream.port()),
            ),
            (ADMIN_PORT.into(), format!("port_value: {admin}")),
        ];
        match &self.in_process {
            None => edits.push((
                EXT_PROC_PORT.into(),
                format!("port_value: {}", ext_proc.port()),
            )),
            Some(module) => {
                if !self.processing_mode.is_empty() || !self.filter_settings.is_empty() {
                    bail!("processing modes and ext_proc filter settings mean nothing in-process");
                }
                let mut block = format!(
                    "plugins_dir = {:?}\n{}",
                    module.plugins_dir.display().to_string(),
                    module.toml
                );
                if !block.ends_with('\n') {
                    block.push('\n');
                }
                let indent = " ".repeat(26);
                let block: String = block
                    .lines()
                    .map(|line| format!("{indent}{line}\n"))
                    .collect();
                let anchor = if module.toml.contains("[module]") {
                    format!("{MODULE_CONFIG_ANCHOR}{SHIPPED_MODULE}")
                } else {
                    MODULE_CONFIG_ANCHOR.to_string()
                };
                edits.push((anchor, block));
            }
        }
        for (field, value) in &self.processing_mode {
            let current = ["NONE", "SEND", "SKIP"]
                .iter()
                .map(|v| format!("{field}: {v}\n"))
                .find(|line| text.contains(line.as_str()))
                .with_context(|| format!("{} has no processing_mode.{field}", path.display()))?;
            edits.push((current, format!("{field}: {value}\n")));
        }
        if !self.filter_settings.is_empty() {
            let mut block = FILTER_ANCHOR.to_string();
            for line in &self.filter_settings {
                // The shipped file lists the attributes it sends: a test's list replaces it.
                if line.starts_with("request_attributes:") {
                    edits.push((
                        SHIPPED_ATTRIBUTES.into(),
                        format!("                      {line}\n"),
                    ));
                    continue;
                }
                block.push_str(&format!("                      {line}\n"));
            }
            edits.push((FILTER_ANCHOR.into(), block));
        }
        if self.upstream_http2 {
            edits.push((
                UPSTREAM_ANCHOR.into(),
                format!("{UPSTREAM_ANCHOR}{HTTP2_OPTIONS}"),
            ));
        }
        edits.extend(self.edits.iter().cloned());
        let mut text = text;
        for (needle, replacement) in edits {
            if text.matches(needle.as_str()).count() != 1 {
                bail!(
                    "{} must contain `{}` exactly once",
                    path.display(),
                    needle.trim_end()
                );
            }
            text = text.replace(needle.as_str(), &replacement);
        }
        Ok(text.replace("address: 0.0.0.0", "address: 127.0.0.1"))
    }
}

/// Where each listener of the deploy file starts, and where the clusters start.
const LISTENERS_START: &str = "  listeners:\n";
const CLUSTERS_START: &str = "  clusters:\n";

impl EnvoyConfig {
    /// One Envoy configuration serving every variation in `configs`, each on a listener of its
    /// own (`case_0`, `case_1`, ... on ports the kernel chooses), with the clusters of the
    /// first: for sweeps that would otherwise start an Envoy per case. The variations may
    /// differ only in their listeners (the filter and its processing mode), not in clusters.
    pub fn render_each(
        configs: &[EnvoyConfig],
        ext_proc: SocketAddr,
        upstream: SocketAddr,
    ) -> anyhow::Result<String> {
        let mut head = String::new();
        let mut tail = String::new();
        let mut listeners = String::new();
        for (i, config) in configs.iter().enumerate() {
            let text = config.render(0, ext_proc, upstream, 0)?;
            let (before, rest) = text
                .split_once(LISTENERS_START)
                .context("deploy/envoy/envoy.yaml has no listeners")?;
            let (listener, after) = rest
                .split_once(CLUSTERS_START)
                .context("deploy/envoy/envoy.yaml has no clusters after its listeners")?;
            if i == 0 {
                head = format!("{before}{LISTENERS_START}");
                tail = format!("{CLUSTERS_START}{after}");
            } else if format!("{CLUSTERS_START}{after}") != tail {
                bail!("case {i} changes the clusters; one Envoy cannot serve it beside case 0");
            }
            let mut listener = listener.to_string();
            for (from, to) in [
                ("- name: ingress\n", format!("- name: case_{i}\n")),
                (
                    "stat_prefix: ingress_http\n",
                    format!("stat_prefix: case_{i}\n"),
                ),
            ] {
                if listener.matches(from).count() != 1 {
                    bail!(
                        "the listener of deploy/envoy/envoy.yaml must contain `{}` once",
                        from.trim_end()
                    );
                }
                listener = listener.replace(from, &to);
            }
            listeners.push_str(&listener);
        }
        Ok(format!("{head}{listeners}{tail}"))
    }
}

/// A running Envoy. Killed when dropped.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    /// Where clients connect.
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy in front of `upstream` with `ext_proc` as its processor, and waits until
    /// it listens.
    pub async fn start(ext_proc: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Envoy> {
        Self::start_with(&EnvoyConfig::default(), ext_proc, upstream).await
    }

    /// Like [`start`](Self::start), with a variation of the configuration.
    pub async fn start_with(
        config: &EnvoyConfig,
        ext_proc: SocketAddr,
        upstream: SocketAddr,
    ) -> anyhow::Result<Envoy> {
        let config = config.render(0, ext_proc, upstream, 0)?;
        Self::start_with_config(&config).await
    }

    /// Starts one Envoy serving every variation in `configs` (see
    /// [`EnvoyConfig::render_each`]); returns it and each variation's listener, in order.
    pub async fn start_each(
        configs: &[EnvoyConfig],
        ext_proc: SocketAddr,
        upstream: SocketAddr,
    ) -> anyhow::Result<(Envoy, Vec<SocketAddr>)> {
        let config = EnvoyConfig::render_each(configs, ext_proc, upstream)?;
        let envoy = Self::start_with_config(&config).await?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let bound = bound_listeners(&envoy.admin_get("/listeners?format=json").await?);
            let listeners: Vec<SocketAddr> = (0..configs.len())
                .filter_map(|i| {
                    let name = format!("case_{i}");
                    bound.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
                })
                .collect();
            if listeners.len() == configs.len() {
                return Ok((envoy, listeners));
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy bound {} of {} listeners in {STARTUP_TIMEOUT:?}",
                    listeners.len(),
                    configs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts Envoy with a configuration whose listener and admin ports are 0.
    pub async fn start_with_config(config: &str) -> anyhow::Result<Envoy> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("envoy.yaml");
        let admin_path = dir.path().join("admin-address");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("envoy.log"))?;
        let mut command = Command::new(binary());
        if config.contains("wasm_extproc_module") {
            command.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module_dir());
        }
        let child = command
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "2",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}: run `cargo xtask setup`",
                    binary().display()
                )
            })?;
        let mut envoy = Envoy {
            child,
            listener: "0.0.0.0:0".parse()?,
            admin: "0.0.0.0:0".parse()?,
            _dir: dir,
        };
        envoy.wait_ready(&admin_path).await?;
        Ok(envoy)
    }

    async fn wait_ready(&mut self, admin_path: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("envoy exited with {status}: {}", self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy did not become ready in {STARTUP_TIMEOUT:?}: {}",
                    self.log()
                );
            }
            if let Ok(text) = std::fs::read_to_string(admin_path)
                && let Ok(admin) = text.trim().parse::<SocketAddr>()
            {
                self.admin = admin;
                if let Ok(listeners) = self.admin_get("/listeners?format=json").await
                    && let Some(listener) = bound_listener(&listeners)
                {
                    self.listener = listener;
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What Envoy wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// GET on the admin interface.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        let response = request(self.admin, "GET", path, &[], Vec::new()).await?;
        Ok(String::from_utf8_lossy(&response.body).into_owned())
    }

    /// A counter from `/stats`, 0 if absent.
    pub async fn counter(&self, name: &str) -> anyhow::Result<u64> {
        let stats = self.admin_get(&format!("/stats?filter=^{name}$")).await?;
        Ok(stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// A request through Envoy's listener.
    pub async fn send(&self, request: &HttpRequest) -> anyhow::Result<HttpResponse> {
        request.send(self.listener).await
    }

    /// An HTTP/1.1 request through Envoy's listener.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<HttpResponse> {
        request(self.listener, method, path, headers, body).await
    }

    /// `GET path` through Envoy.
    pub async fn get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        self.request("GET", path, &[], Vec::new()).await
    }
}

fn bound_listener(json: &str) -> Option<SocketAddr> {
    bound_listeners(json)
        .into_iter()
        .next()
        .map(|(_, address)| address)
}

/// Every listener that has its port, by name, in the order Envoy lists them.
fn bound_listeners(json: &str) -> Vec<(String, SocketAddr)> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let Some(statuses) = value["listener_statuses"].as_array() else {
        return Vec::new();
    };
    statuses
        .iter()
        .filter_map(|status| {
            let name = status["name"].as_str()?;
            let port = status["local_address"]["socket_address"]["port_value"].as_u64()?;
            (port != 0).then(|| {
                (
                    name.to_string(),
                    SocketAddr::from(([127, 0, 0, 1], port as u16)),
                )
            })
        })
        .collect()
}

/// The first line Envoy wrote to the access log at `path` (see [`EnvoyConfig::access_log`]),
/// once there is one: Envoy writes it when the stream ends, just after the client's answer.
pub async fn first_access_log_line(path: &Path) -> String {
    for _ in 0..200 {
        if let Some(line) = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.lines().next().map(str::to_string))
        {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} stayed empty", path.display());
}

/// A response as a client saw it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

impl HttpResponse {
    /// Every value of `name`.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A 200 that the ASM plugin tagged both ways: `x-ext-proc-header: hello-from-asm` on the
    /// response, and `hello-to-asm` on the request the echo upstream sent back. Returns the
    /// echoed JSON for further checks; `label` says which case failed.
    pub fn assert_tagged_by_asm(&self, label: &str) -> serde_json::Value {
        assert_eq!(self.status, 200, "{label}");
        assert_eq!(
            self.header_values("x-ext-proc-header"),
            ["hello-from-asm"],
            "{label}: the response was tagged"
        );
        let json = self.json().unwrap();
        assert_eq!(
            json["headers"]["X-Ext-Proc-Header"], "hello-to-asm",
            "{label}: the request was tagged"
        );
        json
    }

    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

/// One HTTP/1.1 request to `address`.
pub async fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> anyhow::Result<HttpResponse> {
    let mut request = HttpRequest::new(method, path).body(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    request.send(address).await
}

/// A request with the shapes tests need: a body sent in separate chunks (chunked upload),
/// trailers, HTTP/2 without TLS.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The body, as the chunks to send; each goes out after [`pause`](Self::pause).
    pub chunks: Vec<Vec<u8>>,
    /// Whether the body is sent as a stream of `chunks` (`transfer-encoding: chunked` over
    /// HTTP/1.1) rather than whole with a `content-length`.
    pub streamed: bool,
    /// The pause before each chunk of a streamed body.
    pub pause: Duration,
    pub trailers: Vec<(String, String)>,
    pub http2: bool,
    /// The address the request is sent from (a loopback one, `127.0.0.N`), as another
    /// client would; the system picks one if `None`.
    pub from: Option<std::net::IpAddr>,
}

/// The pause between chunks of a chunked upload: long enough for Envoy to see each chunk on
/// its own.
const CHUNK_PAUSE: Duration = Duration::from_millis(20);

impl HttpRequest {
    pub fn new(method: &str, path: &str) -> Self {
        HttpRequest {
            method: method.into(),
            path: path.into(),
            pause: CHUNK_PAUSE,
            ..HttpRequest::default()
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The whole body in one piece.
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.chunks = vec![body];
        self
    }

    /// The body in separate chunks (`transfer-encoding: chunked` over HTTP/1.1), however
    /// many there are.
    pub fn chunked(mut self, chunks: Vec<Vec<u8>>) -> Self {
        self.chunks = chunks;
        self.streamed = true;
        self
    }

    /// Pauses `pause` before each chunk of a chunked body (20 ms unless set).
    pub fn paced(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.push((name.into(), value.into()));
        self
    }

    /// HTTP/2 with prior knowledge (h2c).
    pub fn http2(mut self) -> Self {
        self.http2 = true;
        self
    }

    /// Sent from `address` (`127.0.0.2`, ...): another client, as Envoy's `source.address`
    /// tells them apart.
    pub fn from(mut self, address: &str) -> Self {
        self.from = Some(address.parse().expect("an IP address"));
        self
    }

    pub async fn send(&self, address: SocketAddr) -> anyhow::Result<HttpResponse> {
        type Body = BoxBody<Bytes, std::convert::Infallible>;
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_local_address(self.from);
        let client: Client<_, Body> = Client::builder(TokioExecutor::new())
            .http2_only(self.http2)
            .build(connector);
        let mut builder = hyper::Request::builder()
            .method(self.method.as_str())
            .uri(format!("http://{address}{}", self.path));
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        let body: Body = if !self.streamed && self.trailers.is_empty() {
            Full::new(Bytes::from(self.chunks.concat())).boxed()
        } else {
            let mut frames: Vec<Frame<Bytes>> = self
                .chunks
                .iter()
                .map(|c| Frame::data(Bytes::from(c.clone())))
                .collect();
            if !self.trailers.is_empty() {
                let mut trailers = hyper::HeaderMap::new();
                for (name, value) in &self.trailers {
                    trailers.append(
                        hyper::header::HeaderName::from_bytes(name.as_bytes())?,
                        hyper::header::HeaderValue::from_str(value)?,
                    );
                }
                frames.push(Frame::trailers(trailers));
            }
            let pause = self.pause;
            let paced = futures::stream::iter(frames).then(move |frame| async move {
                tokio::time::sleep(pause).await;
                Ok::<_, std::convert::Infallible>(frame)
            });
            BodyExt::boxed(StreamBody::new(paced))
        };
        let response = client.request(builder.body(body)?).await?;
        let status = response.status().as_u16();
        let text =
            |v: &hyper::header::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), text(v)))
            .collect();
        let collected = response.into_body().collect().await?;
        let trailers = collected
            .trailers()
            .map(|t| {
                t.iter()
                    .map(|(n, v)| (n.as_str().to_string(), text(v)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(HttpResponse {
            status,
            headers,
            body: collected.to_bytes().to_vec(),
            trailers,
        })
    }
}
