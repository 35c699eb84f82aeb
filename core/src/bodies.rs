//! The host-wide budget for body bytes held: what keeps a few dozen concurrent large bodies from
//! taking the process past its memory limit, and every stream in it down.
//!
//! Each stream may hold a body of up to [`MAX_HELD_BODY_BYTES`] per direction for a plugin that
//! takes bodies whole, and each body a plugin sees is copied into its instance as well: nothing
//! per stream adds these up. So every body message is reserved against one budget for the
//! whole host (`[runtime] max_body_bytes_in_flight`) while plugins work on it, and every chunk
//! held for a whole-body plugin until its body is complete. A message there is no room for is
//! not held: the plugins that would have seen it get their failure policy (kind
//! `body_budget`), counted, and the host stays up for everyone else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;

/// Largest body the host holds back for a plugin that wants it whole. Past this the plugin
/// fails (kind `body_too_large`) and its policy applies; under fail-open what was held flows on
/// unchanged.
pub const MAX_HELD_BODY_BYTES: usize = 8 << 20;

/// Body bytes the host holds at most across all streams, by default: room for sixteen bodies
/// at the 8 MiB a whole-body plugin may be given, and with their copies inside the plugins
/// still well inside the shipped Deployment's 512 MiB memory limit (see the README for sizing
/// one from the other).
pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: u64 = 128 << 20;

/// The budget, shared by every stream.
#[derive(Debug)]
pub struct BodyBudget {
    limit: u64,
    held: AtomicU64,
    /// Reservations refused, for `wasm_extproc_bodies_over_budget_total`.
    refused: Counter,
}

impl BodyBudget {
    /// A budget of `limit` bytes, counting what it refuses into `refused`.
    pub fn new(limit: u64, refused: Counter) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            limit,
            held: AtomicU64::new(0),
            refused,
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Reserves `bytes`, if they fit; they are given back when the reservation drops.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let mut reservation = Reservation {
            budget: self.clone(),
            bytes: 0,
        };
        reservation.grow(bytes).then_some(reservation)
    }
}

/// Bytes taken from the budget until dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl Reservation {
    /// Takes `more` bytes on top of what is reserved, if they fit.
    pub fn grow(&mut self, more: u64) -> bool {
        let fits = self
            .budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more)
                    .filter(|total| *total <= self.budget.limit)
            })
            .is_ok();
        if fits {
            self.bytes += more;
        } else {
            self.budget.refused.inc();
        }
        fits
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes over `other`'s bytes: they are given back when this reservation drops.
    pub fn absorb(&mut self, mut other: Reservation) {
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_the_budget_and_give_back_when_dropped() {
        let refused = Counter::default();
        let budget = BodyBudget::new(100, refused.clone());
        let a = budget.reserve(60).unwrap();
        assert!(budget.reserve(50).is_none(), "60 + 50 > 100");
        let mut b = budget.reserve(40).unwrap();
        assert_eq!(budget.held(), 100);
        assert!(!b.grow(1));
        drop(a);
        assert!(b.grow(60));
        assert_eq!((b.bytes(), budget.held()), (100, 100));
        drop(b);
        assert_eq!(budget.held(), 0);
        assert!(budget.reserve(u64::MAX).is_none());
        assert_eq!(refused.get(), 3);
    }
}
