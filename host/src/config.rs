//! Configuration: command-line flags over an optional TOML file, parsed once into types that
//! cannot hold a wrong value. Everything downstream takes a [`Config`] and never re-checks it.
//!
//! ```toml
//! listen = "0.0.0.0:9002"      # or "unix:/run/wasm-extproc/ext_proc.sock"
//! admin_listen = "0.0.0.0:9003" # health, metrics, plugins, reload; "off" to disable
//! plugins_dir = "/plugins"
//! watch = true                  # reload when plugins or this file change
//! shutdown_grace_ms = 15000     # in-flight streams may finish this long after SIGTERM
//!
//! [tls]                         # TLS on the gRPC listener; client_ca makes it mutual
//! cert = "/etc/wasm-extproc/tls.crt"
//! key = "/etc/wasm-extproc/tls.key"
//! client_ca = "/etc/wasm-extproc/ca.crt"
//!
//! [defaults]                   # every plugin, unless its own table says otherwise
//! failure_policy = "fail-closed"
//! failure_status = 500
//! timeout_ms = 20
//! memory_limit_mib = 32
//! breaker_threshold = 5        # failures in a row that quarantine a plugin; 0 = never
//! breaker_window_ms = 10000
//! breaker_backoff_ms = 5000
//! isolation = "exchange"       # or "reuse": keep instances across exchanges (see README)
//!
//! [plugins.10-auth]            # keyed by file name without `.wasm`
//! config = '{"realm": "api"}'
//! failure_policy = "fail-open"
//!
//! [envoy]                      # what the Envoy ext_proc filter in front is configured with
//! message_timeout_ms = 200
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

pub use crate::breaker::BreakerSettings;

/// Where the guide's Go server listens, and so where Envoy configs for it already point.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9002";
/// Health, readiness, metrics and the plugin list. Beside ext_proc's 9002, clear of Envoy's
/// own admin port (9901) and of the 15000-range Istio's sidecar uses.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9003";
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
/// How long shutdown waits for in-flight streams: inside Kubernetes' default 30-second
/// termination grace period, with room for a preStop hook.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// Five crashes in a row is a crash loop, not bad luck: a plugin that fails 1% of calls gets
/// five in a row about once in ten billion calls.
pub const DEFAULT_BREAKER: BreakerSettings = BreakerSettings {
    threshold: 5,
    window: Duration::from_secs(10),
    backoff: Duration::from_secs(5),
};
/// Envoy's default `message_timeout`.
pub const DEFAULT_ENVOY_MESSAGE_TIMEOUT: Duration = Duration::from_millis(200);
/// Envoy's default `max_request_headers_kb`.
pub const DEFAULT_ENVOY_MAX_HEADERS_KIB: u64 = 60;

/// Command-line flags. Each overrides the same setting in the file.
#[derive(Debug, Parser)]
#[command(
    name = "wasm-extproc",
    version,
    about = "Envoy ext_proc server running WebAssembly component plugins"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "WASM_EXTPROC_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Address of the gRPC listener: host:port or unix:/path [default: 0.0.0.0:9002].
    #[arg(long, env = "WASM_EXTPROC_LISTEN", global = true)]
    pub listen: Option<ListenAddr>,
    /// Address of the admin HTTP listener, or "off" [default: 0.0.0.0:9003].
    #[arg(long, env = "WASM_EXTPROC_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<AdminListen>,
    /// Directory for compiled plugins, so restarts and reloads skip compiling what they have
    /// seen [default: none].
    #[arg(long, env = "WASM_EXTPROC_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Directory of `.wasm` component plugins, run in file-name order [default: /plugins].
    #[arg(long, env = "WASM_EXTPROC_PLUGINS_DIR", global = true)]
    pub plugins_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "WASM_EXTPROC_LOG_FORMAT", global = true)]
    pub log_format: LogFormat,
}

/// What to do. Without a command, the host serves.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Check the configuration and every plugin (compile, link, contract version, register)
    /// without serving; exits 0 when all is well. For plugin repositories' CI.
    Check,
}

/// Where the gRPC listener listens: TCP, or a Unix domain socket for Envoy in the same pod
/// (Envoy's `pipe` address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path".into()),
            Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
            None => text
                .parse()
                .map(ListenAddr::Tcp)
                .map_err(|_| format!("{text:?} is neither host:port nor unix:/path")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(address) => write!(f, "{address}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The admin listener's address, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

impl FromStr for AdminListen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "off" {
            return Ok(AdminListen(None));
        }
        text.parse()
            .map(|a| AdminListen(Some(a)))
            .map_err(|_| format!("{text:?} is neither host:port nor \"off\""))
    }
}

fn from_str<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let text: Option<String> = Option::deserialize(deserializer)?;
    text.map(|t| t.parse().map_err(serde::de::Error::custom))
        .transpose()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What the file may say. Unknown keys are errors: a misspelt setting must not be ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default, deserialize_with = "from_str")]
    listen: Option<ListenAddr>,
    #[serde(default, deserialize_with = "from_str")]
    admin_listen: Option<AdminListen>,
    plugins_dir: Option<PathBuf>,
    watch: Option<bool>,
    shutdown_grace_ms: Option<u64>,
    tls: Option<FileTls>,
    #[serde(default)]
    runtime: FileRuntime,
    #[serde(default)]
    defaults: FilePluginSettings,
    #[serde(default)]
    plugins: BTreeMap<String, FilePluginSettings>,
    #[serde(default)]
    envoy: FileEnvoy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
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
    breaker_window_ms: Option<u64>,
    breaker_backoff_ms: Option<u64>,
    isolation: Option<Isolation>,
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

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenAddr,
    /// The admin HTTP listener; `None` when off.
    pub admin_listen: Option<SocketAddr>,
    pub plugins_dir: PathBuf,
    /// The configuration file, if any: watched and re-read on reload.
    pub file: Option<PathBuf>,
    /// Reload when the plugins directory or the configuration file changes.
    pub watch: bool,
    /// How long in-flight streams may run on after SIGTERM.
    pub shutdown_grace: Duration,
    pub tls: Option<TlsSettings>,
    pub max_instances: u32,
    /// Of those, instances of plugins that import WASI (each keeps a fiber stack).
    pub max_wasi_instances: u32,
    /// How long a stream waits for a free instance before the failure policy applies.
    pub instance_wait: Duration,
    /// Where compiled plugins are kept between restarts and reloads; `None`: compile every time.
    pub cache_dir: Option<PathBuf>,
    pub defaults: PluginSettings,
    /// Settings by plugin name (the file name without `.wasm`).
    pub plugins: BTreeMap<String, PluginSettings>,
    pub envoy: EnvoySettings,
}

/// TLS for the gRPC listener, read when the configuration is loaded.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// What the Envoy ext_proc filter in front of the host is configured with. The host keeps its
/// answers inside these limits, so Envoy never rejects one the operator cannot explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoySettings {
    /// The filter's `message_timeout`: how long Envoy waits for each answer.
    pub message_timeout: Duration,
    /// The filter's `max_message_timeout`, if set: the host may ask for up to this much time
    /// (`override_message_timeout`) for a phase whose plugins' budgets add up to more than
    /// `message_timeout`.
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
pub struct ConfigError(String);

impl Config {
    /// Reads the file (if any) and applies the flags over it.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config file {}: {e}", path.display()))
                })?;
                Self::parse_file(&text, path)?
            }
            None => FileConfig::default(),
        };
        let mut config = Self::from_parts(file, cli)?;
        config.file = cli.config.clone();
        Ok(config)
    }

    /// Parses a configuration file's text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let file = Self::parse_file(text, origin)?;
        Self::from_parts(file, &Cli::parse_from(["wasm-extproc"]))
    }

    fn parse_file(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
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

    fn from_parts(file: FileConfig, cli: &Cli) -> Result<Config, ConfigError> {
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
        };
        let defaults = file
            .defaults
            .apply_to(&base)
            .map_err(|e| ConfigError(format!("[defaults]: {e}")))?;
        let plugins = file
            .plugins
            .into_iter()
            .map(|(name, settings)| {
                let resolved = settings
                    .apply_to(&defaults)
                    .map_err(|e| ConfigError(format!("[plugins.{name}]: {e}")))?;
                Ok((name, resolved))
            })
            .collect::<Result<_, ConfigError>>()?;
        let max_instances = file.runtime.max_instances.unwrap_or(DEFAULT_MAX_INSTANCES);
        if max_instances == 0 {
            return Err(ConfigError(
                "[runtime] max_instances must be at least 1".into(),
            ));
        }
        let max_wasi_instances = file
            .runtime
            .max_wasi_instances
            .unwrap_or(DEFAULT_MAX_WASI_INSTANCES.min(max_instances));
        if max_wasi_instances > max_instances {
            return Err(ConfigError(format!(
                "[runtime] max_wasi_instances {max_wasi_instances} is above max_instances \
                 {max_instances}: WASI plugins' instances count among all instances"
            )));
        }
        let instance_wait = file
            .runtime
            .instance_wait_ms
            .map_or(DEFAULT_INSTANCE_WAIT, Duration::from_millis);
        let envoy = file.envoy.resolve()?;
        let tls = file.tls.as_ref().map(FileTls::read).transpose()?;
        Ok(Config {
            listen: cli
                .listen
                .clone()
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address")),
            admin_listen: cli
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.parse().expect("valid default address"))
                .0,
            file: None,
            watch: file.watch.unwrap_or(true),
            shutdown_grace: file
                .shutdown_grace_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            tls,
            plugins_dir: cli
                .plugins_dir
                .clone()
                .or(file.plugins_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PLUGINS_DIR)),
            max_instances,
            max_wasi_instances,
            instance_wait,
            cache_dir: cli.cache_dir.clone().or(file.runtime.cache_dir),
            defaults,
            plugins,
            envoy,
        })
    }

    /// The settings for the plugin called `name`.
    pub fn settings_for(&self, name: &str) -> &PluginSettings {
        self.plugins.get(name).unwrap_or(&self.defaults)
    }

    /// The largest memory limit any plugin may have: the pooling allocator reserves this much
    /// address space per instance.
    pub fn max_memory_limit_bytes(&self) -> u64 {
        self.plugins
            .values()
            .chain([&self.defaults])
            .map(|s| s.budget.memory_limit_bytes)
            .max()
            .unwrap_or(DEFAULT_MEMORY_LIMIT_MIB << 20)
    }
}

impl FileTls {
    fn read(&self) -> Result<TlsSettings, ConfigError> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|e| ConfigError(format!("[tls]: cannot read {}: {e}", path.display())))
        };
        Ok(TlsSettings {
            cert_pem: read(&self.cert)?,
            key_pem: read(&self.key)?,
            client_ca_pem: self.client_ca.as_deref().map(read).transpose()?,
        })
    }
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(
            config.admin_listen,
            Some(DEFAULT_ADMIN_LISTEN.parse().unwrap())
        );
        assert!(config.watch);
        assert_eq!(config.tls, None);
        assert_eq!(config.plugins_dir, Path::new(DEFAULT_PLUGINS_DIR));
        assert_eq!(
            config.settings_for("anything").failure_policy,
            FailurePolicy::Closed { status: 500 }
        );
        assert_eq!(
            config.settings_for("anything").budget.timeout,
            DEFAULT_TIMEOUT
        );
    }

    #[test]
    fn listeners_take_tcp_unix_and_off() {
        let config = parse("listen = \"unix:/run/x.sock\"\nadmin_listen = \"off\"\n").unwrap();
        assert_eq!(config.listen, ListenAddr::Unix("/run/x.sock".into()));
        assert_eq!(config.admin_listen, None);
        let err = parse("listen = \"nowhere\"\n").unwrap_err();
        assert!(
            err.to_string().contains("neither host:port nor unix:/path"),
            "{err}"
        );
        let err = parse("[tls]\ncert = \"/no/cert\"\nkey = \"/no/key\"\n").unwrap_err();
        assert!(
            err.to_string().starts_with("[tls]: cannot read /no/cert: "),
            "{err}"
        );
    }

    #[test]
    fn plugin_tables_inherit_from_defaults() {
        let config = parse(
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
        let a = config.settings_for("a");
        assert_eq!(a.config, "x");
        assert_eq!(a.failure_policy, FailurePolicy::Closed { status: 503 });
        assert_eq!(a.budget.timeout, Duration::from_millis(5));
        let b = config.settings_for("b");
        assert_eq!(b.failure_policy, FailurePolicy::Open);
        assert_eq!(b.budget.memory_limit_bytes, 8 << 20);
        assert_eq!(
            config.max_memory_limit_bytes(),
            DEFAULT_MEMORY_LIMIT_MIB << 20
        );
    }

    #[test]
    fn errors_name_the_file_line_and_setting() {
        let err = parse("listen = \"0.0.0.0:9002\"\nplugin_dir = \"/x\"\n").unwrap_err();
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
    }
}
