//! The Redis backend: the same namespaces and bounds, shared by every host that names one
//! server.
//!
//! Each operation is one command or one Lua script, so it is atomic in Redis and sees every
//! write that completed before it, from any host. A namespace's keys share a hash tag
//! (`PREFIX:{NAMESPACE}:...`, the prefix `[kv] prefix`, the namespace escaped so that it holds
//! no brace), so it lives in one slot of a Redis Cluster too, and its bounds are kept by an
//! index beside the entries: a sorted set of keys by expiry, their sizes and the total, updated
//! by the same scripts that write. Expiry times are the server's (`TIME`), so hosts' clocks
//! need not agree.
//!
//! Redis runs a script's commands as they come and keeps what ran before an error, so every
//! script checks what can fail before it writes, and undoes its write when a later step fails:
//! a refused operation leaves nothing behind.
//!
//! A connection that broke while Redis was away is replaced, and an operation that never
//! reached Redis is sent again on the new connection within its deadline; so the first
//! operations after Redis comes back succeed instead of failing once per pooled connection.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, ScriptInvocation};

use super::{Count, KEYS_PER_PAGE, KvError, Limits};

/// Drops entries whose expiry has passed from the index (Redis has already dropped the
/// entries themselves), then binds `now` in milliseconds. KEYS: index, sizes, bytes.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index, sizes, total = KEYS[2], KEYS[3], KEYS[4]
for _, m in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, m) or '0'))
  redis.call('HDEL', sizes, m)
  redis.call('ZREM', index, m)
end
local function room(member, size, max_entries, max_bytes)
  local old = tonumber(redis.call('HGET', sizes, member) or '-1')
  if old < 0 and redis.call('ZCARD', index) >= max_entries then
    return redis.error_reply('FULL ' .. max_entries .. ' entries (max_entries)')
  end
  local bytes = tonumber(redis.call('GET', total) or '0')
  if bytes - math.max(old, 0) + size > max_bytes then
    return redis.error_reply('FULL ' .. max_bytes .. ' bytes (max_bytes)')
  end
  return nil
end
local function account(member, size, expires)
  local old = tonumber(redis.call('HGET', sizes, member) or '0')
  redis.call('HSET', sizes, member, size)
  redis.call('INCRBY', total, size - old)
  redis.call('ZADD', index, expires, member)
end
";

/// KEYS: entry, index, sizes, bytes. ARGV: member, value, ttl ms (0: none), max entries,
/// max bytes.
const SET: &str = r"
local member, value, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local size = string.len(member) + string.len(value)
local refused = room(member, size, tonumber(ARGV[4]), tonumber(ARGV[5]))
if refused then return refused end
if ttl > 0 then
  redis.call('SET', KEYS[1], value, 'PX', ttl)
  account(member, size, now + ttl)
else
  redis.call('SET', KEYS[1], value)
  account(member, size, '+inf')
end
return 'OK'
";

/// KEYS: entry, index, sizes, bytes. ARGV: member, delta, window ms (0: none), max entries,
/// max bytes. Returns the value and the milliseconds left (-1: no expiry).
const INCREMENT: &str = r"
local member, delta, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local before = redis.call('GET', KEYS[1])
local size = string.len(member) + 20
local refused = room(member, size, tonumber(ARGV[4]), tonumber(ARGV[5]))
if refused then return refused end
local value = redis.pcall('INCRBY', KEYS[1], ARGV[2])
if type(value) == 'table' and value.err then
  if string.find(value.err, 'overflow') then return redis.error_reply('OVERFLOW the counter would overflow') end
  return redis.error_reply('NOTCOUNTER the value is not a counter')
end
local left = redis.call('PTTL', KEYS[1])
if left < 0 and window > 0 then
  local expired = redis.pcall('PEXPIRE', KEYS[1], window)
  if type(expired) == 'table' and expired.err then
    -- Undo the increment: a counter must never be left without the expiry it was asked for.
    if before then redis.call('SET', KEYS[1], before, 'KEEPTTL') else redis.call('DEL', KEYS[1]) end
    return redis.error_reply('INVALID ' .. expired.err)
  end
  left = window
end
account(member, string.len(member) + string.len(tostring(value)), left < 0 and '+inf' or now + left)
return {value, left}
";

/// KEYS: entry, index, sizes, bytes. ARGV: member.
const DELETE: &str = r"
redis.call('DEL', KEYS[1])
redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, ARGV[1]) or '0'))
redis.call('HDEL', sizes, ARGV[1])
redis.call('ZREM', index, ARGV[1])
return 'OK'
";

/// KEYS: entry (unused), index, sizes, bytes. ARGV: offset, count.
const KEYS: &str = r"
return redis.call('ZRANGEBYSCORE', index, '(' .. now, '+inf', 'LIMIT', ARGV[1], ARGV[2])
";

pub struct Redis {
    /// `[kv] prefix`.
    prefix: String,
    client: redis::Client,
    config: ConnectionManagerConfig,
    connections: Vec<OnceLock<ConnectionManager>>,
    next: AtomicUsize,
    set: Script,
    increment: Script,
    delete: Script,
    keys: Script,
}

impl Redis {
    /// The Redis key of the entry `key` in `namespace`.
    fn entry_of(&self, namespace: &str, key: &str) -> String {
        format!("{}:{{{namespace}}}:e:{key}", self.prefix)
    }

    /// The keys a script works on for `key` in `namespace`: the entry, then the namespace's
    /// index, sizes and total.
    fn keys_of(&self, namespace: &str, key: &str) -> [String; 4] {
        let tagged = format!("{}:{{{namespace}}}", self.prefix);
        [
            self.entry_of(namespace, key),
            format!("{tagged}:i"),
            format!("{tagged}:s"),
            format!("{tagged}:b"),
        ]
    }
}

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

impl Redis {
    pub fn new(
        url: &str,
        pool_size: usize,
        connect_timeout: Duration,
        prefix: &str,
    ) -> anyhow::Result<Redis> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("[kv] url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            // Each operation has its own deadline (what is left of the plugin's call).
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500));
        Ok(Redis {
            prefix: prefix.into(),
            client,
            config,
            connections: (0..pool_size.max(1)).map(|_| OnceLock::new()).collect(),
            next: AtomicUsize::new(0),
            set: script(SET),
            increment: script(INCREMENT),
            delete: script(DELETE),
            keys: script(KEYS),
        })
    }

    /// One of the pool's connections, made (without connecting) on first use: the manager
    /// connects when first asked, and reconnects in the background after a failure.
    fn connection(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i]
            .get_or_init(|| {
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
                    .expect("no push sender is configured, the only way this fails")
            })
            .clone()
    }

    /// Runs `operation` on a connection, failing after `within`. An operation that failed
    /// because its connection had broken is sent once more on the connection that replaces it,
    /// as `resend` allows. The scripts' own refusals (error replies `FULL ...`, `NOTCOUNTER`,
    /// `OVERFLOW`, `INVALID`) become the matching [`KvError`].
    async fn run<T, F>(
        &self,
        (namespace, key): (&str, &str),
        within: Duration,
        resend: Resend,
        operation: impl Fn(ConnectionManager) -> F,
    ) -> Result<T, KvError>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        // The same manager both times: the failure made it reconnect, and the second attempt
        // waits for that connection.
        let connection = self.connection();
        let attempts = async {
            match operation(connection.clone()).await {
                Err(e) if resend.allows(&e) => operation(connection).await,
                done => done,
            }
        };
        let e = match tokio::time::timeout(within, attempts).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e,
            Err(_) => return Err(KvError::Timeout(within)),
        };
        Err(match e.code() {
            Some("FULL") => KvError::Full {
                namespace: namespace.into(),
                limit: e.detail().unwrap_or_default().into(),
            },
            Some("NOTCOUNTER") => KvError::NotACounter(key.into()),
            Some("OVERFLOW") => KvError::Overflow(key.into()),
            Some("INVALID") => KvError::Unavailable(format!(
                "Redis refused the expiry: {}",
                e.detail().unwrap_or_default()
            )),
            _ => KvError::Unavailable(e.to_string()),
        })
    }

    /// Runs a prepared script, as [`run`](Self::run) runs an operation.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        at: (&str, &str),
        within: Duration,
        resend: Resend,
    ) -> Result<T, KvError> {
        self.run(at, within, resend, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    pub async fn get(
        &self,
        namespace: &str,
        key: &str,
        within: Duration,
    ) -> Result<Option<Vec<u8>>, KvError> {
        self.read("GET", namespace, key, within).await
    }

    pub async fn exists(
        &self,
        namespace: &str,
        key: &str,
        within: Duration,
    ) -> Result<bool, KvError> {
        self.read("EXISTS", namespace, key, within).await
    }

    /// A command that reads the entry `key` and nothing else.
    async fn read<T: redis::FromRedisValue>(
        &self,
        command: &str,
        namespace: &str,
        key: &str,
        within: Duration,
    ) -> Result<T, KvError> {
        let mut read = redis::cmd(command);
        read.arg(self.entry_of(namespace, key));
        let read = &read;
        self.run(
            (namespace, key),
            within,
            Resend::Always,
            |mut c| async move { read.query_async(&mut c).await },
        )
        .await
    }

    pub async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        limits: &Limits,
        within: Duration,
    ) -> Result<(), KvError> {
        let mut invocation = self.set.prepare_invoke();
        invocation
            .key(&self.keys_of(namespace, key)[..])
            .arg(key)
            .arg(value)
            .arg(ttl.map_or(0, millis))
            .arg(limits.max_entries)
            .arg(limits.max_bytes);
        self.invoke(&invocation, (namespace, key), within, Resend::Always)
            .await
    }

    pub async fn delete(
        &self,
        namespace: &str,
        key: &str,
        within: Duration,
    ) -> Result<(), KvError> {
        let mut invocation = self.delete.prepare_invoke();
        invocation.key(&self.keys_of(namespace, key)[..]).arg(key);
        self.invoke(&invocation, (namespace, key), within, Resend::Always)
            .await
    }

    pub async fn keys(
        &self,
        namespace: &str,
        cursor: u64,
        within: Duration,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        let mut invocation = self.keys.prepare_invoke();
        invocation
            .key(&self.keys_of(namespace, "")[..])
            .arg(cursor)
            .arg(KEYS_PER_PAGE);
        let page: Vec<String> = self
            .invoke(&invocation, (namespace, ""), within, Resend::Always)
            .await?;
        let next = (page.len() == KEYS_PER_PAGE).then(|| cursor + page.len() as u64);
        Ok((page, next))
    }

    pub async fn increment(
        &self,
        namespace: &str,
        key: &str,
        delta: i64,
        window: Option<Duration>,
        limits: &Limits,
        within: Duration,
    ) -> Result<Count, KvError> {
        let mut invocation = self.increment.prepare_invoke();
        invocation
            .key(&self.keys_of(namespace, key)[..])
            .arg(key)
            .arg(delta)
            .arg(window.map_or(0, millis))
            .arg(limits.max_entries)
            .arg(limits.max_bytes);
        // Counting twice is worse than failing once: an increment is sent again only when it
        // cannot have reached Redis.
        let (value, left): (i64, i64) = self
            .invoke(&invocation, (namespace, key), within, Resend::IfNeverSent)
            .await?;
        Ok(Count {
            value: u64::try_from(value).unwrap_or(0),
            expires_in: u64::try_from(left).ok().map(Duration::from_millis),
        })
    }
}

/// When an operation whose connection failed is sent again.
#[derive(Debug, Clone, Copy)]
enum Resend {
    /// Whenever the connection broke: the operation means the same if it runs twice (reads,
    /// `SET`, `DEL`).
    Always,
    /// Only when it cannot have reached Redis: the connection was refused or never made (the
    /// first use of a connection that broke while Redis was away).
    IfNeverSent,
}

impl Resend {
    fn allows(self, e: &RedisError) -> bool {
        let never_sent = e.is_connection_refusal() || e.is_timeout();
        match self {
            Resend::Always => never_sent || e.is_connection_dropped(),
            Resend::IfNeverSent => never_sent,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
