//! Safe wrappers over the callbacks of one Envoy stream, and over Envoy's log.
//!
//! Every `unsafe` call into Envoy is here or in [`hooks`](crate::hooks). What makes them sound
//! is the same for all: Envoy hands the filter's pointer to each hook, on the stream's worker
//! thread, and it stays valid until `on_http_filter_destroy`; an [`EnvoyStream`] is built from
//! it inside a hook and does not outlive the hook. Buffers Envoy returns point into its own
//! memory and are copied before the next call that could change them.

#![allow(unsafe_code, reason = "calls into Envoy's C ABI")]

use std::ptr;
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};
use std::time::Instant;

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use wasm_extproc_core::config::Origin;
use wasm_extproc_core::runtime::{Answer, HttpBody, HttpError, Way};

use wasm_extproc_core::http::{Direction, ImmediateResponse, PerDirection};

use crate::abi::{
    self, EnvoyBuffer, EnvoyHttpHeader, FilterEnvoyPtr, ModuleBuffer, ModuleHttpHeader,
    SchedulerPtr,
};
use crate::exchange::{Alarm, BodyPlace, Clusters, Envoy, Section};
use crate::filter_config::RouteConfig;

/// One stream's side in Envoy, for the length of one hook.
///
/// An immediate response is held until [`send_held_response`](Self::send_held_response):
/// Envoy ends the stream from inside `send_response`, calling the filter's other hooks
/// (`stream_complete`) there and then, so it must be sent only once nothing borrows the
/// filter.
#[derive(Debug)]
pub struct EnvoyStream {
    ptr: FilterEnvoyPtr,
    response: Option<ImmediateResponse>,
    /// Directions to let go on once the hook's borrows end: Envoy may call the filter's
    /// other hooks from inside `continue_decoding` (a local reply further on).
    go_on: PerDirection<bool>,
}

impl EnvoyStream {
    /// # Safety
    ///
    /// `ptr` is the filter pointer Envoy passed to the hook running now, and the value does
    /// not outlive that hook.
    pub unsafe fn new(ptr: FilterEnvoyPtr) -> Self {
        EnvoyStream {
            ptr,
            response: None,
            go_on: PerDirection::default(),
        }
    }

    /// Does what the hook left for after its borrows: sends the immediate response the
    /// exchange asked for, if any, or else lets the directions it asked for go on. Envoy may
    /// call the filter's hooks before this returns.
    pub fn send_held(&mut self) {
        let go_on = std::mem::take(&mut self.go_on);
        let Some(response) = self.response.take() else {
            for direction in Direction::BOTH {
                if !go_on[direction] {
                    continue;
                }
                // SAFETY: the stream pointer is live.
                unsafe {
                    match direction {
                        Direction::Request => {
                            abi::envoy_dynamic_module_callback_http_filter_continue_decoding(
                                self.ptr,
                            );
                        }
                        Direction::Response => {
                            abi::envoy_dynamic_module_callback_http_filter_continue_encoding(
                                self.ptr,
                            );
                        }
                    }
                }
            }
            return;
        };
        let grpc_status = response.grpc_status.map(|status| status.to_string());
        let mut headers: Vec<ModuleHttpHeader> = response
            .headers
            .iter()
            .map(|(name, value)| (name.as_bytes(), value.as_slice()))
            .chain(
                grpc_status
                    .as_deref()
                    .map(|s| (&b"grpc-status"[..], s.as_bytes())),
            )
            .map(lent_header)
            .collect();
        // SAFETY: the stream pointer is live; every buffer outlives the call, which copies.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                u32::from(response.status),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(&response.body),
                ModuleBuffer::of(response.details.as_bytes()),
            );
        }
    }

    /// Adds `value` to counter `id` (defined by this stream's filter configuration) with
    /// `labels` in the order they were defined.
    pub fn increment_counter(&mut self, id: usize, labels: &[&str], value: u64) {
        let mut labels: Vec<ModuleBuffer> = labels
            .iter()
            .map(|l| ModuleBuffer::of(l.as_bytes()))
            .collect();
        // SAFETY: the stream pointer is live (see `new`); the label buffers outlive the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_increment_counter(
                self.ptr,
                id,
                labels.as_mut_ptr(),
                labels.len(),
                value,
            );
        }
    }

    /// Sets gauge `id` to `value`.
    pub fn set_gauge(&mut self, id: usize, value: u64) {
        // SAFETY: the stream pointer is live (see `new`); no labels.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_set_gauge(
                self.ptr,
                id,
                ptr::null_mut(),
                0,
                value,
            );
        }
    }
}

fn header_type(section: Section) -> u32 {
    match section {
        Section::Headers(Direction::Request) => abi::header_type::REQUEST_HEADER,
        Section::Trailers(Direction::Request) => abi::header_type::REQUEST_TRAILER,
        Section::Headers(Direction::Response) => abi::header_type::RESPONSE_HEADER,
        Section::Trailers(Direction::Response) => abi::header_type::RESPONSE_TRAILER,
    }
}

fn body_type(direction: Direction, place: BodyPlace) -> u32 {
    match (direction, place) {
        (Direction::Request, BodyPlace::Received) => abi::body_type::RECEIVED_REQUEST,
        (Direction::Request, BodyPlace::Buffered) => abi::body_type::BUFFERED_REQUEST,
        (Direction::Response, BodyPlace::Received) => abi::body_type::RECEIVED_RESPONSE,
        (Direction::Response, BodyPlace::Buffered) => abi::body_type::BUFFERED_RESPONSE,
    }
}

/// A stream's Envoy scheduler, as a waker: waking it, from any thread, has Envoy call the
/// stream's `scheduled` hook on its worker. Closed (deleted) on the worker when the exchange
/// ends; a wake after that does nothing.
#[derive(Debug)]
struct Scheduler(Mutex<Option<SchedulerHandle>>);

#[derive(Debug)]
struct SchedulerHandle(SchedulerPtr);

// SAFETY: Envoy's scheduler is made to be committed to from any thread; the pointer is only
// used under the mutex, and deleted once, under it.
unsafe impl Send for SchedulerHandle {}

impl Scheduler {
    fn close(&self) {
        let taken = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = taken {
            // SAFETY: made by `scheduler_new` and deleted only here, once.
            unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(handle.0) };
        }
    }
}

impl Wake for Scheduler {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let scheduler = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(handle) = scheduler.as_ref() {
            // SAFETY: the scheduler is live until `close`, which takes the same lock.
            unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(handle.0, 0) };
        }
    }
}

/// A header lent to Envoy for one call: the bytes must outlive it.
fn lent_header((name, value): (&[u8], &[u8])) -> ModuleHttpHeader {
    ModuleHttpHeader {
        key_ptr: name.as_ptr().cast(),
        key_length: name.len(),
        value_ptr: value.as_ptr().cast(),
        value_length: value.len(),
    }
}

/// Copies bytes Envoy lent.
///
/// # Safety
///
/// `ptr` points to `length` readable bytes, or `length` is 0.
unsafe fn copy(ptr: *const std::ffi::c_char, length: usize) -> Vec<u8> {
    if length == 0 || ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), length) }.to_vec()
}

impl Envoy for EnvoyStream {
    fn header_entries(&mut self, section: Section) -> Vec<(String, Vec<u8>)> {
        let kind = header_type(section);
        // SAFETY: the stream pointer is live (see `new`).
        let count =
            unsafe { abi::envoy_dynamic_module_callback_http_get_headers_size(self.ptr, kind) };
        if count == 0 {
            return Vec::new();
        }
        let empty = EnvoyHttpHeader {
            key_ptr: ptr::null(),
            key_length: 0,
            value_ptr: ptr::null(),
            value_length: 0,
        };
        let mut headers = vec![empty; count];
        // SAFETY: `headers` has room for the `count` entries Envoy just reported.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers(
                self.ptr,
                kind,
                headers.as_mut_ptr(),
            )
        };
        if !ok {
            return Vec::new();
        }
        headers
            .iter()
            .map(|h| {
                // SAFETY: Envoy filled each entry with buffers valid until the hook returns.
                let (name, value) = unsafe {
                    (
                        copy(h.key_ptr, h.key_length),
                        copy(h.value_ptr, h.value_length),
                    )
                };
                (String::from_utf8_lossy(&name).into_owned(), value)
            })
            .collect()
    }

    fn set_header(&mut self, section: Section, name: &str, value: &[u8]) {
        // SAFETY: the stream pointer is live; the buffers outlive the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.ptr,
                header_type(section),
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value),
            );
        }
    }

    fn add_header(&mut self, section: Section, name: &str, value: &[u8]) {
        // SAFETY: the stream pointer is live; the buffers outlive the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_add_header(
                self.ptr,
                header_type(section),
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value),
            );
        }
    }

    fn remove_header(&mut self, section: Section, name: &str) {
        // SAFETY: the stream pointer is live; a `{NULL, 0}` value removes the header.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.ptr,
                header_type(section),
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::NONE,
            );
        }
    }

    fn received_body(&mut self, direction: Direction) -> Vec<u8> {
        let kind = body_type(direction, BodyPlace::Received);
        // SAFETY: the stream pointer is live.
        let count =
            unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.ptr, kind) };
        if count == 0 {
            return Vec::new();
        }
        let mut chunks = vec![EnvoyBuffer::EMPTY; count];
        // SAFETY: `chunks` has room for the `count` slices Envoy just reported.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks(
                self.ptr,
                kind,
                chunks.as_mut_ptr(),
            )
        };
        if !ok {
            return Vec::new();
        }
        let mut body = Vec::with_capacity(chunks.iter().map(|c| c.length).sum());
        for chunk in &chunks {
            if chunk.length > 0 && !chunk.ptr.is_null() {
                // SAFETY: each slice is valid until the buffer changes; nothing changed it.
                body.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(chunk.ptr.cast::<u8>(), chunk.length)
                });
            }
        }
        body
    }

    fn drain_received_body(&mut self, direction: Direction) {
        // SAFETY: the stream pointer is live; draining more than there is empties the buffer.
        unsafe {
            abi::envoy_dynamic_module_callback_http_drain_body(
                self.ptr,
                body_type(direction, BodyPlace::Received),
                usize::MAX,
            );
        }
    }

    fn append_body(&mut self, direction: Direction, place: BodyPlace, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // SAFETY: the stream pointer is live; Envoy copies `data` before returning.
        let appended = unsafe {
            abi::envoy_dynamic_module_callback_http_append_body(
                self.ptr,
                body_type(direction, place),
                ModuleBuffer::of(data),
            )
        };
        if !appended {
            tracing::error!(
                direction = direction.noun(),
                bytes = data.len(),
                "Envoy refused the body the plugins passed on"
            );
        }
    }

    fn send_response(&mut self, response: &ImmediateResponse) {
        self.response = Some(response.clone());
    }

    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str) {
        // SAFETY: the stream pointer is live; the buffers outlive the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
                self.ptr,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            );
        }
    }

    fn clear_route_cache(&mut self) {
        // SAFETY: the stream pointer is live.
        unsafe { abi::envoy_dynamic_module_callback_http_clear_route_cache(self.ptr) };
    }

    fn alarm(&mut self) -> Alarm {
        // SAFETY: the stream pointer is live; Envoy makes a scheduler for its worker.
        let scheduler =
            unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(self.ptr) };
        let scheduler = Arc::new(Scheduler(Mutex::new(Some(SchedulerHandle(scheduler)))));
        let waker = Waker::from(scheduler.clone());
        let stream = self.ptr;
        Alarm::new(waker, move || {
            scheduler.close();
            forget_callouts(stream);
        })
    }

    fn polling<R>(&mut self, clusters: &Arc<Clusters>, poll: impl FnOnce() -> R) -> R {
        let polling = Polling {
            ptr: self.ptr,
            clusters: clusters.clone(),
        };
        let before = with_calls(|calls| calls.polling.replace(polling));
        let polled = poll();
        start_waiting_callouts(self.ptr);
        with_calls(|calls| calls.polling = before);
        polled
    }

    fn continue_after(&mut self, direction: Direction) {
        self.go_on[direction] = true;
    }

    fn route_chain(&mut self) -> Option<String> {
        // SAFETY: the stream pointer is live.
        let config =
            unsafe { abi::envoy_dynamic_module_callback_get_most_specific_route_config(self.ptr) };
        // SAFETY: a non-null pointer is one `on_http_filter_per_route_config_new` made from a
        // `Box<RouteConfig>`; the route holds it for as long as its streams may ask.
        let config = unsafe { config.cast::<RouteConfig>().as_ref() }?;
        Some(config.chain.clone())
    }

    fn attribute(&mut self, name: &str) -> Option<String> {
        let id = abi::attribute_id(name)?;
        let mut text = EnvoyBuffer::EMPTY;
        // SAFETY: the stream pointer is live; `text` is written before it is read.
        if unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.ptr, id, &mut text,
            )
        } {
            // SAFETY: Envoy's buffer is valid until the hook returns.
            let bytes = unsafe { copy(text.ptr, text.length) };
            return Some(String::from_utf8_lossy(&bytes).into_owned());
        }
        let mut number = 0u64;
        // SAFETY: as above.
        if unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_int(
                self.ptr,
                id,
                &mut number,
            )
        } {
            // Over ext_proc, numbers arrive as protobuf doubles: the same text either way.
            return Some(json_number(number as f64));
        }
        let mut flag = false;
        // SAFETY: as above.
        if unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_bool(
                self.ptr, id, &mut flag,
            )
        } {
            return Some(flag.to_string());
        }
        None
    }

    fn metadata(&mut self, namespace: &str) -> Vec<(String, String)> {
        let ns = ModuleBuffer::of(namespace.as_bytes());
        let source = abi::METADATA_DYNAMIC;
        // SAFETY: the stream pointer is live.
        let count = unsafe {
            abi::envoy_dynamic_module_callback_http_get_metadata_keys_count(self.ptr, source, ns)
        };
        if count == 0 {
            return Vec::new();
        }
        let mut keys = vec![EnvoyBuffer::EMPTY; count];
        // SAFETY: `keys` has room for the `count` keys Envoy just reported.
        if !unsafe {
            abi::envoy_dynamic_module_callback_http_get_metadata_keys(
                self.ptr,
                source,
                ns,
                keys.as_mut_ptr(),
            )
        } {
            return Vec::new();
        }
        let keys: Vec<String> = keys
            .iter()
            // SAFETY: Envoy's buffers are valid until the metadata changes; nothing changed it.
            .map(|k| String::from_utf8_lossy(&unsafe { copy(k.ptr, k.length) }).into_owned())
            .collect();
        keys.into_iter()
            .filter_map(|key| {
                let k = ModuleBuffer::of(key.as_bytes());
                let mut text = EnvoyBuffer::EMPTY;
                // SAFETY: the stream pointer is live; out-parameters are written before read.
                if unsafe {
                    abi::envoy_dynamic_module_callback_http_get_metadata_string(
                        self.ptr, source, ns, k, &mut text,
                    )
                } {
                    // SAFETY: Envoy's buffer is valid until the hook returns.
                    let bytes = unsafe { copy(text.ptr, text.length) };
                    let value =
                        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned());
                    return Some((key, value.to_string()));
                }
                let mut number = 0f64;
                // SAFETY: as above.
                if unsafe {
                    abi::envoy_dynamic_module_callback_http_get_metadata_number(
                        self.ptr,
                        source,
                        ns,
                        k,
                        &mut number,
                    )
                } {
                    return Some((key, json_number(number)));
                }
                let mut flag = false;
                // SAFETY: as above.
                if unsafe {
                    abi::envoy_dynamic_module_callback_http_get_metadata_bool(
                        self.ptr, source, ns, k, &mut flag,
                    )
                } {
                    return Some((key, flag.to_string()));
                }
                // Lists and structs have no reader in this ABI; plugins see them only over
                // ext_proc.
                None
            })
            .collect()
    }
}

/// A number as JSON writes a protobuf double: `12.0`, `0.5`.
fn json_number(number: f64) -> String {
    serde_json::Number::from_f64(number).map_or_else(|| "null".to_string(), |n| n.to_string())
}

/// Writes `message` to Envoy's log (the `dynamic_modules` logger) at `level`.
pub fn log(level: u32, message: &str) {
    // SAFETY: Envoy's logger may be called from any thread; the buffer outlives the call.
    unsafe { abi::envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

/// Whether Envoy logs `level` for dynamic modules.
pub fn log_enabled(level: u32) -> bool {
    // SAFETY: a read of Envoy's logger level, from any thread.
    unsafe { abi::envoy_dynamic_module_callback_log_enabled(level) }
}

/// Plugins' outbound requests to an origin the filter configuration maps to an Envoy cluster
/// (`[module] http_clusters`) go out through Envoy's own HTTP callouts, on the stream's worker:
/// Envoy's cluster settings (TLS, circuit breakers, its stats) apply to them. The request is
/// started while the guest runs (polled on the worker, see `exchange`), and the answer arrives
/// with the stream's `http_callout_done` hook, on the same worker.
#[derive(Debug)]
pub struct EnvoyWay;

/// What the stream being polled on this thread can reach through Envoy's clusters.
struct Polling {
    ptr: FilterEnvoyPtr,
    clusters: Arc<Clusters>,
}

/// A callout's answer, for the future waiting on it.
type Answered = Result<http::Response<HttpBody>, HttpError>;

/// This worker's side of plugins' requests through Envoy's clusters. One thread-local
/// pointer, allocated on first use: a module Envoy loads with `dlopen` has little static TLS.
#[derive(Default)]
struct Calls {
    /// The stream being polled now.
    polling: Option<Polling>,
    /// Requests waiting for the guest to finish their bodies.
    starts: Vec<Start>,
    /// Callouts in flight, by stream and callout id.
    callouts: std::collections::HashMap<(usize, u64), tokio::sync::oneshot::Sender<Answered>>,
}

thread_local! {
    static CALLS: std::cell::RefCell<Option<Box<Calls>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` on this worker's [`Calls`] (not from inside another `with_calls`).
fn with_calls<R>(f: impl FnOnce(&mut Calls) -> R) -> R {
    CALLS.with(|calls| f(calls.borrow_mut().get_or_insert_with(Box::default)))
}

impl Way for EnvoyWay {
    fn send(
        &self,
        origin: &Origin,
        request: http::Request<HttpBody>,
        deadline: Instant,
    ) -> Result<Answer, Box<http::Request<HttpBody>>> {
        let target = with_calls(|calls| {
            let polling = calls.polling.as_ref()?;
            let cluster = polling.clusters.get(&origin.to_string())?.clone();
            Some((polling.ptr, cluster))
        });
        let Some((ptr, cluster)) = target else {
            return Err(Box::new(request));
        };
        let (answer, answered) = tokio::sync::oneshot::channel();
        let (parts, body) = request.into_parts();
        let start = Start {
            ptr,
            cluster,
            origin: origin.to_string(),
            parts,
            body,
            data: Vec::new(),
            deadline,
            answer,
        };
        // Envoy takes the whole body with the request: it goes once the guest has finished
        // it, which it may do after sending (see `start_waiting_callouts`).
        if let Some(start) = start.read_body() {
            with_calls(|calls| calls.starts.push(start));
        }
        Ok(Box::pin(async move {
            answered
                .await
                .unwrap_or(Err(HttpError::ConnectionTerminated))
        }))
    }
}

/// A request for an Envoy cluster whose body the guest is still writing.
struct Start {
    ptr: FilterEnvoyPtr,
    cluster: String,
    origin: String,
    parts: http::request::Parts,
    body: HttpBody,
    data: Vec<u8>,
    deadline: Instant,
    answer: tokio::sync::oneshot::Sender<Answered>,
}

impl Start {
    /// Reads what the guest has written of the body; once it has finished, sends the request
    /// (or answers why not). The request, if the body is not finished yet.
    fn read_body(mut self) -> Option<Start> {
        let mut cx = std::task::Context::from_waker(Waker::noop());
        loop {
            match std::pin::Pin::new(&mut self.body).poll_frame(&mut cx) {
                std::task::Poll::Pending => return Some(self),
                std::task::Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.data.extend_from_slice(&data);
                    }
                }
                std::task::Poll::Ready(Some(Err(e))) => {
                    let _ = self.answer.send(Err(e));
                    return None;
                }
                std::task::Poll::Ready(None) => {
                    self.call_out();
                    return None;
                }
            }
        }
    }

    /// Sends the request through Envoy's cluster, on the stream's worker.
    fn call_out(self) {
        let path = self
            .parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let authority = self
            .parts
            .uri
            .authority()
            .map_or(String::new(), |a| a.to_string());
        let mut fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", self.parts.method.as_str().as_bytes()),
            (b":path", path.as_bytes()),
            (b"host", authority.as_bytes()),
        ];
        fields.extend(
            self.parts
                .headers
                .iter()
                .filter(|(name, _)| *name != http::header::HOST)
                .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
        );
        let mut headers: Vec<ModuleHttpHeader> = fields.iter().copied().map(lent_header).collect();
        let timeout_ms = self
            .deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .max(1) as u64;
        let mut id = 0u64;
        // SAFETY: `ptr` is the stream being polled on this thread, inside one of its hooks;
        // every buffer outlives the call, which copies; `id` is written before it is read.
        let started = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_http_callout(
                self.ptr,
                &mut id,
                ModuleBuffer::of(self.cluster.as_bytes()),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(&self.data),
                timeout_ms,
            )
        };
        if started != abi::CALLOUT_STARTED {
            let why = format!(
                "Envoy refused the callout to cluster {:?} for {} (result {started}: 1 missing \
                 :path, :method or host; 2 no such cluster; 4 no healthy host)",
                self.cluster, self.origin
            );
            let _ = self.answer.send(Err(HttpError::InternalError(Some(why))));
            return;
        }
        let key = (self.ptr as usize, id);
        with_calls(|calls| calls.callouts.insert(key, self.answer));
    }
}

/// After a poll of stream `ptr`'s message: sends its requests whose bodies the guest has
/// finished meanwhile.
fn start_waiting_callouts(ptr: FilterEnvoyPtr) {
    let waiting: Vec<Start> = with_calls(|calls| {
        let (mine, others) = calls.starts.drain(..).partition(|start| start.ptr == ptr);
        calls.starts = others;
        mine
    });
    let still: Vec<Start> = waiting.into_iter().filter_map(Start::read_body).collect();
    with_calls(|calls| calls.starts.extend(still));
}

/// Envoy answered callout `id` of stream `ptr`: `result`, and the response's headers and body
/// (both Envoy's, valid for this call).
///
/// # Safety
///
/// The arrays hold `headers_size` headers and `chunks_size` buffers, as Envoy passed them.
pub unsafe fn callout_done(
    ptr: FilterEnvoyPtr,
    id: u64,
    result: u32,
    headers: *const EnvoyHttpHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) {
    let Some(answer) = with_calls(|calls| calls.callouts.remove(&(ptr as usize, id))) else {
        return;
    };
    if result != abi::CALLOUT_ANSWERED {
        let _ = answer.send(Err(HttpError::ConnectionTerminated));
        return;
    }
    let mut response = http::Response::builder();
    let mut status = 502u16;
    // SAFETY: the caller's promise: Envoy's arrays and buffers, for this call.
    let headers = unsafe { slice_of(headers, headers_size) };
    for header in headers {
        // SAFETY: as above.
        let (name, value) = unsafe {
            (
                copy(header.key_ptr, header.key_length),
                copy(header.value_ptr, header.value_length),
            )
        };
        if name == b":status" {
            status = std::str::from_utf8(&value)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(502);
        } else if !name.starts_with(b":") {
            response = response.header(name, value);
        }
    }
    let mut body = Vec::new();
    // SAFETY: as above.
    for chunk in unsafe { slice_of(chunks, chunks_size) } {
        // SAFETY: as above.
        body.append(&mut unsafe { copy(chunk.ptr, chunk.length) });
    }
    let body = Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed_unsync();
    let answered = response
        .status(status)
        .body(body)
        .map_err(|e| HttpError::InternalError(Some(e.to_string())));
    let _ = answer.send(answered);
}

/// Forgets the callouts of stream `ptr`, which ended: their answers reach nobody.
pub fn forget_callouts(ptr: FilterEnvoyPtr) {
    with_calls(|calls| {
        calls
            .callouts
            .retain(|(stream, _), _| *stream != ptr as usize);
        calls.starts.retain(|start| start.ptr != ptr);
    });
}

/// `count` items from `ptr`, or none.
///
/// # Safety
///
/// `ptr` points at `count` items, valid for the returned slice's use.
unsafe fn slice_of<'a, T>(ptr: *const T, count: usize) -> &'a [T] {
    if ptr.is_null() || count == 0 {
        return &[];
    }
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(ptr, count) }
}
