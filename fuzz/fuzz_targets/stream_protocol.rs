//! Coverage-guided fuzzing of the per-stream protocol state machine and the protobuf
//! conversions around it: the input and the invariants are `wasm_extproc::ext_proc::fuzz`'s,
//! which the workspace builds, lints and runs on seeded input in its own tests.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wasm_extproc::ext_proc::fuzz::stream_protocol(data);
});
