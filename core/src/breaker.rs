//! The crash-loop breaker: a plugin that fails on every call is quarantined for a back-off
//! period instead of failing (and being logged) on every request, then probed again -- what the
//! proxy-wasm specification recommends for crashed VMs -- without letting any client switch a
//! working plugin off.
//!
//! Every exchange gets its own instance, so a call that fails because of one request's input
//! (a header a plugin `expect`s, a body that makes it loop) harms nothing else: that request
//! gets the failure policy's answer, and the failure is no evidence against the plugin for
//! anyone else. Quarantining the plugin for everybody on such failures would hand every client
//! a switch: five crafted requests would answer 500 to everyone (fail-closed) or turn an auth
//! plugin off (fail-open). So the breaker asks for evidence that the plugin is broken for
//! everyone, and even then never refuses a client it has no evidence against:
//!
//! - It trips only on a *broad* run of failures: `threshold` failed calls in a row (no call
//!   succeeded in between), within `window`, from at least `min_clients` different clients. A
//!   client is the address Envoy saw the request come from (`source.address`, an IPv6 address
//!   by its /64), so one client -- or every client behind one proxy -- cannot trip it whatever
//!   it sends, and any request that succeeds ends the run. Without `source.address` the
//!   breaker cannot tell clients apart and does not trip (the caller says so once).
//! - Quarantined, it refuses only the clients whose requests failed (and requests without an
//!   address). A request from any other client is still called, as a probe: if it succeeds the
//!   plugin serves again, if it fails that client joins the failing ones. So a client that
//!   never sent a failing request is never refused because of others'.
//! - When the back-off ends, one call from anyone goes through as a probe: success closes the
//!   breaker, failure quarantines the plugin again for twice as long (up to [`MAX_BACKOFF`]).
//!
//! A plugin broken on every call fails for every client, so it trips after `threshold`
//! requests from `min_clients` clients: about as fast as five failures in a row.
//!
//! Pure logic with the clock passed in, so every transition is unit-tested.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest quarantine a plugin that keeps failing its probes gets.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Failing clients a quarantine remembers: enough for any crash loop's clients to be refused
/// without a call, and a bound on the memory one plugin's breaker holds (16 bytes each). Past
/// it, a further failing client is called (and fails) like an unknown one.
pub const MAX_FAILING_CLIENTS: usize = 1024;

/// When the breaker trips and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that trip it; 0 turns the breaker off.
    pub threshold: u32,
    /// Different clients among those failures; at most `threshold` counts.
    pub min_clients: u32,
    /// The failures must all fall within this window.
    pub window: Duration,
    /// The first quarantine; each failed probe doubles it.
    pub backoff: Duration,
}

/// Who sent a request, as far as the breaker tells clients apart: the address Envoy saw, an
/// IPv6 address by its /64 network (one client holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(u128);

impl Client {
    /// The client of Envoy's `source.address` attribute (`10.0.0.7:51234`, `[2001:db8::7]:443`,
    /// or an address without a port); `None` if it is not an address.
    pub fn from_address(address: &str) -> Option<Client> {
        let host = match address.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty() => {
                host
            }
            _ => address,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        // A bare IPv6 address has colons too: try the whole text if the cut one is no address.
        let ip = host
            .parse::<IpAddr>()
            .or_else(|_| {
                address
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
            })
            .ok()?;
        Some(Client(match ip.to_canonical() {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6) & !u128::from(u64::MAX),
        }))
    }
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call the plugin.
    Call,
    /// Call the plugin: its outcome decides whether the quarantine ends.
    Probe,
    /// Do not call the plugin; apply its failure policy. Carries the quarantine's remaining time.
    Quarantined(Duration),
}

/// How an admitted call ended, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Succeeded,
    /// Failed by the plugin's own doing (trap, deadline, memory, invalid output), for this
    /// client; failures that are the host's (a full instance pool) are not recorded.
    Failed(Option<Client>),
}

/// A change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The plugin is quarantined for this long.
    Opened(Duration),
    /// A probe succeeded: the plugin serves again.
    Recovered,
    /// A run of failures long enough to trip the breaker came from fewer clients than it needs
    /// (or from requests without an address): the plugin is not quarantined.
    TooFewClients { failures: u32, clients: u32 },
}

/// The clients of a run of failures, or of a quarantine: a small set, bounded.
#[derive(Debug, Default, Clone)]
struct Clients(Vec<Client>);

impl Clients {
    fn add(&mut self, client: Option<Client>) {
        if let Some(client) = client
            && self.0.len() < MAX_FAILING_CLIENTS
            && !self.0.contains(&client)
        {
            self.0.push(client);
        }
    }

    fn contains(&self, client: Option<Client>) -> bool {
        client.is_none_or(|c| self.0.contains(&c))
    }

    fn len(&self) -> u32 {
        self.0.len() as u32
    }
}

#[derive(Debug)]
enum State {
    Closed {
        consecutive: u32,
        /// When the first of the consecutive failures happened.
        since: Option<Instant>,
        clients: Clients,
        /// Whether this run was already reported as coming from too few clients.
        reported: bool,
    },
    Open {
        until: Instant,
        backoff: Duration,
        failing: Clients,
    },
    /// The back-off is over; `probing` while the back-off's probe call runs.
    HalfOpen {
        backoff: Duration,
        probing: bool,
        failing: Clients,
    },
}

impl State {
    fn closed() -> State {
        State::Closed {
            consecutive: 0,
            since: None,
            clients: Clients::default(),
            reported: false,
        }
    }
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
            state: Mutex::new(State::closed()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written (every update
        // is a single assignment), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a call at `now` may go ahead, for the request's client (asked only while the
    /// plugin is quarantined).
    pub fn admit(&self, now: Instant, client: impl FnOnce() -> Option<Client>) -> Admission {
        if self.settings.threshold == 0 {
            return Admission::Call;
        }
        let mut state = self.state();
        if let State::Closed { .. } = *state {
            return Admission::Call;
        }
        let client = client();
        match &mut *state {
            State::Closed { .. } => Admission::Call,
            // No evidence against this client: it is called, and decides.
            State::Open { failing, .. } | State::HalfOpen { failing, .. }
                if !failing.contains(client) =>
            {
                Admission::Probe
            }
            State::Open {
                until,
                backoff,
                failing,
            } if now >= *until => {
                *state = State::HalfOpen {
                    backoff: *backoff,
                    probing: true,
                    failing: std::mem::take(failing),
                };
                Admission::Probe
            }
            State::Open { until, .. } => Admission::Quarantined(*until - now),
            State::HalfOpen { probing, .. } if !*probing => {
                *probing = true;
                Admission::Probe
            }
            State::HalfOpen { .. } => Admission::Quarantined(Duration::ZERO),
        }
    }

    /// Records how an admitted call ended.
    pub fn record(&self, now: Instant, call: Call) -> Option<Transition> {
        if self.settings.threshold == 0 {
            return None;
        }
        let settings = self.settings;
        let mut state = self.state();
        match (&mut *state, call) {
            (State::Closed { .. }, Call::Succeeded) => {
                *state = State::closed();
                None
            }
            (
                State::Closed {
                    consecutive,
                    since,
                    clients,
                    reported,
                },
                Call::Failed(client),
            ) => {
                if since.is_none_or(|first| now.duration_since(first) > settings.window) {
                    // The run of failures started too long ago: this one starts a new run.
                    *consecutive = 0;
                    *since = Some(now);
                    *clients = Clients::default();
                    *reported = false;
                }
                *consecutive += 1;
                clients.add(client);
                if *consecutive < settings.threshold {
                    return None;
                }
                if clients.len() < settings.min_clients.min(settings.threshold) {
                    if *reported {
                        return None;
                    }
                    *reported = true;
                    return Some(Transition::TooFewClients {
                        failures: *consecutive,
                        clients: clients.len(),
                    });
                }
                let backoff = settings.backoff;
                *state = State::Open {
                    until: now + backoff,
                    backoff,
                    failing: std::mem::take(clients),
                };
                Some(Transition::Opened(backoff))
            }
            (State::Open { .. } | State::HalfOpen { .. }, Call::Succeeded) => {
                *state = State::closed();
                Some(Transition::Recovered)
            }
            // A client probing for the first time failed: it is one of the failing ones now.
            (State::Open { failing, .. }, Call::Failed(client)) => {
                failing.add(client);
                None
            }
            (
                State::HalfOpen {
                    backoff,
                    probing,
                    failing,
                },
                Call::Failed(client),
            ) => {
                failing.add(client);
                if !*probing {
                    return None;
                }
                let backoff = (*backoff * 2).min(MAX_BACKOFF);
                *state = State::Open {
                    until: now + backoff,
                    backoff,
                    failing: std::mem::take(failing),
                };
                Some(Transition::Opened(backoff))
            }
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
            min_clients: 2,
            window: 10 * SECOND,
            backoff: 5 * SECOND,
        })
    }

    fn client(n: u8) -> Option<Client> {
        Client::from_address(&format!("10.0.0.{n}:4000"))
    }

    fn failed(n: u8) -> Call {
        Call::Failed(client(n))
    }

    #[test]
    fn clients_are_addresses_without_ports_and_ipv6_networks() {
        assert_eq!(
            Client::from_address("10.0.0.7:51234"),
            Client::from_address("10.0.0.7")
        );
        assert_ne!(
            Client::from_address("10.0.0.7:1"),
            Client::from_address("10.0.0.8:1")
        );
        assert_eq!(
            Client::from_address("[2001:db8:1:2::1]:443"),
            Client::from_address("[2001:db8:1:2:ffff::9]:80")
        );
        assert_eq!(
            Client::from_address("2001:db8:1:2::1"),
            Client::from_address("[2001:db8:1:2::5]:80")
        );
        assert_ne!(
            Client::from_address("[2001:db8:1:2::1]:443"),
            Client::from_address("[2001:db8:1:3::1]:443")
        );
        assert_eq!(
            Client::from_address("[::ffff:10.0.0.7]:1"),
            Client::from_address("10.0.0.7:2")
        );
        assert_eq!(Client::from_address("pipe:/tmp/x"), None);
        assert_eq!(Client::from_address(""), None);
    }

    #[test]
    fn a_broad_run_of_failures_within_the_window_trips_it() {
        let breaker = breaker();
        let t0 = Instant::now();
        assert_eq!(breaker.record(t0, failed(1)), None);
        assert_eq!(breaker.record(t0 + SECOND, failed(2)), None);
        assert_eq!(
            breaker.record(t0 + 2 * SECOND, failed(1)),
            Some(Transition::Opened(5 * SECOND))
        );
        // The failing clients are refused; another is called, as a probe.
        assert_eq!(
            breaker.admit(t0 + 3 * SECOND, || client(1)),
            Admission::Quarantined(4 * SECOND)
        );
        assert_eq!(
            breaker.admit(t0 + 3 * SECOND, || client(2)),
            Admission::Quarantined(4 * SECOND)
        );
        assert_eq!(
            breaker.admit(t0 + 3 * SECOND, || None),
            Admission::Quarantined(4 * SECOND)
        );
        assert_eq!(
            breaker.admit(t0 + 3 * SECOND, || client(3)),
            Admission::Probe
        );
    }

    #[test]
    fn one_client_cannot_trip_it_whatever_it_sends() {
        let breaker = breaker();
        let t0 = Instant::now();
        assert_eq!(breaker.record(t0, failed(1)), None);
        assert_eq!(breaker.record(t0, failed(1)), None);
        assert_eq!(
            breaker.record(t0, failed(1)),
            Some(Transition::TooFewClients {
                failures: 3,
                clients: 1
            })
        );
        // Said once per run.
        for _ in 0..100 {
            assert_eq!(breaker.record(t0, failed(1)), None);
        }
        assert_eq!(breaker.admit(t0, || client(1)), Admission::Call);
        assert_eq!(breaker.admit(t0, || client(2)), Admission::Call);
    }

    #[test]
    fn without_addresses_it_cannot_tell_clients_apart_and_does_not_trip() {
        let breaker = breaker();
        let t0 = Instant::now();
        breaker.record(t0, Call::Failed(None));
        breaker.record(t0, Call::Failed(None));
        assert_eq!(
            breaker.record(t0, Call::Failed(None)),
            Some(Transition::TooFewClients {
                failures: 3,
                clients: 0
            })
        );
        assert_eq!(breaker.admit(t0, || None), Admission::Call);
    }

    #[test]
    fn any_success_or_a_stale_run_resets_the_count() {
        let breaker = breaker();
        let t0 = Instant::now();
        breaker.record(t0, failed(1));
        breaker.record(t0, failed(2));
        breaker.record(t0, Call::Succeeded);
        assert_eq!(breaker.record(t0, failed(3)), None);
        assert_eq!(breaker.record(t0, failed(4)), None);
        // Eleven seconds later the run is stale: this failure starts a new one.
        assert_eq!(breaker.record(t0 + 11 * SECOND, failed(5)), None);
        assert_eq!(
            breaker.admit(t0 + 11 * SECOND, || client(5)),
            Admission::Call
        );
    }

    #[test]
    fn a_client_probing_in_a_quarantine_ends_it_or_joins_the_failing_ones() {
        let breaker = breaker();
        let t0 = Instant::now();
        for n in [1, 2, 3] {
            breaker.record(t0, failed(n));
        }
        // Client 4 probes and fails: refused from now on, as the others.
        assert_eq!(breaker.admit(t0, || client(4)), Admission::Probe);
        assert_eq!(breaker.record(t0, failed(4)), None);
        assert!(matches!(
            breaker.admit(t0, || client(4)),
            Admission::Quarantined(_)
        ));
        // Client 5 probes and succeeds: the plugin serves everybody again.
        assert_eq!(breaker.admit(t0, || client(5)), Admission::Probe);
        assert_eq!(
            breaker.record(t0, Call::Succeeded),
            Some(Transition::Recovered)
        );
        assert_eq!(breaker.admit(t0, || client(1)), Admission::Call);
    }

    #[test]
    fn after_the_backoff_one_probe_decides() {
        let breaker = breaker();
        let t0 = Instant::now();
        for n in [1, 2, 3] {
            breaker.record(t0, failed(n));
        }
        let later = t0 + 6 * SECOND;
        assert_eq!(breaker.admit(later, || client(1)), Admission::Probe);
        // Only one probe at a time among the failing clients.
        assert_eq!(
            breaker.admit(later, || client(2)),
            Admission::Quarantined(Duration::ZERO)
        );
        // The probe fails: twice the back-off.
        assert_eq!(
            breaker.record(later, failed(1)),
            Some(Transition::Opened(10 * SECOND))
        );
        assert!(matches!(
            breaker.admit(later + 9 * SECOND, || client(2)),
            Admission::Quarantined(_)
        ));
        assert_eq!(
            breaker.admit(later + 10 * SECOND, || client(2)),
            Admission::Probe
        );
        assert_eq!(
            breaker.record(later + 10 * SECOND, Call::Succeeded),
            Some(Transition::Recovered)
        );
        assert_eq!(
            breaker.admit(later + 10 * SECOND, || client(2)),
            Admission::Call
        );
    }

    #[test]
    fn backoff_is_capped() {
        let breaker = Breaker::new(BreakerSettings {
            threshold: 1,
            min_clients: 1,
            window: SECOND,
            backoff: 200 * SECOND,
        });
        let t0 = Instant::now();
        breaker.record(t0, failed(1));
        assert_eq!(
            breaker.admit(t0 + 200 * SECOND, || client(1)),
            Admission::Probe
        );
        assert_eq!(
            breaker.record(t0 + 200 * SECOND, failed(1)),
            Some(Transition::Opened(MAX_BACKOFF))
        );
    }

    #[test]
    fn failing_clients_are_bounded() {
        let breaker = Breaker::new(BreakerSettings {
            threshold: 1,
            min_clients: 1,
            window: SECOND,
            backoff: 60 * SECOND,
        });
        let t0 = Instant::now();
        breaker.record(t0, failed(0));
        let many = (0..2 * MAX_FAILING_CLIENTS as u32)
            .map(|i| Client::from_address(&std::net::Ipv4Addr::from((i + 1) << 8).to_string()));
        for c in many {
            assert_eq!(breaker.admit(t0, || c), Admission::Probe);
            breaker.record(t0, Call::Failed(c));
        }
        let State::Open { failing, .. } = &*breaker.state() else {
            panic!("still open");
        };
        assert_eq!(failing.0.len(), MAX_FAILING_CLIENTS);
    }

    #[test]
    fn threshold_zero_turns_it_off() {
        let breaker = Breaker::new(BreakerSettings {
            threshold: 0,
            min_clients: 1,
            window: SECOND,
            backoff: SECOND,
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(breaker.record(t0, failed(1)), None);
        }
        assert_eq!(breaker.admit(t0, || client(1)), Admission::Call);
    }
}
