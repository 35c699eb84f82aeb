//! One exchange as Envoy saw it: each message it sent and the answers it got, read into what
//! came out ([`Output`], in the shape of an exchange file's `expect:`) and, when recording,
//! into the exchange itself as a file describes it. `wasm-extproc test` reads the exchanges it
//! plays this way, and the server the live ones it records: one reading of the answers for
//! both.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap as PbHeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, ProcessingRequest, ProcessingResponse,
    body_mutation, processing_request, processing_response,
};
use envoy_types::pb::google::protobuf::value::Kind;
use serde::Serialize;

use super::file::{
    EnvoyFilter, ExchangeSpec, HeaderExpect, Headers, MessageSpec, ModeSpec, Values, side,
};
use crate::ext_proc::convert;
use crate::http::{BodyMode, Direction, Phase};

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

/// Messages and answers, as they come.
#[derive(Debug, Default)]
pub struct Transcript {
    output: Output,
    headers: [HeaderExpect; 2],
    headers_answered: [bool; 2],
    /// What went on of each body, as the answers made it.
    bodies_out: [Option<Vec<u8>>; 2],
    trailers: [Option<HeaderExpect>; 2],
    /// Per direction: Envoy streams the body `FULL_DUPLEX_STREAMED`, so only what the host
    /// sends back goes on.
    full_duplex: [bool; 2],
    /// Each message's phase and its answers' phases.
    pub messages: Vec<(Phase, Vec<String>)>,
    /// What Envoy sent, when recording.
    sent: Option<Sent>,
    /// What of the bodies is kept.
    bodies: Bodies,
    /// Body bytes kept so far, sent and produced.
    body_bytes: u64,
    /// The bodies outgrew [`Bodies::UpTo`]: they were let go, and the exchange is not recorded.
    too_large: bool,
}

/// How much of an exchange's bodies a transcript keeps. A recording keeps none unless asked,
/// and never more than its file may hold: bounded as they arrive, not when written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Bodies {
    /// Every byte (`wasm-extproc test`, whose exchanges are the author's own).
    #[default]
    All,
    /// None: only that there were bodies, and their chunking.
    Never,
    /// At most this many bytes, sent and produced together.
    UpTo(u64),
}

/// What Envoy sent of one exchange.
#[derive(Debug, Default)]
struct Sent {
    attributes: BTreeMap<String, String>,
    metadata: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    body_modes: Option<[BodyMode; 2]>,
    sides: [Option<SentSide>; 2],
}

#[derive(Debug, Default)]
struct SentSide {
    headers: Headers,
    body: Vec<u8>,
    first_chunk: Option<usize>,
    chunks: usize,
    trailers: Headers,
}

/// How a recording writes exchanges down.
#[derive(Debug, Clone, Default)]
pub struct Redaction {
    /// Header (and trailer) names whose values are replaced, lowercase.
    pub headers: Vec<String>,
    /// Attribute names whose values are replaced.
    pub attributes: Vec<String>,
    /// Metadata whose values are replaced: `NAMESPACE` (all of it) or `NAMESPACE:KEY`.
    pub metadata: Vec<String>,
    /// Keep bodies (else they are left out, and so are the body phases' expectations).
    pub bodies: bool,
}

/// What a recording puts in place of a redacted value.
pub const REDACTED: &str = "[redacted]";

impl Transcript {
    /// A transcript that also keeps what Envoy sent, for [`Transcript::recorded`], and of the
    /// bodies what `bodies` says.
    pub fn recording(bodies: Bodies) -> Transcript {
        Transcript {
            sent: Some(Sent::default()),
            bodies,
            ..Transcript::default()
        }
    }

    /// Keeps what `bodies` says of the bodies from now on.
    pub fn keep_bodies(&mut self, bodies: Bodies) {
        self.bodies = bodies;
    }

    /// Whether the transcript keeps any body bytes.
    pub fn keeps_bodies(&self) -> bool {
        self.bodies != Bodies::Never && !self.too_large
    }

    /// Whether the bodies outgrew what the recording keeps, so the exchange is not recorded.
    pub fn too_large(&self) -> bool {
        self.too_large
    }

    /// Whether `len` more body bytes are kept; past [`Bodies::UpTo`], every body is let go.
    fn keeps(&mut self, len: usize) -> bool {
        let limit = match self.bodies {
            Bodies::All => return true,
            Bodies::Never => return false,
            Bodies::UpTo(limit) => limit,
        };
        if self.too_large {
            return false;
        }
        self.body_bytes += len as u64;
        if self.body_bytes <= limit {
            return true;
        }
        self.too_large = true;
        self.bodies_out = [None, None];
        if let Some(sent) = &mut self.sent {
            for side in sent.sides.iter_mut().flatten() {
                side.body = Vec::new();
            }
        }
        false
    }

    /// One message Envoy sent, and the answers it got.
    pub fn exchange(&mut self, request: &ProcessingRequest, answers: &[ProcessingResponse]) {
        use processing_request::Request;
        if let Some(config) = &request.protocol_config {
            let modes = [
                convert::body_mode(config.request_body_mode),
                convert::body_mode(config.response_body_mode),
            ];
            self.full_duplex = modes.map(|m| m == BodyMode::FullDuplexStreamed);
            if let Some(sent) = &mut self.sent {
                sent.body_modes = Some(modes);
            }
        }
        let (phase, chunk) = match &request.request {
            Some(Request::RequestHeaders(_)) => (Phase::RequestHeaders, None),
            Some(Request::ResponseHeaders(_)) => (Phase::ResponseHeaders, None),
            Some(Request::RequestBody(b)) => (Phase::RequestBody, Some(&b.body)),
            Some(Request::ResponseBody(b)) => (Phase::ResponseBody, Some(&b.body)),
            Some(Request::RequestTrailers(_)) => (Phase::RequestTrailers, None),
            Some(Request::ResponseTrailers(_)) => (Phase::ResponseTrailers, None),
            None => return,
        };
        self.keep(request, phase);
        self.messages
            .push((phase, answers.iter().map(answer_phase).collect()));
        let s = side(phase.direction());
        // A recording without bodies replays without them: no body message is sent, so what
        // the body phases answered -- a header change such as the new `content-length`, an
        // immediate response, dynamic metadata -- is no part of what the replay must give.
        let recorded_without_bodies = self.sent.is_some() && self.bodies == Bodies::Never;
        if recorded_without_bodies && phase == phase.direction().body() {
            return;
        }
        let mut replaced = None;
        for answer in answers {
            self.answer(answer, &mut replaced);
        }
        let went_on = match (phase == phase.direction().body(), replaced) {
            (true, Some(replaced)) => Some(replaced),
            (true, None) if !self.full_duplex[s] => chunk.cloned(),
            // A headers answer that replaces the body (CONTINUE_AND_REPLACE).
            (false, Some(replaced)) if phase == phase.direction().headers() => {
                self.bodies_out[s] = None;
                Some(replaced)
            }
            // Body held back for trailers, let go with their answer.
            (false, Some(replaced)) => Some(replaced),
            _ => None,
        };
        if let Some(bytes) = went_on {
            self.went_on(s, &bytes);
        }
    }

    /// Adds `bytes` to what went on of side `s`'s body, if the transcript keeps it.
    fn went_on(&mut self, s: usize, bytes: &[u8]) {
        if self.keeps(bytes.len()) {
            self.bodies_out[s]
                .get_or_insert_with(Vec::new)
                .extend_from_slice(bytes);
        }
    }

    /// A body chunk Envoy forwarded without the host (which closed the stream, or asked for
    /// no body).
    pub fn passed(&mut self, direction: Direction, chunk: &[u8]) {
        self.went_on(side(direction), chunk);
    }

    /// `METHOD PATH` of the request as Envoy sent it, when recording.
    pub fn summary(&self) -> String {
        let headers = self
            .sent
            .as_ref()
            .and_then(|sent| sent.sides[0].as_ref())
            .map(|side| &side.headers);
        let get = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .and_then(|v| v.all().first().cloned())
                .unwrap_or_default()
        };
        format!("{} {}", get(":method"), get(":path"))
    }

    /// Whether an answer stopped the exchange with an immediate response.
    pub fn answered_instead(&self) -> bool {
        self.output.immediate_response.is_some()
    }

    /// What came out.
    pub fn output(&self) -> Output {
        let mut output = self.output.clone();
        for direction in Direction::BOTH {
            let s = side(direction);
            let headers = (self.headers_answered[s] || self.headers[s] != HeaderExpect::default())
                .then(|| self.headers[s].clone());
            let body = self.bodies_out[s].clone().map(BodyOut::new);
            let trailers = self.trailers[s].clone();
            match direction {
                Direction::Request => {
                    (
                        output.request_headers,
                        output.request_body,
                        output.request_trailers,
                    ) = (headers, body, trailers);
                }
                Direction::Response => {
                    (
                        output.response_headers,
                        output.response_body,
                        output.response_trailers,
                    ) = (headers, body, trailers);
                }
            }
        }
        output
    }

    /// The exchange as a file describes it, with what came out as its `expect:`; `None`
    /// unless recording, or if Envoy sent no request headers.
    pub fn recorded(
        &self,
        name: String,
        chain: &str,
        redaction: &Redaction,
    ) -> Option<ExchangeSpec<Output>> {
        if self.too_large {
            return None;
        }
        let sent = self.sent.as_ref()?;
        let message = |side: &Option<SentSide>| {
            side.as_ref().map(|side| MessageSpec {
                headers: redact(&side.headers, redaction),
                body: None,
                body_base64: None,
                body_file: None,
                chunk_size: (side.chunks > 1).then_some(side.first_chunk).flatten(),
                trailers: redact(&side.trailers, redaction),
            })
        };
        let mut request = message(&sent.sides[0])?;
        let mut response = message(&sent.sides[1]);
        let mut expect = self.output();
        if redaction.bodies {
            for (spec, side) in [
                (Some(&mut request), &sent.sides[0]),
                (response.as_mut(), &sent.sides[1]),
            ] {
                if let (Some(spec), Some(side)) = (spec, side) {
                    let body = BodyOut::new(side.body.clone());
                    (spec.body, spec.body_base64) = (body.body, body.body_base64);
                }
            }
        } else {
            (expect.request_body, expect.response_body) = (None, None);
        }
        for headers in [
            &mut expect.request_headers,
            &mut expect.response_headers,
            &mut expect.request_trailers,
            &mut expect.response_trailers,
        ]
        .into_iter()
        .flatten()
        {
            for values in [&mut headers.set, &mut headers.append]
                .into_iter()
                .flatten()
            {
                *values = redact(values, redaction);
            }
        }
        if let Some(immediate) = &mut expect.immediate_response {
            immediate.headers = redact(&immediate.headers, redaction);
        }
        let envoy = sent
            .body_modes
            .map(|[request_body, response_body]| EnvoyFilter {
                processing_mode: ModeSpec {
                    request_body_mode: Some(request_body),
                    response_body_mode: Some(response_body),
                    ..ModeSpec::default()
                },
                allow_mode_override: None,
            });
        Some(ExchangeSpec {
            name,
            chain: Some(chain.to_string()),
            envoy,
            attributes: sent
                .attributes
                .iter()
                .map(|(name, value)| {
                    let redacted = redaction.attributes.iter().any(|r| r == name);
                    let value = if redacted {
                        REDACTED.into()
                    } else {
                        value.clone()
                    };
                    (name.clone(), value)
                })
                .collect(),
            metadata: sent
                .metadata
                .iter()
                .map(|(namespace, entries)| {
                    let entries = entries
                        .iter()
                        .map(|(key, value)| {
                            let redacted = redaction.metadata.iter().any(|r| {
                                r == namespace
                                    || r.split_once(':') == Some((namespace.as_str(), key.as_str()))
                            });
                            let value = if redacted {
                                serde_json::Value::from(REDACTED)
                            } else {
                                value.clone()
                            };
                            (key.clone(), value)
                        })
                        .collect();
                    (namespace.clone(), entries)
                })
                .collect(),
            request,
            response,
            expect: Some(expect),
        })
    }

    /// Keeps what Envoy sent in `request`, of `phase`, when recording.
    fn keep(&mut self, request: &ProcessingRequest, phase: Phase) {
        use processing_request::Request;
        let Some(sent) = &mut self.sent else { return };
        for fields in request.attributes.values() {
            for (name, value) in &fields.fields {
                sent.attributes.insert(name.clone(), convert::text(value));
            }
        }
        if let Some(metadata) = &request.metadata_context {
            for (namespace, fields) in &metadata.filter_metadata {
                let entry = sent.metadata.entry(namespace.clone()).or_default();
                for (key, value) in &fields.fields {
                    entry.insert(key.clone(), convert::json(value));
                }
            }
        }
        let s = side(phase.direction());
        let kept = sent.sides[s].get_or_insert_with(SentSide::default);
        match &request.request {
            Some(Request::RequestHeaders(h) | Request::ResponseHeaders(h)) => {
                kept.headers = headers(h.headers.as_ref());
            }
            Some(Request::RequestBody(b) | Request::ResponseBody(b)) => {
                if !b.body.is_empty() {
                    kept.first_chunk.get_or_insert(b.body.len());
                }
                kept.chunks += 1;
                if self.keeps(b.body.len()) {
                    let kept = self.sent.as_mut().and_then(|sent| sent.sides[s].as_mut());
                    kept.expect("kept above").body.extend_from_slice(&b.body);
                }
            }
            Some(Request::RequestTrailers(t) | Request::ResponseTrailers(t)) => {
                kept.trailers = headers(t.trailers.as_ref());
            }
            None => {}
        }
    }

    /// Reads one answer: header mutations (a body answer's go to the direction's headers, as
    /// Envoy applies them), a replaced body into `replaced`, trailers, an immediate response,
    /// dynamic metadata.
    fn answer(&mut self, answer: &ProcessingResponse, replaced: &mut Option<Vec<u8>>) {
        use processing_response::Response;
        if let Some(metadata) = &answer.dynamic_metadata {
            for (namespace, value) in &metadata.fields {
                if let Some(Kind::StructValue(fields)) = &value.kind {
                    let entry = self
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
        let mut common = |common: &Option<CommonResponse>, direction: Direction| {
            let Some(common) = common else { return };
            mutation(
                common.header_mutation.as_ref(),
                &mut self.headers[side(direction)],
            );
            let body = match common
                .body_mutation
                .as_ref()
                .and_then(|m| m.mutation.as_ref())
            {
                Some(body_mutation::Mutation::Body(data)) => data.clone(),
                Some(body_mutation::Mutation::ClearBody(true)) => Vec::new(),
                Some(body_mutation::Mutation::StreamedResponse(streamed)) => streamed.body.clone(),
                _ => return,
            };
            replaced.get_or_insert_with(Vec::new).extend(body);
        };
        match &answer.response {
            Some(Response::RequestHeaders(h)) => {
                self.headers_answered[0] = true;
                common(&h.response, Direction::Request);
            }
            Some(Response::ResponseHeaders(h)) => {
                self.headers_answered[1] = true;
                common(&h.response, Direction::Response);
            }
            Some(Response::RequestBody(BodyResponse { response })) => {
                common(response, Direction::Request)
            }
            Some(Response::ResponseBody(BodyResponse { response })) => {
                common(response, Direction::Response)
            }
            Some(Response::RequestTrailers(t)) => {
                mutation(
                    t.header_mutation.as_ref(),
                    self.trailers[0].get_or_insert_with(HeaderExpect::default),
                );
            }
            Some(Response::ResponseTrailers(t)) => {
                mutation(
                    t.header_mutation.as_ref(),
                    self.trailers[1].get_or_insert_with(HeaderExpect::default),
                );
            }
            Some(Response::ImmediateResponse(immediate)) => {
                let mut headers = HeaderExpect::default();
                mutation(immediate.headers.as_ref(), &mut headers);
                self.output.immediate_response = Some(ImmediateOut {
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
            }
            // The host never streams an immediate response.
            Some(Response::StreamedImmediateResponse(_)) | None => {}
        }
    }
}

fn headers(map: Option<&PbHeaderMap>) -> Headers {
    let mut headers = Headers::new();
    for header in map.into_iter().flat_map(|m| &m.headers) {
        add(&mut headers, &header.key, value_of(header));
    }
    headers
}

/// A header's value as text: Envoy fills `raw_value`, older senders `value`.
fn value_of(header: &HeaderValue) -> String {
    if header.raw_value.is_empty() {
        header.value.clone()
    } else {
        String::from_utf8_lossy(&header.raw_value).into_owned()
    }
}

fn add(headers: &mut Headers, name: &str, value: String) {
    headers
        .entry(name.to_string())
        .and_modify(|values| {
            let mut all = values.all().to_vec();
            all.push(value.clone());
            *values = Values::Many(all);
        })
        .or_insert(Values::One(value));
}

/// `headers` with the values of redacted names replaced.
fn redact(headers: &Headers, redaction: &Redaction) -> Headers {
    headers
        .iter()
        .map(|(name, values)| {
            let redacted = redaction
                .headers
                .iter()
                .any(|r| r.eq_ignore_ascii_case(name));
            let values = if redacted {
                match values {
                    Values::One(_) => Values::One(REDACTED.into()),
                    Values::Many(many) => Values::Many(vec![REDACTED.into(); many.len()]),
                }
            } else {
                values.clone()
            };
            (name.clone(), values)
        })
        .collect()
}

/// Adds a header mutation to `out`: overwrites to `set`, appends to `append`, removals.
fn mutation(mutation: Option<&HeaderMutation>, out: &mut HeaderExpect) {
    let Some(mutation) = mutation else { return };
    for option in &mutation.set_headers {
        let Some(header) = &option.header else {
            continue;
        };
        let value = value_of(header);
        let into = if option.append_action == HeaderAppendAction::AppendIfExistsOrAdd as i32 {
            out.append.get_or_insert_with(Headers::new)
        } else {
            out.set.get_or_insert_with(Headers::new)
        };
        add(into, &header.key, value);
    }
    if !mutation.remove_headers.is_empty() {
        out.remove
            .get_or_insert_with(Vec::new)
            .extend(mutation.remove_headers.iter().cloned());
    }
}

/// The phase an answer answers, as the report names it.
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
