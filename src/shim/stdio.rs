//! The shim's stdin and stdout as non-blocking descriptors on the runtime's
//! own event loop.
//!
//! `tokio::io::stdin()`/`stdout()` do every read and write on a blocking
//! thread: with the current-thread runtime of `connect` that would be the
//! only extra thread, with its own stack and malloc arena (a large part of
//! an idle shim's memory). Hosts spawn stdio servers with pipes (or Unix
//! socket pairs, as Node.js does), which can be polled: those get a
//! non-blocking duplicate registered with the runtime. Anything else (a
//! regular file, a terminal) falls back to tokio's blocking-thread stdio.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use tokio::io::{AsyncRead, AsyncWrite};

/// The shim's input.
pub type Input = Box<dyn AsyncRead + Unpin + Send>;
/// The shim's output.
pub type Output = Box<dyn AsyncWrite + Unpin + Send>;

/// What a descriptor is, as far as polling goes.
enum Kind {
    Fifo,
    Socket,
    Other,
}

fn kind(fd: &OwnedFd) -> Kind {
    let Ok(file) = fd.try_clone().map(File::from) else {
        return Kind::Other;
    };
    match file.metadata().map(|m| m.file_type()) {
        Ok(t) if t.is_fifo() => Kind::Fifo,
        Ok(t) if t.is_socket() => Kind::Socket,
        _ => Kind::Other,
    }
}

fn socket(fd: OwnedFd) -> Option<tokio::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true).ok()?;
    tokio::net::UnixStream::from_std(s).ok()
}

/// A pollable duplicate of stdin or stdout when it is a pipe (`fifo` wraps
/// it) or a socket (`sock` wraps it); `None` for anything else.
fn polled<T>(
    fd: std::io::Result<OwnedFd>,
    fifo: impl FnOnce(OwnedFd) -> std::io::Result<T>,
    sock: impl FnOnce(tokio::net::UnixStream) -> T,
) -> Option<T> {
    let fd = fd.ok()?;
    match kind(&fd) {
        Kind::Fifo => fifo(fd).ok(),
        Kind::Socket => socket(fd).map(sock),
        Kind::Other => None,
    }
}

/// Stdin, polled when it is a pipe or socket. Call inside the runtime.
pub fn input() -> Input {
    polled(
        std::io::stdin().as_fd().try_clone_to_owned(),
        |fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).map(|r| Box::new(r) as Input),
        |s| Box::new(s) as Input,
    )
    .unwrap_or_else(|| Box::new(tokio::io::stdin()))
}

/// Stdout, polled when it is a pipe or socket. Call inside the runtime.
pub fn output() -> Output {
    polled(
        std::io::stdout().as_fd().try_clone_to_owned(),
        |fd| tokio::net::unix::pipe::Sender::from_owned_fd(fd).map(|w| Box::new(w) as Output),
        |s| Box::new(s) as Output,
    )
    .unwrap_or_else(|| Box::new(tokio::io::stdout()))
}
