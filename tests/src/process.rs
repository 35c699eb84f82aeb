//! The host binary, started as an operator would (its own plugins directory and config file,
//! ready before anyone calls it), for what only a process of its own shows: its resident
//! memory, its exit. The measurements (`cargo xtask reliability`, `bench`) run the release
//! build; system tests the test profile's.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Which build of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The binary of the profile the tests were built in (`cargo test --workspace` builds it:
    /// `target/debug/wasm-extproc`, or `target/release/` under `--release`).
    Test,
    /// `target/release/wasm-extproc`.
    Release,
    /// `target/dist/wasm-extproc`: release with thin LTO, as the image ships it.
    Dist,
}

/// A running host process; killed, and its directory removed, when dropped.
#[derive(Debug)]
pub struct HostProcess {
    pub process: KillOnDrop,
    pub address: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl HostProcess {
    /// Serves `plugins` (file name, component) on `ports` (ext_proc, admin; free ones if
    /// `None`), with `settings` (TOML) appended to the config and `RUST_LOG` at `log_level`.
    pub fn start(
        profile: Profile,
        plugins: &[(&str, &Path)],
        settings: &str,
        ports: Option<(u16, u16)>,
        log_level: &str,
    ) -> anyhow::Result<HostProcess> {
        let binary = binary(profile)?;
        let (port, admin_port) = match ports {
            Some(ports) => ports,
            None => (free_port()?, free_port()?),
        };
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
                .env_remove("WASM_EXTPROC_CONFIG")
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start wasm-extproc")?,
        );
        let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
        wait_until_ready(admin, &mut process.0)?;
        Ok(HostProcess {
            process,
            address: ([127, 0, 0, 1], port).into(),
            admin,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Its resident set now.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid())
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The host binary of `profile`, which the caller has built.
pub fn binary(profile: Profile) -> anyhow::Result<PathBuf> {
    let (dir, build) = match profile {
        Profile::Test if crate::PROFILE_DIR == "debug" => ("debug", "cargo build -p wasm-extproc"),
        Profile::Test | Profile::Release => ("release", "cargo build --release -p wasm-extproc"),
        Profile::Dist => ("dist", "cargo build --profile dist -p wasm-extproc"),
    };
    let binary = crate::fixtures::target_dir().join(dir).join("wasm-extproc");
    if !binary.is_file() {
        bail!("{} is missing: `{build}` builds it", binary.display());
    }
    Ok(binary)
}

/// Waits until the host's admin listener at `admin` says it is ready (plugins loaded).
pub fn wait_until_ready(admin: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    wait_for_port(admin, child)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Plain blocking HTTP: callers may be inside an async runtime.
    let ready = || -> std::io::Result<bool> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(admin)?;
        stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer.starts_with("HTTP/1.1 200"))
    };
    loop {
        if ready().unwrap_or(false) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("wasm-extproc exited with {status}");
        }
        if Instant::now() > deadline {
            bail!("wasm-extproc did not load its plugins within two minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until something listens on `address`, or `child` has exited.
pub fn wait_for_port(address: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(address).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("wasm-extproc exited with {status}");
        }
        if Instant::now() > deadline {
            bail!("wasm-extproc did not listen on {address} within a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The resident set of process `pid`, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
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
