//! Whole bodies for plugins that want them while Envoy streams (`FULL_DUPLEX_STREAMED`): the
//! chain holds each chunk back at such a plugin until the end of the body (or until trailers
//! arrive), then passes the whole body on from there. What is held keeps its share of the
//! host's body budget, and is never lost: where the plugin cannot see it, it flows on.

use super::plugin_state::PluginState;
use crate::bodies::{MAX_HELD_BODY_BYTES, Reservation};
use crate::http::{BodyChunk, BodyMode, Delivery, Direction};
use crate::runtime::{Plugin, PluginError};

/// How a body message reaches the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arrival {
    /// As Envoy sent it.
    FromEnvoy,
    /// Trailers came: whatever a plugin holds is all of the body there will be.
    Flushed,
}

/// What a plugin that wants whole bodies does with a chunk.
pub(super) enum Holding {
    /// It sees the message now: it is the whole body, or the plugin takes chunks.
    PassOn,
    /// It keeps the chunk until the body is complete: nothing goes on yet.
    Held,
}

/// Whether `plugin` sees `chunk` now. A plugin that wants whole bodies, where Envoy streams
/// them in `FULL_DUPLEX_STREAMED` mode, has chunks held for it until the body is complete (or
/// flushed by trailers); then `chunk` becomes everything held plus itself.
///
/// A held chunk keeps the share of the host's body budget its message had (the run's
/// `reserved`) while held; let go, the share goes back to the run, with the message it joined.
pub(super) fn take_whole_body(
    plugin: &Plugin,
    state: &mut PluginState,
    (direction, reserved): (Direction, &mut Vec<Reservation>),
    chunk: &mut BodyChunk,
    body_mode: BodyMode,
    arrival: Arrival,
) -> Result<Holding, PluginError> {
    if plugin.registration().delivery(direction) != Delivery::Whole {
        return Ok(Holding::PassOn);
    }
    match body_mode {
        BodyMode::FullDuplexStreamed => {}
        // Envoy already sends everything it will send in one message.
        BodyMode::Buffered | BodyMode::BufferedPartial => return Ok(Holding::PassOn),
        BodyMode::Streamed | BodyMode::None => {
            if !state.warned_streamed && !chunk.end_of_stream {
                state.warned_streamed = true;
                tracing::warn!(
                    plugin = plugin.name(),
                    "plugin wants whole bodies, but Envoy streams this one (STREAMED mode \
                     answers every chunk in turn, so the host cannot hold chunks back): it \
                     gets chunks; use BUFFERED or FULL_DUPLEX_STREAMED for this plugin"
                );
            }
            return Ok(Holding::PassOn);
        }
    }
    let held = state.held[direction].get_or_insert_with(Vec::new);
    if held.len() + chunk.data.len() > MAX_HELD_BODY_BYTES {
        // Whatever the policy, what was held must not be lost: it flows on unchanged.
        let_go(state, direction, chunk, reserved);
        return Err(PluginError::BodyTooLarge(MAX_HELD_BODY_BYTES));
    }
    if !chunk.end_of_stream && arrival == Arrival::FromEnvoy {
        held.append(&mut chunk.data);
        // The whole message is held here: its share of the budget stays with it.
        let share = &mut state.held_reserved[direction];
        for reservation in reserved.drain(..) {
            match share {
                Some(share) => share.absorb(reservation),
                None => *share = Some(reservation),
            }
        }
        return Ok(Holding::Held);
    }
    let_go(state, direction, chunk, reserved);
    Ok(Holding::PassOn)
}

/// Lets go of what `state` holds of `direction`'s body: it goes on ahead of `chunk`, in it,
/// and its share of the body budget goes back to the run's `reserved`.
pub(super) fn let_go(
    state: &mut PluginState,
    direction: Direction,
    chunk: &mut BodyChunk,
    reserved: &mut Vec<Reservation>,
) {
    if let Some(mut held) = state.held[direction].take() {
        held.append(&mut chunk.data);
        chunk.data = held;
        reserved.extend(state.held_reserved[direction].take());
    }
}
