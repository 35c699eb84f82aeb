//! Envoy's rules for what an ext_proc server may send, checked against each plugin's output
//! before it is accepted. Envoy would otherwise drop a rejected header mutation silently
//! (counting it in `rejected_header_mutations`) or fail the whole request with a 500 the
//! operator cannot explain; here the plugin that produced it fails, under its own policy, with
//! a message saying what was wrong.
//!
//! In Envoy's process the same rules hold, so that a plugin behaves the same in both modes.

use crate::config::EnvoySettings;
use crate::http::{
    HeaderChanges, HeaderMap, ImmediateResponse, MAX_MESSAGE_BYTES, MESSAGE_OVERHEAD_BYTES,
    Message, Phase,
};
use crate::runtime::{Action, Outcome};

/// Largest body a plugin may produce in one message: over ext_proc it travels in one gRPC
/// message, which also carries headers and framing.
pub const MAX_ANSWER_BODY_BYTES: usize = MAX_MESSAGE_BYTES - MESSAGE_OVERHEAD_BYTES;

/// The rules in force, from what the operator says Envoy is configured with.
#[derive(Debug, Clone)]
pub struct Guard {
    envoy: EnvoySettings,
}

impl Guard {
    pub fn new(envoy: EnvoySettings) -> Self {
        Guard { envoy }
    }

    /// Checks what one plugin's call made of the message (its changes since the message's
    /// last checkpoint) and its outcome. Returns the header changes it checked, for the
    /// answer to carry.
    pub fn check(
        &self,
        phase: Phase,
        message: &Message,
        outcome: &Outcome,
    ) -> Result<Option<HeaderChanges>, String> {
        let changes = match message {
            Message::Headers { headers, .. } => Some(self.check_section(phase, headers, false)?),
            Message::Trailers(trailers) => Some(self.check_section(phase, trailers, true)?),
            Message::Body(chunk) => {
                if chunk.data.len() > MAX_ANSWER_BODY_BYTES {
                    return Err(format!(
                        "body of {} bytes is over the {MAX_ANSWER_BODY_BYTES}-byte limit of one ext_proc message",
                        chunk.data.len()
                    ));
                }
                None
            }
        };
        if let Action::Respond(response) = &outcome.action {
            self.check_immediate(response)?;
        }
        for (namespace, key, _) in &outcome.effects.metadata {
            if namespace.is_empty() || key.is_empty() {
                return Err("set-metadata needs a non-empty namespace and key".into());
            }
        }
        Ok(changes)
    }

    /// Checks the changes a body handler made to its direction's headers (`phase` is the
    /// direction's headers phase) since their last checkpoint.
    pub fn check_open_headers(
        &self,
        phase: Phase,
        headers: &HeaderMap,
    ) -> Result<HeaderChanges, String> {
        self.check_section(phase, headers, false)
    }

    fn check_section(
        &self,
        phase: Phase,
        section: &HeaderMap,
        trailers: bool,
    ) -> Result<HeaderChanges, String> {
        let changes = section.changes();
        for name in &changes.removed {
            check_name(name)?;
            if name.starts_with(':') || name == "host" {
                return Err(format!(
                    "removed `{name}`: Envoy does not let ext_proc remove it"
                ));
            }
            self.check_mutable(phase, name)?;
        }
        for (name, values) in &changes.set {
            check_name(name)?;
            for value in values {
                check_value(name, value)?;
            }
            if let Some(pseudo) = name.strip_prefix(':') {
                if trailers {
                    return Err(format!("set `{name}`: trailers have no pseudo-headers"));
                }
                let allowed = match phase {
                    Phase::RequestHeaders => {
                        ["path", "method", "authority", "scheme"].contains(&pseudo)
                    }
                    Phase::ResponseHeaders => pseudo == "status",
                    _ => false,
                };
                if !allowed {
                    return Err(format!("set `{name}`: not a pseudo-header of {phase}"));
                }
                if values.len() > 1 {
                    return Err(format!(
                        "set `{name}` {} times: pseudo-headers have one value",
                        values.len()
                    ));
                }
                if pseudo == "status" && !is_status(&values[0]) {
                    return Err(format!(
                        "set `:status` to {:?}: not a status code (200-599)",
                        String::from_utf8_lossy(&values[0])
                    ));
                }
            }
            self.check_mutable(phase, name)?;
        }
        if !changes.is_empty() {
            let size = section.byte_size();
            if size > self.envoy.max_header_bytes {
                return Err(format!(
                    "{phase} grew to {size} bytes, over Envoy's {}-byte header limit \
                     ([envoy] max_headers_kib)",
                    self.envoy.max_header_bytes
                ));
            }
        }
        Ok(changes)
    }

    /// Envoy's default mutation rules: routing headers and Envoy's own headers are off limits
    /// unless the filter's `mutation_rules` allow them.
    fn check_mutable(&self, phase: Phase, name: &str) -> Result<(), String> {
        let routing = phase == Phase::RequestHeaders
            && matches!(name, "host" | ":authority" | ":scheme" | ":method");
        if routing && !self.envoy.allow_all_routing {
            return Err(format!(
                "changed `{name}` in {phase}: Envoy allows that only with mutation_rules.allow_all_routing \
                 (then set [envoy] allow_all_routing = true)"
            ));
        }
        if name.starts_with("x-envoy") && !self.envoy.allow_envoy_headers {
            return Err(format!(
                "changed `{name}` in {phase}: Envoy allows x-envoy-* changes only with \
                 mutation_rules.allow_envoy (then set [envoy] allow_envoy_headers = true)"
            ));
        }
        Ok(())
    }

    fn check_immediate(&self, response: &ImmediateResponse) -> Result<(), String> {
        if !is_defined_status(response.status) {
            return Err(format!(
                "immediate response status {} is not one Envoy accepts",
                response.status
            ));
        }
        for (name, value) in &response.headers {
            let lower = name.to_ascii_lowercase();
            check_name(&lower)?;
            check_value(&lower, value)?;
            if lower.starts_with(':') {
                return Err(format!(
                    "immediate response header `{name}`: pseudo-headers are not allowed"
                ));
            }
        }
        if let Some(status) = response.grpc_status
            && status > 16
        {
            return Err(format!(
                "immediate response grpc-status {status} is not a gRPC status code (0-16)"
            ));
        }
        if response.body.len() > MAX_ANSWER_BODY_BYTES {
            return Err(format!(
                "immediate response body of {} bytes is over the {MAX_ANSWER_BODY_BYTES}-byte limit",
                response.body.len()
            ));
        }
        Ok(())
    }
}

/// A header name Envoy accepts: an RFC 9110 token, lower-case (HTTP/2), or a pseudo-header.
fn check_name(name: &str) -> Result<(), String> {
    let token = name.strip_prefix(':').unwrap_or(name);
    let valid = !token.is_empty()
        && token.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "header name {name:?} is not a valid lower-case HTTP token"
        ))
    }
}

/// Envoy rejects values with NUL, CR or LF (they would split or truncate the header).
fn check_value(name: &str, value: &[u8]) -> Result<(), String> {
    match value.iter().position(|b| matches!(b, 0 | b'\r' | b'\n')) {
        Some(at) => Err(format!(
            "value of `{name}` has a NUL, CR or LF byte at offset {at}"
        )),
        None => Ok(()),
    }
}

fn is_status(value: &[u8]) -> bool {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .is_some_and(|code| value.len() == 3 && (200..=599).contains(&code))
}

/// `envoy.type.v3.HttpStatus` accepts only the codes its enum defines.
fn is_defined_status(status: u16) -> bool {
    use envoy_types::pb::envoy::r#type::v3::StatusCode;
    status >= 200 && StatusCode::try_from(i32::from(status)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{BodyChunk, Effects};

    fn guard() -> Guard {
        Guard::new(EnvoySettings::default())
    }

    fn continuing() -> Outcome {
        Outcome {
            action: Action::Continue,
            effects: Effects::default(),
        }
    }

    fn headers_after(
        phase: Phase,
        change: impl FnOnce(&mut HeaderMap),
    ) -> Result<Option<HeaderChanges>, String> {
        let mut headers = HeaderMap::from_entries([
            (":path".to_string(), b"/".to_vec()),
            ("host".to_string(), b"example".to_vec()),
        ]);
        change(&mut headers);
        guard().check(
            phase,
            &Message::Headers {
                headers,
                end_of_stream: true,
            },
            &continuing(),
        )
    }

    #[test]
    fn ordinary_changes_pass() {
        headers_after(Phase::RequestHeaders, |h| {
            h.set("x-tag".into(), b"v".to_vec());
            h.set(":path".into(), b"/rewritten".to_vec());
            h.remove("x-absent".into());
        })
        .unwrap();
        headers_after(Phase::ResponseHeaders, |h| {
            h.set(":status".into(), b"404".to_vec())
        })
        .unwrap();
    }

    #[test]
    fn invalid_names_and_values_are_refused() {
        let err = headers_after(Phase::RequestHeaders, |h| {
            h.set("bad name".into(), b"v".to_vec())
        })
        .unwrap_err();
        assert_eq!(
            err,
            "header name \"bad name\" is not a valid lower-case HTTP token"
        );
        let err = headers_after(Phase::RequestHeaders, |h| {
            h.set("x-split".into(), b"a\r\nb: c".to_vec())
        })
        .unwrap_err();
        assert_eq!(
            err,
            "value of `x-split` has a NUL, CR or LF byte at offset 1"
        );
    }

    #[test]
    fn routing_envoy_and_pseudo_headers_follow_envoys_rules() {
        let err = headers_after(Phase::RequestHeaders, |h| {
            h.set("host".into(), b"evil".to_vec())
        })
        .unwrap_err();
        assert!(
            err.starts_with("changed `host` in request_headers"),
            "{err}"
        );
        let err = headers_after(Phase::RequestHeaders, |h| h.remove(":path".into())).unwrap_err();
        assert!(err.contains("does not let ext_proc remove it"), "{err}");
        let err = headers_after(Phase::RequestHeaders, |h| {
            h.set("x-envoy-retry-on".into(), b"5xx".to_vec())
        })
        .unwrap_err();
        assert!(err.contains("mutation_rules.allow_envoy"), "{err}");
        let err = headers_after(Phase::RequestHeaders, |h| {
            h.set(":status".into(), b"200".to_vec())
        })
        .unwrap_err();
        assert_eq!(err, "set `:status`: not a pseudo-header of request_headers");
        let err = headers_after(Phase::ResponseHeaders, |h| {
            h.set(":status".into(), b"20x".to_vec())
        })
        .unwrap_err();
        assert!(err.contains("not a status code"), "{err}");

        let relaxed = Guard::new(EnvoySettings {
            allow_all_routing: true,
            allow_envoy_headers: true,
            ..EnvoySettings::default()
        });
        let mut headers = HeaderMap::default();
        headers.set("host".into(), b"other".to_vec());
        headers.set("x-envoy-retry-on".into(), b"5xx".to_vec());
        relaxed
            .check(
                Phase::RequestHeaders,
                &Message::Headers {
                    headers,
                    end_of_stream: true,
                },
                &continuing(),
            )
            .unwrap();
    }

    #[test]
    fn header_sections_stay_under_envoys_limit() {
        let err = headers_after(Phase::RequestHeaders, |h| {
            h.set("x-big".into(), vec![b'a'; 61 * 1024])
        })
        .unwrap_err();
        assert!(
            err.contains("over Envoy's 61440-byte header limit"),
            "{err}"
        );
    }

    #[test]
    fn immediate_responses_are_checked() {
        let check = |response: ImmediateResponse| {
            guard().check(
                Phase::RequestBody,
                &Message::Body(BodyChunk::default()),
                &Outcome {
                    action: Action::Respond(response),
                    effects: Effects::default(),
                },
            )
        };
        check(ImmediateResponse {
            status: 401,
            ..Default::default()
        })
        .unwrap();
        assert!(
            check(ImmediateResponse {
                status: 299,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            check(ImmediateResponse {
                status: 403,
                headers: vec![(":status".into(), b"200".to_vec())],
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            check(ImmediateResponse {
                status: 403,
                grpc_status: Some(17),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn bodies_fit_one_message() {
        let err = guard()
            .check(
                Phase::ResponseBody,
                &Message::Body(BodyChunk::new(vec![0; MAX_ANSWER_BODY_BYTES + 1], true)),
                &continuing(),
            )
            .unwrap_err();
        assert!(err.contains("over the"), "{err}");
    }
}
