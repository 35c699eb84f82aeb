//! What came out of an exchange against what its file expects, field by field, and the
//! report a person reads: what each phase produced, and for each difference, the expected and
//! the actual value.

use std::fmt::Write as _;

use serde::Serialize;

use super::file::{BodyExpect, Expect, ImmediateExpect};
use super::play::Played;
use super::transcript::{BodyOut, ImmediateOut, Output};

/// One field that came out other than expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Where, as the file spells it: `response_headers.set`, `immediate_response.status`.
    pub field: String,
    pub expected: String,
    pub actual: String,
}

/// The differences between `played` and `expect` (none without an `expect:`, beyond a
/// protocol error).
pub fn differences(played: &Played, expect: Option<&Expect>) -> Vec<Difference> {
    let mut found = Vec::new();
    if let Some(error) = &played.protocol_error {
        found.push(Difference {
            field: "protocol".into(),
            expected: "every message accepted".into(),
            actual: error.clone(),
        });
    }
    let Some(expect) = expect else {
        return found;
    };
    let output = &played.output;
    let mut differ = |field: &str, expected: String, actual: String| {
        if expected != actual {
            found.push(Difference {
                field: field.into(),
                expected,
                actual,
            });
        }
    };
    for (name, expected, actual) in [
        (
            "request_headers",
            &expect.request_headers,
            &output.request_headers,
        ),
        (
            "request_trailers",
            &expect.request_trailers,
            &output.request_trailers,
        ),
        (
            "response_headers",
            &expect.response_headers,
            &output.response_headers,
        ),
        (
            "response_trailers",
            &expect.response_trailers,
            &output.response_trailers,
        ),
    ] {
        let Some(expected) = expected else { continue };
        let actual = actual.clone().unwrap_or_default();
        let lower = |h: &Option<super::file::Headers>| {
            h.as_ref().map(|h| {
                h.iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect::<super::file::Headers>()
            })
        };
        if expected.set.is_some() {
            differ(
                &format!("{name}.set"),
                render(&lower(&expected.set).unwrap_or_default()),
                render(&actual.set.unwrap_or_default()),
            );
        }
        if expected.append.is_some() {
            differ(
                &format!("{name}.append"),
                render(&lower(&expected.append).unwrap_or_default()),
                render(&actual.append.unwrap_or_default()),
            );
        }
        if let Some(remove) = &expected.remove {
            let sorted = |names: &[String]| {
                let mut names: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
                names.sort();
                names
            };
            differ(
                &format!("{name}.remove"),
                render(&sorted(remove)),
                render(&sorted(&actual.remove.unwrap_or_default())),
            );
        }
    }
    for (name, expected, actual) in [
        ("request_body", &expect.request_body, &output.request_body),
        (
            "response_body",
            &expect.response_body,
            &output.response_body,
        ),
    ] {
        if let Some(expected) = expected.as_ref().and_then(body_out) {
            differ(name, render(&expected), render(actual));
        }
    }
    match (&expect.immediate_response, &output.immediate_response) {
        (None, None) => {}
        (None, Some(actual)) => differ("immediate_response", "none".into(), render(actual)),
        (Some(_), None) => differ(
            "immediate_response",
            "an immediate response".into(),
            "none: the exchange went on".into(),
        ),
        (Some(expected), Some(actual)) => immediate(expected, actual, &mut differ),
    }
    if let Some(expected) = &expect.dynamic_metadata {
        differ(
            "dynamic_metadata",
            render(expected),
            render(&output.dynamic_metadata),
        );
    }
    differ(
        "failures",
        render(&expect.failures),
        render(&output.failures),
    );
    found
}

fn immediate(
    expected: &ImmediateExpect,
    actual: &ImmediateOut,
    differ: &mut impl FnMut(&str, String, String),
) {
    if let Some(status) = expected.status {
        differ(
            "immediate_response.status",
            status.to_string(),
            actual.status.to_string(),
        );
    }
    if let Some(headers) = &expected.headers {
        let headers: super::file::Headers = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        differ(
            "immediate_response.headers",
            render(&headers),
            render(&actual.headers),
        );
    }
    if let Some(body) = &expected.body {
        differ(
            "immediate_response.body",
            render(body),
            render(&actual.body),
        );
    }
    if let Some(details) = &expected.details {
        differ(
            "immediate_response.details",
            render(details),
            render(&actual.details),
        );
    }
}

fn body_out(expected: &BodyExpect) -> Option<BodyOut> {
    expected.bytes().ok().flatten().map(BodyOut::new)
}

/// A value as flow-style YAML on one line where it fits, as the file would spell it.
fn render(value: &impl Serialize) -> String {
    let text = serde_yaml_ng::to_string(value).unwrap_or_else(|e| e.to_string());
    text.trim_end().to_string()
}

/// The report on one exchange: a line saying whether it passed, what each phase produced
/// (in the `expect:` format), and every difference.
pub fn report(file: &str, name: &str, played: &Played, differences: &[Difference]) -> String {
    let mut out = String::new();
    let verdict = if differences.is_empty() {
        "ok  "
    } else {
        "FAIL"
    };
    let _ = writeln!(out, "{verdict} {file}: {name}  (chain {})", played.chain);
    let _ = writeln!(
        out,
        "     messages: {}",
        played
            .messages
            .iter()
            .map(|(phase, answers)| format!("{phase} -> [{}]", answers.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if let Some(phase) = played.closed_after {
        let _ = writeln!(
            out,
            "     the host closed the stream after {phase}: Envoy goes on without it"
        );
    }
    let produced = if played.output == Output::default() {
        "{}".to_string()
    } else {
        render(&played.output)
    };
    let _ = writeln!(out, "     produced:");
    for line in produced.lines() {
        let _ = writeln!(out, "       {line}");
    }
    for difference in differences {
        let _ = writeln!(out, "     ✗ {}", difference.field);
        write_value(&mut out, "expected", &difference.expected);
        write_value(&mut out, "actual  ", &difference.actual);
    }
    out
}

/// A note on the headers a plugin removed that the message did not carry: the host still asks
/// Envoy to remove them (Envoy may hold headers its filter does not forward to the host, and a
/// removal meant to strip one must reach it), so they are in what came out; said, so that a
/// `remove:` of a header the request never had does not look like a mistake. Empty otherwise.
pub fn removals_of_absent_headers(spec: &super::file::ExchangeSpec, output: &Output) -> String {
    let mut note = String::new();
    let sides = [
        ("request", Some(&spec.request), &output.request_headers),
        ("response", spec.response.as_ref(), &output.response_headers),
    ];
    for (side, message, changes) in sides {
        let (Some(message), Some(removed)) =
            (message, changes.as_ref().and_then(|c| c.remove.as_ref()))
        else {
            continue;
        };
        let absent: Vec<&str> = removed
            .iter()
            .filter(|name| {
                !message
                    .headers
                    .keys()
                    .any(|sent| sent.eq_ignore_ascii_case(name))
            })
            .map(String::as_str)
            .collect();
        if !absent.is_empty() {
            note.push_str(&format!(
                "     removed from the {side} without being in it: {} (Envoy is still asked to \
                 remove them, in case it holds them without forwarding them)\n",
                absent.join(", ")
            ));
        }
    }
    note
}

fn write_value(out: &mut String, label: &str, value: &str) {
    let mut lines = value.lines();
    let _ = writeln!(out, "         {label}: {}", lines.next().unwrap_or(""));
    for line in lines {
        let _ = writeln!(out, "                   {line}");
    }
}
