//! What the benchmarks share: where the components are, and the headers of a typical exchange.

#![allow(dead_code, reason = "each benchmark uses part of it")]

use std::path::{Path, PathBuf};

use wasm_extproc_core::http::{HeaderMap, Message};

/// The bundled plugins need no WASI (plugins/.cargo/config.toml); fixtures and the other
/// languages' examples use it.
pub const BUNDLED: &str = "wasm32-unknown-unknown";
pub const WASI: &str = "wasm32-wasip2";

/// The target directory every build shares, as xtask finds it: `$CARGO_TARGET_DIR`, else the
/// repository's `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Where the build leaves components for `target`.
pub fn components(target: &str) -> PathBuf {
    target_dir().join(target).join("release")
}

/// Where a benchmark that prints a table leaves it, for `cargo xtask bench` to put in the report.
pub fn tables() -> PathBuf {
    target_dir().join("bench")
}

/// Request headers as Envoy sends them for a typical API call behind an Istio sidecar.
pub fn request_headers() -> Message {
    headers(
        &[
            (":authority", "httpbin.default.svc.cluster.local:8000"),
            (":path", "/headers"),
            (":method", "GET"),
            (":scheme", "http"),
            ("user-agent", "curl/8.5.0"),
            ("accept", "*/*"),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "6b8e9f3a-2c1d-4e5f-8a9b-0c1d2e3f4a5b"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
            ("x-envoy-attempt-count", "1"),
        ],
        true,
    )
}

pub fn response_headers() -> Message {
    headers(
        &[
            (":status", "200"),
            ("content-type", "application/json"),
            ("content-length", "512"),
            ("date", "Thu, 26 Nov 2026 10:00:00 GMT"),
            ("server", "envoy"),
            ("x-envoy-upstream-service-time", "2"),
        ],
        false,
    )
}

fn headers(entries: &[(&str, &str)], end_of_stream: bool) -> Message {
    Message::Headers {
        headers: HeaderMap::from_entries(
            entries
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        ),
        end_of_stream,
    }
}
