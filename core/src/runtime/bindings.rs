//! Host bindings generated from the contract, one module per version the host speaks: the
//! current `wit/processor.wit` and the previous `wit/0.2.0/processor.wit`. Both versions'
//! `fields` and `body` are the same host resources, so one store serves either. Nothing outside
//! `runtime` sees them.

/// The bindings of the contract in the WIT directory `$path`.
macro_rules! contract_bindings {
    ($path:tt) => {
        wasmtime::component::bindgen!({
            path: $path,
            world: "plugin",
            imports: { default: trappable },
            exports: { default: async },
            with: {
                "wasm-extproc:processor/types.fields": crate::runtime::store::Fields,
                "wasm-extproc:processor/types.body": crate::runtime::store::Body,
            },
        });
    };
}

/// `wasm-extproc:processor@0.3.0`, the current contract.
pub mod current {
    contract_bindings!("../wit");
}

/// `wasm-extproc:processor@0.2.0`: body handlers without headers.
pub mod v0_2 {
    contract_bindings!("../wit/0.2.0");
}
