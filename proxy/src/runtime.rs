//! The runtimes the proxy runs on. By default, tokio's work-stealing runtime with one worker
//! thread per core: any task may run on any thread. With `--thread-per-core`, one
//! single-threaded runtime per core instead: each accepted client connection is handed to
//! one of them (in turn) and stays there, with every task it spawns, including the shared
//! upstream connections it uses (each thread has its own, see `shared.rs`). A request then
//! crosses no thread on its way to the upstream and back: no cross-thread wake-ups, no
//! work stealing, no contended queues.
//!
//! The main runtime (a single thread in that mode) accepts connections and runs the
//! observability server and reloads.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

static WORKERS: OnceLock<Vec<Handle>> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// 1..=N on the threads of `--thread-per-core`, 0 everywhere else.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Starts `threads` single-threaded runtimes, each on its own thread with `stack_size`
/// bytes of stack, and makes [`next_worker`] hand connections to them. Once per process.
pub fn start_workers(threads: usize, stack_size: usize) -> std::io::Result<()> {
    let mut handles = Vec::with_capacity(threads);
    for index in 1..=threads.max(1) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(runtime.handle().clone());
        std::thread::Builder::new()
            .name(format!("shotover-core-{index}"))
            .stack_size(stack_size)
            .spawn(move || {
                WORKER.with(|w| w.set(index));
                // Runs the tasks handed to this thread until the process exits.
                runtime.block_on(std::future::pending::<()>());
            })?;
    }
    WORKERS
        .set(handles)
        .map_err(|_| std::io::Error::other("the worker runtimes are already started"))
}

/// The runtime the next accepted connection runs on, with `--thread-per-core`; `None`
/// otherwise (it runs on the current runtime).
pub fn next_worker() -> Option<&'static Handle> {
    let workers = WORKERS.get()?;
    let i = NEXT.fetch_add(1, Ordering::Relaxed) % workers.len();
    Some(&workers[i])
}

/// Which thread-per-core thread this is: 1..=N on them, 0 on any other thread (and always
/// 0 without `--thread-per-core`). Shared upstream connections are kept per worker.
pub fn worker() -> usize {
    WORKER.with(Cell::get)
}
