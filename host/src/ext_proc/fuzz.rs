//! The stream protocol under arbitrary input: what `cargo fuzz run stream_protocol` (fuzz/)
//! drives, here so that the workspace builds and lints it with the code it exercises, and a
//! unit test runs it on seeded random input at every `cargo xtask test`.
//!
//! Input: a sequence of length-prefixed (`u16`, little-endian) `ProcessingRequest`s, fed
//! through the steps the gRPC service runs for each message, `Exchange::accept` and `process`
//! -- decode, check against the protocol state machine, run the (empty) chain, build the
//! answers. The invariants the host relies on: nothing panics; an accepted phase was one that
//! could still come; what can come only shrinks; every accepted message gets exactly one
//! answer (zero or more only for a FULL_DUPLEX_STREAMED body, none in observability mode), and
//! every answer encodes and decodes.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use prost::Message as _;

use super::exchange::Exchange;
use crate::config::{DEFAULT_CHAIN, Settings};
use crate::http::BodyMode;
use crate::metrics::Metrics;
use crate::registry::{Chain, Generation};

/// Runs one input through a stream; panics where an invariant breaks.
pub fn stream_protocol(data: &[u8]) {
    let config = Settings::from_toml("", std::path::Path::new("fuzz.toml")).expect("defaults");
    let metrics = Metrics::new();
    let chain = Chain::new(DEFAULT_CHAIN, Vec::new(), &metrics, config.instance_wait);
    let generation = Arc::new(Generation::new(1, vec![chain], &config, None, &metrics));
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
        assert!(
            accepted.more_time.is_none(),
            "no plugin, no budget to extend"
        );
        // No plugin is loaded: processing awaits nothing.
        let step = futures::executor::block_on(exchange.process(accepted));
        let protocol = exchange.protocol();
        let phase = protocol.last_phase().expect("a phase was accepted");
        assert!(
            could_come.contains(phase),
            "{phase} accepted but not expected"
        );
        let now = protocol.to_come();
        assert_eq!(
            now,
            exchange.stream().to_come(),
            "the plugins' stream and the protocol disagree on what can come"
        );
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
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::HeaderMap;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, HttpTrailers};

    use super::*;

    /// Messages of every kind, framed as the fuzzer's input.
    fn framed(requests: &[ProcessingRequest]) -> Vec<u8> {
        let mut data = Vec::new();
        for request in requests {
            let bytes = request.encode_to_vec();
            data.extend((bytes.len() as u16).to_le_bytes());
            data.extend(bytes);
        }
        data
    }

    fn message(request: Request) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(request),
            ..ProcessingRequest::default()
        }
    }

    #[test]
    fn every_order_of_messages_keeps_the_invariants() {
        let headers = |end_of_stream| HttpHeaders {
            headers: Some(HeaderMap::default()),
            end_of_stream,
            ..HttpHeaders::default()
        };
        let body = |end_of_stream| HttpBody {
            body: b"chunk".to_vec(),
            end_of_stream,
            ..HttpBody::default()
        };
        let kinds = [
            message(Request::RequestHeaders(headers(false))),
            message(Request::RequestBody(body(false))),
            message(Request::RequestBody(body(true))),
            message(Request::RequestTrailers(HttpTrailers::default())),
            message(Request::ResponseHeaders(headers(false))),
            message(Request::ResponseBody(body(true))),
            message(Request::ResponseTrailers(HttpTrailers::default())),
            ProcessingRequest::default(),
        ];
        // Seeded, so a failure repeats: 5,000 sequences of up to 8 messages, each message of
        // any kind, and now and then a byte flipped.
        let mut random = fastrand::Rng::with_seed(7);
        for _ in 0..5_000 {
            let picked: Vec<ProcessingRequest> = (0..random.usize(1..=8))
                .map(|_| kinds[random.usize(..kinds.len())].clone())
                .collect();
            let mut data = framed(&picked);
            if random.bool() && !data.is_empty() {
                let at = random.usize(..data.len());
                data[at] ^= random.u8(..);
            }
            stream_protocol(&data);
        }
    }
}
