//! What the command-line tests share.

use std::path::{Path, PathBuf};

/// A path in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The build's target directory, where `cargo xtask` also installs the toolchains (`tools/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo("target"))
}

/// A component the build made (`cargo xtask build-plugins`). The bundled plugins need no WASI
/// (plugins/.cargo/config.toml); fixtures and other languages' examples use it.
pub fn built(name: &str) -> PathBuf {
    ["wasm32-unknown-unknown", "wasm32-wasip2"]
        .map(|t| target_dir().join(format!("{t}/release/{name}.wasm")))
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name}.wasm missing: run `cargo xtask build-plugins`"))
}
