//! Runs one message of one stream through the plugin chain, applying each plugin's failure
//! policy. Instances are created lazily: a plugin that handles none of the phases Envoy sends
//! costs a stream nothing.
//!
//! After each call the chain checks the plugin's changes against Envoy's rules (the
//! generation's [`Guard`](crate::guard::Guard)) and keeps them, or rolls them back
//! when the call failed or the guard refused them. The header changes it kept are what the
//! answer to Envoy carries.
//!
//! Plugins that want whole bodies while Envoy streams (`FULL_DUPLEX_STREAMED`) get them here:
//! the chain holds each chunk back at that plugin until the end of the body (or until trailers
//! arrive), then passes the whole body on from there.
//!
//! Body handlers of the 0.3.0 contract get their direction's headers while changes to them
//! still take effect: the headers are *open* from the headers phase until the first body
//! message that is not held. Envoy keeps them back that long in `BUFFERED` and
//! `BUFFERED_PARTIAL` modes; where it streams (`FULL_DUPLEX_STREAMED`, and in-process) the
//! caller keeps them back while a plugin wants the body whole
//! ([`opens_headers`](StreamChain::opens_headers)). What body handlers change in them comes
//! with the verdict on that last message ([`Verdict::headers`]).
//!
//! # Layout
//!
//! - `call`: the one way the chain calls a plugin, serving or shadow: breaker, instance, call,
//!   guard, and what is counted and recorded of it.
//! - `held`: the chunks held back for plugins that want whole bodies.
//! - `shadow`: shadow plugins, run beside a serving one and compared with it.
//! - `plugin_state`: what a stream keeps of each plugin.
//!
//! Imports run one way: this file uses all four; `shadow` uses `call`; each uses
//! `plugin_state`.

mod call;
mod held;
mod plugin_state;
mod shadow;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bodies::Reservation;
use crate::config::FailurePolicy;
use crate::http::{
    BodyChunk, BodyMode, Changes, Decision, Delivery, Direction, Effects, ExchangeContext,
    HeaderChanges, HeaderMap, ImmediateResponse, Message, PerDirection, Phase, PhaseSet, Verdict,
};
use crate::metrics::PluginMetrics;
use crate::registry::{Chain, Generation};
use crate::runtime::{Action, Plugin, PluginError};
use call::{Answered, Called, Callee, Pass, Role};
use held::{Arrival, Holding, let_go, take_whole_body};
use plugin_state::{InstanceState, PluginState};
use shadow::{CallInput, CallOutput, Shadowing, run_shadows};

pub use call::{CALL_SPAN, SOURCE_ADDRESS, TRACE_TARGET};

/// The chain as one stream sees it: the plugins it started with, their instances, and the
/// body chunks held for plugins that want whole bodies.
#[derive(Debug)]
pub struct StreamChain {
    generation: Arc<Generation>,
    /// The generation's chain this stream runs (see [`Generation::chain`]).
    index: usize,
    plugins: Vec<PluginState>,
    /// The chain's shadow plugins' states, in the chain's order of shadows.
    shadows: Vec<PluginState>,
    /// Per direction (request, response): the headers while they are open to body handlers.
    open: PerDirection<Option<OpenHeaders>>,
}

/// A direction's headers, as the headers phase left them, lent to body handlers.
#[derive(Debug, Default)]
struct OpenHeaders {
    headers: HeaderMap,
    /// What body handlers changed so far, checked by the guard.
    changes: HeaderChanges,
}

impl StreamChain {
    /// A stream on `generation`'s chain at `index` (0: the default chain).
    pub fn new(generation: Arc<Generation>, index: usize) -> Self {
        let chain = generation.chain(index);
        let plugins = chain
            .plugins()
            .iter()
            .map(|_| PluginState::default())
            .collect();
        let shadows = chain
            .shadows()
            .iter()
            .map(|_| PluginState::default())
            .collect();
        StreamChain {
            generation,
            index,
            plugins,
            shadows,
            open: Default::default(),
        }
    }

    /// The generation this stream runs on, start to end.
    pub fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    /// The chain this stream runs.
    pub fn chain(&self) -> &Chain {
        self.generation.chain(self.index)
    }

    /// The phases some plugin still handles in this stream (plugins that failed are out).
    pub fn live_phases(&self) -> PhaseSet {
        self.chain()
            .plugins()
            .iter()
            .zip(&self.plugins)
            .filter(|(_, state)| !matches!(state.instance, InstanceState::Skipped))
            .fold(PhaseSet::EMPTY, |set, (plugin, _)| {
                set.union(plugin.phases())
            })
    }

    /// Gives back the instances of plugins that handle none of the phases still `to_come`:
    /// a stream that waits long on its upstream then holds only what it still needs.
    pub fn release_finished(&mut self, to_come: PhaseSet) {
        for (plugin, state) in self
            .generation
            .chain(self.index)
            .plugins()
            .iter()
            .zip(&mut self.plugins)
        {
            if matches!(state.instance, InstanceState::Live(_))
                && !plugin.phases().intersects(to_come)
                && let InstanceState::Live(instance) =
                    std::mem::replace(&mut state.instance, InstanceState::Done)
            {
                plugin.release(*instance);
            }
        }
    }

    /// The plugins still live in this stream that handle `direction`'s body.
    fn body_plugins(&self, direction: Direction) -> impl Iterator<Item = &Plugin> {
        self.chain()
            .plugins()
            .iter()
            .zip(&self.plugins)
            .filter(move |(plugin, state)| {
                !matches!(state.instance, InstanceState::Skipped)
                    && plugin.phases().contains(direction.body())
            })
            .map(|(plugin, _)| plugin)
    }

    /// Whether a plugin still live in this stream wants `direction`'s body whole.
    pub fn wants_whole_body(&self, direction: Direction) -> bool {
        self.body_plugins(direction)
            .any(|plugin| plugin.registration().delivery(direction) == Delivery::Whole)
    }

    /// Whether `direction`'s headers stay open to body handlers once its headers phase passes,
    /// where Envoy sends its body in `body_mode`: some live plugin's body handler takes headers
    /// (contract 0.3.0), and the headers wait for the body -- Envoy holds them in `BUFFERED`
    /// and `BUFFERED_PARTIAL` modes; in `FULL_DUPLEX_STREAMED` mode (and in-process) the caller
    /// holds them while a plugin wants the body whole.
    pub fn opens_headers(&self, direction: Direction, body_mode: BodyMode) -> bool {
        if !self.chain().phases().contains(direction.body()) {
            return false;
        }
        let waits = match body_mode {
            BodyMode::Buffered | BodyMode::BufferedPartial => true,
            BodyMode::FullDuplexStreamed => self.wants_whole_body(direction),
            BodyMode::Streamed | BodyMode::None => false,
        };
        waits
            && self
                .body_plugins(direction)
                .any(|plugin| plugin.contract().body_sees_headers())
    }

    /// Whether `direction`'s headers are open to body handlers now: the caller holds its answer
    /// to them until a verdict carries [`Verdict::headers`].
    pub fn headers_open(&self, direction: Direction) -> bool {
        self.open[direction].is_some()
    }

    /// Opens `direction`'s headers to body handlers, as they are after the headers phase: for
    /// a caller whose chain did not run that phase (no plugin handles it).
    pub fn open_headers(&mut self, direction: Direction, headers: HeaderMap) {
        self.open[direction] = Some(OpenHeaders {
            headers,
            changes: HeaderChanges::default(),
        });
    }

    /// Whether some plugin is holding body chunks of `direction`.
    pub fn is_holding(&self, direction: Direction) -> bool {
        self.plugins
            .iter()
            .any(|state| state.held[direction].is_some())
    }

    /// Passes `message` through every plugin that handles `phase`, in order. `body_mode` is how
    /// Envoy sends bodies in the message's direction.
    ///
    /// This and [`flush`](Self::flush) hand back [`run_from`](Self::run_from)'s future itself
    /// rather than awaiting it in one of their own: each level of `async fn` adds its own
    /// state to the stream's future, which is built and moved for every message.
    pub fn run(
        &mut self,
        phase: Phase,
        message: Message,
        body_mode: BodyMode,
        context: &Arc<ExchangeContext>,
    ) -> impl Future<Output = Verdict> {
        self.run_from(0, phase, message, body_mode, context, Arrival::FromEnvoy)
    }

    /// Trailers arrived while plugins hold body chunks: each holding plugin gets what it holds
    /// as its whole body (end-of-stream false), and the result flows on through the chain.
    pub fn flush(
        &mut self,
        direction: Direction,
        body_mode: BodyMode,
        context: &Arc<ExchangeContext>,
    ) -> impl Future<Output = Verdict> {
        let first = self
            .plugins
            .iter()
            .position(|state| state.held[direction].is_some())
            .unwrap_or(self.plugins.len());
        let empty = Message::Body(BodyChunk::new(Vec::new(), false));
        self.run_from(
            first,
            direction.body(),
            empty,
            body_mode,
            context,
            Arrival::Flushed,
        )
    }

    /// Passes `message` through the plugins that handle `phase`, from the one at `first`.
    async fn run_from(
        &mut self,
        first: usize,
        phase: Phase,
        mut message: Message,
        body_mode: BodyMode,
        context: &Arc<ExchangeContext>,
        arrival: Arrival,
    ) -> Verdict {
        let direction = phase.direction();
        let pass = Pass {
            generation: &self.generation,
            phase,
            context,
            // A plugin instantiated for this message waits for a full pool from now on.
            arrived: Instant::now(),
        };
        let chain = self.generation.chain(self.index);
        // Body handlers that take headers get these, while they are open.
        let open = match message {
            Message::Body(_) => self.open[direction].take(),
            _ => None,
        };
        let mut run = Run::new(pass, chain, (body_mode, arrival), open, &message);
        let plugins = chain
            .plugins()
            .iter()
            .zip(chain.plugin_metrics())
            .zip(self.plugins.iter_mut())
            .enumerate()
            .skip(first);
        let mut stopped = None;
        for (index, ((plugin, metrics), state)) in plugins {
            if !plugin.phases().contains(phase) || matches!(state.instance, InstanceState::Skipped)
            {
                continue;
            }
            let (back, next) = run.through(index, (plugin, metrics), state, message).await;
            message = back;
            if let ControlFlow::Break(decision) = next {
                stopped = Some(decision);
                break;
            }
        }
        let Run {
            pass,
            answer,
            reserved,
            shadowing,
            ..
        } = run;
        for shadowing in shadowing {
            // Boxed: only chains with shadows get here, and unboxed its state would make
            // every message's future larger by more than a plugin call's.
            Box::pin(run_shadows(chain, &mut self.shadows, &pass, shadowing)).await;
        }
        let verdict = self.verdict(direction, body_mode, stopped, message, answer);
        // The body the plugins saw was held against the budget until now.
        drop(reserved);
        verdict
    }

    /// The answer to Envoy on a message the plugins are through with: `stopped` where one of
    /// them stopped it, else the message goes on with what `answer` gathered.
    fn verdict(
        &mut self,
        direction: Direction,
        body_mode: BodyMode,
        stopped: Option<Decision>,
        message: Message,
        answer: Answer,
    ) -> Verdict {
        let Answer {
            open,
            changes,
            effects,
        } = answer;
        let decision = match stopped {
            Some(Decision::Held) => {
                // The headers stay open until the body is let go.
                self.open[direction] = open;
                return Verdict {
                    decision: Decision::Held,
                    effects,
                    headers: None,
                };
            }
            Some(decision) => decision,
            None => Decision::Continue(match message {
                Message::Headers {
                    headers,
                    end_of_stream,
                } => {
                    if !end_of_stream && self.opens_headers(direction, body_mode) {
                        self.open_headers(direction, headers);
                    }
                    Changes::Headers(changes)
                }
                Message::Trailers(_) => Changes::Headers(changes),
                Message::Body(body) => Changes::Body(body),
            }),
        };
        // A body message not held ends the headers' time open: they go on with its answer.
        let headers = match decision {
            Decision::Continue(_) => open.map(|open| open.changes),
            _ => None,
        };
        Verdict {
            decision,
            effects,
            headers,
        }
    }
}

/// One message on its way through the chain's plugins.
struct Run<'a> {
    pass: Pass<'a>,
    chain: &'a Chain,
    /// How Envoy sends bodies in the message's direction, and how this one reached the chain.
    body_mode: BodyMode,
    arrival: Arrival,
    answer: Answer,
    /// The share of the host's body budget of the body the plugins see, held until the answer.
    reserved: Vec<Reservation>,
    /// Why no plugin sees this body: there was no room for it in the host's body budget.
    over_budget: Option<PluginError>,
    /// What shadow plugins run on, and what the plugins they run beside made of it.
    shadowing: Vec<Shadowing>,
}

/// What the plugins' changes that were kept add up to so far: what the answer carries.
#[derive(Default)]
struct Answer {
    /// The direction's headers, while they are open to body handlers.
    open: Option<OpenHeaders>,
    changes: HeaderChanges,
    effects: Effects,
}

impl<'a> Run<'a> {
    fn new(
        pass: Pass<'a>,
        chain: &'a Chain,
        (body_mode, arrival): (BodyMode, Arrival),
        open: Option<OpenHeaders>,
        message: &Message,
    ) -> Self {
        // A body the plugins will see is held against the host-wide budget until the answer;
        // without room, none of them sees it.
        let mut reserved = Vec::new();
        let bodies = &pass.generation.bodies;
        let over_budget = match message {
            Message::Body(chunk) if !chunk.data.is_empty() => {
                let bytes = chunk.data.len() as u64;
                match bodies.reserve(bytes) {
                    Some(reservation) => {
                        reserved.push(reservation);
                        None
                    }
                    None => Some(PluginError::BodyBudget {
                        bytes,
                        limit: bodies.limit(),
                    }),
                }
            }
            _ => None,
        };
        Run {
            pass,
            chain,
            body_mode,
            arrival,
            answer: Answer {
                open,
                ..Answer::default()
            },
            reserved,
            over_budget,
            shadowing: Vec::new(),
        }
    }

    /// Takes `message` through `plugin`, the chain's plugin at `index`: it may hold a body
    /// chunk back, then the call, and what is kept of it. Breaks with the decision that stops
    /// the message there.
    async fn through(
        &mut self,
        index: usize,
        (plugin, metrics): (&Plugin, &PluginMetrics),
        state: &mut PluginState,
        mut message: Message,
    ) -> (Message, ControlFlow<Decision>) {
        let phase = self.pass.phase;
        let callee = Callee {
            plugin,
            metrics,
            role: Role::Serving,
        };
        if let Message::Body(chunk) = &mut message {
            match self.holding_for(plugin, state, chunk) {
                Ok(Holding::PassOn) => {}
                Ok(Holding::Held) => return (message, ControlFlow::Break(Decision::Held)),
                Err(error) => {
                    self.pass
                        .fail(callee, &mut state.instance, &error, Duration::ZERO);
                    return (message, on_failure(plugin, phase, &error));
                }
            }
        }
        // Only where a shadow runs beside this plugin: what it is given, copied.
        let given = self.chain.is_shadowed(index).then(|| CallInput {
            message: message.clone(),
            headers: self.answer.open.as_ref().map(|open| open.headers.clone()),
        });
        let headers = self.answer.open.as_mut().map(|open| &mut open.headers);
        let (mut message, called) = self
            .pass
            .call(callee, &mut state.instance, message, headers)
            .await;
        let next = match called {
            Called::Answered(answered) => {
                if let Some(given) = given {
                    self.shadow(index, given, &message, &answered);
                }
                self.keep(metrics, &mut message, answered)
            }
            Called::Failed(error) => on_failure(plugin, phase, &error),
            Called::Gone => ControlFlow::Continue(()),
        };
        (message, next)
    }

    /// Whether `plugin` sees `chunk` now (see [`take_whole_body`]); an error where it cannot
    /// see it at all.
    fn holding_for(
        &mut self,
        plugin: &Plugin,
        state: &mut PluginState,
        chunk: &mut BodyChunk,
    ) -> Result<Holding, PluginError> {
        let direction = self.pass.phase.direction();
        if let Some(error) = &self.over_budget {
            // What the plugin held of this body must not be lost: it flows on, unchanged,
            // ahead of the message there was no room for.
            let_go(state, direction, chunk, &mut self.reserved);
            return Err(error.clone());
        }
        let reserved = (direction, &mut self.reserved);
        take_whole_body(plugin, state, reserved, chunk, self.body_mode, self.arrival)
    }

    /// Keeps, for the shadows beside the plugin at `index`, what it was given and what it made.
    fn shadow(&mut self, index: usize, given: CallInput, message: &Message, answered: &Answered) {
        self.shadowing.push(Shadowing {
            beside: index,
            given,
            served: CallOutput {
                message: message.clone(),
                headers: self.answer.open.as_ref().map(|open| open.headers.clone()),
                outcome: answered.outcome.clone(),
            },
        });
    }

    /// Keeps what a plugin that answered made of `message`: its changes and effects. Breaks
    /// where it answered the client itself.
    fn keep(
        &mut self,
        metrics: &PluginMetrics,
        message: &mut Message,
        answered: Answered,
    ) -> ControlFlow<Decision> {
        let Answered {
            outcome,
            changes,
            opened,
        } = answered;
        let answer = &mut self.answer;
        message.checkpoint();
        if let Some(changes) = changes {
            answer.changes.absorb(changes);
        }
        if let (Some(open), Some(opened)) = (answer.open.as_mut(), opened) {
            open.headers.checkpoint();
            open.changes.absorb(opened);
        }
        answer.effects.absorb(outcome.effects);
        if let Action::Respond(response) = outcome.action {
            metrics.responded(response.status);
            return ControlFlow::Break(Decision::Respond(response));
        }
        ControlFlow::Continue(())
    }
}

impl Drop for StreamChain {
    /// Instances still healthy at the end of the stream go back to their plugin, which keeps
    /// them if it is reused (`isolation = "reuse"`) and drops them otherwise.
    fn drop(&mut self) {
        self.release_finished(PhaseSet::EMPTY);
    }
}

/// Logs a plugin failure, and breaks with the answer its policy calls for, if any.
fn on_failure(plugin: &Plugin, phase: Phase, error: &PluginError) -> ControlFlow<Decision> {
    let policy = plugin.settings().failure_policy;
    // A quarantined plugin was logged once, when the quarantine began; the metrics count
    // every skipped call.
    if !matches!(error, PluginError::Quarantined(_)) {
        tracing::warn!(
            chain = plugin.chain(),
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
        FailurePolicy::Open => ControlFlow::Continue(()),
        FailurePolicy::Closed { status } => {
            ControlFlow::Break(Decision::Respond(ImmediateResponse {
                status,
                // Envoy's access log shows this as %RESPONSE_CODE_DETAILS%; the client sees only
                // the status.
                details: format!(
                    "wasm_extproc_plugin_failed:{}:{}",
                    plugin.name(),
                    error.kind()
                ),
                ..ImmediateResponse::default()
            }))
        }
    }
}
