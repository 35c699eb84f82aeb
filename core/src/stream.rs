//! One stream's rules, the same behind both front ends: which phases the plugins still want,
//! the answer to headers that waits while body handlers may still change them, giving back
//! the instances no phase still needs, and when nothing the plugins want can still come.
//!
//! A front end hands each message from Envoy to [`Stream::handle`], once, and translates the
//! [`Turn`] it gets back into its own I/O: ext_proc answers, or changes to Envoy's buffers.
//! What the plugins want is computed once per message, after the chain ran, and kept: the
//! front end reads it ([`Stream::runs`]) before the next message to skip reading what no
//! plugin needs.

use std::sync::Arc;

use crate::chain::StreamChain;
use crate::http::{
    BodyMode, Changes, Decision, Direction, ExchangeContext, Message, PerDirection, Phase,
    PhaseSet, Verdict,
};
use crate::registry::{Chain, Generation};

/// One stream's chain and what its rules keep between messages.
#[derive(Debug)]
pub struct Stream {
    chain: StreamChain,
    /// How Envoy sends each direction's body (request, response).
    body_modes: PerDirection<BodyMode>,
    ahead: Ahead,
    /// The phases the plugins still want: those live plugins handle, and the headers of a
    /// direction whose body handlers get them. Computed once per message, after the chain.
    wanted: PhaseSet,
    /// Per direction (request, response): the verdict on headers that stay open to body
    /// handlers where Envoy streams the body (`FULL_DUPLEX_STREAMED`), kept back until the
    /// body goes on. Envoy holds the headers until it comes.
    held_headers: PerDirection<Option<Verdict>>,
}

/// What one message from Envoy leads to, in the order the front end passes it on.
#[derive(Debug)]
pub struct Turn {
    /// The verdict on headers that waited for their body, with what body handlers changed in
    /// them: it goes before `flushed` and `verdict`. (The ext_proc server drops it when the
    /// verdict that let it go answers the client.)
    pub released: Option<Verdict>,
    /// Trailers came while plugins held body chunks: the verdict on the whole body they held,
    /// before the trailers' own.
    pub flushed: Option<Verdict>,
    /// The verdict on the message; `None` while it is headers that wait for their body, or
    /// when `flushed` answered the client (the trailers then never reach the plugins).
    pub verdict: Option<Verdict>,
    /// What the plugins still want, now.
    pub wanted: PhaseSet,
    /// Nothing the plugins want can still come, and no direction Envoy hands over
    /// (`FULL_DUPLEX_STREAMED`) is still going: the stream may end.
    pub over: bool,
}

impl Stream {
    /// A stream on `generation`'s chain at `index` (0: the default chain), where Envoy sends
    /// bodies in `body_modes` (request, response).
    pub fn new(generation: Arc<Generation>, index: usize, body_modes: [BodyMode; 2]) -> Self {
        let mut stream = Stream {
            chain: StreamChain::new(generation, index),
            body_modes: PerDirection(body_modes),
            ahead: Ahead::default(),
            wanted: PhaseSet::EMPTY,
            held_headers: Default::default(),
        };
        stream.wanted = stream.compute_wanted();
        stream
    }

    /// The generation this stream runs on, start to end.
    pub fn generation(&self) -> &Arc<Generation> {
        self.chain.generation()
    }

    /// The chain this stream runs.
    pub fn chain(&self) -> &Chain {
        self.chain.chain()
    }

    /// Envoy said how it sends bodies (request, response).
    pub fn set_body_modes(&mut self, body_modes: [BodyMode; 2]) {
        self.body_modes = PerDirection(body_modes);
        self.wanted = self.compute_wanted();
    }

    /// What the plugins still want.
    pub fn wanted(&self) -> PhaseSet {
        self.wanted
    }

    /// The phases that may still arrive.
    pub fn to_come(&self) -> PhaseSet {
        self.ahead.to_come
    }

    /// Whether a message of `phase` goes through the plugins: they want it, or it is body
    /// that plugins hold chunks of, or that ends the time its headers are open to them. A
    /// message that does not gets a verdict that passes it on as it came.
    pub fn runs(&self, phase: Phase) -> bool {
        let direction = phase.direction();
        self.wanted.contains(phase)
            || (phase == direction.body()
                && (self.chain.is_holding(direction) || self.chain.headers_open(direction)))
    }

    /// Whether some plugin holds body chunks of `direction`.
    pub fn is_holding(&self, direction: Direction) -> bool {
        self.chain.is_holding(direction)
    }

    /// Whether a plugin still live in this stream wants `direction`'s body whole.
    pub fn wants_whole_body(&self, direction: Direction) -> bool {
        self.chain.wants_whole_body(direction)
    }

    /// Whether a message of `phase` needs the plugins ([`handle`](Self::handle)): they want
    /// it, or it lets go of body chunks they hold. Else [`pass`](Self::pass) does the same,
    /// without a plugin call to wait on.
    pub fn needs_plugins(&self, phase: Phase) -> bool {
        let direction = phase.direction();
        self.runs(phase) || (phase == direction.trailers() && self.chain.is_holding(direction))
    }

    /// [`handle`](Self::handle) for a message no plugin needs ([`needs_plugins`](Self::needs_plugins)
    /// is false): it goes on as it came, and the stream's rules move on.
    pub fn pass(&mut self, phase: Phase, message: Message) -> Turn {
        debug_assert!(!self.needs_plugins(phase));
        self.ahead.passed(phase, ends(&message));
        let verdict = passed_on(message);
        self.after_plugins(phase, None, None, verdict)
    }

    /// Runs one message from Envoy through the chain. Trailers first let go of the body
    /// plugins hold; the verdict on headers open to body handlers waits for the body.
    pub async fn handle(
        &mut self,
        phase: Phase,
        message: Message,
        context: &Arc<ExchangeContext>,
    ) -> Turn {
        let direction = phase.direction();
        let body_mode = self.body_modes[direction];
        self.ahead.passed(phase, ends(&message));
        let mut released = None;
        let mut flushed = None;
        if phase == direction.trailers() && self.chain.is_holding(direction) {
            let mut verdict = self.chain.flush(direction, body_mode, context).await;
            released = self.release_headers(direction, &mut verdict);
            // A plugin that failed on the flushed body may have wanted the trailers.
            self.wanted = self.compute_wanted();
            let answered = matches!(verdict.decision, Decision::Respond(_));
            flushed = Some(verdict);
            if answered {
                return self.turn(released, flushed, None);
            }
        }
        let verdict = if self.runs(phase) {
            self.chain.run(phase, message, body_mode, context).await
        } else {
            passed_on(message)
        };
        self.after_plugins(phase, released, flushed, verdict)
    }

    /// Ends a message once the plugins had it: the verdict on open headers waits for their
    /// body, or the body lets it go.
    fn after_plugins(
        &mut self,
        phase: Phase,
        mut released: Option<Verdict>,
        flushed: Option<Verdict>,
        mut verdict: Verdict,
    ) -> Turn {
        let direction = phase.direction();
        let body_mode = self.body_modes[direction];
        if phase == direction.headers()
            && body_mode == BodyMode::FullDuplexStreamed
            && self.chain.headers_open(direction)
            && matches!(verdict.decision, Decision::Continue(_))
        {
            self.held_headers[direction] = Some(verdict);
            return self.turn(released, flushed, None);
        }
        if phase == direction.body() {
            released = released.or_else(|| self.release_headers(direction, &mut verdict));
        } else if phase == direction.trailers() {
            // No body came to let them go: they go before the trailers.
            released = released.or_else(|| self.held_headers[direction].take());
        }
        self.turn(released, flushed, Some(verdict))
    }

    /// An immediate response went out: nothing more comes, and no instance is needed.
    pub fn answered(&mut self) {
        self.ahead.answered();
        self.chain.release_finished(PhaseSet::EMPTY);
    }

    /// Whether the stream is over for the plugins: answered, or nothing they want can come.
    pub fn over(&self) -> bool {
        self.ahead.over(self.wanted, self.body_modes)
    }

    /// Lets go of the verdict on `direction`'s headers once `body`'s verdict is not held: it
    /// carries what the body handlers changed in them.
    fn release_headers(&mut self, direction: Direction, body: &mut Verdict) -> Option<Verdict> {
        let held = &mut self.held_headers[direction];
        if held.is_none() || body.decision == Decision::Held {
            return None;
        }
        let mut headers = held.take()?;
        if let (Decision::Continue(Changes::Headers(changes)), Some(later)) =
            (&mut headers.decision, body.headers.take())
        {
            changes.absorb(later);
        }
        Some(headers)
    }

    /// Ends a message: instances no phase still to come needs go back, and what the plugins
    /// want is computed for the answers and the next message.
    fn turn(
        &mut self,
        released: Option<Verdict>,
        flushed: Option<Verdict>,
        verdict: Option<Verdict>,
    ) -> Turn {
        self.chain.release_finished(self.ahead.to_come);
        self.wanted = self.compute_wanted();
        Turn {
            released,
            flushed,
            verdict,
            wanted: self.wanted,
            over: self.over(),
        }
    }

    fn compute_wanted(&self) -> PhaseSet {
        let mut wanted = self.chain.live_phases();
        for direction in Direction::BOTH {
            if self
                .chain
                .opens_headers(direction, self.body_modes[direction])
            {
                wanted = wanted.with(direction.headers());
            }
        }
        wanted
    }
}

/// Whether `message` is its direction's last.
fn ends(message: &Message) -> bool {
    match message {
        Message::Headers { end_of_stream, .. } => *end_of_stream,
        Message::Body(chunk) => chunk.end_of_stream,
        Message::Trailers(_) => true,
    }
}

/// The verdict on a message no plugin needed: it goes on as it came.
fn passed_on(message: Message) -> Verdict {
    let changes = match message {
        Message::Body(chunk) => Changes::Body(chunk),
        Message::Headers { .. } | Message::Trailers(_) => Changes::Headers(Default::default()),
    };
    Verdict {
        decision: Decision::Continue(changes),
        effects: Default::default(),
        headers: None,
    }
}

/// Which phases may still arrive. Each direction's come in order -- headers, body messages,
/// trailers -- any of them skipped, and none after the direction ended (`end_of_stream`, or
/// trailers) or the stream was answered.
#[derive(Debug, Clone, Copy)]
struct Ahead {
    to_come: PhaseSet,
}

impl Default for Ahead {
    fn default() -> Self {
        let to_come = Direction::BOTH
            .into_iter()
            .flat_map(|d| [d.headers(), d.body(), d.trailers()])
            .collect();
        Ahead { to_come }
    }
}

impl Ahead {
    /// A message of `phase` arrived; `ends` when it was its direction's last.
    fn passed(&mut self, phase: Phase, ends: bool) {
        let direction = phase.direction();
        let gone = |p: Phase| {
            p.direction() == direction
                && (ends || phase == direction.trailers() || p == direction.headers())
        };
        self.to_come = self.to_come.iter().filter(|&p| !gone(p)).collect();
    }

    fn answered(&mut self) {
        self.to_come = PhaseSet::EMPTY;
    }

    /// Whether no phase in `wanted` can still come, and no direction Envoy streams in
    /// `FULL_DUPLEX_STREAMED` mode is still going: it sends each chunk without waiting for the
    /// headers' answer and lets only what comes back go on, so every one must be answered.
    fn over(&self, wanted: PhaseSet, body_modes: PerDirection<BodyMode>) -> bool {
        let handed_over = Direction::BOTH
            .into_iter()
            .filter(|&d| body_modes[d] == BodyMode::FullDuplexStreamed)
            .fold(PhaseSet::EMPTY, |set, d| {
                set.with(d.headers()).with(d.body()).with(d.trailers())
            });
        !self.to_come.intersects(wanted.union(handed_over))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    const ASM: [Phase; 2] = [RequestHeaders, ResponseHeaders];
    const NONE: PerDirection<BodyMode> = PerDirection([BodyMode::None, BodyMode::None]);

    #[test]
    fn phases_to_come_shrink_as_the_exchange_moves_on() {
        let live: PhaseSet = ASM.into_iter().collect();
        let mut ahead = Ahead::default();
        assert!(!ahead.over(live, NONE));
        ahead.passed(RequestHeaders, false);
        assert!(ahead.to_come.contains(RequestBody));
        assert!(!ahead.to_come.contains(RequestHeaders));
        assert!(!ahead.over(live, NONE));
        ahead.passed(ResponseHeaders, false);
        assert!(ahead.to_come.contains(ResponseBody));
        assert!(
            ahead.over(live, NONE),
            "nothing the ASM plugin handles can come"
        );
    }

    #[test]
    fn a_request_without_body_ends_with_its_headers() {
        let mut ahead = Ahead::default();
        ahead.passed(RequestHeaders, true);
        let live: PhaseSet = [RequestBody, RequestTrailers].into_iter().collect();
        assert!(ahead.over(live, NONE));
    }

    #[test]
    fn body_messages_repeat_until_the_direction_ends() {
        let mut ahead = Ahead::default();
        ahead.passed(RequestBody, false);
        assert!(ahead.to_come.contains(RequestBody));
        assert!(ahead.to_come.contains(RequestTrailers));
        ahead.passed(RequestTrailers, true);
        assert!(!ahead.to_come.contains(RequestBody));
        assert!(ahead.to_come.contains(ResponseHeaders));
        ahead.answered();
        assert!(ahead.to_come.is_empty());
    }

    #[test]
    fn a_full_duplex_direction_keeps_the_stream_open_until_it_ends() {
        // The ASM plugin handles no body, but Envoy hands the response body over: each chunk
        // must come back, so the stream may not end before the response does.
        let live: PhaseSet = ASM.into_iter().collect();
        let modes = PerDirection([BodyMode::None, BodyMode::FullDuplexStreamed]);
        let mut ahead = Ahead::default();
        ahead.passed(RequestHeaders, true);
        ahead.passed(ResponseHeaders, false);
        assert!(!ahead.over(live, modes));
        ahead.passed(ResponseBody, false);
        assert!(!ahead.over(live, modes));
        ahead.passed(ResponseBody, true);
        assert!(ahead.over(live, modes));

        // The same exchange in STREAMED mode: Envoy keeps its copies, so the stream may end
        // once the response headers are answered.
        let modes = PerDirection([BodyMode::None, BodyMode::Streamed]);
        let mut ahead = Ahead::default();
        ahead.passed(RequestHeaders, true);
        ahead.passed(ResponseHeaders, false);
        assert!(ahead.over(live, modes));
    }

    #[test]
    fn trailers_end_a_full_duplex_direction() {
        let live: PhaseSet = ASM.into_iter().collect();
        let modes = PerDirection([BodyMode::FullDuplexStreamed, BodyMode::None]);
        let mut ahead = Ahead::default();
        ahead.passed(RequestHeaders, false);
        ahead.passed(RequestBody, false);
        ahead.passed(ResponseHeaders, false);
        assert!(!ahead.over(live, modes), "the request body is still going");
        ahead.passed(RequestTrailers, true);
        assert!(ahead.over(live, modes));
    }
}
