//! The ext_proc server's configuration: command-line flags over an optional TOML file.
//!
//! The file is the one both modes read ([`wasm_extproc_core::config`] documents the plugin,
//! runtime and Envoy settings); the server adds its listeners, TLS and shutdown grace:
//!
//! ```toml
//! listen = "0.0.0.0:9002"       # or "unix:/run/wasm-extproc/ext_proc.sock"
//! admin_listen = "0.0.0.0:9003" # health, metrics, plugins, reload; "off" to disable
//! admin_token_file = "/etc/wasm-extproc/admin/token" # POST /reload then needs it as a
//!                               # bearer token; without one, only 127.0.0.1 and ::1 may POST
//! shutdown_grace_ms = 15000     # in-flight streams may finish this long after SIGTERM
//! stream_idle_timeout_ms = 300000 # a stream with no message from Envoy this long is ended
//!
//! [tls]                         # TLS on the gRPC listener; client_ca makes it mutual
//! cert = "/etc/wasm-extproc/tls.crt"
//! key = "/etc/wasm-extproc/tls.key"
//! client_ca = "/etc/wasm-extproc/ca.crt"
//! allowed_client_sans = ["spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]
//!
//! [tracing]                     # OpenTelemetry spans, continuing Envoy's traces
//! otlp_endpoint = "http://otel-collector:4317"
//!
//! [overload]                    # new streams refused (UNAVAILABLE) while work waits this
//! shed_after_ms = 200           # long for a worker; 0 = never; default: [envoy]
//!                               # message_timeout_ms (ext_proc::overload)
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

pub use wasm_extproc_core::config::*;

/// Where the guide's Go server listens, and so where Envoy configs for it already point.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9002";
/// Health, readiness, metrics and the plugin list. Beside ext_proc's 9002, clear of Envoy's
/// own admin port (9901) and of the 15000-range Istio's sidecar uses.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9003";
/// How long shutdown waits for in-flight streams: inside Kubernetes' default 30-second
/// termination grace period, with room for a preStop hook.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// How long a stream may wait for Envoy's next message: Envoy's own HTTP `stream_idle_timeout`
/// default, after which Envoy itself would have reset a request that quiet. Any shorter would
/// end streams Envoy still serves (a slow upstream, a long poll); a stream that waits longer
/// holds its plugins' instances for nothing.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The help heading of the server's own flags: accepted anywhere on the command line (scripts
/// pass `check ... --admin-listen off`), and set apart in every subcommand's help, which they do
/// not change.
const SERVING: &str = "Serving (without a subcommand; the others ignore these)";

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
    #[arg(long, env = "WASM_EXTPROC_LISTEN", global = true, help_heading = SERVING)]
    pub listen: Option<ListenAddr>,
    /// Address of the admin HTTP listener, or "off" [default: 0.0.0.0:9003].
    #[arg(long, env = "WASM_EXTPROC_ADMIN_LISTEN", global = true, help_heading = SERVING)]
    pub admin_listen: Option<AdminListen>,
    /// File holding the bearer token `POST /reload` requires [default: none: only local
    /// connections may POST].
    #[arg(long, env = "WASM_EXTPROC_ADMIN_TOKEN_FILE", global = true, help_heading = SERVING)]
    pub admin_token_file: Option<PathBuf>,
    /// Directory for compiled plugins, so restarts and reloads skip compiling what they have
    /// seen [default: none; for `test`, the user's cache: $XDG_CACHE_HOME/wasm-extproc, else
    /// ~/.cache/wasm-extproc].
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
    /// Check the configuration and every plugin (compile, link, contract version, register,
    /// signature) without serving; exits 0 when all is well. For plugin repositories' CI.
    Check,
    /// Play exchange files through the plugins, as Envoy would send them, without Envoy or
    /// the network; print what each phase produced and compare it with each file's `expect:`.
    /// Exits 1 on any difference, 64 if a file or the plugins cannot be used.
    Test {
        /// Test this one component (with its `[plugins.NAME]` settings from --config) instead
        /// of the plugins directory.
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// The --plugin's configuration string (`host.config`), over --config's.
        #[arg(long, requires = "plugin")]
        plugin_config: Option<String>,
        /// Replay against a candidate: the plugins directory with this component in place of
        /// the plugin --replacing names (by default the one of the same name, or the only one).
        #[arg(long, conflicts_with = "plugin")]
        compare: Option<PathBuf>,
        /// The plugin --compare's candidate stands in for.
        #[arg(long, requires = "compare")]
        replacing: Option<String>,
        /// Exchange files (YAML; format in plugins/README.md).
        #[arg(required = true)]
        exchanges: Vec<PathBuf>,
    },
    /// Run plugins through a real Envoy on this machine: the host on them (reloading each
    /// plugin file when it is rebuilt), an echo upstream, and an Envoy on 127.0.0.1:PORT in
    /// front, set up for the phases the plugins handle. Prints the curl to try; Ctrl-C stops
    /// all three.
    Dev {
        /// Envoy's listener port on 127.0.0.1.
        #[arg(long, default_value_t = 10000)]
        port: u16,
        /// The Envoy binary [default: $ENVOY_BIN, else target/tools/envoy/bin/envoy when this
        /// binary was built in a checkout (`cargo xtask setup` installs it), else `envoy` on
        /// PATH].
        #[arg(long)]
        envoy: Option<PathBuf>,
        /// Plugin files (.wasm), run in file-name order [default: the plugins directory].
        plugins: Vec<PathBuf>,
    },
    /// Write a ready-to-build plugin project NAME: the source (starting as the ASM demo), a
    /// build script, an exchange file `test` passes, a README.
    New {
        name: String,
        #[arg(long, value_enum)]
        lang: Language,
        /// Where to create the project's directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Rust: the SDK's path, from the project (a checkout of wasm-extproc beside it).
        #[arg(long, default_value = "../wasm-extproc/plugins/sdk")]
        sdk: String,
    },
    /// Make an Ed25519 key pair for signing plugins (the format `wasmsign2` uses).
    Keygen {
        /// Where to write the secret key; keep it out of the cluster.
        #[arg(long)]
        secret_key: PathBuf,
        /// Where to write the public key, for the host's `[signing] trusted_keys`.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Sign a plugin: the signature goes into the component, or beside it (detached).
    Sign {
        #[arg(long)]
        secret_key: PathBuf,
        /// Write the signature to PLUGIN.wasm.sig and leave the component as it is.
        #[arg(long)]
        detached: bool,
        /// The component to sign, in place.
        plugin: PathBuf,
    },
    /// Verify a plugin's signature against public keys, as the host would; exits 1 if none
    /// of them signed it.
    Verify {
        /// A trusted public key (repeat for several).
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
        plugin: PathBuf,
    },
}

/// The languages `new` has a template for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    Rust,
    Javascript,
    Python,
    C,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration of the server.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenAddr,
    /// The admin HTTP listener; `None` when off.
    pub admin_listen: Option<SocketAddr>,
    /// The bearer token the admin listener's state-changing endpoints require, as a file read
    /// on each such request (a rotated Secret takes effect at once); `None`: local
    /// connections only.
    pub admin_token_file: Option<PathBuf>,
    /// The configuration file, if any: watched and re-read on reload.
    pub file: Option<PathBuf>,
    /// How long in-flight streams may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long a stream may go without a message from Envoy before it is ended.
    pub stream_idle_timeout: Duration,
    /// New streams are refused while work waits this long for a worker; `None`: never.
    pub shed_after: Option<Duration>,
    pub tls: Option<TlsSettings>,
    /// Where spans go, if anywhere (`[tracing]`).
    pub tracing: Option<FileTracing>,
    /// Where recordings go, and how they run (`[record]`).
    pub record: Option<FileRecord>,
    /// What the plugins and the runtime run with: the part both modes share.
    pub settings: Settings,
}

/// TLS for the gRPC listener, read when the configuration is loaded.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
    /// And one with one of these subject alternative names, when not empty.
    pub allowed_client_sans: Vec<String>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mutual", &self.client_ca_pem.is_some())
            .field("allowed_client_sans", &self.allowed_client_sans)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads the file (if any) and applies the flags over it.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config file {}: {e}", path.display()))
                })?;
                FileConfig::parse(&text, path)?
            }
            None => FileConfig::default(),
        };
        let mut config = Self::from_parts(file, cli)?;
        config.file = cli.config.clone();
        Ok(config)
    }

    /// Parses a configuration file's text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let file = FileConfig::parse(text, origin)?;
        Self::from_parts(file, &Cli::parse_from(["wasm-extproc"]))
    }

    fn from_parts(file: FileConfig, cli: &Cli) -> Result<Config, ConfigError> {
        if !file.module.is_empty() {
            tracing::info!(
                "the config's [module] table is read only in-process; over ext_proc, Envoy's \
                 filter config names the attributes and metadata it sends"
            );
        }
        let settings = file.settings(&Overrides {
            plugins_dir: cli.plugins_dir.clone(),
            cache_dir: cli.cache_dir.clone(),
            ..Overrides::default()
        })?;
        let listen = match &cli.listen {
            Some(listen) => listen.clone(),
            None => setting("listen", &file.listen)?
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address")),
        };
        let admin_listen = match cli.admin_listen {
            Some(admin) => admin,
            None => setting("admin_listen", &file.admin_listen)?
                .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.parse().expect("valid default address")),
        };
        let admin_token_file = cli
            .admin_token_file
            .clone()
            .or_else(|| file.admin_token_file.clone());
        if let Some(path) = &admin_token_file {
            read_admin_token(path).map_err(ConfigError)?;
        }
        Ok(Config {
            listen,
            admin_listen: admin_listen.0,
            admin_token_file,
            file: None,
            shutdown_grace: file
                .shutdown_grace_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            stream_idle_timeout: match file.stream_idle_timeout_ms {
                Some(0) => {
                    return Err(ConfigError(
                        "stream_idle_timeout_ms must be at least 1".into(),
                    ));
                }
                Some(ms) => Duration::from_millis(ms),
                None => DEFAULT_STREAM_IDLE_TIMEOUT,
            },
            shed_after: match file.overload.as_ref().and_then(|o| o.shed_after_ms) {
                Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
                None => Some(settings.envoy.message_timeout),
            },
            tls: file.tls.as_ref().map(read_tls).transpose()?,
            tracing: file.tracing.clone(),
            record: file.record.clone(),
            settings,
        })
    }
}

/// The file's `key`, parsed, if it is there.
fn setting<T: FromStr<Err = String>>(
    key: &str,
    text: &Option<String>,
) -> Result<Option<T>, ConfigError> {
    text.as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e| ConfigError(format!("{key}: {e}")))
}

fn read_tls(files: &FileTls) -> Result<TlsSettings, ConfigError> {
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|e| ConfigError(format!("[tls]: cannot read {}: {e}", path.display())))
    };
    if !files.allowed_client_sans.is_empty() && files.client_ca.is_none() {
        return Err(ConfigError(
            "[tls] allowed_client_sans needs client_ca: without client certificates there is \
             no identity to check"
                .into(),
        ));
    }
    if let Some(empty) = files.allowed_client_sans.iter().position(|s| s.is_empty()) {
        return Err(ConfigError(format!(
            "[tls] allowed_client_sans[{empty}] is empty"
        )));
    }
    Ok(TlsSettings {
        cert_pem: read(&files.cert)?,
        key_pem: read(&files.key)?,
        client_ca_pem: files.client_ca.as_deref().map(read).transpose()?,
        allowed_client_sans: files.allowed_client_sans.clone(),
    })
}

/// The admin token in `path`: its content without surrounding whitespace, which must leave
/// something.
pub fn read_admin_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("admin_token_file: cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("admin_token_file: {} is empty", path.display()));
    }
    Ok(token.to_string())
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
        assert_eq!(config.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(config.tls, None);
        assert_eq!(config.admin_token_file, None);
        assert_eq!(config.settings.plugins_dir, Path::new(DEFAULT_PLUGINS_DIR));
        assert_eq!(config.shed_after, Some(Duration::from_millis(200)));
    }

    #[test]
    fn new_streams_are_shed_at_envoys_timeout_unless_told_otherwise() {
        let follows_envoy = parse("[envoy]\nmessage_timeout_ms = 1000\n").unwrap();
        assert_eq!(follows_envoy.shed_after, Some(Duration::from_millis(1000)));
        let set = parse("[overload]\nshed_after_ms = 40\n").unwrap();
        assert_eq!(set.shed_after, Some(Duration::from_millis(40)));
        let never = parse("[overload]\nshed_after_ms = 0\n").unwrap();
        assert_eq!(never.shed_after, None);
        let misspelt = parse("[overload]\nshed_after = 40\n").unwrap_err();
        assert!(misspelt.to_string().contains("shed_after"), "{misspelt}");
    }

    #[test]
    fn who_may_talk_to_the_host_is_checked_at_load() {
        let err = parse("admin_token_file = \"/no/token\"\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("admin_token_file: cannot read /no/token: "),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "\n").unwrap();
        let err = parse(&format!("admin_token_file = {token:?}\n")).unwrap_err();
        assert!(err.to_string().ends_with("token is empty"), "{err}");
        std::fs::write(&token, "s3cret\n").unwrap();
        let config = parse(&format!("admin_token_file = {token:?}\n")).unwrap();
        assert_eq!(
            read_admin_token(config.admin_token_file.as_ref().unwrap()),
            Ok("s3cret".into())
        );

        let err = parse("[tls]\ncert = \"/c\"\nkey = \"/k\"\nallowed_client_sans = [\"envoy\"]\n")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "[tls] allowed_client_sans needs client_ca: without client certificates there is \
             no identity to check"
        );
    }

    #[test]
    fn listeners_take_tcp_unix_and_off() {
        let config = parse("listen = \"unix:/run/x.sock\"\nadmin_listen = \"off\"\n").unwrap();
        assert_eq!(config.listen, ListenAddr::Unix("/run/x.sock".into()));
        assert_eq!(config.admin_listen, None);
        let err = parse("listen = \"nowhere\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "listen: \"nowhere\" is neither host:port nor unix:/path"
        );
        let err = parse("[tls]\ncert = \"/no/cert\"\nkey = \"/no/key\"\n").unwrap_err();
        assert!(
            err.to_string().starts_with("[tls]: cannot read /no/cert: "),
            "{err}"
        );
    }

    #[test]
    fn flags_win_over_the_file() {
        let cli = Cli::parse_from([
            "wasm-extproc",
            "--listen",
            "127.0.0.1:1",
            "--plugins-dir",
            "/from/flag",
        ]);
        let file = FileConfig::parse(
            "listen = \"0.0.0.0:2\"\nplugins_dir = \"/from/file\"\n",
            Path::new("test.toml"),
        )
        .unwrap();
        let config = Config::from_parts(file, &cli).unwrap();
        assert_eq!(config.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(config.settings.plugins_dir, Path::new("/from/flag"));
    }
}
