//! Lets a request through only with `authorization: Bearer <token>` for a configured token;
//! answers everything else with 401 and `www-authenticate`, before the upstream is touched.
//! gRPC clients get `grpc-status: 16` (UNAUTHENTICATED) as well.
//!
//! Configuration: `realm=<realm>;tokens=<token>,<token>,...`, e.g. `realm=api;tokens=s3cret`.

use wasm_extproc_sdk::{Action, Headers, ImmediateResponse, Phases, Plugin, config, export_plugin};

#[derive(Default)]
struct BearerAuth;

struct Settings {
    realm: String,
    tokens: Vec<String>,
}

fn settings() -> Settings {
    let mut settings = Settings {
        realm: "wasm-extproc".into(),
        tokens: Vec::new(),
    };
    for part in config().split(';') {
        match part.trim().split_once('=') {
            Some(("realm", realm)) => settings.realm = realm.trim().into(),
            Some(("tokens", tokens)) => {
                settings.tokens = tokens
                    .split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect();
            }
            _ => {}
        }
    }
    settings
}

impl Plugin for BearerAuth {
    const PHASES: Phases = Phases::REQUEST_HEADERS;

    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        let settings = settings();
        let presented = headers
            .get_str("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_string()));
        if presented.is_some_and(|token| settings.tokens.contains(&token)) {
            return Action::Continue;
        }
        let grpc = headers
            .get_str("content-type")
            .is_some_and(|t| t.starts_with("application/grpc"));
        Action::Respond(ImmediateResponse {
            status: 401,
            headers: vec![
                (
                    "www-authenticate".into(),
                    format!("Bearer realm=\"{}\"", settings.realm).into_bytes(),
                ),
                ("content-type".into(), b"application/json".to_vec()),
            ],
            body: br#"{"error":"unauthorized"}"#.to_vec(),
            grpc_status: grpc.then_some(16),
            details: "bearer_auth_denied".into(),
        })
    }
}

export_plugin!(BearerAuth);
