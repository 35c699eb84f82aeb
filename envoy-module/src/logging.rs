//! `tracing` events -- the core's and the plugins' log lines -- written to Envoy's log, under
//! its `dynamic_modules` logger, at Envoy's level for it: `--component-log-level
//! dynamic_modules:debug` shows the module's debug lines. Envoy adds the time and the level.
//!
//! A line can come from a plugin running on a wasmtime fiber stack, where calling into Envoy
//! is not safe (Envoy's allocator walks the stack). So lines go through a channel to a thread
//! of the module's own, which writes them; and the level filter reads a copy of Envoy's level
//! that thread refreshes every second.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::abi::log_level;
use crate::envoy;

/// Lines waiting for the writer; past this many, new ones are dropped (and counted in a line
/// of their own) rather than holding a stream up.
const BACKLOG: usize = 10_000;

/// Envoy's level for the module's logger, as [`log_level`] numbers, refreshed by the writer.
static ENVOY_LEVEL: AtomicU32 = AtomicU32::new(log_level::INFO);

static LINES: OnceLock<SyncSender<(u32, String)>> = OnceLock::new();

/// Lines dropped because the backlog was full, since the writer last said so.
static DROPPED: AtomicU32 = AtomicU32::new(0);

/// Sends this process's `tracing` events to Envoy's log. Once per process; a later call (a
/// module loaded next to another subscriber) leaves the first in place.
pub fn init() {
    if LINES.get().is_some() {
        return;
    }
    let (lines, waiting) = std::sync::mpsc::sync_channel(BACKLOG);
    refresh_level();
    let started = std::thread::Builder::new()
        .name("wasm-extproc-log".into())
        .spawn(move || write(waiting));
    if started.is_err() || LINES.set(lines).is_err() {
        return;
    }
    // Only the module's own targets below info: wasmtime and Cranelift narrate compilation in
    // detail at debug.
    let filter = tracing_subscriber::filter::filter_fn(|metadata| {
        let level = level(*metadata.level());
        level >= ENVOY_LEVEL.load(Ordering::Relaxed)
            && (level >= log_level::INFO || metadata.target().starts_with("wasm_extproc"))
    });
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_writer(EnvoyLog);
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::Layer::with_filter(layer, filter))
        .try_init();
    // `try_init` let every `log` line through to the filter, which is called per line.
    limit_log_crate();
}

/// The writer thread: Envoy's log, off any fiber.
fn write(waiting: Receiver<(u32, String)>) {
    loop {
        match waiting.recv_timeout(Duration::from_secs(1)) {
            Ok((level, text)) => envoy::log(level, &text),
            Err(RecvTimeoutError::Timeout) => refresh_level(),
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            envoy::log(
                log_level::WARN,
                &format!("[wasm-extproc] {dropped} log lines dropped: Envoy's log fell behind"),
            );
        }
    }
}

fn refresh_level() {
    let lowest = [
        log_level::TRACE,
        log_level::DEBUG,
        log_level::INFO,
        log_level::WARN,
        log_level::ERROR,
    ]
    .into_iter()
    .find(|level| envoy::log_enabled(*level))
    .unwrap_or(log_level::OFF);
    ENVOY_LEVEL.store(lowest, Ordering::Relaxed);
    limit_log_crate();
}

/// Stops the lines the filter would drop where they are made: wasmtime logs through the `log`
/// crate, below info on every instantiation and drop (four lines an exchange, each a trip
/// through the subscriber to be filtered out). Only the module's own targets go below info,
/// and they log through `tracing`.
fn limit_log_crate() {
    let filter = match ENVOY_LEVEL.load(Ordering::Relaxed).max(log_level::INFO) {
        log_level::INFO => log::LevelFilter::Info,
        log_level::WARN => log::LevelFilter::Warn,
        log_level::ERROR => log::LevelFilter::Error,
        _ => log::LevelFilter::Off,
    };
    log::set_max_level(filter);
}

fn level(level: Level) -> u32 {
    match level {
        Level::TRACE => log_level::TRACE,
        Level::DEBUG => log_level::DEBUG,
        Level::INFO => log_level::INFO,
        Level::WARN => log_level::WARN,
        Level::ERROR => log_level::ERROR,
    }
}

/// Makes a [`Line`] per event, knowing its level.
#[derive(Debug, Clone, Copy)]
struct EnvoyLog;

/// One event's text, written to Envoy's log when complete.
#[derive(Debug)]
struct Line {
    level: u32,
    text: Vec<u8>,
}

impl<'a> MakeWriter<'a> for EnvoyLog {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            level: log_level::INFO,
            text: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, metadata: &tracing::Metadata<'_>) -> Line {
        Line {
            level: level(*metadata.level()),
            text: Vec::new(),
        }
    }
}

impl io::Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.text);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        let Some(lines) = LINES.get() else {
            return;
        };
        if let Err(TrySendError::Full(_)) =
            lines.try_send((self.level, format!("[wasm-extproc] {text}")))
        {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}
