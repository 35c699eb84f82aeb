//! The `envoy.service.ext_proc.v3.ExternalProcessor` service.
//!
//! - [`protocol`]: the per-stream state machine -- which messages may come when, what may be
//!   switched off, when the stream may close -- with no I/O.
//! - [`convert`]: Envoy's protobufs to the host's types and back; the one place that builds a
//!   `ProcessingResponse`.
//! - [`exchange`]: one stream as one step -- a message in, its answers out -- over the two
//!   above and the plugin chain.
//! - [`service`]: the tonic service, a thin loop that feeds each stream's messages to its
//!   exchange.
//! - [`grpc`]: the service's one gRPC method as tonic serves it, with stream buffers sized
//!   for ext_proc's messages.
//! - [`observe`]: what the service shows of its streams to whoever watches them (the
//!   recorder), without knowing who.
//! - [`overload`]: how far behind the host runs, and new streams refused while it runs too
//!   far behind to answer them in time.
//! - [`fuzz`]: the protocol's invariants under arbitrary input, for the fuzzer and a test.

pub mod convert;
pub mod exchange;
pub mod fuzz;
pub mod grpc;
pub mod observe;
pub mod overload;
pub mod protocol;
pub mod service;

pub use grpc::ExtProcServer;
pub use service::ExtProcService;
