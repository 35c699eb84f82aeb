//! Envoy's ext_proc protobufs to the host's types, and the one place that builds a
//! `ProcessingResponse`.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap as PbHeaderMap, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, GrpcStatus, HeaderMutation, HeadersResponse,
    ImmediateResponse as PbImmediateResponse, ProcessingRequest, ProcessingResponse,
    TrailersResponse, body_mutation, processing_request, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;

use super::protocol::ProtocolError;
use crate::http::{
    BodyChunk, HeaderChanges, HeaderMap, ImmediateResponse, Message, Phase, Verdict,
};

/// One inbound message in the host's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub phase: Phase,
    pub message: Message,
    /// Envoy does not wait for (or read) an answer to this message.
    pub observability: bool,
}

/// Reads a `ProcessingRequest`.
pub fn inbound(request: ProcessingRequest) -> Result<Inbound, ProtocolError> {
    use processing_request::Request;
    let observability = request.observability_mode;
    let (phase, message) = match request.request.ok_or(ProtocolError::EmptyRequest)? {
        Request::RequestHeaders(h) => (
            Phase::RequestHeaders,
            Message::Headers {
                headers: header_map(h.headers),
                end_of_stream: h.end_of_stream,
            },
        ),
        Request::ResponseHeaders(h) => (
            Phase::ResponseHeaders,
            Message::Headers {
                headers: header_map(h.headers),
                end_of_stream: h.end_of_stream,
            },
        ),
        Request::RequestBody(b) => (
            Phase::RequestBody,
            Message::Body(BodyChunk::new(b.body, b.end_of_stream)),
        ),
        Request::ResponseBody(b) => (
            Phase::ResponseBody,
            Message::Body(BodyChunk::new(b.body, b.end_of_stream)),
        ),
        Request::RequestTrailers(t) => (
            Phase::RequestTrailers,
            Message::Trailers(header_map(t.trailers)),
        ),
        Request::ResponseTrailers(t) => (
            Phase::ResponseTrailers,
            Message::Trailers(header_map(t.trailers)),
        ),
    };
    Ok(Inbound {
        phase,
        message,
        observability,
    })
}

/// Envoy fills `raw_value`; older versions and some clients fill `value`.
fn header_map(map: Option<PbHeaderMap>) -> HeaderMap {
    HeaderMap::from_entries(map.into_iter().flat_map(|m| m.headers).map(|h| {
        let value = if h.raw_value.is_empty() {
            h.value.into_bytes()
        } else {
            h.raw_value
        };
        (h.key, value)
    }))
}

/// The answer to a message of `phase` after the chain decided `verdict`.
pub fn outbound(phase: Phase, verdict: Verdict) -> ProcessingResponse {
    use processing_response::Response;
    let response = match verdict {
        Verdict::Respond(answer) => Response::ImmediateResponse(immediate_response(answer)),
        Verdict::Continue(message) => match (phase, message) {
            (Phase::RequestHeaders, Message::Headers { headers, .. }) => {
                Response::RequestHeaders(headers_response(&headers))
            }
            (Phase::ResponseHeaders, Message::Headers { headers, .. }) => {
                Response::ResponseHeaders(headers_response(&headers))
            }
            (Phase::RequestBody, Message::Body(body)) => Response::RequestBody(body_response(body)),
            (Phase::ResponseBody, Message::Body(body)) => {
                Response::ResponseBody(body_response(body))
            }
            (Phase::RequestTrailers, Message::Trailers(trailers)) => {
                Response::RequestTrailers(trailers_response(&trailers))
            }
            (Phase::ResponseTrailers, Message::Trailers(trailers)) => {
                Response::ResponseTrailers(trailers_response(&trailers))
            }
            (phase, message) => unreachable!("{phase} carried {message:?}"),
        },
    };
    ProcessingResponse {
        response: Some(response),
        ..ProcessingResponse::default()
    }
}

fn headers_response(headers: &HeaderMap) -> HeadersResponse {
    HeadersResponse {
        response: Some(CommonResponse {
            header_mutation: header_mutation(headers.changes()),
            ..CommonResponse::default()
        }),
    }
}

fn body_response(body: BodyChunk) -> BodyResponse {
    let body_mutation = body.replaced.then_some(BodyMutation {
        mutation: Some(body_mutation::Mutation::Body(body.data)),
    });
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation,
            ..CommonResponse::default()
        }),
    }
}

fn trailers_response(trailers: &HeaderMap) -> TrailersResponse {
    TrailersResponse {
        header_mutation: header_mutation(trailers.changes()),
    }
}

/// A name's first value overwrites whatever Envoy has, the rest append, so the result is the
/// same whichever order Envoy applies removals and sets in.
fn header_mutation(changes: HeaderChanges) -> Option<HeaderMutation> {
    if changes.is_empty() {
        return None;
    }
    let mut set_headers = Vec::new();
    for (name, values) in changes.set {
        for (i, value) in values.into_iter().enumerate() {
            let action = if i == 0 {
                HeaderAppendAction::OverwriteIfExistsOrAdd
            } else {
                HeaderAppendAction::AppendIfExistsOrAdd
            };
            set_headers.push(header_option(name.clone(), value, action));
        }
    }
    Some(HeaderMutation {
        set_headers,
        remove_headers: changes.removed,
    })
}

/// Envoy 1.40 reads `raw_value` only: a header with just `value` set arrives empty.
fn header_option(key: String, value: Vec<u8>, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            raw_value: value,
            ..HeaderValue::default()
        }),
        append_action: action as i32,
        keep_empty_value: true,
        ..HeaderValueOption::default()
    }
}

fn immediate_response(answer: ImmediateResponse) -> PbImmediateResponse {
    let set_headers: Vec<_> = answer
        .headers
        .into_iter()
        .map(|(name, value)| {
            header_option(
                name.to_ascii_lowercase(),
                value,
                HeaderAppendAction::AppendIfExistsOrAdd,
            )
        })
        .collect();
    PbImmediateResponse {
        status: Some(HttpStatus {
            code: i32::from(answer.status),
        }),
        headers: (!set_headers.is_empty()).then(|| HeaderMutation {
            set_headers,
            remove_headers: Vec::new(),
        }),
        body: answer.body,
        grpc_status: answer.grpc_status.map(|status| GrpcStatus { status }),
        details: answer.details,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders};

    fn request_headers(pairs: &[(&str, &str)], raw: bool) -> ProcessingRequest {
        let headers = pairs
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                value: if raw { String::new() } else { v.to_string() },
                raw_value: if raw {
                    v.as_bytes().to_vec()
                } else {
                    Vec::new()
                },
            })
            .collect();
        ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                headers: Some(PbHeaderMap { headers }),
                end_of_stream: true,
                ..HttpHeaders::default()
            })),
            ..ProcessingRequest::default()
        }
    }

    #[test]
    fn header_values_come_from_raw_value_or_value() {
        for raw in [true, false] {
            let inbound = inbound(request_headers(&[(":path", "/headers")], raw)).unwrap();
            let Message::Headers {
                headers,
                end_of_stream,
            } = inbound.message
            else {
                panic!("headers expected");
            };
            assert!(end_of_stream);
            assert_eq!(headers.get(":path"), Some(&b"/headers"[..]));
        }
    }

    #[test]
    fn empty_oneof_is_a_protocol_error() {
        assert_eq!(
            inbound(ProcessingRequest::default()),
            Err(ProtocolError::EmptyRequest)
        );
    }

    #[test]
    fn unchanged_headers_answer_without_a_mutation() {
        let response = outbound(
            Phase::RequestHeaders,
            Verdict::Continue(Message::Headers {
                headers: HeaderMap::default(),
                end_of_stream: false,
            }),
        );
        let Some(processing_response::Response::RequestHeaders(h)) = response.response else {
            panic!("request_headers response expected");
        };
        assert_eq!(h.response.unwrap().header_mutation, None);
    }

    #[test]
    fn changed_headers_are_sent_as_raw_values() {
        let mut headers = HeaderMap::default();
        headers.set("x-ext-proc-header", b"hello-from-asm".to_vec());
        headers.append("x-multi", b"1".to_vec());
        headers.append("x-multi", b"2".to_vec());
        headers.remove("server");
        let response = outbound(
            Phase::ResponseHeaders,
            Verdict::Continue(Message::Headers {
                headers,
                end_of_stream: false,
            }),
        );
        let Some(processing_response::Response::ResponseHeaders(h)) = response.response else {
            panic!("response_headers response expected");
        };
        let mutation = h.response.unwrap().header_mutation.unwrap();
        let sets: Vec<(String, Vec<u8>, String, i32)> = mutation
            .set_headers
            .into_iter()
            .map(|o| {
                let h = o.header.unwrap();
                (h.key, h.raw_value, h.value, o.append_action)
            })
            .collect();
        let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
        let append = HeaderAppendAction::AppendIfExistsOrAdd as i32;
        assert_eq!(
            sets,
            vec![
                (
                    "x-ext-proc-header".into(),
                    b"hello-from-asm".to_vec(),
                    String::new(),
                    overwrite
                ),
                ("x-multi".into(), b"1".to_vec(), String::new(), overwrite),
                ("x-multi".into(), b"2".to_vec(), String::new(), append),
            ]
        );
        assert_eq!(mutation.remove_headers, vec!["server".to_string()]);
    }

    #[test]
    fn replaced_bodies_carry_a_body_mutation() {
        let mut body = BodyChunk::new(b"old".to_vec(), true);
        let untouched = outbound(
            Phase::RequestBody,
            Verdict::Continue(Message::Body(body.clone())),
        );
        let Some(processing_response::Response::RequestBody(b)) = untouched.response else {
            panic!("request_body response expected");
        };
        assert_eq!(b.response.unwrap().body_mutation, None);

        body.replace(b"new".to_vec());
        let replaced = outbound(Phase::ResponseBody, Verdict::Continue(Message::Body(body)));
        let Some(processing_response::Response::ResponseBody(b)) = replaced.response else {
            panic!("response_body response expected");
        };
        assert_eq!(
            b.response.unwrap().body_mutation.unwrap().mutation,
            Some(body_mutation::Mutation::Body(b"new".to_vec()))
        );
    }

    #[test]
    fn immediate_responses_carry_status_headers_and_body() {
        let response = outbound(
            Phase::RequestHeaders,
            Verdict::Respond(ImmediateResponse {
                status: 401,
                headers: vec![("WWW-Authenticate".into(), b"Bearer".to_vec())],
                body: b"no".to_vec(),
                grpc_status: Some(16),
                details: "auth".into(),
            }),
        );
        let Some(processing_response::Response::ImmediateResponse(r)) = response.response else {
            panic!("immediate response expected");
        };
        assert_eq!(r.status.unwrap().code, 401);
        let header = r.headers.unwrap().set_headers[0].header.clone().unwrap();
        assert_eq!(
            (header.key.as_str(), header.raw_value.as_slice()),
            ("www-authenticate", &b"Bearer"[..])
        );
        assert_eq!(r.body, b"no");
        assert_eq!(r.grpc_status.unwrap().status, 16);
    }

    #[test]
    fn body_messages_keep_end_of_stream() {
        let inbound = inbound(ProcessingRequest {
            request: Some(processing_request::Request::ResponseBody(HttpBody {
                body: b"abc".to_vec(),
                end_of_stream: true,
                ..HttpBody::default()
            })),
            observability_mode: true,
            ..ProcessingRequest::default()
        })
        .unwrap();
        assert_eq!(inbound.phase, Phase::ResponseBody);
        assert!(inbound.observability);
        assert_eq!(
            inbound.message,
            Message::Body(BodyChunk::new(b"abc".to_vec(), true))
        );
    }
}
