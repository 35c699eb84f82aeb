//! Runs one message of one stream through the plugin chain, applying each plugin's failure
//! policy. Instances are created lazily: a plugin that handles none of the phases Envoy sends
//! costs a stream nothing.
//!
//! Plugins that want whole bodies while Envoy streams (`FULL_DUPLEX_STREAMED`) get them here:
//! the chain holds each chunk back at that plugin until the end of the body (or until trailers
//! arrive), then passes the whole body on from there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::breaker::{Admission, Transition};
use crate::config::FailurePolicy;
use crate::http::{
    BodyChunk, BodyMode, Decision, Delivery, Direction, Effects, ExchangeContext,
    ImmediateResponse, Message, Phase, PhaseSet, Verdict,
};
use crate::metrics::Metrics;
use crate::registry::Generation;
use crate::runtime::{Action, Instance, OutputCheck, Plugin, PluginError};

/// Largest body the host holds back for a plugin that wants it whole. Past this the plugin
/// fails (kind `body_too_large`) and its policy applies; under fail-open what was held flows on
/// unchanged.
pub const MAX_HELD_BODY_BYTES: usize = 8 << 20;

/// What the chain needs to know about the stream besides the message.
pub struct Situation<'a> {
    pub exchange: &'a Arc<ExchangeContext>,
    /// How Envoy sends bodies in the direction of the message.
    pub body_mode: BodyMode,
    /// Checks each plugin's output against Envoy's rules.
    pub check: OutputCheck<'a>,
}

impl std::fmt::Debug for Situation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Situation")
            .field("body_mode", &self.body_mode)
            .finish_non_exhaustive()
    }
}

/// The chain as one stream sees it: the plugins it started with, their instances, and the
/// body chunks held for plugins that want whole bodies.
#[derive(Debug)]
pub struct StreamChain {
    generation: Arc<Generation>,
    plugins: Vec<PluginState>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct PluginState {
    slot: Slot,
    /// Chunks held back, per direction (request, response).
    held: [Option<Vec<u8>>; 2],
    /// Whether the "cannot hold chunks in STREAMED mode" warning was logged for this stream.
    warned_streamed: bool,
}

#[derive(Debug, Default)]
enum Slot {
    /// Not needed yet.
    #[default]
    Idle,
    Live(Box<Instance>),
    /// Failed earlier in this stream: skipped from now on.
    Skipped,
}

fn held_index(direction: Direction) -> usize {
    match direction {
        Direction::Request => 0,
        Direction::Response => 1,
    }
}

impl StreamChain {
    pub fn new(generation: Arc<Generation>, metrics: Arc<Metrics>) -> Self {
        let plugins = generation
            .chain
            .plugins()
            .iter()
            .map(|_| PluginState::default())
            .collect();
        StreamChain {
            generation,
            plugins,
            metrics,
        }
    }

    /// The phases some plugin still handles in this stream (plugins that failed are out).
    pub fn live_phases(&self) -> PhaseSet {
        self.generation
            .chain
            .plugins()
            .iter()
            .zip(&self.plugins)
            .filter(|(_, state)| !matches!(state.slot, Slot::Skipped))
            .fold(PhaseSet::EMPTY, |set, (plugin, _)| {
                set.union(plugin.phases())
            })
    }

    /// Whether some plugin is holding body chunks of `direction`.
    pub fn is_holding(&self, direction: Direction) -> bool {
        self.plugins
            .iter()
            .any(|state| state.held[held_index(direction)].is_some())
    }

    /// Passes `message` through every plugin that handles `phase`, in order.
    pub async fn run(
        &mut self,
        phase: Phase,
        message: Message,
        situation: &Situation<'_>,
    ) -> Verdict {
        self.run_from(0, phase, message, situation, false).await
    }

    /// Trailers arrived while plugins hold body chunks: each holding plugin gets what it holds
    /// as its whole body (end-of-stream false), and the result flows on through the chain.
    pub async fn flush(&mut self, direction: Direction, situation: &Situation<'_>) -> Verdict {
        let index = held_index(direction);
        let first = self
            .plugins
            .iter()
            .position(|state| state.held[index].is_some())
            .unwrap_or(self.plugins.len());
        let empty = Message::Body(BodyChunk::new(Vec::new(), false));
        self.run_from(first, direction.body(), empty, situation, true)
            .await
    }

    async fn run_from(
        &mut self,
        first: usize,
        phase: Phase,
        mut message: Message,
        situation: &Situation<'_>,
        flushing: bool,
    ) -> Verdict {
        let mut effects = Effects::default();
        let metrics = &*self.metrics;
        let plugins = self
            .generation
            .chain
            .plugins()
            .iter()
            .zip(self.plugins.iter_mut())
            .skip(first);
        for (plugin, state) in plugins {
            if !plugin.phases().contains(phase) || matches!(state.slot, Slot::Skipped) {
                continue;
            }
            let fail = |state: &mut PluginState, error: PluginError, took: Duration| {
                state.slot = Slot::Skipped;
                metrics.plugin_call(plugin.name(), phase, error.kind(), took);
                if error.is_plugins_fault() {
                    note(plugin, plugin.breaker().record(Instant::now(), true));
                }
                on_failure(plugin, phase, &error)
            };
            if let Message::Body(chunk) = &mut message {
                let direction = phase.direction();
                match hold(
                    plugin,
                    state,
                    direction,
                    chunk,
                    situation.body_mode,
                    flushing,
                ) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Verdict {
                            decision: Decision::Held,
                            effects,
                        };
                    }
                    Err(error) => match fail(state, error, Duration::ZERO) {
                        Some(response) => return respond(response, effects),
                        None => continue,
                    },
                }
            }
            if let Admission::Quarantined(left) = plugin.breaker().admit(Instant::now()) {
                match fail(state, PluginError::Quarantined(left), Duration::ZERO) {
                    Some(response) => return respond(response, effects),
                    None => continue,
                }
            }
            let started = Instant::now();
            if let Slot::Idle = state.slot {
                match plugin.instantiate().await {
                    Ok(instance) => {
                        metrics.instantiated(plugin.name(), started.elapsed());
                        state.slot = Slot::Live(Box::new(instance));
                    }
                    Err(error) => match fail(state, error, started.elapsed()) {
                        Some(response) => return respond(response, effects),
                        None => continue,
                    },
                }
            }
            let Slot::Live(instance) = &mut state.slot else {
                continue;
            };
            let (back, result) = instance
                .call(phase, message, situation.exchange, situation.check)
                .await;
            message = back;
            match result {
                Ok(outcome) => {
                    metrics.plugin_call(plugin.name(), phase, "ok", started.elapsed());
                    note(plugin, plugin.breaker().record(Instant::now(), false));
                    effects.absorb(outcome.effects);
                    if let Action::Respond(response) = outcome.action {
                        return respond(response, effects);
                    }
                }
                Err(error) => {
                    if let Some(response) = fail(state, error, started.elapsed()) {
                        return respond(response, effects);
                    }
                }
            }
        }
        Verdict {
            decision: Decision::Continue(message),
            effects,
        }
    }
}

/// Logs a breaker transition: once per quarantine, not once per request.
fn note(plugin: &Plugin, transition: Option<Transition>) {
    match transition {
        Some(Transition::Opened(backoff)) => tracing::warn!(
            plugin = plugin.name(),
            backoff_ms = backoff.as_millis() as u64,
            "plugin keeps failing; quarantined: it is not called (its failure policy applies) \
             until the back-off ends and a probe call succeeds"
        ),
        Some(Transition::Recovered) => {
            tracing::info!(plugin = plugin.name(), "quarantined plugin recovered")
        }
        None => {}
    }
}

fn respond(response: ImmediateResponse, effects: Effects) -> Verdict {
    Verdict {
        decision: Decision::Respond(response),
        effects,
    }
}

/// Decides whether `plugin` sees `chunk` now. Returns `Ok(false)` when the chunk was taken into
/// the plugin's held body and nothing goes on yet; when the body is complete (or being
/// flushed) the chunk becomes everything held plus itself.
fn hold(
    plugin: &Plugin,
    state: &mut PluginState,
    direction: Direction,
    chunk: &mut BodyChunk,
    body_mode: BodyMode,
    flushing: bool,
) -> Result<bool, PluginError> {
    if plugin.registration().delivery(direction) != Delivery::Whole {
        return Ok(true);
    }
    match body_mode {
        BodyMode::FullDuplexStreamed => {}
        // Envoy already sends everything it will send in one message.
        BodyMode::Buffered | BodyMode::BufferedPartial => return Ok(true),
        BodyMode::Streamed | BodyMode::None => {
            if !state.warned_streamed && !chunk.end_of_stream {
                state.warned_streamed = true;
                tracing::warn!(
                    plugin = plugin.name(),
                    "plugin wants whole bodies, but Envoy streams this one (STREAMED mode \
                     answers every chunk in turn, so the host cannot hold chunks back): it \
                     gets chunks; use BUFFERED or FULL_DUPLEX_STREAMED for this plugin"
                );
            }
            return Ok(true);
        }
    }
    let slot = &mut state.held[held_index(direction)];
    let held = slot.get_or_insert_with(Vec::new);
    if held.len() + chunk.data.len() > MAX_HELD_BODY_BYTES {
        // Whatever the policy, what was held must not be lost: it flows on unchanged.
        let mut whole = slot.take().unwrap_or_default();
        whole.append(&mut chunk.data);
        chunk.data = whole;
        return Err(PluginError::BodyTooLarge(MAX_HELD_BODY_BYTES));
    }
    if !chunk.end_of_stream && !flushing {
        held.append(&mut chunk.data);
        return Ok(false);
    }
    let mut whole = slot.take().unwrap_or_default();
    whole.append(&mut chunk.data);
    chunk.data = whole;
    Ok(true)
}

/// Logs a plugin failure and returns the answer its policy calls for, if any.
fn on_failure(plugin: &Plugin, phase: Phase, error: &PluginError) -> Option<ImmediateResponse> {
    let policy = plugin.settings().failure_policy;
    // A quarantined plugin was logged once, when the quarantine began; the metrics count
    // every skipped call.
    if !matches!(error, PluginError::Quarantined(_)) {
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
    }
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
