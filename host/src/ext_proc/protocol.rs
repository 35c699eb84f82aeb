//! The ext_proc protocol of one stream, as a pure state machine: which messages may arrive
//! when, what Envoy said about its body modes, and which phases can still come -- so the host
//! can tell Envoy to skip what no plugin needs. Whether the stream may close once nothing is
//! left is the plugins' stream's to say ([`Turn::over`](crate::stream::Turn::over)), by the
//! rule below.
//!
//! Envoy sends each direction's phases in order -- headers, body messages, trailers -- and may
//! skip any of them (per its processing mode). The two directions interleave freely: a
//! response can start while the request body is still streaming. What is never valid is going
//! backwards within a direction, repeating headers or trailers, or sending anything after the
//! host answered the stream with an immediate response.
//!
//! When the host may close the stream early. A server that closes its side of the stream tells
//! Envoy to carry on without it. In `STREAMED`, `BUFFERED` and `BUFFERED_PARTIAL` modes Envoy
//! keeps a copy of every body chunk until its answer comes, and lets the copies go on when the
//! stream closes: nothing is lost. In `FULL_DUPLEX_STREAMED` mode it does not: it sends each
//! chunk as it arrives, without waiting for the headers' answer, drains it from its own
//! buffers, and lets only what the server sends back go on. Closing while such a chunk is in
//! flight loses it. So a direction Envoy streams that way keeps the stream open, with every
//! chunk answered, until it ends -- whether or not any plugin handles it -- and `mode_override`
//! never switches it off: Envoy ignores overrides when its filter is configured with that mode,
//! and a per-route one would strand the chunks already sent.

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};

use std::collections::BTreeMap;

use crate::http::{BodyMode, Direction, Message, PerDirection, Phase, PhaseSet};

/// One message from Envoy in the host's terms (`convert::inbound` reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub phase: Phase,
    pub message: Message,
    /// Envoy does not wait for (or read) an answer to this message.
    pub observability: bool,
    /// Attributes sent with this message, rendered as text.
    pub attributes: BTreeMap<String, String>,
    /// Forwarded metadata, keyed by (namespace, key), values as JSON.
    pub metadata: BTreeMap<(String, String), String>,
    /// How Envoy is configured to send bodies, when it says (on a stream's first message).
    pub envoy_modes: Option<EnvoyModes>,
}

/// A message that breaks the ext_proc protocol. The stream ends with `INVALID_ARGUMENT` or
/// `FAILED_PRECONDITION` naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("ProcessingRequest has no request set (empty or unknown oneof)")]
    EmptyRequest,
    #[error("{phase} arrived after {after} in the same direction")]
    OutOfOrder { phase: Phase, after: Phase },
    #[error("{phase} arrived after the stream was answered with an immediate response")]
    AfterImmediateResponse { phase: Phase },
    #[error("{phase} arrived after Envoy said the {} had ended", .phase.direction().noun())]
    AfterEndOfStream { phase: Phase },
}

/// What Envoy says of its processing mode on a stream's first message (`protocol_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvoyModes {
    pub request_body: BodyMode,
    pub response_body: BodyMode,
    /// `send_body_without_waiting_for_header_response`: Envoy ignores `mode_override` then.
    pub body_without_waiting: bool,
}

impl EnvoyModes {
    /// How Envoy sends `direction`'s body.
    pub fn body(&self, direction: Direction) -> BodyMode {
        match direction {
            Direction::Request => self.request_body,
            Direction::Response => self.response_body,
        }
    }
}

/// How far one direction (request or response) has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
enum Progress {
    #[default]
    Nothing,
    Headers,
    Body,
    Trailers,
}

impl Progress {
    /// The phase of `direction` it has reached, if any.
    fn phase_in(self, direction: Direction) -> Option<Phase> {
        match self {
            Progress::Nothing => None,
            Progress::Headers => Some(direction.headers()),
            Progress::Body => Some(direction.body()),
            Progress::Trailers => Some(direction.trailers()),
        }
    }
}

/// The protocol state of one ext_proc stream.
#[derive(Debug, Clone, Default)]
pub struct StreamProtocol {
    /// How far each direction has got.
    progress: PerDirection<Progress>,
    /// Per direction: whether Envoy said the direction ended.
    ended: PerDirection<bool>,
    /// Per direction: the `content-length` its headers carried.
    content_length: PerDirection<Option<u64>>,
    /// Envoy's processing mode, from the first message that said.
    envoy_modes: Option<EnvoyModes>,
    /// The phase of the last message accepted.
    last: Option<Phase>,
    /// The processing mode last sent to Envoy (`mode_override`), if any.
    overridden: Option<ProcessingMode>,
    answered: bool,
}

impl StreamProtocol {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that `phase` may arrive now and records it. Nothing may follow in a direction
    /// once Envoy said it ended (`end_of_stream`, or trailers).
    fn accept(&mut self, phase: Phase) -> Result<(), ProtocolError> {
        if self.answered {
            return Err(ProtocolError::AfterImmediateResponse { phase });
        }
        let direction = phase.direction();
        if self.ended[direction] {
            return Err(ProtocolError::AfterEndOfStream { phase });
        }
        let next = match phase {
            Phase::RequestHeaders | Phase::ResponseHeaders => Progress::Headers,
            Phase::RequestBody | Phase::ResponseBody => Progress::Body,
            Phase::RequestTrailers | Phase::ResponseTrailers => Progress::Trailers,
        };
        let progress = &mut self.progress[direction];
        // Body messages repeat; headers and trailers come at most once, and nothing goes back.
        let allowed = match next {
            Progress::Body => *progress <= Progress::Body,
            _ => *progress < next,
        };
        if !allowed {
            let after = progress.phase_in(direction).expect("progress past nothing");
            return Err(ProtocolError::OutOfOrder { phase, after });
        }
        *progress = next;
        self.last = Some(phase);
        Ok(())
    }

    /// The phase of the last message accepted.
    pub fn last_phase(&self) -> Option<Phase> {
        self.last
    }

    /// Checks an inbound message and records what it says about the stream.
    pub fn observe(&mut self, inbound: &Inbound) -> Result<(), ProtocolError> {
        self.accept(inbound.phase)?;
        if self.envoy_modes.is_none() {
            self.envoy_modes = inbound.envoy_modes;
        }
        let direction = inbound.phase.direction();
        match &inbound.message {
            Message::Headers {
                headers,
                end_of_stream,
            } => {
                self.content_length[direction] = headers
                    .get("content-length")
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.trim().parse().ok());
                self.ended[direction] |= *end_of_stream;
            }
            Message::Body(chunk) => self.ended[direction] |= chunk.end_of_stream,
            Message::Trailers(_) => self.ended[direction] = true,
        }
        Ok(())
    }

    /// Records that the host answered with an immediate response: Envoy ends the exchange.
    pub fn answered(&mut self) {
        self.answered = true;
    }

    /// How Envoy sends bodies in `direction`; `None` until Envoy says.
    pub fn body_mode(&self, direction: Direction) -> BodyMode {
        self.envoy_modes
            .map_or(BodyMode::None, |modes| modes.body(direction))
    }

    /// The `content-length` of `direction`'s headers, if they had one.
    pub fn content_length(&self, direction: Direction) -> Option<u64> {
        self.content_length[direction]
    }

    /// The phases that may still arrive on this stream.
    pub fn to_come(&self) -> PhaseSet {
        if self.answered {
            return PhaseSet::EMPTY;
        }
        let mut set = PhaseSet::EMPTY;
        for direction in Direction::BOTH {
            let progress = self.progress[direction];
            if self.ended[direction] {
                continue;
            }
            if progress < Progress::Headers {
                set = set.with(direction.headers());
            }
            if progress <= Progress::Body {
                set = set.with(direction.body()).with(direction.trailers());
            }
        }
        set
    }

    /// The phases of the directions Envoy streams in `FULL_DUPLEX_STREAMED` mode: the host
    /// answers each of their messages, plugins or not (see the module's documentation).
    fn handed_over(&self) -> PhaseSet {
        [Direction::Request, Direction::Response]
            .into_iter()
            .filter(|&d| self.body_mode(d) == BodyMode::FullDuplexStreamed)
            .fold(PhaseSet::EMPTY, |set, d| {
                set.with(d.headers()).with(d.body()).with(d.trailers())
            })
    }

    /// The `mode_override` for the answer to `phase`, once: `None` as well when the same
    /// override already went out with an earlier answer (Envoy applies one to both
    /// directions, and keeps it).
    pub fn mode_override_to_send(
        &mut self,
        phase: Phase,
        live: PhaseSet,
    ) -> Option<ProcessingMode> {
        let mode = self.mode_override(phase, live)?;
        if self.overridden == Some(mode) {
            return None;
        }
        self.overridden = Some(mode);
        Some(mode)
    }

    /// The processing mode to send with the answer to `phase` (a headers phase) so Envoy skips
    /// what no `live` plugin needs. `None` when nothing would be skipped, when Envoy has not
    /// said which body modes it uses (the host cannot then restate them), or when it ignores
    /// overrides anyway. A direction Envoy hands over keeps its mode.
    fn mode_override(&self, phase: Phase, live: PhaseSet) -> Option<ProcessingMode> {
        if !matches!(phase, Phase::RequestHeaders | Phase::ResponseHeaders) {
            return None;
        }
        let modes = self.envoy_modes?;
        if modes.body_without_waiting {
            return None;
        }
        let (request_body, response_body) = (modes.request_body, modes.response_body);
        let wanted_set = live.union(self.handed_over());
        let wanted = |p: Phase| wanted_set.contains(p);
        let skips_something = (!wanted(Phase::RequestBody) && request_body != BodyMode::None)
            || (!wanted(Phase::ResponseBody) && response_body != BodyMode::None)
            || !wanted(Phase::RequestTrailers)
            || !wanted(Phase::ResponseHeaders)
            || !wanted(Phase::ResponseTrailers);
        if !skips_something {
            return None;
        }
        let headers = |p: Phase| {
            if wanted(p) {
                HeaderSendMode::Send
            } else {
                HeaderSendMode::Skip
            }
        };
        let body = |p: Phase, configured: BodyMode| {
            if wanted(p) {
                send_mode(configured)
            } else {
                BodySendMode::None
            }
        };
        // FULL_DUPLEX_STREAMED only works with trailers sent: they tell the host the body ended.
        let trailers = |t: Phase, b: Phase, configured: BodyMode| {
            if wanted(t) || (wanted(b) && configured == BodyMode::FullDuplexStreamed) {
                HeaderSendMode::Send
            } else {
                HeaderSendMode::Skip
            }
        };
        Some(ProcessingMode {
            request_header_mode: HeaderSendMode::Send as i32,
            request_body_mode: body(Phase::RequestBody, request_body) as i32,
            request_trailer_mode: trailers(Phase::RequestTrailers, Phase::RequestBody, request_body)
                as i32,
            response_header_mode: headers(Phase::ResponseHeaders) as i32,
            response_body_mode: body(Phase::ResponseBody, response_body) as i32,
            response_trailer_mode: trailers(
                Phase::ResponseTrailers,
                Phase::ResponseBody,
                response_body,
            ) as i32,
        })
    }
}

/// Envoy's name for a body mode.
pub(crate) fn send_mode(mode: BodyMode) -> BodySendMode {
    match mode {
        BodyMode::None => BodySendMode::None,
        BodyMode::Streamed => BodySendMode::Streamed,
        BodyMode::Buffered => BodySendMode::Buffered,
        BodyMode::BufferedPartial => BodySendMode::BufferedPartial,
        BodyMode::FullDuplexStreamed => BodySendMode::FullDuplexStreamed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    fn run(phases: &[Phase]) -> Result<(), ProtocolError> {
        let mut protocol = StreamProtocol::new();
        phases.iter().try_for_each(|p| protocol.accept(*p))
    }

    #[test]
    fn full_exchange_in_order() {
        run(&[
            RequestHeaders,
            RequestBody,
            RequestBody,
            RequestTrailers,
            ResponseHeaders,
            ResponseBody,
            ResponseTrailers,
        ])
        .unwrap();
    }

    #[test]
    fn any_phase_may_be_skipped() {
        run(&[RequestBody, ResponseTrailers]).unwrap();
        run(&[ResponseHeaders]).unwrap();
        run(&[RequestTrailers, ResponseBody]).unwrap();
    }

    #[test]
    fn directions_interleave() {
        run(&[
            RequestHeaders,
            RequestBody,
            ResponseHeaders,
            RequestBody,
            ResponseBody,
        ])
        .unwrap();
    }

    #[test]
    fn repeated_headers_are_rejected() {
        assert_eq!(
            run(&[RequestHeaders, RequestHeaders]),
            Err(ProtocolError::OutOfOrder {
                phase: RequestHeaders,
                after: RequestHeaders
            })
        );
    }

    #[test]
    fn going_backwards_is_rejected() {
        assert_eq!(
            run(&[ResponseHeaders, ResponseBody, ResponseHeaders]),
            Err(ProtocolError::OutOfOrder {
                phase: ResponseHeaders,
                after: ResponseBody
            })
        );
        assert_eq!(
            run(&[RequestTrailers, RequestBody]),
            Err(ProtocolError::OutOfOrder {
                phase: RequestBody,
                after: RequestTrailers
            })
        );
    }

    #[test]
    fn nothing_after_an_immediate_response() {
        let mut protocol = StreamProtocol::new();
        protocol.accept(RequestHeaders).unwrap();
        protocol.answered();
        assert_eq!(
            protocol.accept(ResponseHeaders),
            Err(ProtocolError::AfterImmediateResponse {
                phase: ResponseHeaders
            })
        );
    }

    fn inbound(phase: Phase, message: Message, modes: Option<(BodyMode, BodyMode)>) -> Inbound {
        Inbound {
            phase,
            message,
            observability: false,
            attributes: Default::default(),
            metadata: Default::default(),
            envoy_modes: modes.map(|(request_body, response_body)| EnvoyModes {
                request_body,
                response_body,
                body_without_waiting: false,
            }),
        }
    }

    fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> Message {
        Message::Headers {
            headers: crate::http::HeaderMap::from_entries(
                pairs
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
            ),
            end_of_stream,
        }
    }

    const ASM: [Phase; 2] = [RequestHeaders, ResponseHeaders];

    #[test]
    fn phases_to_come_shrink_as_the_exchange_moves_on() {
        let mut protocol = StreamProtocol::new();
        protocol
            .observe(&inbound(
                RequestHeaders,
                headers(&[("content-length", "12")], false),
                None,
            ))
            .unwrap();
        assert_eq!(protocol.content_length(Direction::Request), Some(12));
        assert!(protocol.to_come().contains(RequestBody));
        assert!(!protocol.to_come().contains(RequestHeaders));
        protocol
            .observe(&inbound(ResponseHeaders, headers(&[], false), None))
            .unwrap();
        assert!(protocol.to_come().contains(ResponseBody));
        assert!(!protocol.to_come().contains(ResponseHeaders));
    }

    #[test]
    fn mode_override_skips_what_no_plugin_needs_and_keeps_the_rest() {
        let modes = Some((BodyMode::Buffered, BodyMode::Streamed));
        let mut protocol = StreamProtocol::new();
        protocol
            .observe(&inbound(RequestHeaders, headers(&[], false), modes))
            .unwrap();

        let asm: PhaseSet = ASM.into_iter().collect();
        let mode = protocol.mode_override(RequestHeaders, asm).unwrap();
        assert_eq!(mode.request_body_mode, BodySendMode::None as i32);
        assert_eq!(mode.response_body_mode, BodySendMode::None as i32);
        assert_eq!(mode.response_header_mode, HeaderSendMode::Send as i32);
        assert_eq!(mode.request_trailer_mode, HeaderSendMode::Skip as i32);

        let bodies: PhaseSet = [RequestBody, ResponseBody].into_iter().collect();
        let mode = protocol.mode_override(RequestHeaders, bodies).unwrap();
        assert_eq!(mode.request_body_mode, BodySendMode::Buffered as i32);
        assert_eq!(mode.response_body_mode, BodySendMode::Streamed as i32);
        assert_eq!(mode.response_header_mode, HeaderSendMode::Skip as i32);

        assert_eq!(protocol.mode_override(RequestBody, asm), None);
    }

    #[test]
    fn an_override_goes_out_once_unless_what_is_needed_changes() {
        let modes = Some((BodyMode::Buffered, BodyMode::Buffered));
        let mut protocol = StreamProtocol::new();
        protocol
            .observe(&inbound(RequestHeaders, headers(&[], false), modes))
            .unwrap();
        let asm: PhaseSet = ASM.into_iter().collect();
        assert!(
            protocol
                .mode_override_to_send(RequestHeaders, asm)
                .is_some()
        );
        protocol
            .observe(&inbound(ResponseHeaders, headers(&[], false), None))
            .unwrap();
        assert_eq!(protocol.mode_override_to_send(ResponseHeaders, asm), None);
        // A plugin handling response bodies failed earlier: what is needed changed.
        let fewer: PhaseSet = [RequestHeaders].into_iter().collect();
        let mode = protocol
            .mode_override_to_send(ResponseHeaders, fewer)
            .unwrap();
        assert_eq!(mode.response_header_mode, HeaderSendMode::Skip as i32);
    }

    #[test]
    fn full_duplex_keeps_trailers_on() {
        let modes = Some((BodyMode::FullDuplexStreamed, BodyMode::None));
        let mut protocol = StreamProtocol::new();
        protocol
            .observe(&inbound(RequestHeaders, headers(&[], false), modes))
            .unwrap();
        let live: PhaseSet = [RequestHeaders, RequestBody].into_iter().collect();
        let mode = protocol.mode_override(RequestHeaders, live).unwrap();
        assert_eq!(
            mode.request_body_mode,
            BodySendMode::FullDuplexStreamed as i32
        );
        assert_eq!(mode.request_trailer_mode, HeaderSendMode::Send as i32);
    }

    #[test]
    fn mode_override_never_switches_off_a_full_duplex_direction() {
        let modes = Some((BodyMode::FullDuplexStreamed, BodyMode::Buffered));
        let mut protocol = StreamProtocol::new();
        protocol
            .observe(&inbound(RequestHeaders, headers(&[], false), modes))
            .unwrap();
        let asm: PhaseSet = ASM.into_iter().collect();
        let mode = protocol.mode_override(RequestHeaders, asm).unwrap();
        assert_eq!(
            mode.request_body_mode,
            BodySendMode::FullDuplexStreamed as i32
        );
        assert_eq!(mode.request_trailer_mode, HeaderSendMode::Send as i32);
        assert_eq!(mode.response_body_mode, BodySendMode::None as i32);
    }

    #[test]
    fn no_override_when_envoy_sends_bodies_without_waiting() {
        let mut protocol = StreamProtocol::new();
        let mut message = inbound(
            RequestHeaders,
            headers(&[], false),
            Some((BodyMode::Streamed, BodyMode::Streamed)),
        );
        message.envoy_modes.as_mut().unwrap().body_without_waiting = true;
        protocol.observe(&message).unwrap();
        assert_eq!(
            protocol.mode_override(RequestHeaders, ASM.into_iter().collect()),
            None
        );
    }

    #[test]
    fn nothing_follows_the_end_of_a_direction() {
        let mut protocol = StreamProtocol::new();
        protocol
            .observe(&inbound(RequestHeaders, headers(&[], true), None))
            .unwrap();
        let body = inbound(RequestBody, Message::Body(Default::default()), None);
        assert_eq!(
            protocol.observe(&body),
            Err(ProtocolError::AfterEndOfStream { phase: RequestBody })
        );
        assert_eq!(
            ProtocolError::AfterEndOfStream { phase: RequestBody }.to_string(),
            "request_body arrived after Envoy said the request had ended"
        );
        // The other direction is unaffected.
        protocol
            .observe(&inbound(ResponseHeaders, headers(&[], false), None))
            .unwrap();
    }

    #[test]
    fn no_override_without_knowing_the_body_modes() {
        let mut protocol = StreamProtocol::new();
        protocol
            .observe(&inbound(RequestHeaders, headers(&[], false), None))
            .unwrap();
        assert_eq!(
            protocol.mode_override(RequestHeaders, PhaseSet::EMPTY),
            None
        );
    }

    #[test]
    fn errors_read_as_sentences() {
        let err = run(&[RequestBody, RequestHeaders]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "request_headers arrived after request_body in the same direction"
        );
    }
}
