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
//! **Waiting without holding the worker.** A chain whose plugins may wait inside a call
//! (outbound HTTP, the state store in Redis, WASI:
//! [`Chain::may_wait`](wasm_extproc_core::registry::Chain::may_wait)) runs each message as
//! a future polled on the worker. When it is pending -- a plugin waits on the network, its
//! call still on its budget -- the hook tells Envoy to stop, and the stream's other events
//! wait behind it in order: body chunks are taken out of Envoy's buffer and kept, headers and
//! trailers stay where Envoy has them. The I/O and timers the plugin waits on run on the
//! module's own thread ([`background`]), whose wake-up reaches the worker through Envoy's
//! scheduler ([`Alarm`]); the worker polls again there, applies the verdict, works through
//! what waited, puts the bodies back in Envoy's buffer and lets Envoy continue. A chain whose
//! plugins never wait runs each message to its end inside the hook, as before.
//!
//! Everything Envoy-facing goes through the [`Envoy`] trait.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use wasm_extproc_core::http::{
    BodyChunk, BodyMode, Changes, Decision, Direction, Effects, ExchangeContext, HeaderChanges,
    HeaderMap, ImmediateResponse, Message, PerDirection, Phase, Verdict,
};
use wasm_extproc_core::metrics::{Metrics, StreamGuard};
use wasm_extproc_core::registry::{ChainChoice, Generation};
use wasm_extproc_core::stream::{Stream, Turn};

use crate::filter_config::background;
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
    /// What wakes this stream on its worker when a message in flight can move on.
    fn alarm(&mut self) -> Alarm;
    /// Lets `direction` go on past this filter, once the hook that asked returned: what a
    /// hook stopped for a message in flight.
    fn continue_after(&mut self, direction: Direction);
    /// Runs `poll`, a poll of the message in flight, with this stream as the one whose
    /// plugins' requests to the origins in `clusters` go out through Envoy's clusters.
    fn polling<R>(&mut self, clusters: &Arc<Clusters>, poll: impl FnOnce() -> R) -> R;
}

/// Wakes a stream whose message is in flight: its waker has Envoy call the stream's
/// `scheduled` hook on its worker. Dropped with the exchange, on the worker, it closes:
/// wakes after that reach nothing.
pub struct Alarm {
    waker: Waker,
    close: Option<Box<dyn FnOnce()>>,
}

impl Alarm {
    pub fn new(waker: Waker, close: impl FnOnce() + 'static) -> Alarm {
        Alarm {
            waker,
            close: Some(Box::new(close)),
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Some(close) = self.close.take() {
            close();
        }
    }
}

impl std::fmt::Debug for Alarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alarm").finish_non_exhaustive()
    }
}

/// What the exchange reads from Envoy for plugins, and where their requests go
/// (`[module]` in the configuration).
#[derive(Debug, Clone, Default)]
pub struct Reads {
    pub request_attributes: Vec<String>,
    pub response_attributes: Vec<String>,
    pub metadata_namespaces: Vec<String>,
    /// Allowed origins whose requests go through an Envoy cluster, and that cluster.
    pub http_clusters: Arc<Clusters>,
}

/// Origins (`http://host:port`) to the Envoy cluster that reaches each.
pub type Clusters = HashMap<String, String>;

/// One stream's state.
#[derive(Debug)]
pub struct Exchange {
    /// `None` while a message is in flight: its future has the stream.
    stream: Option<Stream>,
    in_flight: Option<InFlight>,
    /// Events that came while a message was in flight, in order.
    deferred: VecDeque<Event>,
    /// Per direction: a hook stopped for a message in flight, and Envoy waits to be told to
    /// go on.
    owed: PerDirection<bool>,
    alarm: Option<Alarm>,
    reads: Arc<Reads>,
    metrics: Arc<Metrics>,
    context: Arc<ExchangeContext>,
    flows: PerDirection<Flow>,
    /// The route named a chain that does not exist, and `unknown_chain = "reject"`: the
    /// request's headers are answered 500.
    rejected: bool,
    _active: StreamGuard,
}

/// A message whose verdict is not back yet, and what its hook does with it when it is.
struct InFlight {
    future: Pin<Box<dyn Future<Output = (Stream, Turn)>>>,
    event: Event,
    body: BodyState,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

/// A hook's event: what a message came with, and what applying its verdict needs.
#[derive(Debug)]
enum Event {
    Headers {
        direction: Direction,
        end_of_stream: bool,
    },
    Body {
        direction: Direction,
        end_of_stream: bool,
        chunk: Chunk,
    },
    Trailers {
        direction: Direction,
    },
}

impl Event {
    fn direction(&self) -> Direction {
        match self {
            Event::Headers { direction, .. }
            | Event::Body { direction, .. }
            | Event::Trailers { direction } => *direction,
        }
    }
}

/// Where a body chunk is.
#[derive(Debug)]
enum Chunk {
    /// Envoy's buffer of the running body hook.
    Received,
    /// Taken out of Envoy's buffer while the stream waited; what goes on is added to Envoy's
    /// buffered body.
    Taken(Vec<u8>),
}

/// What a body chunk's verdict needs besides the chunk: whether plugins held chunks of the
/// body before it, and whether the chain ran it (else it passes as it came).
#[derive(Debug, Clone, Copy, Default)]
struct BodyState {
    was_holding: bool,
    runs: bool,
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
            stream: Some(Stream::new(
                generation,
                index,
                [BodyMode::FullDuplexStreamed; 2],
            )),
            in_flight: None,
            deferred: VecDeque::new(),
            owed: PerDirection::default(),
            alarm: None,
            reads,
            _active: metrics.stream_opened(),
            metrics,
            context: Arc::default(),
            flows: Default::default(),
            rejected,
        }
    }

    /// The stream's rules over its chain; not while a message is in flight.
    fn stream(&mut self) -> &mut Stream {
        self.stream
            .as_mut()
            .expect("the stream is only lent while a message is in flight")
    }

    /// Whether an event must wait: a message is in flight, or others already wait.
    fn busy(&self) -> bool {
        self.in_flight.is_some() || !self.deferred.is_empty()
    }

    /// The request's or the response's headers arrived.
    pub fn on_headers(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        end_of_stream: bool,
    ) -> HeadersStatus {
        if self.busy() {
            self.defer(Event::Headers {
                direction,
                end_of_stream,
            });
            return HeadersStatus::StopIteration;
        }
        self.headers(envoy, direction, end_of_stream)
            .unwrap_or_else(|| self.stopped(direction, HeadersStatus::StopIteration))
    }

    /// A chunk of the body arrived: it is Envoy's received buffer.
    pub fn on_body(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        end_of_stream: bool,
    ) -> BodyStatus {
        if self.busy() {
            let data = envoy.received_body(direction);
            envoy.drain_received_body(direction);
            self.defer(Event::Body {
                direction,
                end_of_stream,
                chunk: Chunk::Taken(data),
            });
            return BodyStatus::StopIterationNoBuffer;
        }
        self.body(envoy, direction, end_of_stream, Chunk::Received)
            .unwrap_or_else(|| self.stopped(direction, BodyStatus::StopIterationNoBuffer))
    }

    /// The trailers arrived: the body, if the chain holds some, goes on before them.
    pub fn on_trailers(&mut self, envoy: &mut impl Envoy, direction: Direction) -> TrailersStatus {
        if self.busy() {
            self.defer(Event::Trailers { direction });
            return TrailersStatus::StopIteration;
        }
        self.trailers(envoy, direction)
            .unwrap_or_else(|| self.stopped(direction, TrailersStatus::StopIteration))
    }

    /// Envoy's scheduler called back: the message in flight may have its verdict. Applies it,
    /// then what waited behind it, until one is in flight again; lets each direction with
    /// nothing left waiting go on, if its last event did.
    pub fn resume(&mut self, envoy: &mut impl Envoy) {
        let Some((event, body, turn)) = self.poll(envoy) else {
            return;
        };
        let mut went_on = PerDirection::<Option<bool>>::default();
        let direction = event.direction();
        let goes_on = self.finish(envoy, event, body, turn);
        went_on[direction] = Some(goes_on);
        while self.in_flight.is_none()
            && let Some(event) = self.deferred.pop_front()
        {
            let direction = event.direction();
            went_on[direction] = self.run_deferred(envoy, event);
        }
        for direction in Direction::BOTH {
            let waiting = self.deferred.iter().any(|e| e.direction() == direction)
                || self
                    .in_flight
                    .as_ref()
                    .is_some_and(|f| f.event.direction() == direction);
            if waiting || !self.owed[direction] {
                continue;
            }
            self.owed[direction] = false;
            if went_on[direction] == Some(true) {
                envoy.continue_after(direction);
            }
        }
    }

    fn defer(&mut self, event: Event) {
        self.owed[event.direction()] = true;
        self.deferred.push_back(event);
    }

    /// A hook returns `status` while its message is in flight: Envoy is owed a go-on.
    fn stopped<T>(&mut self, direction: Direction, status: T) -> T {
        self.owed[direction] = true;
        status
    }

    /// A deferred event, now; `None` when it is in flight. Whether its direction goes on.
    fn run_deferred(&mut self, envoy: &mut impl Envoy, event: Event) -> Option<bool> {
        match event {
            Event::Headers {
                direction,
                end_of_stream,
            } => self
                .headers(envoy, direction, end_of_stream)
                .map(|s| s == HeadersStatus::Continue),
            Event::Body {
                direction,
                end_of_stream,
                chunk,
            } => self
                .body(envoy, direction, end_of_stream, chunk)
                .map(|s| s == BodyStatus::Continue),
            Event::Trailers { direction } => self
                .trailers(envoy, direction)
                .map(|s| s == TrailersStatus::Continue),
        }
    }

    /// Applies the verdict of the message that was in flight: whether its direction goes on.
    fn finish(
        &mut self,
        envoy: &mut impl Envoy,
        event: Event,
        body: BodyState,
        turn: Turn,
    ) -> bool {
        match event {
            Event::Headers {
                direction,
                end_of_stream,
            } => {
                self.headers_verdict(envoy, direction, end_of_stream, turn)
                    == HeadersStatus::Continue
            }
            Event::Body {
                direction,
                end_of_stream,
                chunk,
            } => {
                self.body_verdict(envoy, direction, end_of_stream, body, chunk, turn)
                    == BodyStatus::Continue
            }
            Event::Trailers { direction } => {
                self.trailers_verdict(envoy, direction, turn) == TrailersStatus::Continue
            }
        }
    }

    /// Headers through the chain; `None` while they are in flight.
    fn headers(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        end_of_stream: bool,
    ) -> Option<HeadersStatus> {
        if self.stream().over() {
            return Some(HeadersStatus::StopIteration);
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
            return Some(HeadersStatus::StopIteration);
        }
        self.read_context(envoy, direction);
        let phase = direction.headers();
        let section = Section::Headers(direction);
        let headers = if self.stream().runs(phase) {
            HeaderMap::from_entries(envoy.header_entries(section))
        } else {
            HeaderMap::default()
        };
        let message = Message::Headers {
            headers,
            end_of_stream,
        };
        let event = Event::Headers {
            direction,
            end_of_stream,
        };
        let (_, turn) = self.run(envoy, phase, message, event, BodyState::default())?;
        Some(self.headers_verdict(envoy, direction, end_of_stream, turn))
    }

    fn headers_verdict(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        end_of_stream: bool,
        turn: Turn,
    ) -> HeadersStatus {
        let phase = direction.headers();
        let section = Section::Headers(direction);
        // `None`: body handlers may still change the headers; their verdict comes with the
        // body's.
        if let Some(verdict) = turn.verdict
            && !self.apply_headers_verdict(envoy, phase, section, verdict)
        {
            return HeadersStatus::StopIteration;
        }
        if end_of_stream || !self.stream().runs(direction.body()) {
            return HeadersStatus::Continue;
        }
        if self.stream().wants_whole_body(direction) {
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

    /// A body chunk through the chain; `None` while it is in flight.
    fn body(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        end_of_stream: bool,
        chunk: Chunk,
    ) -> Option<BodyStatus> {
        if self.stream().over() {
            return Some(BodyStatus::StopIterationNoBuffer);
        }
        let phase = direction.body();
        let body = BodyState {
            was_holding: self.stream().is_holding(direction),
            runs: self.stream().runs(phase),
        };
        let data = match (&chunk, body.runs) {
            (_, false) => Vec::new(),
            (Chunk::Received, true) => envoy.received_body(direction),
            (Chunk::Taken(data), true) => data.clone(),
        };
        let message = Message::Body(BodyChunk::new(data, end_of_stream));
        let event = Event::Body {
            direction,
            end_of_stream,
            chunk,
        };
        let (event, turn) = self.run(envoy, phase, message, event, body)?;
        let Event::Body { chunk, .. } = event else {
            unreachable!("a message comes back with what it came with")
        };
        Some(self.body_verdict(envoy, direction, end_of_stream, body, chunk, turn))
    }

    /// Applies a body chunk's verdict.
    fn body_verdict(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        end_of_stream: bool,
        BodyState { was_holding, runs }: BodyState,
        chunk: Chunk,
        turn: Turn,
    ) -> BodyStatus {
        let phase = direction.body();
        if !runs {
            self.release_headers(envoy, direction, None);
            put_back(envoy, direction, chunk);
            return BodyStatus::Continue;
        }
        self.apply_released(envoy, direction, turn.released);
        let Some(verdict) = turn.verdict else {
            put_back(envoy, direction, chunk);
            return BodyStatus::Continue;
        };
        self.apply_effects(envoy, phase, verdict.effects);
        if let Some(changes) = verdict.headers {
            apply_header_changes(envoy, Section::Headers(direction), changes);
        }
        match verdict.decision {
            Decision::Held => {
                if let Chunk::Received = chunk {
                    envoy.drain_received_body(direction);
                }
                BodyStatus::StopIterationNoBuffer
            }
            Decision::Respond(response) => {
                self.respond(envoy, &response);
                BodyStatus::StopIterationNoBuffer
            }
            Decision::Continue(changes) => {
                let replaced = match changes {
                    Changes::Body(out) if was_holding || out.replaced => Some(out.data),
                    _ => None,
                };
                match (chunk, replaced) {
                    (Chunk::Received, Some(data)) => {
                        envoy.drain_received_body(direction);
                        envoy.append_body(direction, BodyPlace::Received, &data);
                        let whole = end_of_stream.then_some(data.len());
                        self.release_headers(envoy, direction, whole);
                    }
                    (Chunk::Received, None) => {
                        let whole = end_of_stream.then(|| envoy.received_body(direction).len());
                        self.release_headers(envoy, direction, whole);
                    }
                    (Chunk::Taken(data), replaced) => {
                        let data = replaced.unwrap_or(data);
                        envoy.append_body(direction, BodyPlace::Buffered, &data);
                        let whole = end_of_stream.then_some(data.len());
                        self.release_headers(envoy, direction, whole);
                    }
                }
                BodyStatus::Continue
            }
        }
    }

    /// Trailers through the chain; `None` while they are in flight.
    fn trailers(&mut self, envoy: &mut impl Envoy, direction: Direction) -> Option<TrailersStatus> {
        if self.stream().over() {
            return Some(TrailersStatus::StopIteration);
        }
        let phase = direction.trailers();
        let trailers = if self.stream().runs(phase) {
            HeaderMap::from_entries(envoy.header_entries(Section::Trailers(direction)))
        } else {
            HeaderMap::default()
        };
        let event = Event::Trailers { direction };
        let message = Message::Trailers(trailers);
        let (_, turn) = self.run(envoy, phase, message, event, BodyState::default())?;
        Some(self.trailers_verdict(envoy, direction, turn))
    }

    fn trailers_verdict(
        &mut self,
        envoy: &mut impl Envoy,
        direction: Direction,
        turn: Turn,
    ) -> TrailersStatus {
        let phase = direction.trailers();
        let section = Section::Trailers(direction);
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

    /// Hands a message to the stream; counted when it reaches the plugins. `None` while it
    /// is in flight: [`resume`](Self::resume) applies its verdict.
    fn run(
        &mut self,
        envoy: &mut impl Envoy,
        phase: Phase,
        message: Message,
        event: Event,
        body: BodyState,
    ) -> Option<(Event, Turn)> {
        if self.stream().runs(phase) {
            self.metrics.message_received(phase);
        }
        let stream = self.stream.as_mut().expect("no message in flight");
        if !stream.needs_plugins(phase) {
            // Nothing to wait on: no trip through the worker's runtime.
            return Some((event, stream.pass(phase, message)));
        }
        if !stream.chain().may_wait() {
            // Nothing but a full pool to wait on, briefly: run to the end here.
            return Some((
                event,
                block_on(stream.handle(phase, message, &self.context)),
            ));
        }
        let mut stream = self.stream.take().expect("no message in flight");
        let context = self.context.clone();
        let future = Box::pin(async move {
            let turn = stream.handle(phase, message, &context).await;
            (stream, turn)
        });
        self.in_flight = Some(InFlight {
            future,
            event,
            body,
        });
        if self.alarm.is_none() {
            self.alarm = Some(envoy.alarm());
        }
        if let Some((event, _, turn)) = self.poll(envoy) {
            return Some((event, turn));
        }
        // In flight: a chunk still in Envoy's buffer leaves it, so that what arrives next
        // waits behind it, and goes back in when its verdict comes.
        if let Some(InFlight {
            event: Event::Body {
                direction, chunk, ..
            },
            ..
        }) = &mut self.in_flight
            && matches!(chunk, Chunk::Received)
        {
            *chunk = Chunk::Taken(envoy.received_body(*direction));
            envoy.drain_received_body(*direction);
        }
        None
    }

    /// Polls the message in flight, on the worker, with the I/O and timers it waits on
    /// driven by the module's own thread.
    fn poll(&mut self, envoy: &mut impl Envoy) -> Option<(Event, BodyState, Turn)> {
        let in_flight = self.in_flight.as_mut()?;
        let alarm = self.alarm.as_ref()?;
        let mut cx = Context::from_waker(&alarm.waker);
        let polled = envoy.polling(&self.reads.http_clusters, || {
            let _background = background().enter();
            in_flight.future.as_mut().poll(&mut cx)
        });
        let Poll::Ready((stream, turn)) = polled else {
            return None;
        };
        self.stream = Some(stream);
        let in_flight = self.in_flight.take()?;
        Some((in_flight.event, in_flight.body, turn))
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
        self.stream().answered();
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

/// A chunk taken out of Envoy's buffer goes back in as it came (one in Envoy's buffer stays).
fn put_back(envoy: &mut impl Envoy, direction: Direction, chunk: Chunk) {
    if let Chunk::Taken(data) = chunk {
        envoy.append_body(direction, BodyPlace::Buffered, &data);
    }
}
