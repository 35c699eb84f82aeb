//! Which ext_proc messages may arrive when, as a pure state machine.
//!
//! Envoy sends each direction's phases in order -- headers, body messages, trailers -- and may
//! skip any of them (per its processing mode). The two directions interleave freely: a
//! response can start while the request body is still streaming. What is never valid is going
//! backwards within a direction, repeating headers or trailers, or sending anything after the
//! host answered the stream with an immediate response.

use crate::http::Phase;

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
    answered: bool,
}

impl StreamProtocol {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that `phase` may arrive now and records it.
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

    /// Records that the host answered with an immediate response: Envoy ends the exchange.
    pub fn answered(&mut self) {
        self.answered = true;
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

    #[test]
    fn errors_read_as_sentences() {
        let err = run(&[RequestBody, RequestHeaders]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "request_headers arrived after request_body in the same direction"
        );
    }
}
