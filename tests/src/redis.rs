//! A real Redis (`redis-server`, from Debian; `cargo xtask` installs it) on a loopback port,
//! with nothing saved to disk, for the state store's shared backend. It can be stopped and
//! started again on the same port, as an outage would.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running `redis-server`. Killed when dropped.
#[derive(Debug)]
pub struct Redis {
    pub address: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server on a free loopback port.
    pub fn start() -> anyhow::Result<Redis> {
        let address = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut redis = Redis {
            address,
            dir: tempfile::tempdir()?,
            child: None,
        };
        redis.resume()?;
        Ok(redis)
    }

    /// The URL hosts are configured with.
    pub fn url(&self) -> String {
        format!("redis://{}", self.address)
    }

    /// Stops the server, as a crash would: every connection to it breaks.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.address.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "redis-server (Debian's redis-server package; `cargo xtask test` installs it)",
            )?;
        self.child = Some(child);
        wait_for(self.address)
    }
}

impl Redis {
    /// Every key the server holds, sorted: what tests read to see that nothing was left behind.
    pub fn keys(&self) -> anyhow::Result<Vec<String>> {
        use std::io::{BufRead, BufReader, Write};
        let mut stream = TcpStream::connect(self.address)?;
        stream.write_all(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let count: usize = line
            .trim()
            .strip_prefix('*')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("KEYS answered {line:?}"))?;
        let mut keys = Vec::with_capacity(count);
        for _ in 0..count {
            line.clear();
            reader.read_line(&mut line)?; // $LENGTH
            line.clear();
            reader.read_line(&mut line)?;
            keys.push(line.trim_end_matches("\r\n").to_string());
        }
        keys.sort();
        Ok(keys)
    }
}

/// Waits until the server answers `PING`.
fn wait_for(address: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut stream) = TcpStream::connect(address) {
            let mut answer = [0u8; 7];
            if stream.write_all(b"PING\r\n").is_ok()
                && stream.read_exact(&mut answer).is_ok()
                && &answer == b"+PONG\r\n"
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("redis-server did not answer on {address} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
