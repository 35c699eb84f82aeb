//! The release host binary, started as an operator would for the measurements (`reliability`,
//! `bench`): its own plugins directory and config file, and ready before anyone calls it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::{KillOnDrop, target_dir, wait_until_ready};

/// A running `target/release/wasm-extproc`; killed, and its directory removed, when dropped.
pub(crate) struct ReleaseHost {
    pub(crate) process: KillOnDrop,
    pub(crate) address: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ReleaseHost {
    /// Serves `plugins` (file name, component) on `port`, admin on `admin_port`, with
    /// `settings` (TOML) appended to the config and `RUST_LOG` at `log_level`.
    pub(crate) fn start(
        plugins: &[(&str, &Path)],
        settings: &str,
        (port, admin_port): (u16, u16),
        log_level: &str,
    ) -> anyhow::Result<ReleaseHost> {
        let binary = binary()?;
        let dir = tempfile::tempdir()?;
        let plugins_dir = dir.path().join("plugins");
        std::fs::create_dir(&plugins_dir)?;
        for (name, component) in plugins {
            std::fs::copy(component, plugins_dir.join(name))
                .with_context(|| component.display().to_string())?;
        }
        let config = dir.path().join("host.toml");
        std::fs::write(
            &config,
            format!(
                "plugins_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n{settings}",
                plugins_dir.display().to_string()
            ),
        )?;
        let mut process = KillOnDrop(
            Command::new(binary)
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", log_level)
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start wasm-extproc")?,
        );
        wait_until_ready(([127, 0, 0, 1], admin_port).into(), &mut process.0)?;
        Ok(ReleaseHost {
            process,
            address: ([127, 0, 0, 1], port).into(),
            _dir: dir,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.0.id()
    }
}

/// `target/release/wasm-extproc`, which the caller has built.
fn binary() -> anyhow::Result<PathBuf> {
    let binary = target_dir().join("release/wasm-extproc");
    if !binary.is_file() {
        bail!(
            "{} is missing: `cargo build --release -p wasm-extproc` builds it",
            binary.display()
        );
    }
    Ok(binary)
}

/// The resident set of process `pid`, from /proc/PID/status.
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_rss_kib(&status).context("no VmRSS in /proc/PID/status")
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\twasm-extproc\nVmPeak:\t 1234 kB\nVmRSS:\t   27956 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(status), Some(27956));
        assert_eq!(parse_rss_kib("Name:\tx\n"), None);
    }
}
