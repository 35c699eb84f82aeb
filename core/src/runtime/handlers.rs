//! A plugin's exported handlers: located once when the plugin loads, and fetched from an
//! instance only when a stream first calls one. A header plugin's stream then type-checks the
//! two handlers it uses, not all seven the contract defines.
//!
//! Versions of the contract differ here only in the body handlers' parameters: the host calls
//! each plugin with the ones its version declares.

use wasmtime::component::{
    Component, ComponentExportIndex, Instance as ComponentInstance, Resource, TypedFunc,
};
use wasmtime::{AsContextMut, Result};

use super::Contract;
use super::bindings::current::wasm_extproc::processor::types as wit;
use super::bindings::{Body, Fields};
use crate::http::Phase;

/// `on-*-headers`: the section and whether the direction ends with it.
pub type HeadersFn = TypedFunc<(Resource<Fields>, bool), (wit::Action,)>;
/// `on-*-body` since 0.3.0: the body, and the direction's headers while they can still change.
pub type BodyFn = TypedFunc<(Resource<Body>, Option<Resource<Fields>>), (wit::Action,)>;
/// `on-*-body` in 0.2.0: the body alone.
pub type BodyOnlyFn = TypedFunc<(Resource<Body>,), (wit::Action,)>;

/// A body handler of either shape.
#[derive(Clone, Copy)]
pub enum BodyHandler {
    WithHeaders(BodyFn),
    BodyOnly(BodyOnlyFn),
}
/// `on-*-trailers`.
pub type TrailersFn = TypedFunc<(Resource<Fields>,), (wit::Action,)>;
/// `register`.
pub type RegisterFn = TypedFunc<(), (wit::Registration,)>;

/// Where each handler sits in a component's exports.
#[derive(Debug, Clone)]
pub struct Exports {
    contract: Contract,
    register: ComponentExportIndex,
    /// Per phase, in [`Phase::ALL`] order.
    phases: [ComponentExportIndex; 6],
}

impl Exports {
    /// The contract version the plugin was built against.
    pub fn contract(&self) -> Contract {
        self.contract
    }

    /// Finds the handlers the `contract` version's `handler` interface holds; the error names
    /// the first one missing.
    pub fn locate(component: &Component, contract: Contract) -> Result<Exports, String> {
        let handler = &contract.handler_export();
        let interface = component
            .get_export_index(None, handler)
            .ok_or_else(|| format!("no export {handler}"))?;
        let find = |name: &str| {
            component
                .get_export_index(Some(&interface), name)
                .ok_or_else(|| format!("{handler} has no function `{name}`"))
        };
        let phases = [
            find("on-request-headers")?,
            find("on-request-body")?,
            find("on-request-trailers")?,
            find("on-response-headers")?,
            find("on-response-body")?,
            find("on-response-trailers")?,
        ];
        Ok(Exports {
            contract,
            register: find("register")?,
            phases,
        })
    }

    /// Type-checks every handler against an instance: a plugin whose exports have another
    /// shape is refused at load, not on its first request.
    pub fn check(&self, mut store: impl AsContextMut, instance: &ComponentInstance) -> Result<()> {
        let mut handlers = Handlers::default();
        self.register(&mut store, instance)?;
        for phase in Phase::ALL {
            match phase {
                Phase::RequestHeaders | Phase::ResponseHeaders => {
                    handlers.headers(self, &mut store, instance, phase)?;
                }
                Phase::RequestBody | Phase::ResponseBody => {
                    handlers.body(self, &mut store, instance, phase)?;
                }
                Phase::RequestTrailers | Phase::ResponseTrailers => {
                    handlers.trailers(self, &mut store, instance, phase)?;
                }
            }
        }
        Ok(())
    }

    pub fn register(
        &self,
        store: impl AsContextMut,
        instance: &ComponentInstance,
    ) -> Result<RegisterFn> {
        instance.get_typed_func(store, self.register)
    }
}

/// The handlers one instance has fetched so far.
#[derive(Default)]
pub struct Handlers {
    headers: [Option<HeadersFn>; 2],
    body: [Option<BodyHandler>; 2],
    trailers: [Option<TrailersFn>; 2],
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers").finish_non_exhaustive()
    }
}

fn direction_index(phase: Phase) -> usize {
    usize::from(phase.direction() == crate::http::Direction::Response)
}

impl Handlers {
    pub fn headers(
        &mut self,
        exports: &Exports,
        store: impl AsContextMut,
        instance: &ComponentInstance,
        phase: Phase,
    ) -> Result<HeadersFn> {
        fetch(&mut self.headers[direction_index(phase)], || {
            instance.get_typed_func(store, exports.phases[phase as usize])
        })
    }

    pub fn body(
        &mut self,
        exports: &Exports,
        store: impl AsContextMut,
        instance: &ComponentInstance,
        phase: Phase,
    ) -> Result<BodyHandler> {
        fetch(&mut self.body[direction_index(phase)], || {
            let index = exports.phases[phase as usize];
            Ok(if exports.contract.body_sees_headers() {
                BodyHandler::WithHeaders(instance.get_typed_func(store, index)?)
            } else {
                BodyHandler::BodyOnly(instance.get_typed_func(store, index)?)
            })
        })
    }

    pub fn trailers(
        &mut self,
        exports: &Exports,
        store: impl AsContextMut,
        instance: &ComponentInstance,
        phase: Phase,
    ) -> Result<TrailersFn> {
        fetch(&mut self.trailers[direction_index(phase)], || {
            instance.get_typed_func(store, exports.phases[phase as usize])
        })
    }
}

fn fetch<F: Copy>(slot: &mut Option<F>, get: impl FnOnce() -> Result<F>) -> Result<F> {
    if let Some(func) = slot {
        return Ok(*func);
    }
    let func = get()?;
    *slot = Some(func);
    Ok(func)
}
