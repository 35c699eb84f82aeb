//! Installs from the registries, for [`setup`](crate::setup) and for the languages'
//! toolchains ([`languages`](crate::languages)) alike: PyPI and npm packages into a directory
//! of their own, skipped when its marker names the same packages (a second `cargo xtask setup`
//! is quick), and Debian's packages in one `apt-get` call.

use std::path::Path;
use std::process::Command;

use crate::run;

/// `packages` from PyPI into the venv at `dir`, unless its marker says they are there.
pub fn venv(dir: &Path, packages: &[&str]) -> anyhow::Result<()> {
    unless_marked(dir, packages, || {
        run(Command::new("python3").arg("-m").arg("venv").arg(dir))?;
        run(Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(packages))
    })
}

/// `packages` from npm under `prefix`, unless its marker says they are there.
pub fn npm(prefix: &Path, packages: &[&str]) -> anyhow::Result<()> {
    unless_marked(prefix, packages, || {
        std::fs::create_dir_all(prefix)?;
        run(Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(prefix)
            .args(packages))
    })
}

/// Runs `install` unless `dir/.installed` names exactly `packages`; records them after.
fn unless_marked(
    dir: &Path,
    packages: &[&str],
    install: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let marker = dir.join(".installed");
    let wanted = packages.join(" ");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    install()?;
    std::fs::write(&marker, &wanted)?;
    Ok(())
}

/// Debian's `packages`, in one call, after refreshing the package lists (a fresh machine's may
/// be stale or missing).
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
