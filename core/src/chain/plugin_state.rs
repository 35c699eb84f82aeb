//! What one stream keeps of each plugin of its chain (and of each shadow): its instance, and
//! the body chunks held back for it.

use crate::bodies::Reservation;
use crate::http::PerDirection;
use crate::runtime::Instance;

#[derive(Debug, Default)]
pub(super) struct PluginState {
    pub(super) instance: InstanceState,
    /// Chunks held back, per direction.
    pub(super) held: PerDirection<Option<Vec<u8>>>,
    /// Their share of the host's body budget, per direction.
    pub(super) held_reserved: PerDirection<Option<Reservation>>,
    /// Whether the "cannot hold chunks in STREAMED mode" warning was logged for this stream.
    pub(super) warned_streamed: bool,
}

#[derive(Debug, Default)]
pub(super) enum InstanceState {
    /// Not needed yet.
    #[default]
    Idle,
    Live(Box<Instance>),
    /// No phase it handles can still come: its instance went back to the pool early.
    Done,
    /// Failed earlier in this stream: skipped from now on.
    Skipped,
}
