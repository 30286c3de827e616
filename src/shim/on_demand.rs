//! `mcp-broker connect [options] -- CMD ARGS...`: the shim finds (or
//! starts) its user's per-user broker and asks it for the pool that runs
//! exactly this command, in this directory, with the variables chosen by
//! `--env`; then it serves that pool like a named one.
//!
//! Only the variables named by `--env` reach the server (`--env K` copies
//! the shim's own value, `--env K=V` sets one), on top of the broker's base
//! set; they are part of the pool's key, so sessions that chose different
//! values never share a process.

use super::ShimSettings;
use crate::config::Mode;
use crate::lease_api::OnDemandRequest;
use crate::metrics::Metrics;
use crate::proxy::backend::{Backend, BackendError};
use crate::user_broker::{self, autostart};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// What `connect -- CMD ARGS...` was told.
#[derive(Debug, Clone)]
pub struct OnDemandArgs {
    /// The server command and its arguments (at least the command).
    pub command: Vec<String>,
    /// `--env K` or `--env K=V`, in order.
    pub env: Vec<String>,
    /// How host sessions share the pool's processes.
    pub mode: Mode,
    /// The per-user broker's socket (`--socket`); default in
    /// [`user_broker::dir`].
    pub socket: Option<PathBuf>,
}

/// Why no on-demand pool could be had.
#[derive(Debug, thiserror::Error)]
pub enum OnDemandError {
    #[error("no command after `--`")]
    NoCommand,
    #[error("--env {0}: not set in the environment of mcp-broker connect (use --env {0}=VALUE)")]
    Unset(String),
    #[error("--env {0:?}: not a variable name")]
    BadName(String),
    #[error("cannot read the working directory: {0}")]
    Cwd(std::io::Error),
    #[error(transparent)]
    Dir(#[from] user_broker::dir::DirError),
    #[error("per-user broker: {0}")]
    Start(#[from] autostart::StartError),
    #[error("per-user broker: {0}")]
    Broker(#[from] BackendError),
    #[error("cannot find the mcp-broker executable to start the per-user broker: {0}")]
    Exe(std::io::Error),
}

/// The variables chosen by `--env`, resolved against this process's
/// environment.
pub fn chosen_env(specs: &[String]) -> Result<BTreeMap<String, String>, OnDemandError> {
    let mut out = BTreeMap::new();
    for s in specs {
        let (k, v) = match s.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                let v = std::env::var(s).map_err(|_| OnDemandError::Unset(s.clone()))?;
                (s.clone(), v)
            }
        };
        if k.is_empty() || k.contains('\0') {
            return Err(OnDemandError::BadName(k));
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// The request for this shim's pool.
pub fn request(args: &OnDemandArgs) -> Result<OnDemandRequest, OnDemandError> {
    let (command, rest) = args.command.split_first().ok_or(OnDemandError::NoCommand)?;
    let cwd = std::env::current_dir().map_err(OnDemandError::Cwd)?;
    Ok(OnDemandRequest {
        command: command.clone(),
        args: rest.to_vec(),
        cwd: cwd.display().to_string(),
        env: chosen_env(&args.env)?,
        mode: args.mode,
    })
}

/// Makes sure the per-user broker runs (starting it with the full binary,
/// [`crate::slim::full_exe`], when none does), gets the pool, and points
/// `settings` at it.
pub async fn prepare(
    args: &OnDemandArgs,
    settings: &mut ShimSettings,
) -> Result<(), OnDemandError> {
    let req = request(args)?;
    let socket = user_broker::socket_path(args.socket.as_deref())?;
    let exe = crate::slim::full_exe().map_err(OnDemandError::Exe)?;
    let backend = Backend::new(
        socket.clone(),
        String::new(),
        settings.max_message,
        Arc::new(Metrics::new()),
    );
    let mut attempt = 0;
    let got = loop {
        // Blocking (a connect, at most a file lock and a bounded wait for a
        // start) on the runtime's only thread: nothing else runs yet, and a
        // blocking-pool thread would stay resident for the shim's life.
        autostart::ensure_running(&socket, &exe, &[])?;
        match backend.on_demand_pool(&req).await {
            // The broker went away between the check and the call: once more.
            Err(BackendError::Unreachable { .. }) if attempt == 0 => attempt += 1,
            r => break r?,
        }
    };
    tracing::debug!(pool = %got.pool, created = got.created, "on-demand pool");
    settings.socket = socket;
    settings.pool = got.pool;
    settings.mode = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_is_only_what_was_chosen() {
        std::env::set_var("MCP_BROKER_TEST_CHOSEN", "yes");
        let e = chosen_env(&["MCP_BROKER_TEST_CHOSEN".into(), "A=b=c".into()]).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e["MCP_BROKER_TEST_CHOSEN"], "yes");
        assert_eq!(e["A"], "b=c");
        let err = chosen_env(&["MCP_BROKER_TEST_SURELY_UNSET".into()]).unwrap_err();
        assert!(err.to_string().contains("not set"), "{err}");
        assert!(chosen_env(&["=v".into()]).is_err());
    }
}
