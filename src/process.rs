//! One stdio MCP server process: spawn, I/O tasks, routing, stop and reap.
//!
//! A [`Process`] owns three tasks: a writer (stdin replies), a reader (stdout, routed
//! through [`router::Router`]) and a stderr logger, plus a reaper that
//! notices the exit, kills the rest of the process group, reaps the leader and
//! fails whatever was still in flight. Nothing here decides *when* a process is
//! used or replaced; that is the pool's job.

pub mod adopt;
pub mod group;
mod lines;
pub mod router;
pub mod sandbox;
pub mod stat;
pub use lines::read_lines;
use lines::{log_stderr, read_stdout};

use crate::config::PoolConfig;
use crate::jsonrpc;
use crate::metrics::Metrics;
use crate::node::budget::Permit;
use crate::node::cgroup::PoolCgroup;
use crate::node::Placement;
use bytes::Bytes;
use nix::sys::signal::Signal;
use router::{Action, LeaseEvent, LeaseSink, Outgoing, Router};
use serde_json::Value;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Courtesy replies queued for a process's stdin at most.
const STDIN_QUEUE: usize = 256;
/// Longest wait to write a `notifications/cancelled`.
const CANCEL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the reaper waits for stdout to drain after the exit.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Failures of one process.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start `{command}`: {reason}")]
    Spawn { command: String, reason: String },
    #[error("the process has exited: {0}")]
    Exited(String),
    #[error("the process did not answer {method} within {after:?}")]
    Timeout { method: String, after: Duration },
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Deliver(#[from] router::DeliverError),
}

/// A running server process.
pub struct Process {
    /// Broker-unique id (for logs and routing ids).
    pub id: u64,
    /// OS process id, which is also the process group id.
    pub pid: u32,
    /// Its process group: every signal to the process goes through it.
    group: group::Group,
    pool: String,
    max_message_size: usize,
    /// Written directly by [`Process::send`] (no task hop on the request
    /// path); `None` once closed.
    stdin: Arc<tokio::sync::Mutex<Option<tokio::process::ChildStdin>>>,
    /// Courtesy replies from the reader (which cannot await) go through the
    /// writer task.
    replies: mpsc::Sender<Bytes>,
    close_stdin: CancellationToken,
    router: Mutex<Router>,
    exited: CancellationToken,
    exit_reason: Mutex<Option<String>>,
    spawned_at: Instant,
    leased: std::sync::atomic::AtomicBool,
    notifications: broadcast::Sender<Value>,
    metrics: Arc<Metrics>,
    /// The pool's cgroup, asked whether its memory limit killed us.
    cgroup: Option<Arc<PoolCgroup>>,
    /// Our place in the node budget, released once we are reaped.
    permit: Mutex<Option<Permit>>,
    /// Our ends of its stdin, stdout and stderr pipes (open while the
    /// tasks that own them run): what an in-place upgrade passes on.
    fds: [std::os::fd::RawFd; 3],
}

/// Our ends of a process's pipes.
struct Pipes {
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    stderr: tokio::process::ChildStderr,
}

/// What ties a process to its node: its pool's cgroup and its place in
/// the node budget.
struct Ties {
    cgroup: Option<Arc<PoolCgroup>>,
    permit: Option<Permit>,
}

/// Who a process is, apart from its pipes.
struct Born {
    id: u64,
    pid: u32,
    group: group::Group,
    spawned_at: Instant,
    /// The router's last id (ids continue after it, so a late answer to a
    /// request of the previous image never matches a new one).
    router_next: u64,
}

/// How the leader is reaped: a child this image spawned, or one adopted
/// from the previous image (same pid, so still our child).
enum Leader {
    Spawned(tokio::process::Child),
    Adopted,
}

impl Process {
    /// Starts the process in its own group with piped stdio and its tasks.
    /// `place` says as whom and in which cgroup; `permit` is the process's
    /// place in the node budget, given back once it has been reaped.
    pub fn spawn(
        cfg: &PoolConfig,
        id: u64,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        place: &Placement,
        permit: Option<Permit>,
    ) -> Result<Arc<Process>, ProcessError> {
        let spawn_err = |reason: String| ProcessError::Spawn {
            command: cfg.command.clone(),
            reason,
        };
        let sandbox = sandbox::prepare(&cfg.sandbox, place, &cfg.limits, sandbox::euid())
            .map_err(|e| spawn_err(e.to_string()))?
            .map(Arc::new);
        let mut cmd = tokio::process::Command::new(&cfg.command);
        sandbox::apply_env(&mut cmd, &cfg.sandbox, place, &cfg.env);
        cmd.args(&cfg.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(cwd) = &cfg.cwd {
            cmd.current_dir(cwd);
        }
        if let Some(sb) = &sandbox {
            let sb = sb.clone();
            // SAFETY: `apply` makes only async-signal-safe calls on memory
            // prepared before the fork (see process::sandbox).
            unsafe { cmd.pre_exec(move || sb.apply()) };
        }
        let mut child = cmd.spawn().map_err(|e| {
            let child_err = sandbox.as_ref().and_then(|sb| sb.child_error());
            spawn_err(child_err.map_or_else(|| e.to_string(), |c| c.to_string()))
        })?;
        drop(sandbox);
        let pid = child.id().unwrap_or(0);
        let group = group::Group::leader(&child);
        let pipes = Pipes {
            stdin: child.stdin.take().expect("piped"),
            stdout: child.stdout.take().expect("piped"),
            stderr: child.stderr.take().expect("piped"),
        };
        let worker = Self::assemble(
            cfg,
            Born {
                id,
                pid,
                group,
                spawned_at: Instant::now(),
                router_next: 0,
            },
            pipes,
            Leader::Spawned(child),
            metrics,
            tracker,
            Ties {
                cgroup: place.cgroup.clone(),
                permit,
            },
        );
        tracing::debug!(pool = %cfg.name, pid, "spawned");
        Ok(worker)
    }

    /// Builds the process around its pipes and starts its tasks (a new
    /// child or one adopted after an in-place upgrade).
    fn assemble(
        cfg: &PoolConfig,
        born: Born,
        pipes: Pipes,
        leader: Leader,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        ties: Ties,
    ) -> Arc<Process> {
        let Born {
            id,
            pid,
            group,
            spawned_at,
            router_next,
        } = born;
        let fds = [
            pipes.stdin.as_raw_fd(),
            pipes.stdout.as_raw_fd(),
            pipes.stderr.as_raw_fd(),
        ];
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        let stdin = Arc::new(tokio::sync::Mutex::new(Some(pipes.stdin)));
        let (notifications, _) = broadcast::channel(64);
        let worker = Arc::new(Process {
            id,
            pid,
            group,
            pool: cfg.name.clone(),
            max_message_size: cfg.max_message_size,
            stdin: stdin.clone(),
            replies: stdin_tx,
            close_stdin: CancellationToken::new(),
            router: Mutex::new({
                let mut r = Router::new(id);
                r.set_max_server_requests(cfg.max_server_requests);
                r.resume_after(router_next);
                r
            }),
            exited: CancellationToken::new(),
            exit_reason: Mutex::new(None),
            spawned_at,
            leased: std::sync::atomic::AtomicBool::new(false),
            notifications,
            metrics,
            cgroup: ties.cgroup,
            permit: Mutex::new(ties.permit),
            fds,
        });
        tracker.spawn(write_stdin(stdin, stdin_rx, worker.close_stdin.clone()));
        let stdout_done = CancellationToken::new();
        tracker.spawn(read_stdout(
            worker.clone(),
            pipes.stdout,
            stdout_done.clone(),
        ));
        tracker.spawn(log_stderr(cfg.name.clone(), pid, pipes.stderr));
        tracker.spawn(reap(worker.clone(), leader, stdout_done));
        worker
    }

    /// Time since spawn.
    pub fn uptime(&self) -> Duration {
        self.spawned_at.elapsed()
    }

    /// Whether the process ever took a client request (a crash after that
    /// is the request's doing, not a sign the command cannot start).
    pub fn was_leased(&self) -> bool {
        self.leased.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the process has exited and been reaped.
    pub fn is_exited(&self) -> bool {
        self.exited.is_cancelled()
    }

    /// Resolves once the process has exited and been reaped.
    pub async fn wait_exit(&self) {
        self.exited.cancelled().await
    }

    /// Why the process exited, once it has.
    pub fn exit_reason(&self) -> String {
        self.exit_reason
            .lock()
            .expect("lock")
            .clone()
            .unwrap_or_else(|| "unknown".into())
    }

    /// Notifications not tied to a request (list_changed, resource updates).
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.notifications.subscribe()
    }

    /// Requests written and not yet answered.
    pub fn pending(&self) -> usize {
        self.router.lock().expect("lock").pending_count()
    }

    /// Writes one message to stdin.
    pub async fn send(&self, msg: &Value) -> Result<(), ProcessError> {
        self.send_line(jsonrpc::line(msg)).await
    }

    /// Writes one line (ending in `\n`) to the process.
    async fn send_line(&self, line: Vec<u8>) -> Result<(), ProcessError> {
        if line.len() - 1 > self.max_message_size {
            return Err(ProcessError::TooLarge {
                size: line.len() - 1,
                limit: self.max_message_size,
            });
        }
        if self.is_exited() {
            return Err(ProcessError::Exited(self.exit_reason()));
        }
        let mut stdin = self.stdin.lock().await;
        let Some(w) = stdin.as_mut() else {
            return Err(ProcessError::Exited("stdin closed".into()));
        };
        if w.write_all(&line).await.is_err() {
            *stdin = None;
            return Err(ProcessError::Exited("stdin closed".into()));
        }
        Ok(())
    }

    /// Sends a broker-internal request and waits for its response.
    pub async fn call(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, ProcessError> {
        let (tx, rx) = oneshot::channel();
        let msg = self
            .router
            .lock()
            .expect("lock")
            .internal(method, params, tx);
        // A process that stopped reading stdin must not stall the caller:
        // the write counts against the same timeout as the answer.
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.send(&msg)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ProcessError::Timeout {
                    method: method.into(),
                    after: timeout,
                })
            }
        }
        tokio::select! {
            r = rx => r.map_err(|_| ProcessError::Exited(self.exit_reason())),
            _ = tokio::time::sleep_until(deadline) => Err(ProcessError::Timeout { method: method.into(), after: timeout }),
            _ = self.exited.cancelled() => Err(ProcessError::Exited(self.exit_reason())),
        }
    }

    /// Starts a client request on this process; events go to `sink`.
    /// Returns the lease id for [`Self::deliver`] and [`Self::end`].
    pub async fn begin(&self, msg: Outgoing, sink: LeaseSink) -> Result<u64, ProcessError> {
        self.leased
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (lid, line) = {
            let mut router = self.router.lock().expect("lock");
            match msg {
                Outgoing::Parsed(mut msg) => {
                    let lid = router.begin(&mut msg, sink);
                    (lid, jsonrpc::line(&msg))
                }
                Outgoing::Raw(req) => router.begin_raw(&req, sink),
            }
        };
        if let Err(e) = self.send_line(line).await {
            self.end(lid);
            return Err(e);
        }
        Ok(lid)
    }

    /// Ends a lease's routing; true if its request was still unanswered.
    pub fn end(&self, lid: u64) -> bool {
        self.router.lock().expect("lock").end(lid)
    }

    /// Sends a client's answer or notification into lease `lid`.
    pub async fn deliver(&self, lid: u64, msg: Value) -> Result<(), ProcessError> {
        let msg = self.router.lock().expect("lock").deliver(lid, msg)?;
        self.send(&msg).await
    }

    /// Tells the process a lease's request is cancelled.
    pub async fn cancel(&self, lid: u64, reason: &str) {
        let proc_id = self.router.lock().expect("lock").proc_id(lid);
        if let Some(proc_id) = proc_id {
            let note = jsonrpc::notification(
                "notifications/cancelled",
                serde_json::json!({"requestId": proc_id, "reason": reason}),
            );
            // Best effort, bounded: a process that does not read its stdin
            // is about to be judged by the ping that follows.
            let _ = tokio::time::timeout(CANCEL_WRITE_TIMEOUT, self.send(&note)).await;
        }
    }

    /// Stops the process: close stdin, SIGTERM the group, wait `grace`,
    /// SIGKILL the group, wait for the reaper.
    pub async fn stop(&self, grace: Duration) {
        if self.is_exited() {
            return;
        }
        self.close_stdin.cancel();
        self.group.signal(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.wait_exit()).await.is_err() {
            tracing::warn!(pool = %self.pool, pid = self.pid, "did not stop within {grace:?}; killing");
            self.group.signal(Signal::SIGKILL);
            // The reaper fires within DRAIN_AFTER_EXIT of the kill.
            let _ = tokio::time::timeout(DRAIN_AFTER_EXIT * 5, self.wait_exit()).await;
        }
    }

    /// Kills the whole group at once (for a process that is stuck).
    pub fn kill(&self) {
        self.group.signal(Signal::SIGKILL);
    }

    fn perform(&self, action: Action) {
        match action {
            Action::ToLease(sink, event) => deliver_event(sink, event, &self.metrics, &self.pool),
            Action::Reply(msg) => {
                let line = jsonrpc::line(&msg);
                // A full stdin queue means the process is not reading; the
                // reply is a courtesy, so dropping it cannot lose a client's data.
                let _ = self.replies.try_send(Bytes::from(line));
            }
            Action::Internal(tx, msg) => {
                let _ = tx.send(msg);
            }
            Action::Event(msg) => {
                let _ = self.notifications.send(msg);
            }
            Action::Drop(kind) => {
                if kind == "late_response" {
                    self.metrics
                        .late_responses
                        .with_label_values(&[&self.pool])
                        .inc();
                } else {
                    self.metrics
                        .unroutable
                        .with_label_values(&[&self.pool, kind])
                        .inc();
                }
            }
        }
    }
}

/// Hands an event to a lease; a full queue drops notifications (counted) but
/// never a final response.
fn deliver_event(sink: LeaseSink, event: LeaseEvent, metrics: &Metrics, pool: &str) {
    match sink.try_send(event) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(LeaseEvent::Final(msg))) => {
            tokio::spawn(async move {
                let _ = sink.send(LeaseEvent::Final(msg)).await;
            });
        }
        Err(mpsc::error::TrySendError::Full(LeaseEvent::Message(_))) => {
            metrics
                .unroutable
                .with_label_values(&[pool, "slow_consumer"])
                .inc();
        }
    }
}

async fn write_stdin(
    stdin: Arc<tokio::sync::Mutex<Option<tokio::process::ChildStdin>>>,
    mut rx: mpsc::Receiver<Bytes>,
    close: CancellationToken,
) {
    loop {
        let line = tokio::select! {
            _ = close.cancelled() => break,
            l = rx.recv() => match l { Some(l) => l, None => break },
        };
        let mut g = stdin.lock().await;
        if let Some(w) = g.as_mut() {
            if w.write_all(&line).await.is_err() {
                *g = None;
            }
        }
    }
    // Closing stdin tells the server to exit (EOF). A send stuck on a full
    // pipe holds the lock; the group is signalled anyway, so do not wait.
    if let Ok(mut g) = stdin.try_lock() {
        *g = None;
    }
}

async fn reap(worker: Arc<Process>, leader: Leader, stdout_done: CancellationToken) {
    // Wait for the leader to exit (pidfd, not reaped) or stdout to close.
    tokio::select! {
        _ = worker.group.exited() => {}
        _ = stdout_done.cancelled() => {}
    }
    // The leader is not reaped yet, so its group id cannot have been reused:
    // `reap` kills the stragglers (npx's node, shells' children) before it
    // reaps, and no signal reaches the group after that.
    let status = match leader {
        Leader::Spawned(mut child) => worker.group.reap(&mut child).await,
        Leader::Adopted => worker.group.reap_pid().await,
    };
    let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, stdout_done.cancelled()).await;
    let killed = status
        .as_ref()
        .is_ok_and(|s| std::os::unix::process::ExitStatusExt::signal(s) == Some(9));
    let reason = match status {
        Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    };
    let reason = match worker.cgroup.as_ref().filter(|_| killed) {
        Some(cg) => cg.oom_reason().unwrap_or(reason),
        None => reason,
    };
    // Reaped: its place in the node budget is free again.
    drop(worker.permit.lock().expect("lock").take());
    tracing::debug!(pool = %worker.pool, pid = worker.pid, %reason, "process ended");
    *worker.exit_reason.lock().expect("lock") = Some(reason.clone());
    // Exited before the leases in flight hear of it: one that ends on the
    // failure gives the process back, and the pool must by then see it as
    // gone, or it hands the dead process to a request waiting in the queue.
    worker.close_stdin.cancel();
    worker.exited.cancel();
    let actions = worker.router.lock().expect("lock").fail_all(&format!(
        "the server process {} {reason} while handling this request",
        worker.pid
    ));
    for a in actions {
        worker.perform(a);
    }
}
