//! The core's counters and gauges as Envoy stats, so that in-process plugins show up where
//! Envoy's own figures are: `/stats`, `/stats/prometheus`, the sidecar's scrape.
//!
//! Envoy lets a module define stats only while it creates a filter configuration, and update
//! them only through a stream. So each configuration defines the series it may need, and
//! streams publish what changed since the last publication, at most once per
//! [`PUBLISH_EVERY`] across the process: the figures trail by that much, and the hot path pays
//! nothing. Names are the ext_proc server's, under Envoy's `metrics_namespace` (default
//! `dynamicmodulescustom`): `dynamicmodulescustom.plugin_calls` with labels chain, plugin, phase and
//! outcome, and so on. The call and instantiation latency histograms stay with the server.

#![allow(unsafe_code, reason = "defines stats through Envoy's C ABI")]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wasm_extproc_core::metrics::{Metrics, Sample, SampleKind};

use crate::abi::{self, ConfigEnvoyPtr, ModuleBuffer};
use crate::envoy::EnvoyStream;

/// How stale Envoy's copy of the figures may get.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Every series, its kind and its label names, in the order of their values.
const SERIES: [(&str, SampleKind, &[&str]); 11] = [
    ("streams", SampleKind::Counter, &[]),
    ("active_streams", SampleKind::Gauge, &[]),
    ("instances_in_use", SampleKind::Gauge, &[]),
    ("instance_waits", SampleKind::Counter, &[]),
    ("instance_pool_exhausted", SampleKind::Counter, &[]),
    ("reloads", SampleKind::Counter, &["result"]),
    ("messages_received", SampleKind::Counter, &["phase"]),
    ("unknown_chain_streams", SampleKind::Counter, &["answer"]),
    (
        "outbound_requests",
        SampleKind::Counter,
        &["chain", "plugin", "destination", "result"],
    ),
    (
        "kv_operations",
        SampleKind::Counter,
        &["chain", "plugin", "operation", "result"],
    ),
    (
        "plugin_calls",
        SampleKind::Counter,
        &["chain", "plugin", "phase", "outcome"],
    ),
];

/// The Envoy stat ids one configuration defined, by series; `None` where Envoy refused one.
#[derive(Debug, Default)]
pub struct Stats {
    ids: [Option<usize>; SERIES.len()],
}

/// What was last published, process-wide.
struct Published {
    at: Option<Instant>,
    values: BTreeMap<(&'static str, Vec<String>), u64>,
}

static PUBLISHED: Mutex<Published> = Mutex::new(Published {
    at: None,
    values: BTreeMap::new(),
});

impl Stats {
    /// Defines every series in the configuration `config` (only possible while Envoy creates
    /// it).
    ///
    /// # Safety
    ///
    /// `config` is the configuration pointer Envoy passed to the running `config_new` hook.
    pub unsafe fn define(config: ConfigEnvoyPtr) -> Stats {
        let mut stats = Stats::default();
        for (slot, (name, kind, labels)) in stats.ids.iter_mut().zip(SERIES) {
            let mut labels: Vec<ModuleBuffer> = labels
                .iter()
                .map(|l| ModuleBuffer::of(l.as_bytes()))
                .collect();
            let mut id = 0usize;
            let define = match kind {
                SampleKind::Counter => {
                    abi::envoy_dynamic_module_callback_http_filter_config_define_counter
                }
                SampleKind::Gauge => {
                    abi::envoy_dynamic_module_callback_http_filter_config_define_gauge
                }
            };
            // SAFETY: `config` is live for this hook (the caller's promise); the name and
            // label buffers outlive the call; `id` is written before it is read.
            let result = unsafe {
                define(
                    config,
                    ModuleBuffer::of(name.as_bytes()),
                    labels.as_mut_ptr(),
                    labels.len(),
                    &mut id,
                )
            };
            if result == abi::METRICS_SUCCESS {
                *slot = Some(id);
            } else {
                tracing::warn!(
                    stat = name,
                    result,
                    "Envoy refused to define a stat; it is not published"
                );
            }
        }
        stats
    }

    /// Publishes what changed since the last publication, if that was long enough ago and no
    /// other worker is publishing now.
    pub fn publish_if_due(&self, stream: &mut EnvoyStream, metrics: &Metrics) {
        let Ok(mut published) = PUBLISHED.try_lock() else {
            return;
        };
        let now = Instant::now();
        if published.at.is_some_and(|at| now - at < PUBLISH_EVERY) {
            return;
        }
        published.at = Some(now);
        for sample in metrics.samples() {
            self.publish(stream, &mut published.values, sample);
        }
    }

    fn publish(
        &self,
        stream: &mut EnvoyStream,
        values: &mut BTreeMap<(&'static str, Vec<String>), u64>,
        sample: Sample,
    ) {
        let Some(index) = SERIES.iter().position(|(name, ..)| *name == sample.name) else {
            return;
        };
        let Some(id) = self.ids[index] else {
            return;
        };
        let labels: Vec<String> = sample.labels.into_iter().map(|(_, value)| value).collect();
        let before = values.insert((sample.name, labels.clone()), sample.value);
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        match sample.kind {
            SampleKind::Counter => {
                let delta = sample.value.saturating_sub(before.unwrap_or(0));
                if delta > 0 {
                    stream.increment_counter(id, &labels, delta);
                }
            }
            SampleKind::Gauge => {
                if before != Some(sample.value) {
                    stream.set_gauge(id, sample.value);
                }
            }
        }
    }
}
