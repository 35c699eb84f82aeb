//! Host bindings generated from the contract, one module per version the host speaks: the
//! current `wit/processor.wit` and the previous `wit/0.3.0/` and `wit/0.2.0/`. Every version's
//! `fields` and `body` are the same host resources, so one store serves any of them. Nothing
//! outside `runtime` sees them.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

/// Marker for the `fields` resource: the data lives in the store, lent for one call.
pub struct Fields;
/// Marker for the `body` resource.
pub struct Body;
/// An open `wasi:keyvalue` bucket: a namespace the plugin may use, held in the store's
/// resource table.
pub struct Bucket {
    pub namespace: Arc<str>,
}

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
            "wasm-extproc:processor/types.fields": crate::runtime::bindings::Fields,
            "wasm-extproc:processor/types.body": crate::runtime::bindings::Body,
            "wasi:keyvalue/store.bucket": crate::runtime::bindings::Bucket,
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
                "wasm-extproc:processor/types.fields": crate::runtime::bindings::Fields,
                "wasm-extproc:processor/types.body": crate::runtime::bindings::Body,
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

/// Every version of the contract the host speaks, newest first: the first is the current one
/// (`wit/processor.wit`). The enum, the version check, the names in errors and the linker all
/// follow from this table; a new version is a line here, its WIT and its bindings module.
macro_rules! contracts {
    ($($variant:ident => $bindings:ident, $version:literal, body_sees_headers: $headers:literal, $doc:literal;)+) => {
        /// A version of the contract the host runs plugins of.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Contract {
            $(#[doc = $doc] $variant,)+
        }

        impl Contract {
            /// Every version the host speaks, newest first.
            pub const SPOKEN: &[Contract] = &[$(Contract::$variant,)+];
            /// The version `wit/processor.wit` declares.
            pub const CURRENT: Contract = Contract::SPOKEN[0];

            pub fn version(self) -> &'static str {
                match self {
                    $(Contract::$variant => $version,)+
                }
            }

            /// Whether its body handlers take the direction's headers.
            pub fn body_sees_headers(self) -> bool {
                match self {
                    $(Contract::$variant => $headers,)+
                }
            }
        }

        /// A store that implements every version's `types`, `host` and `context` imports.
        pub trait ContractHost:
            $($bindings::wasm_extproc::processor::types::Host
                + $bindings::wasm_extproc::processor::host::Host
                + $bindings::wasm_extproc::processor::context::Host +)+ Send + 'static
        {
        }

        impl<T> ContractHost for T where
            T: $($bindings::wasm_extproc::processor::types::Host
                + $bindings::wasm_extproc::processor::host::Host
                + $bindings::wasm_extproc::processor::context::Host +)+ Send + 'static
        {
        }

        /// Links the contract's own interfaces (`types`, `host`, `context`) of every version.
        /// What a version adds beyond them is a capability's, linked by it (`state`, with
        /// `wasi:keyvalue`, in [`super::state`]).
        pub fn link_contracts<T: ContractHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
            $(
                $bindings::wasm_extproc::processor::types::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
                $bindings::wasm_extproc::processor::host::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
                $bindings::wasm_extproc::processor::context::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
            )+
            Ok(())
        }
    };
}

contracts! {
    V0_4 => current, "0.4.0", body_sees_headers: true,
        "0.4.0, the current one: state between exchanges (`wasi:keyvalue`, `state`).";
    V0_3 => v0_3, "0.3.0", body_sees_headers: true,
        "0.3.0: body handlers get the direction's headers.";
    V0_2 => v0_2, "0.2.0", body_sees_headers: false,
        "0.2.0: body handlers get the body alone.";
}
