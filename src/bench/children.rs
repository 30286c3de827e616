//! The broker and the proxy as separate child processes (`mcp-broker serve`,
//! `mcp-broker proxy`), so their memory can be read apart from the load
//! generator's.
//!
//! Everything here is bounded: readiness waits have a limit, stopping sends
//! SIGTERM, waits, then SIGKILLs the child's process group. Children log to
//! files in the output directory and inherit this process's rlimits (see
//! [`raise_nofile`]).

use crate::process::group::Group;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nix::sys::resource::{getrlimit, rlim_t, setrlimit, Resource};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (children
/// started afterwards inherit it). Returns the soft limit now in force.
pub fn raise_nofile() -> rlim_t {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    // Raising soft to hard needs no privilege.
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// A free loopback port (bound and released; a race with other programs is
/// possible but harmless here: the proxy then fails to start, clearly).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `GET path` on the broker's Unix socket: status and body, bounded by `limit`.
pub async fn unix_get(socket: &Path, path: &str, limit: Duration) -> anyhow::Result<(u16, Bytes)> {
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(hyperlocal::UnixConnector);
    let uri: hyper::Uri = hyperlocal::Uri::new(socket, path).into();
    let fut = async {
        let r = client.get(uri).await?;
        let status = r.status().as_u16();
        let body = http_body_util::Limited::new(r.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow::anyhow!("GET {path} on {}: no answer", socket.display()))?
}

/// `GET path` on `127.0.0.1:port` over plain HTTP/1.1: the status, bounded by `limit`.
pub async fn tcp_get(port: u16, path: &str, limit: Duration) -> anyhow::Result<u16> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = format!("http://127.0.0.1:{port}{path}").parse()?;
    let fut = async {
        let r = client.get(uri).await?;
        let status = r.status().as_u16();
        let _ = r.into_body().collect().await;
        anyhow::Ok(status)
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow::anyhow!("GET {path} on port {port}: no answer"))?
}

/// A running child process of this binary.
pub struct Daemon {
    /// What it is, for messages.
    pub name: String,
    /// Its process id (leader of its own process group).
    pub pid: u32,
    /// Its log file.
    pub log: PathBuf,
    child: tokio::process::Child,
    group: Group,
}

impl Daemon {
    /// Starts `current_exe args…` in its own process group, logging to `log`.
    pub fn spawn(name: &str, args: &[String], log: PathBuf) -> anyhow::Result<Daemon> {
        let exe = std::env::current_exe()?;
        let file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(&exe)
            .args(args)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name} ({}): {e}", exe.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("{name} exited at once; see {}", log.display()))?;
        let group = Group::leader(&child);
        Ok(Daemon {
            name: name.to_string(),
            pid,
            log,
            child,
            group,
        })
    }

    /// Waits until `probe` succeeds, the child exits (an error), or `limit` passes.
    pub async fn wait_ready<F, Fut>(&mut self, limit: Duration, mut probe: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let start = Instant::now();
        let mut last = String::from("not tried");
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.group.try_reap(&mut self.child) {
                anyhow::bail!(
                    "{} exited at start ({st}); see {}",
                    self.name,
                    self.log.display()
                );
            }
            match probe().await {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!(
            "{} not ready within {limit:?}: {last}; see {}",
            self.name,
            self.log.display()
        )
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL to its process group
    /// (before the child is reaped, so the group id is still its own).
    pub async fn stop(mut self, grace: Duration) {
        self.group.signal_leader(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.group.exited())
            .await
            .is_err()
        {
            eprintln!(
                "bench: {} did not stop within {grace:?}; killing it",
                self.name
            );
        }
        // Ends stragglers in the group, then reaps.
        let reap = self.group.reap(&mut self.child);
        let _ = tokio::time::timeout(Duration::from_secs(5), reap).await;
    }
}

/// A broker config with one pool `pool` of the fixture (`min_idle` 1, `max` 1),
/// taking connections for every queued call.
pub fn broker_toml(socket: &Path, pool: &str, fixture: &str, queue_limit: usize) -> String {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    format!(
        "[broker]\nsocket = {}\nmetrics_listen = \"\"\ndrain_timeout = \"2s\"\n\
         max_connections = {conns}\nmax_connections_per_peer = {conns}\n\n\
         [[pool]]\nname = {}\ncommand = {}\nmin_idle = 1\nmax = 1\n\
         queue_limit = {queue_limit}\nqueue_timeout = \"10m\"\nrequest_timeout = \"10m\"\n\
         stop_grace = \"500ms\"\n",
        q(&socket.display().to_string()),
        q(pool),
        q(fixture),
        conns = queue_limit + 256,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses() {
        let t = broker_toml(
            Path::new("/tmp/a b\"/s.sock"),
            "bench",
            "/x/mcp-fixture",
            10_100,
        );
        let c = crate::config::Config::from_toml(&t).unwrap();
        assert_eq!(c.pools[0].queue_limit, 10_100);
        assert_eq!(c.pools[0].max, 1);
        assert!(c.broker.metrics_listen.is_none());
        assert_eq!(c.broker.socket, Path::new("/tmp/a b\"/s.sock"));
    }

    #[test]
    fn nofile_is_raised_or_kept() {
        assert!(raise_nofile() > 0);
    }
}
