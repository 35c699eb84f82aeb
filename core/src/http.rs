//! The host's own words for an HTTP exchange: phases, header sections, body messages and what a
//! plugin chain decides. Neither Envoy's protobufs nor wasmtime appear here, so the protocol
//! state machine and the plugin runtime meet on neutral ground.

use std::collections::BTreeMap;
use std::fmt;

/// Largest ext_proc message the server accepts or sends. Envoy buffers bodies up to its
/// connection buffer limit before sending them whole in BUFFERED mode; 8 MiB leaves room for
/// raised limits without letting one message hold unbounded memory.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// What a message needs besides the body it carries: its headers, mutations and framing.
pub const MESSAGE_OVERHEAD_BYTES: usize = 64 << 10;

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

    pub const BOTH: [Direction; 2] = [Direction::Request, Direction::Response];
}

/// One `T` for each direction, indexed by [`Direction`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerDirection<T>(pub [T; 2]);

impl<T> std::ops::Index<Direction> for PerDirection<T> {
    type Output = T;

    fn index(&self, direction: Direction) -> &T {
        &self.0[direction as usize]
    }
}

impl<T> std::ops::IndexMut<Direction> for PerDirection<T> {
    fn index_mut(&mut self, direction: Direction) -> &mut T {
        &mut self.0[direction as usize]
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

impl Delivery {
    /// The ext_proc body modes that bring a plugin its body this way.
    pub fn envoy_body_modes(self) -> &'static str {
        match self {
            Delivery::Chunks => "STREAMED or FULL_DUPLEX_STREAMED (BUFFERED gives one call)",
            Delivery::Whole => "BUFFERED, or FULL_DUPLEX_STREAMED with trailers SEND",
        }
    }
}

impl Registration {
    /// What Envoy's ext_proc filter (`processing_mode`) must send for every phase the plugin
    /// handles to reach it, beyond its defaults (headers are sent unless switched off): one
    /// setting each, `request_body_mode: BUFFERED, or ...`.
    pub fn envoy_needs(&self) -> Vec<String> {
        let mut needs = Vec::new();
        for direction in Direction::BOTH {
            let noun = direction.noun();
            if self.phases.contains(direction.body()) {
                needs.push(format!(
                    "{noun}_body_mode: {}",
                    self.delivery(direction).envoy_body_modes()
                ));
            }
            if self.phases.contains(direction.trailers()) {
                needs.push(format!("{noun}_trailer_mode: SEND"));
            }
        }
        needs
    }

    pub fn delivery(&self, direction: Direction) -> Delivery {
        match direction {
            Direction::Request => self.request_body,
            Direction::Response => self.response_body,
        }
    }
}

/// Headers whose values the host never writes to a log or a recording: credentials, sessions,
/// and the API key the bundled rate limit keys on.
pub const SENSITIVE_HEADERS: [&str; 5] = [
    "authorization",
    "cookie",
    "set-cookie",
    "proxy-authorization",
    "x-api-key",
];

/// How Envoy sends a body (its `processing_mode`), as it told the host in `protocol_config`;
/// spelled as Envoy's enum (`FULL_DUPLEX_STREAMED`) where it is read from a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BodyMode {
    /// Not sent, or Envoy did not say.
    #[default]
    None,
    Streamed,
    Buffered,
    BufferedPartial,
    FullDuplexStreamed,
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
/// It keeps a journal of the changes made since the last [`checkpoint`](Self::checkpoint), so a
/// plugin's changes can be checked on their own ([`changes`](Self::changes)) and undone
/// ([`rollback`](Self::rollback)) without copying the section before every call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    entries: Vec<(String, Vec<u8>)>,
    /// The bytes of all names and values, kept up to date so bounds checks cost nothing.
    bytes: usize,
    /// How to undo each change since the checkpoint, in the order they were made.
    journal: Vec<Undo>,
    /// The names changed since the checkpoint, in the order first changed.
    touched: Vec<String>,
}

/// How to undo one change to a [`HeaderMap`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Undo {
    /// An entry was added at the end.
    Pushed,
    /// The value at this position was replaced; this was the old one.
    Replaced(usize, Vec<u8>),
    /// This entry was removed from this position.
    Removed(usize, (String, Vec<u8>)),
}

/// The net effect of changes to a [`HeaderMap`]: for each changed name, its values now (none
/// when the name was removed), in the order the names were first changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderChanges {
    pub set: Vec<(String, Vec<Vec<u8>>)>,
    pub removed: Vec<String>,
}

impl HeaderChanges {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.removed.is_empty()
    }

    /// Adds `later` changes on top of these: a name `later` changed has the values it gave.
    pub fn absorb(&mut self, later: HeaderChanges) {
        if self.is_empty() {
            *self = later;
            return;
        }
        let changed = |name: &String| {
            later.set.iter().any(|(n, _)| n == name) || later.removed.contains(name)
        };
        self.set.retain(|(name, _)| !changed(name));
        self.removed.retain(|name| !changed(name));
        self.set.extend(later.set);
        self.removed.extend(later.removed);
    }
}

impl HeaderMap {
    /// A section as it arrived from Envoy: nothing is marked changed. Names are lower-cased in
    /// place (Envoy sends them lower-case already).
    pub fn from_entries(entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        let entries: Vec<(String, Vec<u8>)> = entries
            .into_iter()
            .map(|(mut name, value)| {
                name.make_ascii_lowercase();
                (name, value)
            })
            .collect();
        let bytes = entries.iter().map(|(n, v)| n.len() + v.len()).sum();
        HeaderMap {
            entries,
            bytes,
            journal: Vec::new(),
            touched: Vec::new(),
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
    pub fn set(&mut self, mut name: String, value: Vec<u8>) {
        name.make_ascii_lowercase();
        match self.entries.iter().position(|(n, _)| *n == name) {
            Some(first) => {
                self.bytes = self.bytes - self.entries[first].1.len() + value.len();
                let old = std::mem::replace(&mut self.entries[first].1, value);
                self.journal.push(Undo::Replaced(first, old));
                self.remove_after(first, &name);
            }
            None => {
                self.bytes += name.len() + value.len();
                self.touch(&name);
                self.entries.push((name, value));
                self.journal.push(Undo::Pushed);
                return;
            }
        }
        self.touch(&name);
    }

    pub fn append(&mut self, mut name: String, value: Vec<u8>) {
        name.make_ascii_lowercase();
        self.bytes += name.len() + value.len();
        self.touch(&name);
        self.entries.push((name, value));
        self.journal.push(Undo::Pushed);
    }

    pub fn remove(&mut self, mut name: String) {
        name.make_ascii_lowercase();
        self.remove_after(0, &name);
        if self.entries.first().is_some_and(|(n, _)| *n == name) {
            let entry = self.entries.remove(0);
            self.bytes -= entry.0.len() + entry.1.len();
            self.journal.push(Undo::Removed(0, entry));
        }
        self.touch(&name);
    }

    /// Removes the entries named `name` after position `first`, last first, so each journal
    /// entry's position holds when it is undone.
    fn remove_after(&mut self, first: usize, name: &str) {
        for index in (first + 1..self.entries.len()).rev() {
            if self.entries[index].0 == name {
                let entry = self.entries.remove(index);
                self.bytes -= entry.0.len() + entry.1.len();
                self.journal.push(Undo::Removed(index, entry));
            }
        }
    }

    fn touch(&mut self, name: &str) {
        if !self.touched.iter().any(|n| n == name) {
            self.touched.push(name.to_string());
        }
    }

    /// The changes made since the last checkpoint (or since the section arrived): one pass
    /// over the entries, whatever the number of changed names.
    pub fn changes(&self) -> HeaderChanges {
        let mut values: Vec<Vec<Vec<u8>>> = vec![Vec::new(); self.touched.len()];
        for (name, value) in &self.entries {
            if let Some(at) = self.touched.iter().position(|n| n == name) {
                values[at].push(value.clone());
            }
        }
        let mut changes = HeaderChanges::default();
        for (name, values) in self.touched.iter().zip(values) {
            if values.is_empty() {
                changes.removed.push(name.clone());
            } else {
                changes.set.push((name.clone(), values));
            }
        }
        changes
    }

    /// Keeps the changes made so far: later rollbacks return here.
    pub fn checkpoint(&mut self) {
        self.journal.clear();
        self.touched.clear();
    }

    /// Undoes every change since the last checkpoint.
    pub fn rollback(&mut self) {
        while let Some(undo) = self.journal.pop() {
            match undo {
                Undo::Pushed => {
                    self.entries.pop();
                }
                Undo::Replaced(index, value) => self.entries[index].1 = value,
                Undo::Removed(index, entry) => self.entries.insert(index, entry),
            }
        }
        self.touched.clear();
        self.bytes = self.entries.iter().map(|(n, v)| n.len() + v.len()).sum();
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
    /// Whether a plugin replaced the data: only then does the answer carry it back.
    pub replaced: bool,
    /// The data and `replaced` as they were at the last checkpoint, kept by the first
    /// replacement after it, so a failed plugin's replacement can be undone without a copy.
    before: Option<(Vec<u8>, bool)>,
}

impl BodyChunk {
    pub fn new(data: Vec<u8>, end_of_stream: bool) -> Self {
        BodyChunk {
            data,
            end_of_stream,
            ..BodyChunk::default()
        }
    }

    pub fn replace(&mut self, data: Vec<u8>) {
        let old = std::mem::replace(&mut self.data, data);
        if self.before.is_none() {
            self.before = Some((old, self.replaced));
        }
        self.replaced = true;
    }

    fn checkpoint(&mut self) {
        self.before = None;
    }

    fn rollback(&mut self) {
        if let Some((data, replaced)) = self.before.take() {
            self.data = data;
            self.replaced = replaced;
        }
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

impl Message {
    /// Keeps the changes made so far: a later [`rollback`](Self::rollback) returns here.
    pub fn checkpoint(&mut self) {
        match self {
            Message::Headers { headers, .. } | Message::Trailers(headers) => headers.checkpoint(),
            Message::Body(body) => body.checkpoint(),
        }
    }

    /// Undoes the changes made since the last checkpoint.
    pub fn rollback(&mut self) {
        match self {
            Message::Headers { headers, .. } | Message::Trailers(headers) => headers.rollback(),
            Message::Body(body) => body.rollback(),
        }
    }
}

/// What goes back to Envoy for a message the chain passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// The net changes to a header or trailer section.
    Headers(HeaderChanges),
    /// The body message as it now is.
    Body(BodyChunk),
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
    /// Pass the message on, with these changes.
    Continue(Changes),
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
    /// On the body message that ends the time the direction's headers stayed open to body
    /// handlers (see [`StreamChain`](crate::chain::StreamChain)): what those handlers changed
    /// in them, for the answer to carry. The headers go on with that answer.
    pub headers: Option<HeaderChanges>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_says_what_envoy_must_send() {
        let headers_only = Registration {
            phases: PhaseSet::EMPTY
                .with(Phase::RequestHeaders)
                .with(Phase::ResponseHeaders),
            ..Registration::default()
        };
        assert!(headers_only.envoy_needs().is_empty());
        let redact = Registration {
            phases: PhaseSet::EMPTY
                .with(Phase::RequestBody)
                .with(Phase::ResponseTrailers),
            request_body: Delivery::Whole,
            response_body: Delivery::Chunks,
        };
        assert_eq!(
            redact.envoy_needs(),
            [
                "request_body_mode: BUFFERED, or FULL_DUPLEX_STREAMED with trailers SEND",
                "response_trailer_mode: SEND",
            ]
        );
    }

    fn map(entries: &[(&str, &str)]) -> HeaderMap {
        HeaderMap::from_entries(
            entries
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        )
    }

    fn pairs(headers: &HeaderMap) -> Vec<(&str, &[u8])> {
        headers
            .entries()
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect()
    }

    #[test]
    fn names_are_case_insensitive_and_stored_lower_case() {
        let mut headers = map(&[("Content-Type", "text/plain")]);
        assert_eq!(headers.get("content-type"), Some(&b"text/plain"[..]));
        headers.set("X-Tag".into(), b"a".to_vec());
        assert_eq!(headers.entries()[1].0, "x-tag");
    }

    #[test]
    fn set_replaces_every_value_in_place_of_the_first() {
        let mut headers = map(&[("a", "1"), ("b", "2"), ("a", "3")]);
        headers.set("a".into(), b"9".to_vec());
        assert_eq!(pairs(&headers), [("a", &b"9"[..]), ("b", b"2")]);
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
        headers.set("a".into(), b"x".to_vec());
        assert_eq!(headers.byte_size(), recount(&headers));
        headers.append("c".into(), b"yy".to_vec());
        headers.remove("b".into());
        assert_eq!(headers.byte_size(), recount(&headers));
        assert_eq!(headers.byte_size(), 5);
    }

    #[test]
    fn changes_name_only_what_changed_in_the_order_changed() {
        let mut headers = map(&[("a", "1"), ("b", "2"), ("c", "3")]);
        assert!(headers.changes().is_empty());
        headers.append("a".into(), b"4".to_vec());
        headers.remove("b".into());
        headers.set("d".into(), b"5".to_vec());
        headers.remove("never-there".into());
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
        headers.remove("a".into());
        headers.set("a".into(), b"2".to_vec());
        let changes = headers.changes();
        assert_eq!(changes.set, vec![("a".to_string(), vec![b"2".to_vec()])]);
        assert!(changes.removed.is_empty());
    }

    #[test]
    fn rollback_restores_the_section_exactly_as_it_was_at_the_checkpoint() {
        let original = map(&[("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("b", "5")]);
        let mut headers = original.clone();
        headers.set("b".into(), b"9".to_vec());
        headers.append("a".into(), b"6".to_vec());
        headers.remove("a".into());
        headers.set("new".into(), b"7".to_vec());
        headers.remove("c".into());
        headers.set("b".into(), b"8".to_vec());
        assert_ne!(pairs(&headers), pairs(&original));
        headers.rollback();
        assert_eq!(pairs(&headers), pairs(&original));
        assert_eq!(headers.byte_size(), original.byte_size());
        assert!(headers.changes().is_empty());

        // A checkpoint keeps what came before it.
        headers.set("kept".into(), b"1".to_vec());
        headers.checkpoint();
        headers.remove("kept".into());
        headers.rollback();
        assert_eq!(headers.get("kept"), Some(&b"1"[..]));
    }

    #[test]
    fn later_changes_to_a_name_replace_earlier_ones() {
        let mut first = map(&[("a", "1"), ("b", "2")]);
        first.set("a".into(), b"x".to_vec());
        first.remove("b".into());
        let mut changes = first.changes();
        first.checkpoint();
        first.set("b".into(), b"y".to_vec());
        first.append("a".into(), b"z".to_vec());
        changes.absorb(first.changes());
        assert_eq!(
            changes.set,
            vec![
                ("b".to_string(), vec![b"y".to_vec()]),
                ("a".to_string(), vec![b"x".to_vec(), b"z".to_vec()]),
            ]
        );
        assert!(changes.removed.is_empty());
    }

    #[test]
    fn a_replaced_body_rolls_back_to_its_checkpoint() {
        let mut message = Message::Body(BodyChunk::new(b"one".to_vec(), true));
        let Message::Body(body) = &mut message else {
            unreachable!()
        };
        body.replace(b"two".to_vec());
        message.checkpoint();
        let Message::Body(body) = &mut message else {
            unreachable!()
        };
        body.replace(b"three".to_vec());
        body.replace(b"four".to_vec());
        message.rollback();
        let Message::Body(body) = &message else {
            unreachable!()
        };
        assert_eq!((body.data.as_slice(), body.replaced), (&b"two"[..], true));
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
