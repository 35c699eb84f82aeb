//! Signals: SIGTERM (Kubernetes, systemd) and Ctrl-C stop the server; SIGHUP reloads it.

use crate::Host;

/// Completes when the process is asked to stop.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupted; shutting down"),
        () = term => tracing::info!("SIGTERM; shutting down"),
    }
}

/// Reloads `host` on every SIGHUP; never completes.
pub async fn reload_requests(host: &Host) {
    #[cfg(unix)]
    if let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP; reloading");
            // The registry logs a failed reload; the previous chain keeps serving.
            let _ = host.reload().await;
        }
    }
    std::future::pending::<()>().await
}
