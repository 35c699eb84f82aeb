//! Shadow plugins: each runs beside one of the chain's plugins on what that plugin is given,
//! on its own instance and budget, through the same call as any plugin. What it makes is
//! compared with what the plugin made, never applied; differences and failures are counted,
//! and logged at most every [`SHADOW_LOG_INTERVAL`].

use std::time::Instant;

use super::call::{Called, Callee, Pass, Role};
use super::plugin_state::{InstanceState, PluginState};
use crate::http::{HeaderMap, Message};
use crate::registry::{Chain, SHADOW_LOG_INTERVAL, Shadow};
use crate::runtime::{Action, Outcome, PluginError};

/// What a plugin with shadows beside it was given: the message, and its direction's headers
/// where they were open to body handlers.
#[derive(Clone)]
pub(super) struct CallInput {
    pub(super) message: Message,
    pub(super) headers: Option<HeaderMap>,
}

/// What a plugin made of what it was given.
pub(super) struct CallOutput {
    pub(super) message: Message,
    pub(super) headers: Option<HeaderMap>,
    pub(super) outcome: Outcome,
}

impl CallOutput {
    /// Whether `other` came out the same: the same headers (in any order) or body bytes, the
    /// same open headers, the same decision and effects.
    fn same_as(&self, other: &CallOutput) -> bool {
        let same_headers = |a: &HeaderMap, b: &HeaderMap| {
            let sorted = |h: &HeaderMap| {
                let mut entries = h.entries().to_vec();
                entries.sort();
                entries
            };
            sorted(a) == sorted(b)
        };
        let same_message = match (&self.message, &other.message) {
            (Message::Headers { headers: a, .. }, Message::Headers { headers: b, .. })
            | (Message::Trailers(a), Message::Trailers(b)) => same_headers(a, b),
            (Message::Body(a), Message::Body(b)) => a.data == b.data,
            _ => false,
        };
        let same_open = match (&self.headers, &other.headers) {
            (Some(a), Some(b)) => same_headers(a, b),
            _ => true,
        };
        same_message && same_open && self.outcome == other.outcome
    }

    /// What it did, for a log line: its changes, its decision. Values of sensitive headers
    /// are left out.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        let changes = |headers: &HeaderMap, parts: &mut Vec<String>| {
            let changes = headers.changes();
            for (name, values) in &changes.set {
                let shown: Vec<String> = values
                    .iter()
                    .map(|v| {
                        if crate::http::SENSITIVE_HEADERS.contains(&name.as_str()) {
                            "[redacted]".to_string()
                        } else {
                            String::from_utf8_lossy(v).into_owned()
                        }
                    })
                    .collect();
                parts.push(format!("set {name}: {}", shown.join(", ")));
            }
            for name in &changes.removed {
                parts.push(format!("removed {name}"));
            }
        };
        match &self.message {
            Message::Headers { headers, .. } | Message::Trailers(headers) => {
                changes(headers, &mut parts);
            }
            Message::Body(body) if body.replaced => {
                parts.push(format!("replaced the body ({} bytes)", body.data.len()));
            }
            Message::Body(_) => {}
        }
        if let Some(headers) = &self.headers {
            changes(headers, &mut parts);
        }
        if let Action::Respond(response) = &self.outcome.action {
            parts.push(format!("answered {}", response.status));
        }
        for (namespace, key, _) in &self.outcome.effects.metadata {
            parts.push(format!("set metadata {namespace}.{key}"));
        }
        if parts.is_empty() {
            "nothing changed".into()
        } else {
            parts.join("; ")
        }
    }
}

/// One call of a plugin with shadows beside it, for them to run on.
pub(super) struct Shadowing {
    /// The plugin's index in the chain.
    pub(super) beside: usize,
    pub(super) given: CallInput,
    pub(super) served: CallOutput,
}

/// Runs the shadows beside the plugin of `shadowing` on what it was given, each on its own
/// instance and budget, and compares what they make of it with what the plugin made. Nothing
/// they do reaches the exchange: their output is dropped, and a failure only takes the shadow
/// out of the stream and is counted.
pub(super) async fn run_shadows(
    chain: &Chain,
    states: &mut [PluginState],
    pass: &Pass<'_>,
    shadowing: Shadowing,
) {
    let phase = pass.phase;
    for (shadow, state) in chain.shadows().iter().zip(states.iter_mut()) {
        let plugin = &shadow.plugin;
        if shadow.beside != shadowing.beside
            || !plugin.phases().contains(phase)
            || matches!(state.instance, InstanceState::Skipped)
        {
            continue;
        }
        let started = Instant::now();
        let made = shadow_call(shadow, state, pass, shadowing.given.clone()).await;
        match made {
            Ok(made) if made.same_as(&shadowing.served) => {}
            Ok(made) => {
                shadow.metrics.shadow_difference();
                if shadow.may_log(started) {
                    tracing::info!(
                        chain = plugin.chain(),
                        plugin = plugin.name(),
                        beside = chain.plugins()[shadowing.beside].name(),
                        phase = phase.as_str(),
                        serving = %shadowing.served.describe(),
                        shadow = %made.describe(),
                        "shadow plugin answered differently (never applied; logged at most \
                         every {}s, counted in wasm_extproc_shadow_differences_total)",
                        SHADOW_LOG_INTERVAL.as_secs()
                    );
                }
            }
            Err(error) => {
                shadow.metrics.shadow_failure(error.kind());
                if shadow.may_log(started) {
                    tracing::info!(
                        chain = plugin.chain(),
                        plugin = plugin.name(),
                        phase = phase.as_str(),
                        kind = error.kind(),
                        "shadow plugin failed (never applied; counted in \
                         wasm_extproc_shadow_failures_total): {error}"
                    );
                }
            }
        }
    }
}

/// One call of a shadow plugin, as the chain calls any plugin (a failure leaves the shadow out
/// of the stream); what it made of `given`, or why it failed.
async fn shadow_call(
    shadow: &Shadow,
    state: &mut PluginState,
    pass: &Pass<'_>,
    given: CallInput,
) -> Result<CallOutput, PluginError> {
    let plugin = &shadow.plugin;
    let callee = Callee {
        plugin,
        metrics: &shadow.metrics,
        role: Role::Shadow,
    };
    let CallInput {
        message,
        mut headers,
    } = given;
    let (message, called) = pass
        .call(callee, &mut state.instance, message, headers.as_mut())
        .await;
    match called {
        Called::Answered(answered) => Ok(CallOutput {
            message,
            // What it was lent, as it left them: it sees them only where its contract says.
            headers: headers.filter(|_| plugin.contract().body_sees_headers()),
            outcome: answered.outcome,
        }),
        Called::Failed(error) => Err(error),
        Called::Gone => {
            unreachable!("skipped shadows are not called, and a live one is never done early")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Effects, ImmediateResponse};

    fn made(sets: &[(&str, &str)], action: Action) -> CallOutput {
        let mut headers = HeaderMap::from_entries([("host".to_string(), b"a".to_vec())]);
        for (name, value) in sets {
            headers.set(name.to_string(), value.as_bytes().to_vec());
        }
        CallOutput {
            message: Message::Headers {
                headers,
                end_of_stream: false,
            },
            headers: None,
            outcome: Outcome {
                action,
                effects: Effects::default(),
            },
        }
    }

    #[test]
    fn shadow_outputs_compare_by_content_whatever_the_order_of_changes() {
        let one = made(&[("x-a", "1"), ("x-b", "2")], Action::Continue);
        assert!(one.same_as(&made(&[("x-b", "2"), ("x-a", "1")], Action::Continue)));
        assert!(!one.same_as(&made(&[("x-a", "1"), ("x-b", "3")], Action::Continue)));
        let refused = Action::Respond(ImmediateResponse {
            status: 403,
            ..ImmediateResponse::default()
        });
        assert!(!one.same_as(&made(&[("x-a", "1"), ("x-b", "2")], refused)));
    }

    #[test]
    fn a_difference_is_described_without_sensitive_values() {
        let refused = Action::Respond(ImmediateResponse {
            status: 403,
            ..ImmediateResponse::default()
        });
        let text = made(
            &[("x-tag", "v2"), ("authorization", "Bearer s3cret")],
            refused,
        )
        .describe();
        assert_eq!(
            text,
            "set x-tag: v2; set authorization: [redacted]; answered 403"
        );
        assert_eq!(made(&[], Action::Continue).describe(), "nothing changed");
    }
}
