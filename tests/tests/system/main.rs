//! The system seen from Envoy's side: one test binary, one file per concern.

mod bodies;
mod chains;
mod conformance;
mod dev;
mod envoy_demo;
mod exchange;
mod guard;
mod hostile;
mod isolation;
mod languages;
mod load;
mod loading;
mod module;
mod operations;
mod outbound;
mod overload;
mod phases;
mod recording;
mod secrets;
mod shadow;
mod shipped;
mod state;
mod sweep;
mod traces;
