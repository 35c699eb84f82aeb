//! Admission to the instance pool. wasmtime's pooling allocator refuses an instantiation at
//! once when its pool is full; the host counts the instances it lets in, so that in a burst a
//! stream waits a moment for one to come free instead of failing, and so that the operator
//! can see how full the pool is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::PluginError;
use crate::metrics::PoolMetrics;

/// The pool's free places: one per instance, and one per fiber stack for plugins that run on
/// fibers (those importing WASI).
#[derive(Debug)]
pub struct Slots {
    instances: Arc<Semaphore>,
    fibers: Arc<Semaphore>,
    max_instances: u32,
    max_fibers: u32,
    wait: Duration,
    metrics: PoolMetrics,
}

/// One instance's place in the pool; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _instance: OwnedSemaphorePermit,
    _fiber: Option<OwnedSemaphorePermit>,
    in_use: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_use.dec();
    }
}

impl Slots {
    pub fn new(max_instances: u32, max_fibers: u32, wait: Duration, metrics: PoolMetrics) -> Self {
        metrics.size.set(i64::from(max_instances));
        Slots {
            instances: Arc::new(Semaphore::new(max_instances as usize)),
            fibers: Arc::new(Semaphore::new(max_fibers as usize)),
            max_instances,
            max_fibers,
            wait,
            metrics,
        }
    }

    /// A place for one instance (with a fiber stack if `fiber`), waiting at most until
    /// `arrived` (when the message that needs it arrived) plus the configured wait.
    pub async fn take(&self, fiber: bool, arrived: Instant) -> Result<Slot, PluginError> {
        let until = arrived + self.wait;
        let instance = self.permit(&self.instances, until).await.ok_or_else(|| {
            PluginError::Instantiate(format!(
                "the instance pool is full: {} instances alive ([runtime] max_instances)",
                self.max_instances
            ))
        })?;
        let fiber = if fiber {
            let permit = self.permit(&self.fibers, until).await.ok_or_else(|| {
                PluginError::Instantiate(format!(
                    "{} instances of WASI plugins alive ([runtime] max_wasi_instances)",
                    self.max_fibers
                ))
            })?;
            Some(permit)
        } else {
            None
        };
        self.metrics.in_use.inc();
        Ok(Slot {
            _instance: instance,
            _fiber: fiber,
            in_use: self.metrics.in_use.clone(),
        })
    }

    async fn permit(
        &self,
        semaphore: &Arc<Semaphore>,
        until: Instant,
    ) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = semaphore.clone().try_acquire_owned() {
            return Some(permit);
        }
        self.metrics.waits.inc();
        let waited = tokio::time::timeout_at(
            tokio::time::Instant::from_std(until),
            semaphore.clone().acquire_owned(),
        )
        .await;
        match waited {
            Ok(Ok(permit)) => Some(permit),
            _ => {
                self.metrics.exhausted.inc();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_pool_waits_for_a_place_then_gives_up() {
        let metrics = PoolMetrics::default();
        let slots = Slots::new(1, 1, Duration::from_millis(50), metrics.clone());
        let first = slots.take(false, Instant::now()).await.unwrap();
        assert_eq!(metrics.in_use.get(), 1);

        // Freed while the second waits: it gets the place.
        let waiting = slots.take(false, Instant::now());
        let freeing = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(first);
        };
        let (second, ()) = tokio::join!(waiting, freeing);
        let second = second.unwrap();
        assert_eq!((metrics.waits.get(), metrics.exhausted.get()), (1, 0));

        // Not freed in time: the plugin's policy applies, and the wait is counted.
        let error = slots.take(false, Instant::now()).await.unwrap_err();
        assert_eq!(error.kind(), "instantiate");
        assert!(error.to_string().contains("max_instances"), "{error}");
        assert_eq!((metrics.waits.get(), metrics.exhausted.get()), (2, 1));
        drop(second);
        assert_eq!(metrics.in_use.get(), 0);
    }

    #[tokio::test]
    async fn wasi_plugins_also_need_a_fiber_place() {
        let metrics = PoolMetrics::default();
        let slots = Slots::new(10, 1, Duration::ZERO, metrics);
        let _fiber = slots.take(true, Instant::now()).await.unwrap();
        let error = slots.take(true, Instant::now()).await.unwrap_err();
        assert!(error.to_string().contains("max_wasi_instances"), "{error}");
        // Plugins without WASI are not held up by them.
        slots.take(false, Instant::now()).await.unwrap();
    }
}
