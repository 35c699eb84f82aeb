//! Recording live exchanges into exchange files (`[record]`, `POST /record`): what Envoy sent,
//! and, as each exchange's `expect:`, what the serving chain answered, so that
//! `wasm-extproc test --compare CANDIDATE.wasm RECORDING.yaml` shows where a candidate would
//! answer differently.
//!
//! A chain records a sampled share of its exchanges into one file, until a count or a size is
//! reached or the recording is stopped. Values of sensitive headers (`authorization`, `cookie`,
//! `set-cookie`, `proxy-authorization`, `x-api-key` and configured names), of attributes that
//! carry them (`request.headers`, `response.headers`, `response.trailers`, `request.query` and
//! configured names) and of metadata (`envoy.filters.http.jwt_authn` and configured names) are
//! redacted; bodies are left out unless asked for, and not even kept in memory then. Kept
//! bodies are bounded as they arrive, by the recording's `max_bytes`: an exchange whose bodies
//! outgrow it lets them go at once and is not recorded (counted). Streams hand their transcript
//! over as they end; a thread per recording writes, so no stream waits on the disk, and a
//! recording that cannot keep up drops exchanges (counted) rather than hold streams.
//!
//! Only chains that exist are recorded (`POST /record` answers 404 otherwise), into files the
//! host names (`CHAIN-SECONDS-N.yaml`, the chain's name reduced to `A-Z a-z 0-9 . _ -`) in
//! `[record] dir`, readable by the host's user only; at most [`MAX_RECORDINGS`] at once.
//!
//! With nothing recording, a stream pays one atomic load.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};

use crate::authoring::transcript::{Bodies, Redaction, Transcript};
use crate::config::FileRecord;
use crate::ext_proc::observe::{Observer, StreamObserver};
use crate::http::SENSITIVE_HEADERS;

const DEFAULT_SAMPLE: f64 = 0.01;
const DEFAULT_MAX_EXCHANGES: u64 = 1000;
const DEFAULT_MAX_BYTES: u64 = 16 << 20;
/// Exchanges waiting for a recording's writer before more are dropped.
const QUEUE: usize = 256;
/// Recordings under way at once, each a writer thread and an open file: more chains than an
/// operator records together, few enough that a leaked admin token cannot use them up.
pub const MAX_RECORDINGS: usize = 16;
/// Attributes whose values carry headers or credentials, redacted in every recording.
pub const REDACTED_ATTRIBUTES: [&str; 4] = [
    "request.headers",
    "response.headers",
    "response.trailers",
    "request.query",
];
/// Metadata namespaces redacted in every recording: a JWT's verified claims.
pub const REDACTED_METADATA: [&str; 1] = ["envoy.filters.http.jwt_authn"];

/// How one recording runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Options {
    pub sample: f64,
    pub max_exchanges: u64,
    pub max_bytes: u64,
    pub bodies: bool,
}

/// A recording as `GET /record` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub chain: String,
    pub file: PathBuf,
    #[serde(flatten)]
    pub options: Options,
    /// Exchanges handed to the writer so far.
    pub exchanges: u64,
    /// Exchanges dropped because the writer was behind.
    pub dropped: u64,
    /// Exchanges not recorded because their bodies outgrew `max_bytes`.
    pub too_large: u64,
}

/// Why a recording did not start.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("recording needs [record] dir in the configuration")]
    NotConfigured,
    #[error("sample {0}: must be above 0 and at most 1")]
    Sample(f64),
    #[error("{MAX_RECORDINGS} recordings are under way, the most at once: stop one first")]
    TooMany,
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// The recordings of every chain.
#[derive(Debug)]
pub struct Recorder {
    settings: Option<FileRecord>,
    redaction: Redaction,
    /// Whether any chain records: the one thing a stream checks when none does.
    any: AtomicBool,
    active: Mutex<BTreeMap<String, Recording>>,
}

/// A recording under way: its writer ends once this is gone and the queue is drained.
#[derive(Debug, Clone)]
struct Recording {
    shared: Arc<Shared>,
    writer: SyncSender<Box<Transcript>>,
}

/// What a recording's streams and its writer share.
#[derive(Debug)]
struct Shared {
    status: Mutex<Status>,
    /// Set by the writer when the file is full or broken.
    ended: AtomicBool,
    handed: AtomicU64,
    dropped: AtomicU64,
    too_large: AtomicU64,
}

/// Tells recordings started in the same second apart.
static STARTED: AtomicU64 = AtomicU64::new(0);

impl Recorder {
    /// The recorder for `[record]` (`None`: recording is off, and `POST /record` says so),
    /// with the configured chains recording from now.
    pub fn new(settings: Option<FileRecord>) -> Result<Recorder, RecordError> {
        let mut headers: Vec<String> = SENSITIVE_HEADERS.iter().map(|h| h.to_string()).collect();
        let mut attributes: Vec<String> =
            REDACTED_ATTRIBUTES.iter().map(|a| a.to_string()).collect();
        let mut metadata: Vec<String> = REDACTED_METADATA.iter().map(|m| m.to_string()).collect();
        if let Some(settings) = &settings {
            headers.extend(
                settings
                    .redact_headers
                    .iter()
                    .map(|h| h.to_ascii_lowercase()),
            );
            attributes.extend(settings.redact_attributes.iter().cloned());
            metadata.extend(settings.redact_metadata.iter().cloned());
        }
        let recorder = Recorder {
            redaction: Redaction {
                headers,
                attributes,
                metadata,
                bodies: settings.as_ref().is_some_and(|s| s.bodies),
            },
            any: AtomicBool::new(false),
            active: Mutex::new(BTreeMap::new()),
            settings,
        };
        let chains = recorder
            .settings
            .as_ref()
            .map(|s| s.chains.clone())
            .unwrap_or_default();
        for chain in chains {
            recorder.start(&chain, None)?;
        }
        Ok(recorder)
    }

    /// The configured options, `over` where given.
    pub fn options(&self, over: Option<OptionsOverride>) -> Result<Options, RecordError> {
        let settings = self.settings.as_ref().ok_or(RecordError::NotConfigured)?;
        let over = over.unwrap_or_default();
        let options = Options {
            sample: over.sample.or(settings.sample).unwrap_or(DEFAULT_SAMPLE),
            max_exchanges: over
                .max_exchanges
                .or(settings.max_exchanges)
                .unwrap_or(DEFAULT_MAX_EXCHANGES),
            max_bytes: settings.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
            bodies: over.bodies.unwrap_or(settings.bodies),
        };
        if !(options.sample > 0.0 && options.sample <= 1.0) {
            return Err(RecordError::Sample(options.sample));
        }
        Ok(options)
    }

    /// Starts recording `chain` into a new file (ending its recording, if it had one).
    pub fn start(&self, chain: &str, over: Option<OptionsOverride>) -> Result<Status, RecordError> {
        let options = self.options(over)?;
        {
            let active = self.active.lock().expect("not poisoned");
            if !active.contains_key(chain) && active.len() >= MAX_RECORDINGS {
                return Err(RecordError::TooMany);
            }
        }
        let dir = &self.settings.as_ref().expect("options checked").dir;
        std::fs::create_dir_all(dir).map_err(|e| RecordError::Io(dir.clone(), e))?;
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let file = dir.join(format!(
            "{}-{seconds}-{}.yaml",
            file_word(chain),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let mut out = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .map_err(|e| RecordError::Io(file.clone(), e))?
        };
        let header = format!(
            "# Exchanges of chain {chain:?} recorded by wasm-extproc: sample {}, bodies {}, \
             headers redacted: {}.\n# Replay: wasm-extproc test --plugins-dir PLUGINS \
             [--compare CANDIDATE.wasm] {}\nexchanges:\n",
            options.sample,
            if options.bodies { "kept" } else { "left out" },
            self.redaction.headers.join(", "),
            file.display(),
        );
        out.write_all(header.as_bytes())
            .map_err(|e| RecordError::Io(file.clone(), e))?;
        let (writer, queue) = std::sync::mpsc::sync_channel::<Box<Transcript>>(QUEUE);
        let status = Status {
            chain: chain.to_string(),
            file: file.clone(),
            options: options.clone(),
            exchanges: 0,
            dropped: 0,
            too_large: 0,
        };
        let shared = Arc::new(Shared {
            status: Mutex::new(status.clone()),
            ended: AtomicBool::new(false),
            handed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
        });
        let written = shared.clone();
        let redaction = Redaction {
            bodies: options.bodies,
            ..self.redaction.clone()
        };
        let chain_name = chain.to_string();
        std::thread::Builder::new()
            .name("record".into())
            .spawn(move || {
                write(
                    out,
                    &file,
                    &chain_name,
                    &redaction,
                    options,
                    queue,
                    &written,
                )
            })
            .map_err(|e| RecordError::Io(status.file.clone(), e))?;
        let mut active = self.active.lock().expect("not poisoned");
        active.insert(chain.to_string(), Recording { shared, writer });
        self.any.store(true, Ordering::SeqCst);
        tracing::info!(chain, file = %status.file.display(), "recording exchanges");
        Ok(status)
    }

    /// Stops recording `chain`; what it recorded, if it was.
    pub fn stop(&self, chain: &str) -> Option<Status> {
        let mut active = self.active.lock().expect("not poisoned");
        let recording = active.remove(chain)?;
        self.any.store(!active.is_empty(), Ordering::SeqCst);
        Some(recording.shared.status())
    }

    /// Every recording under way.
    pub fn statuses(&self) -> Vec<Status> {
        self.active
            .lock()
            .expect("not poisoned")
            .values()
            .map(|r| r.shared.status())
            .collect()
    }

    /// Whether a stream should keep a transcript for its first message: some chain records.
    pub fn is_recording(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Whether this exchange of `chain` is one to record (sampled), and what of its bodies
    /// to keep if it is.
    fn samples(&self, chain: &str) -> Option<Bodies> {
        let active = self.active.lock().expect("not poisoned");
        let recording = active.get(chain)?;
        let shared = &recording.shared;
        let options = shared.status.lock().expect("not poisoned").options.clone();
        let sampled = !shared.ended.load(Ordering::Relaxed) && fastrand::f64() < options.sample;
        sampled.then_some(if options.bodies {
            Bodies::UpTo(options.max_bytes)
        } else {
            Bodies::Never
        })
    }

    /// Hands an exchange of `chain` that ended to its recording's writer.
    fn record(&self, chain: &str, transcript: Box<Transcript>) {
        let mut active = self.active.lock().expect("not poisoned");
        let Some(recording) = active.get(chain) else {
            return;
        };
        let shared = recording.shared.clone();
        if transcript.too_large() {
            shared.too_large.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let limit = shared
            .status
            .lock()
            .expect("not poisoned")
            .options
            .max_exchanges;
        let over = match recording.writer.try_send(transcript) {
            Ok(()) => {
                let handed = shared.handed.fetch_add(1, Ordering::SeqCst) + 1;
                if handed >= limit {
                    tracing::info!(chain, "recording reached its {limit} exchanges");
                }
                handed >= limit || shared.ended.load(Ordering::SeqCst)
            }
            Err(TrySendError::Full(_)) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
            // The writer stopped: the file is full or broken.
            Err(TrySendError::Disconnected(_)) => true,
        };
        if over {
            active.remove(chain);
            self.any.store(!active.is_empty(), Ordering::SeqCst);
        }
    }
}

impl Observer for Recorder {
    fn is_observing(&self) -> bool {
        self.is_recording()
    }

    fn observe(self: Arc<Self>) -> Box<dyn StreamObserver> {
        Box::new(StreamTranscript {
            recorder: self,
            // Until the chain is known to record and keep bodies: the first message carries
            // headers.
            transcript: Box::new(Transcript::recording(Bodies::Never)),
            message: None,
        })
    }
}

/// A stream that may be recorded: its transcript so far, and the message being processed.
/// Whether it is recorded is known at its first answer, once its chain is.
struct StreamTranscript {
    recorder: Arc<Recorder>,
    transcript: Box<Transcript>,
    message: Option<Box<ProcessingRequest>>,
}

impl StreamObserver for StreamTranscript {
    /// Keeps a copy of `request`: without its body, unless the recording keeps bodies.
    fn received(&mut self, request: &ProcessingRequest) {
        self.message = Some(Box::new(copy(request, self.transcript.keeps_bodies())));
    }

    /// Adds the message kept and its answers to the transcript; after the first, goes on only
    /// if the chain records and this exchange is sampled.
    fn answered(&mut self, chain: &str, answers: &[ProcessingResponse]) -> ControlFlow<()> {
        let Some(message) = self.message.take() else {
            return ControlFlow::Continue(());
        };
        if self.transcript.messages.is_empty() {
            let Some(bodies) = self.recorder.samples(chain) else {
                return ControlFlow::Break(());
            };
            self.transcript.keep_bodies(bodies);
        }
        self.transcript.exchange(&message, answers);
        ControlFlow::Continue(())
    }

    /// A recorded exchange goes to its recording when its stream ends.
    fn ended(self: Box<Self>, chain: &str) {
        if !self.transcript.messages.is_empty() {
            self.recorder.record(chain, self.transcript);
        }
    }
}

/// A copy of `request` for a transcript, its body left out unless `body`: a recording that
/// keeps no bodies copies none.
fn copy(request: &ProcessingRequest, body: bool) -> ProcessingRequest {
    use envoy_types::pb::envoy::service::ext_proc::v3::HttpBody;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    let without = |b: &HttpBody| HttpBody {
        body: Vec::new(),
        end_of_stream: b.end_of_stream,
        ..HttpBody::default()
    };
    let message = match &request.request {
        Some(Request::RequestBody(b)) if !body => Some(Request::RequestBody(without(b))),
        Some(Request::ResponseBody(b)) if !body => Some(Request::ResponseBody(without(b))),
        other => other.clone(),
    };
    // What a transcript reads; flow control is no part of an exchange file.
    ProcessingRequest {
        request: message,
        metadata_context: request.metadata_context.clone(),
        attributes: request.attributes.clone(),
        observability_mode: request.observability_mode,
        protocol_config: request.protocol_config,
        ..ProcessingRequest::default()
    }
}

/// Overrides of the configured options, from `POST /record`'s query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptionsOverride {
    pub sample: Option<f64>,
    pub max_exchanges: Option<u64>,
    pub bodies: Option<bool>,
}

/// What `POST /record?...` asks.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordRequest {
    Start(String, OptionsOverride),
    Stop(String),
}

impl RecordRequest {
    /// Reads `chain=NAME[&sample=F][&max_exchanges=N][&bodies=true|false]`, or
    /// `chain=NAME&stop=true`.
    pub fn from_query(query: &str) -> Result<RecordRequest, String> {
        let mut chain = None;
        let mut over = OptionsOverride::default();
        let mut stop = false;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let bad = |what: &str| format!("{key}={value}: {what}");
            match &*key {
                "chain" => chain = Some(value.into_owned()),
                "sample" => over.sample = Some(value.parse().map_err(|_| bad("not a number"))?),
                "max_exchanges" => {
                    over.max_exchanges = Some(value.parse().map_err(|_| bad("not a count"))?);
                }
                "bodies" => over.bodies = Some(value.parse().map_err(|_| bad("true or false"))?),
                "stop" => stop = value.parse().map_err(|_| bad("true or false"))?,
                _ => {
                    return Err(format!(
                        "unknown parameter {key:?}: chain, sample, max_exchanges, bodies, stop"
                    ));
                }
            }
        }
        let chain = chain.ok_or("chain=NAME is required")?;
        Ok(if stop {
            RecordRequest::Stop(chain)
        } else {
            RecordRequest::Start(chain, over)
        })
    }
}

/// `chain` as a word for a file name: only `A-Z a-z 0-9 . _ -`, the rest `_`, at most 64
/// characters, never `.` or `..`.
fn file_word(chain: &str) -> String {
    let word: String = chain
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if word.is_empty() || word.bytes().all(|b| b == b'.') {
        format!("chain{}", word.len())
    } else {
        word
    }
}

impl Shared {
    fn status(&self) -> Status {
        let mut status = self.status.lock().expect("not poisoned").clone();
        status.exchanges = self.handed.load(Ordering::SeqCst);
        status.dropped = self.dropped.load(Ordering::SeqCst);
        status.too_large = self.too_large.load(Ordering::SeqCst);
        status
    }
}

/// The writer of one recording: appends each exchange as an item of the file's `exchanges:`
/// list, flushed, until the size limit or the end of the recording.
fn write(
    mut out: std::fs::File,
    file: &Path,
    chain: &str,
    redaction: &Redaction,
    options: Options,
    queue: std::sync::mpsc::Receiver<Box<Transcript>>,
    recording: &Shared,
) {
    let mut written = 0u64;
    let mut number = 0u64;
    while let Ok(transcript) = queue.recv() {
        number += 1;
        let name = format!("#{number} {}", transcript.summary());
        let Some(exchange) = transcript.recorded(name, chain, redaction) else {
            continue;
        };
        let yaml = match serde_yaml_ng::to_string(&exchange) {
            Ok(yaml) => yaml,
            Err(error) => {
                tracing::warn!(chain, %error, "an exchange could not be written down");
                continue;
            }
        };
        let mut item = String::with_capacity(yaml.len() + 64);
        for (i, line) in yaml.lines().enumerate() {
            item.push_str(if i == 0 { "  - " } else { "    " });
            item.push_str(line);
            item.push('\n');
        }
        if written + item.len() as u64 > options.max_bytes {
            tracing::info!(chain, file = %file.display(), "recording reached its {} bytes", options.max_bytes);
            break;
        }
        if let Err(error) = out.write_all(item.as_bytes()).and_then(|()| out.flush()) {
            tracing::warn!(chain, file = %file.display(), %error, "recording stopped: cannot write");
            break;
        }
        written += item.len() as u64;
    }
    recording.ended.store(true, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingRequest};

    use super::*;

    /// A request's headers, as Envoy sends them, through a recording transcript.
    fn exchange(path: &str) -> Box<Transcript> {
        let header = |key: &str, value: &str| HeaderValue {
            key: key.into(),
            raw_value: value.as_bytes().to_vec(),
            ..HeaderValue::default()
        };
        let request = ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![
                        header(":method", "GET"),
                        header(":path", path),
                        header("cookie", "session=s3cret"),
                    ],
                }),
                end_of_stream: true,
                ..HttpHeaders::default()
            })),
            ..ProcessingRequest::default()
        };
        let mut transcript = Box::new(Transcript::recording(Bodies::Never));
        transcript.exchange(&request, &[]);
        transcript
    }

    fn recorder(dir: &Path, max_exchanges: u64, max_bytes: u64) -> Recorder {
        Recorder::new(Some(FileRecord {
            dir: dir.to_path_buf(),
            chains: vec!["default".into()],
            sample: Some(1.0),
            max_exchanges: Some(max_exchanges),
            max_bytes: Some(max_bytes),
            bodies: false,
            redact_headers: Vec::new(),
            redact_attributes: Vec::new(),
            redact_metadata: Vec::new(),
        }))
        .unwrap()
    }

    /// The recording's text once its writer has written `items` exchanges, or after 5 s.
    fn written(file: &Path, items: usize) -> String {
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(file).unwrap();
            if text.matches("\n  - name: ").count() >= items {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        text
    }

    #[test]
    fn a_recording_ends_at_its_count_with_secrets_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = recorder(dir.path(), 3, 1 << 20);
        let file = recorder.statuses()[0].file.clone();
        assert!(recorder.is_recording());
        assert_eq!(recorder.samples("default"), Some(Bodies::Never));
        assert_eq!(recorder.samples("other"), None, "only the chains asked for");
        for i in 0..5 {
            recorder.record("default", exchange(&format!("/{i}")));
        }
        assert!(
            !recorder.is_recording(),
            "three exchanges asked for, three handed over"
        );
        let text = written(&file, 3);
        assert_eq!(text.matches("\n  - name: ").count(), 3, "{text}");
        assert!(
            text.contains("name: '#3 GET /2'") && !text.contains("/3"),
            "{text}"
        );
        assert!(
            !text.contains("s3cret") && text.contains("cookie: '[redacted]'"),
            "{text}"
        );
        let replayed: crate::authoring::file::ExchangeFile =
            serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(replayed.exchanges.len(), 3);
    }

    #[test]
    fn attributes_and_metadata_that_carry_secrets_are_redacted() {
        use envoy_types::pb::envoy::config::core::v3::Metadata;
        use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
        let text = |s: &str| Value {
            kind: Some(Kind::StringValue(s.into())),
        };
        let fields = |pairs: &[(&str, &str)]| Struct {
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), text(v)))
                .collect(),
        };
        let mut request = ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap::default()),
                end_of_stream: true,
                ..HttpHeaders::default()
            })),
            ..ProcessingRequest::default()
        };
        request.attributes.insert(
            "envoy.filters.http.ext_proc".into(),
            fields(&[
                ("request.headers", "{\"authorization\":\"Bearer s3cret\"}"),
                ("request.query", "token=s3cret"),
                ("source.address", "10.0.0.7:4000"),
            ]),
        );
        request.metadata_context = Some(Metadata {
            filter_metadata: [
                (
                    "envoy.filters.http.jwt_authn".to_string(),
                    fields(&[("payload", "s3cret")]),
                ),
                ("other".to_string(), fields(&[("kept", "yes")])),
            ]
            .into(),
            ..Metadata::default()
        });
        let mut transcript = Transcript::recording(Bodies::Never);
        transcript.exchange(&request, &[]);
        let dir = tempfile::tempdir().unwrap();
        let recorder = recorder(dir.path(), 10, 1 << 20);
        let exchange = transcript
            .recorded("one".into(), "default", &recorder.redaction)
            .unwrap();
        let yaml = serde_yaml_ng::to_string(&exchange).unwrap();
        assert!(!yaml.contains("s3cret"), "{yaml}");
        assert!(
            yaml.contains("10.0.0.7:4000") && yaml.contains("kept: yes"),
            "{yaml}"
        );
    }

    #[test]
    fn recordings_at_once_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = recorder(dir.path(), 10, 1 << 20);
        for i in 1..MAX_RECORDINGS {
            recorder.start(&format!("chain-{i}"), None).unwrap();
        }
        assert!(matches!(
            recorder.start("one-too-many", None),
            Err(RecordError::TooMany)
        ));
        // Restarting one under way is not one more.
        assert!(recorder.start("chain-1", None).is_ok());
        assert_eq!(file_word("../.."), ".._..");
        assert_eq!(file_word(".."), "chain2");
        assert_eq!(file_word("a/b c{}"), "a_b_c__");
    }

    #[test]
    fn a_recording_ends_at_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = recorder(dir.path(), 1000, 1000);
        let file = recorder.statuses()[0].file.clone();
        for i in 0..20 {
            recorder.record("default", exchange(&format!("/{i}")));
        }
        let header = written(&file, 1).find("exchanges:\n").unwrap() + "exchanges:\n".len();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let text = std::fs::read_to_string(&file).unwrap();
        let items = text.matches("\n  - name: ").count();
        assert!((1..20).contains(&items), "{items} written: {text}");
        assert!(
            text.len() - header <= 1000,
            "{} bytes: {text}",
            text.len() - header
        );
        // The writer stopped: the next exchange ends the recording.
        recorder.record("default", exchange("/late"));
        assert!(!recorder.is_recording());
    }

    #[test]
    fn post_record_queries_are_read_strictly() {
        assert_eq!(
            RecordRequest::from_query("chain=checkout&sample=0.5&bodies=true"),
            Ok(RecordRequest::Start(
                "checkout".into(),
                OptionsOverride {
                    sample: Some(0.5),
                    max_exchanges: None,
                    bodies: Some(true),
                }
            ))
        );
        assert_eq!(
            RecordRequest::from_query("chain=checkout&stop=true"),
            Ok(RecordRequest::Stop("checkout".into()))
        );
        for (query, error) in [
            ("sample=1", "chain=NAME is required"),
            ("chain=a&sample=x", "sample=x: not a number"),
            ("chain=a&every=1", "unknown parameter \"every\""),
        ] {
            let found = RecordRequest::from_query(query).unwrap_err();
            assert!(found.contains(error), "{query}: {found}");
        }
        let dir = tempfile::tempdir().unwrap();
        let recorder = recorder(dir.path(), 1, 1);
        assert!(matches!(
            recorder.start(
                "default",
                Some(OptionsOverride {
                    sample: Some(0.0),
                    ..OptionsOverride::default()
                })
            ),
            Err(RecordError::Sample(_))
        ));
    }
}
