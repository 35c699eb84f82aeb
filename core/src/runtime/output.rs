//! The logging capability: what a plugin logs through `host.log`, and a WASI plugin's stdout
//! and stderr, into the host's log, a line at a time, tagged with the plugin, the phase and the
//! stream, on the plugin's log budget. What a JavaScript plugin's `console.log` prints, and the
//! message and stack an uncaught exception leaves on stderr before its trap, end up beside the
//! host's own line about the failure.
//!
//! It also links WASI itself, with nothing of the host in it: no preopened directories, no
//! environment, no arguments, no sockets. Output is all a plugin gets from it that reaches
//! outside its instance.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tracing::Level;
use wasmtime::component::Linker;
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

use super::capability::{Capability, Host, PluginId};
use crate::config::{PluginSettings, Settings};
use crate::http::Phase;
use crate::log_budget::{LogBudget, MAX_LINE_BYTES, Source};
use crate::metrics::Metrics;

/// Logging, and WASI without authority.
pub struct Logging {
    metrics: Arc<Metrics>,
}

impl Capability for Logging {
    type Settings = ();
    /// The plugin's log budget, shared by its instances.
    type Grant = Arc<LogBudget>;
    type Store = LogStore;

    fn settings(_: &Settings) {}

    fn new((): &(), metrics: &Arc<Metrics>) -> anyhow::Result<Logging> {
        Ok(Logging {
            metrics: metrics.clone(),
        })
    }

    fn link<T: Host<Self>>(linker: &mut Linker<T>) -> anyhow::Result<()> {
        wasmtime_wasi::p2::add_to_linker_async(linker).map_err(super::to_anyhow)
    }

    fn grant(&self, plugin: PluginId<'_>, settings: &PluginSettings) -> Arc<LogBudget> {
        Arc::new(LogBudget::new(
            plugin.chain.into(),
            plugin.name.into(),
            settings.log_lines_per_second,
            self.metrics.log_lines_suppressed(plugin.chain, plugin.name),
        ))
    }

    fn store(budget: &Arc<LogBudget>) -> LogStore {
        LogStore {
            budget: budget.clone(),
            wasi: None,
            output: None,
        }
    }
}

/// One store's logging: its plugin's budget, and its WASI context once the plugin uses WASI.
pub struct LogStore {
    budget: Arc<LogBudget>,
    /// Made on the first WASI call: most plugins never make one, and building a context
    /// (clocks, random sources) is a measurable part of a stream's cost.
    wasi: Option<WasiCtx>,
    /// The WASI context's stdout and stderr; made with it.
    output: Option<GuestOutput>,
}

impl LogStore {
    /// Writes a line the plugin logged in `phase` (`None`: while it loaded).
    pub fn write(&self, level: Level, phase: Option<Phase>, message: &str) {
        self.budget
            .write(level, phase_name(phase), Source::Log, message);
    }

    /// Lines written from now on belong to `phase`.
    pub fn set_phase(&self, phase: Option<Phase>) {
        if let Some(output) = &self.output {
            output.set_phase(phase_name(phase));
        }
    }

    /// Writes out what the plugin left unfinished on stdout and stderr.
    pub fn flush(&self) {
        if let Some(output) = &self.output {
            output.flush();
        }
    }

    /// The store's WASI context, made on first use, its output tagged with `phase`.
    pub fn wasi(&mut self, phase: Option<Phase>) -> &mut WasiCtx {
        self.wasi.get_or_insert_with(|| {
            let output = GuestOutput::new(self.budget.clone());
            output.set_phase(phase_name(phase));
            let ctx = WasiCtx::builder()
                .stdout(output.stream(Source::Stdout))
                .stderr(output.stream(Source::Stderr))
                .build();
            self.output = Some(output);
            ctx
        })
    }
}

fn phase_name(phase: Option<Phase>) -> &'static str {
    phase.map_or("load", Phase::as_str)
}

/// What one store's two streams share: the unfinished line of each, and the phase now.
#[derive(Debug)]
struct Lines {
    budget: Arc<LogBudget>,
    phase: &'static str,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Both streams of one store, and the handle that tells them the phase.
#[derive(Debug, Clone)]
pub struct GuestOutput(Arc<Mutex<Lines>>);

impl GuestOutput {
    pub fn new(budget: Arc<LogBudget>) -> GuestOutput {
        GuestOutput(Arc::new(Mutex::new(Lines {
            budget,
            phase: "load",
            stdout: Vec::new(),
            stderr: Vec::new(),
        })))
    }

    /// The stream for `source` (stdout or stderr).
    pub fn stream(&self, source: Source) -> GuestStream {
        GuestStream {
            lines: self.0.clone(),
            source,
        }
    }

    /// Lines written from now on belong to `phase`.
    pub fn set_phase(&self, phase: &'static str) {
        self.lock().phase = phase;
    }

    /// Writes what is left of unfinished lines: at the end of each call, so that what a plugin
    /// printed without a newline before trapping is not held back.
    pub fn flush(&self) {
        let mut lines = self.lock();
        for source in [Source::Stdout, Source::Stderr] {
            let rest = std::mem::take(lines.buffer(source));
            if !rest.is_empty() {
                lines.emit(source, &rest);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Lines {
    fn buffer(&mut self, source: Source) -> &mut Vec<u8> {
        match source {
            Source::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        }
    }

    fn emit(&self, source: Source, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches(['\r', '\n']);
        let level = match source {
            Source::Stderr => Level::WARN,
            _ => Level::INFO,
        };
        self.budget.write(level, self.phase, source, line);
    }

    /// Takes `bytes`, writing every line they complete. An unfinished line longer than the
    /// longest line is written cut, and the rest of it up to its newline dropped.
    fn take(&mut self, source: Source, mut bytes: &[u8]) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(self.buffer(source));
            if line.len() <= MAX_LINE_BYTES {
                line.extend_from_slice(&bytes[..end]);
                self.emit(source, &line);
            }
            bytes = &bytes[end + 1..];
        }
        let buffer = self.buffer(source);
        if buffer.len() <= MAX_LINE_BYTES {
            let room = MAX_LINE_BYTES + 1 - buffer.len();
            buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
            if buffer.len() > MAX_LINE_BYTES {
                // Written now, cut; its tail is dropped (the buffer stays over the limit until
                // the newline).
                let long = buffer.clone();
                self.emit(source, &long);
            }
        }
    }
}

/// One of a store's output streams, as WASI sees it.
#[derive(Debug, Clone)]
pub struct GuestStream {
    lines: Arc<Mutex<Lines>>,
    source: Source,
}

impl GuestStream {
    fn take(&self, bytes: &[u8]) {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(self.source, bytes);
    }
}

impl IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Never blocks, never fails: the log takes what it takes and the budget drops the rest.
const WRITE_PERMIT: usize = 64 * 1024;

impl OutputStream for GuestStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStream {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.take(bytes);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
