//! Who signed a plugin, in the WebAssembly signatures format of the tool conventions
//! (`wasmsign2`): a signature embedded in the component's first custom section, or detached
//! beside it in `NAME.wasm.sig`. Plugin builders sign with `wasmsign2 sign` or
//! `wasm-extproc sign`; operators list the public keys they trust (`[signing] trusted_keys`,
//! any format `wasmsign2` reads: PEM, DER, raw or OpenSSH) and, with
//! `require_signatures = true`, the host loads nothing else.

use std::path::{Path, PathBuf};

use wasmsign2::{PublicKey, PublicKeySet, WSError};

use crate::config::{ConfigError, SigningSettings};

/// The keys a load checks plugins against, read from their files at every load so a rotated
/// key takes effect with the next reload.
#[derive(Debug)]
pub struct Trust {
    keys: Vec<(PublicKey, String)>,
    required: bool,
}

/// What a plugin's signature says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// No trusted keys are configured: nothing was checked.
    NotChecked,
    /// Signed by the trusted key in this file (its file name).
    SignedBy(String),
    /// Not signed, or not by a trusted key (and signatures are not required).
    Untrusted(String),
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signature::NotChecked => f.write_str("not checked (no trusted_keys)"),
            Signature::SignedBy(key) => write!(f, "signed by {key}"),
            Signature::Untrusted(why) => write!(f, "untrusted: {why}"),
        }
    }
}

impl Trust {
    /// Reads the trusted keys `settings` names.
    pub fn load(settings: &SigningSettings) -> Result<Trust, ConfigError> {
        if settings.require_signatures && settings.trusted_keys.is_empty() {
            return Err(ConfigError(
                "[signing] require_signatures needs trusted_keys: no plugin could be loaded".into(),
            ));
        }
        let keys = settings
            .trusted_keys
            .iter()
            .map(|path| {
                let key = PublicKey::from_any_file(path).map_err(|e| {
                    ConfigError(format!(
                        "[signing] trusted_keys: {} is not a public key wasmsign2 reads (PEM, \
                         DER, raw Ed25519 or OpenSSH): {e}",
                        path.display()
                    ))
                })?;
                Ok((key, key_name(path)))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Trust {
            keys,
            required: settings.require_signatures,
        })
    }

    /// Checks the component `bytes` read from `path` (and `path.sig`, if there is one). An
    /// error, when signatures are required and it is not signed by a trusted key, says why.
    pub fn check(&self, path: &Path, bytes: &[u8]) -> Result<Signature, String> {
        if self.keys.is_empty() {
            return Ok(Signature::NotChecked);
        }
        let detached_path = detached(path);
        let detached = match std::fs::read(&detached_path) {
            Ok(signature) => Some(signature),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", detached_path.display())),
        };
        let set = PublicKeySet::new(self.keys.iter().map(|(key, _)| key.clone()).collect());
        let verdict = match set.verify(&mut std::io::Cursor::new(bytes), detached.as_deref()) {
            Ok(signers) => match self.keys.iter().find(|(key, _)| signers.contains(key)) {
                Some((_, name)) => return Ok(Signature::SignedBy(name.clone())),
                None => "signed by none of the trusted keys".to_string(),
            },
            Err(WSError::NoSignatures) => format!(
                "not signed (no signature section, no {})",
                detached_path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ),
            Err(WSError::VerificationFailed) => {
                "signed by none of the trusted keys, or changed after it was signed".to_string()
            }
            Err(e) => format!("its signature cannot be read: {e}"),
        };
        if self.required {
            Err(format!(
                "{verdict}, and [signing] require_signatures is on; sign it with one of \
                 trusted_keys' secret keys (wasm-extproc sign)"
            ))
        } else {
            Ok(Signature::Untrusted(verdict))
        }
    }
}

/// Where a detached signature of `path` lies: `NAME.wasm.sig`.
pub fn detached(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

fn key_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmsign2::{KeyPair, Module};

    /// A component of a header and one custom section `x` holding `abc`.
    const COMPONENT: [u8; 15] = [
        0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x05, 0x01, b'x', b'a', b'b', b'c',
    ];

    fn signed(pair: &KeyPair, bytes: &[u8]) -> Vec<u8> {
        let module = Module::deserialize(&mut std::io::Cursor::new(bytes)).unwrap();
        let module = pair.sk.sign(module, None).unwrap();
        let mut out = Vec::new();
        module.serialize(&mut out).unwrap();
        out
    }

    fn trust(dir: &Path, keys: &[&KeyPair], required: bool) -> Trust {
        let trusted_keys = keys
            .iter()
            .enumerate()
            .map(|(i, pair)| {
                let path = dir.join(format!("key{i}.pub"));
                pair.pk.to_file(&path).unwrap();
                path
            })
            .collect();
        Trust::load(&SigningSettings {
            require_signatures: required,
            trusted_keys,
        })
        .unwrap()
    }

    #[test]
    fn only_a_trusted_key_s_signature_over_the_bytes_as_they_are_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (KeyPair::generate(), KeyPair::generate());
        let trust = trust(dir.path(), &[&ours], true);
        let path = dir.path().join("p.wasm");

        let good = signed(&ours, &COMPONENT);
        assert_eq!(
            trust.check(&path, &good),
            Ok(Signature::SignedBy("key0.pub".into()))
        );
        let error = trust.check(&path, &COMPONENT).unwrap_err();
        assert!(
            error.starts_with("not signed (no signature section, no p.wasm.sig)"),
            "{error}"
        );
        let error = trust
            .check(&path, &signed(&theirs, &COMPONENT))
            .unwrap_err();
        assert!(
            error.starts_with("signed by none of the trusted keys"),
            "{error}"
        );
        // A byte changed after signing.
        let mut tampered = good.clone();
        *tampered.last_mut().unwrap() = b'd';
        let error = trust.check(&path, &tampered).unwrap_err();
        assert!(error.contains("changed after it was signed"), "{error}");

        // Detached: the signature beside the untouched file.
        let (_, signature) = Module::deserialize(&mut std::io::Cursor::new(&good))
            .unwrap()
            .detach_signature()
            .unwrap();
        std::fs::write(detached(&path), signature).unwrap();
        assert_eq!(
            trust.check(&path, &COMPONENT),
            Ok(Signature::SignedBy("key0.pub".into()))
        );
    }

    #[test]
    fn without_require_signatures_the_status_is_reported_not_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let pair = KeyPair::generate();
        let lenient = trust(dir.path(), &[&pair], false);
        assert!(matches!(
            lenient.check(&dir.path().join("p.wasm"), &COMPONENT),
            Ok(Signature::Untrusted(_))
        ));
        let none = trust(dir.path(), &[], false);
        assert_eq!(
            none.check(&dir.path().join("p.wasm"), &COMPONENT),
            Ok(Signature::NotChecked)
        );
        let error = Trust::load(&SigningSettings {
            require_signatures: true,
            trusted_keys: Vec::new(),
        })
        .unwrap_err();
        assert!(error.to_string().contains("needs trusted_keys"), "{error}");
    }
}
