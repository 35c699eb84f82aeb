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

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::bodies::{MAX_HELD_BODY_BYTES, Reservation};
use crate::breaker::{Admission, Call, Client, Transition};
use crate::config::FailurePolicy;
use crate::http::{
    BodyChunk, BodyMode, Changes, Decision, Delivery, Direction, Effects, ExchangeContext,
    HeaderChanges, HeaderMap, ImmediateResponse, Message, Phase, PhaseSet, Verdict,
};
use crate::registry::{Chain, Generation, SHADOW_LOG_INTERVAL, Shadow};
use crate::runtime::{Action, Instance, Outcome, Plugin, PluginError};

/// The `tracing` target of the spans meant for traces: only a trace layer enables it.
pub const TRACE_TARGET: &str = "wasm_extproc::trace";
/// The span of one plugin call (instantiation included), child of the stream's.
pub const CALL_SPAN: &str = "plugin call";

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
    open: [Option<OpenHeaders>; 2],
}

/// A direction's headers, as the headers phase left them, lent to body handlers.
#[derive(Debug, Default)]
struct OpenHeaders {
    headers: HeaderMap,
    /// What body handlers changed so far, checked by the guard.
    changes: HeaderChanges,
}

#[derive(Debug, Default)]
struct PluginState {
    slot: Slot,
    /// Chunks held back, per direction (request, response).
    held: [Option<Vec<u8>>; 2],
    /// Their share of the host's body budget, per direction.
    held_reserved: [Option<Reservation>; 2],
    /// Whether the "cannot hold chunks in STREAMED mode" warning was logged for this stream.
    warned_streamed: bool,
}

#[derive(Debug, Default)]
enum Slot {
    /// Not needed yet.
    #[default]
    Idle,
    Live(Box<Instance>),
    /// No phase it handles can still come: its instance went back to the pool early.
    Done,
    /// Failed earlier in this stream: skipped from now on.
    Skipped,
}

/// How a body message reaches the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// As Envoy sent it.
    FromEnvoy,
    /// Trailers came: whatever a plugin holds is all of the body there will be.
    Flushed,
}

/// What a plugin that wants whole bodies does with a chunk.
enum Holding {
    /// It sees the message now: it is the whole body, or the plugin takes chunks.
    PassOn,
    /// It keeps the chunk until the body is complete: nothing goes on yet.
    Held,
}

fn held_index(direction: Direction) -> usize {
    match direction {
        Direction::Request => 0,
        Direction::Response => 1,
    }
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
            .filter(|(_, state)| !matches!(state.slot, Slot::Skipped))
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
            if matches!(state.slot, Slot::Live(_))
                && !plugin.phases().intersects(to_come)
                && let Slot::Live(instance) = std::mem::replace(&mut state.slot, Slot::Done)
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
                !matches!(state.slot, Slot::Skipped) && plugin.phases().contains(direction.body())
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
        self.open[held_index(direction)].is_some()
    }

    /// Opens `direction`'s headers to body handlers, as they are after the headers phase: for
    /// a caller whose chain did not run that phase (no plugin handles it).
    pub fn open_headers(&mut self, direction: Direction, headers: HeaderMap) {
        self.open[held_index(direction)] = Some(OpenHeaders {
            headers,
            changes: HeaderChanges::default(),
        });
    }

    /// Whether some plugin is holding body chunks of `direction`.
    pub fn is_holding(&self, direction: Direction) -> bool {
        self.plugins
            .iter()
            .any(|state| state.held[held_index(direction)].is_some())
    }

    /// Passes `message` through every plugin that handles `phase`, in order. `body_mode` is how
    /// Envoy sends bodies in the message's direction.
    pub async fn run(
        &mut self,
        phase: Phase,
        message: Message,
        body_mode: BodyMode,
        context: &Arc<ExchangeContext>,
    ) -> Verdict {
        self.run_from(0, phase, message, body_mode, context, Arrival::FromEnvoy)
            .await
    }

    /// Trailers arrived while plugins hold body chunks: each holding plugin gets what it holds
    /// as its whole body (end-of-stream false), and the result flows on through the chain.
    pub async fn flush(
        &mut self,
        direction: Direction,
        body_mode: BodyMode,
        context: &Arc<ExchangeContext>,
    ) -> Verdict {
        let index = held_index(direction);
        let first = self
            .plugins
            .iter()
            .position(|state| state.held[index].is_some())
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
        .await
    }

    async fn run_from(
        &mut self,
        first: usize,
        phase: Phase,
        mut message: Message,
        body_mode: BodyMode,
        context: &Arc<ExchangeContext>,
        arrival: Arrival,
    ) -> Verdict {
        let mut effects = Effects::default();
        let mut changes = HeaderChanges::default();
        let direction = phase.direction();
        // A plugin instantiated for this message waits for a full pool from now on.
        let arrived = Instant::now();
        let generation = &*self.generation;
        let chain = generation.chain(self.index);
        // Body handlers that take headers get these, while they are open.
        let mut open = match message {
            Message::Body(_) => self.open[held_index(direction)].take(),
            _ => None,
        };
        // A body the plugins will see is held against the host-wide budget until the answer;
        // without room, none of them sees it.
        let mut reserved = Vec::new();
        let over_budget = match &message {
            Message::Body(chunk) if !chunk.data.is_empty() => {
                let bytes = chunk.data.len() as u64;
                match generation.bodies.reserve(bytes) {
                    Some(reservation) => {
                        reserved.push(reservation);
                        None
                    }
                    None => Some(PluginError::BodyBudget {
                        bytes,
                        limit: generation.bodies.limit(),
                    }),
                }
            }
            _ => None,
        };
        let plugins = chain
            .plugins()
            .iter()
            .zip(chain.plugin_metrics())
            .zip(self.plugins.iter_mut())
            .enumerate()
            .skip(first);
        let mut stopped = None;
        // What shadow plugins run on, and what the plugins they run beside made of it.
        let mut shadowing = Vec::new();
        for (index, ((plugin, metrics), state)) in plugins {
            if !plugin.phases().contains(phase) || matches!(state.slot, Slot::Skipped) {
                continue;
            }
            let failed = |state: &mut PluginState, error: PluginError, took: Duration| {
                state.slot = Slot::Skipped;
                metrics.call(phase, error.kind(), took);
                if error.is_plugins_fault() {
                    let call = Call::Failed(client_of(context));
                    log_transition(plugin, plugin.breaker().record(Instant::now(), call));
                }
                on_failure(plugin, phase, &error)
            };
            if let Some(error) = &over_budget {
                // What the plugin held of this body must not be lost: it flows on, unchanged,
                // ahead of the message there was no room for.
                if let Message::Body(chunk) = &mut message {
                    let index = held_index(direction);
                    if let Some(mut held) = state.held[index].take() {
                        held.append(&mut chunk.data);
                        chunk.data = held;
                        reserved.extend(state.held_reserved[index].take());
                    }
                }
                match failed(state, error.clone(), Duration::ZERO) {
                    Some(response) => {
                        stopped = Some(Decision::Respond(response));
                        break;
                    }
                    None => continue,
                }
            }
            if let Message::Body(chunk) = &mut message {
                let holding = take_whole_body(
                    plugin,
                    state,
                    (direction, &mut reserved),
                    chunk,
                    body_mode,
                    arrival,
                );
                match holding {
                    Ok(Holding::PassOn) => {}
                    Ok(Holding::Held) => {
                        stopped = Some(Decision::Held);
                        break;
                    }
                    Err(error) => match failed(state, error, Duration::ZERO) {
                        Some(response) => {
                            stopped = Some(Decision::Respond(response));
                            break;
                        }
                        None => continue,
                    },
                }
            }
            let started = Instant::now();
            if let Admission::Quarantined(left) =
                plugin.breaker().admit(started, || client_of(context))
            {
                match failed(state, PluginError::Quarantined(left), Duration::ZERO) {
                    Some(response) => {
                        stopped = Some(Decision::Respond(response));
                        break;
                    }
                    None => continue,
                }
            }
            let mut call_started = started;
            // Disabled, and free, unless a trace layer wants it (the server's `[tracing]`).
            let span = tracing::trace_span!(
                target: TRACE_TARGET,
                CALL_SPAN,
                chain = plugin.chain(),
                plugin = plugin.name(),
                phase = phase.as_str(),
                outcome = tracing::field::Empty,
                instantiate_us = tracing::field::Empty,
            );
            if let Slot::Idle = state.slot
                && let Some(instance) = plugin.take_idle()
            {
                state.slot = Slot::Live(Box::new(instance));
            }
            if let Slot::Idle = state.slot {
                let instantiated = plugin
                    .instantiate(started, arrived)
                    .instrument(span.clone())
                    .await;
                call_started = Instant::now();
                span.record(
                    "instantiate_us",
                    (call_started - started).as_micros() as u64,
                );
                match instantiated {
                    Ok(instance) => {
                        metrics.instantiated(call_started - started);
                        state.slot = Slot::Live(Box::new(instance));
                    }
                    Err(error) => match failed(state, error, call_started - started) {
                        Some(response) => {
                            stopped = Some(Decision::Respond(response));
                            break;
                        }
                        None => continue,
                    },
                }
            }
            let Slot::Live(instance) = &mut state.slot else {
                continue;
            };
            // Only where a shadow runs beside this plugin: what it is given, copied.
            let mut given = chain.is_shadowed(index).then(|| Given {
                message: message.clone(),
                headers: open.as_ref().map(|open| open.headers.clone()),
            });
            let lent = open
                .as_mut()
                .filter(|_| plugin.contract().body_sees_headers())
                .map(|open| std::mem::take(&mut open.headers));
            let (back, headers, result) = instance
                .call(phase, message, lent, context, call_started)
                .instrument(span.clone())
                .await;
            message = back;
            if let (Some(open), Some(headers)) = (open.as_mut(), headers) {
                open.headers = headers;
            }
            let check = |outcome: Outcome| -> Result<_, String> {
                let checked = generation.guard.check(phase, &message, &outcome)?;
                let opened = match &open {
                    Some(open) => Some(
                        generation
                            .guard
                            .check_open_headers(direction.headers(), &open.headers)?,
                    ),
                    None => None,
                };
                Ok((outcome, checked, opened))
            };
            let checked =
                result.and_then(|outcome| check(outcome).map_err(PluginError::InvalidOutput));
            let ended = Instant::now();
            match checked {
                Ok((outcome, checked, opened)) => {
                    if let Some(given) = given.take() {
                        shadowing.push(Shadowing {
                            beside: index,
                            given,
                            served: Made {
                                message: message.clone(),
                                headers: open.as_ref().map(|open| open.headers.clone()),
                                outcome: outcome.clone(),
                            },
                        });
                    }
                    message.checkpoint();
                    if let Some(checked) = checked {
                        changes.absorb(checked);
                    }
                    if let (Some(open), Some(opened)) = (open.as_mut(), opened) {
                        open.headers.checkpoint();
                        open.changes.absorb(opened);
                    }
                    metrics.call(phase, "ok", ended - started);
                    span.record("outcome", "ok");
                    log_transition(plugin, plugin.breaker().record(ended, Call::Succeeded));
                    effects.absorb(outcome.effects);
                    if let Action::Respond(response) = outcome.action {
                        metrics.responded(response.status);
                        stopped = Some(Decision::Respond(response));
                        break;
                    }
                }
                Err(error) => {
                    span.record("outcome", error.kind());
                    // Its changes are dropped: the message goes on as the plugin got it.
                    message.rollback();
                    if let Some(open) = open.as_mut() {
                        open.headers.rollback();
                    }
                    if let Some(response) = failed(state, error, ended - started) {
                        stopped = Some(Decision::Respond(response));
                        break;
                    }
                }
            }
        }
        for shadowing in shadowing {
            run_shadows(
                chain,
                &mut self.shadows,
                generation,
                phase,
                shadowing,
                context,
                arrived,
            )
            .await;
        }
        let decision = match stopped {
            Some(Decision::Held) => {
                // The headers stay open until the body is let go.
                self.open[held_index(direction)] = open;
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

impl Drop for StreamChain {
    /// Instances still healthy at the end of the stream go back to their plugin, which keeps
    /// them if it is reused (`isolation = "reuse"`) and drops them otherwise.
    fn drop(&mut self) {
        self.release_finished(PhaseSet::EMPTY);
    }
}

/// What a plugin with shadows beside it was given: the message, and its direction's headers
/// where they were open to body handlers.
#[derive(Clone)]
struct Given {
    message: Message,
    headers: Option<HeaderMap>,
}

/// What a plugin made of what it was given.
struct Made {
    message: Message,
    headers: Option<HeaderMap>,
    outcome: Outcome,
}

impl Made {
    /// Whether `other` came out the same: the same headers (in any order) or body bytes, the
    /// same open headers, the same decision and effects.
    fn same_as(&self, other: &Made) -> bool {
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
struct Shadowing {
    /// The plugin's index in the chain.
    beside: usize,
    given: Given,
    served: Made,
}

/// Runs the shadows beside the plugin of `shadowing` on what it was given, each on its own
/// instance and budget, and compares what they make of it with what the plugin made. Nothing
/// they do reaches the exchange: their output is dropped, and a failure only takes the shadow
/// out of the stream and is counted.
async fn run_shadows(
    chain: &Chain,
    states: &mut [PluginState],
    generation: &Generation,
    phase: Phase,
    shadowing: Shadowing,
    context: &Arc<ExchangeContext>,
    arrived: Instant,
) {
    for (shadow, state) in chain.shadows().iter().zip(states.iter_mut()) {
        let plugin = &shadow.plugin;
        if shadow.beside != shadowing.beside
            || !plugin.phases().contains(phase)
            || matches!(state.slot, Slot::Skipped)
        {
            continue;
        }
        let started = Instant::now();
        let made = shadow_call(
            shadow,
            state,
            generation,
            phase,
            shadowing.given.clone(),
            context,
            arrived,
        )
        .await;
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
                state.slot = Slot::Skipped;
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

/// One call of a shadow plugin, as the chain calls any plugin: its breaker, an instance,
/// the call within its budget, the guard.
async fn shadow_call(
    shadow: &Shadow,
    state: &mut PluginState,
    generation: &Generation,
    phase: Phase,
    given: Given,
    context: &Arc<ExchangeContext>,
    arrived: Instant,
) -> Result<Made, PluginError> {
    let plugin = &shadow.plugin;
    let started = Instant::now();
    let result = async {
        if let Admission::Quarantined(left) = plugin.breaker().admit(started, || client_of(context))
        {
            return Err(PluginError::Quarantined(left));
        }
        if let Slot::Idle = state.slot
            && let Some(instance) = plugin.take_idle()
        {
            state.slot = Slot::Live(Box::new(instance));
        }
        if let Slot::Idle = state.slot {
            let instance = plugin.instantiate(started, arrived).await?;
            shadow.metrics.instantiated(started.elapsed());
            state.slot = Slot::Live(Box::new(instance));
        }
        let Slot::Live(instance) = &mut state.slot else {
            unreachable!("skipped shadows are not called, and a live one is never done early");
        };
        let lent = given
            .headers
            .filter(|_| plugin.contract().body_sees_headers());
        let (message, headers, outcome) = instance
            .call(phase, given.message, lent, context, Instant::now())
            .await;
        let outcome = outcome?;
        generation
            .guard
            .check(phase, &message, &outcome)
            .map_err(PluginError::InvalidOutput)?;
        Ok(Made {
            message,
            headers,
            outcome,
        })
    }
    .await;
    let ended = Instant::now();
    let kind = result.as_ref().err().map_or("ok", PluginError::kind);
    shadow.metrics.call(phase, kind, ended - started);
    match &result {
        Ok(_) => log_transition(plugin, plugin.breaker().record(ended, Call::Succeeded)),
        Err(error) if error.is_plugins_fault() => {
            let call = Call::Failed(client_of(context));
            log_transition(plugin, plugin.breaker().record(ended, call));
        }
        Err(_) => {}
    }
    result
}

/// Who sent the stream's request, as the breaker tells clients apart: Envoy's `source.address`.
fn client_of(context: &ExchangeContext) -> Option<Client> {
    Client::from_address(context.attributes.get(SOURCE_ADDRESS)?)
}

/// The attribute that tells the breaker clients apart.
pub const SOURCE_ADDRESS: &str = "source.address";

/// Logs a breaker transition: once per quarantine (or per run of failures that did not trip
/// it), not once per request.
fn log_transition(plugin: &Plugin, transition: Option<Transition>) {
    match transition {
        Some(Transition::Opened(backoff)) => tracing::warn!(
            chain = plugin.chain(),
            plugin = plugin.name(),
            backoff_ms = backoff.as_millis() as u64,
            "plugin keeps failing for several clients; quarantined: the clients it failed for \
             get its failure policy without a call until the back-off ends and a probe call \
             succeeds; other clients' requests are still called"
        ),
        Some(Transition::Recovered) => {
            tracing::info!(
                chain = plugin.chain(),
                plugin = plugin.name(),
                "quarantined plugin recovered"
            )
        }
        Some(Transition::TooFewClients {
            failures,
            clients: 0,
        }) => tracing::warn!(
            chain = plugin.chain(),
            plugin = plugin.name(),
            failures,
            "plugin failed {failures} calls in a row, but Envoy sends no {SOURCE_ADDRESS}, so \
             the breaker cannot tell clients apart and does not quarantine it (one client's \
             requests must not switch a plugin off for everyone): list {SOURCE_ADDRESS} in the \
             ext_proc filter's request_attributes ([module] request_attributes in Envoy's \
             process)"
        ),
        Some(Transition::TooFewClients { failures, clients }) => tracing::warn!(
            chain = plugin.chain(),
            plugin = plugin.name(),
            failures,
            clients,
            "plugin failed {failures} calls in a row, from {clients} client(s): fewer than \
             breaker_min_clients, so not quarantined (a client's own requests cannot switch a \
             plugin off for everyone)"
        ),
        None => {}
    }
}

/// Whether `plugin` sees `chunk` now. A plugin that wants whole bodies, where Envoy streams
/// them in `FULL_DUPLEX_STREAMED` mode, has chunks held for it until the body is complete (or
/// flushed by trailers); then `chunk` becomes everything held plus itself.
///
/// A held chunk keeps the share of the host's body budget its message had (the run's
/// `reserved`) while held; let go, the share goes back to the run, with the message it joined.
fn take_whole_body(
    plugin: &Plugin,
    state: &mut PluginState,
    (direction, reserved): (Direction, &mut Vec<Reservation>),
    chunk: &mut BodyChunk,
    body_mode: BodyMode,
    arrival: Arrival,
) -> Result<Holding, PluginError> {
    if plugin.registration().delivery(direction) != Delivery::Whole {
        return Ok(Holding::PassOn);
    }
    match body_mode {
        BodyMode::FullDuplexStreamed => {}
        // Envoy already sends everything it will send in one message.
        BodyMode::Buffered | BodyMode::BufferedPartial => return Ok(Holding::PassOn),
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
            return Ok(Holding::PassOn);
        }
    }
    let index = held_index(direction);
    let slot = &mut state.held[index];
    let held = slot.get_or_insert_with(Vec::new);
    if held.len() + chunk.data.len() > MAX_HELD_BODY_BYTES {
        // Whatever the policy, what was held must not be lost: it flows on unchanged.
        let mut whole = slot.take().unwrap_or_default();
        reserved.extend(state.held_reserved[index].take());
        whole.append(&mut chunk.data);
        chunk.data = whole;
        return Err(PluginError::BodyTooLarge(MAX_HELD_BODY_BYTES));
    }
    if !chunk.end_of_stream && arrival == Arrival::FromEnvoy {
        held.append(&mut chunk.data);
        // The whole message is held here: its share of the budget stays with it.
        let share = &mut state.held_reserved[index];
        for reservation in reserved.drain(..) {
            match share {
                Some(share) => share.absorb(reservation),
                None => *share = Some(reservation),
            }
        }
        return Ok(Holding::Held);
    }
    let mut whole = slot.take().unwrap_or_default();
    reserved.extend(state.held_reserved[index].take());
    whole.append(&mut chunk.data);
    chunk.data = whole;
    Ok(Holding::PassOn)
}

/// Logs a plugin failure and returns the answer its policy calls for, if any.
fn on_failure(plugin: &Plugin, phase: Phase, error: &PluginError) -> Option<ImmediateResponse> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn made(sets: &[(&str, &str)], action: Action) -> Made {
        let mut headers = HeaderMap::from_entries([("host".to_string(), b"a".to_vec())]);
        for (name, value) in sets {
            headers.set(name.to_string(), value.as_bytes().to_vec());
        }
        Made {
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
