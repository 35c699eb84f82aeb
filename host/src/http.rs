//! The host's own words for an HTTP exchange: phases, header sections, body messages and what a
//! plugin chain decides. Neither Envoy's protobufs nor wasmtime appear here, so the protocol
//! state machine and the plugin runtime meet on neutral ground.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One of the six points at which Envoy consults the processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::RequestHeaders,
        Phase::RequestBody,
        Phase::RequestTrailers,
        Phase::ResponseHeaders,
        Phase::ResponseBody,
        Phase::ResponseTrailers,
    ];

    /// The name used in logs, metrics and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::RequestHeaders => "request_headers",
            Phase::RequestBody => "request_body",
            Phase::RequestTrailers => "request_trailers",
            Phase::ResponseHeaders => "response_headers",
            Phase::ResponseBody => "response_body",
            Phase::ResponseTrailers => "response_trailers",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn direction(self) -> Direction {
        match self {
            Phase::RequestHeaders | Phase::RequestBody | Phase::RequestTrailers => {
                Direction::Request
            }
            Phase::ResponseHeaders | Phase::ResponseBody | Phase::ResponseTrailers => {
                Direction::Response
            }
        }
    }
}

/// Which half of the exchange a phase belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    /// "request" or "response".
    pub fn noun(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }

    pub fn headers(self) -> Phase {
        match self {
            Direction::Request => Phase::RequestHeaders,
            Direction::Response => Phase::ResponseHeaders,
        }
    }

    pub fn body(self) -> Phase {
        match self {
            Direction::Request => Phase::RequestBody,
            Direction::Response => Phase::ResponseBody,
        }
    }

    pub fn trailers(self) -> Phase {
        match self {
            Direction::Request => Phase::RequestTrailers,
            Direction::Response => Phase::ResponseTrailers,
        }
    }
}

/// How a plugin wants a body phase delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// Each message as Envoy sends it.
    #[default]
    Chunks,
    /// The whole body in one call, held back by the host where Envoy streams.
    Whole,
}

/// What a plugin handles, as it registered at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Registration {
    pub phases: PhaseSet,
    pub request_body: Delivery,
    pub response_body: Delivery,
}

impl Registration {
    pub fn delivery(&self, direction: Direction) -> Delivery {
        match direction {
            Direction::Request => self.request_body,
            Direction::Response => self.response_body,
        }
    }
}

/// How Envoy sends a body (its `processing_mode`), as it told the host in `protocol_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyMode {
    /// Not sent, or Envoy did not say.
    #[default]
    None,
    Streamed,
    Buffered,
    BufferedPartial,
    FullDuplexStreamed,
}

impl BodyMode {
    /// Whether Envoy sends everything it will send of the body in one message.
    pub fn is_buffered(self) -> bool {
        matches!(self, BodyMode::Buffered | BodyMode::BufferedPartial)
    }
}

/// What Envoy told the host about the exchange beyond headers and body: attributes and
/// forwarded metadata, already rendered as text (strings as they are, other values as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeContext {
    pub attributes: BTreeMap<String, String>,
    /// Keyed by (namespace, key).
    pub metadata: BTreeMap<(String, String), String>,
}

/// What plugins asked for besides changing the message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Dynamic metadata to set: (namespace, key, value), in the order set.
    pub metadata: Vec<(String, String, String)>,
    pub clear_route_cache: bool,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.metadata.is_empty() && !self.clear_route_cache
    }

    pub fn absorb(&mut self, other: Effects) {
        self.metadata.extend(other.metadata);
        self.clear_route_cache |= other.clear_route_cache;
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of phases.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseSet(u8);

impl PhaseSet {
    pub const EMPTY: PhaseSet = PhaseSet(0);

    pub fn with(self, phase: Phase) -> Self {
        PhaseSet(self.0 | phase.bit())
    }

    pub fn contains(self, phase: Phase) -> bool {
        self.0 & phase.bit() != 0
    }

    pub fn union(self, other: PhaseSet) -> Self {
        PhaseSet(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn intersects(self, other: PhaseSet) -> bool {
        self.0 & other.0 != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Phase> {
        Phase::ALL.into_iter().filter(move |p| self.contains(*p))
    }
}

impl FromIterator<Phase> for PhaseSet {
    fn from_iter<I: IntoIterator<Item = Phase>>(iter: I) -> Self {
        iter.into_iter().fold(PhaseSet::EMPTY, PhaseSet::with)
    }
}

impl fmt::Debug for PhaseSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// A header or trailer section, in arrival order, with every name lower-case.
///
/// It remembers which names were changed so the reply to Envoy carries only the difference,
/// not the whole section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    entries: Vec<(String, Vec<u8>)>,
    changed: BTreeSet<String>,
    /// The bytes of all names and values, kept up to date so bounds checks cost nothing.
    bytes: usize,
}

/// The net effect of the changes made to a [`HeaderMap`]: for each changed name, its values
/// now (empty when the name was removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderChanges {
    pub set: Vec<(String, Vec<Vec<u8>>)>,
    pub removed: Vec<String>,
}

impl HeaderChanges {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.removed.is_empty()
    }
}

impl HeaderMap {
    /// A section as it arrived from Envoy: nothing is marked changed.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        let entries: Vec<(String, Vec<u8>)> = entries
            .into_iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), value))
            .collect();
        let bytes = entries.iter().map(|(n, v)| n.len() + v.len()).sum();
        HeaderMap {
            entries,
            changed: BTreeSet::new(),
            bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn get_all(&self, name: &str) -> Vec<Vec<u8>> {
        self.entries
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn entries(&self) -> &[(String, Vec<u8>)] {
        &self.entries
    }

    /// Replaces every value of `name`, keeping the position of the first one.
    pub fn set(&mut self, name: &str, value: Vec<u8>) {
        let name = name.to_ascii_lowercase();
        match self.entries.iter().position(|(n, _)| *n == name) {
            Some(first) => {
                self.bytes = self.bytes - self.entries[first].1.len() + value.len();
                self.entries[first].1 = value;
                let mut index = 0;
                let mut dropped = 0;
                self.entries.retain(|(n, v)| {
                    let keep = index <= first || *n != name;
                    if !keep {
                        dropped += n.len() + v.len();
                    }
                    index += 1;
                    keep
                });
                self.bytes -= dropped;
            }
            None => {
                self.bytes += name.len() + value.len();
                self.entries.push((name.clone(), value));
            }
        }
        self.changed.insert(name);
    }

    pub fn append(&mut self, name: &str, value: Vec<u8>) {
        let name = name.to_ascii_lowercase();
        self.bytes += name.len() + value.len();
        self.entries.push((name.clone(), value));
        self.changed.insert(name);
    }

    pub fn remove(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        let before = self.entries.len();
        let mut dropped = 0;
        self.entries.retain(|(n, v)| {
            let keep = *n != name;
            if !keep {
                dropped += n.len() + v.len();
            }
            keep
        });
        debug_assert!(self.entries.len() <= before);
        self.bytes -= dropped;
        self.changed.insert(name);
    }

    /// What changed since the section arrived. One pass over the entries, whatever the number
    /// of changed names: a plugin that touched thousands of them costs the host no more than
    /// it cost the plugin.
    pub fn changes(&self) -> HeaderChanges {
        let mut values: BTreeMap<&str, Vec<Vec<u8>>> = self
            .changed
            .iter()
            .map(|name| (name.as_str(), Vec::new()))
            .collect();
        for (name, value) in &self.entries {
            if let Some(list) = values.get_mut(name.as_str()) {
                list.push(value.clone());
            }
        }
        let mut changes = HeaderChanges::default();
        for (name, values) in values {
            if values.is_empty() {
                changes.removed.push(name.to_string());
            } else {
                changes.set.push((name.to_string(), values));
            }
        }
        changes
    }

    /// The bytes of all names and values.
    pub fn byte_size(&self) -> usize {
        self.bytes
    }
}

/// One body message from Envoy, possibly replaced by plugins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyChunk {
    pub data: Vec<u8>,
    pub end_of_stream: bool,
    pub replaced: bool,
}

impl BodyChunk {
    pub fn new(data: Vec<u8>, end_of_stream: bool) -> Self {
        BodyChunk {
            data,
            end_of_stream,
            replaced: false,
        }
    }

    pub fn replace(&mut self, data: Vec<u8>) {
        self.data = data;
        self.replaced = true;
    }
}

/// What a phase carries into the chain and, changed, back out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Headers {
        headers: HeaderMap,
        end_of_stream: bool,
    },
    Body(BodyChunk),
    Trailers(HeaderMap),
}

/// An answer to the client instead of the upstream's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImmediateResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub grpc_status: Option<u32>,
    pub details: String,
}

/// What the chain decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Pass the message on, changed as it now is.
    Continue(Message),
    /// A plugin that wants the whole body is holding this chunk back: nothing goes on yet.
    Held,
    /// Answer the client now.
    Respond(ImmediateResponse),
}

/// The chain's decision and what plugins asked for on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub effects: Effects,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> HeaderMap {
        HeaderMap::from_entries(
            entries
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        )
    }

    #[test]
    fn names_are_case_insensitive_and_stored_lower_case() {
        let mut headers = map(&[("Content-Type", "text/plain")]);
        assert_eq!(headers.get("content-type"), Some(&b"text/plain"[..]));
        headers.set("X-Tag", b"a".to_vec());
        assert_eq!(headers.entries()[1].0, "x-tag");
    }

    #[test]
    fn set_replaces_every_value_in_place_of_the_first() {
        let mut headers = map(&[("a", "1"), ("b", "2"), ("a", "3")]);
        headers.set("a", b"9".to_vec());
        assert_eq!(headers, {
            let mut expected = map(&[("a", "9"), ("b", "2")]);
            expected.changed.insert("a".into());
            expected
        });
    }

    #[test]
    fn byte_size_follows_every_change() {
        let mut headers = map(&[("a", "1"), ("b", "22"), ("a", "333")]);
        let recount = |h: &HeaderMap| {
            h.entries()
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
        };
        assert_eq!(headers.byte_size(), recount(&headers));
        headers.set("a", b"x".to_vec());
        assert_eq!(headers.byte_size(), recount(&headers));
        headers.append("c", b"yy".to_vec());
        headers.remove("b");
        assert_eq!(headers.byte_size(), recount(&headers));
        assert_eq!(headers.byte_size(), 5);
    }

    #[test]
    fn changes_name_only_what_changed() {
        let mut headers = map(&[("a", "1"), ("b", "2"), ("c", "3")]);
        assert!(headers.changes().is_empty());
        headers.append("a", b"4".to_vec());
        headers.remove("b");
        headers.set("d", b"5".to_vec());
        headers.remove("never-there");
        let changes = headers.changes();
        assert_eq!(
            changes.set,
            vec![
                ("a".to_string(), vec![b"1".to_vec(), b"4".to_vec()]),
                ("d".to_string(), vec![b"5".to_vec()]),
            ]
        );
        assert_eq!(
            changes.removed,
            vec!["b".to_string(), "never-there".to_string()]
        );
    }

    #[test]
    fn a_name_removed_then_set_again_is_a_set() {
        let mut headers = map(&[("a", "1")]);
        headers.remove("a");
        headers.set("a", b"2".to_vec());
        let changes = headers.changes();
        assert_eq!(changes.set, vec![("a".to_string(), vec![b"2".to_vec()])]);
        assert!(changes.removed.is_empty());
    }

    #[test]
    fn phase_sets_hold_what_was_added() {
        let set: PhaseSet = [Phase::RequestHeaders, Phase::ResponseBody]
            .into_iter()
            .collect();
        assert!(set.contains(Phase::RequestHeaders));
        assert!(!set.contains(Phase::RequestBody));
        assert_eq!(set.iter().count(), 2);
        assert!(PhaseSet::EMPTY.is_empty());
    }
}
