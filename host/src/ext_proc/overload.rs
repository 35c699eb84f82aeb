//! Overload: how far behind the host runs, and new streams refused while it runs too far
//! behind to answer them in time.
//!
//! Envoy waits `message_timeout` (200 ms by default) for each answer, then fails the request,
//! or with `failure_mode_allow` lets it through unprocessed. When more work arrives than the
//! cores can do -- plugins that compute for milliseconds, a burst of streams -- every message
//! waits its turn in the runtime's queue, and each stream accepted then lengthens the wait of
//! every stream already in progress. The host measures that wait: a probe asks to be woken
//! every [`PROBE_INTERVAL`], then puts itself at the back of its worker's queue and notes how
//! long it takes to come round, which is how long anything made ready at that moment (a
//! stream's next message, a new stream) waits before a worker gets to it. A wait still under
//! way counts as soon as it is long enough: the first burst past saturation is shed while the
//! probe is still queued behind it.
//!
//! While that lag is at or over `[overload] shed_after_ms`, a new stream is refused with
//! `UNAVAILABLE` before anything is spent on it (no instance, no plugin call), so that the
//! cores go to the streams in progress, which are never refused; Envoy's `failure_mode_allow`
//! decides what the refused request gets. Refusals count as
//! `refused_total{listener="ext_proc",reason="overload"}`; the lag is `runtime_lag_seconds`.
//!
//! By default the threshold is Envoy's `message_timeout` (`[envoy] message_timeout_ms`): a
//! stream that would wait that long before its first message is even looked at is one Envoy
//! fails anyway, so refusing it at once loses nothing, and its share of the cores goes to the
//! streams in progress instead of to an answer nobody waits for. A lower threshold sheds
//! earlier, trading requests failed at once (or passed on unprocessed) for fewer late answers.
//!
//! The probe runs while streams keep opening, every [`PROBE_INTERVAL`] while the host runs
//! behind and every [`QUIET_INTERVAL`] while it keeps up; an idle host is not woken for it.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// How often the probe measures while the host runs behind...
pub const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// ...and while it keeps up (a lag under [`BEHIND`]).
pub const QUIET_INTERVAL: Duration = Duration::from_millis(100);
const BEHIND: Duration = Duration::from_millis(1);

/// The lag the host runs at, and what it sheds for it. Cheap to consult per stream.
#[derive(Debug)]
pub struct Overload {
    /// The last lag measured, µs; 0 while the host is not busy.
    lag_us: AtomicU64,
    /// When the probe queued itself, µs after `origin`, while it waits; else 0.
    queued_at_us: AtomicU64,
    origin: Instant,
    /// New streams are refused while the lag is at or over this; `None`: never.
    shed_after: Option<Duration>,
    /// Woken when a stream opens while the probe rests.
    busy: Notify,
    resting: AtomicBool,
    /// Whether a stream opened since the probe last looked.
    opened: AtomicBool,
    /// `runtime_lag_seconds`.
    gauge: Gauge<f64, AtomicU64>,
}

impl Overload {
    /// Sheds new streams at a lag of `shed_after` (`None`: never). The lag is measured once
    /// [`probe`](Self::probe) runs.
    pub fn new(shed_after: Option<Duration>, metrics: &Metrics) -> Arc<Overload> {
        let gauge = metrics.family(
            "runtime_lag_seconds",
            "How long work made ready now waits for a worker (measured while streams keep \
             opening, else 0): new ext_proc streams are refused while it is at or over \
             [overload] shed_after_ms",
            Gauge::<f64, AtomicU64>::default,
        );
        Arc::new(Overload {
            lag_us: AtomicU64::new(0),
            queued_at_us: AtomicU64::new(0),
            origin: Instant::now(),
            shed_after,
            busy: Notify::new(),
            resting: AtomicBool::new(false),
            opened: AtomicBool::new(false),
            gauge,
        })
    }

    /// The lag when it is too long to take a new stream on; `None` when the stream may open.
    pub fn shedding(&self) -> Option<Duration> {
        let shed_after = self.shed_after?;
        let mut lag = self.lag_us.load(Ordering::Relaxed);
        let queued_at = self.queued_at_us.load(Ordering::Relaxed);
        if queued_at != 0 {
            lag = lag.max(self.now_us().saturating_sub(queued_at));
        }
        let lag = Duration::from_micros(lag);
        (lag >= shed_after).then_some(lag)
    }

    /// µs since `origin`, at least 1.
    fn now_us(&self) -> u64 {
        (self.origin.elapsed().as_micros() as u64).max(1)
    }

    /// The lag at which streams are shed.
    pub fn shed_after(&self) -> Option<Duration> {
        self.shed_after
    }

    /// A stream opened: the probe, if it rests, starts measuring.
    pub fn stream_opened(&self) {
        // Loads first: under load every stream passes here, and a store would move the cache
        // line between the workers each time.
        if !self.opened.load(Ordering::Relaxed) {
            self.opened.store(true, Ordering::Relaxed);
        }
        if self.resting.load(Ordering::Relaxed) && self.resting.swap(false, Ordering::Relaxed) {
            self.busy.notify_one();
        }
    }

    fn set_lag(&self, lag: Duration) {
        self.lag_us.store(
            lag.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
        self.gauge.set(lag.as_secs_f64());
    }

    /// Measures the lag for as long as it runs: spawn it on the runtime that serves the
    /// streams.
    pub async fn probe(self: Arc<Self>) {
        let mut lag = Duration::ZERO;
        loop {
            if !self.opened.swap(false, Ordering::Relaxed) {
                // No stream opened since the last look: nothing to shed, nothing to measure.
                lag = Duration::ZERO;
                self.set_lag(lag);
                let woken = self.busy.notified();
                self.resting.store(true, Ordering::Relaxed);
                // A stream that opened before `resting` was set woke nobody.
                if !self.opened.load(Ordering::Relaxed) {
                    woken.await;
                }
                self.resting.store(false, Ordering::Relaxed);
                continue;
            }
            let interval = if lag >= BEHIND {
                PROBE_INTERVAL
            } else {
                QUIET_INTERVAL
            };
            tokio::time::sleep(interval).await;
            self.queued_at_us.store(self.now_us(), Ordering::Relaxed);
            lag = to_the_back_of_the_queue().await;
            self.queued_at_us.store(0, Ordering::Relaxed);
            self.set_lag(lag);
        }
    }
}

/// Puts the calling task at the back of its worker's run queue and waits to be polled again:
/// how long that took. A task that wakes itself while it is polled is queued behind every task
/// already waiting (tokio's `yield_now` instead waits for the worker's next look at the I/O
/// driver, and a task woken from elsewhere may jump the queue into the worker's LIFO slot).
async fn to_the_back_of_the_queue() -> Duration {
    let queued = Instant::now();
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    queued.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_threshold_nothing_is_shed() {
        let overload = Overload::new(None, &Metrics::new());
        overload.set_lag(Duration::from_secs(5));
        assert_eq!(overload.shedding(), None);
    }

    #[test]
    fn new_streams_are_shed_from_the_threshold_on() {
        let overload = Overload::new(Some(Duration::from_millis(100)), &Metrics::new());
        overload.set_lag(Duration::from_millis(99));
        assert_eq!(overload.shedding(), None);
        overload.set_lag(Duration::from_millis(100));
        assert_eq!(overload.shedding(), Some(Duration::from_millis(100)));
        // What `runtime_lag_seconds` shows.
        assert_eq!(overload.gauge.get(), 0.1);
    }

    #[test]
    fn a_wait_still_under_way_counts_once_it_is_long_enough() {
        let overload = Overload::new(Some(Duration::from_millis(100)), &Metrics::new());
        overload.set_lag(Duration::ZERO);
        overload
            .queued_at_us
            .store(overload.now_us(), Ordering::Relaxed);
        assert_eq!(overload.shedding(), None);
        std::thread::sleep(Duration::from_millis(110));
        assert!(
            overload
                .shedding()
                .is_some_and(|lag| lag >= Duration::from_millis(100))
        );
    }

    /// Two workers, each kept busy by tasks that compute for 10 ms and queue again: the probe's
    /// wait behind them is several of those, where an idle runtime answers at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lag_is_the_wait_behind_the_tasks_already_queued() {
        let idle = to_the_back_of_the_queue().await;
        assert!(idle < Duration::from_millis(20), "idle: {idle:?}");

        let stop = Arc::new(AtomicBool::new(false));
        let busy: Vec<_> = (0..16)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let until = Instant::now() + Duration::from_millis(10);
                        while Instant::now() < until {
                            std::hint::spin_loop();
                        }
                        to_the_back_of_the_queue().await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let lag = tokio::spawn(to_the_back_of_the_queue()).await.unwrap();
        stop.store(true, Ordering::Relaxed);
        for task in busy {
            task.await.unwrap();
        }
        // Sixteen tasks of 10 ms on two workers: about 80 ms ahead of it.
        assert!(lag >= Duration::from_millis(40), "busy: {lag:?}");
    }
}
