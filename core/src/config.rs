//! The configuration both front ends read: one TOML file format for the ext_proc server and
//! the in-process module alike, parsed once into types that cannot hold a wrong value.
//!
//! ```toml
//! plugins_dir = "/plugins"
//! watch = true                  # reload when plugins (or the server's config file) change
//!
//! [runtime]
//! max_instances = 14000         # plugin instances alive at once, across all streams
//! max_body_bytes_in_flight = 134217728 # body bytes all streams hold at once
//!
//! [defaults]                    # every plugin, unless its own table says otherwise
//! failure_policy = "fail-closed"
//! failure_status = 500
//! timeout_ms = 20
//! memory_limit_mib = 32
//! breaker_threshold = 5         # failures in a row that quarantine a plugin; 0 = never
//! breaker_min_clients = 3       # ... from at least this many clients (source.address)
//! breaker_window_ms = 10000
//! breaker_backoff_ms = 5000
//! isolation = "exchange"        # or "reuse": keep instances across exchanges (see README)
//! log_lines_per_second = 100    # lines a plugin may log, in bursts of as many; 0 = none
//!
//! [plugins.10-auth]             # keyed by file name without `.wasm`
//! config = '{"realm": "api"}'
//! failure_policy = "fail-open"
//!
//! [plugins.11-auth-v2]          # runs beside 10-auth on live traffic; compared, never applied
//! mode = "shadow"
//! shadows = "10-auth"
//!
//! [envoy]                       # the Envoy in front: what it lets plugins change, how long it waits
//! message_timeout_ms = 200
//!
//! [kv]                          # state plugins keep between exchanges (contract 0.4.0)
//! backend = "redis"             # or "memory" (the default): one host only
//! url = "redis://redis.default.svc:6379"
//!
//! [secrets]                     # NAME = "FILE": values plugins granted them read (wasi:config)
//! api-tokens = "/var/run/secrets/api/tokens"
//! ```
//!
//! The file also carries each front end's own keys: the server's listeners, TLS and shutdown
//! grace (top level and `[tls]`), and the module's `[module]` table. They are read here as they
//! are written and interpreted by the front end that uses them; the other one says it ignores
//! them. Everything downstream takes a [`Settings`] and never re-checks it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::breaker::BreakerSettings;
use crate::kv::{self, Backend, KvSettings, Limits};
use crate::secrets::SecretsSettings;

/// The mount point of the plugin volume in the container image and Kubernetes manifests.
pub const DEFAULT_PLUGINS_DIR: &str = "/plugins";

/// A header plugin runs in microseconds; 20 ms is a thousand times that, and a chain of eight
/// plugins on one phase still answers inside Envoy's default 200 ms `message_timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(20);
const MAX_TIMEOUT: Duration = Duration::from_secs(10);
/// Enough for a plugin that buffers a 1 MiB body a few times over; small enough that a
/// thousand instances at their ceiling fit a 32 GiB node (most use a few dozen KiB).
pub const DEFAULT_MEMORY_LIMIT_MIB: u64 = 32;
const MAX_MEMORY_LIMIT_MIB: u64 = 4096;
/// Envoy's own answer when ext_proc fails with `failure_mode_allow: false`.
pub const DEFAULT_FAILURE_STATUS: u16 = 500;
/// Instances alive at once across all streams (one per plugin per stream in flight): room for
/// 10,000 exchanges in flight with a plugin each, and more. Each reserves address space, not
/// memory, until it is used; what bounds the number is the kernel's memory mappings (about 4
/// per live instance against the default `vm.max_map_count` of 65,530) and the address space
/// (about 4 GiB per memory, so that guest code needs no bounds checks).
pub const DEFAULT_MAX_INSTANCES: u32 = 14_000;
/// Of those, instances of plugins that import WASI: each keeps a fiber stack (2 MiB of address
/// space, two memory mappings) while its stream lives. Interpreted plugins (JavaScript,
/// Python) import WASI and take megabytes each, so memory bounds them long before this.
pub const DEFAULT_MAX_WASI_INSTANCES: u32 = 2_000;
/// How long a stream waits for a free instance when the pool is full before the plugin's
/// failure policy applies: a burst drains in that time, and it stays well inside Envoy's
/// default 200 ms `message_timeout` (the start-up budget check counts it once per phase).
pub const DEFAULT_INSTANCE_WAIT: Duration = Duration::from_millis(20);
/// Five crashes in a row is a crash loop, not bad luck: a plugin that fails 1% of calls gets
/// five in a row about once in ten billion calls. From three clients, so that no one client
/// (nor every client behind one proxy) can quarantine a plugin for everybody, while a plugin
/// broken on every call still trips as soon as a few clients have called it.
pub const DEFAULT_BREAKER: BreakerSettings = BreakerSettings {
    threshold: 5,
    min_clients: 3,
    window: Duration::from_secs(10),
    backoff: Duration::from_secs(5),
};
/// A plugin that logs a line per request at a hundred requests a second stays inside it; a
/// plugin logging in a loop writes at most 100 lines of at most 4 KiB a second (400 KiB/s),
/// not the megabytes per request it could within its deadline.
pub const DEFAULT_LOG_LINES_PER_SECOND: u32 = 100;
/// Envoy's default `message_timeout`.
pub const DEFAULT_ENVOY_MESSAGE_TIMEOUT: Duration = Duration::from_millis(200);
/// Envoy's default `max_request_headers_kb`.
pub const DEFAULT_ENVOY_MAX_HEADERS_KIB: u64 = 60;

/// The file as written. Unknown keys are errors: a misspelt setting must not be ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The ext_proc server's gRPC listener (server only).
    pub listen: Option<String>,
    /// The ext_proc server's admin listener (server only).
    pub admin_listen: Option<String>,
    /// A file holding the bearer token the admin listener's state-changing endpoints require
    /// (server only).
    pub admin_token_file: Option<PathBuf>,
    /// How long the ext_proc server drains at shutdown (server only).
    pub shutdown_grace_ms: Option<u64>,
    /// How long an ext_proc stream may go without a message before the server ends it (server
    /// only).
    pub stream_idle_timeout_ms: Option<u64>,
    /// TLS on the ext_proc server's listener (server only).
    pub tls: Option<FileTls>,
    /// Where the ext_proc server sends its spans (server only).
    pub tracing: Option<FileTracing>,
    /// Server only: live exchanges written down as exchange files.
    pub record: Option<FileRecord>,
    /// Server only: new streams refused while the server runs too far behind.
    pub overload: Option<FileOverload>,
    /// What the in-process module reads from Envoy for plugins (module only).
    #[serde(default)]
    pub module: FileModule,
    plugins_dir: Option<PathBuf>,
    watch: Option<bool>,
    #[serde(default)]
    runtime: FileRuntime,
    #[serde(default)]
    defaults: FilePluginSettings,
    #[serde(default)]
    plugins: BTreeMap<String, FilePluginSettings>,
    #[serde(default)]
    envoy: FileEnvoy,
    /// Named chains: the plugins directory's subdirectories.
    #[serde(default)]
    chains: BTreeMap<String, FileChain>,
    /// What a stream naming a chain that does not exist gets.
    unknown_chain: Option<UnknownChain>,
    /// Which plugins the host trusts.
    #[serde(default)]
    signing: FileSigning,
    /// `[kv]`: the state store.
    #[serde(default)]
    kv: FileKv,
    /// `[secrets]`: each secret's name and file.
    #[serde(default)]
    secrets: BTreeMap<String, PathBuf>,
}

/// `[kv]`: where plugins' state lives and how much of it there may be.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKv {
    backend: Option<KvBackend>,
    url: Option<String>,
    pool_size: Option<usize>,
    connect_timeout_ms: Option<u64>,
    prefix: Option<String>,
    timeout_ms: Option<u64>,
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    max_entries: Option<u64>,
    max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KvBackend {
    Memory,
    Redis,
}

impl FileKv {
    fn resolve(&self) -> Result<KvSettings, ConfigError> {
        let error = |m: String| ConfigError(format!("[kv] {m}"));
        let positive = |value: Option<u64>, key: &str, default: u64| match value {
            Some(0) => Err(error(format!("{key} must be at least 1"))),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let backend = match (self.backend.unwrap_or(KvBackend::Memory), &self.url) {
            (KvBackend::Memory, None) => Backend::Memory,
            (KvBackend::Memory, Some(_)) => {
                return Err(error("url is for backend = \"redis\"".into()));
            }
            (KvBackend::Redis, None) => {
                return Err(error(
                    "backend = \"redis\" needs url = \"redis://HOST:PORT\"".into(),
                ));
            }
            (KvBackend::Redis, Some(url)) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(error(format!(
                        "url {url:?} is not a redis:// or rediss:// URL"
                    )));
                }
                Backend::Redis {
                    url: url.clone(),
                    pool_size: positive(
                        self.pool_size.map(|n| n as u64),
                        "pool_size",
                        kv::DEFAULT_POOL_SIZE as u64,
                    )? as usize,
                    connect_timeout: Duration::from_millis(positive(
                        self.connect_timeout_ms,
                        "connect_timeout_ms",
                        kv::DEFAULT_CONNECT_TIMEOUT.as_millis() as u64,
                    )?),
                    prefix: match &self.prefix {
                        Some(prefix) => key_prefix(prefix).map_err(error)?,
                        None => kv::DEFAULT_PREFIX.into(),
                    },
                }
            }
        };
        if self.backend != Some(KvBackend::Redis)
            && (self.pool_size.is_some()
                || self.connect_timeout_ms.is_some()
                || self.prefix.is_some())
        {
            return Err(error(
                "pool_size, connect_timeout_ms and prefix are for backend = \"redis\"".into(),
            ));
        }
        let d = kv::DEFAULT_LIMITS;
        Ok(KvSettings {
            backend,
            timeout: Duration::from_millis(positive(
                self.timeout_ms,
                "timeout_ms",
                kv::DEFAULT_TIMEOUT.as_millis() as u64,
            )?),
            limits: Limits {
                max_key_bytes: positive(
                    self.max_key_bytes.map(|n| n as u64),
                    "max_key_bytes",
                    d.max_key_bytes as u64,
                )? as usize,
                max_value_bytes: positive(
                    self.max_value_bytes.map(|n| n as u64),
                    "max_value_bytes",
                    d.max_value_bytes as u64,
                )? as usize,
                max_entries: positive(self.max_entries, "max_entries", d.max_entries)?,
                max_bytes: positive(self.max_bytes, "max_bytes", d.max_bytes)?,
            },
        })
    }
}

/// `[kv] prefix`: a word that starts every Redis key of this host, so that it cannot spell a
/// hash tag or another Deployment's keys.
fn key_prefix(prefix: &str) -> Result<String, String> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if prefix.is_empty() || prefix.len() > 64 || !prefix.bytes().all(allowed) {
        return Err(format!(
            "prefix {prefix:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(prefix.into())
}

/// `[signing]`: the public keys plugins must be signed with.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSigning {
    #[serde(default)]
    require_signatures: bool,
    #[serde(default)]
    trusted_keys: Vec<PathBuf>,
}

/// Which plugins the host trusts (see [`crate::signing`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SigningSettings {
    /// Load only plugins signed by one of `trusted_keys`.
    pub require_signatures: bool,
    /// Public key files, read at every load.
    pub trusted_keys: Vec<PathBuf>,
}

/// `[chains.NAME]`: the chain in the plugins directory's subdirectory `NAME`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileChain {
    /// Envoy route names (the `xds.route_name` attribute) whose streams this chain serves.
    #[serde(default)]
    routes: Vec<String>,
    /// Settings of this chain's plugins, over `[plugins.NAME]` and `[defaults]`.
    #[serde(default)]
    plugins: BTreeMap<String, FilePluginSettings>,
}

/// What a stream naming a chain that does not exist gets (`unknown_chain`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownChain {
    /// The default chain, with a warning (once per name and load) and a count.
    #[default]
    Default,
    /// An answer from the host instead of the upstream's: 500, with
    /// `wasm_extproc_unknown_chain` in Envoy's access log.
    Reject,
}

/// A named chain's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainSettings {
    /// Envoy route names it serves.
    pub routes: Vec<String>,
    /// Its plugins' settings, by plugin name, resolved over `[plugins.NAME]` and `[defaults]`.
    pub plugins: BTreeMap<String, PluginSettings>,
}

/// The name the plugins directory's own `.wasm` files go by as a chain.
pub const DEFAULT_CHAIN: &str = "default";

/// `[tracing]`: OpenTelemetry spans over OTLP/gRPC, continuing Envoy's traces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTracing {
    /// The collector, as `http://host:4317`.
    pub otlp_endpoint: String,
    /// The spans' `service.name` (default `wasm-extproc`).
    pub service_name: Option<String>,
}

/// `[overload]`: when the ext_proc server refuses new streams to answer those in progress in
/// time.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOverload {
    /// New streams are refused (UNAVAILABLE) while work waits this long for a worker; 0:
    /// never (default: `[envoy] message_timeout_ms`).
    pub shed_after_ms: Option<u64>,
}

/// `[record]`: live exchanges written down in the exchange file format, to replay against a
/// candidate plugin (`wasm-extproc test --compare`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    /// Where recordings go, a file each.
    pub dir: PathBuf,
    /// Chains recorded from start-up; `POST /record` starts and stops any chain's.
    #[serde(default)]
    pub chains: Vec<String>,
    /// The share of a chain's exchanges recorded, above 0 and at most 1 (default 0.01).
    pub sample: Option<f64>,
    /// A recording ends after this many exchanges (default 1000)...
    pub max_exchanges: Option<u64>,
    /// ...or this many bytes written (default 16 MiB).
    pub max_bytes: Option<u64>,
    /// Keep bodies (left out by default).
    #[serde(default)]
    pub bodies: bool,
    /// Header names redacted besides `authorization`, `cookie`, `set-cookie`,
    /// `proxy-authorization` and `x-api-key`.
    #[serde(default)]
    pub redact_headers: Vec<String>,
    /// Attribute names redacted besides `request.headers`, `response.headers`,
    /// `response.trailers` and `request.query`.
    #[serde(default)]
    pub redact_attributes: Vec<String>,
    /// Metadata redacted besides the `envoy.filters.http.jwt_authn` namespace: `NAMESPACE` for
    /// a whole namespace, `NAMESPACE:KEY` for one key.
    #[serde(default)]
    pub redact_metadata: Vec<String>,
}

/// `[tls]`: the server's certificate, key and optional client CA, as paths.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// Client identities admitted, on top of `client_ca`: a certificate subject alternative
    /// name, DNS (`envoy.example.com`) or URI (`spiffe://cluster.local/ns/x/sa/y`), exactly.
    #[serde(default)]
    pub allowed_client_sans: Vec<String>,
}

/// `[module]`: what the in-process module reads from Envoy for each exchange. Over ext_proc,
/// Envoy's filter config says the same (`request_attributes`, `response_attributes`,
/// `metadata_options`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileModule {
    /// Attributes read with the request headers (`request.path`, `source.address`, ...).
    #[serde(default)]
    pub request_attributes: Vec<String>,
    /// Attributes read with the response headers (`response.code`, ...).
    #[serde(default)]
    pub response_attributes: Vec<String>,
    /// Dynamic metadata namespaces plugins may read (`context.metadata`).
    #[serde(default)]
    pub metadata_namespaces: Vec<String>,
    /// Origins plugins may call (`http_allow`) to the Envoy cluster that reaches each: their
    /// requests go out through Envoy's own HTTP callouts to that cluster. Other allowed
    /// origins are called from the module's own thread.
    #[serde(default)]
    pub http_clusters: BTreeMap<String, String>,
}

impl FileModule {
    pub fn is_empty(&self) -> bool {
        self.request_attributes.is_empty()
            && self.response_attributes.is_empty()
            && self.metadata_namespaces.is_empty()
            && self.http_clusters.is_empty()
    }
}

/// Settings of the Envoy filter in front of the host that the host must respect.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEnvoy {
    message_timeout_ms: Option<u64>,
    max_message_timeout_ms: Option<u64>,
    allow_all_routing: Option<bool>,
    allow_envoy_headers: Option<bool>,
    max_headers_kib: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRuntime {
    max_instances: Option<u32>,
    max_wasi_instances: Option<u32>,
    instance_wait_ms: Option<u64>,
    max_body_bytes_in_flight: Option<u64>,
    cache_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePluginSettings {
    config: Option<String>,
    failure_policy: Option<FailureMode>,
    failure_status: Option<u16>,
    timeout_ms: Option<u64>,
    memory_limit_mib: Option<u64>,
    breaker_threshold: Option<u32>,
    breaker_min_clients: Option<u32>,
    breaker_window_ms: Option<u64>,
    breaker_backoff_ms: Option<u64>,
    isolation: Option<Isolation>,
    log_lines_per_second: Option<u32>,
    mode: Option<PluginMode>,
    shadows: Option<String>,
    kv_namespaces: Option<Vec<String>>,
    http_allow: Option<Vec<String>>,
    http_max_concurrent: Option<u32>,
    http_max_response_bytes: Option<u64>,
    secrets: Option<Vec<String>>,
}

/// Whether a plugin's answers count (`serve`), or are only compared with another's (`shadow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum PluginMode {
    Serve,
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum FailureMode {
    FailOpen,
    FailClosed,
}

/// What a plugin's instance may carry from one exchange to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// A fresh instance for every exchange: nothing carries over. The default.
    #[default]
    Exchange,
    /// An instance that served an exchange without failing serves later ones: its memory and
    /// globals carry over. Saves instantiating per exchange; only for plugins that keep no
    /// per-exchange state of their own (see README).
    Reuse,
}

/// Settings given outside the file (the server's flags), which win over it, and a front end's
/// own defaults where the file is silent.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub plugins_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    /// `[runtime] max_instances` when the file does not set it, instead of
    /// [`DEFAULT_MAX_INSTANCES`].
    pub default_max_instances: Option<u32>,
    /// `[runtime] max_wasi_instances` when the file does not set it, instead of
    /// [`DEFAULT_MAX_WASI_INSTANCES`].
    pub default_max_wasi_instances: Option<u32>,
}

/// What the plugins, their runtime and the chain run with: validated, shared by both modes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub plugins_dir: PathBuf,
    /// Reload when the plugins directory (or the server's configuration file) changes.
    pub watch: bool,
    pub max_instances: u32,
    /// Of those, instances of plugins that import WASI (each keeps a fiber stack).
    pub max_wasi_instances: u32,
    /// How long a stream waits for a free instance before the failure policy applies.
    pub instance_wait: Duration,
    /// Body bytes all streams may hold at once ([`crate::bodies`]).
    pub max_body_bytes_in_flight: u64,
    /// Where compiled plugins are kept between restarts and reloads; `None`: compile every time.
    pub cache_dir: Option<PathBuf>,
    pub defaults: PluginSettings,
    /// Settings by plugin name (the file name without `.wasm`).
    pub plugins: BTreeMap<String, PluginSettings>,
    /// Named chains' settings, by chain name.
    pub chains: BTreeMap<String, ChainSettings>,
    pub unknown_chain: UnknownChain,
    pub signing: SigningSettings,
    pub envoy: EnvoySettings,
    /// `[kv]`: the state store plugins share.
    pub kv: KvSettings,
    /// `[secrets]`: the secrets plugins may be granted.
    pub secrets: SecretsSettings,
}

/// What the Envoy in front of the host is configured with. The host keeps its answers inside
/// these limits, so Envoy never rejects one the operator cannot explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoySettings {
    /// The ext_proc filter's `message_timeout`: how long Envoy waits for each answer.
    pub message_timeout: Duration,
    /// The ext_proc filter's `max_message_timeout`, if set: the host may ask for up to this
    /// much time (`override_message_timeout`) for a phase whose plugins' budgets add up to
    /// more than `message_timeout`.
    pub max_message_timeout: Option<Duration>,
    /// `mutation_rules.allow_all_routing`: may plugins change `host`, `:authority`,
    /// `:scheme` and `:method`?
    pub allow_all_routing: bool,
    /// `mutation_rules.allow_envoy`: may plugins change `x-envoy-*` headers?
    pub allow_envoy_headers: bool,
    /// `max_request_headers_kb` of the connection manager, in bytes.
    pub max_header_bytes: usize,
}

impl Default for EnvoySettings {
    fn default() -> Self {
        EnvoySettings {
            message_timeout: DEFAULT_ENVOY_MESSAGE_TIMEOUT,
            max_message_timeout: None,
            allow_all_routing: false,
            allow_envoy_headers: false,
            max_header_bytes: (DEFAULT_ENVOY_MAX_HEADERS_KIB << 10) as usize,
        }
    }
}

/// How one plugin runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSettings {
    /// Handed to the plugin verbatim through `host.config`.
    pub config: String,
    pub failure_policy: FailurePolicy,
    pub budget: Budget,
    /// When repeated failures quarantine the plugin.
    pub breaker: BreakerSettings,
    pub isolation: Isolation,
    /// Lines the plugin may write through `host.log` per second, in bursts of as many; the
    /// rest are dropped and counted.
    pub log_lines_per_second: u32,
    /// `mode = "shadow"`: the plugin of the same chain this one runs beside on live traffic,
    /// its output compared and never applied.
    pub shadows: Option<String>,
    /// Shared state store namespaces the plugin may open besides its own; plugins that list
    /// the same name share it.
    pub kv_namespaces: Vec<String>,
    /// What the plugin may call over HTTP (`wasi:http/outgoing-handler`).
    pub http: HttpSettings,
    /// The secrets it may read (`wasi:config/store`), by name; none by default.
    pub secrets: Vec<String>,
}

/// A plugin's outbound HTTP: where to, how many at once, how much back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// `http_allow`: the only origins it may call; none by default.
    pub allow: Vec<Origin>,
    /// `http_max_concurrent`: requests in flight at once, across all its instances.
    pub max_concurrent: u32,
    /// `http_max_response_bytes`: the largest response body it may read.
    pub max_response_bytes: u64,
}

pub const DEFAULT_HTTP_MAX_CONCURRENT: u32 = 16;
pub const DEFAULT_HTTP_MAX_RESPONSE_BYTES: u64 = 1 << 20;

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            allow: Vec::new(),
            max_concurrent: DEFAULT_HTTP_MAX_CONCURRENT,
            max_response_bytes: DEFAULT_HTTP_MAX_RESPONSE_BYTES,
        }
    }
}

/// A destination a plugin may call: scheme, host and port, as `http://authz.default.svc:8080`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub https: bool,
    /// Lower-case.
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// Parses `http[s]://host[:port]` (a trailing `/` is allowed, a path is not).
    pub fn parse(text: &str) -> Result<Origin, String> {
        let bad = |why: &str| format!("{text:?} is not an origin like http://host:port: {why}");
        let (https, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad("the scheme must be http or https"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(bad("no path, query or credentials"));
        }
        // An IPv6 address keeps its brackets; the port is what follows them.
        let split = match rest.find(']') {
            Some(end) => (&rest[..=end], &rest[end + 1..]),
            None => rest.split_at(rest.rfind(':').unwrap_or(rest.len())),
        };
        let (host, port) = match split {
            (host, "") => (host, if https { 443 } else { 80 }),
            (host, port) => match port.strip_prefix(':').map(str::parse::<u16>) {
                Some(Ok(port)) if port > 0 => (host, port),
                _ => return Err(bad("the port must be 1-65535")),
            },
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Origin {
            https,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether a request to `scheme`, `host` and `port` goes to this origin.
    pub fn matches(&self, https: bool, host: &str, port: u16) -> bool {
        self.https == https && self.port == port && self.host.eq_ignore_ascii_case(host)
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// What a plugin failure (trap, deadline, memory limit) does to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Continue as if the plugin had not run, and skip it for the rest of the stream.
    Open,
    /// Answer the client with this status; the chain stops.
    Closed { status: u16 },
}

/// The resources one handler call may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Wall-clock time for one handler call.
    pub timeout: Duration,
    /// Ceiling on the instance's linear memory.
    pub memory_limit_bytes: u64,
}

/// A configuration error, in one line a person can act on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl FileConfig {
    /// Parses a configuration file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end();
            let line = e
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1)
                .map(|line| format!(" (line {line})"))
                .unwrap_or_default();
            ConfigError(format!("config file {}{line}: {message}", origin.display()))
        })
    }

    /// The server-only keys this file sets, for a front end that has no use for them.
    pub fn server_keys(&self) -> Vec<&'static str> {
        [
            ("listen", self.listen.is_some()),
            ("admin_listen", self.admin_listen.is_some()),
            ("admin_token_file", self.admin_token_file.is_some()),
            ("shutdown_grace_ms", self.shutdown_grace_ms.is_some()),
            (
                "stream_idle_timeout_ms",
                self.stream_idle_timeout_ms.is_some(),
            ),
            ("[tls]", self.tls.is_some()),
            ("[tracing]", self.tracing.is_some()),
            ("[record]", self.record.is_some()),
            ("[overload]", self.overload.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    /// Validates the shared settings, with `overrides` over the file's.
    pub fn settings(&self, overrides: &Overrides) -> Result<Settings, ConfigError> {
        let base = PluginSettings {
            config: String::new(),
            failure_policy: FailurePolicy::Closed {
                status: DEFAULT_FAILURE_STATUS,
            },
            budget: Budget {
                timeout: DEFAULT_TIMEOUT,
                memory_limit_bytes: DEFAULT_MEMORY_LIMIT_MIB << 20,
            },
            breaker: DEFAULT_BREAKER,
            isolation: Isolation::Exchange,
            log_lines_per_second: DEFAULT_LOG_LINES_PER_SECOND,
            shadows: None,
            kv_namespaces: Vec::new(),
            http: HttpSettings::default(),
            secrets: Vec::new(),
        };
        let defaults = self
            .defaults
            .apply_to(&base)
            .map_err(|e| ConfigError(format!("[defaults]: {e}")))?;
        if defaults.shadows.is_some() {
            return Err(ConfigError(
                "[defaults]: mode = \"shadow\" is set per plugin, in [plugins.NAME]".into(),
            ));
        }
        let secrets = SecretsSettings::from_table(self.secrets.clone()).map_err(ConfigError)?;
        secrets
            .check_grant(&defaults.secrets)
            .map_err(|e| ConfigError(format!("[defaults]: {e}")))?;
        let plugins = self
            .plugins
            .iter()
            .map(|(name, settings)| {
                let resolved = settings
                    .apply_to(&defaults)
                    .and_then(|s| secrets.check_grant(&s.secrets).map(|()| s))
                    .map_err(|e| ConfigError(format!("[plugins.{name}]: {e}")))?;
                Ok((name.clone(), resolved))
            })
            .collect::<Result<BTreeMap<_, _>, ConfigError>>()?;
        let mut chains = BTreeMap::new();
        let mut route_owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (chain, file) in &self.chains {
            check_chain_name(chain)?;
            for route in &file.routes {
                if let Some(other) = route_owner.insert(route, chain) {
                    return Err(ConfigError(format!(
                        "route {route:?} is in the routes of both [chains.{other}] and \
                         [chains.{chain}]"
                    )));
                }
            }
            let plugins = file
                .plugins
                .iter()
                .map(|(name, settings)| {
                    let base = plugins.get(name).unwrap_or(&defaults);
                    let resolved = settings
                        .apply_to(base)
                        .and_then(|s| secrets.check_grant(&s.secrets).map(|()| s))
                        .map_err(|e| {
                            ConfigError(format!("[chains.{chain}.plugins.{name}]: {e}"))
                        })?;
                    Ok((name.clone(), resolved))
                })
                .collect::<Result<_, ConfigError>>()?;
            chains.insert(
                chain.clone(),
                ChainSettings {
                    routes: file.routes.clone(),
                    plugins,
                },
            );
        }
        let max_instances = self
            .runtime
            .max_instances
            .or(overrides.default_max_instances)
            .unwrap_or(DEFAULT_MAX_INSTANCES);
        if max_instances == 0 {
            return Err(ConfigError(
                "[runtime] max_instances must be at least 1".into(),
            ));
        }
        let max_wasi_instances = self.runtime.max_wasi_instances.unwrap_or_else(|| {
            overrides
                .default_max_wasi_instances
                .unwrap_or(DEFAULT_MAX_WASI_INSTANCES)
                .min(max_instances)
        });
        if max_wasi_instances > max_instances {
            return Err(ConfigError(format!(
                "[runtime] max_wasi_instances {max_wasi_instances} is above max_instances \
                 {max_instances}: WASI plugins' instances count among all instances"
            )));
        }
        let max_body_bytes_in_flight = self
            .runtime
            .max_body_bytes_in_flight
            .unwrap_or(crate::bodies::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT);
        let one_body = crate::bodies::MAX_HELD_BODY_BYTES as u64;
        if max_body_bytes_in_flight < one_body {
            return Err(ConfigError(format!(
                "[runtime] max_body_bytes_in_flight {max_body_bytes_in_flight} is below \
                 {one_body}, the largest body a plugin that takes bodies whole may be given: \
                 one such body would never fit"
            )));
        }
        Ok(Settings {
            max_body_bytes_in_flight,
            plugins_dir: overrides
                .plugins_dir
                .clone()
                .or_else(|| self.plugins_dir.clone())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PLUGINS_DIR)),
            watch: self.watch.unwrap_or(true),
            max_instances,
            max_wasi_instances,
            instance_wait: self
                .runtime
                .instance_wait_ms
                .map_or(DEFAULT_INSTANCE_WAIT, Duration::from_millis),
            cache_dir: overrides
                .cache_dir
                .clone()
                .or_else(|| self.runtime.cache_dir.clone()),
            defaults,
            plugins,
            chains,
            unknown_chain: self.unknown_chain.unwrap_or_default(),
            signing: SigningSettings {
                require_signatures: self.signing.require_signatures,
                trusted_keys: self.signing.trusted_keys.clone(),
            },
            envoy: self.envoy.resolve()?,
            kv: self.kv.resolve()?,
            secrets,
        })
    }
}

impl Settings {
    /// The settings of a file's text with nothing overridden; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Settings, ConfigError> {
        FileConfig::parse(text, origin)?.settings(&Overrides::default())
    }

    /// The settings for the plugin called `name` in `chain`: `[chains.CHAIN.plugins.NAME]`,
    /// else `[plugins.NAME]`, else `[defaults]`.
    pub fn settings_for(&self, chain: &str, name: &str) -> &PluginSettings {
        self.chains
            .get(chain)
            .and_then(|c| c.plugins.get(name))
            .or_else(|| self.plugins.get(name))
            .unwrap_or(&self.defaults)
    }

    /// The largest memory limit any plugin may have: the pooling allocator reserves this much
    /// address space per instance.
    pub fn max_memory_limit_bytes(&self) -> u64 {
        self.plugins
            .values()
            .chain(self.chains.values().flat_map(|c| c.plugins.values()))
            .chain([&self.defaults])
            .map(|s| s.budget.memory_limit_bytes)
            .max()
            .unwrap_or(DEFAULT_MEMORY_LIMIT_MIB << 20)
    }
}

/// A chain's name is a directory name in the plugins directory, and a label value.
fn check_chain_name(name: &str) -> Result<(), ConfigError> {
    if name == DEFAULT_CHAIN {
        return Err(ConfigError(format!(
            "[chains.{DEFAULT_CHAIN}]: that is the name of the plugins directory's own files; \
             give their settings in [plugins.NAME]"
        )));
    }
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) {
        return Err(ConfigError(format!(
            "[chains.{name}]: a chain is a subdirectory of the plugins directory; {name:?} \
             cannot name one"
        )));
    }
    Ok(())
}

impl FileEnvoy {
    fn resolve(&self) -> Result<EnvoySettings, ConfigError> {
        let defaults = EnvoySettings::default();
        let message_timeout = match self.message_timeout_ms {
            Some(0) => {
                return Err(ConfigError(
                    "[envoy] message_timeout_ms must be at least 1".into(),
                ));
            }
            Some(ms) => Duration::from_millis(ms),
            None => defaults.message_timeout,
        };
        let max_message_timeout = match self.max_message_timeout_ms {
            Some(ms) if Duration::from_millis(ms) < message_timeout => {
                return Err(ConfigError(format!(
                    "[envoy] max_message_timeout_ms {ms} is below message_timeout_ms {}",
                    message_timeout.as_millis()
                )));
            }
            Some(ms) => Some(Duration::from_millis(ms)),
            None => None,
        };
        let max_header_bytes = match self.max_headers_kib {
            Some(kib) if !(1..=8192).contains(&kib) => {
                return Err(ConfigError(format!(
                    "[envoy] max_headers_kib {kib} is outside 1-8192"
                )));
            }
            Some(kib) => (kib << 10) as usize,
            None => defaults.max_header_bytes,
        };
        Ok(EnvoySettings {
            message_timeout,
            max_message_timeout,
            allow_all_routing: self.allow_all_routing.unwrap_or(false),
            allow_envoy_headers: self.allow_envoy_headers.unwrap_or(false),
            max_header_bytes,
        })
    }
}

impl FilePluginSettings {
    fn apply_to(&self, base: &PluginSettings) -> Result<PluginSettings, String> {
        let status = match self.failure_status {
            Some(status) if !(200..=599).contains(&status) => {
                return Err(format!(
                    "failure_status {status} is not an HTTP status (200-599)"
                ));
            }
            Some(status) => status,
            None => match base.failure_policy {
                FailurePolicy::Closed { status } => status,
                FailurePolicy::Open => DEFAULT_FAILURE_STATUS,
            },
        };
        let failure_policy = match self.failure_policy {
            Some(FailureMode::FailOpen) => FailurePolicy::Open,
            Some(FailureMode::FailClosed) => FailurePolicy::Closed { status },
            None => match base.failure_policy {
                FailurePolicy::Open => FailurePolicy::Open,
                FailurePolicy::Closed { .. } => FailurePolicy::Closed { status },
            },
        };
        let timeout = match self.timeout_ms {
            Some(0) => return Err("timeout_ms must be at least 1".into()),
            Some(ms) if Duration::from_millis(ms) > MAX_TIMEOUT => {
                return Err(format!(
                    "timeout_ms {ms} is above the {} ms ceiling",
                    MAX_TIMEOUT.as_millis()
                ));
            }
            Some(ms) => Duration::from_millis(ms),
            None => base.budget.timeout,
        };
        let memory_limit_bytes = match self.memory_limit_mib {
            Some(mib) if !(1..=MAX_MEMORY_LIMIT_MIB).contains(&mib) => {
                return Err(format!(
                    "memory_limit_mib {mib} is outside 1-{MAX_MEMORY_LIMIT_MIB}"
                ));
            }
            Some(mib) => mib << 20,
            None => base.budget.memory_limit_bytes,
        };
        let millis = |value: Option<u64>, key: &str, base: Duration| match value {
            Some(0) => Err(format!("{key} must be at least 1")),
            Some(ms) => Ok(Duration::from_millis(ms)),
            None => Ok(base),
        };
        let breaker = BreakerSettings {
            threshold: self.breaker_threshold.unwrap_or(base.breaker.threshold),
            min_clients: self.breaker_min_clients.unwrap_or(base.breaker.min_clients),
            window: millis(
                self.breaker_window_ms,
                "breaker_window_ms",
                base.breaker.window,
            )?,
            backoff: millis(
                self.breaker_backoff_ms,
                "breaker_backoff_ms",
                base.breaker.backoff,
            )?,
        };
        Ok(PluginSettings {
            config: self.config.clone().unwrap_or_else(|| base.config.clone()),
            failure_policy,
            budget: Budget {
                timeout,
                memory_limit_bytes,
            },
            breaker,
            isolation: self.isolation.unwrap_or(base.isolation),
            log_lines_per_second: self
                .log_lines_per_second
                .unwrap_or(base.log_lines_per_second),
            shadows: match (self.mode, &self.shadows) {
                (Some(PluginMode::Shadow), Some(target)) => Some(target.clone()),
                (Some(PluginMode::Shadow), None) => {
                    return Err(
                        "mode = \"shadow\" needs shadows = \"PLUGIN\", the plugin it \
                                runs beside"
                            .into(),
                    );
                }
                (Some(PluginMode::Serve) | None, Some(_)) => {
                    return Err("shadows = ... is for mode = \"shadow\"".into());
                }
                (Some(PluginMode::Serve), None) => None,
                (None, None) => base.shadows.clone(),
            },
            kv_namespaces: match &self.kv_namespaces {
                Some(names) => {
                    if let Some(bad) = names
                        .iter()
                        .find(|n| kv::OWN_NAMESPACE.contains(&n.as_str()))
                    {
                        return Err(format!(
                            "kv_namespaces: {bad:?} names the plugin's own namespace, which is \
                             never shared"
                        ));
                    }
                    names.clone()
                }
                None => base.kv_namespaces.clone(),
            },
            http: HttpSettings {
                allow: match &self.http_allow {
                    Some(origins) => origins
                        .iter()
                        .map(|o| Origin::parse(o).map_err(|e| format!("http_allow: {e}")))
                        .collect::<Result<_, _>>()?,
                    None => base.http.allow.clone(),
                },
                max_concurrent: match self.http_max_concurrent {
                    Some(0) => return Err("http_max_concurrent must be at least 1".into()),
                    Some(n) => n,
                    None => base.http.max_concurrent,
                },
                max_response_bytes: self
                    .http_max_response_bytes
                    .unwrap_or(base.http.max_response_bytes),
            },
            secrets: self.secrets.clone().unwrap_or_else(|| base.secrets.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn shadow_mode_names_its_plugin_and_is_set_per_plugin() {
        let settings =
            parse("[plugins.20-v2]\nmode = \"shadow\"\nshadows = \"10-auth\"\n").unwrap();
        assert_eq!(
            settings.plugins["20-v2"].shadows.as_deref(),
            Some("10-auth")
        );
        assert_eq!(settings.defaults.shadows, None);
        for (text, expected) in [
            ("[plugins.x]\nmode = \"shadow\"\n", "needs shadows = "),
            ("[plugins.x]\nshadows = \"y\"\n", "is for mode = \"shadow\""),
            (
                "[defaults]\nmode = \"shadow\"\nshadows = \"y\"\n",
                "[defaults]: mode = \"shadow\" is set per plugin",
            ),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn plugins_call_out_only_to_the_origins_they_are_allowed() {
        assert!(parse("").unwrap().defaults.http.allow.is_empty());
        let settings = parse(
            "[plugins.a]\nhttp_allow = [\"http://Authz.default.svc:8080\", \"https://idp/\"]\n\
             http_max_concurrent = 4\n",
        )
        .unwrap();
        let http = &settings.plugins["a"].http;
        assert_eq!(
            http.allow.iter().map(|o| o.to_string()).collect::<Vec<_>>(),
            ["http://authz.default.svc:8080", "https://idp:443"]
        );
        assert!(http.allow[0].matches(false, "AUTHZ.default.svc", 8080));
        assert!(!http.allow[0].matches(true, "authz.default.svc", 8080));
        assert!(!http.allow[1].matches(true, "idp", 8443));
        assert_eq!(http.max_concurrent, 4);
        assert_eq!(
            Origin::parse("http://[::1]:9000").unwrap().to_string(),
            "http://[::1]:9000"
        );
        assert_eq!(Origin::parse("http://[::1]").unwrap().port, 80);
        for (text, expected) in [
            ("ftp://x", "the scheme must be http or https"),
            ("http://x/path", "no path, query or credentials"),
            ("http://user@x", "no path, query or credentials"),
            ("http://x:0", "the port must be 1-65535"),
            ("http://:80", "no host"),
        ] {
            let error = parse(&format!("[plugins.a]\nhttp_allow = [{text:?}]\n"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("[plugins.a]: http_allow: {text:?}"))
                    && error.contains(expected),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn the_state_store_is_in_memory_unless_redis_is_named() {
        assert_eq!(parse("").unwrap().kv, KvSettings::default());
        let settings = parse(
            "[kv]\nbackend = \"redis\"\nurl = \"redis://r:6379\"\npool_size = 2\n\
             timeout_ms = 5\nmax_entries = 10\n[plugins.a]\nkv_namespaces = [\"tokens\"]\n",
        )
        .unwrap();
        assert_eq!(
            settings.kv.backend,
            Backend::Redis {
                url: "redis://r:6379".into(),
                pool_size: 2,
                connect_timeout: kv::DEFAULT_CONNECT_TIMEOUT,
                prefix: kv::DEFAULT_PREFIX.into(),
            }
        );
        assert_eq!(settings.kv.timeout, Duration::from_millis(5));
        let named = parse(
            "[kv]
backend = \"redis\"
url = \"redis://r\"
prefix = \"shop-a\"
",
        );
        assert!(matches!(
            named.unwrap().kv.backend,
            Backend::Redis { prefix, .. } if prefix == "shop-a"
        ));
        assert_eq!(settings.kv.limits.max_entries, 10);
        assert_eq!(settings.plugins["a"].kv_namespaces, ["tokens"]);
        for (text, expected) in [
            (
                "[kv]\nbackend = \"redis\"\n",
                "[kv] backend = \"redis\" needs url",
            ),
            (
                "[kv]\nurl = \"redis://r\"\n",
                "[kv] url is for backend = \"redis\"",
            ),
            (
                "[kv]\nbackend = \"redis\"\nurl = \"http://r\"\n",
                "is not a redis:// or rediss:// URL",
            ),
            ("[kv]\npool_size = 3\n", "are for backend = \"redis\""),
            ("[kv]\nprefix = \"a\"\n", "are for backend = \"redis\""),
            (
                "[kv]\nbackend = \"redis\"\nurl = \"redis://r\"\nprefix = \"a}b\"\n",
                "[kv] prefix \"a}b\" must be 1 to 64 characters",
            ),
            (
                "[kv]\nmax_entries = 0\n",
                "[kv] max_entries must be at least 1",
            ),
            ("[kv]\nbackend = \"etcd\"\n", "unknown variant `etcd`"),
            (
                "[plugins.a]\nkv_namespaces = [\"default\"]\n",
                "[plugins.a]: kv_namespaces: \"default\" names the plugin's own namespace",
            ),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let settings = parse("").unwrap();
        assert!(settings.watch);
        assert_eq!(settings.plugins_dir, Path::new(DEFAULT_PLUGINS_DIR));
        assert_eq!(settings.max_instances, DEFAULT_MAX_INSTANCES);
        assert_eq!(
            settings
                .settings_for(DEFAULT_CHAIN, "anything")
                .failure_policy,
            FailurePolicy::Closed { status: 500 }
        );
        assert_eq!(
            settings
                .settings_for(DEFAULT_CHAIN, "anything")
                .budget
                .timeout,
            DEFAULT_TIMEOUT
        );
    }

    #[test]
    fn plugin_tables_inherit_from_defaults() {
        let settings = parse(
            r#"
            [defaults]
            failure_status = 503
            timeout_ms = 5
            [plugins.a]
            config = "x"
            [plugins.b]
            failure_policy = "fail-open"
            memory_limit_mib = 8
            "#,
        )
        .unwrap();
        let a = settings.settings_for(DEFAULT_CHAIN, "a");
        assert_eq!(a.config, "x");
        assert_eq!(a.failure_policy, FailurePolicy::Closed { status: 503 });
        assert_eq!(a.budget.timeout, Duration::from_millis(5));
        let b = settings.settings_for(DEFAULT_CHAIN, "b");
        assert_eq!(b.failure_policy, FailurePolicy::Open);
        assert_eq!(b.budget.memory_limit_bytes, 8 << 20);
        assert_eq!(
            settings.max_memory_limit_bytes(),
            DEFAULT_MEMORY_LIMIT_MIB << 20
        );
    }

    #[test]
    fn a_chains_plugin_settings_fall_back_to_the_plugins_then_the_defaults() {
        let settings = parse(
            r#"
            unknown_chain = "reject"
            [defaults]
            timeout_ms = 5
            [plugins.auth]
            config = "everyone"
            failure_policy = "fail-open"
            [chains.checkout]
            routes = ["checkout", "cart"]
            [chains.checkout.plugins.auth]
            config = "checkout"
            memory_limit_mib = 96
            "#,
        )
        .unwrap();
        assert_eq!(settings.unknown_chain, UnknownChain::Reject);
        let checkout = settings.settings_for("checkout", "auth");
        assert_eq!(checkout.config, "checkout");
        assert_eq!(checkout.failure_policy, FailurePolicy::Open);
        assert_eq!(checkout.budget.timeout, Duration::from_millis(5));
        assert_eq!(
            settings.settings_for(DEFAULT_CHAIN, "auth").config,
            "everyone"
        );
        assert_eq!(settings.settings_for("checkout", "other").config, "");
        assert_eq!(settings.chains["checkout"].routes, ["checkout", "cart"]);
        // The pool reserves address space for the largest memory limit of any chain.
        assert_eq!(settings.max_memory_limit_bytes(), 96 << 20);
        assert_eq!(parse("").unwrap().unknown_chain, UnknownChain::Default);
    }

    #[test]
    fn chains_are_checked() {
        let error = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(
            error("[chains.a]\nroutes = [\"r\"]\n[chains.b]\nroutes = [\"r\"]\n"),
            "route \"r\" is in the routes of both [chains.a] and [chains.b]"
        );
        assert!(
            error("[chains.default.plugins.x]\nconfig = \"y\"\n")
                .starts_with("[chains.default]: that is the name of"),
        );
        assert!(error("[chains.\"..data\"]\n").contains("cannot name one"));
        assert!(
            error("[chains.c.plugins.x]\ntimeout_ms = 0\n").starts_with("[chains.c.plugins.x]: "),
        );
        assert!(error("unknown_chain = \"ignore\"\n").contains("unknown variant `ignore`"));
        assert!(error("[chains.c]\nroute = [\"r\"]\n").contains("unknown field `route`"));
    }

    #[test]
    fn overrides_win_over_the_file() {
        let file = FileConfig::parse(
            "plugins_dir = \"/from/file\"\n[runtime]\ncache_dir = \"/cache/file\"\n",
            Path::new("test.toml"),
        )
        .unwrap();
        let settings = file
            .settings(&Overrides {
                plugins_dir: Some("/from/flag".into()),
                default_max_instances: Some(100),
                default_max_wasi_instances: Some(10),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(settings.plugins_dir, Path::new("/from/flag"));
        assert_eq!(
            settings.cache_dir.as_deref(),
            Some(Path::new("/cache/file"))
        );
        assert_eq!(
            (settings.max_instances, settings.max_wasi_instances),
            (100, 10)
        );
        let file =
            FileConfig::parse("[runtime]\nmax_instances = 5\n", Path::new("test.toml")).unwrap();
        let settings = file
            .settings(&Overrides {
                default_max_instances: Some(100),
                default_max_wasi_instances: Some(10),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(
            (settings.max_instances, settings.max_wasi_instances),
            (5, 5)
        );
    }

    #[test]
    fn each_front_end_sees_the_keys_only_the_other_uses() {
        let file = FileConfig::parse(
            "listen = \"0.0.0.0:9002\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n\
             [module]\nrequest_attributes = [\"request.path\"]\n",
            Path::new("test.toml"),
        )
        .unwrap();
        assert_eq!(file.server_keys(), ["listen", "[tls]"]);
        assert_eq!(file.module.request_attributes, ["request.path"]);
        assert!(!file.module.is_empty());
        assert!(FileModule::default().is_empty());
    }

    #[test]
    fn errors_name_the_file_line_and_setting() {
        let err = parse("watch = true\nplugin_dir = \"/x\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("config file test.toml (line 2): unknown field `plugin_dir`"),
            "{text}"
        );

        let err = parse("[plugins.auth]\nfailure_status = 42\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "[plugins.auth]: failure_status 42 is not an HTTP status (200-599)"
        );

        let err = parse("[defaults]\ntimeout_ms = 0\n").unwrap_err();
        assert_eq!(err.to_string(), "[defaults]: timeout_ms must be at least 1");

        let err = parse("[defaults]\nfailure_policy = \"maybe\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown variant `maybe`"), "{err}");

        let err = parse("[runtime]\nmax_instances = 0\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "[runtime] max_instances must be at least 1"
        );
    }
}
