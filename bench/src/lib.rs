//! The benchmark suite, all of it (`cargo xtask bench`; BENCHMARKS.md holds its findings):
//!
//! - `src/bin/bench/`: the driver. Builds what it measures, runs each part, and writes
//!   BENCHMARKS.md, `plots/` and `results.json` (the last run's figures); `cargo xtask test`
//!   runs its `concurrency-check`.
//! - `benches/`: in process. `stream` (criterion: per-stream cost, chain length, body
//!   throughput), `languages` (the ASM plugin in each language), `state` (state operations and
//!   outbound HTTP, seen from the plugin).
//! - The baselines the end-to-end runs measure the host against: `native-extproc`, the ASM
//!   demo as a plain ext_proc server with no Wasm; `bench-upstream`, a minimal upstream; and
//!   `hold-load`, the load that keeps thousands of exchanges in flight.
