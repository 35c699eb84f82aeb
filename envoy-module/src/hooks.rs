//! The functions Envoy calls: thin shims from C to [`Exchange`] and [`FilterConfig`].
//!
//! None may unwind into Envoy, so each runs its body under [`guarded`]: a panic -- a bug in
//! this module, never a plugin's fault (plugins trap inside wasmtime, and their policy
//! applies) -- is logged, the stream gets a 500, and the filter steps aside for the rest of
//! it.
//!
//! Pointers: a configuration is an `Arc<FilterConfig>` given to Envoy with
//! [`Arc::into_raw`]; every filter holds its own reference, so the configuration outlives its
//! streams whatever order Envoy destroys them in. A filter is a `Box<Filter>`.

#![allow(unsafe_code, reason = "the C entry points Envoy calls")]

use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use wasm_extproc_core::http::{Direction, ImmediateResponse};

use crate::abi::{
    self, ConfigEnvoyPtr, ConfigModulePtr, EnvoyBuffer, EnvoyHttpHeader, FilterEnvoyPtr,
    FilterModulePtr, RouteConfigModulePtr, log_level,
};
use crate::envoy::{self, EnvoyStream};
use crate::exchange::{BodyStatus, Envoy, Exchange, HeadersStatus, TrailersStatus};
use crate::filter_config::{FilterConfig, RouteConfig};
use crate::logging;
use crate::stats::Stats;

/// One stream's filter.
#[derive(Debug)]
struct Filter {
    config: Arc<FilterConfig>,
    /// Started with the request's headers, when Envoy knows the route. `None` when nothing is
    /// loaded, or after a panic: the filter passes everything on.
    exchange: Option<Exchange>,
    started: bool,
}

/// Runs `body`, turning a panic into `fallback` (and a log line naming `hook`).
fn guarded<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(panic) => {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            envoy::log(
                log_level::ERROR,
                &format!("[wasm-extproc] bug: panic in {hook}: {reason}"),
            );
            fallback
        }
    }
}

/// Borrows a stream's filter.
///
/// # Safety
///
/// `filter` came from `on_http_filter_new` and was not destroyed; Envoy calls one stream's
/// hooks one at a time, on one thread, so the borrow is unique.
unsafe fn filter_of<'a>(filter: FilterModulePtr) -> &'a mut Filter {
    // SAFETY: the caller's promise.
    unsafe { &mut *(filter as *mut Filter) }
}

/// Runs a stream hook: `step` with the stream's exchange and Envoy side; `pass` when there is
/// no exchange. A panic answers 500 and leaves the stream to Envoy. An immediate response
/// goes out last, once nothing borrows the filter: Envoy calls its other hooks from inside.
fn stream_hook<T: Copy>(
    hook: &str,
    envoy_ptr: FilterEnvoyPtr,
    filter_ptr: FilterModulePtr,
    pass: T,
    stop: T,
    step: impl FnOnce(&mut Exchange, &mut EnvoyStream) -> T,
) -> T {
    // SAFETY: Envoy passes the pointer of a live stream to its hooks.
    let mut envoy = unsafe { EnvoyStream::new(envoy_ptr) };
    let status = {
        // SAFETY: as above (see `filter_of`); the borrow ends with this block.
        let filter = unsafe { filter_of(filter_ptr) };
        let result = catch_unwind(AssertUnwindSafe(|| {
            if !std::mem::replace(&mut filter.started, true) {
                filter.exchange = filter.config.exchange(&mut envoy);
            }
            match filter.exchange.as_mut() {
                Some(exchange) => step(exchange, &mut envoy),
                None => pass,
            }
        }));
        match result {
            Ok(status) => status,
            Err(_) => {
                // Whatever the exchange held is suspect now: drop it (instances go back) and
                // answer, as a fail-closed plugin would.
                let dropped = catch_unwind(AssertUnwindSafe(|| filter.exchange = None));
                envoy::log(
                    log_level::ERROR,
                    &format!(
                        "[wasm-extproc] bug: panic in {hook} of filter {:?}; the stream is \
                         answered with 500",
                        filter.config.name
                    ),
                );
                if dropped.is_ok() {
                    envoy.send_response(&ImmediateResponse {
                        status: 500,
                        details: "wasm_extproc_module_failed".into(),
                        ..ImmediateResponse::default()
                    });
                }
                stop
            }
        }
    };
    if catch_unwind(AssertUnwindSafe(|| envoy.send_held())).is_err() {
        envoy::log(
            log_level::ERROR,
            &format!("[wasm-extproc] bug: panic sending the answer in {hook}"),
        );
    }
    status
}

/// The names of the callbacks this module calls that the Envoy loading it does not export.
fn missing_callbacks() -> Vec<&'static str> {
    abi::CALLBACKS
        .iter()
        // SAFETY: `dlsym` with `RTLD_DEFAULT` only looks a NUL-terminated name up.
        .filter(|name| unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }.is_null())
        .map(|name| name.to_str().unwrap_or("?"))
        .collect()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guarded("program_init", std::ptr::null(), || {
        let missing = missing_callbacks();
        if !missing.is_empty() {
            // Logging needs Envoy's log callback, which every ABI version has; if even that
            // is missing, the refusal below still stops the load.
            if !missing.contains(&"envoy_dynamic_module_callback_log") {
                envoy::log(
                    log_level::ERROR,
                    &format!(
                        "[wasm-extproc] this Envoy lacks {} callback(s) the module needs ({}): \
                         the module was built for Envoy's dynamic-module ABI {} (Envoy 1.40); \
                         use that Envoy or a later one",
                        missing.len(),
                        missing.join(", "),
                        String::from_utf8_lossy(&abi::ABI_VERSION[..abi::ABI_VERSION.len() - 1]),
                    ),
                );
            }
            return std::ptr::null();
        }
        logging::init();
        wasm_extproc_core::runtime::set_way(Box::new(envoy::EnvoyWay));
        abi::ABI_VERSION.as_ptr().cast()
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ConfigModulePtr {
    guarded("http_filter_config_new", std::ptr::null(), || {
        // SAFETY: Envoy lends both buffers for the length of this call.
        let (name, text) = unsafe { (name.bytes(), config.bytes()) };
        let name = String::from_utf8_lossy(name).into_owned();
        // SAFETY: `config_envoy` is the configuration this call creates.
        let stats = unsafe { Stats::define(config_envoy) };
        match FilterConfig::new(&name, text, stats) {
            Ok(config) => {
                tracing::info!(filter = name, "plugins loaded in-process");
                Arc::into_raw(Arc::new(config)).cast()
            }
            Err(error) => {
                // Written now, not through the log thread: Envoy may exit right after this.
                envoy::log(
                    log_level::ERROR,
                    &format!("[wasm-extproc] filter {name:?}: configuration refused: {error:#}"),
                );
                std::ptr::null()
            }
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ConfigModulePtr) {
    guarded("http_filter_config_destroy", (), || {
        // SAFETY: `config` came from `Arc::into_raw` in `config_new`; Envoy destroys it once.
        drop(unsafe { Arc::from_raw(config.cast::<FilterConfig>()) });
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> RouteConfigModulePtr {
    guarded("http_filter_per_route_config_new", std::ptr::null(), || {
        // SAFETY: Envoy lends both buffers for the length of this call.
        let (name, text) = unsafe { (name.bytes(), config.bytes()) };
        let name = String::from_utf8_lossy(name);
        match RouteConfig::parse(&name, text) {
            Ok(config) => Box::into_raw(Box::new(config)).cast_const().cast(),
            Err(error) => {
                envoy::log(
                    log_level::ERROR,
                    &format!("[wasm-extproc] route configuration refused: {error:#}"),
                );
                std::ptr::null()
            }
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    config: RouteConfigModulePtr,
) {
    guarded("http_filter_per_route_config_destroy", (), || {
        // SAFETY: `config` came from `Box::into_raw` in `per_route_config_new`; Envoy
        // destroys it once, after the last stream that could read it.
        drop(unsafe { Box::from_raw(config as *mut RouteConfig) });
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ConfigModulePtr,
    _filter_envoy: FilterEnvoyPtr,
) -> FilterModulePtr {
    guarded("http_filter_new", std::ptr::null(), || {
        let config = config.cast::<FilterConfig>();
        // SAFETY: `config` came from `Arc::into_raw` and lives until `config_destroy`, which
        // Envoy calls after creating its last filter; the filter keeps its own reference.
        let config = unsafe {
            Arc::increment_strong_count(config);
            Arc::from_raw(config)
        };
        let filter = Filter {
            config,
            exchange: None,
            started: false,
        };
        Box::into_raw(Box::new(filter)).cast_const().cast()
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: FilterModulePtr) {
    guarded("http_filter_destroy", (), || {
        // SAFETY: `filter` came from `Box::into_raw` in `filter_new`; Envoy destroys it once.
        drop(unsafe { Box::from_raw(filter as *mut Filter) });
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    headers_status(stream_hook(
        "request_headers",
        envoy,
        filter,
        HeadersStatus::Continue,
        HeadersStatus::StopIteration,
        |exchange, envoy| exchange.on_headers(envoy, Direction::Request, end_of_stream),
    ))
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    body_status(stream_hook(
        "request_body",
        envoy,
        filter,
        BodyStatus::Continue,
        BodyStatus::StopIterationNoBuffer,
        |exchange, envoy| exchange.on_body(envoy, Direction::Request, end_of_stream),
    ))
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
) -> u32 {
    trailers_status(stream_hook(
        "request_trailers",
        envoy,
        filter,
        TrailersStatus::Continue,
        TrailersStatus::StopIteration,
        |exchange, envoy| exchange.on_trailers(envoy, Direction::Request),
    ))
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    headers_status(stream_hook(
        "response_headers",
        envoy,
        filter,
        HeadersStatus::Continue,
        HeadersStatus::StopIteration,
        |exchange, envoy| exchange.on_headers(envoy, Direction::Response, end_of_stream),
    ))
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    body_status(stream_hook(
        "response_body",
        envoy,
        filter,
        BodyStatus::Continue,
        BodyStatus::StopIterationNoBuffer,
        |exchange, envoy| exchange.on_body(envoy, Direction::Response, end_of_stream),
    ))
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
) -> u32 {
    trailers_status(stream_hook(
        "response_trailers",
        envoy,
        filter,
        TrailersStatus::Continue,
        TrailersStatus::StopIteration,
        |exchange, envoy| exchange.on_trailers(envoy, Direction::Response),
    ))
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
) {
    guarded("stream_complete", (), || {
        // SAFETY: Envoy passes the pointers of a live stream (see `filter_of`).
        let (filter, mut envoy) = unsafe { (filter_of(filter), EnvoyStream::new(envoy)) };
        // Instances go back to the pool now rather than when Envoy gets round to `destroy`.
        filter.exchange = None;
        filter
            .config
            .stats
            .publish_if_due(&mut envoy, filter.config.metrics());
    })
}

fn headers_status(status: HeadersStatus) -> u32 {
    match status {
        HeadersStatus::Continue => abi::headers_status::CONTINUE,
        HeadersStatus::StopIteration => abi::headers_status::STOP_ITERATION,
    }
}

fn body_status(status: BodyStatus) -> u32 {
    match status {
        BodyStatus::Continue => abi::body_status::CONTINUE,
        BodyStatus::StopIterationNoBuffer => abi::body_status::STOP_ITERATION_NO_BUFFER,
    }
}

fn trailers_status(status: TrailersStatus) -> u32 {
    match status {
        TrailersStatus::Continue => abi::trailers_status::CONTINUE,
        TrailersStatus::StopIteration => abi::trailers_status::STOP_ITERATION,
    }
}

/// A message in flight may have its verdict: the waker a plugin's wait was handed went off
/// (see `exchange`).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
    _event_id: u64,
) {
    stream_hook("scheduled", envoy, filter, (), (), |exchange, envoy| {
        exchange.resume(envoy)
    });
}

// Hooks Envoy requires but this filter has no use for: it opens no HTTP streams of its own,
// and does not watch the downstream's buffers.

/// Envoy answered a plugin's request sent through one of its clusters (`envoy::EnvoyWay`).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    envoy: FilterEnvoyPtr,
    _filter: FilterModulePtr,
    callout_id: u64,
    result: u32,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    guarded("http_callout_done", (), || {
        // SAFETY: Envoy passes arrays of the sizes it gives, valid for this call.
        unsafe {
            envoy::callout_done(
                envoy,
                callout_id,
                result,
                headers,
                headers_size,
                body_chunks,
                body_chunks_size,
            );
        }
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: FilterEnvoyPtr,
    _filter: FilterModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: FilterEnvoyPtr,
    _filter: FilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: FilterEnvoyPtr,
    _filter: FilterModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: FilterEnvoyPtr,
    _filter: FilterModulePtr,
    _stream_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: FilterEnvoyPtr,
    _filter: FilterModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: FilterEnvoyPtr,
    _filter: FilterModulePtr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: FilterEnvoyPtr,
    _filter: FilterModulePtr,
) {
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_envoy_every_callback_is_missing_so_the_module_would_refuse_to_load() {
        // A test binary exports none of Envoy's callbacks: the check at load finds each one
        // missing, and `program_init` would return NULL, which Envoy reports as a failed load.
        let missing = missing_callbacks();
        assert_eq!(missing.len(), abi::CALLBACKS.len());
        assert!(missing.contains(&"envoy_dynamic_module_callback_http_send_response"));
        assert!(missing.contains(&"envoy_dynamic_module_callback_log"));
    }
}
