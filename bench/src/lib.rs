//! Baselines for the end-to-end benchmarks (`cargo xtask bench`): `native-extproc`, the ASM
//! demo as a plain ext_proc server with no Wasm, and `bench-upstream`, a minimal upstream.
