//! Redacts JSON fields in request and response bodies: every value whose key is named in the
//! configuration string (comma-separated, e.g. `password,ssn`), at any depth, becomes
//! `"[REDACTED]"`. Bodies that are not JSON objects or arrays pass unchanged. Where the headers
//! can still change (`Body::headers`), it says how many values it redacted in `x-redacted`.
//!
//! It asks for whole bodies: configure Envoy's ext_proc filter with `request_body_mode` and
//! `response_body_mode` `BUFFERED`, or `FULL_DUPLEX_STREAMED` with the trailer modes `SEND`
//! (the table in plugins/README.md). Given part of a body only (`STREAMED` mode, or a
//! `BUFFERED_PARTIAL` body cut at Envoy's buffer limit) it cannot parse it, and says so in the
//! log rather than pretend.

use serde_json::Value;
use wasm_extproc_sdk::{Action, Body, BodyDelivery, Phases, Plugin, config, export_plugin, log};

const REDACTED: &str = "[REDACTED]";

#[derive(Default)]
struct JsonRedact;

fn fields() -> Vec<String> {
    config()
        .split(',')
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty())
        .collect()
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

fn redact_body(body: &Body) -> Action {
    let bytes = body.bytes();
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if !matches!(first, Some(b'{') | Some(b'[')) {
        return Action::Continue;
    }
    if !body.end_of_stream() {
        log::warn("got part of a JSON body only; passing it unchanged");
        return Action::Continue;
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Action::Continue;
    };
    let redacted = redact(&mut value, &fields());
    if redacted > 0 {
        body.replace(serde_json::to_vec(&value).expect("a parsed value serialises"));
        if let Some(headers) = body.headers() {
            headers.set("x-redacted", redacted.to_string());
        }
    }
    Action::Continue
}

impl Plugin for JsonRedact {
    const PHASES: Phases = Phases::REQUEST_BODY.union(Phases::RESPONSE_BODY);
    const REQUEST_BODY: BodyDelivery = BodyDelivery::Whole;
    const RESPONSE_BODY: BodyDelivery = BodyDelivery::Whole;

    fn on_request_body(&mut self, body: &Body) -> Action {
        redact_body(body)
    }

    fn on_response_body(&mut self, body: &Body) -> Action {
        redact_body(body)
    }
}

export_plugin!(JsonRedact);
