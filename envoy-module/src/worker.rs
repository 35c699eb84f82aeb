//! Where the chain runs: on the Envoy worker thread that called the hook, so a stream's
//! plugins run on the thread that owns the stream, and the hook returns with their verdict.

/// Runs `future` to completion on the calling thread: an Envoy worker running the chain for
/// one of its streams. Each worker has its own current-thread runtime, for the timers an
/// instantiation waits on when the pool is full.
pub fn block_on<F: Future>(future: F) -> F::Output {
    thread_local! {
        static WORKER: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread Tokio runtime starts");
    }
    // Pinned here, the future stays where it is: the runtime's layers pass a pointer on, not
    // the future (the stream's, with the chain's and the call's inside it, is kilobytes).
    let future = std::pin::pin!(future);
    WORKER.with(|runtime| runtime.block_on(future))
}
