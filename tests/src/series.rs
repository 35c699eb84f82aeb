//! Counters that capabilities register for themselves ([`Metrics::family`]), read the way a
//! scrape reads them.

use wasm_extproc::metrics::Metrics;

/// The value of the series `name{labels}` (written as the exposition writes it) in a
/// Prometheus text exposition, as a scrape of `/metrics` returns it.
pub fn scraped(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))?
        .trim()
        .parse()
        .ok()
}

/// The capabilities' counters a test asserts on, by their labels.
pub trait CapabilitySeries {
    /// State store operations of `plugin` in `chain` that ended with `result`.
    fn kv_operations(&self, chain: &str, plugin: &str, operation: &str, result: &str) -> u64;
    /// HTTP requests of `plugin` in `chain` to `destination` that ended with `result`.
    fn outbound_requests(&self, chain: &str, plugin: &str, destination: &str, result: &str) -> u64;
}

impl CapabilitySeries for Metrics {
    fn kv_operations(&self, chain: &str, plugin: &str, operation: &str, result: &str) -> u64 {
        self.counter_value(
            "kv_operations",
            &[
                ("chain", chain),
                ("plugin", plugin),
                ("operation", operation),
                ("result", result),
            ],
        )
    }

    fn outbound_requests(&self, chain: &str, plugin: &str, destination: &str, result: &str) -> u64 {
        self.counter_value(
            "outbound_requests",
            &[
                ("chain", chain),
                ("plugin", plugin),
                ("destination", destination),
                ("result", result),
            ],
        )
    }
}
