//! Host bindings generated from `wit/processor.wit`. Nothing outside `runtime` sees them.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    imports: { default: trappable },
    exports: { default: async },
    with: {
        "wasm-extproc:processor/types.fields": super::store::Fields,
        "wasm-extproc:processor/types.body": super::store::Body,
    },
});
