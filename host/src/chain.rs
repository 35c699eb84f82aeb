//! Runs one phase of one stream through the plugin chain, applying each plugin's failure
//! policy. Instances are created lazily: a plugin that handles none of the phases Envoy sends
//! costs a stream nothing.

use std::sync::Arc;

use crate::config::FailurePolicy;
use crate::http::{ImmediateResponse, Message, Phase, Verdict};
use crate::registry::Chain;
use crate::runtime::{Action, Instance, Plugin, PluginError};

/// The chain as one stream sees it: the plugins it started with and their instances.
#[derive(Debug)]
pub struct StreamChain {
    chain: Arc<Chain>,
    slots: Vec<Slot>,
}

#[derive(Debug)]
enum Slot {
    /// Not needed yet.
    Idle,
    Live(Instance),
    /// Failed earlier in this stream under fail-open: skipped from now on.
    Skipped,
}

impl StreamChain {
    pub fn new(chain: Arc<Chain>) -> Self {
        let slots = chain.plugins().iter().map(|_| Slot::Idle).collect();
        StreamChain { chain, slots }
    }

    /// Passes `message` through every plugin that handles `phase`, in order.
    pub async fn run(&mut self, phase: Phase, mut message: Message) -> Verdict {
        for (plugin, slot) in self.chain.plugins().iter().zip(self.slots.iter_mut()) {
            if !plugin.phases().contains(phase) {
                continue;
            }
            if let Slot::Idle = slot {
                match plugin.instantiate().await {
                    Ok(instance) => *slot = Slot::Live(instance),
                    Err(error) => {
                        *slot = Slot::Skipped;
                        match on_failure(plugin, phase, &error) {
                            Some(response) => return Verdict::Respond(response),
                            None => continue,
                        }
                    }
                }
            }
            let Slot::Live(instance) = slot else {
                continue;
            };
            let (back, result) = instance.call(phase, message).await;
            message = back;
            match result {
                Ok(Action::Continue) => {}
                Ok(Action::Respond(response)) => return Verdict::Respond(response),
                Err(error) => {
                    *slot = Slot::Skipped;
                    if let Some(response) = on_failure(plugin, phase, &error) {
                        return Verdict::Respond(response);
                    }
                }
            }
        }
        Verdict::Continue(message)
    }
}

/// Logs a plugin failure and returns the answer its policy calls for, if any.
fn on_failure(plugin: &Plugin, phase: Phase, error: &PluginError) -> Option<ImmediateResponse> {
    let policy = plugin.settings().failure_policy;
    tracing::warn!(
        plugin = plugin.name(),
        phase = phase.as_str(),
        kind = error.kind(),
        policy = match policy {
            FailurePolicy::Open => "fail-open",
            FailurePolicy::Closed { .. } => "fail-closed",
        },
        "plugin failed: {error}"
    );
    match policy {
        FailurePolicy::Open => None,
        FailurePolicy::Closed { status } => Some(ImmediateResponse {
            status,
            // Envoy's access log shows this as %RESPONSE_CODE_DETAILS%; the client sees only
            // the status.
            details: format!(
                "wasm_extproc_plugin_failed:{}:{}",
                plugin.name(),
                error.kind()
            ),
            ..ImmediateResponse::default()
        }),
    }
}
