//! Feeds arbitrary sequences of `ProcessingRequest`s (length-prefixed protobuf) through what a
//! stream does with each message before and after the plugins: decode, convert, check against
//! the protocol state machine, and build the answer. Checks the invariants the host relies on:
//! nothing panics; an accepted phase was one that could still come; what can come only shrinks;
//! every accepted message gets exactly one answer (zero or more only for a FULL_DUPLEX_STREAMED
//! body), and every answer encodes and decodes.

#![no_main]

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use wasm_extproc::ext_proc::convert::{self, Answering};
use wasm_extproc::ext_proc::protocol::StreamProtocol;
use wasm_extproc::http::{BodyMode, Decision, Effects, Message, Phase, PhaseSet, Verdict};

fuzz_target!(|data: &[u8]| {
    // First byte: the phases the loaded plugins handle.
    let Some((&live_bits, mut rest)) = data.split_first() else {
        return;
    };
    let live: PhaseSet = Phase::ALL
        .into_iter()
        .enumerate()
        .filter(|(i, _)| live_bits & (1 << i) != 0)
        .map(|(_, p)| p)
        .collect();
    let mut protocol = StreamProtocol::new();
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let (message, tail) = rest[2..].split_at(len.min(rest.len() - 2));
        rest = tail;
        let Ok(request) = ProcessingRequest::decode(message) else {
            continue;
        };
        let Ok(inbound) = convert::inbound(request) else {
            continue;
        };
        let could_come = protocol.to_come();
        let phase = inbound.phase;
        if protocol.observe(&inbound).is_err() {
            // The host ends the stream here; carrying on explores more states.
            continue;
        }
        assert!(could_come.contains(phase), "{phase} accepted but not expected");
        let now = protocol.to_come();
        assert!(
            now.iter().all(|p| could_come.contains(p)),
            "phases to come grew"
        );
        let direction = phase.direction();
        let answering = Answering {
            body_mode: protocol.body_mode(direction),
            content_length: protocol.content_length(direction),
            mode_override: protocol.mode_override(phase, live),
        };
        let full_duplex_body = matches!(inbound.message, Message::Body(_))
            && answering.body_mode == BodyMode::FullDuplexStreamed;
        let verdict = Verdict {
            decision: Decision::Continue(inbound.message),
            effects: Effects::default(),
        };
        let replies = convert::replies(phase, verdict, &answering);
        if !full_duplex_body {
            assert_eq!(replies.len(), 1);
        }
        for reply in replies {
            let bytes = reply.encode_to_vec();
            assert!(envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse::decode(
                bytes.as_slice()
            )
            .is_ok());
        }
        let _ = protocol.may_close(live);
    }
});
