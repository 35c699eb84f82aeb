//! A fixed-window rate limit per client, kept in the host's state store: with `[kv] backend =
//! "redis"` every host behind the same Redis enforces one limit together.
//!
//! The client is the value of a configured header (an API key) or, without one, the address
//! Envoy saw the request come from (`source.address`, which the ext_proc filter must list in
//! `request_attributes`), without its port. Past the limit the request is answered 429 with
//! `retry-after` and `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset`
//! (seconds); a request let through gets the same three headers on its response.
//!
//! Configuration: `limit=<requests>;window_ms=<ms>[;key_header=<name>][;namespace=<shared>]
//! [;on_store_error=allow|deny]`, e.g. `limit=100;window_ms=60000;key_header=x-api-key`.
//! `namespace` counts in a shared namespace (granted with `kv_namespaces`), so that several
//! routes' chains share one limit. When the store cannot be reached, requests go through
//! (`allow`, the default: a rate limit should not take a service down with it) or are answered
//! 503 (`deny`).

use core::time::Duration;

use wasm_extproc_sdk::kv::{Store, WindowCount};
use wasm_extproc_sdk::{
    Action, Headers, ImmediateResponse, Phases, Plugin, config, context, export_plugin, log,
};

struct Settings {
    limit: u64,
    window: Duration,
    key_header: Option<String>,
    namespace: Option<String>,
    deny_on_store_error: bool,
}

fn settings() -> Settings {
    let mut settings = Settings {
        limit: 100,
        window: Duration::from_secs(60),
        key_header: None,
        namespace: None,
        deny_on_store_error: false,
    };
    for part in config().split(';') {
        match part.trim().split_once('=') {
            Some(("limit", n)) => settings.limit = n.trim().parse().unwrap_or(settings.limit),
            Some(("window_ms", ms)) => {
                if let Ok(ms) = ms.trim().parse::<u64>() {
                    settings.window = Duration::from_millis(ms.max(1));
                }
            }
            Some(("key_header", name)) => settings.key_header = Some(name.trim().to_lowercase()),
            Some(("namespace", name)) => settings.namespace = Some(name.trim().into()),
            Some(("on_store_error", what)) => settings.deny_on_store_error = what.trim() == "deny",
            _ => {}
        }
    }
    settings
}

/// Who is asking: the configured header's value, else the source address without its port.
fn client(settings: &Settings, headers: &Headers) -> String {
    if let Some(value) = settings
        .key_header
        .as_deref()
        .and_then(|h| headers.get_str(h))
    {
        return format!("key:{value}");
    }
    match context::attribute("source.address") {
        Some(address) => {
            let host = match address.rsplit_once(':') {
                Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
                _ => address.as_str(),
            };
            format!(
                "addr:{}",
                host.trim_start_matches('[').trim_end_matches(']')
            )
        }
        None => "unknown".into(),
    }
}

/// The three `x-ratelimit-*` headers for a window's count.
fn rate_headers(limit: u64, count: &WindowCount) -> [(String, Vec<u8>); 3] {
    [
        ("x-ratelimit-limit".into(), limit.to_string().into_bytes()),
        (
            "x-ratelimit-remaining".into(),
            limit.saturating_sub(count.count).to_string().into_bytes(),
        ),
        (
            "x-ratelimit-reset".into(),
            seconds(count.resets_in).to_string().into_bytes(),
        ),
    ]
}

/// Whole seconds, rounded up: `retry-after: 0` would invite an immediate retry.
fn seconds(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

#[derive(Default)]
struct RateLimit {
    /// The request's count, for the response's headers.
    counted: Option<(u64, WindowCount)>,
}

impl Plugin for RateLimit {
    const PHASES: Phases = Phases::REQUEST_HEADERS.union(Phases::RESPONSE_HEADERS);

    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        let settings = settings();
        let key = client(&settings, headers);
        let store = match &settings.namespace {
            Some(name) => Store::open_shared(name),
            None => Store::open(),
        };
        let counted = store.and_then(|s| s.increment_in_window(&key, 1, settings.window));
        let count = match counted {
            Ok(count) => count,
            Err(e) if settings.deny_on_store_error => {
                log::error(&format!("rate limit store unavailable, refusing: {e}"));
                return Action::respond(503, "rate limit unavailable");
            }
            Err(e) => {
                log::warn(&format!(
                    "rate limit store unavailable, letting through: {e}"
                ));
                return Action::Continue;
            }
        };
        if count.count <= settings.limit {
            self.counted = Some((settings.limit, count));
            return Action::Continue;
        }
        let mut answer = vec![(
            "retry-after".to_string(),
            seconds(count.resets_in).to_string().into_bytes(),
        )];
        answer.extend(rate_headers(settings.limit, &count));
        answer.push(("content-type".into(), b"application/json".to_vec()));
        Action::Respond(ImmediateResponse {
            status: 429,
            headers: answer,
            body: br#"{"error":"too many requests"}"#.to_vec(),
            grpc_status: None,
            details: "rate_limited".into(),
        })
    }

    fn on_response_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        if let Some((limit, count)) = &self.counted {
            for (name, value) in rate_headers(*limit, count) {
                headers.set(&name, value);
            }
        }
        Action::Continue
    }
}

export_plugin!(RateLimit);
