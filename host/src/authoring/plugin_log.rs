//! What the plugins log while `wasm-extproc test` plays an exchange, for its report: a
//! `tracing` layer that keeps the events of the `plugin` target (`host.log` lines, and what a
//! WASI plugin writes to stdout and stderr) instead of the log writing them to stderr, where
//! they would land far from the exchange they belong to.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

/// The lines kept since the last [`PluginLog::take`].
#[derive(Debug, Clone, Default)]
pub struct PluginLog(Arc<Mutex<Vec<String>>>);

impl PluginLog {
    /// The lines kept so far, in order; the log starts empty again.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<S: tracing::Subscriber> Layer<S> for PluginLog {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "plugin" {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = format!("{} {}", event.metadata().level(), fields.plugin);
        if !fields.phase.is_empty() {
            let _ = write!(line, " {}", fields.phase);
        }
        if !fields.source.is_empty() && fields.source != "log" {
            let _ = write!(line, " ({})", fields.source);
        }
        let _ = write!(line, ": {}", fields.message);
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
}

/// The fields the runtime gives a plugin's line.
#[derive(Default)]
struct Fields {
    plugin: String,
    phase: String,
    source: String,
    message: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "plugin" => self.plugin = value.to_string(),
            "phase" => self.phase = value.to_string(),
            "source" => self.source = value.to_string(),
            "message" => self.message = value.to_string(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.record_str(field, text.trim_matches('"'));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn plugin_lines_are_kept_with_their_plugin_phase_and_source_and_nothing_else() {
        let log = PluginLog::default();
        let subscriber = tracing_subscriber::registry().with(log.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "plugin", chain = "default", plugin = "tag", phase = "request_headers", source = "stdout", "seen {}", 1);
            tracing::warn!(target: "wasm_extproc", "the host's own line");
            tracing::error!(target: "plugin", chain = "default", plugin = "tag", phase = "request_headers", source = "log", "panicked");
        });
        assert_eq!(
            log.take(),
            [
                "INFO tag request_headers (stdout): seen 1",
                "ERROR tag request_headers: panicked"
            ]
        );
        assert!(log.take().is_empty());
    }
}
