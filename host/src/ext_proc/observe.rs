//! What the service shows of its streams to whoever watches them (the recorder): each message
//! Envoy sent, the answers it got, and the end. Watching is no part of serving, so the service
//! knows only these traits; what a watcher keeps, and what it makes of it, stays with it.
//!
//! A stream asks once, when it opens, whether anything watches at all; when nothing does, that
//! one check is all it pays.

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};

/// Watches the streams the service serves.
pub trait Observer: fmt::Debug + Send + Sync {
    /// Whether streams opening now are watched: the one thing a stream checks when none is,
    /// so it must be cheap (an atomic load).
    fn is_observing(&self) -> bool;

    /// The watch over a stream that opens while [`is_observing`](Self::is_observing).
    fn observe(self: Arc<Self>) -> Box<dyn StreamObserver>;
}

/// The watch over one stream, told of its messages in order.
pub trait StreamObserver: Send {
    /// A message from Envoy, before the plugins see it.
    fn received(&mut self, request: &ProcessingRequest);

    /// The answers to the message last received, from the chain called `chain` (known for
    /// certain from the first answer on: a route may pick it at the first message). `Break`
    /// lets the stream go unwatched from now on; the watch is then dropped without
    /// [`ended`](Self::ended).
    fn answered(&mut self, chain: &str, answers: &[ProcessingResponse]) -> ControlFlow<()>;

    /// The stream ended, however it ended.
    fn ended(self: Box<Self>, chain: &str);
}
