//! A fixed-window rate limit per client, kept in the host's state store: with `[kv] backend =
//! "redis"` every host behind the same Redis enforces one limit together.
//!
//! The client is the value of a configured header (an API key) or, without one, the address
//! Envoy saw the request come from (`source.address`, which the ext_proc filter must list in
//! `request_attributes`), without its port; an IPv6 address counts by its network
//! (`ipv6_prefix`, 64 bits by default), since one client holds a whole /64. Past the limit the
//! request is answered 429 with `retry-after` and `x-ratelimit-limit`, `x-ratelimit-remaining`
//! and `x-ratelimit-reset` (seconds); a request let through gets the same three headers on its
//! response.
//!
//! Every client is counted, whatever its identity holds: the store's key is a digest of it, so a
//! 10 KB API key is counted like a short one. When the namespace is full (more clients in one
//! window than `[kv] max_entries`), a client that is not yet counted is refused 429 -- the
//! limit is never lifted because the store cannot count -- until windows end and make room; the
//! host counts those refusals (`kv_operations_total{result="full"}`).
//!
//! Configuration: `limit=<requests>;window_ms=<ms>[;key_header=<name>][;namespace=<shared>]
//! [;on_store_error=allow|deny][;ipv6_prefix=<bits>]`, e.g.
//! `limit=100;window_ms=60000;key_header=x-api-key`. `namespace` counts in a shared namespace
//! (granted with `kv_namespaces`), so that several routes' chains share one limit.
//! `on_store_error` decides only when the store cannot be reached in time (Redis down or
//! slow): requests go through uncounted (`allow`, the default: a rate limit should not take a
//! service down with it) or are answered 503 (`deny`). Every other store error refuses the
//! request: 429 for a full namespace, 500 for a misconfiguration (a namespace not granted, a
//! window past the store's 366 days).

use core::net::{IpAddr, Ipv6Addr};
use core::time::Duration;

use sha2::{Digest, Sha256};
use wasm_extproc_sdk::kv::{ErrorKind, Store, WindowCount};
use wasm_extproc_sdk::{
    Action, Headers, ImmediateResponse, Phases, Plugin, config, context, export_plugin, log,
};

struct Settings {
    limit: u64,
    window: Duration,
    key_header: Option<String>,
    namespace: Option<String>,
    deny_on_store_error: bool,
    ipv6_prefix: u8,
}

fn settings() -> Settings {
    let mut settings = Settings {
        limit: 100,
        window: Duration::from_secs(60),
        key_header: None,
        namespace: None,
        deny_on_store_error: false,
        ipv6_prefix: 64,
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
            Some(("ipv6_prefix", bits)) => {
                if let Ok(bits) = bits.trim().parse::<u8>() {
                    settings.ipv6_prefix = bits.min(128);
                }
            }
            _ => {}
        }
    }
    settings
}

/// Who is asking, as bytes: the configured header's value, else the source address without
/// its port (an IPv6 one cut to its network), else `unknown` (Envoy sent no address).
fn client(settings: &Settings, headers: &Headers) -> Vec<u8> {
    if let Some(value) = settings.key_header.as_deref().and_then(|h| headers.get(h)) {
        let mut id = b"key:".to_vec();
        id.extend(value);
        return id;
    }
    let Some(address) = context::attribute("source.address") else {
        return b"unknown".to_vec();
    };
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => address.as_str(),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(network(v6, settings.ipv6_prefix)),
        },
        Ok(v4) => v4,
        // Not an address: count it as the text it is.
        Err(_) => return format!("addr:{host}").into_bytes(),
    };
    format!("addr:{ip}").into_bytes()
}

/// `address` with all but its first `bits` bits cleared.
fn network(address: Ipv6Addr, bits: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
    Ipv6Addr::from(u128::from(address) & mask)
}

/// The store's key for a client: a digest, so that every identity fits the store's key bound
/// and none can be confused with another.
fn counter_key(client: &[u8]) -> String {
    format!("c:{:x}", Sha256::digest(client))
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

/// 429, to be retried when the window ends.
fn too_many(limit: u64, resets_in: Duration, body: &[u8], details: &str) -> Action {
    let count = WindowCount {
        count: limit.saturating_add(1),
        resets_in,
    };
    let mut answer = vec![(
        "retry-after".to_string(),
        seconds(resets_in).to_string().into_bytes(),
    )];
    answer.extend(rate_headers(limit, &count));
    answer.push(("content-type".into(), b"application/json".to_vec()));
    Action::Respond(ImmediateResponse {
        status: 429,
        headers: answer,
        body: body.to_vec(),
        grpc_status: None,
        details: details.into(),
    })
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
        let key = counter_key(&client(&settings, headers));
        let store = match &settings.namespace {
            Some(name) => Store::open_shared(name),
            None => Store::open(),
        };
        let counted = store.and_then(|s| s.increment_in_window(&key, 1, settings.window));
        let count = match counted {
            Ok(count) => count,
            Err(e) if e.is_unavailable() && settings.deny_on_store_error => {
                log::error(&format!("rate limit store unavailable, refusing: {e}"));
                return Action::respond(503, "rate limit unavailable");
            }
            Err(e) if e.is_unavailable() => {
                log::warn(&format!(
                    "rate limit store unavailable, letting through: {e}"
                ));
                return Action::Continue;
            }
            Err(e) if e.kind() == ErrorKind::Full => {
                log::warn(&format!(
                    "too many clients to count, refusing a new one: {e}"
                ));
                return too_many(
                    settings.limit,
                    settings.window,
                    br#"{"error":"too many clients"}"#,
                    "rate_limit_full",
                );
            }
            Err(e) => {
                log::error(&format!("rate limit misconfigured, refusing: {e}"));
                return Action::respond(500, "rate limit misconfigured");
            }
        };
        if count.count <= settings.limit {
            self.counted = Some((settings.limit, count));
            return Action::Continue;
        }
        too_many(
            settings.limit,
            count.resets_in,
            br#"{"error":"too many requests"}"#,
            "rate_limited",
        )
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
