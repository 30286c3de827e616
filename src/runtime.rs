//! The tokio runtime each command runs on, and why the thread counts differ.
//!
//! Per request the proxy and `up` do little CPU work and a lot of waking:
//! the HTTP connection, the lease API connection and the server's pipes all
//! take turns. With several workers, each turn tends to land on another
//! thread, and every hand-off costs a futex wake and a context switch; on
//! two cores that was ~40 µs of p50 per request (measured side by side in
//! `mcp-broker bench`, README "Performance"). One worker keeps a request's
//! whole path on one thread and leaves the other cores to the servers. The
//! node broker (`serve`) keeps one worker per core: it serves every workload
//! on the node at once.

use std::io;
use tokio::runtime::{Builder, Runtime};

/// Process threads of `proxy` and `up` unless `--threads` says otherwise.
pub const DEFAULT_LEAN_THREADS: usize = 1;

/// How many workers a command gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One per core (tokio's default): the node broker.
    PerCore,
    /// Exactly this many (at least one).
    Fixed(usize),
    /// No worker threads: everything on the thread that blocks on the
    /// runtime (the stdio shim: the smallest resident set).
    Current,
}

/// Builds a runtime (multi-threaded unless [`Threads::Current`]) (timers and I/O enabled) with `threads`
/// workers, whose threads are named `name`.
pub fn build(threads: Threads, name: &str) -> io::Result<Runtime> {
    if threads == Threads::Current {
        return Builder::new_current_thread()
            .enable_all()
            .thread_name(name)
            .build();
    }
    let mut b = Builder::new_multi_thread();
    b.enable_all().thread_name(name);
    if let Threads::Fixed(n) = threads {
        b.worker_threads(n.max(1));
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_runtime_runs_tasks_on_named_workers() {
        let rt = build(Threads::Fixed(1), "rt-test").unwrap();
        let name = rt.block_on(async {
            tokio::spawn(async { std::thread::current().name().map(str::to_string) })
                .await
                .unwrap()
        });
        assert_eq!(name.as_deref(), Some("rt-test"));
        assert_eq!(rt.metrics().num_workers(), 1);
        let rt = build(Threads::Fixed(0), "rt-test").unwrap();
        assert_eq!(rt.metrics().num_workers(), 1);
    }
}
