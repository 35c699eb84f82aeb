//! Envoy's ext_proc protobufs to the host's types, and the one place that builds a
//! `ProcessingResponse`.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap as PbHeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, GrpcStatus, HeaderMutation, HeadersResponse,
    ImmediateResponse as PbImmediateResponse, ProcessingRequest, ProcessingResponse,
    StreamedBodyResponse, TrailersResponse, body_mutation, processing_request, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{self as pb, value::Kind};

use super::protocol::{EnvoyModes, Inbound, ProtocolError};
use crate::http::{
    BodyChunk, BodyMode, Changes, Decision, Effects, HeaderChanges, HeaderMap, ImmediateResponse,
    Message, Phase, Verdict,
};

/// Envoy recommends streamed body chunks of at most 64 KiB in `FULL_DUPLEX_STREAMED` mode.
pub const MAX_STREAMED_CHUNK: usize = 64 * 1024;

/// Reads a `ProcessingRequest`.
pub fn inbound(request: ProcessingRequest) -> Result<Inbound, ProtocolError> {
    use processing_request::Request;
    let observability = request.observability_mode;
    let envoy_modes = request.protocol_config.map(|c| EnvoyModes {
        request_body: body_mode(c.request_body_mode),
        response_body: body_mode(c.response_body_mode),
        body_without_waiting: c.send_body_without_waiting_for_header_response,
    });
    let attributes = request
        .attributes
        .into_values()
        .flat_map(|s| s.fields)
        .map(|(name, value)| (name, text(&value)))
        .collect();
    let metadata = metadata_entries(request.metadata_context);
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
        attributes,
        metadata,
        envoy_modes,
    })
}

/// A body mode from Envoy's enum; unknown values are `None`.
pub(crate) fn body_mode(mode: i32) -> BodyMode {
    match BodySendMode::try_from(mode) {
        Ok(BodySendMode::Streamed) => BodyMode::Streamed,
        Ok(BodySendMode::Buffered) => BodyMode::Buffered,
        Ok(BodySendMode::BufferedPartial) => BodyMode::BufferedPartial,
        Ok(BodySendMode::FullDuplexStreamed) => BodyMode::FullDuplexStreamed,
        // GRPC mode is not implemented by Envoy; NONE and unknown values send no body.
        _ => BodyMode::None,
    }
}

fn metadata_entries(metadata: Option<Metadata>) -> BTreeMap<(String, String), String> {
    metadata
        .into_iter()
        .flat_map(|m| m.filter_metadata)
        .flat_map(|(namespace, fields)| {
            fields
                .fields
                .into_iter()
                .map(move |(key, value)| ((namespace.clone(), key), json(&value).to_string()))
        })
        .collect()
}

/// Strings as they are; everything else as JSON.
pub(crate) fn text(value: &pb::Value) -> String {
    match &value.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        _ => json(value).to_string(),
    }
}

/// A protobuf value as JSON.
pub(crate) fn json(value: &pb::Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => {
            serde_json::Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), json(v))).collect())
        }
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.iter().map(json).collect()),
    }
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

/// What the answer to one message depends on besides the chain's verdict: the protocol state
/// of its stream.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// How Envoy sends bodies in the message's direction.
    pub body_mode: BodyMode,
    /// The direction's `content-length` as its headers arrived, if they had one.
    pub content_length: Option<u64>,
    /// Phases to switch off, sent with a headers answer.
    pub mode_override: Option<ProcessingMode>,
}

/// The answers to a message of `phase` after the chain decided `verdict`: exactly one, except
/// in `FULL_DUPLEX_STREAMED` body mode, where a body message gets none while plugins hold it
/// and as many 64 KiB chunks as it takes when they let it go.
pub fn replies(phase: Phase, verdict: Verdict, envelope: &Envelope) -> Vec<ProcessingResponse> {
    use processing_response::Response;
    let Verdict {
        decision,
        effects,
        headers,
    } = verdict;
    let dynamic_metadata = dynamic_metadata(&effects);
    let wrap = |response: Response| ProcessingResponse {
        response: Some(response),
        dynamic_metadata: dynamic_metadata.clone(),
        ..ProcessingResponse::default()
    };
    let changes = match decision {
        Decision::Respond(answer) => {
            return vec![wrap(Response::ImmediateResponse(immediate_response(
                answer,
            )))];
        }
        Decision::Held => return Vec::new(),
        Decision::Continue(changes) => changes,
    };
    match (phase, changes) {
        (Phase::RequestHeaders | Phase::ResponseHeaders, Changes::Headers(changes)) => {
            let common = CommonResponse {
                header_mutation: header_mutation(changes),
                // Envoy honours this only for request headers.
                clear_route_cache: effects.clear_route_cache && phase == Phase::RequestHeaders,
                ..CommonResponse::default()
            };
            let response = HeadersResponse {
                response: Some(common),
            };
            let mut reply = wrap(match phase {
                Phase::RequestHeaders => Response::RequestHeaders(response),
                _ => Response::ResponseHeaders(response),
            });
            reply.mode_override = envelope.mode_override;
            vec![reply]
        }
        (_, Changes::Headers(changes)) => {
            let response = TrailersResponse {
                header_mutation: header_mutation(changes),
            };
            vec![wrap(match phase {
                Phase::RequestTrailers => Response::RequestTrailers(response),
                _ => Response::ResponseTrailers(response),
            })]
        }
        (_, Changes::Body(body)) if envelope.body_mode == BodyMode::FullDuplexStreamed => {
            streamed_body(phase, body)
                .into_iter()
                .enumerate()
                .map(|(i, response)| {
                    let mut reply = ProcessingResponse {
                        response: Some(response),
                        ..ProcessingResponse::default()
                    };
                    if i == 0 {
                        reply.dynamic_metadata = dynamic_metadata.clone();
                    }
                    reply
                })
                .collect()
        }
        (_, Changes::Body(body)) => {
            let response = body_response(body, headers.unwrap_or_default(), envelope);
            vec![wrap(match phase {
                Phase::RequestBody => Response::RequestBody(response),
                _ => Response::ResponseBody(response),
            })]
        }
    }
}

/// An answer that asks Envoy for more time before the real one.
pub fn more_time(timeout: Duration) -> ProcessingResponse {
    ProcessingResponse {
        override_message_timeout: Some(pb::Duration {
            seconds: timeout.as_secs() as i64,
            nanos: timeout.subsec_nanos() as i32,
        }),
        ..ProcessingResponse::default()
    }
}

fn dynamic_metadata(effects: &Effects) -> Option<pb::Struct> {
    if effects.metadata.is_empty() {
        return None;
    }
    let mut namespaces: BTreeMap<&str, pb::Struct> = BTreeMap::new();
    for (namespace, key, value) in &effects.metadata {
        namespaces.entry(namespace).or_default().fields.insert(
            key.clone(),
            pb::Value {
                kind: Some(Kind::StringValue(value.clone())),
            },
        );
    }
    Some(pb::Struct {
        fields: namespaces
            .into_iter()
            .map(|(namespace, fields)| {
                (
                    namespace.to_string(),
                    pb::Value {
                        kind: Some(Kind::StructValue(fields)),
                    },
                )
            })
            .collect(),
    })
}

/// In `BUFFERED` and `BUFFERED_PARTIAL` modes Envoy holds the headers until the body is
/// answered and applies header changes sent with it: the ones body handlers made (`headers`),
/// and, for a replaced body in `BUFFERED` mode, a matching `content-length`, or Envoy would
/// forward a length that no longer fits (and answer 500).
fn body_response(body: BodyChunk, mut headers: HeaderChanges, envelope: &Envelope) -> BodyResponse {
    if let (true, BodyMode::Buffered, Some(_)) =
        (body.replaced, envelope.body_mode, envelope.content_length)
    {
        headers.absorb(HeaderChanges {
            set: vec![(
                "content-length".into(),
                vec![body.data.len().to_string().into_bytes()],
            )],
            removed: Vec::new(),
        });
    }
    let header_mutation = header_mutation(headers);
    let body_mutation = body.replaced.then_some(BodyMutation {
        mutation: Some(body_mutation::Mutation::Body(body.data)),
    });
    BodyResponse {
        response: Some(CommonResponse {
            header_mutation,
            body_mutation,
            ..CommonResponse::default()
        }),
    }
}

/// The body as `StreamedBodyResponse`s of at most 64 KiB; the last carries end-of-stream.
fn streamed_body(phase: Phase, body: BodyChunk) -> Vec<processing_response::Response> {
    use processing_response::Response;
    let pieces: Vec<&[u8]> = if body.data.is_empty() {
        if !body.end_of_stream {
            return Vec::new();
        }
        vec![&[]]
    } else {
        body.data.chunks(MAX_STREAMED_CHUNK).collect()
    };
    let last = pieces.len() - 1;
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            let response = BodyResponse {
                response: Some(CommonResponse {
                    body_mutation: Some(BodyMutation {
                        mutation: Some(body_mutation::Mutation::StreamedResponse(
                            StreamedBodyResponse {
                                body: piece.to_vec(),
                                end_of_stream: body.end_of_stream && i == last,
                                ..StreamedBodyResponse::default()
                            },
                        )),
                    }),
                    ..CommonResponse::default()
                }),
            };
            match phase {
                Phase::RequestBody => Response::RequestBody(response),
                _ => Response::ResponseBody(response),
            }
        })
        .collect()
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
        // Envoy keeps this as %RESPONSE_CODE_DETAILS%, which may not contain whitespace.
        details: answer
            .details
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("_"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProtocolConfiguration,
    };
    use processing_response::Response;

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

    fn continuing(changes: Changes) -> Verdict {
        Verdict {
            decision: Decision::Continue(changes),
            effects: Effects::default(),
            headers: None,
        }
    }

    /// The single reply to a message.
    fn reply(phase: Phase, verdict: Verdict, envelope: &Envelope) -> Response {
        let mut replies = replies(phase, verdict, envelope);
        assert_eq!(replies.len(), 1, "{replies:?}");
        replies.remove(0).response.unwrap()
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
    fn attributes_metadata_and_body_modes_are_read() {
        let mut request = request_headers(&[], true);
        let value = |kind| pb::Value { kind: Some(kind) };
        request.attributes.insert(
            "envoy.filters.http.ext_proc".into(),
            pb::Struct {
                fields: [
                    (
                        "request.path".to_string(),
                        value(Kind::StringValue("/a".into())),
                    ),
                    ("request.size".to_string(), value(Kind::NumberValue(12.0))),
                ]
                .into(),
            },
        );
        request.metadata_context = Some(Metadata {
            filter_metadata: [(
                "ns".to_string(),
                pb::Struct {
                    fields: [("k".to_string(), value(Kind::BoolValue(true)))].into(),
                },
            )]
            .into(),
            ..Metadata::default()
        });
        request.protocol_config = Some(ProtocolConfiguration {
            request_body_mode: BodySendMode::FullDuplexStreamed as i32,
            response_body_mode: BodySendMode::BufferedPartial as i32,
            send_body_without_waiting_for_header_response: true,
        });
        let inbound = inbound(request).unwrap();
        assert_eq!(inbound.attributes["request.path"], "/a");
        assert_eq!(inbound.attributes["request.size"], "12.0");
        assert_eq!(
            inbound.metadata[&("ns".to_string(), "k".to_string())],
            "true"
        );
        assert_eq!(
            inbound.envoy_modes,
            Some(EnvoyModes {
                request_body: BodyMode::FullDuplexStreamed,
                response_body: BodyMode::BufferedPartial,
                body_without_waiting: true,
            })
        );
    }

    #[test]
    fn unchanged_headers_answer_without_a_mutation() {
        let answer = reply(
            Phase::RequestHeaders,
            continuing(Changes::Headers(HeaderChanges::default())),
            &Envelope::default(),
        );
        let Response::RequestHeaders(h) = answer else {
            panic!("request_headers response expected");
        };
        assert_eq!(h.response.unwrap().header_mutation, None);
    }

    #[test]
    fn changed_headers_are_sent_as_raw_values() {
        let mut headers = HeaderMap::default();
        headers.set("x-ext-proc-header".into(), b"hello-from-asm".to_vec());
        headers.append("x-multi".into(), b"1".to_vec());
        headers.append("x-multi".into(), b"2".to_vec());
        headers.remove("server".into());
        let answer = reply(
            Phase::ResponseHeaders,
            continuing(Changes::Headers(headers.changes())),
            &Envelope::default(),
        );
        let Response::ResponseHeaders(h) = answer else {
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

    fn common(response: Response) -> CommonResponse {
        match response {
            Response::RequestBody(b) | Response::ResponseBody(b) => b.response.unwrap(),
            Response::RequestHeaders(h) | Response::ResponseHeaders(h) => h.response.unwrap(),
            other => panic!("no common response in {other:?}"),
        }
    }

    #[test]
    fn replaced_bodies_carry_a_body_mutation() {
        let mut body = BodyChunk::new(b"old".to_vec(), true);
        let streamed = Envelope {
            body_mode: BodyMode::Streamed,
            ..Envelope::default()
        };
        let untouched = common(reply(
            Phase::RequestBody,
            continuing(Changes::Body(body.clone())),
            &streamed,
        ));
        assert_eq!(untouched.body_mutation, None);

        body.replace(b"new".to_vec());
        let replaced = common(reply(
            Phase::ResponseBody,
            continuing(Changes::Body(body)),
            &streamed,
        ));
        assert_eq!(
            replaced.body_mutation.unwrap().mutation,
            Some(body_mutation::Mutation::Body(b"new".to_vec()))
        );
        // Headers have gone already in STREAMED mode: no content-length change.
        assert_eq!(replaced.header_mutation, None);
    }

    /// A 14-byte `BUFFERED` body whose headers said so, replaced by a 2-byte one.
    fn buffered_replacement() -> (BodyChunk, Envelope) {
        let mut body = BodyChunk::new(b"{\"secret\":\"x\"}".to_vec(), true);
        body.replace(b"{}".to_vec());
        let envelope = Envelope {
            body_mode: BodyMode::Buffered,
            content_length: Some(14),
            ..Envelope::default()
        };
        (body, envelope)
    }

    #[test]
    fn a_replaced_buffered_body_gets_a_matching_content_length() {
        let (body, envelope) = buffered_replacement();
        let common = common(reply(
            Phase::RequestBody,
            continuing(Changes::Body(body)),
            &envelope,
        ));
        let header = common.header_mutation.unwrap().set_headers[0]
            .header
            .clone()
            .unwrap();
        assert_eq!(
            (header.key.as_str(), &header.raw_value[..]),
            ("content-length", &b"2"[..])
        );
    }

    #[test]
    fn header_changes_body_handlers_made_go_with_a_buffered_bodys_answer() {
        let (body, envelope) = buffered_replacement();
        let verdict = Verdict {
            headers: Some(HeaderChanges {
                // A plugin's own content-length gives way to the body's real one.
                set: vec![
                    ("x-redacted".into(), vec![b"1".to_vec()]),
                    ("content-length".into(), vec![b"99".to_vec()]),
                ],
                removed: vec!["x-secret".into()],
            }),
            ..continuing(Changes::Body(body))
        };
        let mutation = common(reply(Phase::RequestBody, verdict, &envelope))
            .header_mutation
            .unwrap();
        let set: Vec<_> = mutation
            .set_headers
            .iter()
            .map(|o| {
                let h = o.header.as_ref().unwrap();
                (h.key.as_str(), h.raw_value.as_slice())
            })
            .collect();
        assert_eq!(
            set,
            [("x-redacted", &b"1"[..]), ("content-length", &b"2"[..])]
        );
        assert_eq!(mutation.remove_headers, ["x-secret"]);
    }

    #[test]
    fn full_duplex_bodies_stream_back_in_64k_pieces() {
        let envelope = Envelope {
            body_mode: BodyMode::FullDuplexStreamed,
            ..Envelope::default()
        };
        let big = BodyChunk::new(vec![7; MAX_STREAMED_CHUNK * 2 + 1], true);
        let replies = replies(
            Phase::ResponseBody,
            continuing(Changes::Body(big)),
            &envelope,
        );
        let pieces: Vec<(usize, bool)> = replies
            .into_iter()
            .map(
                |r| match common(r.response.unwrap()).body_mutation.unwrap().mutation {
                    Some(body_mutation::Mutation::StreamedResponse(s)) => {
                        (s.body.len(), s.end_of_stream)
                    }
                    other => panic!("streamed response expected: {other:?}"),
                },
            )
            .collect();
        assert_eq!(
            pieces,
            [
                (MAX_STREAMED_CHUNK, false),
                (MAX_STREAMED_CHUNK, false),
                (1, true)
            ]
        );

        let held = Verdict {
            decision: Decision::Held,
            effects: Effects::default(),
            headers: None,
        };
        assert!(super::replies(Phase::RequestBody, held, &envelope).is_empty());
        let empty_end = BodyChunk::new(Vec::new(), true);
        assert_eq!(
            super::replies(
                Phase::RequestBody,
                continuing(Changes::Body(empty_end)),
                &envelope
            )
            .len(),
            1
        );
    }

    #[test]
    fn effects_become_dynamic_metadata_and_route_cache_clearing() {
        let verdict = Verdict {
            decision: Decision::Continue(Changes::Headers(HeaderChanges::default())),
            effects: Effects {
                metadata: vec![("acme".into(), "user".into(), "alice".into())],
                clear_route_cache: true,
            },
            headers: None,
        };
        let mut replies = replies(Phase::RequestHeaders, verdict, &Envelope::default());
        let reply = replies.remove(0);
        let metadata = reply.dynamic_metadata.unwrap();
        let Some(Kind::StructValue(acme)) = &metadata.fields["acme"].kind else {
            panic!("namespace struct expected");
        };
        assert_eq!(
            acme.fields["user"].kind,
            Some(Kind::StringValue("alice".into()))
        );
        assert!(common(reply.response.unwrap()).clear_route_cache);
    }

    #[test]
    fn immediate_responses_carry_status_headers_and_body() {
        let answer = reply(
            Phase::RequestHeaders,
            Verdict {
                decision: Decision::Respond(ImmediateResponse {
                    status: 401,
                    headers: vec![("WWW-Authenticate".into(), b"Bearer".to_vec())],
                    body: b"no".to_vec(),
                    grpc_status: Some(16),
                    details: "auth failed".into(),
                }),
                effects: Effects::default(),
                headers: None,
            },
            &Envelope::default(),
        );
        let Response::ImmediateResponse(r) = answer else {
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
        assert_eq!(r.details, "auth_failed");
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
