//! The embedded backend: namespaces in this process's memory, each behind its own lock.
//!
//! Every operation is atomic and sees every earlier one. Expired entries are dropped when read,
//! and swept from a namespace when a write finds it full and something in it has expired.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Count, KEYS_PER_PAGE, KvError, Limits};

#[derive(Default)]
pub struct Memory {
    namespaces: Mutex<HashMap<Arc<str>, Arc<Mutex<Namespace>>>>,
}

#[derive(Default)]
struct Namespace {
    entries: HashMap<String, Entry>,
    /// Bytes of keys and values held.
    bytes: u64,
    /// The earliest expiry among the entries, if any expire: a full namespace is swept only
    /// when something in it can have expired.
    next_expiry: Option<Instant>,
}

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

fn size(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

impl Memory {
    fn namespace(&self, name: &str) -> Arc<Mutex<Namespace>> {
        let mut all = self.namespaces.lock().expect("kv namespaces lock");
        if let Some(ns) = all.get(name) {
            return ns.clone();
        }
        all.entry(name.into()).or_default().clone()
    }

    pub fn get(&self, namespace: &str, key: &str) -> Option<Vec<u8>> {
        self.read(namespace, key, |value| value.to_vec())
    }

    pub fn exists(&self, namespace: &str, key: &str) -> bool {
        self.read(namespace, key, |_| ()).is_some()
    }

    /// `read` of the live value at `key`; an expired one is dropped on the way.
    fn read<T>(&self, namespace: &str, key: &str, read: impl FnOnce(&[u8]) -> T) -> Option<T> {
        let ns = self.namespace(namespace);
        let mut ns = ns.lock().expect("kv namespace lock");
        let now = Instant::now();
        match ns.entries.get(key) {
            Some(entry) if entry.live(now) => Some(read(&entry.value)),
            Some(_) => {
                ns.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn set(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
        limits: &Limits,
    ) -> Result<(), KvError> {
        let ns = self.namespace(namespace);
        let mut ns = ns.lock().expect("kv namespace lock");
        let now = Instant::now();
        ns.make_room(namespace, key, size(key, &value), limits, now)?;
        ns.insert(key, value, ttl.map(|t| now + t));
        Ok(())
    }

    pub fn delete(&self, namespace: &str, key: &str) {
        let ns = self.namespace(namespace);
        ns.lock().expect("kv namespace lock").remove(key);
    }

    pub fn keys(&self, namespace: &str, cursor: u64) -> (Vec<String>, Option<u64>) {
        let ns = self.namespace(namespace);
        let ns = ns.lock().expect("kv namespace lock");
        let now = Instant::now();
        let mut keys: Vec<&String> = ns
            .entries
            .iter()
            .filter(|(_, e)| e.live(now))
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        let start = usize::try_from(cursor)
            .unwrap_or(usize::MAX)
            .min(keys.len());
        let page: Vec<String> = keys[start..]
            .iter()
            .take(KEYS_PER_PAGE)
            .map(|k| k.to_string())
            .collect();
        let next = start + page.len();
        (page, (next < keys.len()).then_some(next as u64))
    }

    pub fn increment(
        &self,
        namespace: &str,
        key: &str,
        delta: i64,
        window: Option<Duration>,
        limits: &Limits,
    ) -> Result<Count, KvError> {
        let ns = self.namespace(namespace);
        let mut ns = ns.lock().expect("kv namespace lock");
        let now = Instant::now();
        let (current, expires) = match ns.entries.get(key) {
            Some(entry) if entry.live(now) => {
                let text = std::str::from_utf8(&entry.value).ok();
                let value = text
                    .and_then(|t| t.parse::<i64>().ok())
                    .ok_or_else(|| KvError::NotACounter(key.into()))?;
                (value, entry.expires)
            }
            _ => (0, None),
        };
        let value = current
            .checked_add(delta)
            .ok_or_else(|| KvError::Overflow(key.into()))?;
        let expires = expires.or_else(|| window.map(|w| now + w));
        let text = value.to_string().into_bytes();
        ns.make_room(namespace, key, size(key, &text), limits, now)?;
        ns.insert(key, text, expires);
        Ok(Count {
            // Deltas are never negative, so a counter made by increments is never below zero;
            // one `set` to a negative number reads as 0.
            value: u64::try_from(value).unwrap_or(0),
            expires_in: expires.map(|t| t.saturating_duration_since(now)),
        })
    }
}

impl Namespace {
    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.remove(key) {
            self.bytes -= size(key, &old.value);
        }
    }

    fn insert(&mut self, key: &str, value: Vec<u8>, expires: Option<Instant>) {
        self.remove(key);
        self.bytes += size(key, &value);
        if let Some(t) = expires {
            self.next_expiry = Some(self.next_expiry.map_or(t, |n| n.min(t)));
        }
        self.entries.insert(key.into(), Entry { value, expires });
    }

    /// Checks that `key` with a value making `bytes` fits, sweeping expired entries first if
    /// it would not.
    fn make_room(
        &mut self,
        name: &str,
        key: &str,
        bytes: u64,
        limits: &Limits,
        now: Instant,
    ) -> Result<(), KvError> {
        if self.fits(key, bytes, limits).is_ok() {
            return Ok(());
        }
        if self.next_expiry.is_some_and(|t| t <= now) {
            self.entries.retain(|_, e| e.live(now));
            self.bytes = self.entries.iter().map(|(k, e)| size(k, &e.value)).sum();
            self.next_expiry = self.entries.values().filter_map(|e| e.expires).min();
        }
        self.fits(key, bytes, limits)
            .map_err(|limit| KvError::Full {
                namespace: name.into(),
                limit,
            })
    }

    fn fits(&self, key: &str, bytes: u64, limits: &Limits) -> Result<(), String> {
        let replaced = self.entries.get(key).map(|e| size(key, &e.value));
        if replaced.is_none() && self.entries.len() as u64 >= limits.max_entries {
            return Err(format!("{} entries (max_entries)", limits.max_entries));
        }
        if self.bytes - replaced.unwrap_or(0) + bytes > limits.max_bytes {
            return Err(format!("{} bytes (max_bytes)", limits.max_bytes));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::DEFAULT_LIMITS;

    #[test]
    fn entries_expire_and_namespaces_are_apart() {
        let m = Memory::default();
        m.set("a", "k", b"1".to_vec(), None, &DEFAULT_LIMITS)
            .unwrap();
        m.set(
            "a",
            "t",
            b"x".to_vec(),
            Some(Duration::from_millis(20)),
            &DEFAULT_LIMITS,
        )
        .unwrap();
        assert_eq!(m.get("a", "k"), Some(b"1".to_vec()));
        assert_eq!(m.get("b", "k"), None);
        assert_eq!(m.get("a", "t"), Some(b"x".to_vec()));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(m.get("a", "t"), None);
        assert_eq!(m.keys("a", 0), (vec!["k".to_string()], None));
    }

    #[test]
    fn a_full_namespace_refuses_new_entries_until_some_expire() {
        let limits = Limits {
            max_entries: 2,
            max_bytes: 1 << 20,
            ..DEFAULT_LIMITS
        };
        let m = Memory::default();
        m.set("a", "1", vec![], Some(Duration::from_millis(20)), &limits)
            .unwrap();
        m.set("a", "2", vec![], None, &limits).unwrap();
        let full = m.set("a", "3", vec![], None, &limits).unwrap_err();
        assert_eq!(
            full.to_string(),
            "namespace \"a\" is full: 2 entries (max_entries)"
        );
        // Replacing an entry needs no room; another namespace has its own.
        m.set("a", "2", b"x".to_vec(), None, &limits).unwrap();
        m.set("b", "3", vec![], None, &limits).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        m.set("a", "3", vec![], None, &limits).unwrap();

        let limits = Limits {
            max_bytes: 10,
            ..DEFAULT_LIMITS
        };
        m.set("c", "k", vec![0; 9], None, &limits).unwrap();
        let full = m.set("c", "l", vec![0; 1], None, &limits).unwrap_err();
        assert!(full.to_string().ends_with("10 bytes (max_bytes)"), "{full}");
    }

    #[test]
    fn counters_count_in_their_window_and_are_text() {
        let m = Memory::default();
        let window = Some(Duration::from_millis(40));
        let first = m.increment("a", "c", 1, window, &DEFAULT_LIMITS).unwrap();
        assert_eq!(first.value, 1);
        assert!(first.expires_in.unwrap() <= Duration::from_millis(40));
        assert_eq!(
            m.increment("a", "c", 2, window, &DEFAULT_LIMITS)
                .unwrap()
                .value,
            3
        );
        assert_eq!(m.get("a", "c"), Some(b"3".to_vec()));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            m.increment("a", "c", 1, window, &DEFAULT_LIMITS)
                .unwrap()
                .value,
            1
        );
        // Without a window a counter never expires.
        let plain = m.increment("a", "p", 5, None, &DEFAULT_LIMITS).unwrap();
        assert_eq!(
            plain,
            Count {
                value: 5,
                expires_in: None
            }
        );
        m.set("a", "s", b"text".to_vec(), None, &DEFAULT_LIMITS)
            .unwrap();
        assert_eq!(
            m.increment("a", "s", 1, None, &DEFAULT_LIMITS),
            Err(KvError::NotACounter("s".into()))
        );
        m.set(
            "a",
            "big",
            i64::MAX.to_string().into_bytes(),
            None,
            &DEFAULT_LIMITS,
        )
        .unwrap();
        assert_eq!(
            m.increment("a", "big", 1, None, &DEFAULT_LIMITS),
            Err(KvError::Overflow("big".into()))
        );
    }
}
