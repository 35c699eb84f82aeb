//! State plugins keep between exchanges: key-value entries in namespaces, with expiry and
//! counters in a time window.
//!
//! A plugin instance lives for one exchange; what must outlive it (a rate limit's counters, a
//! cached token check) lives here, behind the contract's `wasi:keyvalue` and `state` imports.
//! Two backends share one behaviour: [`memory`] for one host (the default, nothing to set up) and
//! [`redis`] for several replicas. Every namespace is bounded (entry size, entries, bytes), every
//! operation on Redis is bounded in time, and every failure is a [`KvError`] the plugin sees.
//!
//! Counters are stored as decimal text, as Redis stores them: `get` reads one, and `set` of a
//! number makes one.

mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

/// Where the entries live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// In this process: lost at restart, not shared between replicas.
    Memory,
    /// In Redis, shared by every host that names the same server.
    Redis {
        /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
        url: String,
        /// Connections kept to the server; operations are pipelined over them.
        pool_size: usize,
        /// How long connecting may take before an operation fails.
        connect_timeout: Duration,
        /// What every key of this host's starts with ([`DEFAULT_PREFIX`]): Deployments that
        /// share one Redis each set their own, and never see each other's entries.
        prefix: String,
    },
}

/// What the state store may hold and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSettings {
    pub backend: Backend,
    /// The longest one operation may take (never longer than what is left of the plugin's
    /// call).
    pub timeout: Duration,
    pub limits: Limits,
}

/// Bounds on one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Entries one namespace may hold.
    pub max_entries: u64,
    /// Bytes of keys and values one namespace may hold.
    pub max_bytes: u64,
}

pub const DEFAULT_LIMITS: Limits = Limits {
    max_key_bytes: 512,
    max_value_bytes: 64 << 10,
    max_entries: 100_000,
    max_bytes: 64 << 20,
};
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10);
/// The Redis key prefix when `[kv] prefix` is not set.
pub const DEFAULT_PREFIX: &str = "wasm-extproc";
/// The longest expiry (`set-with-ttl`) or window (`increment-in-window`) the store accepts:
/// 366 days covers a yearly quota; anything longer is a plugin's mistake (a `u64::MAX`
/// "forever"), refused alike by both backends before either does arithmetic with it. A plugin
/// that wants an entry kept uses `set`.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 60 * 60);
pub const DEFAULT_POOL_SIZE: usize = 4;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

impl Default for KvSettings {
    fn default() -> Self {
        KvSettings {
            backend: Backend::Memory,
            timeout: DEFAULT_TIMEOUT,
            limits: DEFAULT_LIMITS,
        }
    }
}

/// Why an operation did not happen. Each is shown to the plugin as `error.other` with its
/// [`kind`](KvError::kind) first (`full: namespace ... is full: ...`), so that a plugin can
/// tell a store it cannot reach (`timeout`, `unavailable`) from a refusal; except
/// [`Denied`](KvError::Denied), which is `access-denied`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("namespace {0:?} is not granted to this plugin (kv_namespaces)")]
    Denied(String),
    #[error("key of {len} bytes is longer than the {limit}-byte limit")]
    KeyTooLong { len: usize, limit: usize },
    #[error("value of {len} bytes is larger than the {limit}-byte limit")]
    ValueTooLarge { len: usize, limit: usize },
    #[error("namespace {namespace:?} is full: {limit}")]
    Full { namespace: String, limit: String },
    #[error("the value at {0:?} is not a counter")]
    NotACounter(String),
    #[error("the counter at {0:?} would pass 2^63-1")]
    Overflow(String),
    #[error("expiry must be at least 1 ms")]
    ZeroTtl,
    #[error("expiry of {ms} ms is longer than the {limit} ms limit")]
    TtlTooLong { ms: u128, limit: u128 },
    #[error("the state store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
}

impl KvError {
    /// A short, stable name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            KvError::Denied(_) => "denied",
            KvError::KeyTooLong { .. } | KvError::ValueTooLarge { .. } => "too_large",
            KvError::Full { .. } => "full",
            KvError::NotACounter(_) | KvError::Overflow(_) => "not_a_counter",
            KvError::ZeroTtl | KvError::TtlTooLong { .. } => "invalid",
            KvError::Timeout(_) => "timeout",
            KvError::Unavailable(_) => "unavailable",
        }
    }
}

/// A counter after an increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub value: u64,
    /// Until the counter expires; `None` if it never does.
    pub expires_in: Option<Duration>,
}

/// Keys listed per call of `list-keys`.
pub const KEYS_PER_PAGE: usize = 1000;

/// The state store every plugin of a host shares, each in its own namespaces.
pub struct Kv {
    store: Store,
    settings: KvSettings,
}

enum Store {
    Memory(memory::Memory),
    Redis(Box<redis::Redis>),
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Kv {
    /// A store for `settings`. Redis is connected to on first use, so a server that is down
    /// at start-up fails operations (the plugins' failure policies apply), not the host.
    pub fn new(settings: KvSettings) -> anyhow::Result<Kv> {
        let store = match &settings.backend {
            Backend::Memory => Store::Memory(memory::Memory::default()),
            Backend::Redis {
                url,
                pool_size,
                connect_timeout,
                prefix,
            } => Store::Redis(Box::new(redis::Redis::new(
                url,
                *pool_size,
                *connect_timeout,
                prefix,
            )?)),
        };
        Ok(Kv { store, settings })
    }

    pub fn settings(&self) -> &KvSettings {
        &self.settings
    }

    /// The backend's name, for metrics and logs.
    pub fn backend(&self) -> &'static str {
        match self.store {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    fn check_key(&self, key: &str) -> Result<(), KvError> {
        let limit = self.settings.limits.max_key_bytes;
        if key.len() > limit {
            return Err(KvError::KeyTooLong {
                len: key.len(),
                limit,
            });
        }
        Ok(())
    }

    /// The time an operation may take: the store's timeout, or what is left of the call.
    fn within(&self, left: Duration) -> Duration {
        self.settings.timeout.min(left)
    }

    pub async fn get(
        &self,
        namespace: &str,
        key: &str,
        left: Duration,
    ) -> Result<Option<Vec<u8>>, KvError> {
        self.check_key(key)?;
        match &self.store {
            Store::Memory(m) => Ok(m.get(namespace, key)),
            Store::Redis(r) => r.get(namespace, key, self.within(left)).await,
        }
    }

    pub async fn exists(
        &self,
        namespace: &str,
        key: &str,
        left: Duration,
    ) -> Result<bool, KvError> {
        self.check_key(key)?;
        match &self.store {
            Store::Memory(m) => Ok(m.exists(namespace, key)),
            Store::Redis(r) => r.exists(namespace, key, self.within(left)).await,
        }
    }

    /// Sets `key` to `value`, forgotten after `ttl` if given.
    pub async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
        left: Duration,
    ) -> Result<(), KvError> {
        self.check_key(key)?;
        let limit = self.settings.limits.max_value_bytes;
        if value.len() > limit {
            return Err(KvError::ValueTooLarge {
                len: value.len(),
                limit,
            });
        }
        if let Some(ttl) = ttl {
            check_ttl(ttl)?;
        }
        let limits = &self.settings.limits;
        match &self.store {
            Store::Memory(m) => m.set(namespace, key, value, ttl, limits),
            Store::Redis(r) => {
                r.set(namespace, key, &value, ttl, limits, self.within(left))
                    .await
            }
        }
    }

    pub async fn delete(&self, namespace: &str, key: &str, left: Duration) -> Result<(), KvError> {
        self.check_key(key)?;
        match &self.store {
            Store::Memory(m) => {
                m.delete(namespace, key);
                Ok(())
            }
            Store::Redis(r) => r.delete(namespace, key, self.within(left)).await,
        }
    }

    /// A page of the namespace's keys, from `cursor` (0 for the first page), and the cursor of
    /// the next page if there is one. Keys written or removed meanwhile may be missed or seen
    /// twice.
    pub async fn keys(
        &self,
        namespace: &str,
        cursor: u64,
        left: Duration,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        match &self.store {
            Store::Memory(m) => Ok(m.keys(namespace, cursor)),
            Store::Redis(r) => r.keys(namespace, cursor, self.within(left)).await,
        }
    }

    /// Adds `delta` to the counter at `key` (a missing one starts at 0). With `window`, a
    /// counter that has no expiry gets one `window` from now: the first increment opens the
    /// window, and the counter is forgotten when it closes.
    pub async fn increment(
        &self,
        namespace: &str,
        key: &str,
        delta: u64,
        window: Option<Duration>,
        left: Duration,
    ) -> Result<Count, KvError> {
        self.check_key(key)?;
        if let Some(window) = window {
            check_ttl(window)?;
        }
        let delta = i64::try_from(delta).map_err(|_| KvError::Overflow(key.into()))?;
        let limits = &self.settings.limits;
        match &self.store {
            Store::Memory(m) => m.increment(namespace, key, delta, window, limits),
            Store::Redis(r) => {
                r.increment(namespace, key, delta, window, limits, self.within(left))
                    .await
            }
        }
    }
}

/// An expiry both backends can keep: at least a millisecond, at most [`MAX_TTL`].
fn check_ttl(ttl: Duration) -> Result<(), KvError> {
    if ttl < Duration::from_millis(1) {
        return Err(KvError::ZeroTtl);
    }
    if ttl > MAX_TTL {
        return Err(KvError::TtlTooLong {
            ms: ttl.as_millis(),
            limit: MAX_TTL.as_millis(),
        });
    }
    Ok(())
}

/// What one plugin may reach of the store: its own namespace and the shared ones the operator
/// granted it.
#[derive(Debug, Clone)]
pub struct Access {
    pub kv: Arc<Kv>,
    /// The chain the plugin serves in: its own namespace is per chain, so the same name in
    /// two chains (possibly two different components) never shares entries.
    pub chain: Arc<str>,
    /// The plugin's name.
    pub own: Arc<str>,
    /// `kv_namespaces`: shared namespaces it may open.
    pub shared: Arc<[String]>,
}

/// The identifiers `open` takes for a plugin's own namespace.
pub const OWN_NAMESPACE: [&str; 2] = ["", "default"];

impl Access {
    /// The namespace `identifier` opens, if the plugin may open it: `plugin:CHAIN/NAME` for its
    /// own, `shared:NAME` for a granted one. Every name is escaped ([`escape`]), so no chain,
    /// plugin or namespace name -- whatever `:`, `/`, `{` or `}` it holds -- can spell another
    /// namespace, and own namespaces never meet shared ones.
    pub fn open(&self, identifier: &str) -> Result<Arc<str>, KvError> {
        if OWN_NAMESPACE.contains(&identifier) {
            return Ok(format!("plugin:{}/{}", escape(&self.chain), escape(&self.own)).into());
        }
        if self.shared.iter().any(|s| s == identifier) {
            return Ok(format!("shared:{}", escape(identifier)).into());
        }
        Err(KvError::Denied(identifier.into()))
    }
}

/// `name` with every byte outside `A-Z a-z 0-9 . _ -` written `%XX`: the separators of a
/// namespace (`:`, `/`) and of a Redis hash tag (`{`, `}`) never come from a name.
pub fn escape(name: &str) -> String {
    let mut escaped = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            escaped.push(b as char);
        } else {
            escaped.push_str(&format!("%{b:02X}"));
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(shared: &[&str]) -> Access {
        Access {
            kv: Arc::new(Kv::new(KvSettings::default()).unwrap()),
            chain: "default".into(),
            own: "rate-limit".into(),
            shared: shared.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_plugin_opens_its_own_namespace_and_the_shared_ones_it_is_granted() {
        let a = access(&["tokens"]);
        assert_eq!(&*a.open("").unwrap(), "plugin:default/rate-limit");
        assert_eq!(&*a.open("default").unwrap(), "plugin:default/rate-limit");
        assert_eq!(&*a.open("tokens").unwrap(), "shared:tokens");
        assert_eq!(a.open("other"), Err(KvError::Denied("other".into())));
        // A shared namespace cannot be named after another plugin's own one.
        assert_eq!(
            a.open("plugin:bearer-auth"),
            Err(KvError::Denied("plugin:bearer-auth".into()))
        );
    }

    #[test]
    fn the_same_plugin_name_in_two_chains_has_two_namespaces() {
        let mut a = access(&[]);
        let default = a.open("").unwrap();
        a.chain = "beta".into();
        assert_ne!(a.open("").unwrap(), default);
        assert_eq!(&*a.open("").unwrap(), "plugin:beta/rate-limit");
    }

    #[test]
    fn no_name_can_spell_another_namespace() {
        // Without escaping, chain `a/b` + plugin `c` and chain `a` + plugin `b/c` would both
        // be `plugin:a/b/c`; and a `}` would end a Redis hash tag early.
        let mut one = access(&[]);
        one.chain = "a/b".into();
        one.own = "c".into();
        let mut two = access(&[]);
        two.chain = "a".into();
        two.own = "b/c".into();
        assert_ne!(one.open("").unwrap(), two.open("").unwrap());
        let shared = access(&["x}:e:y", "plugin:default/rate-limit"]);
        assert_eq!(&*shared.open("x}:e:y").unwrap(), "shared:x%7D%3Ae%3Ay");
        assert_ne!(
            shared.open("plugin:default/rate-limit").unwrap(),
            shared.open("").unwrap()
        );
        for name in ["{", "}", ":", "/", "%", " ", "\u{e9}"] {
            let escaped = escape(name);
            assert!(
                escaped
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'%'),
                "{name:?} -> {escaped}"
            );
        }
    }

    #[tokio::test]
    async fn keys_values_and_expiry_are_checked_before_the_backend_sees_them() {
        let kv = Kv::new(KvSettings {
            limits: Limits {
                max_key_bytes: 4,
                max_value_bytes: 8,
                ..DEFAULT_LIMITS
            },
            ..KvSettings::default()
        })
        .unwrap();
        let left = Duration::from_secs(1);
        assert_eq!(
            kv.get("n", "12345", left).await,
            Err(KvError::KeyTooLong { len: 5, limit: 4 })
        );
        assert_eq!(
            kv.set("n", "k", vec![0; 9], None, left).await,
            Err(KvError::ValueTooLarge { len: 9, limit: 8 })
        );
        assert_eq!(
            kv.set("n", "k", vec![0; 8], Some(Duration::ZERO), left)
                .await,
            Err(KvError::ZeroTtl)
        );
        assert_eq!(
            kv.increment("n", "k", u64::MAX, None, left).await,
            Err(KvError::Overflow("k".into()))
        );
        // Expiries past the bound are refused, whatever the backend would have made of them.
        let forever = Duration::from_millis(u64::MAX);
        let refused = Err(KvError::TtlTooLong {
            ms: forever.as_millis(),
            limit: MAX_TTL.as_millis(),
        });
        assert_eq!(
            kv.set("n", "k", vec![1], Some(forever), left).await,
            refused
        );
        assert_eq!(
            kv.increment("n", "k", 1, Some(forever), left)
                .await
                .map(|_| ()),
            refused
        );
        assert!(kv.increment("n", "k", 1, Some(MAX_TTL), left).await.is_ok());
    }
}
