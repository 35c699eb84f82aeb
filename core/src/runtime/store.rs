//! What one store holds, and the host side of the contract's own imports: the `fields` and
//! `body` resources lent to a handler, `host` (logging through the logging capability, and
//! configuration) and `context`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, Result, format_err};
use wasmtime_wasi::{WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtxView, WasiHttpView};

use super::bindings::{self, Body, Fields};
use super::capability::{Call, capabilities};
use crate::config::PluginSettings;
use crate::http::{BodyChunk, Effects, ExchangeContext, HeaderMap, Message, Phase};

/// The handle a handler receives for the message it is lent. Only one message is lent at a
/// time, and borrows end when the call returns, so a constant is enough.
pub const LENT_REP: u32 = 0;
/// The handle a body handler receives for its direction's headers, lent beside the body.
pub const HEADERS_REP: u32 = 1;

/// The most entries a header section may reach while a plugin works on it, and the most bytes.
/// Far beyond anything Envoy accepts (the guard refuses more than `max_request_headers_kb`),
/// but they bound the host memory a plugin can fill within one deadline.
const MAX_SECTION_ENTRIES: usize = 10_000;
const MAX_SECTION_BYTES: usize = 16 << 20;
/// The largest body a plugin may hand the host in one `replace` (the guard then holds each
/// answer to what fits in one ext_proc message): a bound on the host memory one call can fill.
const MAX_REPLACEMENT_BYTES: usize = 16 << 20;

/// Dynamic metadata entries one call may set: far more than any real use, and a bound on the
/// host memory a looping `set-metadata` can take.
const MAX_METADATA_ENTRIES: usize = 256;
/// Longest namespace, key or value in one metadata entry.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Enforces the plugin's memory ceiling and remembers whether it was hit, so a guest that
/// aborts after a failed `memory.grow` is reported as out of memory, not as a plain trap.
pub struct MemoryLimiter {
    limit: u64,
    exceeded: bool,
}

/// Tables hold function references; no plugin needs more than this, and a bound keeps a
/// hostile one from growing host memory through them.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl MemoryLimiter {
    pub fn reset(&mut self) {
        self.exceeded = false;
    }
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        if desired as u64 > self.limit {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

capabilities! {
    store: StoreState;
    log: super::output::Logging => (),
    state: super::state::State => crate::kv::KvSettings,
    http: super::outbound::Outbound => (),
    secrets: super::secrets::Secrets => crate::secrets::SecretsSettings,
}

/// Everything one store holds: one plugin instance, serving one stream at a time (one
/// exchange, or one after another under `isolation = "reuse"`).
pub struct StoreState {
    settings: Arc<PluginSettings>,
    /// What it holds of each capability the plugin was granted.
    pub caps: InStore,
    /// The resources handed to the guest: WASI's, and open buckets.
    pub table: ResourceTable,
    pub limits: MemoryLimiter,
    pub timeout: Duration,
    /// When the current guest call started; `None` between calls.
    pub call_started: Option<Instant>,
    /// Epoch ticks the current call was seen running at (see [`within_budget`](Self::within_budget)).
    pub ticks_seen: u32,
    pub phase: Option<Phase>,
    /// The message the current call is working on.
    pub lent: Option<Message>,
    /// The direction's headers, lent to a body handler beside the body.
    pub lent_headers: Option<HeaderMap>,
    /// The exchange the current call belongs to.
    pub context: Arc<ExchangeContext>,
    /// What the current call asked for besides changing the message.
    pub effects: Effects,
}

impl StoreState {
    pub fn new(settings: Arc<PluginSettings>, caps: InStore) -> Self {
        StoreState {
            caps,
            table: ResourceTable::new(),
            limits: MemoryLimiter {
                limit: settings.budget.memory_limit_bytes,
                exceeded: false,
            },
            timeout: settings.budget.timeout,
            settings,
            call_started: None,
            ticks_seen: 0,
            phase: None,
            lent: None,
            lent_headers: None,
            context: Arc::default(),
            effects: Effects::default(),
        }
    }

    /// Whether the call under way may go on when the epoch asks ([`super::epoch::may_go_on`]).
    pub fn within_budget(&self) -> bool {
        self.call_started.is_some_and(|started| {
            super::epoch::may_go_on(started.elapsed(), self.timeout, self.ticks_seen)
        })
    }

    /// The budget of the call under way.
    pub fn call(&self) -> Call {
        Call {
            started: self.call_started,
            timeout: self.timeout,
        }
    }

    /// The phase the next call serves (`None`: `register`, at load).
    pub fn set_phase(&mut self, phase: Option<Phase>) {
        self.phase = phase;
        self.caps.log.set_phase(phase);
    }

    /// Writes out what the plugin left unfinished on stdout and stderr.
    pub fn flush_output(&mut self) {
        self.caps.log.flush();
    }

    fn lent(&mut self, rep: u32) -> Result<&mut Message> {
        match (&mut self.lent, rep) {
            (Some(lent), LENT_REP) => Ok(lent),
            _ => Err(format_err!(
                "handle used outside the handler call it was lent to"
            )),
        }
    }

    fn headers(&mut self, rep: u32) -> Result<&mut HeaderMap> {
        if rep == HEADERS_REP {
            return self
                .lent_headers
                .as_mut()
                .ok_or_else(|| format_err!("handle used outside the handler call it was lent to"));
        }
        match self.lent(rep)? {
            Message::Headers { headers, .. } | Message::Trailers(headers) => Ok(headers),
            Message::Body(_) => Err(format_err!("fields handle lent for a body")),
        }
    }

    fn body(&mut self, rep: u32) -> Result<&mut BodyChunk> {
        match self.lent(rep)? {
            Message::Body(body) => Ok(body),
            _ => Err(format_err!("body handle lent for headers")),
        }
    }
}

impl WasiHttpView for StoreState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        let call = self.call();
        self.caps.http.view(&mut self.table, call)
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: self.caps.log.wasi(self.phase),
            table: &mut self.table,
        }
    }
}

/// Refuses (trapping the guest) a change that would take a section past the host's bounds.
fn check_growth(headers: &HeaderMap, name: &str, value: &[u8]) -> Result<()> {
    if headers.len() >= MAX_SECTION_ENTRIES {
        return Err(format_err!(
            "header section would exceed {MAX_SECTION_ENTRIES} entries"
        ));
    }
    if headers.byte_size() + name.len() + value.len() > MAX_SECTION_BYTES {
        return Err(format_err!(
            "header section would exceed {MAX_SECTION_BYTES} bytes"
        ));
    }
    Ok(())
}

/// The host side of one contract version's imports. Every version the host speaks lends the
/// same resources and gives the same answers; only the generated traits differ.
macro_rules! contract_imports {
    ($($version:ident)::+) => {
        const _: () = {
            use $($version)::+::wasm_extproc::processor::{context, host, types};

        impl types::Host for StoreState {}

        impl types::HostFields for StoreState {
            fn get(&mut self, this: Resource<Fields>, name: String) -> Result<Option<Vec<u8>>> {
                Ok(self.headers(this.rep())?.get(&name).map(<[u8]>::to_vec))
            }

            fn get_all(&mut self, this: Resource<Fields>, name: String) -> Result<Vec<Vec<u8>>> {
                Ok(self.headers(this.rep())?.get_all(&name))
            }

            fn has(&mut self, this: Resource<Fields>, name: String) -> Result<bool> {
                Ok(self.headers(this.rep())?.contains(&name))
            }

            fn set(&mut self, this: Resource<Fields>, name: String, value: Vec<u8>) -> Result<()> {
                let headers = self.headers(this.rep())?;
                check_growth(headers, &name, &value)?;
                headers.set(name, value);
                Ok(())
            }

            fn append(&mut self, this: Resource<Fields>, name: String, value: Vec<u8>) -> Result<()> {
                let headers = self.headers(this.rep())?;
                check_growth(headers, &name, &value)?;
                headers.append(name, value);
                Ok(())
            }

            fn remove(&mut self, this: Resource<Fields>, name: String) -> Result<()> {
                self.headers(this.rep())?.remove(name);
                Ok(())
            }

            fn entries(&mut self, this: Resource<Fields>) -> Result<Vec<(String, Vec<u8>)>> {
                Ok(self.headers(this.rep())?.entries().to_vec())
            }

            fn drop(&mut self, _this: Resource<Fields>) -> Result<()> {
                // Lent by borrow only: the host never hands out an owned handle.
                Ok(())
            }
        }

        impl types::HostBody for StoreState {
            fn bytes(&mut self, this: Resource<Body>) -> Result<Vec<u8>> {
                Ok(self.body(this.rep())?.data.clone())
            }

            fn len(&mut self, this: Resource<Body>) -> Result<u64> {
                Ok(self.body(this.rep())?.data.len() as u64)
            }

            fn end_of_stream(&mut self, this: Resource<Body>) -> Result<bool> {
                Ok(self.body(this.rep())?.end_of_stream)
            }

            fn replace(&mut self, this: Resource<Body>, data: Vec<u8>) -> Result<()> {
                if data.len() > MAX_REPLACEMENT_BYTES {
                    return Err(format_err!(
                        "replacement body of {} bytes exceeds {MAX_REPLACEMENT_BYTES}",
                        data.len()
                    ));
                }
                self.body(this.rep())?.replace(data);
                Ok(())
            }

            fn drop(&mut self, _this: Resource<Body>) -> Result<()> {
                Ok(())
            }
        }

        impl host::Host for StoreState {
            fn log(&mut self, level: host::LogLevel, message: String) -> Result<()> {
                let level = match level {
                    host::LogLevel::Trace => tracing::Level::TRACE,
                    host::LogLevel::Debug => tracing::Level::DEBUG,
                    host::LogLevel::Info => tracing::Level::INFO,
                    host::LogLevel::Warn => tracing::Level::WARN,
                    host::LogLevel::Error => tracing::Level::ERROR,
                };
                self.caps.log.write(level, self.phase, &message);
                Ok(())
            }

            fn config(&mut self) -> Result<String> {
                Ok(self.settings.config.clone())
            }
        }

        impl context::Host for StoreState {
            fn attribute(&mut self, name: String) -> Result<Option<String>> {
                Ok(self.context.attributes.get(&name).cloned())
            }

            fn metadata(&mut self, namespace: String, key: String) -> Result<Option<String>> {
                Ok(self.context.metadata.get(&(namespace, key)).cloned())
            }

            fn set_metadata(&mut self, namespace: String, key: String, value: String) -> Result<()> {
                if self.effects.metadata.len() >= MAX_METADATA_ENTRIES {
                    return Err(format_err!(
                        "set-metadata called more than {MAX_METADATA_ENTRIES} times in one handler call"
                    ));
                }
                if [&namespace, &key, &value]
                    .iter()
                    .any(|s| s.len() > MAX_METADATA_BYTES)
                {
                    return Err(format_err!(
                        "set-metadata: namespace, key and value are limited to {MAX_METADATA_BYTES} bytes"
                    ));
                }
                self.effects.metadata.push((namespace, key, value));
                Ok(())
            }

            fn clear_route_cache(&mut self) -> Result<()> {
                self.effects.clear_route_cache = true;
                Ok(())
            }
        }
        };
    };
}

contract_imports!(bindings::current);
contract_imports!(bindings::v0_3);
contract_imports!(bindings::v0_2);
