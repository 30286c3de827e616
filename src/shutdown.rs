//! Process-wide signals: the first SIGTERM or SIGINT cancels the root
//! token; SIGHUP asks for a config reload, SIGUSR2 for an in-place upgrade.
//!
//! Why a dedicated thread and `sigwait` instead of handlers: a signal must be
//! honoured whenever it arrives, including across the broker's re-exec
//! (`mcp-broker upgrade`). [`block`] blocks the signals in the main thread
//! before the runtime exists, so every thread inherits the mask and none of
//! them ever takes a signal; one thread ([`start`]) takes them with
//! `sigwait`. A signal that arrives before that thread runs, or while it is
//! busy, stays pending, and a pending blocked signal survives `execve`: the
//! new image's signal thread takes it. The re-exec itself runs on the signal
//! thread ([`Signals::exec`]), so no signal can be consumed and then lost
//! between the decision to exec and the exec. Child processes do not inherit
//! the mask (the standard library resets it between fork and exec).

use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};
use nix::sys::signal::{SigSet, Signal};
use std::ffi::CString;
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What the signal thread takes; SIGUSR1 wakes it for a re-exec.
const TAKEN: [Signal; 5] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR2,
    Signal::SIGUSR1,
];

fn taken() -> SigSet {
    let mut set = SigSet::empty();
    for s in TAKEN {
        set.add(s);
    }
    set
}

/// Blocks the signals [`start`] takes in the calling thread. Call it in
/// `main` before any other thread exists, so every thread inherits the mask.
pub fn block() -> nix::Result<()> {
    taken().thread_block()
}

/// A program image and its arguments and environment, for `execve`.
pub struct ExecPlan {
    pub path: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
}

type ExecJob = (ExecPlan, mpsc::SyncSender<nix::errno::Errno>);

/// Handles to the signal thread.
#[derive(Clone)]
pub struct Signals {
    /// Notified on SIGHUP.
    pub reload: Arc<Notify>,
    /// Notified on SIGUSR2.
    pub upgrade: Arc<Notify>,
    shutdown: CancellationToken,
    exec: Arc<Mutex<Option<ExecJob>>>,
    thread: Pthread,
}

/// Starts the signal thread: the first SIGTERM or SIGINT cancels `token`
/// (later ones are logged and ignored; the drain already runs). Call
/// [`block`] first, on the main thread.
pub fn start(token: CancellationToken) -> std::io::Result<Signals> {
    let reload = Arc::new(Notify::new());
    let upgrade = Arc::new(Notify::new());
    let exec: Arc<Mutex<Option<ExecJob>>> = Arc::new(Mutex::new(None));
    let (tx, rx) = mpsc::sync_channel(1);
    let (r, u, e, t) = (reload.clone(), upgrade.clone(), exec.clone(), token.clone());
    std::thread::Builder::new()
        .name("mcp-broker-signals".into())
        .spawn(move || {
            let _ = tx.send(pthread_self());
            run(&t, &r, &u, &e)
        })?;
    let thread = rx
        .recv()
        .map_err(|_| std::io::Error::other("the signal thread did not start"))?;
    Ok(Signals {
        reload,
        upgrade,
        shutdown: token,
        exec,
        thread,
    })
}

fn run(
    token: &CancellationToken,
    reload: &Notify,
    upgrade: &Notify,
    exec: &Mutex<Option<ExecJob>>,
) {
    let set = taken();
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("sigwait failed: {e}; signals are no longer handled");
                return;
            }
        };
        match sig {
            Signal::SIGTERM | Signal::SIGINT if token.is_cancelled() => {
                tracing::info!("{sig}: already shutting down");
            }
            Signal::SIGTERM => {
                tracing::info!("SIGTERM: shutting down");
                token.cancel();
            }
            Signal::SIGINT => {
                tracing::info!("SIGINT: shutting down");
                token.cancel();
            }
            Signal::SIGHUP => reload.notify_one(),
            Signal::SIGUSR2 => upgrade.notify_one(),
            _ => {
                let job = exec.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some((plan, done)) = job {
                    // Taken here, so no SIGTERM was consumed since the
                    // check: one that arrives now stays pending across exec.
                    let err = if token.is_cancelled() {
                        nix::errno::Errno::ECANCELED
                    } else {
                        match nix::unistd::execve(&plan.path, &plan.argv, &plan.env) {
                            Err(e) => e,
                            Ok(never) => match never {},
                        }
                    };
                    let _ = done.send(err);
                }
            }
        }
    }
}

impl Signals {
    /// Replaces the process image with `plan` from the signal thread. Only
    /// returns on failure (`ECANCELED`: shutdown was asked first).
    pub async fn exec(&self, plan: ExecPlan) -> nix::errno::Errno {
        if self.shutdown.is_cancelled() {
            return nix::errno::Errno::ECANCELED;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        *self.exec.lock().unwrap_or_else(|e| e.into_inner()) = Some((plan, tx));
        if let Err(e) = pthread_kill(self.thread, Signal::SIGUSR1) {
            self.exec.lock().unwrap_or_else(|e| e.into_inner()).take();
            return e;
        }
        tokio::task::spawn_blocking(move || rx.recv().unwrap_or(nix::errno::Errno::EIO))
            .await
            .unwrap_or(nix::errno::Errno::EIO)
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT, with tokio's handlers
/// (for programs that did not [`block`] the signals, e.g. tests).
pub fn on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot install SIGTERM handler: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = token.cancelled() => return,
        }
        token.cancel();
    });
}
