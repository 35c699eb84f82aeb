//! The crash-loop breaker: a plugin that keeps failing is quarantined for a back-off period
//! instead of failing (and being logged) on every request, then probed again -- what the
//! proxy-wasm specification recommends for crashed VMs.
//!
//! The breaker trips after `threshold` failed calls in a row, all within `window`: a plugin
//! that crashes on every call trips at once, one that fails now and then (1% of requests) never
//! does, and old failures do not add up with new ones. While quarantined the plugin is not
//! called; its failure policy applies as if it had failed. When the back-off ends, one call is
//! let through as a probe: success closes the breaker, failure quarantines the plugin again for
//! twice as long (up to [`MAX_BACKOFF`]).
//!
//! Pure logic with the clock passed in, so every transition is unit-tested.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest quarantine a plugin that keeps failing its probes gets.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// When the breaker trips and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that trip it; 0 turns the breaker off.
    pub threshold: u32,
    /// The failures must all fall within this window.
    pub window: Duration,
    /// The first quarantine; each failed probe doubles it.
    pub backoff: Duration,
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call the plugin.
    Call,
    /// Call the plugin: it is the probe after a quarantine.
    Probe,
    /// Do not call the plugin; apply its failure policy. Carries the quarantine's remaining time.
    Quarantined(Duration),
}

/// A change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The plugin is quarantined for this long.
    Opened(Duration),
    /// The probe succeeded: the plugin serves again.
    Recovered,
}

#[derive(Debug)]
enum State {
    Closed {
        consecutive: u32,
        /// When the first of the consecutive failures happened.
        since: Option<Instant>,
    },
    Open {
        until: Instant,
        backoff: Duration,
    },
    /// The back-off is over; `probing` while the probe call runs.
    HalfOpen {
        backoff: Duration,
        probing: bool,
    },
}

/// One plugin's breaker, shared by every stream.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Breaker {
            settings,
            state: Mutex::new(State::Closed {
                consecutive: 0,
                since: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written (every update
        // is a single assignment), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a call at `now` may go ahead.
    pub fn admit(&self, now: Instant) -> Admission {
        if self.settings.threshold == 0 {
            return Admission::Call;
        }
        let mut state = self.state();
        match *state {
            State::Closed { .. } => Admission::Call,
            State::Open { until, backoff } if now >= until => {
                *state = State::HalfOpen {
                    backoff,
                    probing: true,
                };
                Admission::Probe
            }
            State::Open { until, .. } => Admission::Quarantined(until - now),
            State::HalfOpen {
                backoff,
                probing: false,
            } => {
                *state = State::HalfOpen {
                    backoff,
                    probing: true,
                };
                Admission::Probe
            }
            State::HalfOpen { probing: true, .. } => Admission::Quarantined(Duration::ZERO),
        }
    }

    /// Records how an admitted call ended. `failed` is for failures that are the plugin's own
    /// (trap, deadline, memory, invalid output), not the host's (a full instance pool).
    pub fn record(&self, now: Instant, failed: bool) -> Option<Transition> {
        if self.settings.threshold == 0 {
            return None;
        }
        let mut state = self.state();
        match (&mut *state, failed) {
            (State::Closed { consecutive, since }, false) => {
                *consecutive = 0;
                *since = None;
                None
            }
            (State::Closed { consecutive, since }, true) => {
                let first = match *since {
                    Some(first) if now.duration_since(first) <= self.settings.window => first,
                    // The run of failures started too long ago: this one starts a new run.
                    _ => {
                        *consecutive = 0;
                        now
                    }
                };
                *consecutive += 1;
                *since = Some(first);
                if *consecutive >= self.settings.threshold {
                    let backoff = self.settings.backoff;
                    *state = State::Open {
                        until: now + backoff,
                        backoff,
                    };
                    return Some(Transition::Opened(backoff));
                }
                None
            }
            (State::HalfOpen { .. }, false) => {
                *state = State::Closed {
                    consecutive: 0,
                    since: None,
                };
                Some(Transition::Recovered)
            }
            (State::HalfOpen { backoff, .. }, true) => {
                let backoff = (*backoff * 2).min(MAX_BACKOFF);
                *state = State::Open {
                    until: now + backoff,
                    backoff,
                };
                Some(Transition::Opened(backoff))
            }
            // A call admitted before the breaker opened, finishing after: the state already
            // says what it needs to.
            (State::Open { .. }, _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            threshold: 3,
            window: 10 * SECOND,
            backoff: 5 * SECOND,
        })
    }

    #[test]
    fn consecutive_failures_within_the_window_trip_it() {
        let breaker = breaker();
        let t0 = Instant::now();
        assert_eq!(breaker.record(t0, true), None);
        assert_eq!(breaker.record(t0 + SECOND, true), None);
        assert_eq!(
            breaker.record(t0 + 2 * SECOND, true),
            Some(Transition::Opened(5 * SECOND))
        );
        assert_eq!(
            breaker.admit(t0 + 3 * SECOND),
            Admission::Quarantined(4 * SECOND)
        );
    }

    #[test]
    fn a_success_or_a_stale_run_resets_the_count() {
        let breaker = breaker();
        let t0 = Instant::now();
        breaker.record(t0, true);
        breaker.record(t0, true);
        breaker.record(t0, false);
        assert_eq!(breaker.record(t0, true), None);
        assert_eq!(breaker.record(t0, true), None);
        // Eleven seconds later the run is stale: this failure starts a new one.
        assert_eq!(breaker.record(t0 + 11 * SECOND, true), None);
        assert_eq!(breaker.admit(t0 + 11 * SECOND), Admission::Call);
    }

    #[test]
    fn after_the_backoff_one_probe_decides() {
        let breaker = breaker();
        let t0 = Instant::now();
        for _ in 0..3 {
            breaker.record(t0, true);
        }
        let later = t0 + 6 * SECOND;
        assert_eq!(breaker.admit(later), Admission::Probe);
        // Only one probe at a time.
        assert_eq!(breaker.admit(later), Admission::Quarantined(Duration::ZERO));
        // The probe fails: twice the back-off.
        assert_eq!(
            breaker.record(later, true),
            Some(Transition::Opened(10 * SECOND))
        );
        assert!(matches!(
            breaker.admit(later + 9 * SECOND),
            Admission::Quarantined(_)
        ));
        assert_eq!(breaker.admit(later + 10 * SECOND), Admission::Probe);
        assert_eq!(
            breaker.record(later + 10 * SECOND, false),
            Some(Transition::Recovered)
        );
        assert_eq!(breaker.admit(later + 10 * SECOND), Admission::Call);
    }

    #[test]
    fn backoff_is_capped() {
        let breaker = Breaker::new(BreakerSettings {
            threshold: 1,
            window: SECOND,
            backoff: 200 * SECOND,
        });
        let t0 = Instant::now();
        breaker.record(t0, true);
        assert_eq!(breaker.admit(t0 + 200 * SECOND), Admission::Probe);
        assert_eq!(
            breaker.record(t0 + 200 * SECOND, true),
            Some(Transition::Opened(MAX_BACKOFF))
        );
    }

    #[test]
    fn threshold_zero_turns_it_off() {
        let breaker = Breaker::new(BreakerSettings {
            threshold: 0,
            window: SECOND,
            backoff: SECOND,
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(breaker.record(t0, true), None);
        }
        assert_eq!(breaker.admit(t0), Admission::Call);
    }
}
