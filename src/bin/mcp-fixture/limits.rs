//! Tools that run into a sandbox's limits (open files, address space,
//! processes), so the sandbox tests can show each one biting the tool and
//! not the node. Each answers with the OS error it met.

use super::{bad, log, text, RpcResult, INTERNAL_ERROR};
use std::process::{Command, Stdio};
use std::thread;

/// Holds `n` open files at once (to show an open-files limit biting).
pub fn open_files(n: u64) -> RpcResult {
    let held: Result<Vec<_>, _> = (0..n).map(|_| std::fs::File::open("/dev/null")).collect();
    let err = |e: std::io::Error| (INTERNAL_ERROR, format!("open_files: holding {n}: {e}"));
    held.map_err(err).and_then(|_| text(format!("opened {n}")))
}

/// Allocates and touches `bytes` (to show an address-space limit biting).
pub fn alloc(bytes: u64) -> RpcResult {
    let len = usize::try_from(bytes).map_err(|_| bad("alloc: too big for this platform"))?;
    let mut v: Vec<u8> = Vec::new();
    let err = |e: std::collections::TryReserveError| (INTERNAL_ERROR, format!("alloc {len}: {e}"));
    v.try_reserve_exact(len).map_err(err)?;
    v.resize(len, 1);
    text(format!("allocated {}", v.len()))
}

/// Starts `sleep 600` in our process group; a thread reaps it when it dies.
pub fn spawn_child() -> RpcResult {
    let child = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(mut child) => {
            let pid = child.id();
            log(&format!("spawn_child: started sleep 600 as pid {pid}"));
            // Without a reaper thread (out of threads) the child is reaped
            // when the fixture exits; the answer does not depend on it.
            if let Err(e) = thread::Builder::new().spawn(move || child.wait()) {
                log(&format!("spawn_child: no reaper thread for pid {pid}: {e}"));
            }
            text(pid.to_string())
        }
        Err(e) => Err((INTERNAL_ERROR, format!("spawn_child: {e}"))),
    }
}
