//! The Alibaba Cloud Service Mesh ext_proc demo as a plugin: tags every request with
//! `x-ext-proc-header: hello-to-asm` and every response with `x-ext-proc-header: hello-from-asm`.

use wasm_extproc_sdk::{Action, Headers, Phases, Plugin, export_plugin};

#[derive(Default)]
struct AsmDemo;

impl Plugin for AsmDemo {
    const PHASES: Phases = Phases::REQUEST_HEADERS.union(Phases::RESPONSE_HEADERS);

    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        headers.set("x-ext-proc-header", "hello-to-asm");
        Action::Continue
    }

    fn on_response_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        headers.set("x-ext-proc-header", "hello-from-asm");
        Action::Continue
    }
}

export_plugin!(AsmDemo);
