//! Plays one exchange from a file to an [`Exchange`] -- the state machine the gRPC service
//! drives -- as Envoy's ext_proc filter would send it, and gathers what Envoy would receive:
//! message by message in the filter's processing mode, with its attributes, metadata and
//! protocol configuration on the first message; stopping where Envoy stops (an immediate
//! response, the host closing the stream, a protocol error); applying a `mode_override` where
//! Envoy would.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap as PbHeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::HeaderSendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse,
    ProtocolConfiguration, processing_request,
};
use envoy_types::pb::google::protobuf::{self as pb, value::Kind};

use super::file::{EnvoyFilter, ExchangeSpec, Headers, MessageSpec, Mode, Send, side};
use super::transcript::{Output, Transcript};
use crate::ext_proc::exchange::{Exchange, Then};
use crate::ext_proc::{convert, protocol};
use crate::http::{BodyMode, Direction, Phase};
use crate::metrics::{Metrics, OUTCOMES};
use crate::registry::Generation;

/// The filter's name, under which Envoy sends attributes.
const FILTER_NAME: &str = "envoy.filters.http.ext_proc";

/// One exchange, played.
#[derive(Debug, Clone, Default)]
pub struct Played {
    /// The chain that served it.
    pub chain: String,
    pub output: Output,
    /// The messages sent, in order, each with the phases of the answers it got.
    pub messages: Vec<(Phase, Vec<String>)>,
    /// Where the exchange went on without the host: it closed the stream after this message.
    pub closed_after: Option<Phase>,
    /// The host refused a message as a protocol error (the stream would end with it).
    pub protocol_error: Option<String>,
}

/// Plays `spec` through `generation`'s chains; `defaults` are the file's Envoy settings.
pub async fn play(
    generation: &Arc<Generation>,
    metrics: &Arc<Metrics>,
    spec: &ExchangeSpec,
    defaults: &EnvoyFilter,
) -> Played {
    let filter = defaults.overlaid(spec.envoy.as_ref());
    let before = failure_counts(generation, metrics);
    let mut player = Player {
        exchange: Exchange::new(generation.clone(), metrics.clone(), spec.chain.as_deref()),
        mode: filter.mode(),
        allow_mode_override: filter.allow_mode_override.unwrap_or(false),
        first: true,
        transcript: Transcript::default(),
        closed_after: None,
        protocol_error: None,
        ended: false,
    };
    for direction in Direction::BOTH {
        let message = match direction {
            Direction::Request => Some(&spec.request),
            Direction::Response => spec.response.as_ref(),
        };
        let Some(message) = message else { break };
        player.direction(direction, message, spec).await;
        if player.transcript.answered_instead() {
            break;
        }
    }
    let chain = player.exchange.chain_name().to_string();
    let mut output = player.transcript.output();
    let after = failure_counts(generation, metrics);
    for ((plugin_chain, plugin, outcome), count) in after {
        let earlier = before
            .get(&(plugin_chain.clone(), plugin.clone(), outcome))
            .copied()
            .unwrap_or(0);
        if count > earlier && plugin_chain == chain {
            output.failures.insert(plugin, outcome.to_string());
        }
    }
    Played {
        chain,
        output,
        messages: std::mem::take(&mut player.transcript.messages),
        closed_after: player.closed_after,
        protocol_error: player.protocol_error,
    }
}

/// Every plugin's failed calls so far, by outcome.
fn failure_counts(
    generation: &Generation,
    metrics: &Metrics,
) -> BTreeMap<(String, String, &'static str), u64> {
    let mut counts = BTreeMap::new();
    for plugin in generation.plugins() {
        for outcome in OUTCOMES.into_iter().filter(|o| *o != "ok") {
            let count = metrics.chain_plugin_outcomes(plugin.chain(), plugin.name(), outcome);
            counts.insert(
                (
                    plugin.chain().to_string(),
                    plugin.name().to_string(),
                    outcome,
                ),
                count,
            );
        }
    }
    counts
}

struct Player {
    exchange: Exchange,
    mode: Mode,
    allow_mode_override: bool,
    /// The next message is the stream's first.
    first: bool,
    transcript: Transcript,
    closed_after: Option<Phase>,
    protocol_error: Option<String>,
    /// Envoy sends nothing more: the host answered immediately, closed the stream or broke.
    ended: bool,
}

impl Player {
    /// One side of the exchange: headers, body, trailers, as the mode has Envoy send them.
    async fn direction(
        &mut self,
        direction: Direction,
        message: &MessageSpec,
        spec: &ExchangeSpec,
    ) {
        let s = side(direction);
        let body = message.body_bytes();
        let has_trailers = !message.trailers.is_empty();
        if !self.ended && self.mode.headers[s] == Send::Send {
            let headers = HttpHeaders {
                headers: Some(header_map(&message.headers)),
                end_of_stream: body.is_empty() && !has_trailers,
                ..HttpHeaders::default()
            };
            let mut request = from_envoy(match direction {
                Direction::Request => processing_request::Request::RequestHeaders(headers),
                Direction::Response => processing_request::Request::ResponseHeaders(headers),
            });
            request.attributes = attributes(spec, direction);
            if self.first {
                request.metadata_context = metadata(spec);
                request.protocol_config = Some(ProtocolConfiguration {
                    request_body_mode: protocol::send_mode(self.mode.bodies[0]) as i32,
                    response_body_mode: protocol::send_mode(self.mode.bodies[1]) as i32,
                    send_body_without_waiting_for_header_response: false,
                });
            }
            self.send(direction.headers(), request).await;
        }
        // After an immediate response nothing more goes anywhere.
        if body.is_empty() || self.transcript.answered_instead() {
            return self.trailers(direction, message).await;
        }
        let body_mode = self.mode.bodies[s];
        let chunked = matches!(body_mode, BodyMode::Streamed | BodyMode::FullDuplexStreamed);
        let chunk_size = match (chunked, message.chunk_size) {
            (true, Some(size)) => size,
            _ => body.len(),
        };
        let chunks: Vec<&[u8]> = body.chunks(chunk_size).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            if self.ended || body_mode == BodyMode::None {
                self.transcript.passed(direction, chunk);
                continue;
            }
            let http_body = HttpBody {
                body: chunk.to_vec(),
                end_of_stream: i + 1 == chunks.len() && !has_trailers,
                ..HttpBody::default()
            };
            let request = from_envoy(match direction {
                Direction::Request => processing_request::Request::RequestBody(http_body),
                Direction::Response => processing_request::Request::ResponseBody(http_body),
            });
            self.send(direction.body(), request).await;
        }
        self.trailers(direction, message).await;
    }

    async fn trailers(&mut self, direction: Direction, message: &MessageSpec) {
        if message.trailers.is_empty()
            || self.ended
            || self.mode.trailers[side(direction)] == Send::Skip
        {
            return;
        }
        let trailers = HttpTrailers {
            trailers: Some(header_map(&message.trailers)),
        };
        let request = from_envoy(match direction {
            Direction::Request => processing_request::Request::RequestTrailers(trailers),
            Direction::Response => processing_request::Request::ResponseTrailers(trailers),
        });
        self.send(direction.trailers(), request).await;
    }

    /// Sends one message and reads its answers.
    async fn send(&mut self, phase: Phase, request: ProcessingRequest) {
        self.first = false;
        let kept = request.clone();
        let accepted = match self.exchange.accept(request) {
            Ok(accepted) => accepted,
            Err(error) => {
                self.protocol_error = Some(error.to_string());
                self.transcript.messages.push((phase, Vec::new()));
                self.ended = true;
                return;
            }
        };
        let more_time = accepted.more_time.clone();
        let step = self.exchange.process(accepted).await;
        let answers: Vec<ProcessingResponse> = more_time.into_iter().chain(step.answers).collect();
        self.transcript.exchange(&kept, &answers);
        if self.transcript.answered_instead() {
            self.ended = true;
        } else if step.then == Then::Close {
            self.ended = true;
            self.closed_after = Some(phase);
        }
        for answer in &answers {
            if let Some(mode) = answer.mode_override.filter(|_| self.allow_mode_override) {
                self.mode_override(&mode);
            }
        }
    }

    /// What Envoy does with a `mode_override`: outside `FULL_DUPLEX_STREAMED` (where it is
    /// ignored), the modes it sets replace the filter's for the rest of the exchange.
    fn mode_override(&mut self, mode: &ProcessingMode) {
        if self.mode.bodies.contains(&BodyMode::FullDuplexStreamed) {
            return;
        }
        let header = |value: i32, current: Send| match HeaderSendMode::try_from(value) {
            Ok(HeaderSendMode::Send) => Send::Send,
            Ok(HeaderSendMode::Skip) => Send::Skip,
            _ => current,
        };
        self.mode.headers[1] = header(mode.response_header_mode, self.mode.headers[1]);
        self.mode.trailers[0] = header(mode.request_trailer_mode, self.mode.trailers[0]);
        self.mode.trailers[1] = header(mode.response_trailer_mode, self.mode.trailers[1]);
        self.mode.bodies = [
            convert::body_mode(mode.request_body_mode),
            convert::body_mode(mode.response_body_mode),
        ];
    }
}

/// A message from Envoy carrying `request` and nothing else.
fn from_envoy(request: processing_request::Request) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        ..ProcessingRequest::default()
    }
}

fn header_map(headers: &Headers) -> PbHeaderMap {
    PbHeaderMap {
        headers: headers
            .iter()
            .flat_map(|(name, values)| {
                values.all().iter().map(move |value| HeaderValue {
                    key: name.clone(),
                    raw_value: value.clone().into_bytes(),
                    ..HeaderValue::default()
                })
            })
            .collect(),
    }
}

/// The attributes Envoy sends with `direction`'s headers: `response.*` with the response's,
/// the rest with the request's.
fn attributes(
    spec: &ExchangeSpec,
    direction: Direction,
) -> std::collections::HashMap<String, pb::Struct> {
    let fields: BTreeMap<String, pb::Value> = spec
        .attributes
        .iter()
        .filter(|(name, _)| name.starts_with("response.") == (direction == Direction::Response))
        .map(|(name, value)| {
            (
                name.clone(),
                pb::Value {
                    kind: Some(Kind::StringValue(value.clone())),
                },
            )
        })
        .collect();
    if fields.is_empty() {
        return Default::default();
    }
    [(
        FILTER_NAME.to_string(),
        pb::Struct {
            fields: fields.into_iter().collect(),
        },
    )]
    .into_iter()
    .collect()
}

fn metadata(spec: &ExchangeSpec) -> Option<Metadata> {
    if spec.metadata.is_empty() {
        return None;
    }
    Some(Metadata {
        filter_metadata: spec
            .metadata
            .iter()
            .map(|(namespace, fields)| {
                (
                    namespace.clone(),
                    pb::Struct {
                        fields: fields
                            .iter()
                            .map(|(key, value)| (key.clone(), to_value(value)))
                            .collect(),
                    },
                )
            })
            .collect(),
        ..Metadata::default()
    })
}

fn to_value(value: &serde_json::Value) -> pb::Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(values) => Kind::ListValue(pb::ListValue {
            values: values.iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(fields) => Kind::StructValue(pb::Struct {
            fields: fields
                .iter()
                .map(|(key, value)| (key.clone(), to_value(value)))
                .collect(),
        }),
    };
    pb::Value { kind: Some(kind) }
}
