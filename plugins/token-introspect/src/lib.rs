//! Lets a request through only with an active bearer token, as an OAuth 2.0 introspection
//! endpoint (RFC 7662) says: `POST token=...` to the endpoint, `{"active": true, "exp": ...,
//! "sub": ...}` back. Each answer is cached in the state store for the token's lifetime (to its
//! `exp`, at most `max_cache_ms`; an inactive token for `negative_cache_ms`), so a token is
//! checked once however many requests carry it, and, with `[kv] backend = "redis"`, once for
//! every host. Tokens are cached under their SHA-256, never in the clear.
//!
//! An active token's subject goes upstream as `x-auth-subject`; a missing or inactive one is
//! answered 401 with `www-authenticate`. When the endpoint cannot be reached in time, the
//! request is answered 503 (`on_error=deny`, the default) or let through (`allow`) with no
//! subject. Whatever happens, a client's own `x-auth-subject` is removed first: the upstream
//! only ever sees a subject this plugin checked.
//!
//! Configuration: `endpoint=<http://host:port/path>[;max_cache_ms=<ms>]
//! [;negative_cache_ms=<ms>][;on_error=allow|deny]`. The operator must allow the endpoint's
//! origin: `http_allow = ["http://host:port"]`.

use core::time::Duration;

use sha2::{Digest, Sha256};
use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasi::io::streams::StreamError;
use wasm_extproc_sdk::kv::Store;
use wasm_extproc_sdk::{
    Action, Headers, ImmediateResponse, Phases, Plugin, config, export_plugin, log,
};

/// The header that tells the upstream who the token belongs to.
const SUBJECT: &str = "x-auth-subject";

struct Settings {
    https: bool,
    authority: String,
    path: String,
    max_cache: Duration,
    negative_cache: Duration,
    allow_on_error: bool,
}

fn settings() -> Result<Settings, String> {
    let mut endpoint = None;
    let mut settings = Settings {
        https: false,
        authority: String::new(),
        path: String::new(),
        max_cache: Duration::from_secs(300),
        negative_cache: Duration::from_secs(10),
        allow_on_error: false,
    };
    let millis = |ms: &str| ms.trim().parse().map(Duration::from_millis).ok();
    for part in config().split(';') {
        match part.trim().split_once('=') {
            Some(("endpoint", url)) => endpoint = Some(url.trim().to_string()),
            Some(("max_cache_ms", ms)) => {
                settings.max_cache = millis(ms).unwrap_or(settings.max_cache)
            }
            Some(("negative_cache_ms", ms)) => {
                settings.negative_cache = millis(ms).unwrap_or(settings.negative_cache)
            }
            Some(("on_error", what)) => settings.allow_on_error = what.trim() == "allow",
            _ => {}
        }
    }
    let endpoint = endpoint.ok_or("no endpoint= in the configuration")?;
    let (https, rest) = match endpoint.split_once("://") {
        Some(("http", rest)) => (false, rest),
        Some(("https", rest)) => (true, rest),
        _ => return Err(format!("endpoint {endpoint:?} is not an http(s) URL")),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    settings.https = https;
    settings.authority = authority.into();
    settings.path = if path.is_empty() {
        "/".into()
    } else {
        path.into()
    };
    Ok(settings)
}

/// What the endpoint said about a token.
struct Introspection {
    active: bool,
    subject: Option<String>,
    /// Seconds since the epoch, if the token expires.
    expires: Option<u64>,
}

/// Asks the endpoint about `token`.
fn introspect(settings: &Settings, token: &str) -> Result<Introspection, String> {
    let headers = Fields::from_list(&[
        (
            "content-type".into(),
            b"application/x-www-form-urlencoded".to_vec(),
        ),
        ("accept".into(), b"application/json".to_vec()),
    ])
    .map_err(|e| format!("headers: {e:?}"))?;
    let request = OutgoingRequest::new(headers);
    let set = |ok: Result<(), ()>| ok.map_err(|()| "invalid endpoint".to_string());
    set(request.set_method(&Method::Post))?;
    set(request.set_scheme(Some(if settings.https {
        &Scheme::Https
    } else {
        &Scheme::Http
    })))?;
    set(request.set_authority(Some(&settings.authority)))?;
    set(request.set_path_with_query(Some(&settings.path)))?;
    let body = request.body().map_err(|()| "request body taken")?;
    let form = format!("token={}&token_type_hint=access_token", form_encode(token));
    {
        let stream = body.write().map_err(|()| "request body stream taken")?;
        stream
            .blocking_write_and_flush(form.as_bytes())
            .map_err(|e| format!("sending: {e:?}"))?;
    }
    let response = outgoing_handler::handle(request, None).map_err(|e| e.to_string())?;
    OutgoingBody::finish(body, None).map_err(|e| e.to_string())?;
    response.subscribe().block();
    let response = response
        .get()
        .ok_or("no response")?
        .map_err(|()| "response taken")?
        .map_err(|e| e.to_string())?;
    if response.status() != 200 {
        return Err(format!("the endpoint answered {}", response.status()));
    }
    let body = response.consume().map_err(|()| "response body taken")?;
    let json: serde_json::Value =
        serde_json::from_slice(&read_all(&body)?).map_err(|e| format!("not JSON: {e}"))?;
    drop(body);
    Ok(Introspection {
        active: json["active"].as_bool().unwrap_or(false),
        subject: json["sub"].as_str().map(str::to_string),
        expires: json["exp"].as_u64(),
    })
}

fn read_all(body: &IncomingBody) -> Result<Vec<u8>, String> {
    let stream = body.stream().map_err(|()| "response stream taken")?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend(chunk),
            Err(StreamError::Closed) => return Ok(bytes),
            Err(StreamError::LastOperationFailed(e)) => return Err(e.to_debug_string()),
        }
    }
}

/// `application/x-www-form-urlencoded` for a token's characters.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now() -> u64 {
    wasi::clocks::wall_clock::now().seconds
}

/// The cached answer for a token: `active:SUBJECT` or `inactive`.
fn cached(store: &Store, key: &str) -> Option<Introspection> {
    let value = String::from_utf8(store.get(key).ok()??).ok()?;
    Some(match value.strip_prefix("active:") {
        Some(subject) => Introspection {
            active: true,
            subject: Some(subject.into()).filter(|s: &String| !s.is_empty()),
            expires: None,
        },
        None => Introspection {
            active: false,
            subject: None,
            expires: None,
        },
    })
}

fn unauthorized(why: &str) -> Action {
    Action::Respond(ImmediateResponse {
        status: 401,
        headers: vec![
            (
                "www-authenticate".into(),
                format!("Bearer error=\"invalid_token\", error_description=\"{why}\"").into_bytes(),
            ),
            ("content-type".into(), b"application/json".to_vec()),
        ],
        body: br#"{"error":"invalid_token"}"#.to_vec(),
        grpc_status: None,
        details: "token_introspect_denied".into(),
    })
}

#[derive(Default)]
struct TokenIntrospect;

impl Plugin for TokenIntrospect {
    const PHASES: Phases = Phases::REQUEST_HEADERS;

    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        // The subject header is this plugin's to set: a client's own copy never goes upstream,
        // whichever way the check ends (a failed check let through with `on_error=allow`
        // included).
        headers.remove(SUBJECT);
        let settings = match settings() {
            Ok(settings) => settings,
            Err(e) => {
                log::error(&format!("token-introspect is misconfigured: {e}"));
                return Action::respond(500, "misconfigured");
            }
        };
        let Some(token) = headers
            .get_str("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_string()))
        else {
            return unauthorized("no bearer token");
        };
        let key = format!("token:{:x}", Sha256::digest(token.as_bytes()));
        let store = Store::open();
        let answer = match store.as_ref().ok().and_then(|s| cached(s, &key)) {
            Some(answer) => answer,
            None => match introspect(&settings, &token) {
                Ok(answer) => {
                    let ttl = match (answer.active, answer.expires) {
                        (false, _) => settings.negative_cache,
                        (true, Some(exp)) => {
                            Duration::from_secs(exp.saturating_sub(now())).min(settings.max_cache)
                        }
                        (true, None) => settings.max_cache,
                    };
                    let value = match (&answer.active, &answer.subject) {
                        (true, subject) => format!("active:{}", subject.as_deref().unwrap_or("")),
                        (false, _) => "inactive".into(),
                    };
                    if let Ok(store) = &store
                        && !ttl.is_zero()
                        && let Err(e) = store.set_with_ttl(&key, value, ttl)
                    {
                        log::warn(&format!("could not cache the answer: {e}"));
                    }
                    answer
                }
                Err(e) if settings.allow_on_error => {
                    log::warn(&format!("introspection failed, letting through: {e}"));
                    return Action::Continue;
                }
                Err(e) => {
                    log::error(&format!("introspection failed, refusing: {e}"));
                    return Action::respond(503, "token check unavailable");
                }
            },
        };
        if !answer.active {
            return unauthorized("the token is not active");
        }
        if let Some(subject) = &answer.subject {
            headers.set(SUBJECT, subject);
        }
        Action::Continue
    }
}

export_plugin!(TokenIntrospect);
