//! One HTTP stream in Envoy's process: which hook runs which phase of the chain, and how the
//! chain's verdicts become changes to Envoy's headers and buffers.
//!
//! Bodies flow as they do over ext_proc in `FULL_DUPLEX_STREAMED` mode, the mode that lets
//! the chain hold chunks for plugins that want whole bodies: each chunk Envoy hands the filter
//! is taken out of Envoy's buffer, run through the chain, and put back as the chain passes it
//! on. A chunk held for a whole-body plugin stays with the chain (Envoy is told not to buffer
//! it) until the body ends or trailers arrive.
//!
//! `content-length`: when some plugin wants the whole body, the headers wait for it, so the
//! length can be set to what the body became. When plugins take chunks, the headers go on at
//! once without a length, since a chunk may change size after they left.
//!
//! Everything Envoy-facing goes through the [`Envoy`] trait: this module is tested with a fake.

use std::sync::Arc;

use wasm_extproc_core::http::{
    BodyChunk, BodyMode, Changes, Decision, Direction, Effects, ExchangeContext, HeaderChanges,
    HeaderMap, ImmediateResponse, Message, PerDirection, Phase, Verdict,
};
use wasm_extproc_core::metrics::{Metrics, StreamGuard};
use wasm_extproc_core::registry::{ChainChoice, Generation};
use wasm_extproc_core::stream::{Stream, Turn};

use crate::worker::block_on;

/// The attribute that names a stream's route, mapped to chains by `[chains.NAME] routes`.
const ROUTE_ATTRIBUTE: &str = "xds.route_name";

/// A header section of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Headers(Direction),
    Trailers(Direction),
}

/// Where appended body bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlace {
    /// The chunk of the current body hook.
    Received,
    /// Envoy's buffer for the direction: at trailers, the body still to go before them.
    Buffered,
}

/// What a headers hook tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersStatus {
    Continue,
    /// The headers wait: for the whole body, or for good after an immediate response.
    StopIteration,
}

/// What a body hook tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyStatus {
    Continue,
    /// Nothing goes on now, and Envoy buffers nothing: the chain has what it holds.
    StopIterationNoBuffer,
}

/// What a trailers hook tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailersStatus {
    Continue,
    StopIteration,
}

/// The calls the exchange makes on Envoy for one stream.
pub trait Envoy {
    /// Every field of `section`, in order, names lower-case.
    fn header_entries(&mut self, section: Section) -> Vec<(String, Vec<u8>)>;
    /// Replaces every value of `name` with `value`.
    fn set_header(&mut self, section: Section, name: &str, value: &[u8]);
    /// Adds one more value of `name`.
    fn add_header(&mut self, section: Section, name: &str, value: &[u8]);
    fn remove_header(&mut self, section: Section, name: &str);
    /// The body chunk of the current body hook.
    fn received_body(&mut self, direction: Direction) -> Vec<u8>;
    /// Empties the body chunk of the current body hook.
    fn drain_received_body(&mut self, direction: Direction);
    /// Adds `data` at the end of the body in `place`.
    fn append_body(&mut self, direction: Direction, place: BodyPlace, data: &[u8]);
    /// Answers the client with `response` instead of passing the stream on.
    fn send_response(&mut self, response: &ImmediateResponse);
    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str);
    fn clear_route_cache(&mut self);
    /// The attribute `name` as plugins see it: a string as it is, anything else as JSON.
    fn attribute(&mut self, name: &str) -> Option<String>;
    /// The entries of dynamic metadata `namespace`, each value as JSON.
    fn metadata(&mut self, namespace: &str) -> Vec<(String, String)>;
    /// The chain the stream's route names in its configuration of this filter, if it does.
    fn route_chain(&mut self) -> Option<String>;
}

/// What the exchange reads from Envoy for plugins (`[module]` in the configuration).
#[derive(Debug, Clone, Default)]
pub struct Reads {
    pub request_attributes: Vec<String>,
    pub response_attributes: Vec<String>,
    pub metadata_namespaces: Vec<String>,
}

/// One stream's state.
#[derive(Debug)]
pub struct Exchange {
    stream: Stream,
    reads: Arc<Reads>,
    metrics: Arc<Metrics>,
    context: Arc<ExchangeContext>,
    flows: PerDirection<Flow>,
    /// The route named a chain that does not exist, and `unknown_chain = "reject"`: the
    /// request's headers are answered 500.
    rejected: bool,
    _active: StreamGuard,
}

/// One direction of the stream.
#[derive(Debug, Default)]
struct Flow {
    /// The headers wait for the whole body; whether they had a `content-length` to correct.
    headers_held: Option<bool>,
}

impl Exchange {
    /// A new stream on `generation`, which serves it to the end whatever reloads happen. Its
    /// chain, as over ext_proc: the one the route's configuration of this filter names
    /// ([`RouteConfig`](crate::filter_config::RouteConfig)), else the one `[chains.NAME]
    /// routes` maps the route's name to, else the default chain. Called with the request's
    /// headers, once Envoy knows the route.
    pub fn start(
        generation: Arc<Generation>,
        reads: Arc<Reads>,
        metrics: Arc<Metrics>,
        envoy: &mut impl Envoy,
    ) -> Self {
        let (index, rejected) = match envoy.route_chain() {
            Some(name) => {
                match generation.choose_chain(&name, &metrics, "the route's per-route config") {
                    ChainChoice::Serve(index) => (index, false),
                    ChainChoice::Reject => (0, true),
                }
            }
            None if generation.maps_routes() => {
                let index = envoy
                    .attribute(ROUTE_ATTRIBUTE)
                    .and_then(|route| generation.chain_for_route(&route));
                (index.unwrap_or(0), false)
            }
            None => (0, false),
        };
        Exchange {
            // Bodies flow as over ext_proc in FULL_DUPLEX_STREAMED mode (see the module's doc).
            stream: Stream::new(generation, index, [BodyMode::FullDuplexStreamed; 2]),
            reads,
            _active: metrics.stream_opened(),
            metrics,
            context: Arc::default(),
            flows: Default::default(),
            rejected,
        }
    }

    /// The request's or the response's headers arrived.
    pub fn on_headers(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        end_of_stream: bool,
    ) -> HeadersStatus {
        if self.stream.over() {
            return HeadersStatus::StopIteration;
        }
        if std::mem::take(&mut self.rejected) {
            self.respond(
                envoy,
                &ImmediateResponse {
                    status: 500,
                    details: "wasm_extproc_unknown_chain".into(),
                    ..ImmediateResponse::default()
                },
            );
            return HeadersStatus::StopIteration;
        }
        self.read_context(envoy, direction);
        let phase = direction.headers();
        let section = Section::Headers(direction);
        let headers = if self.stream.runs(phase) {
            HeaderMap::from_entries(envoy.header_entries(section))
        } else {
            HeaderMap::default()
        };
        let message = Message::Headers {
            headers,
            end_of_stream,
        };
        // `None`: body handlers may still change the headers; their verdict comes with the
        // body's.
        if let Some(verdict) = self.run(phase, message).verdict
            && !self.apply_headers_verdict(envoy, phase, section, verdict)
        {
            return HeadersStatus::StopIteration;
        }
        if end_of_stream || !self.stream.runs(direction.body()) {
            return HeadersStatus::Continue;
        }
        if self.stream.wants_whole_body(direction) {
            let has_length = envoy
                .header_entries(section)
                .iter()
                .any(|(name, _)| name == "content-length");
            self.flows[direction].headers_held = Some(has_length);
            return HeadersStatus::StopIteration;
        }
        envoy.remove_header(section, "content-length");
        HeadersStatus::Continue
    }

    /// A chunk of the body arrived: it is Envoy's received buffer.
    pub fn on_body(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        end_of_stream: bool,
    ) -> BodyStatus {
        if self.stream.over() {
            return BodyStatus::StopIterationNoBuffer;
        }
        let phase = direction.body();
        let was_holding = self.stream.is_holding(direction);
        let runs = self.stream.runs(phase);
        let data = if runs {
            envoy.received_body(direction)
        } else {
            Vec::new()
        };
        let turn = self.run(phase, Message::Body(BodyChunk::new(data, end_of_stream)));
        if !runs {
            self.release_headers(envoy, direction, None);
            return BodyStatus::Continue;
        }
        self.apply_released(envoy, direction, turn.released);
        let Some(verdict) = turn.verdict else {
            return BodyStatus::Continue;
        };
        self.apply_effects(envoy, phase, verdict.effects);
        if let Some(changes) = verdict.headers {
            apply_header_changes(envoy, Section::Headers(direction), changes);
        }
        match verdict.decision {
            Decision::Held => {
                envoy.drain_received_body(direction);
                BodyStatus::StopIterationNoBuffer
            }
            Decision::Respond(response) => {
                self.respond(envoy, &response);
                BodyStatus::StopIterationNoBuffer
            }
            Decision::Continue(changes) => {
                if let Changes::Body(chunk) = changes
                    && (was_holding || chunk.replaced)
                {
                    envoy.drain_received_body(direction);
                    envoy.append_body(direction, BodyPlace::Received, &chunk.data);
                    let whole = end_of_stream.then_some(chunk.data.len());
                    self.release_headers(envoy, direction, whole);
                } else {
                    let whole = end_of_stream.then(|| envoy.received_body(direction).len());
                    self.release_headers(envoy, direction, whole);
                }
                BodyStatus::Continue
            }
        }
    }

    /// The trailers arrived: the body, if the chain holds some, goes on before them.
    pub fn on_trailers(&mut self, envoy: &mut impl Envoy, direction: Direction) -> TrailersStatus {
        if self.stream.over() {
            return TrailersStatus::StopIteration;
        }
        let phase = direction.trailers();
        let section = Section::Trailers(direction);
        let trailers = if self.stream.runs(phase) {
            HeaderMap::from_entries(envoy.header_entries(section))
        } else {
            HeaderMap::default()
        };
        let turn = self.run(phase, Message::Trailers(trailers));
        self.apply_released(envoy, direction, turn.released);
        if let Some(verdict) = turn.flushed {
            self.apply_effects(envoy, direction.body(), verdict.effects);
            if let Some(changes) = verdict.headers {
                apply_header_changes(envoy, Section::Headers(direction), changes);
            }
            match verdict.decision {
                Decision::Respond(response) => {
                    self.respond(envoy, &response);
                    return TrailersStatus::StopIteration;
                }
                Decision::Continue(Changes::Body(chunk)) => {
                    envoy.append_body(direction, BodyPlace::Buffered, &chunk.data);
                }
                Decision::Continue(Changes::Headers(_)) | Decision::Held => {}
            }
        }
        // Trailers need chunked framing over HTTP/1.1: a `content-length` would have Envoy
        // drop them.
        self.release_headers(envoy, direction, None);
        if let Some(verdict) = turn.verdict
            && !self.apply_headers_verdict(envoy, phase, section, verdict)
        {
            return TrailersStatus::StopIteration;
        }
        TrailersStatus::Continue
    }

    /// Hands a message to the stream; counted when it reaches the plugins.
    fn run(&mut self, phase: Phase, message: Message) -> Turn {
        if self.stream.runs(phase) {
            self.metrics.message_received(phase);
        }
        if !self.stream.needs_plugins(phase) {
            // Nothing to wait on: no trip through the worker's runtime.
            return self.stream.pass(phase, message);
        }
        block_on(self.stream.handle(phase, message, &self.context))
    }

    /// Applies the verdict on `direction`'s headers that waited for the body.
    fn apply_released(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        released: Option<Verdict>,
    ) {
        if let Some(verdict) = released {
            let phase = direction.headers();
            self.apply_headers_verdict(envoy, phase, Section::Headers(direction), verdict);
        }
    }

    /// Applies the verdict on a header or trailer section; false if the stream was answered.
    fn apply_headers_verdict(
        &mut self,
        envoy: &mut impl Envoy,
        phase: Phase,
        section: Section,
        verdict: Verdict,
    ) -> bool {
        self.apply_effects(envoy, phase, verdict.effects);
        match verdict.decision {
            Decision::Continue(Changes::Headers(changes)) => {
                apply_header_changes(envoy, section, changes);
                true
            }
            Decision::Respond(response) => {
                self.respond(envoy, &response);
                false
            }
            Decision::Continue(Changes::Body(_)) | Decision::Held => true,
        }
    }

    fn apply_effects(&self, envoy: &mut impl Envoy, phase: Phase, effects: Effects) {
        for (namespace, key, value) in &effects.metadata {
            envoy.set_metadata(namespace, key, value);
        }
        // As over ext_proc: Envoy picks the route once, before the request goes upstream.
        if effects.clear_route_cache && phase == Phase::RequestHeaders {
            envoy.clear_route_cache();
        }
    }

    fn respond(&mut self, envoy: &mut impl Envoy, response: &ImmediateResponse) {
        self.stream.answered();
        envoy.send_response(response);
    }

    /// The first time anything of `direction` goes on after its headers were held: corrects
    /// their `content-length` to `whole`, the length of the entire body when this is all of
    /// it, or removes it when more may follow.
    fn release_headers(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        whole: Option<usize>,
    ) {
        let Some(had_length) = self.flows[direction].headers_held.take() else {
            return;
        };
        if !had_length {
            return;
        }
        let section = Section::Headers(direction);
        match whole {
            Some(length) => {
                envoy.set_header(section, "content-length", length.to_string().as_bytes())
            }
            None => envoy.remove_header(section, "content-length"),
        }
    }

    /// Reads the attributes and metadata `[module]` names, once per direction, before the
    /// direction's first phase.
    fn read_context(&mut self, envoy: &mut impl Envoy, direction: Direction) {
        let reads = self.reads.clone();
        let (attributes, namespaces): (&[String], &[String]) = match direction {
            Direction::Request => (&reads.request_attributes, &reads.metadata_namespaces),
            Direction::Response => (&reads.response_attributes, &[]),
        };
        if attributes.is_empty() && namespaces.is_empty() {
            return;
        }
        let context = Arc::make_mut(&mut self.context);
        for name in attributes {
            if let Some(value) = envoy.attribute(name) {
                context.attributes.insert(name.clone(), value);
            }
        }
        for namespace in namespaces {
            for (key, value) in envoy.metadata(namespace) {
                context.metadata.insert((namespace.clone(), key), value);
            }
        }
    }
}

/// Sets and removes what the chain changed, leaving the rest of the section alone.
fn apply_header_changes(envoy: &mut impl Envoy, section: Section, changes: HeaderChanges) {
    for name in &changes.removed {
        envoy.remove_header(section, name);
    }
    for (name, values) in &changes.set {
        let mut values = values.iter();
        match values.next() {
            Some(first) => envoy.set_header(section, name, first),
            None => envoy.remove_header(section, name),
        }
        for value in values {
            envoy.add_header(section, name, value);
        }
    }
}
