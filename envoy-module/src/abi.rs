//! Envoy's dynamic-module C ABI, as far as this module uses it: the types and the callbacks
//! Envoy exports, declared by hand from `source/extensions/dynamic_modules/abi/abi.h` (the
//! HTTP filter section), whose prototypes Envoy 1.40 keeps (ABI v0.2.0 only added to v0.1.0).
//! Enums are C `int`s numbered from 0 in declaration order: they travel as `u32` here, never
//! as Rust enums Envoy could hand an unknown value.

#![allow(unsafe_code, reason = "declares the functions Envoy exports")]

use std::ffi::{CStr, c_char, c_void};

/// What `envoy_dynamic_module_on_program_init` returns: the ABI this module was written
/// against. Envoy 1.40 expects exactly this; another value only draws a warning, `NULL` fails.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// Memory Envoy owns, valid until the hook returns (or a setter is called).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

/// Memory this module owns, lent to Envoy for one call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

impl EnvoyBuffer {
    pub const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };

    /// The bytes Envoy lent.
    ///
    /// # Safety
    ///
    /// The buffer is one Envoy passed or filled in during the current call, and the slice
    /// does not outlive that call.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.length == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: the caller's promise: Envoy's buffer holds `length` bytes for now.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.length) }
    }
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    /// `{NULL, 0}`: what `set_header` takes to remove a header.
    pub const NONE: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
}

pub type ConfigEnvoyPtr = *mut c_void;
pub type ConfigModulePtr = *const c_void;
pub type FilterEnvoyPtr = *mut c_void;
pub type FilterModulePtr = *const c_void;
/// A route's configuration of this filter, as `on_http_filter_per_route_config_new` made it.
pub type RouteConfigModulePtr = *const c_void;
/// A stream's scheduler: `commit` from any thread has Envoy call the stream's `scheduled`
/// hook on its worker.
pub type SchedulerPtr = *mut c_void;

/// `envoy_dynamic_module_type_http_callout_init_result_Success`.
pub const CALLOUT_STARTED: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_result_Success`.
pub const CALLOUT_ANSWERED: u32 = 0;

/// `envoy_dynamic_module_type_http_header_type`.
pub mod header_type {
    pub const REQUEST_HEADER: u32 = 0;
    pub const REQUEST_TRAILER: u32 = 1;
    pub const RESPONSE_HEADER: u32 = 2;
    pub const RESPONSE_TRAILER: u32 = 3;
}

/// `envoy_dynamic_module_type_http_body_type`.
pub mod body_type {
    pub const RECEIVED_REQUEST: u32 = 0;
    pub const BUFFERED_REQUEST: u32 = 1;
    pub const RECEIVED_RESPONSE: u32 = 2;
    pub const BUFFERED_RESPONSE: u32 = 3;
}

/// `envoy_dynamic_module_type_on_http_filter_{request,response}_headers_status`.
pub mod headers_status {
    pub const CONTINUE: u32 = 0;
    pub const STOP_ITERATION: u32 = 1;
}

/// `envoy_dynamic_module_type_on_http_filter_{request,response}_body_status`.
pub mod body_status {
    pub const CONTINUE: u32 = 0;
    pub const STOP_ITERATION_NO_BUFFER: u32 = 3;
}

/// `envoy_dynamic_module_type_on_http_filter_{request,response}_trailers_status`.
pub mod trailers_status {
    pub const CONTINUE: u32 = 0;
    pub const STOP_ITERATION: u32 = 1;
}

/// `envoy_dynamic_module_type_metadata_source_Dynamic`.
pub const METADATA_DYNAMIC: u32 = 0;

/// `envoy_dynamic_module_type_log_level`.
pub mod log_level {
    pub const TRACE: u32 = 0;
    pub const DEBUG: u32 = 1;
    pub const INFO: u32 = 2;
    pub const WARN: u32 = 3;
    pub const ERROR: u32 = 4;
    pub const OFF: u32 = 6;
}

/// `envoy_dynamic_module_type_metrics_result_Success`.
pub const METRICS_SUCCESS: u32 = 0;

/// The number Envoy knows an attribute by, for a name from [`ATTRIBUTES`].
pub fn attribute_id(name: &str) -> Option<u32> {
    ATTRIBUTES
        .iter()
        .position(|known| *known == name)
        .map(|index| index as u32)
}

/// The attributes ext_proc forwards by name, as `envoy_dynamic_module_type_attribute_id`
/// numbers them (their names are ext_proc's, so a plugin asks for the same thing in both
/// modes).
pub const ATTRIBUTES: [&str; 68] = [
    "request.path",
    "request.url_path",
    "request.host",
    "request.scheme",
    "request.method",
    "request.headers",
    "request.referer",
    "request.useragent",
    "request.time",
    "request.id",
    "request.protocol",
    "request.query",
    "request.duration",
    "request.size",
    "request.total_size",
    "response.code",
    "response.code_details",
    "response.flags",
    "response.grpc_status",
    "response.headers",
    "response.trailers",
    "response.size",
    "response.total_size",
    "response.backend_latency",
    "source.address",
    "source.port",
    "destination.address",
    "destination.port",
    "connection.id",
    "connection.mtls",
    "connection.requested_server_name",
    "connection.tls_version",
    "connection.subject_local_certificate",
    "connection.subject_peer_certificate",
    "connection.dns_san_local_certificate",
    "connection.dns_san_peer_certificate",
    "connection.uri_san_local_certificate",
    "connection.uri_san_peer_certificate",
    "connection.sha256_peer_certificate_digest",
    "connection.transport_failure_reason",
    "connection.termination_details",
    "upstream.address",
    "upstream.port",
    "upstream.tls_version",
    "upstream.subject_local_certificate",
    "upstream.subject_peer_certificate",
    "upstream.dns_san_local_certificate",
    "upstream.dns_san_peer_certificate",
    "upstream.uri_san_local_certificate",
    "upstream.uri_san_peer_certificate",
    "upstream.sha256_peer_certificate_digest",
    "upstream.local_address",
    "upstream.transport_failure_reason",
    "upstream.request_attempt_count",
    "upstream.cx_pool_ready_duration",
    "upstream.locality",
    "xds.node",
    "xds.cluster_name",
    "xds.cluster_metadata",
    "xds.listener_direction",
    "xds.listener_metadata",
    "xds.route_name",
    "xds.route_metadata",
    "xds.virtual_host_name",
    "xds.virtual_host_metadata",
    "xds.upstream_host_metadata",
    "xds.filter_chain_name",
    "health_check",
];

/// Declares Envoy's callbacks and lists their names in [`CALLBACKS`].
macro_rules! envoy_callbacks {
    ($(pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        unsafe extern "C" {
            $(pub fn $name($($arg: $ty),*) $(-> $ret)?;)*
        }

        /// Every callback this module calls, by name. Envoy resolves them lazily, at the first
        /// call, and a missing one would abort Envoy there: the module checks them all when it
        /// loads instead (see `hooks`).
        pub const CALLBACKS: &[&CStr] = &[$(
            match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                Ok(name) => name,
                Err(_) => panic!("callback names have no NUL"),
            }
        ),*];
    };
}

envoy_callbacks! {
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    pub fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: FilterEnvoyPtr,
        header_type: u32,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterEnvoyPtr,
        header_type: u32,
        result: *mut EnvoyHttpHeader,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: FilterEnvoyPtr,
        body_type: u32,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: FilterEnvoyPtr,
        body_type: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_drain_body(
        filter: FilterEnvoyPtr,
        body_type: u32,
        bytes: usize,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_append_body(
        filter: FilterEnvoyPtr,
        body_type: u32,
        data: ModuleBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoyPtr,
        status_code: u32,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter: FilterEnvoyPtr,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );
    pub fn envoy_dynamic_module_callback_http_get_metadata_keys_count(
        filter: FilterEnvoyPtr,
        source: u32,
        namespace: ModuleBuffer,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_metadata_keys(
        filter: FilterEnvoyPtr,
        source: u32,
        namespace: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_metadata_string(
        filter: FilterEnvoyPtr,
        source: u32,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_metadata_number(
        filter: FilterEnvoyPtr,
        source: u32,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut f64,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_metadata_bool(
        filter: FilterEnvoyPtr,
        source: u32,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut bool,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_clear_route_cache(filter: FilterEnvoyPtr);
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: FilterEnvoyPtr);
    pub fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter: FilterEnvoyPtr);
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter: FilterEnvoyPtr,
    ) -> SchedulerPtr;
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: SchedulerPtr,
        event_id: u64,
    );
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: SchedulerPtr);
    pub fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: FilterEnvoyPtr,
        callout_id: *mut u64,
        cluster: ModuleBuffer,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;
    // The configuration of this filter on the stream's route (or virtual host), `NULL` if
    // it has none.
    pub fn envoy_dynamic_module_callback_get_most_specific_route_config(
        filter: FilterEnvoyPtr,
    ) -> RouteConfigModulePtr;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: FilterEnvoyPtr,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: FilterEnvoyPtr,
        attribute_id: u32,
        result: *mut u64,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_bool(
        filter: FilterEnvoyPtr,
        attribute_id: u32,
        result: *mut bool,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        gauge_id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
}
