//! Plays one exchange from a file to an [`Exchange`] -- the state machine the gRPC service
//! drives -- as Envoy's ext_proc filter would send it, and gathers what Envoy would receive:
//! message by message in the filter's processing mode, with its attributes, metadata and
//! protocol configuration on the first message; stopping where Envoy stops (an immediate
//! response, the host closing the stream, a protocol error); applying a `mode_override` where
//! Envoy would.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap as PbHeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::HeaderSendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HttpBody, HttpHeaders, HttpTrailers,
    ProcessingRequest, ProcessingResponse, ProtocolConfiguration, body_mutation,
    processing_request, processing_response,
};
use envoy_types::pb::google::protobuf::{self as pb, value::Kind};
use serde::Serialize;

use super::file::{
    EnvoyFilter, ExchangeSpec, HeaderExpect, Headers, MessageSpec, Mode, Send, Values, side,
};
use crate::ext_proc::exchange::{Exchange, Then};
use crate::ext_proc::{convert, protocol};
use crate::http::{BodyMode, Direction, Phase};
use crate::metrics::{Metrics, OUTCOMES};
use crate::registry::Generation;

/// The filter's name, under which Envoy sends attributes.
const FILTER_NAME: &str = "envoy.filters.http.ext_proc";

/// What came out of an exchange, in the shape of the file's `expect:` (so that it can be
/// pasted there).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Output {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderExpect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<BodyOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_trailers: Option<HeaderExpect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderExpect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body: Option<BodyOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_trailers: Option<HeaderExpect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub immediate_response: Option<ImmediateOut>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dynamic_metadata: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, String>,
}

/// A body that goes on: text where it is UTF-8, else base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BodyOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl BodyOut {
    pub fn new(bytes: Vec<u8>) -> BodyOut {
        use base64::Engine as _;
        match String::from_utf8(bytes) {
            Ok(text) => BodyOut {
                body: Some(text),
                body_base64: None,
            },
            Err(e) => BodyOut {
                body: None,
                body_base64: Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
            },
        }
    }
}

/// An immediate response, as Envoy would send it to the client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImmediateOut {
    pub status: u16,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: Headers,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub body: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

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
        played: Played::default(),
        ended: false,
    };
    player.played.chain = player.exchange.chain_name().to_string();
    for direction in Direction::BOTH {
        let message = match direction {
            Direction::Request => Some(&spec.request),
            Direction::Response => spec.response.as_ref(),
        };
        let Some(message) = message else { break };
        player.direction(direction, message, spec).await;
        if player.ended && player.played.output.immediate_response.is_some() {
            break;
        }
    }
    player.played.chain = player.exchange.chain_name().to_string();
    let after = failure_counts(generation, metrics);
    for ((chain, plugin, outcome), count) in after {
        if count
            > before
                .get(&(chain.clone(), plugin.clone(), outcome))
                .copied()
                .unwrap_or(0)
            && chain == player.played.chain
        {
            player
                .played
                .output
                .failures
                .insert(plugin, outcome.to_string());
        }
    }
    player.played
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
    played: Played,
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
        let (mut headers_out, mut body_out) = (HeaderExpect::default(), None::<Vec<u8>>);
        let mut trailers_out = None;
        if !self.ended && self.mode.headers[s] == Send::Send {
            let headers = HttpHeaders {
                headers: Some(header_map(&message.headers)),
                end_of_stream: body.is_empty() && !has_trailers,
                ..HttpHeaders::default()
            };
            let mut request = ProcessingRequest {
                request: Some(match direction {
                    Direction::Request => processing_request::Request::RequestHeaders(headers),
                    Direction::Response => processing_request::Request::ResponseHeaders(headers),
                }),
                attributes: attributes(spec, direction),
                ..ProcessingRequest::default()
            };
            if self.first {
                request.metadata_context = metadata(spec);
                request.protocol_config = Some(ProtocolConfiguration {
                    request_body_mode: protocol::send_mode(self.mode.bodies[0]) as i32,
                    response_body_mode: protocol::send_mode(self.mode.bodies[1]) as i32,
                    send_body_without_waiting_for_header_response: false,
                });
            }
            for answer in self.send(direction.headers(), request).await {
                self.absorb(&answer, &mut headers_out, &mut body_out, &mut trailers_out);
            }
        }
        let body_mode = self.mode.bodies[s];
        // After an immediate response nothing more goes anywhere.
        let answered_instead = self.played.output.immediate_response.is_some();
        if !body.is_empty() && !answered_instead {
            let mut forwarded = Vec::new();
            let chunked = matches!(body_mode, BodyMode::Streamed | BodyMode::FullDuplexStreamed);
            let chunk_size = match (chunked, message.chunk_size) {
                (true, Some(size)) => size,
                _ => body.len(),
            };
            let chunks: Vec<&[u8]> = body.chunks(chunk_size).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                if self.ended || body_mode == BodyMode::None {
                    forwarded.extend_from_slice(chunk);
                    continue;
                }
                let http_body = HttpBody {
                    body: chunk.to_vec(),
                    end_of_stream: i + 1 == chunks.len() && !has_trailers,
                    ..HttpBody::default()
                };
                let request = ProcessingRequest {
                    request: Some(match direction {
                        Direction::Request => processing_request::Request::RequestBody(http_body),
                        Direction::Response => processing_request::Request::ResponseBody(http_body),
                    }),
                    ..ProcessingRequest::default()
                };
                let mut answered = None;
                for answer in self.send(direction.body(), request).await {
                    self.absorb(&answer, &mut headers_out, &mut answered, &mut trailers_out);
                }
                match answered {
                    Some(replaced) => forwarded.extend(replaced),
                    // In FULL_DUPLEX_STREAMED mode only what the host sends back goes on.
                    None if body_mode == BodyMode::FullDuplexStreamed && !self.ended => {}
                    None => forwarded.extend_from_slice(chunk),
                }
            }
            body_out = Some(body_out.unwrap_or_default());
            body_out.as_mut().expect("set").extend(forwarded);
        }
        if has_trailers && !self.ended && self.mode.trailers[s] == Send::Send {
            let trailers = HttpTrailers {
                trailers: Some(header_map(&message.trailers)),
            };
            let request = ProcessingRequest {
                request: Some(match direction {
                    Direction::Request => processing_request::Request::RequestTrailers(trailers),
                    Direction::Response => processing_request::Request::ResponseTrailers(trailers),
                }),
                ..ProcessingRequest::default()
            };
            let mut flushed = None;
            for answer in self.send(direction.trailers(), request).await {
                self.absorb(&answer, &mut headers_out, &mut flushed, &mut trailers_out);
            }
            if let (Some(flushed), Some(body)) = (flushed, body_out.as_mut()) {
                body.extend(flushed);
            }
        }
        let output = &mut self.played.output;
        let headers_answered = self
            .played
            .messages
            .iter()
            .any(|(_, answers)| answers.iter().any(|a| a == direction.headers().as_str()));
        let (headers_slot, body_slot, trailers_slot) = match direction {
            Direction::Request => (
                &mut output.request_headers,
                &mut output.request_body,
                &mut output.request_trailers,
            ),
            Direction::Response => (
                &mut output.response_headers,
                &mut output.response_body,
                &mut output.response_trailers,
            ),
        };
        if headers_answered || headers_out != HeaderExpect::default() {
            *headers_slot = Some(headers_out);
        }
        *body_slot = body_out.map(BodyOut::new);
        *trailers_slot = trailers_out;
    }

    /// Sends one message; returns its answers (none once the exchange ended).
    async fn send(&mut self, phase: Phase, request: ProcessingRequest) -> Vec<ProcessingResponse> {
        self.first = false;
        let accepted = match self.exchange.accept(request) {
            Ok(accepted) => accepted,
            Err(error) => {
                self.played.protocol_error = Some(error.to_string());
                self.played.messages.push((phase, Vec::new()));
                self.ended = true;
                return Vec::new();
            }
        };
        let ahead = accepted.ahead.clone();
        let step = self.exchange.process(accepted).await;
        let answers: Vec<ProcessingResponse> = ahead.into_iter().chain(step.answers).collect();
        self.played
            .messages
            .push((phase, answers.iter().map(answer_phase).collect()));
        if step.then == Then::Close {
            self.ended = true;
            if self.played.output.immediate_response.is_none() && !answers.iter().any(is_immediate)
            {
                self.played.closed_after = Some(phase);
            }
        }
        for answer in &answers {
            if let Some(mode) = answer.mode_override.filter(|_| self.allow_mode_override) {
                self.mode_override(&mode);
            }
        }
        answers
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

    /// Records what one answer changes: header mutations (a body answer's go to the
    /// direction's headers, as Envoy applies them), the body that goes on, trailers, an
    /// immediate response, dynamic metadata.
    fn absorb(
        &mut self,
        answer: &ProcessingResponse,
        headers: &mut HeaderExpect,
        body: &mut Option<Vec<u8>>,
        trailers: &mut Option<HeaderExpect>,
    ) {
        use processing_response::Response;
        if let Some(metadata) = &answer.dynamic_metadata {
            for (namespace, value) in &metadata.fields {
                if let Some(Kind::StructValue(fields)) = &value.kind {
                    let entry = self
                        .played
                        .output
                        .dynamic_metadata
                        .entry(namespace.clone())
                        .or_default();
                    for (key, value) in &fields.fields {
                        entry.insert(key.clone(), convert::json(value));
                    }
                }
            }
        }
        let common = |common: &Option<CommonResponse>, headers: &mut HeaderExpect| {
            let Some(common) = common else { return None };
            mutation(common.header_mutation.as_ref(), headers);
            match common
                .body_mutation
                .as_ref()
                .and_then(|m| m.mutation.as_ref())
            {
                Some(body_mutation::Mutation::Body(data)) => Some(data.clone()),
                Some(body_mutation::Mutation::ClearBody(true)) => Some(Vec::new()),
                Some(body_mutation::Mutation::StreamedResponse(streamed)) => {
                    Some(streamed.body.clone())
                }
                _ => None,
            }
        };
        match &answer.response {
            Some(Response::RequestHeaders(h) | Response::ResponseHeaders(h)) => {
                if let Some(replaced) = common(&h.response, headers) {
                    *body = Some(replaced);
                }
            }
            Some(
                Response::RequestBody(BodyResponse { response })
                | Response::ResponseBody(BodyResponse { response }),
            ) => {
                if let Some(replaced) = common(response, headers) {
                    body.get_or_insert_with(Vec::new).extend(replaced);
                }
            }
            Some(Response::RequestTrailers(t) | Response::ResponseTrailers(t)) => {
                let out = trailers.get_or_insert_with(HeaderExpect::default);
                mutation(t.header_mutation.as_ref(), out);
            }
            Some(Response::ImmediateResponse(immediate)) => {
                let mut headers = HeaderExpect::default();
                mutation(immediate.headers.as_ref(), &mut headers);
                self.played.output.immediate_response = Some(ImmediateOut {
                    status: immediate
                        .status
                        .as_ref()
                        .map_or(200, |s| u16::try_from(s.code).unwrap_or(0)),
                    // Every header on the answer, however the host asked Envoy to add it.
                    headers: headers
                        .set
                        .into_iter()
                        .chain(headers.append)
                        .flatten()
                        .collect(),
                    body: String::from_utf8_lossy(&immediate.body).into_owned(),
                    details: immediate.details.clone(),
                });
                self.ended = true;
            }
            // The host never streams an immediate response.
            Some(Response::StreamedImmediateResponse(_)) | None => {}
        }
    }
}

/// Adds a header mutation to `out`: overwrites to `set`, appends to `append`, removals.
fn mutation(mutation: Option<&HeaderMutation>, out: &mut HeaderExpect) {
    let Some(mutation) = mutation else { return };
    for option in &mutation.set_headers {
        let Some(header) = &option.header else {
            continue;
        };
        let value = if header.raw_value.is_empty() {
            header.value.clone()
        } else {
            String::from_utf8_lossy(&header.raw_value).into_owned()
        };
        let into = if option.append_action == HeaderAppendAction::AppendIfExistsOrAdd as i32 {
            out.append.get_or_insert_with(Headers::new)
        } else {
            out.set.get_or_insert_with(Headers::new)
        };
        into.entry(header.key.clone())
            .and_modify(|values| {
                let mut all = values.all().to_vec();
                all.push(value.clone());
                *values = Values::Many(all);
            })
            .or_insert(Values::One(value));
    }
    if !mutation.remove_headers.is_empty() {
        out.remove
            .get_or_insert_with(Vec::new)
            .extend(mutation.remove_headers.iter().cloned());
    }
}

fn answer_phase(answer: &ProcessingResponse) -> String {
    use processing_response::Response;
    match &answer.response {
        Some(Response::RequestHeaders(_)) => "request_headers",
        Some(Response::ResponseHeaders(_)) => "response_headers",
        Some(Response::RequestBody(_)) => "request_body",
        Some(Response::ResponseBody(_)) => "response_body",
        Some(Response::RequestTrailers(_)) => "request_trailers",
        Some(Response::ResponseTrailers(_)) => "response_trailers",
        Some(Response::ImmediateResponse(_)) => "immediate_response",
        Some(Response::StreamedImmediateResponse(_)) => "streamed_immediate_response",
        None => "empty",
    }
    .to_string()
}

fn is_immediate(answer: &ProcessingResponse) -> bool {
    matches!(
        answer.response,
        Some(processing_response::Response::ImmediateResponse(_))
    )
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
