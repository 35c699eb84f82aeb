//! Host bindings generated from the contract, one module per version the host speaks: the
//! current `wit/processor.wit` and the previous `wit/0.3.0/` and `wit/0.2.0/`. Every version's
//! `fields` and `body` are the same host resources, so one store serves any of them. Nothing
//! outside `runtime` sees them.

/// `wasm-extproc:processor@0.4.0`, the current contract, which adds state between exchanges
/// (`wasi:keyvalue`, `state`). Those imports are `async` on the host: they may wait on Redis.
pub mod current {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        imports: {
            "wasi:keyvalue/store.[method]bucket.get": async | trappable,
            "wasi:keyvalue/store.[method]bucket.set": async | trappable,
            "wasi:keyvalue/store.[method]bucket.delete": async | trappable,
            "wasi:keyvalue/store.[method]bucket.exists": async | trappable,
            "wasi:keyvalue/store.[method]bucket.list-keys": async | trappable,
            "wasi:keyvalue/atomics.increment": async | trappable,
            "wasm-extproc:processor/state.set-with-ttl": async | trappable,
            "wasm-extproc:processor/state.increment-in-window": async | trappable,
            default: trappable,
        },
        exports: { default: async },
        with: {
            "wasm-extproc:processor/types.fields": crate::runtime::store::Fields,
            "wasm-extproc:processor/types.body": crate::runtime::store::Body,
            "wasi:keyvalue/store.bucket": crate::runtime::state::Bucket,
        },
    });
}

/// The bindings of an earlier contract in the WIT directory `$path`.
macro_rules! earlier_contract {
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

/// `wasm-extproc:processor@0.3.0`: no state between exchanges.
pub mod v0_3 {
    earlier_contract!("../wit/0.3.0");
}

/// `wasm-extproc:processor@0.2.0`: body handlers without headers.
pub mod v0_2 {
    earlier_contract!("../wit/0.2.0");
}
