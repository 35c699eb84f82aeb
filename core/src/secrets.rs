//! Secrets plugins may read: named values the operator keeps in files (a Kubernetes Secret
//! volume, a file an agent renews) and grants to plugins by name.
//!
//! ```toml
//! [secrets]
//! api-tokens = "/var/run/secrets/api/tokens"   # NAME = "PATH"
//!
//! [plugins.bearer-auth]
//! secrets = ["api-tokens"]                     # what it may read; nothing unless listed
//! ```
//!
//! Every file is read when the host starts (a missing or unreadable one stops it, naming the
//! secret and the file), then again every [`REFRESH`], off the request path: a rotated file is
//! what plugins read within about a second, without a restart or a reload. A file that
//! cannot be read later keeps its last value, with a warning and a count. Values are never
//! logged, listed or recorded by the host: only names and paths are.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::Metrics;

/// How often the files are read again. Kubernetes takes up to a minute or so to project a
/// changed Secret into a volume; a second more is nothing beside that, and reading a few small
/// files once a second costs nothing measurable.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The largest secret file the host reads: keys, tokens and certificates are a few KiB; a
/// bound keeps a wrong path (a log file, a device) from filling the host's memory.
pub const MAX_SECRET_BYTES: u64 = 64 << 10;

/// `[secrets]`: each secret's name and the file that holds its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretsSettings {
    pub files: BTreeMap<String, PathBuf>,
}

impl SecretsSettings {
    /// The table as written, checked: names a plugin can spell and a path for each.
    pub fn from_table(files: BTreeMap<String, PathBuf>) -> Result<SecretsSettings, String> {
        for (name, path) in &files {
            check_name(name).map_err(|e| format!("[secrets] {e}"))?;
            if path.as_os_str().is_empty() {
                return Err(format!("[secrets] {name}: the path is empty"));
            }
        }
        Ok(SecretsSettings { files })
    }

    /// Why a plugin's grant of `names` cannot be: a name no `[secrets]` entry defines.
    pub fn check_grant(&self, names: &[String]) -> Result<(), String> {
        match names.iter().find(|n| !self.files.contains_key(*n)) {
            Some(name) => Err(format!(
                "secrets: no secret named {name:?} in [secrets] (defined: {})",
                if self.files.is_empty() {
                    "none".to_string()
                } else {
                    self.files.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            )),
            None => Ok(()),
        }
    }
}

/// A secret's name: what a plugin passes to `wasi:config/store.get` and an operator writes in
/// a grant, so nothing that needs quoting or escaping anywhere it shows.
fn check_name(name: &str) -> Result<(), String> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if name.is_empty() || name.len() > 128 || !name.bytes().all(allowed) {
        return Err(format!(
            "{name:?}: a secret's name is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    secret: String,
    result: &'static str,
}

/// Every secret's current value, kept fresh from its file.
#[derive(Debug)]
pub struct Secrets {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    files: BTreeMap<String, PathBuf>,
    values: Mutex<BTreeMap<String, Arc<str>>>,
    /// Changes whenever a value does, so that a grant's view is rebuilt only then.
    generation: AtomicU64,
    refreshes: Family<RefreshLabels, Counter>,
}

impl Secrets {
    /// Reads every file `settings` names; the error names the first secret that cannot be read,
    /// and its file. Files are read again every [`REFRESH`] while the returned value lives.
    pub fn open(settings: &SecretsSettings, metrics: &Metrics) -> anyhow::Result<Secrets> {
        let mut values = BTreeMap::new();
        for (name, path) in &settings.files {
            let value = read(path).map_err(|reason| {
                anyhow::anyhow!("[secrets] {name} = {}: {reason}", path.display())
            })?;
            values.insert(name.clone(), value);
        }
        let refreshes = metrics.family(
            "secret_refreshes",
            "Secret files read again that changed (changed) or could not be read (failed; the \
             last value stays)",
            Family::<RefreshLabels, Counter>::default,
        );
        for name in settings.files.keys() {
            for result in ["changed", "failed"] {
                let _ = refreshes.get_or_create(&RefreshLabels {
                    secret: name.clone(),
                    result,
                });
            }
        }
        let shared = Arc::new(Shared {
            files: settings.files.clone(),
            values: Mutex::new(values),
            generation: AtomicU64::new(0),
            refreshes,
        });
        if !shared.files.is_empty() {
            let weak = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("secrets".into())
                .spawn(move || keep_fresh(&weak))?;
        }
        Ok(Secrets { shared })
    }

    /// Changes whenever a value changes.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// The current values of `names` (those that exist), with the generation they are of.
    pub fn values(&self, names: &[String]) -> (u64, Vec<(String, String)>) {
        let values = self.shared.values.lock().expect("secret values");
        let generation = self.generation();
        let granted = names
            .iter()
            .filter_map(|name| Some((name.clone(), values.get(name)?.to_string())))
            .collect();
        (generation, granted)
    }

    /// Reads every file again now (what the refresh thread does every [`REFRESH`]).
    pub fn refresh(&self) {
        self.shared.refresh();
    }
}

/// Reads the files again every [`REFRESH`] until the secrets are dropped.
fn keep_fresh(shared: &Weak<Shared>) {
    loop {
        std::thread::sleep(REFRESH);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.refresh();
    }
}

impl Shared {
    fn refresh(&self) {
        for (name, path) in &self.files {
            let count = |result| {
                self.refreshes
                    .get_or_create(&RefreshLabels {
                        secret: name.clone(),
                        result,
                    })
                    .inc();
            };
            match read(path) {
                Ok(value) => {
                    let mut values = self.values.lock().expect("secret values");
                    if values.get(name) != Some(&value) {
                        values.insert(name.clone(), value);
                        self.generation.fetch_add(1, Ordering::AcqRel);
                        drop(values);
                        tracing::info!(secret = %name, path = %path.display(), "secret changed");
                        count("changed");
                    }
                }
                Err(reason) => {
                    tracing::warn!(
                        secret = %name,
                        path = %path.display(),
                        "cannot read the secret's file, keeping its last value: {reason}"
                    );
                    count("failed");
                }
            }
        }
    }
}

/// A secret file's content, as UTF-8 text (`wasi:config` values are strings), as written.
fn read(path: &std::path::Path) -> Result<Arc<str>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(format!("larger than {MAX_SECRET_BYTES} bytes"));
    }
    String::from_utf8(bytes)
        .map(Arc::from)
        .map_err(|_| "not UTF-8 text (a secret is read as a string)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &std::path::Path, names: &[&str]) -> SecretsSettings {
        SecretsSettings::from_table(names.iter().map(|n| (n.to_string(), dir.join(n))).collect())
            .expect("valid names")
    }

    #[test]
    fn a_grant_sees_its_secrets_only_and_a_rotation_after_a_refresh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokens"), "one\n").unwrap();
        std::fs::write(dir.path().join("other"), "not yours").unwrap();
        let metrics = Metrics::new();
        let secrets = Secrets::open(&settings(dir.path(), &["tokens", "other"]), &metrics).unwrap();

        let (first, values) = secrets.values(&["tokens".into(), "missing".into()]);
        assert_eq!(values, vec![("tokens".to_string(), "one\n".to_string())]);

        secrets.refresh();
        assert_eq!(
            secrets.generation(),
            first,
            "nothing changed, nothing rebuilt"
        );

        std::fs::write(dir.path().join("tokens"), "two").unwrap();
        secrets.refresh();
        let (second, values) = secrets.values(&["tokens".into()]);
        assert_ne!(second, first);
        assert_eq!(values, vec![("tokens".to_string(), "two".to_string())]);
        let text = metrics.render();
        assert!(
            text.contains(
                r#"wasm_extproc_secret_refreshes_total{secret="tokens",result="changed"} 1"#
            ),
            "{text}"
        );
        assert!(
            !text.contains("two") && !text.contains("not yours"),
            "{text}"
        );
    }

    #[test]
    fn an_unreadable_file_keeps_the_last_value_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "k1").unwrap();
        let metrics = Metrics::new();
        let secrets = Secrets::open(&settings(dir.path(), &["key"]), &metrics).unwrap();
        std::fs::remove_file(dir.path().join("key")).unwrap();
        secrets.refresh();
        assert_eq!(secrets.values(&["key".into()]).1[0].1, "k1");
        assert!(
            metrics
                .render()
                .contains(r#"wasm_extproc_secret_refreshes_total{secret="key",result="failed"} 1"#)
        );
    }

    #[test]
    fn a_missing_file_at_start_names_the_secret_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let error = Secrets::open(&settings(dir.path(), &["absent"]), &Metrics::new())
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("[secrets] absent = ") && error.contains("cannot open"),
            "{error}"
        );
    }

    #[test]
    fn binary_and_oversized_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bin"), [0xff, 0xfe]).unwrap();
        let error = Secrets::open(&settings(dir.path(), &["bin"]), &Metrics::new())
            .unwrap_err()
            .to_string();
        assert!(error.contains("not UTF-8"), "{error}");
        std::fs::write(
            dir.path().join("big"),
            vec![b'a'; MAX_SECRET_BYTES as usize + 1],
        )
        .unwrap();
        let error = Secrets::open(&settings(dir.path(), &["big"]), &Metrics::new())
            .unwrap_err()
            .to_string();
        assert!(error.contains("larger than"), "{error}");
    }

    #[test]
    fn names_and_grants_are_checked() {
        let bad = SecretsSettings::from_table([("a b".to_string(), "/x".into())].into());
        assert!(bad.unwrap_err().contains("a secret's name"));
        let good =
            SecretsSettings::from_table([("tokens".to_string(), "/x".into())].into()).unwrap();
        assert!(good.check_grant(&["tokens".into()]).is_ok());
        let error = good.check_grant(&["token".into()]).unwrap_err();
        assert!(
            error.contains("\"token\"") && error.contains("defined: tokens"),
            "{error}"
        );
    }
}
