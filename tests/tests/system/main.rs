//! The system seen from Envoy's side: one test binary, one file per concern.

mod envoy_demo;
mod isolation;
mod loading;
mod phases;
