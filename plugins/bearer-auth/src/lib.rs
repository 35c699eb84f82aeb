//! Lets a request through only with `authorization: Bearer <token>` for a configured token;
//! answers everything else with 401 and `www-authenticate`, before the upstream is touched.
//! gRPC clients get `grpc-status: 16` (UNAUTHENTICATED) as well.
//!
//! Configuration: `realm=<realm>;tokens=<token>,<token>,...`, e.g. `realm=api;tokens=s3cret`;
//! or, to keep the tokens out of the configuration, `realm=api;tokens_secret=<secret>` with the
//! secret granted to the plugin (`secrets = ["<secret>"]` in its settings): the secret's file
//! holds one token per line (or comma-separated), and is read on every request, so a rotated
//! file takes effect without a restart. Tokens from both are accepted.

use wasm_extproc_sdk::{
    Action, Headers, ImmediateResponse, Phases, Plugin, config, export_plugin, log, secrets,
};

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
            Some(("tokens", tokens)) => settings.tokens.extend(split(tokens)),
            Some(("tokens_secret", name)) => match secrets::get(name.trim()) {
                Some(tokens) => settings.tokens.extend(split(&tokens)),
                None => log::warn(&format!(
                    "tokens_secret: the secret {:?} was not granted to this plugin (secrets = \
                     [...] in its settings); its tokens are not accepted",
                    name.trim()
                )),
            },
            _ => {}
        }
    }
    settings
}

/// Tokens separated by commas or line breaks.
fn split(tokens: &str) -> impl Iterator<Item = String> + '_ {
    tokens
        .split([',', '\n'])
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Whether `presented` is one of `tokens`, in time that does not depend on where they differ.
fn accepted(presented: &str, tokens: &[String]) -> bool {
    tokens.iter().fold(false, |found, token| {
        let same_length = token.len() == presented.len();
        let difference = token
            .bytes()
            .zip(presented.bytes())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        found | (same_length & (difference == 0))
    })
}

impl Plugin for BearerAuth {
    const PHASES: Phases = Phases::REQUEST_HEADERS;

    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        let settings = settings();
        let presented = headers
            .get_str("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_string()));
        if presented.is_some_and(|token| accepted(&token, &settings.tokens)) {
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
