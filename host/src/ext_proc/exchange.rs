//! One ext_proc stream -- one HTTP exchange -- as a step per message a newcomer can follow:
//! [`Exchange::accept`] checks a message from Envoy against the protocol (and says what must
//! go out before the plugins run), [`Exchange::process`] runs the plugins and returns the
//! answers to send and whether the stream goes on. It owns everything the stream needs (the
//! protocol state, the plugin instances, what Envoy said about the exchange) and does no I/O,
//! so the gRPC service and the fuzz target drive it the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};

use super::convert::{self, Envelope};
use super::protocol::{EnvoyModes, Inbound, ProtocolError, StreamProtocol};
use crate::config::EnvoySettings;
use crate::http::ImmediateResponse;
use crate::http::{
    BodyMode, Decision, Delivery, Direction, ExchangeContext, Phase, PhaseSet, Verdict,
};
use crate::metrics::Metrics;
use crate::registry::{Chain, ChainChoice, Generation};
use crate::stream::{Stream, Turn};

/// The gRPC initial metadata that names a stream's chain: Envoy sets it per route with
/// `ExtProcPerRoute.overrides.grpc_initial_metadata`.
pub const CHAIN_METADATA: &str = "x-wasm-extproc-chain";
/// The attribute that names a stream's route, mapped to chains by `[chains.NAME] routes`.
pub const ROUTE_ATTRIBUTE: &str = "xds.route_name";

/// Plugins that handle a direction's body behind an Envoy that sends none of it (body mode
/// `NONE`, as in the guide's filter) never see one, silently: counted per stream, and said
/// once per chain with the setting to change.
fn notice_bodies_not_sent(chain: &Chain, modes: &EnvoyModes, metrics: &Metrics) {
    for direction in Direction::BOTH {
        // Most chains handle no body: one look at the chain's phases, no walk over its plugins.
        if modes.body(direction) != BodyMode::None || !chain.phases().contains(direction.body()) {
            continue;
        }
        let plugins: Vec<_> = chain.handling(direction.body()).collect();
        if plugins.is_empty() {
            continue;
        }
        metrics.body_not_sent(direction);
        if !chain.first_notice_of_no_body(direction) {
            continue;
        }
        let noun = direction.noun();
        let whole = plugins
            .iter()
            .any(|p| p.registration().delivery(direction) == Delivery::Whole);
        let delivery = if whole {
            Delivery::Whole
        } else {
            Delivery::Chunks
        };
        let names: Vec<&str> = plugins.iter().map(|p| p.name()).collect();
        tracing::warn!(
            chain = chain.name(),
            direction = noun,
            plugins = ?names,
            "plugins {} handle {noun} bodies, but Envoy's ext_proc filter sends none \
             ({noun}_body_mode: NONE), so they never run on them; set its \
             processing_mode.{noun}_body_mode to {} (with allow_mode_override: true the \
             host still switches it off for streams that need no body)",
            names.join(", "),
            delivery.envoy_body_modes()
        );
    }
}

/// One stream's state, from its first message to its last.
#[derive(Debug)]
pub struct Exchange {
    protocol: StreamProtocol,
    stream: Stream,
    /// Attributes and forwarded metadata Envoy sent so far: plugins read them.
    context: Arc<ExchangeContext>,
    metrics: Arc<Metrics>,
    /// Whether the stream's first message may still pick its chain by route name.
    route_may_choose: bool,
    /// Envoy asked for a chain that does not exist, and `unknown_chain = "reject"`: the first
    /// message gets an error answer.
    rejected: bool,
}

/// A message the protocol accepted, for [`Exchange::process`].
#[derive(Debug)]
pub struct Accepted {
    inbound: Inbound,
    /// An answer that must reach Envoy before the plugins run: more time, when their budgets
    /// for the phase add up to more than Envoy's `message_timeout`.
    pub more_time: Option<ProcessingResponse>,
    /// When the host read it.
    received: Instant,
}

/// What one message leads to.
#[derive(Debug, Default)]
pub struct Step {
    /// The answers to send, in order (none in observability mode, or while a body is held).
    pub answers: Vec<ProcessingResponse>,
    /// Whether the stream ends once they are sent.
    pub then: Then,
}

/// What the stream does after a step's answers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Wait for Envoy's next message.
    #[default]
    Continue,
    /// End the stream (with OK): Envoy carries on without the host.
    Close,
}

impl Exchange {
    /// A new stream on `generation`, which serves it to the end whatever reloads happen, on
    /// the chain called `requested` (the stream's [`CHAIN_METADATA`]) if Envoy named one;
    /// else on the chain its route maps to, or the default chain.
    pub fn new(
        generation: Arc<Generation>,
        metrics: Arc<Metrics>,
        requested: Option<&str>,
    ) -> Exchange {
        let choice = requested.map(|name| generation.choose_chain(name, &metrics, CHAIN_METADATA));
        let (index, rejected) = match choice {
            None => (0, false),
            Some(ChainChoice::Serve(index)) => (index, false),
            Some(ChainChoice::Reject) => (0, true),
        };
        Exchange {
            protocol: StreamProtocol::new(),
            route_may_choose: requested.is_none() && generation.maps_routes(),
            rejected,
            stream: Stream::new(generation, index, [BodyMode::None; 2]),
            context: Arc::default(),
            metrics,
        }
    }

    /// The name of the chain serving the stream (so far: a route name may still pick another
    /// at the first message).
    pub fn chain_name(&self) -> &str {
        self.stream.chain().name()
    }

    /// The stream's protocol state.
    pub fn protocol(&self) -> &StreamProtocol {
        &self.protocol
    }

    /// The stream's rules over its chain.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Checks one message from Envoy against the protocol and records what it says. An error
    /// breaks the protocol: the stream ends with it.
    pub fn accept(&mut self, request: ProcessingRequest) -> Result<Accepted, ProtocolError> {
        let received = Instant::now();
        let mut inbound = convert::inbound(request)?;
        self.protocol.observe(&inbound)?;
        if std::mem::take(&mut self.route_may_choose)
            && let Some(route) = inbound.attributes.get(ROUTE_ATTRIBUTE)
            && let Some(index) = self.stream.generation().chain_for_route(route)
        {
            let body_modes = Direction::BOTH.map(|d| self.protocol.body_mode(d));
            self.stream = Stream::new(self.stream.generation().clone(), index, body_modes);
        }
        let phase = inbound.phase;
        self.metrics.message_received(phase);
        tracing::trace!(
            %phase,
            attributes = ?inbound.attributes,
            metadata = ?inbound.metadata,
            envoy_modes = ?inbound.envoy_modes,
            "ext_proc message"
        );
        if let Some(modes) = &inbound.envoy_modes {
            notice_bodies_not_sent(self.stream.chain(), modes, &self.metrics);
            let body_modes = Direction::BOTH.map(|d| self.protocol.body_mode(d));
            self.stream.set_body_modes(body_modes);
        }
        if !inbound.attributes.is_empty() || !inbound.metadata.is_empty() {
            let context = Arc::make_mut(&mut self.context);
            context.attributes.append(&mut inbound.attributes);
            context.metadata.append(&mut inbound.metadata);
        }
        let more_time = if inbound.observability {
            None
        } else {
            extra_time(&self.stream.generation().envoy, self.stream.chain(), phase)
                .map(convert::more_time)
        };
        Ok(Accepted {
            inbound,
            more_time,
            received,
        })
    }

    /// Runs an accepted message through the plugins: the answers to send, and whether the
    /// stream goes on.
    pub async fn process(&mut self, accepted: Accepted) -> Step {
        let (phase, received) = (accepted.inbound.phase, accepted.received);
        let step = self.answers(accepted.inbound).await;
        self.metrics.message_handled(phase, received.elapsed());
        step
    }

    /// What the plugins make of a message: its answers, and whether the stream goes on.
    async fn answers(&mut self, inbound: Inbound) -> Step {
        let Inbound {
            phase,
            message,
            observability,
            ..
        } = inbound;
        let direction = phase.direction();
        let mut step = Step::default();
        if std::mem::take(&mut self.rejected) {
            if !observability {
                let verdict = Verdict {
                    decision: Decision::Respond(ImmediateResponse {
                        status: 500,
                        details: "wasm_extproc_unknown_chain".into(),
                        ..ImmediateResponse::default()
                    }),
                    effects: Default::default(),
                    headers: None,
                };
                self.answer(phase, verdict, self.stream.wanted(), &mut step);
            }
            step.then = Then::Close;
            return step;
        }

        let Turn {
            released,
            flushed,
            verdict,
            wanted,
            over,
        } = self.stream.handle(phase, message, &self.context).await;
        // The answer to headers that waited for their body goes just before the body's, unless
        // that one answers the client: Envoy takes nothing after an immediate response.
        let releasing = flushed.as_ref().or(verdict.as_ref());
        if let Some(headers) = released
            && !observability
            && releasing.is_none_or(|v| matches!(v.decision, Decision::Continue(_)))
        {
            self.answer(direction.headers(), headers, wanted, &mut step);
        }
        // What plugins held of a streamed body goes out before the trailers' answer.
        if let Some(flushed) = flushed {
            self.answer(direction.body(), flushed, wanted, &mut step);
            if step.then == Then::Close {
                return step;
            }
        }
        if observability {
            // Envoy neither waits for nor reads an answer in observability mode.
            return step;
        }
        if let Some(verdict) = verdict {
            self.answer(phase, verdict, wanted, &mut step);
        }
        if step.then == Then::Continue && over {
            tracing::trace!("nothing left for the plugins; closing the stream");
            step.then = Then::Close;
        }
        step
    }

    /// Adds the answers to a message of `phase` to `step`, given what the plugins still
    /// `wanted`; an immediate response ends the exchange.
    fn answer(&mut self, phase: Phase, verdict: Verdict, wanted: PhaseSet, step: &mut Step) {
        let direction = phase.direction();
        if matches!(verdict.decision, Decision::Respond(_)) {
            self.protocol.answered();
            self.stream.answered();
            step.then = Then::Close;
        }
        let envelope = Envelope {
            body_mode: self.protocol.body_mode(direction),
            content_length: self.protocol.content_length(direction),
            mode_override: self.protocol.mode_override_to_send(phase, wanted),
        };
        step.answers
            .extend(convert::replies(phase, verdict, &envelope));
    }
}

/// How long to ask Envoy to wait for `phase` on `chain`, when its plugins' budgets add up to
/// more than Envoy's `message_timeout` (start-up checked that `max_message_timeout` covers
/// them).
fn extra_time(envoy: &EnvoySettings, chain: &Chain, phase: Phase) -> Option<Duration> {
    let budget = chain.budget(phase);
    let max = envoy.max_message_timeout?;
    (budget >= envoy.message_timeout).then(|| (budget + envoy.message_timeout).min(max))
}
