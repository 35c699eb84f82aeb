//! Redacts JSON fields in request and response bodies: every value whose key is named in the
//! configuration (comma-separated, e.g. `password,ssn`), at any depth, becomes
//! `"[REDACTED]"`. Where the headers can still change (`Body::headers`), it says how many values
//! it redacted in `x-redacted`; a client's own `x-redacted` never reaches the upstream.
//!
//! No body it cannot read gets past it:
//! - It asks the upstream for bodies it can read (`accept-encoding: identity` on the request),
//!   and reads `gzip` and `deflate` bodies all the same, redacting inside and encoding the result
//!   the way it came. A body in any other encoding (`br`, `zstd`, ...) is refused.
//! - A body that looks like JSON (after a byte-order mark and white space) or says it is JSON
//!   (`content-type`) must parse; one that does not is refused. So is one that arrives only in
//!   part (`STREAMED` chunks, a `BUFFERED_PARTIAL` body cut at Envoy's buffer limit), unless
//!   what arrived is whole JSON (a body followed by trailers).
//! - Refused means answered instead of passed on: 415 (an encoding it cannot read), 400 (not
//!   JSON) or 413 (only part of it) for a request, 502 for a response; counted by the host
//!   (`plugin_responses_total`). `on_unreadable=pass` lets such bodies through unchanged
//!   instead, with a warning in the log.
//!
//! Bodies that neither look nor say JSON pass unchanged, and so do bodies of a binary type
//! (`application/octet-stream`, `image/*`, `application/grpc`, ...) whatever they start with.
//! Whether a body is JSON is read from its first bytes: where it comes in chunks, the rest
//! follows the first.
//!
//! Configuration: `<field>,<field>,...[;on_unreadable=refuse|pass][;max_decoded_bytes=<n>]`,
//! e.g. `password,ssn`. `max_decoded_bytes` (8 MiB by default) bounds what a compressed body
//! may grow to when decoded; past it the body is unreadable.
//!
//! It asks for whole bodies: configure Envoy's ext_proc filter with `request_body_mode` and
//! `response_body_mode` `BUFFERED`, or `FULL_DUPLEX_STREAMED` with the trailer modes `SEND`
//! (the table in plugins/README.md).

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::{DeflateDecoder, GzDecoder, ZlibDecoder};
use flate2::write::{GzEncoder, ZlibEncoder};
use serde_json::Value;
use wasm_extproc_sdk::{
    Action, Body, BodyDelivery, Headers, ImmediateResponse, Phases, Plugin, config, export_plugin,
    log,
};

const REDACTED: &str = "[REDACTED]";
/// The header that tells the upstream how many values were redacted.
const COUNT_HEADER: &str = "x-redacted";
/// What a compressed body may decode to by default: as much as the host holds for a plugin
/// that takes bodies whole.
const DEFAULT_MAX_DECODED: usize = 8 << 20;
/// A body with more content-codings than this is not one a real client or server sends.
const MAX_CODINGS: usize = 2;

struct Settings {
    fields: Vec<String>,
    pass_unreadable: bool,
    max_decoded: usize,
}

fn settings() -> Settings {
    let text = config();
    let mut parts = text.split(';');
    let fields = parts
        .next()
        .unwrap_or_default()
        .split(',')
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty())
        .collect();
    let mut settings = Settings {
        fields,
        pass_unreadable: false,
        max_decoded: DEFAULT_MAX_DECODED,
    };
    for part in parts {
        match part.trim().split_once('=') {
            Some(("on_unreadable", what)) => settings.pass_unreadable = what.trim() == "pass",
            Some(("max_decoded_bytes", n)) => {
                settings.max_decoded = n.trim().parse().unwrap_or(settings.max_decoded)
            }
            _ => {}
        }
    }
    settings
}

/// Redacts in place; returns how many values changed.
fn redact(value: &mut Value, fields: &[String]) -> usize {
    let mut changed = 0;
    match value {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if fields.iter().any(|f| f == key) {
                    if value.as_str() != Some(REDACTED) {
                        *value = Value::from(REDACTED);
                        changed += 1;
                    }
                } else {
                    changed += redact(value, fields);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                changed += redact(item, fields);
            }
        }
        _ => {}
    }
    changed
}

/// A content-coding this plugin reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    /// HTTP's `deflate`: zlib-wrapped, though some servers send it raw.
    Deflate,
}

impl Coding {
    fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// What a direction's headers said about its body.
#[derive(Debug)]
struct Described {
    /// The content-codings applied, in the order they were applied; `Err` names one this plugin
    /// cannot read.
    codings: Result<Vec<Coding>, String>,
    /// What `content-type` says the body is.
    content: Content,
}

/// What a body is, as its `content-type` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// `application/json`, `...+json`: it must parse.
    Json,
    /// A binary type (`application/octet-stream`, `image/*`, `application/grpc`, ...): never
    /// JSON, passed unread.
    Binary,
    /// Anything else, or nothing said: JSON if it looks like it.
    Other,
}

impl Content {
    fn of(content_type: Option<Vec<u8>>) -> Content {
        let Some(value) = content_type else {
            return Content::Other;
        };
        let text = String::from_utf8_lossy(&value).to_ascii_lowercase();
        let essence = text.split(';').next().unwrap_or_default().trim();
        let binary = ["image/", "audio/", "video/", "font/", "multipart/"]
            .iter()
            .any(|prefix| essence.starts_with(prefix))
            || essence.starts_with("application/grpc")
            || matches!(
                essence,
                "application/octet-stream"
                    | "application/pdf"
                    | "application/zip"
                    | "application/gzip"
                    | "application/x-protobuf"
                    | "application/protobuf"
            );
        if essence == "application/json" || essence.ends_with("+json") {
            Content::Json
        } else if binary {
            Content::Binary
        } else {
            Content::Other
        }
    }
}

impl Described {
    /// A body whose headers were not seen: plain JSON, plain other bytes, or unreadable if it
    /// starts like a compressed stream.
    fn unknown(bytes: &[u8]) -> Result<Described, Unreadable> {
        if content(bytes).first() != Some(&0x1f) && bytes.first() != Some(&0x78) {
            return Ok(Described {
                codings: Ok(Vec::new()),
                content: Content::Other,
            });
        }
        Err(Unreadable {
            reason: Reason::Encoding,
            why: "its headers were not seen (header mode SKIP) and it looks compressed".into(),
        })
    }

    fn of(headers: &Headers) -> Described {
        let mut codings = Ok(Vec::new());
        for value in headers.get_all("content-encoding") {
            let text = String::from_utf8_lossy(&value).to_ascii_lowercase();
            for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let coding = match name {
                    "identity" => continue,
                    "gzip" | "x-gzip" => Ok(Coding::Gzip),
                    "deflate" => Ok(Coding::Deflate),
                    other => Err(format!("content-encoding {other:?}")),
                };
                if let Ok(list) = &mut codings {
                    match coding {
                        Ok(coding) if list.len() < MAX_CODINGS => list.push(coding),
                        Ok(_) => codings = Err("more than two content-codings".into()),
                        Err(why) => codings = Err(why),
                    }
                }
            }
        }
        Described {
            codings,
            content: Content::of(headers.get("content-type")),
        }
    }
}

/// `bytes` with `codings` undone, last applied first, never more than `max` bytes.
fn decode(bytes: Vec<u8>, codings: &[Coding], max: usize) -> Result<Vec<u8>, String> {
    let mut data = bytes;
    for coding in codings.iter().rev() {
        let decoded = match coding {
            Coding::Gzip => read_bounded(GzDecoder::new(&data[..]), max),
            Coding::Deflate => match read_bounded(ZlibDecoder::new(&data[..]), max) {
                Err(Bounded::Invalid(_)) => read_bounded(DeflateDecoder::new(&data[..]), max),
                other => other,
            },
        };
        data = decoded.map_err(|e| match e {
            Bounded::Invalid(e) => {
                format!("not {} as its content-encoding says: {e}", coding.name())
            }
            other => other.to_string(),
        })?;
    }
    Ok(data)
}

/// Why a decoder's output was not read whole.
enum Bounded {
    Invalid(std::io::Error),
    TooLarge(usize),
    NoMemory(usize),
}

impl core::fmt::Display for Bounded {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Bounded::Invalid(e) => write!(f, "{e}"),
            Bounded::TooLarge(max) => {
                write!(f, "it decodes to more than {max} bytes (max_decoded_bytes)")
            }
            Bounded::NoMemory(len) => {
                write!(
                    f,
                    "{len} decoded bytes are more than the plugin's memory holds"
                )
            }
        }
    }
}

/// All of `reader`, if it is at most `max` bytes and fits the plugin's memory: a small
/// compressed body can decode to gigabytes.
fn read_bounded(mut reader: impl Read, max: usize) -> Result<Vec<u8>, Bounded> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut chunk).map_err(Bounded::Invalid)?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > max {
            return Err(Bounded::TooLarge(max));
        }
        // Grow by at most what is needed, and fail rather than trap when memory runs out.
        let wanted = (out.len() + n)
            .max(out.capacity().saturating_mul(2))
            .min(max);
        if out.capacity() < out.len() + n
            && out.try_reserve_exact(wanted - out.len()).is_err()
            && out.try_reserve_exact(n).is_err()
        {
            return Err(Bounded::NoMemory(out.len() + n));
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// `bytes` with `codings` applied again, in order.
fn encode(bytes: Vec<u8>, codings: &[Coding]) -> Vec<u8> {
    let mut data = bytes;
    for coding in codings {
        data = match coding {
            Coding::Gzip => {
                let mut e = GzEncoder::new(Vec::new(), Compression::fast());
                e.write_all(&data).expect("writing to memory");
                e.finish().expect("writing to memory")
            }
            Coding::Deflate => {
                let mut e = ZlibEncoder::new(Vec::new(), Compression::fast());
                e.write_all(&data).expect("writing to memory");
                e.finish().expect("writing to memory")
            }
        };
    }
    data
}

/// `text` without a UTF-8 byte-order mark and leading white space.
fn content(text: &[u8]) -> &[u8] {
    let text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    &text[start..]
}

/// Which way a body goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

#[derive(Default)]
struct JsonRedact {
    /// What each direction's headers said, if the headers phase ran: request, response.
    described: [Option<Described>; 2],
    /// Per direction: the body began as something other than JSON, so its chunks pass.
    not_json: [bool; 2],
}

impl JsonRedact {
    fn redact_body(&mut self, direction: Direction, body: &Body) -> Action {
        let side = direction as usize;
        if self.not_json[side] {
            return Action::Continue;
        }
        let settings = settings();
        // The headers as they are now, where the body handler gets them; else as the headers
        // phase saw them.
        let now = body.headers().map(Described::of);
        let described = now.as_ref().or(self.described[side].as_ref());
        match Self::redacted(&settings, described, body) {
            Ok(Reading::Redacted(bytes, count)) => {
                body.replace(bytes);
                if let Some(headers) = body.headers() {
                    headers.set(COUNT_HEADER, count.to_string());
                }
                Action::Continue
            }
            Ok(Reading::Unchanged) => Action::Continue,
            // What the body starts with says what it is: the rest of it passes too.
            Ok(Reading::NotJson) => {
                self.not_json[side] = !body.is_empty();
                Action::Continue
            }
            Err(unreadable) if settings.pass_unreadable => {
                log::warn(&format!(
                    "passing a body it cannot read unchanged (on_unreadable=pass): {}",
                    unreadable.why
                ));
                Action::Continue
            }
            Err(unreadable) => refuse(direction, &unreadable),
        }
    }

    /// What reading the body made of it, or why it cannot be read.
    fn redacted(
        settings: &Settings,
        described: Option<&Described>,
        body: &Body,
    ) -> Result<Reading, Unreadable> {
        let described = match described {
            Some(described) => described,
            // Envoy did not send this direction's headers (its header mode is SKIP): a body
            // that is not plainly JSON may be encoded in a way nobody said.
            None => &Described::unknown(&body.bytes())?,
        };
        if described.content == Content::Binary {
            return Ok(Reading::NotJson);
        }
        let codings = described.codings.as_ref().map_err(|why| Unreadable {
            reason: Reason::Encoding,
            why: format!("{why} is not one it reads"),
        })?;
        // A body that ends without end-of-stream was cut at Envoy's buffer (`BUFFERED_PARTIAL`),
        // is a chunk (`STREAMED`), or is followed by trailers: read it all the same, and if it
        // cannot be read, say it came in part.
        let whole = body.end_of_stream();
        let unreadable = |reason: Reason, why: String| Unreadable {
            reason: if whole { reason } else { Reason::Partial },
            why: if whole {
                why
            } else {
                format!("only part of the body arrived (STREAMED, BUFFERED_PARTIAL): {why}")
            },
        };
        let plain = decode(body.bytes(), codings, settings.max_decoded)
            .map_err(|why| unreadable(Reason::Encoding, why))?;
        if described.content != Content::Json && !looks_like_json(&plain) {
            return Ok(Reading::NotJson);
        }
        let mut value = serde_json::from_slice::<Value>(content(&plain))
            .map_err(|e| unreadable(Reason::NotJson, format!("not valid JSON: {e}")))?;
        let count = redact(&mut value, &settings.fields);
        if count == 0 {
            return Ok(Reading::Unchanged);
        }
        let json = serde_json::to_vec(&value).expect("a parsed value serialises");
        Ok(Reading::Redacted(encode(json, codings), count))
    }
}

/// What reading a body made of it.
enum Reading {
    /// JSON, with this many values redacted: these bytes go on instead.
    Redacted(Vec<u8>, usize),
    /// JSON with nothing to redact.
    Unchanged,
    /// Not JSON: it passes, and so does the rest of its body.
    NotJson,
}

fn looks_like_json(bytes: &[u8]) -> bool {
    matches!(content(bytes).first(), Some(b'{' | b'['))
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Encoding,
    NotJson,
    Partial,
}

struct Unreadable {
    reason: Reason,
    why: String,
}

/// The answer for a body that cannot be read: the client's fault for a request, the
/// upstream's for a response.
fn refuse(direction: Direction, unreadable: &Unreadable) -> Action {
    log::warn(&format!(
        "refusing a {} body it cannot read: {}",
        match direction {
            Direction::Request => "request",
            Direction::Response => "response",
        },
        unreadable.why
    ));
    let status = match (direction, unreadable.reason) {
        (Direction::Response, _) => 502,
        (Direction::Request, Reason::Encoding) => 415,
        (Direction::Request, Reason::NotJson) => 400,
        (Direction::Request, Reason::Partial) => 413,
    };
    Action::Respond(ImmediateResponse {
        status,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: br#"{"error":"body cannot be checked"}"#.to_vec(),
        grpc_status: None,
        details: "json_redact_unreadable".into(),
    })
}

impl Plugin for JsonRedact {
    const PHASES: Phases = Phases::REQUEST_HEADERS
        .union(Phases::REQUEST_BODY)
        .union(Phases::RESPONSE_HEADERS)
        .union(Phases::RESPONSE_BODY);
    const REQUEST_BODY: BodyDelivery = BodyDelivery::Whole;
    const RESPONSE_BODY: BodyDelivery = BodyDelivery::Whole;

    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        headers.remove(COUNT_HEADER);
        // Whatever the client accepts, the upstream answers in an encoding this plugin reads.
        headers.set("accept-encoding", "identity");
        self.described[Direction::Request as usize] = Some(Described::of(headers));
        Action::Continue
    }

    fn on_request_body(&mut self, body: &Body) -> Action {
        self.redact_body(Direction::Request, body)
    }

    fn on_response_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        self.described[Direction::Response as usize] = Some(Described::of(headers));
        Action::Continue
    }

    fn on_response_body(&mut self, body: &Body) -> Action {
        self.redact_body(Direction::Response, body)
    }
}

export_plugin!(JsonRedact);
