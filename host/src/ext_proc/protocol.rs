//! The ext_proc protocol of one stream, as a pure state machine: which messages may arrive
//! when, what Envoy said about its body modes, and which phases can still come -- so the host
//! can tell Envoy to skip what no plugin needs, and close the stream once nothing is left.
//!
//! Envoy sends each direction's phases in order -- headers, body messages, trailers -- and may
//! skip any of them (per its processing mode). The two directions interleave freely: a
//! response can start while the request body is still streaming. What is never valid is going
//! backwards within a direction, repeating headers or trailers, or sending anything after the
//! host answered the stream with an immediate response.

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};

use super::convert::Inbound;
use crate::http::{BodyMode, Direction, Message, Phase, PhaseSet};

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
    fn last_phase(self, request: bool) -> Option<Phase> {
        let (h, b, t) = if request {
            (
                Phase::RequestHeaders,
                Phase::RequestBody,
                Phase::RequestTrailers,
            )
        } else {
            (
                Phase::ResponseHeaders,
                Phase::ResponseBody,
                Phase::ResponseTrailers,
            )
        };
        match self {
            Progress::Nothing => None,
            Progress::Headers => Some(h),
            Progress::Body => Some(b),
            Progress::Trailers => Some(t),
        }
    }
}

/// The protocol state of one ext_proc stream.
#[derive(Debug, Clone, Default)]
pub struct StreamProtocol {
    request: Progress,
    response: Progress,
    /// Per direction (request, response): whether Envoy said the direction ended.
    ended: [bool; 2],
    /// Per direction: the `content-length` its headers carried.
    content_length: [Option<u64>; 2],
    /// The body modes Envoy is configured with, from the first message that said.
    body_modes: Option<(BodyMode, BodyMode)>,
    answered: bool,
}

fn index(direction: Direction) -> usize {
    match direction {
        Direction::Request => 0,
        Direction::Response => 1,
    }
}

impl StreamProtocol {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that `phase` may arrive now and records it. Nothing may follow in a direction
    /// once Envoy said it ended (`end_of_stream`, or trailers).
    pub fn accept(&mut self, phase: Phase) -> Result<(), ProtocolError> {
        if self.answered {
            return Err(ProtocolError::AfterImmediateResponse { phase });
        }
        let request = matches!(
            phase,
            Phase::RequestHeaders | Phase::RequestBody | Phase::RequestTrailers
        );
        let progress = if request {
            &mut self.request
        } else {
            &mut self.response
        };
        if self.ended[index(phase.direction())] {
            return Err(ProtocolError::AfterEndOfStream { phase });
        }
        let next = match phase {
            Phase::RequestHeaders | Phase::ResponseHeaders => Progress::Headers,
            Phase::RequestBody | Phase::ResponseBody => Progress::Body,
            Phase::RequestTrailers | Phase::ResponseTrailers => Progress::Trailers,
        };
        // Body messages repeat; headers and trailers come at most once, and nothing goes back.
        let allowed = match next {
            Progress::Body => *progress <= Progress::Body,
            _ => *progress < next,
        };
        if !allowed {
            let after = progress.last_phase(request).expect("progress past nothing");
            return Err(ProtocolError::OutOfOrder { phase, after });
        }
        *progress = next;
        Ok(())
    }

    /// Checks an inbound message and records what it says about the stream.
    pub fn observe(&mut self, inbound: &Inbound) -> Result<(), ProtocolError> {
        self.accept(inbound.phase)?;
        if self.body_modes.is_none() {
            self.body_modes = inbound.body_modes;
        }
        let direction = index(inbound.phase.direction());
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

    pub fn is_answered(&self) -> bool {
        self.answered
    }

    /// How Envoy sends bodies in `direction`; `None` until Envoy says.
    pub fn body_mode(&self, direction: Direction) -> BodyMode {
        match (self.body_modes, direction) {
            (Some((request, _)), Direction::Request) => request,
            (Some((_, response)), Direction::Response) => response,
            (None, _) => BodyMode::None,
        }
    }

    /// The `content-length` of `direction`'s headers, if they had one.
    pub fn content_length(&self, direction: Direction) -> Option<u64> {
        self.content_length[index(direction)]
    }

    /// The phases that may still arrive on this stream.
    pub fn to_come(&self) -> PhaseSet {
        if self.answered {
            return PhaseSet::EMPTY;
        }
        let mut set = PhaseSet::EMPTY;
        for (direction, progress) in [
            (Direction::Request, self.request),
            (Direction::Response, self.response),
        ] {
            if self.ended[index(direction)] {
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

    /// Whether no phase `live` plugins handle can still arrive: the host may close the stream
    /// and Envoy carries on without it.
    pub fn finished_for(&self, live: PhaseSet) -> bool {
        !self.to_come().intersects(live)
    }

    /// The processing mode to send with the answer to `phase` (a headers phase) so Envoy skips
    /// what no `live` plugin needs. `None` when nothing would be skipped, or when Envoy has not
    /// said which body modes it uses (the host cannot then restate them).
    pub fn mode_override(&self, phase: Phase, live: PhaseSet) -> Option<ProcessingMode> {
        if !matches!(phase, Phase::RequestHeaders | Phase::ResponseHeaders) {
            return None;
        }
        let (request_body, response_body) = self.body_modes?;
        let wanted = |p: Phase| live.contains(p);
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

fn send_mode(mode: BodyMode) -> BodySendMode {
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
            body_modes: modes,
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
        let live: PhaseSet = ASM.into_iter().collect();
        let mut protocol = StreamProtocol::new();
        assert!(!protocol.finished_for(live));
        protocol
            .observe(&inbound(
                RequestHeaders,
                headers(&[("content-length", "12")], false),
                None,
            ))
            .unwrap();
        assert_eq!(protocol.content_length(Direction::Request), Some(12));
        assert!(protocol.to_come().contains(RequestBody));
        assert!(!protocol.finished_for(live));
        protocol
            .observe(&inbound(ResponseHeaders, headers(&[], false), None))
            .unwrap();
        assert!(protocol.to_come().contains(ResponseBody));
        assert!(
            protocol.finished_for(live),
            "nothing the ASM plugin handles can come"
        );
    }

    #[test]
    fn a_request_without_body_ends_with_its_headers() {
        let mut protocol = StreamProtocol::new();
        protocol
            .observe(&inbound(RequestHeaders, headers(&[], true), None))
            .unwrap();
        let live: PhaseSet = [RequestBody, RequestTrailers].into_iter().collect();
        assert!(protocol.finished_for(live));
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
