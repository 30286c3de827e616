//! The `probe` tool: what a compromised server would try against its
//! neighbours (read another process's `/proc` files, write into another
//! pool's home, reach or replace the broker's socket). The isolation tests
//! call it and expect every attempt to fail.
//!
//! The outcome is the tool's text (`ok: ...` or `denied: <error>`), not a
//! JSON-RPC error, so a test can tell a refused attempt from a broken tool.

use std::io::{Read, Write};

/// Runs `op` on `path`: `read` (first bytes), `write` (create a file),
/// `connect` (a Unix socket), `lease_api` (ask the broker on socket `path`
/// for its pools), `unlink`, or `list` (a directory).
pub fn probe(op: &str, path: &str) -> Result<String, String> {
    let outcome = match op {
        "read" => std::fs::File::open(path).and_then(|mut f| {
            let mut buf = [0u8; 64];
            let n = f.read(&mut buf)?;
            Ok(format!("read {n} bytes"))
        }),
        "write" => std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(b"planted\n"))
            .map(|()| "written".to_string()),
        "connect" => std::os::unix::net::UnixStream::connect(path).map(|_| "connected".to_string()),
        "lease_api" => lease_api(path),
        "unlink" => std::fs::remove_file(path).map(|()| "removed".to_string()),
        "list" => std::fs::read_dir(path).map(|d| format!("{} entries", d.count())),
        other => return Err(format!("probe: unknown op {other:?}")),
    };
    Ok(match outcome {
        Ok(what) => format!("ok: {what}"),
        Err(e) => format!("denied: {e}"),
    })
}

/// Connects to a broker socket and asks for its pools; an answer is `ok`.
fn lease_api(path: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(b"GET /v1/pools HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 32];
    match s.read(&mut head)? {
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the broker closed the connection",
        )),
        n => Ok(String::from_utf8_lossy(&head[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()),
    }
}
