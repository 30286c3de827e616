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
//!
//! Also here: [`run_main`], the part of `main` every binary shares (signal
//! mask, runtime, signal thread, exit code), and [`after_woken`], the one
//! place the request path steers the scheduler's order.

use crate::shutdown::{self, Signals};
use std::fmt::Display;
use std::future::Future;
use std::io;
use std::process::ExitCode;
use tokio::runtime::{Builder, Runtime};
use tokio_util::sync::CancellationToken;

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

/// The rest of a binary's `main` once its arguments are parsed: blocks the
/// signals (before any thread exists, so every thread inherits the mask and
/// only the signal thread takes them; see [`crate::shutdown`]), builds the
/// runtime with `build`, starts the signal thread and runs `run` with the
/// root token on it. Failures print as `name: error` and exit with 1.
/// `background_exit`: do not wait for blocking threads on the way out (the
/// shim reads stdin on one that cannot be interrupted).
pub fn run_main<F, Fut, E>(
    name: &str,
    build: impl FnOnce() -> io::Result<Runtime>,
    background_exit: bool,
    run: F,
) -> ExitCode
where
    F: FnOnce(CancellationToken, Signals) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    if let Err(e) = shutdown::block() {
        eprintln!("{name}: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let token = CancellationToken::new();
        let signals = shutdown::start(token.clone())
            .map_err(|e| format!("cannot start the signal thread: {e}"))?;
        run(token, signals).await.map_err(|e| format!("{e:#}"))
    });
    if background_exit {
        rt.shutdown_background();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Lets the tasks this one just woke run before it goes on: it is pending
/// once and wakes itself at once, so the scheduler puts it behind them in
/// the run queue. (`tokio::task::yield_now` would also wait for a poll of
/// the I/O driver, which cost the socket path ~10% of its throughput.)
pub async fn after_woken() {
    AfterWoken(false).await
}

struct AfterWoken(bool);

impl std::future::Future for AfterWoken {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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

    /// A task it wakes runs before it goes on, on `up`'s runtime (one
    /// worker) and on a current-thread one; without it, it goes on first.
    #[test]
    fn after_woken_lets_woken_tasks_run_first() {
        let rts = [
            build(Threads::Fixed(1), "rt-nudge").unwrap(),
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
        ];
        for rt in rts {
            for nudge in [false, true] {
                let order = rt.block_on(async move {
                    tokio::spawn(async move {
                        let order = Arc::new(Mutex::new(Vec::new()));
                        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                        let o = order.clone();
                        let woken = tokio::spawn(async move {
                            rx.await.unwrap();
                            o.lock().unwrap().push("woken");
                        });
                        // Let it start waiting.
                        tokio::task::yield_now().await;
                        tx.send(()).unwrap();
                        if nudge {
                            after_woken().await;
                        }
                        order.lock().unwrap().push("waker");
                        woken.await.unwrap();
                        let got = order.lock().unwrap().clone();
                        got
                    })
                    .await
                    .unwrap()
                });
                let want = if nudge {
                    ["woken", "waker"]
                } else {
                    ["waker", "woken"]
                };
                assert_eq!(order, want, "after_woken: {nudge}");
            }
        }
    }
}
