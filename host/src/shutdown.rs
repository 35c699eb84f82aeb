//! Signals: SIGTERM (Kubernetes, systemd) and Ctrl-C stop the server; SIGHUP reloads it.

use std::future::Future;

/// A future that completes when the process is asked to stop. The handlers are installed
/// when this is called, not when the future is first polled: call it before listening, so a
/// SIGTERM that arrives during start-up drains instead of killing the process.
pub fn signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let interrupt = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            () = received(interrupt) => tracing::info!("interrupted; shutting down"),
            () = received(term) => tracing::info!("SIGTERM; shutting down"),
        }
    }
}

/// Completes when `signal` arrives; never, if its handler could not be installed.
async fn received(signal: Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(mut signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// SIGHUPs, from the moment this is called: call it before start-up's first load, so a SIGHUP
/// that comes before the plugins are loaded (or just after) waits for them instead of killing
/// the process, SIGHUP's default.
pub fn hangups() -> Hangups {
    Hangups(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok())
}

/// The SIGHUPs [`hangups`] listens for.
#[derive(Debug)]
pub struct Hangups(Option<tokio::signal::unix::Signal>);

impl Hangups {
    /// Runs `reload` on every SIGHUP, one at a time; never completes.
    pub async fn reload_on_each<F: Future<Output = ()>>(self, reload: impl Fn() -> F) {
        if let Some(mut hangup) = self.0 {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP; reloading");
                reload().await;
            }
        }
        std::future::pending::<()>().await
    }
}
