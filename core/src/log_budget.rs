//! A plugin's log budget: how many lines it may write through `host.log`.
//!
//! A plugin calling `host.log` in a loop would otherwise write megabytes of log per request
//! before its deadline stops it; at a thousand requests a second, gigabytes a second into the
//! node's log pipeline. Each plugin gets a token bucket (`log_lines_per_second` lines a second,
//! bursts of as many), shared by all its instances and streams. Lines over it are dropped and
//! counted (`wasm_extproc_plugin_log_lines_suppressed_total`), and at most one line per
//! [`SUMMARY_PERIOD`] says how many were dropped, the first as soon as one is. What a WASI
//! plugin writes to stdout and stderr goes the same way, a line at a time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tracing::Level;

/// Longest line a plugin may write; longer ones are cut, so one call cannot flood the log.
pub const MAX_LINE_BYTES: usize = 4096;

/// Where a plugin's line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `host.log`.
    Log,
    /// WASI stdout.
    Stdout,
    /// WASI stderr.
    Stderr,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Log => "log",
            Source::Stdout => "stdout",
            Source::Stderr => "stderr",
        }
    }
}

/// How often a plugin over its budget gets a line saying how many of its lines were dropped.
pub const SUMMARY_PERIOD: Duration = Duration::from_secs(5);

/// One plugin's budget. Shared by every instance of one plugin in one chain generation.
#[derive(Debug)]
pub struct LogBudget {
    chain: Arc<str>,
    plugin: Arc<str>,
    lines_per_second: u32,
    bucket: Mutex<Bucket>,
    /// Every line dropped, for the metric.
    suppressed: Counter,
}

#[derive(Debug)]
struct Bucket {
    /// Time earned toward lines, in nanoseconds: a line costs a second divided by the rate,
    /// and the bucket holds at most one second's worth.
    credit: u64,
    refilled: Instant,
    /// Lines dropped since the last summary.
    unreported: u64,
    /// When the last summary was written; `None` before the first.
    reported: Option<Instant>,
}

/// What becomes of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Whether the line is written.
    pub write: bool,
    /// Lines dropped since the last summary, when a summary is due now.
    pub summary: Option<u64>,
}

impl LogBudget {
    /// A full bucket for `plugin`, counting dropped lines into `suppressed`.
    pub fn new(
        chain: Arc<str>,
        plugin: Arc<str>,
        lines_per_second: u32,
        suppressed: Counter,
    ) -> LogBudget {
        LogBudget {
            chain,
            plugin,
            lines_per_second,
            bucket: Mutex::new(Bucket {
                credit: capacity(lines_per_second),
                refilled: Instant::now(),
                unreported: 0,
                reported: None,
            }),
            suppressed,
        }
    }

    pub fn lines_per_second(&self) -> u32 {
        self.lines_per_second
    }

    /// Takes a line's token at `now`, if there is one.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(bucket.refilled).as_nanos();
        bucket.credit = (u128::from(bucket.credit) + elapsed)
            .min(u128::from(capacity(self.lines_per_second))) as u64;
        bucket.refilled = now;
        let cost = cost(self.lines_per_second);
        let write = bucket.credit >= cost;
        if write {
            bucket.credit -= cost;
        } else {
            bucket.unreported += 1;
            self.suppressed.inc();
        }
        let due = bucket
            .reported
            .is_none_or(|at| now.saturating_duration_since(at) >= SUMMARY_PERIOD);
        let summary = (bucket.unreported > 0 && due).then(|| {
            bucket.reported = Some(now);
            std::mem::take(&mut bucket.unreported)
        });
        Admission { write, summary }
    }

    /// Writes one of the plugin's lines at `level`, from `source`, during `phase`: if the log
    /// shows that level (a hidden line costs no budget) and the budget has room. Cut at
    /// [`MAX_LINE_BYTES`].
    pub fn write(&self, level: Level, phase: &str, source: Source, line: &str) {
        let enabled = match level {
            Level::TRACE => tracing::enabled!(target: "plugin", Level::TRACE),
            Level::DEBUG => tracing::enabled!(target: "plugin", Level::DEBUG),
            Level::INFO => tracing::enabled!(target: "plugin", Level::INFO),
            Level::WARN => tracing::enabled!(target: "plugin", Level::WARN),
            _ => tracing::enabled!(target: "plugin", Level::ERROR),
        };
        if !enabled {
            return;
        }
        let admission = self.admit(Instant::now());
        if let Some(dropped) = admission.summary {
            self.report(dropped);
        }
        if !admission.write {
            return;
        }
        let mut line = std::borrow::Cow::Borrowed(line);
        if line.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line = format!("{}...", &line[..cut]).into();
        }
        let (chain, plugin) = (&*self.chain, &*self.plugin);
        let source = source.as_str();
        match level {
            Level::TRACE => {
                tracing::trace!(target: "plugin", chain, plugin, phase, source, "{line}")
            }
            Level::DEBUG => {
                tracing::debug!(target: "plugin", chain, plugin, phase, source, "{line}")
            }
            Level::INFO => tracing::info!(target: "plugin", chain, plugin, phase, source, "{line}"),
            Level::WARN => tracing::warn!(target: "plugin", chain, plugin, phase, source, "{line}"),
            _ => tracing::error!(target: "plugin", chain, plugin, phase, source, "{line}"),
        }
    }

    /// Writes the summary line for `dropped` lines.
    pub fn report(&self, dropped: u64) {
        tracing::warn!(
            target: "plugin",
            chain = &*self.chain,
            plugin = &*self.plugin,
            suppressed = dropped,
            "plugin {}: {dropped} log lines suppressed (over its budget of {} lines a second; \
             `log_lines_per_second`)",
            self.plugin,
            self.lines_per_second,
        );
    }
}

const SECOND_NANOS: u64 = 1_000_000_000;

/// What one line costs, in nanoseconds of credit; never affordable at zero lines a second.
fn cost(lines_per_second: u32) -> u64 {
    SECOND_NANOS
        .checked_div(u64::from(lines_per_second))
        .unwrap_or(u64::MAX)
}

/// The most credit a bucket holds: exactly `lines_per_second` lines.
fn capacity(lines_per_second: u32) -> u64 {
    cost(lines_per_second).saturating_mul(u64::from(lines_per_second))
}

impl Drop for LogBudget {
    /// The last summary, when the plugin's generation is replaced or the host stops.
    fn drop(&mut self) {
        let unreported = self
            .bucket
            .get_mut()
            .map_or(0, |bucket| std::mem::take(&mut bucket.unreported));
        if unreported > 0 {
            self.report(unreported);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(lines_per_second: u32) -> (LogBudget, Counter) {
        let counter = Counter::default();
        (
            LogBudget::new(
                "default".into(),
                "p".into(),
                lines_per_second,
                counter.clone(),
            ),
            counter,
        )
    }

    #[test]
    fn a_burst_of_one_seconds_worth_is_written_then_the_rate() {
        let (budget, suppressed) = budget(10);
        let start = Instant::now();
        let written = (0..1_000).filter(|_| budget.admit(start).write).count();
        assert_eq!(written, 10);
        assert_eq!(suppressed.get(), 990);
        // Half a second later, half a second's worth more.
        let later = start + Duration::from_millis(500);
        let written = (0..1_000).filter(|_| budget.admit(later).write).count();
        assert_eq!(written, 5);
        // The bucket never holds more than one second's worth, however long it rests.
        let much_later = start + Duration::from_secs(3600);
        let written = (0..1_000)
            .filter(|_| budget.admit(much_later).write)
            .count();
        assert_eq!(written, 10);
    }

    #[test]
    fn zero_lines_a_second_drops_every_line() {
        let (budget, suppressed) = budget(0);
        let start = Instant::now();
        assert!(!budget.admit(start).write);
        assert!(!budget.admit(start + Duration::from_secs(10)).write);
        assert_eq!(suppressed.get(), 2);
    }

    #[test]
    fn one_summary_per_period_counts_every_dropped_line() {
        let (budget, _) = budget(1);
        let start = Instant::now();
        assert_eq!(
            budget.admit(start),
            Admission {
                write: true,
                summary: None
            }
        );
        // The first dropped line is reported at once, the next ones a period later.
        assert_eq!(budget.admit(start).summary, Some(1));
        let mut summaries = Vec::new();
        let mut now = start;
        for _ in 0..100 {
            now += Duration::from_millis(100);
            for _ in 0..10 {
                if let Some(dropped) = budget.admit(now).summary {
                    summaries.push((now - start, dropped));
                }
            }
        }
        // 10 s of 100 lines a second against 1 a second: a summary at 5 s and at 10 s,
        // together every line dropped after the first report.
        assert_eq!(summaries.len(), 2, "{summaries:?}");
        assert_eq!(summaries[0].0, SUMMARY_PERIOD);
        let dropped: u64 = summaries.iter().map(|(_, n)| n).sum();
        // 1,000 lines in 10 s, 10 written (one a second); the last 0.1 s's lines came after
        // the second summary.
        assert_eq!(dropped, 1_000 - 10 - 9);
    }
}
