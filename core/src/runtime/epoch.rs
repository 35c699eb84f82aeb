//! The clock guest deadlines are measured against: wasmtime's engine epoch, advanced by a
//! thread of its own -- but only while guest code runs.
//!
//! Every guest call starts with its store's deadline one epoch ahead. When the epoch moves
//! past it, wasmtime asks the store what to do: the host looks at the call's own start time and
//! lets it go on (or, for async calls, yield to other streams first) until its budget is spent
//! and it was seen running for half of it ([`may_go_on`]: time its thread spent descheduled
//! does not count twice), then interrupts it. The epoch only has to move while some call is under way.
//!
//! A thread that wakes every millisecond regardless costs real CPU on a virtual machine (about
//! 20 µs per wake-up here: 2% of a core while idle, some 16 µs per request at 1,200 requests a
//! second). So the ticker looks every [`CHECK`] whether a call is running; only while one is
//! does it tick every [`TICK`]; and after [`QUIET_CHECKS`] checks in which no call even started
//! it parks, until the next call wakes it. Header handlers take microseconds: most checks find
//! nothing running, and a busy host pays a wake-up per `CHECK`, not per request.
//!
//! The price is precision where it does not matter: a runaway call is noticed within `CHECK`
//! and interrupted within `TICK` of its budget running out (a budget under twice `CHECK`, by
//! [`longest_call`]), and an async guest yields to other streams within `CHECK` + `TICK`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::EngineWeak;

/// How often the epoch moves while a guest call is running: the precision of deadlines once a
/// call has been noticed, and how often a long async call yields.
pub const TICK: Duration = Duration::from_millis(1);
/// How often the ticker looks for a running call when none was running at its last look.
pub const CHECK: Duration = Duration::from_millis(10);
/// Looks with no call started in between before the ticker parks (100 ms).
const QUIET_CHECKS: u32 = 10;

/// Whether a guest call that has run for `elapsed` on a budget of `timeout`, and was seen
/// running at `ticks_seen` epoch ticks, may go on. Past its budget it may, while it was seen at
/// fewer than half the ticks the budget spans: the epoch asks only while guest code runs, so a
/// call whose thread the machine descheduled for longer than its budget is asked once when it
/// runs again, not once per tick it missed. On a saturated machine, a header handler that needs
/// microseconds is then not interrupted for the time its worker waited for a core; one that
/// loops is asked at every tick, and stops once both its budget and those ticks have passed.
pub fn may_go_on(elapsed: Duration, timeout: Duration, ticks_seen: u32) -> bool {
    elapsed < timeout || ticks_seen < ticks_to_stop(timeout)
}

/// The ticks a call on a budget of `timeout` must be seen running at before it is stopped.
fn ticks_to_stop(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_nanos() / TICK.as_nanos() / 2)
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The longest a call on a budget of `timeout` that never stops by itself runs: the ticker
/// notices it within [`CHECK`], it is asked at every [`TICK`] from then on, and it is stopped
/// at the first tick by which both its budget and [`ticks_to_stop`] have passed.
pub fn longest_call(timeout: Duration) -> Duration {
    timeout.max(CHECK + TICK * ticks_to_stop(timeout)) + TICK
}

/// Counts the guest calls under way and keeps the epoch moving while there are any.
#[derive(Debug)]
pub struct EpochTicker {
    shared: Arc<Shared>,
    thread: Thread,
}

#[derive(Debug, Default)]
struct Shared {
    /// Guest calls (and instantiations, which run guest start code) under way.
    running: AtomicUsize,
    /// Calls started so far: the ticker parks only after a quiet spell.
    started: AtomicU64,
    /// Whether the ticker is parked, or about to: the next call must wake it.
    parked: AtomicBool,
    stop: AtomicBool,
    /// How often the epoch moved.
    ticks: AtomicU64,
}

/// A guest call under way; ends when dropped (also when the call's future is dropped).
#[derive(Debug)]
pub struct Running<'a>(&'a EpochTicker);

impl EpochTicker {
    /// Starts the ticker thread for `engine`. It ends when the ticker is dropped or the
    /// engine is gone.
    pub fn start(engine: EngineWeak) -> std::io::Result<EpochTicker> {
        let shared = Arc::new(Shared::default());
        let ticking = shared.clone();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || ticking.run(&engine))?
            .thread()
            .clone();
        Ok(EpochTicker { shared, thread })
    }

    /// Marks a guest call as under way until the returned guard drops.
    pub fn enter(&self) -> Running<'_> {
        let shared = &self.shared;
        shared.running.fetch_add(1, Ordering::SeqCst);
        shared.started.fetch_add(1, Ordering::Relaxed);
        // SeqCst on both sides: either the ticker sees this call before it parks, or this
        // call sees it parked and wakes it.
        if shared.parked.swap(false, Ordering::SeqCst) {
            self.thread.unpark();
        }
        Running(self)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.shared.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

impl Shared {
    fn run(&self, engine: &EngineWeak) {
        let mut last_started = 0;
        let mut quiet = 0;
        while !self.stop.load(Ordering::SeqCst) {
            if self.running.load(Ordering::SeqCst) > 0 {
                match engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
                self.ticks.fetch_add(1, Ordering::Relaxed);
                quiet = 0;
                std::thread::sleep(TICK);
                continue;
            }
            let started = self.started.load(Ordering::Relaxed);
            if started != last_started {
                last_started = started;
                quiet = 0;
            } else {
                quiet += 1;
            }
            if quiet < QUIET_CHECKS {
                std::thread::sleep(CHECK);
                continue;
            }
            self.parked.store(true, Ordering::SeqCst);
            if self.running.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::SeqCst) {
                std::thread::park();
            }
            self.parked.store(false, Ordering::SeqCst);
            quiet = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_past_its_budget_stops_only_once_it_was_seen_running_for_half_of_it() {
        let budget = Duration::from_millis(20);
        let ms = Duration::from_millis;
        // Within its budget, however often it was seen.
        assert!(may_go_on(ms(19), budget, 100));
        // Its thread was descheduled for 100 ms: the first tick it runs at does not stop it.
        assert!(may_go_on(ms(100), budget, 1));
        assert!(may_go_on(ms(100), budget, 9));
        // A loop: asked at every tick, it stops at the budget's end.
        assert!(!may_go_on(ms(20), budget, 10));
        assert!(!may_go_on(ms(21), budget, 20));
        // A budget shorter than two ticks stops at the first tick past it.
        assert!(!may_go_on(ms(2), Duration::from_micros(500), 1));
        // What the start-up check counts a plugin's call as, at most.
        assert_eq!(longest_call(budget), ms(21));
        assert_eq!(longest_call(ms(5)), ms(13));
        assert_eq!(longest_call(ms(200)), ms(201));
    }

    fn ticks(ticker: &EpochTicker) -> u64 {
        ticker.shared.ticks.load(Ordering::Relaxed)
    }

    /// Waits until the epoch moved `n` times more than `from`, for up to two seconds.
    fn ticked(ticker: &EpochTicker, from: u64, n: u64) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if ticks(ticker) >= from + n {
                return true;
            }
            std::thread::sleep(TICK);
        }
        false
    }

    #[test]
    fn the_epoch_moves_while_a_call_runs_and_stands_still_when_none_does() {
        let engine = wasmtime::Engine::default();
        let ticker = EpochTicker::start(engine.weak()).unwrap();
        {
            let _call = ticker.enter();
            assert!(ticked(&ticker, ticks(&ticker), 5));
        }
        // No call: the ticker looks now and then, and after a quiet spell it parks.
        std::thread::sleep(CHECK * (QUIET_CHECKS + 5));
        assert!(ticker.shared.parked.load(Ordering::SeqCst));
        let before = ticks(&ticker);
        std::thread::sleep(CHECK * 3);
        assert_eq!(ticks(&ticker), before, "no call, no tick");
        // A call wakes it.
        let _call = ticker.enter();
        assert!(ticked(&ticker, before, 5));
    }
}
