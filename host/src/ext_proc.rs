//! The `envoy.service.ext_proc.v3.ExternalProcessor` service.
//!
//! - [`protocol`]: the per-stream state machine -- which messages may come when -- with no I/O.
//! - [`convert`]: Envoy's protobufs to the host's types and back; the one place that builds a
//!   `ProcessingResponse`.
//! - [`guard`]: Envoy's rules for what may be sent, checked against every plugin's output.
//! - [`service`]: the tonic service and the task that serves one stream, a thin loop around
//!   the two above and the plugin chain.

pub mod convert;
pub mod guard;
pub mod protocol;
pub mod service;

pub use service::ExtProcService;
