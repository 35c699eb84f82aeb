//! Write [wasm-extproc] plugins in Rust.
//!
//! A plugin is a type that implements [`Plugin`], overriding the hooks for the phases it
//! handles, and names them in [`Plugin::PHASES`]; [`export_plugin!`] turns it into the
//! component's exports.
//!
//! ```ignore
//! use wasm_extproc_sdk::{export_plugin, Action, Headers, Phases, Plugin};
//!
//! #[derive(Default)]
//! struct Tag;
//!
//! impl Plugin for Tag {
//!     const PHASES: Phases = Phases::REQUEST_HEADERS;
//!
//!     fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
//!         headers.set("x-tagged", "yes");
//!         Action::Continue
//!     }
//! }
//!
//! export_plugin!(Tag);
//! ```
//!
//! One value of the plugin type lives for one HTTP exchange: by default the host creates a
//! fresh instance of the component for every ext_proc stream, and the SDK creates the value
//! with [`Default`] on the first hook call. Fields set while handling the request are there
//! when the response arrives, and never seen by another request. (An operator who runs the
//! plugin with `isolation = "reuse"` keeps its instance, and so the value, for later exchanges:
//! only for plugins whose fields hold nothing about one exchange.)
//!
//! [wasm-extproc]: https://github.com/wasm-extproc/wasm-extproc

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin",
        // The standard interfaces the world imports (`wasi:keyvalue`) are bound here too.
        generate_all,
        pub_export_macro: true,
        export_macro_name: "__export_component",
        default_bindings_module: "wasm_extproc_sdk::bindings",
    });
}

/// The standard `wasi:config/store`, through which the host hands a plugin its secrets. Bound
/// apart from the contract's world: a plugin that never reads a secret does not import it.
#[doc(hidden)]
pub mod config_bindings {
    wit_bindgen::generate!({
        inline: "package wasm-extproc:sdk;
                 world secrets { import wasi:config/store@0.2.0-rc.1; }",
        path: "../../wit/deps/config",
        world: "wasm-extproc:sdk/secrets",
        generate_all,
    });
}

use bindings::exports::wasm_extproc::processor::handler;
use bindings::wasm_extproc::processor::host;
use bindings::wasm_extproc::processor::types;

pub use types::{BodyDelivery, ImmediateResponse, Phases};

/// Headers or trailers of the message being handled, owned by the host.
///
/// Reads copy only what they return; writes are applied in the host, visible to later plugins,
/// and discarded if the hook fails.
#[derive(Debug)]
pub struct Headers<'a>(&'a types::Fields);

impl Headers<'_> {
    /// The first value of `name` (case-insensitive), if present.
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.0.get(name)
    }

    /// The first value of `name` as UTF-8 text; `None` if absent or not UTF-8.
    pub fn get_str(&self, name: &str) -> Option<String> {
        self.get(name).and_then(|v| String::from_utf8(v).ok())
    }

    /// Every value of `name`, in order.
    pub fn get_all(&self, name: &str) -> Vec<Vec<u8>> {
        self.0.get_all(name)
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.0.has(name)
    }

    /// Replaces every value of `name` with `value`.
    pub fn set(&self, name: &str, value: impl AsRef<[u8]>) {
        self.0.set(name, value.as_ref());
    }

    /// Adds one more value of `name`.
    pub fn append(&self, name: &str, value: impl AsRef<[u8]>) {
        self.0.append(name, value.as_ref());
    }

    /// Removes every value of `name`.
    pub fn remove(&self, name: &str) {
        self.0.remove(name);
    }

    /// Every header, in order, names lower-case. Copies the whole section: prefer
    /// [`get`](Self::get) when the names are known.
    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        self.0.entries()
    }
}

/// One message of a request or response body.
#[derive(Debug)]
pub struct Body<'a> {
    body: &'a types::Body,
    headers: Option<Headers<'a>>,
}

impl<'a> Body<'a> {
    /// The direction's headers, while changes to them still take effect: when Envoy buffers
    /// the body (`BUFFERED`, `BUFFERED_PARTIAL`), and when the body is held whole for a plugin
    /// of the chain (`BodyDelivery::Whole` over `FULL_DUPLEX_STREAMED`, and in-process).
    /// `None` where the headers already went on: `STREAMED` bodies, and chunks when no plugin
    /// of the chain takes the body whole.
    ///
    /// ```ignore
    /// fn on_request_body(&mut self, body: &Body) -> Action {
    ///     let redacted = redact(body);
    ///     if let Some(headers) = body.headers() {
    ///         headers.set("x-redacted", redacted.to_string());
    ///     }
    ///     Action::Continue
    /// }
    /// ```
    pub fn headers(&self) -> Option<&Headers<'a>> {
        self.headers.as_ref()
    }

    /// The bytes of this message.
    pub fn bytes(&self) -> Vec<u8> {
        self.body.bytes()
    }

    /// The number of bytes, without copying them.
    pub fn len(&self) -> u64 {
        self.body.len()
    }

    /// Whether this message carries no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is the last message of the body.
    pub fn end_of_stream(&self) -> bool {
        self.body.end_of_stream()
    }

    /// Replaces the bytes of this message.
    pub fn replace(&self, data: impl AsRef<[u8]>) {
        self.body.replace(data.as_ref());
    }
}

/// What the host does after a hook returns.
#[derive(Debug, Clone)]
pub enum Action {
    /// Pass the message on to the next plugin, then to Envoy.
    Continue,
    /// Stop the chain and answer the client now.
    Respond(ImmediateResponse),
}

impl Action {
    /// An immediate answer with `status` and a plain-text `body`.
    pub fn respond(status: u16, body: impl Into<String>) -> Self {
        Self::respond_with(status, "text/plain", body.into(), &[])
    }

    /// An immediate answer with `status` and a JSON `body` (`content-type: application/json`),
    /// given already serialised: `Action::respond_json(401, r#"{"error":"unauthorized"}"#)`.
    pub fn respond_json(status: u16, body: impl Into<String>) -> Self {
        Self::respond_with(status, "application/json", body.into(), &[])
    }

    /// An immediate answer with `status`, a body of `content_type`, and more `headers`
    /// (`www-authenticate`, `retry-after`, ...). For a gRPC status or Envoy's response code
    /// details, build an [`ImmediateResponse`] and use [`Action::Respond`].
    pub fn respond_with(
        status: u16,
        content_type: &str,
        body: impl Into<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Self {
        let mut all = vec![("content-type".to_string(), content_type.as_bytes().to_vec())];
        all.extend(
            headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec())),
        );
        Action::Respond(ImmediateResponse {
            status,
            headers: all,
            body: body.into(),
            grpc_status: None,
            details: String::new(),
        })
    }
}

impl From<Action> for types::Action {
    fn from(action: Action) -> Self {
        match action {
            Action::Continue => types::Action::Continue,
            Action::Respond(response) => types::Action::Respond(response),
        }
    }
}

/// A plugin: hooks for the phases of one HTTP exchange.
///
/// Every hook defaults to [`Action::Continue`]; override the ones named in
/// [`PHASES`](Self::PHASES). The host calls only those.
pub trait Plugin: Default + 'static {
    /// The phases whose hooks this plugin overrides.
    const PHASES: Phases;

    /// How [`on_request_body`](Self::on_request_body) receives the body: chunk by chunk as
    /// Envoy sends it (the default), or whole.
    const REQUEST_BODY: BodyDelivery = BodyDelivery::Chunks;

    /// How [`on_response_body`](Self::on_response_body) receives the body.
    const RESPONSE_BODY: BodyDelivery = BodyDelivery::Chunks;

    /// The request's headers. `end_of_stream` is true when the request has no body.
    fn on_request_headers(&mut self, headers: &Headers, end_of_stream: bool) -> Action {
        let _ = (headers, end_of_stream);
        Action::Continue
    }

    /// A message of the request's body.
    fn on_request_body(&mut self, body: &Body) -> Action {
        let _ = body;
        Action::Continue
    }

    /// The request's trailers.
    fn on_request_trailers(&mut self, trailers: &Headers) -> Action {
        let _ = trailers;
        Action::Continue
    }

    /// The response's headers. `end_of_stream` is true when the response has no body.
    fn on_response_headers(&mut self, headers: &Headers, end_of_stream: bool) -> Action {
        let _ = (headers, end_of_stream);
        Action::Continue
    }

    /// A message of the response's body.
    fn on_response_body(&mut self, body: &Body) -> Action {
        let _ = body;
        Action::Continue
    }

    /// The response's trailers.
    fn on_response_trailers(&mut self, trailers: &Headers) -> Action {
        let _ = trailers;
        Action::Continue
    }
}

/// The configuration string the operator gave this plugin; empty if none.
pub fn config() -> String {
    host::config()
}

/// Secrets the operator granted this plugin (`secrets = ["NAME", ...]` in its settings), as
/// their files hold them now: a rotated secret is read without a restart.
///
/// ```ignore
/// let tokens = secrets::get("api-tokens").unwrap_or_default();
/// ```
pub mod secrets {
    use super::config_bindings::wasi::config::store;

    /// The secret `name`'s value, verbatim (a trailing newline in its file included); `None`
    /// when the plugin was not granted a secret of that name.
    pub fn get(name: &str) -> Option<String> {
        store::get(name).ok().flatten()
    }
}

/// The exchange being handled, beyond its headers and body.
pub mod context {
    use super::bindings::wasm_extproc::processor::context;

    /// An attribute Envoy sent (`request.path`, `source.address`, `xds.route_name`, ...), if
    /// the filter is configured to send it. Non-string values come as JSON.
    pub fn attribute(name: &str) -> Option<String> {
        context::attribute(name)
    }

    /// A value of forwarded metadata, as JSON.
    pub fn metadata(namespace: &str, key: &str) -> Option<String> {
        context::metadata(namespace, key)
    }

    /// Sets dynamic metadata for filters after ext_proc and for access logs.
    pub fn set_metadata(namespace: &str, key: &str, value: &str) {
        context::set_metadata(namespace, key, value);
    }

    /// Asks Envoy to pick the route again (request headers only).
    pub fn clear_route_cache() {
        context::clear_route_cache();
    }
}

/// State that outlives the exchange: entries kept by the host, in the plugin's own namespace or
/// in shared ones the operator granted (`kv_namespaces`).
///
/// ```ignore
/// let store = kv::Store::open()?;
/// let hits = store.increment_in_window(&client, 1, Duration::from_secs(60))?;
/// if hits.count > 100 { /* refuse, retry after hits.resets_in */ }
/// ```
///
/// Every operation can fail: a namespace past its bounds, a state store that cannot be
/// reached in time (Redis down). Decide per plugin whether that lets the request through.
pub mod kv {
    use core::time::Duration;

    use super::bindings::wasi::keyvalue::{atomics, store};
    use super::bindings::wasm_extproc::processor::state;

    /// Why an operation failed, as the host said it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Error(pub String);

    /// What kind of failure an [`Error`] is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ErrorKind {
        /// The store could not be reached in time (Redis down or slow): the only kind that is
        /// an outage rather than a refusal.
        Unavailable,
        /// The namespace is at one of its bounds (entries or bytes).
        Full,
        /// A key or value past its bound.
        TooLarge,
        /// An expiry or window the store does not take (0 ms, or longer than 366 days).
        Invalid,
        /// The value at the key is not a counter, or would overflow.
        NotACounter,
        /// The namespace is not granted to this plugin, or does not exist.
        Denied,
        /// Anything else.
        Other,
    }

    impl Error {
        /// What kind of failure this is, from the word the host puts first.
        pub fn kind(&self) -> ErrorKind {
            match self.0.split_once(':').map_or("", |(word, _)| word) {
                "timeout" | "unavailable" => ErrorKind::Unavailable,
                "full" => ErrorKind::Full,
                "too_large" => ErrorKind::TooLarge,
                "invalid" => ErrorKind::Invalid,
                "not_a_counter" => ErrorKind::NotACounter,
                "denied" => ErrorKind::Denied,
                _ => ErrorKind::Other,
            }
        }

        /// Whether the store could not be reached in time: decide with the plugin's policy
        /// for outages. Every other error is a refusal that holds however often it is retried.
        pub fn is_unavailable(&self) -> bool {
            self.kind() == ErrorKind::Unavailable
        }
    }

    impl core::fmt::Display for Error {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl From<store::Error> for Error {
        fn from(e: store::Error) -> Self {
            Error(match e {
                store::Error::NoSuchStore => "denied: no such namespace".into(),
                store::Error::AccessDenied => "denied: namespace not granted to this plugin".into(),
                store::Error::Other(text) => text,
            })
        }
    }

    /// A counter in its window, after an increment.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct WindowCount {
        /// The counter's value in the current window, this increment included.
        pub count: u64,
        /// Until the window ends and the counter starts again from zero.
        pub resets_in: Duration,
    }

    /// An open namespace.
    #[derive(Debug)]
    pub struct Store(store::Bucket);

    fn millis(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    }

    impl Store {
        /// The plugin's own namespace, which no other plugin sees.
        pub fn open() -> Result<Store, Error> {
            Ok(Store(store::open("")?))
        }

        /// The shared namespace `name`, if the operator granted it to this plugin.
        pub fn open_shared(name: &str) -> Result<Store, Error> {
            Ok(Store(store::open(name)?))
        }

        /// The value at `key`, if there is one (and it has not expired).
        pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
            Ok(self.0.get(key)?)
        }

        /// Sets `key` to `value`, kept until deleted.
        pub fn set(&self, key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
            Ok(self.0.set(key, value.as_ref())?)
        }

        /// Sets `key` to `value`, forgotten after `ttl` (at least a millisecond).
        pub fn set_with_ttl(
            &self,
            key: &str,
            value: impl AsRef<[u8]>,
            ttl: Duration,
        ) -> Result<(), Error> {
            Ok(state::set_with_ttl(
                &self.0,
                key,
                value.as_ref(),
                millis(ttl),
            )?)
        }

        /// Removes `key`; removing a missing key does nothing.
        pub fn delete(&self, key: &str) -> Result<(), Error> {
            Ok(self.0.delete(key)?)
        }

        /// Whether `key` holds a value.
        pub fn exists(&self, key: &str) -> Result<bool, Error> {
            Ok(self.0.exists(key)?)
        }

        /// Adds `delta` to the counter at `key` (a missing one starts at 0) and returns it.
        pub fn increment(&self, key: &str, delta: u64) -> Result<u64, Error> {
            Ok(atomics::increment(&self.0, key, delta)?)
        }

        /// Adds `delta` to the counter at `key` in a window of `window`, opened by the first
        /// increment; the counter is forgotten when the window ends.
        pub fn increment_in_window(
            &self,
            key: &str,
            delta: u64,
            window: Duration,
        ) -> Result<WindowCount, Error> {
            let c = state::increment_in_window(&self.0, key, delta, millis(window))?;
            Ok(WindowCount {
                count: c.count,
                resets_in: Duration::from_millis(c.resets_in_ms),
            })
        }
    }
}

/// Writing to the host's log, tagged with the plugin's name and the current phase.
pub mod log {
    use super::host::{LogLevel, log};

    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(LogLevel::Debug, message);
    }
    /// Logs at info level.
    pub fn info(message: &str) {
        log(LogLevel::Info, message);
    }
    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(LogLevel::Warn, message);
    }
    /// Logs at error level.
    pub fn error(message: &str) {
        log(LogLevel::Error, message);
    }
}

/// The instance's value of the plugin type, made on the first hook call. A component instance
/// is single-threaded and serves one stream at a time, so a plain cell is enough.
#[doc(hidden)]
pub struct PluginCell<P>(core::cell::RefCell<Option<P>>);

// SAFETY: a component instance runs on one thread and never re-enters a hook, so the cell is
// never shared across threads; `Sync` is needed only to put the cell in a `static`.
unsafe impl<P> Sync for PluginCell<P> {}

impl<P: Plugin> PluginCell<P> {
    #[doc(hidden)]
    pub const fn new() -> Self {
        PluginCell(core::cell::RefCell::new(None))
    }

    fn with(&self, hook: impl FnOnce(&mut P) -> Action) -> types::Action {
        report_panics();
        let mut value = self.0.borrow_mut();
        hook(value.get_or_insert_with(P::default)).into()
    }
}

/// Sends a panic's message and location to the host's log, at error level, just before the
/// call traps: the same line on every target. Without it, `wasm32-unknown-unknown` (which has
/// no stderr) loses the message, and WASI targets add a hint about `RUST_BACKTRACE`, which
/// does nothing in a component.
fn report_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = info
                .payload_as_str()
                .unwrap_or("(a panic without a message)");
            let line = match info.location() {
                Some(at) => format!(
                    "panicked at {}:{}:{}: {message}",
                    at.file(),
                    at.line(),
                    at.column()
                ),
                None => format!("panicked: {message}"),
            };
            log::error(&line);
        }));
    });
}

/// Implements the component's exports for `P`; used by [`export_plugin!`].
#[doc(hidden)]
pub trait Exported {
    type Plugin: Plugin;
    fn cell() -> &'static PluginCell<Self::Plugin>;
}

impl<E: Exported> handler::Guest for E {
    fn register() -> types::Registration {
        types::Registration {
            phases: E::Plugin::PHASES,
            request_body: E::Plugin::REQUEST_BODY,
            response_body: E::Plugin::RESPONSE_BODY,
        }
    }

    fn on_request_headers(headers: &types::Fields, end_of_stream: bool) -> types::Action {
        E::cell().with(|p| p.on_request_headers(&Headers(headers), end_of_stream))
    }

    fn on_request_body(body: &types::Body, headers: Option<&types::Fields>) -> types::Action {
        let body = Body {
            body,
            headers: headers.map(Headers),
        };
        E::cell().with(|p| p.on_request_body(&body))
    }

    fn on_request_trailers(trailers: &types::Fields) -> types::Action {
        E::cell().with(|p| p.on_request_trailers(&Headers(trailers)))
    }

    fn on_response_headers(headers: &types::Fields, end_of_stream: bool) -> types::Action {
        E::cell().with(|p| p.on_response_headers(&Headers(headers), end_of_stream))
    }

    fn on_response_body(body: &types::Body, headers: Option<&types::Fields>) -> types::Action {
        let body = Body {
            body,
            headers: headers.map(Headers),
        };
        E::cell().with(|p| p.on_response_body(&body))
    }

    fn on_response_trailers(trailers: &types::Fields) -> types::Action {
        E::cell().with(|p| p.on_response_trailers(&Headers(trailers)))
    }
}

/// Exports a [`Plugin`] type as the component's handlers.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        struct __WasmExtprocExport;

        impl $crate::Exported for __WasmExtprocExport {
            type Plugin = $plugin;
            fn cell() -> &'static $crate::PluginCell<$plugin> {
                static CELL: $crate::PluginCell<$plugin> = $crate::PluginCell::new();
                &CELL
            }
        }

        $crate::bindings::__export_component!(__WasmExtprocExport);
    };
}
