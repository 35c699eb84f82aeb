//! Counters and histograms in Prometheus form: what the host received, what plugins did.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::http::Phase;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    plugin: String,
    phase: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

/// The host's metrics. Cheap to share.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    messages: Family<PhaseLabel, Counter>,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<PluginLabel, Histogram>,
}

/// Plugin calls take microseconds to milliseconds; buckets from 1 µs to ~16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-6, 4.0, 13))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("wasm_extproc");
        let messages = Family::<PhaseLabel, Counter>::default();
        registry.register(
            "messages_received",
            "ext_proc messages received from Envoy, by phase",
            messages.clone(),
        );
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "plugin_calls",
            "Plugin handler calls by plugin, phase and outcome (ok, or the failure kind)",
            calls.clone(),
        );
        let call_seconds = Family::<PluginLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "plugin_call_duration_seconds",
            "Time spent in plugin handler calls, by plugin",
            call_seconds.clone(),
        );
        Arc::new(Metrics {
            registry,
            messages,
            calls,
            call_seconds,
        })
    }

    pub fn message_received(&self, phase: Phase) {
        self.messages
            .get_or_create(&PhaseLabel {
                phase: phase.as_str(),
            })
            .inc();
    }

    /// How many messages of `phase` arrived.
    pub fn messages_received(&self, phase: Phase) -> u64 {
        self.messages
            .get_or_create(&PhaseLabel {
                phase: phase.as_str(),
            })
            .get()
    }

    pub fn plugin_call(&self, plugin: &str, phase: Phase, outcome: &'static str, took: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                plugin: plugin.to_string(),
                phase: phase.as_str(),
                outcome,
            })
            .inc();
        self.call_seconds
            .get_or_create(&PluginLabel {
                plugin: plugin.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// How many calls of `plugin` in `phase` ended with `outcome`.
    pub fn plugin_calls(&self, plugin: &str, phase: Phase, outcome: &'static str) -> u64 {
        self.calls
            .get_or_create(&CallLabels {
                plugin: plugin.to_string(),
                phase: phase.as_str(),
                outcome,
            })
            .get()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
