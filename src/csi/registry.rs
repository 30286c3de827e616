//! The per-pod listeners: volume id → the socket serving that pod.
//!
//! This module alone owns the pods' listening sockets and their accept
//! tasks; everything else names a volume by id. That keeps one place to
//! hand the listeners to another process later (a broker upgrade passing
//! sockets on) and one place that knows how a pod's socket ends.
//!
//! Invariants: a pod's socket is `target_path/broker.sock`, mode 0666 (the
//! volume directory is what grants access: only the pod's containers see
//! it); it is bound through `/proc/self/fd/N/` so a kubelet target path
//! longer than `sun_path` still works. Broker shutdown stops accepting and
//! lets the pod's in-flight requests drain with the broker's, but leaves
//! the socket file (the next broker binds it again); [`Registry::close`]
//! (unpublish) also drops the pod's connections at once, which cancels its
//! leases, and removes the socket and the directory the plugin made.

use super::volume::{Volume, SOCKET_NAME};
use crate::broker::Broker;
use crate::policy::VolumePod;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Mode of a pod's socket: any user of the pod may connect (the pod's
/// containers run as arbitrary non-root users under "restricted").
const SOCKET_MODE: u32 = 0o666;
/// Mode of the volume directory: the pod's users must reach the socket.
const DIR_MODE: u32 = 0o755;
/// How long closing a pod's socket waits for its connections to end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One pod's listener.
struct Entry {
    volume: Volume,
    /// Stops accepting (also fired by broker shutdown, a child of it).
    stop: CancellationToken,
    /// Drops every connection at once (unpublish only).
    end: CancellationToken,
    /// The accept loop and its connections.
    tasks: TaskTracker,
}

/// Every pod socket this broker serves.
pub struct Registry {
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Registry {
    /// An empty registry whose listeners stop accepting on `shutdown`.
    pub fn new(broker: Arc<Broker>, shutdown: CancellationToken) -> Registry {
        Registry {
            broker,
            shutdown,
            entries: Mutex::new(BTreeMap::new()),
        }
    }

    /// The volume published under `volume_id`.
    pub fn get(&self, volume_id: &str) -> Option<Volume> {
        let entries = self.entries.lock().expect("lock");
        entries.get(volume_id).map(|e| e.volume.clone())
    }

    /// The id of the volume published at `target`.
    pub fn at_target(&self, target: &Path) -> Option<String> {
        let entries = self.entries.lock().expect("lock");
        entries
            .values()
            .find(|e| e.volume.target_path == target)
            .map(|e| e.volume.volume_id.clone())
    }

    /// Every published volume, by id.
    pub fn volumes(&self) -> Vec<Volume> {
        let entries = self.entries.lock().expect("lock");
        entries.values().map(|e| e.volume.clone()).collect()
    }

    /// How many volumes are published.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("lock").len()
    }

    /// True when no volume is published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Creates the volume directory and the pod's socket in it, and starts
    /// serving it. Returns once the socket listens.
    pub fn open(&self, volume: Volume) -> std::io::Result<()> {
        let listener = bind_in(&volume.target_path)?;
        let pod = Arc::new(volume.pod());
        let stop = self.shutdown.child_token();
        let end = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept(
            self.broker.clone(),
            listener,
            pod,
            stop.clone(),
            end.clone(),
        ));
        tasks.close();
        tracing::info!(
            volume = volume.volume_id,
            pod = format!("{}/{}", volume.namespace, volume.pod_name),
            socket = %volume.socket().display(),
            "pod socket listening"
        );
        let old = self.entries.lock().expect("lock").insert(
            volume.volume_id.clone(),
            Entry {
                volume,
                stop,
                end,
                tasks,
            },
        );
        debug_assert!(old.is_none(), "callers open a volume id once");
        Ok(())
    }

    /// Stops serving `volume_id`: no new connection, the pod's connections
    /// (and so its leases) end now; the socket and the volume directory go.
    pub async fn close(&self, volume_id: &str) -> Option<Volume> {
        let e = self.entries.lock().expect("lock").remove(volume_id)?;
        e.stop.cancel();
        e.end.cancel();
        if tokio::time::timeout(CLOSE_TIMEOUT, e.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(volume = volume_id, "pod connections still closing");
        }
        remove_socket_dir(&e.volume.target_path);
        tracing::info!(volume = volume_id, "pod socket closed");
        Some(e.volume)
    }

    /// Waits, [`CLOSE_TIMEOUT`] at most in all, for every pod's
    /// connections after broker shutdown.
    pub async fn wait_stopped(&self) {
        let all: Vec<TaskTracker> = {
            let entries = self.entries.lock().expect("lock");
            entries.values().map(|e| e.tasks.clone()).collect()
        };
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        for t in all {
            if tokio::time::timeout_at(deadline, t.wait()).await.is_err() {
                tracing::warn!("pod connections still open at shutdown");
                return;
            }
        }
    }
}

/// Accepts on a pod's socket until `stop`; each connection is the pod's,
/// and is dropped when `end` fires.
async fn accept(
    broker: Arc<Broker>,
    listener: UnixListener,
    pod: Arc<VolumePod>,
    stop: CancellationToken,
    end: CancellationToken,
) {
    let conns = TaskTracker::new();
    crate::web::accept_until(&listener, &stop, "pod socket", |(stream, _)| {
        let serve = broker
            .clone()
            .serve_pod_connection(stream, pod.clone(), stop.clone());
        let end = end.clone();
        conns.spawn(async move {
            tokio::select! {
                _ = serve => {}
                _ = end.cancelled() => {}
            }
        });
    })
    .await;
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// Binds `dir/broker.sock` (replacing a stale one), mode 0666, creating
/// `dir` if needed. The bind goes through the directory's descriptor, so
/// the address stays short whatever the length of `dir`.
pub fn bind_in(dir: &Path) -> std::io::Result<UnixListener> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
    let handle = std::fs::File::open(dir)?;
    let socket = dir.join(SOCKET_NAME);
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let short = format!("/proc/self/fd/{}/{SOCKET_NAME}", handle.as_raw_fd());
    let std_listener = std::os::unix::net::UnixListener::bind(short)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    std_listener.set_nonblocking(true)?;
    UnixListener::from_std(std_listener)
}

/// Removes a pod's socket and its directory when nothing else is in it
/// (the CSI spec: the plugin deletes what it created at the target path).
pub fn remove_socket_dir(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(SOCKET_NAME));
    // Fails, harmlessly, when the directory holds something not ours.
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_under_a_target_path_longer_than_sun_path() {
        let dir = tempfile::tempdir().unwrap();
        let long = dir
            .path()
            .join("p".repeat(100))
            .join("v".repeat(60))
            .join("mount");
        assert!(long.join(SOCKET_NAME).as_os_str().len() > 108);
        let l = bind_in(&long).unwrap();
        let mode = std::fs::metadata(long.join(SOCKET_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);
        // Connect the same way (a client's path would be too long too).
        let d = std::fs::File::open(&long).unwrap();
        let addr = format!("/proc/self/fd/{}/{SOCKET_NAME}", d.as_raw_fd());
        let c = tokio::net::UnixStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        drop((c, s, l));
        // A stale socket is replaced.
        drop(bind_in(&long).unwrap());
        remove_socket_dir(&long);
        assert!(!long.exists());
    }
}
