//! Feeds arbitrary sequences of `ProcessingRequest`s (length-prefixed protobuf) through the
//! steps the gRPC service runs for each message, `Exchange::accept` and `process` -- decode,
//! check against the protocol state machine, run the (empty) chain, build the answers. Checks
//! the invariants the host relies on: nothing panics; an accepted phase was one that could
//! still come; what can come only shrinks; every accepted message gets exactly one answer
//! (zero or more only for a FULL_DUPLEX_STREAMED body, none in observability mode), and every
//! answer encodes and decodes.

#![no_main]

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use wasm_extproc::config::{DEFAULT_CHAIN, Settings};
use wasm_extproc::ext_proc::exchange::Exchange;
use wasm_extproc::http::BodyMode;
use wasm_extproc::metrics::Metrics;
use wasm_extproc::registry::{Chain, Generation};

fuzz_target!(|data: &[u8]| {
    let config = Settings::from_toml("", std::path::Path::new("fuzz.toml")).expect("defaults");
    let metrics = Metrics::new();
    let chain = Chain::new(DEFAULT_CHAIN, Vec::new(), &metrics, config.instance_wait);
    let generation = Arc::new(Generation::new(1, vec![chain], &config));
    let mut exchange = Exchange::new(generation, metrics, None);
    let mut rest = data;
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let (message, tail) = rest[2..].split_at(len.min(rest.len() - 2));
        rest = tail;
        let Ok(request) = ProcessingRequest::decode(message) else {
            continue;
        };
        let observability = request.observability_mode;
        let could_come = exchange.protocol().to_come();
        let Ok(accepted) = exchange.accept(request) else {
            // The host ends the stream here; carrying on explores more states.
            continue;
        };
        assert!(accepted.ahead.is_none(), "no plugin, no budget to extend");
        // No plugin is loaded: processing awaits nothing.
        let step = futures::executor::block_on(exchange.process(accepted));
        let protocol = exchange.protocol();
        let phase = protocol.last_phase().expect("a phase was accepted");
        assert!(could_come.contains(phase), "{phase} accepted but not expected");
        let now = protocol.to_come();
        assert!(
            now.iter().all(|p| could_come.contains(p)),
            "phases to come grew"
        );
        let full_duplex_body = phase == phase.direction().body()
            && protocol.body_mode(phase.direction()) == BodyMode::FullDuplexStreamed;
        if observability {
            assert!(step.answers.is_empty());
        } else if !full_duplex_body {
            assert_eq!(step.answers.len(), 1);
        }
        for answer in step.answers {
            let bytes = answer.encode_to_vec();
            assert!(ProcessingResponse::decode(bytes.as_slice()).is_ok());
        }
    }
});
