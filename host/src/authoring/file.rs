//! The exchange file: HTTP exchanges written down as Envoy's ext_proc filter would send them,
//! and what must come out. YAML, validated strictly: an unknown key or a bad value is an error
//! naming the file, the line and the field. The format is documented in plugins/README.md.
//!
//! ```yaml
//! envoy:                                  # Envoy's filter settings; these are its defaults
//!   processing_mode: { request_body_mode: NONE, response_body_mode: NONE }
//! exchanges:
//!   - name: tags both ways
//!     request:
//!       headers: { ":method": GET, ":path": /headers, ":authority": httpbin }
//!     response:
//!       headers: { ":status": "200" }
//!     expect:
//!       request_headers: { set: { x-ext-proc-header: hello-to-asm } }
//!       response_headers: { set: { x-ext-proc-header: hello-from-asm } }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::http::{BodyMode, Direction};

/// A file of exchanges.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeFile {
    /// Envoy's filter settings for every exchange in the file, unless one says otherwise.
    #[serde(default)]
    pub envoy: EnvoyFilter,
    pub exchanges: Vec<ExchangeSpec>,
}

/// The parts of Envoy's `ExternalProcessor` filter settings that shape what it sends.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyFilter {
    #[serde(default)]
    pub processing_mode: ModeSpec,
    /// Envoy applies the `mode_override` the host sends with a headers answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_mode_override: Option<bool>,
}

impl EnvoyFilter {
    /// These settings, with `over`'s where it has them.
    pub fn overlaid(&self, over: Option<&EnvoyFilter>) -> EnvoyFilter {
        let Some(over) = over else {
            return self.clone();
        };
        let (a, b) = (&self.processing_mode, &over.processing_mode);
        EnvoyFilter {
            processing_mode: ModeSpec {
                request_header_mode: b.request_header_mode.or(a.request_header_mode),
                response_header_mode: b.response_header_mode.or(a.response_header_mode),
                request_body_mode: b.request_body_mode.or(a.request_body_mode),
                response_body_mode: b.response_body_mode.or(a.response_body_mode),
                request_trailer_mode: b.request_trailer_mode.or(a.request_trailer_mode),
                response_trailer_mode: b.response_trailer_mode.or(a.response_trailer_mode),
            },
            allow_mode_override: over.allow_mode_override.or(self.allow_mode_override),
        }
    }

    /// The processing mode, Envoy's defaults where unset.
    pub fn mode(&self) -> Mode {
        let m = &self.processing_mode;
        Mode {
            headers: [
                m.request_header_mode.unwrap_or(Send::Send),
                m.response_header_mode.unwrap_or(Send::Send),
            ],
            bodies: [
                m.request_body_mode.unwrap_or_default(),
                m.response_body_mode.unwrap_or_default(),
            ],
            trailers: [
                m.request_trailer_mode.unwrap_or(Send::Skip),
                m.response_trailer_mode.unwrap_or(Send::Skip),
            ],
        }
    }
}

/// `processing_mode` as written: unset fields take the file's, then Envoy's defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModeSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_header_mode: Option<Send>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_header_mode: Option<Send>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body_mode: Option<BodyMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body_mode: Option<BodyMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_trailer_mode: Option<Send>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_trailer_mode: Option<Send>,
}

/// A processing mode, whole: per direction (request, response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub headers: [Send; 2],
    pub bodies: [BodyMode; 2],
    pub trailers: [Send; 2],
}

/// Index of `direction` in a [`Mode`]'s pairs.
pub fn side(direction: Direction) -> usize {
    usize::from(direction == Direction::Response)
}

/// `SEND` or `SKIP`, for headers and trailers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Send {
    Send,
    Skip,
}

/// One HTTP exchange: what the client sent, what the upstream answered, and what must come
/// out of the plugins (`E`: an [`Expect`] read from a file, or, in a recording, what came out).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSpec<E = Expect> {
    pub name: String,
    /// The chain Envoy's route names (`x-wasm-extproc-chain`); else the route's, or the
    /// default chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// Envoy's filter settings for this exchange, over the file's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envoy: Option<EnvoyFilter>,
    /// Attributes Envoy sends (`request_attributes`, `response_attributes`), as text: with the
    /// request's headers for names starting `request.`, `source.`, `destination.`,
    /// `connection.`, `xds.`; with the response's for the rest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Forwarded metadata (`metadata_options`): namespace, then key, then any value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    pub request: MessageSpec,
    /// What the upstream answers; without it the exchange ends after the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<MessageSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<E>,
}

/// Headers, a body and trailers, as one side of the exchange sent them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSpec {
    pub headers: Headers,
    /// The body as text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The body as base64, for bytes that are not text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    /// The body from a file, relative to the exchange file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_file: Option<PathBuf>,
    /// In `STREAMED` and `FULL_DUPLEX_STREAMED` modes, Envoy sends the body in chunks of this
    /// many bytes (the last may be shorter); else in one chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<usize>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trailers: Headers,
}

/// Header names and values; a list of values repeats the header.
pub type Headers = BTreeMap<String, Values>;

/// One header value, or several.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Values {
    One(String),
    Many(Vec<String>),
}

impl Values {
    pub fn all(&self) -> &[String] {
        match self {
            Values::One(value) => std::slice::from_ref(value),
            Values::Many(values) => values,
        }
    }
}

/// What must come out of an exchange. Only what is written is compared, and each field
/// written is compared whole: `set: {a: "1"}` fails if a plugin also sets `b`. A failure
/// or an immediate response nobody expected fails the exchange whatever else is written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub request_headers: Option<HeaderExpect>,
    pub request_body: Option<BodyExpect>,
    pub request_trailers: Option<HeaderExpect>,
    pub response_headers: Option<HeaderExpect>,
    pub response_body: Option<BodyExpect>,
    pub response_trailers: Option<HeaderExpect>,
    pub immediate_response: Option<ImmediateExpect>,
    /// Dynamic metadata the answers carry, merged: namespace, then key, then value.
    pub dynamic_metadata: Option<BTreeMap<String, BTreeMap<String, serde_json::Value>>>,
    /// Plugins that fail, and how (`trap`, `timeout`, `memory`, `invalid-output`, ...): the
    /// kinds the metrics and logs name.
    #[serde(default)]
    pub failures: BTreeMap<String, String>,
}

/// A header (or trailer) mutation, as the answers carry it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderExpect {
    /// Headers set (replacing any value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<Headers>,
    /// Headers appended to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub append: Option<Headers>,
    /// Headers removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove: Option<Vec<String>>,
}

/// The body that goes on, after the plugins: to the upstream (request) or the client
/// (response).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyExpect {
    pub body: Option<String>,
    pub body_base64: Option<String>,
}

/// The answer a plugin gave instead of the upstream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImmediateExpect {
    pub status: Option<u16>,
    /// Headers set on the answer.
    pub headers: Option<Headers>,
    pub body: Option<String>,
    /// Envoy's `%RESPONSE_CODE_DETAILS%` for it.
    pub details: Option<String>,
}

/// A file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct FileError {
    pub file: PathBuf,
    pub message: String,
}

impl ExchangeFile {
    /// Reads and validates `path`; bodies from files are read too, so that every error shows
    /// before anything runs.
    pub fn load(path: &Path) -> Result<ExchangeFile, FileError> {
        let error = |message: String| FileError {
            file: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let mut file: ExchangeFile = serde_yaml_ng::from_str(&text).map_err(|e| {
            error(match e.location() {
                // serde_yaml names the field path in its message and ends with the place.
                Some(place) => format!(
                    "line {}, column {}: {}",
                    place.line(),
                    place.column(),
                    strip_place(&e.to_string())
                ),
                None => e.to_string(),
            })
        })?;
        if file.exchanges.is_empty() {
            return Err(error("exchanges: the file has none".into()));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for (i, exchange) in file.exchanges.iter_mut().enumerate() {
            let at = |field: &str| format!("exchanges[{i}] ({:?}).{field}", exchange.name);
            exchange
                .request
                .resolve(dir)
                .map_err(|e| error(format!("{}: {e}", at("request"))))?;
            if let Some(response) = &mut exchange.response {
                response
                    .resolve(dir)
                    .map_err(|e| error(format!("{}: {e}", at("response"))))?;
            }
            if let Some(expect) = &exchange.expect {
                for (field, body) in [
                    ("request_body", &expect.request_body),
                    ("response_body", &expect.response_body),
                ] {
                    if let Some(body) = body {
                        body.bytes().map_err(|e| {
                            error(format!("{}: {e}", at(&format!("expect.{field}"))))
                        })?;
                    }
                }
            }
        }
        Ok(file)
    }
}

/// serde_yaml's message without its trailing " at line L column C".
fn strip_place(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |end| &message[..end])
}

impl MessageSpec {
    /// Reads `body_file` into `body_base64`'s place and checks that at most one body is given.
    fn resolve(&mut self, dir: &Path) -> Result<(), String> {
        let given = [
            self.body.is_some(),
            self.body_base64.is_some(),
            self.body_file.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err("give one of body, body_base64 and body_file".into());
        }
        if let Some(path) = self.body_file.take() {
            let path = dir.join(path);
            let bytes =
                std::fs::read(&path).map_err(|e| format!("body_file {}: {e}", path.display()))?;
            self.body_base64 = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        if let Some(encoded) = &self.body_base64 {
            decode(encoded).map_err(|e| format!("body_base64: {e}"))?;
        }
        if self.chunk_size == Some(0) {
            return Err("chunk_size: must be at least 1".into());
        }
        Ok(())
    }

    /// The body's bytes (checked by [`ExchangeFile::load`]).
    pub fn body_bytes(&self) -> Vec<u8> {
        match (&self.body, &self.body_base64) {
            (Some(text), _) => text.clone().into_bytes(),
            (None, Some(encoded)) => decode(encoded).unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }
}

impl BodyExpect {
    /// The expected bytes, if a body is given.
    pub fn bytes(&self) -> Result<Option<Vec<u8>>, String> {
        match (&self.body, &self.body_base64) {
            (Some(_), Some(_)) => Err("give one of body and body_base64".into()),
            (Some(text), None) => Ok(Some(text.clone().into_bytes())),
            (None, Some(encoded)) => decode(encoded)
                .map(Some)
                .map_err(|e| format!("body_base64: {e}")),
            (None, None) => Ok(None),
        }
    }
}

fn decode(encoded: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(encoded.trim())
}
