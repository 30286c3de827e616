//! The control socket's messages: a 4-byte big-endian length, then a JSON
//! object carrying `"version"` and an `"op"`; file descriptors travel with
//! the message as `SCM_RIGHTS`.
//!
//! Versioning: a receiver first reads only `version`; a message of another
//! version is refused as [`WireError::Version`] (the peer is told, in this
//! version's words, and nothing else is read from it), so an old and a new
//! broker never half-understand each other. Unknown fields are ignored, so
//! a later version 1 may add optional ones. Frames and fd counts are
//! bounded; received fds are close-on-exec and owned at once, so none leaks
//! whatever the message turns out to be.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The handoff protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Largest message in bytes.
pub const MAX_FRAME: usize = 64 * 1024;
/// Most file descriptors one message may carry.
pub const MAX_FDS: usize = 64;

/// One control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Message {
    /// New broker → old: hand me your listening sockets.
    Takeover,
    /// Old → new: the listening sockets, one fd per name, in order.
    Listeners { names: Vec<String> },
    /// New → old: I am accepting now; stop accepting and drain.
    Ack,
    /// Client → broker: re-execute in place.
    Upgrade,
    /// Broker → client: the new image serves, with this pid.
    Upgraded { pid: u32 },
    /// Either way: the request was refused, and why.
    Refused { error: String },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    version: u32,
    #[serde(flatten)]
    message: Message,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: Option<u32>,
}

/// Why a message could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the control connection")]
    Closed,
    #[error("the peer speaks handoff version {0}; this broker speaks version {VERSION}")]
    Version(u32),
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("control message of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("control message carries more than {MAX_FDS} file descriptors")]
    TooManyFds,
}

/// Sends `msg` with `fds` attached.
pub async fn send(
    stream: &UnixStream,
    msg: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    let body = serde_json::to_vec(&Envelope {
        version: VERSION,
        message: msg.clone(),
    })
    .expect("messages serialize");
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len()));
    }
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < frame.len() {
        stream.writable().await?;
        let rights = [ControlMessage::ScmRights(&raw)];
        // The fds ride on the first byte; later writes carry none.
        let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        let r = stream.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&frame[sent..])],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives one message and the fds that came with it.
pub async fn recv(stream: &UnixStream) -> Result<(Message, Vec<OwnedFd>), WireError> {
    let mut fds = Vec::new();
    let mut head = [0u8; 4];
    read_exact(stream, &mut head, &mut fds).await?;
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    read_exact(stream, &mut body, &mut fds).await?;
    if fds.len() > MAX_FDS {
        return Err(WireError::TooManyFds);
    }
    let v: VersionOnly =
        serde_json::from_slice(&body).map_err(|e| WireError::Malformed(e.to_string()))?;
    match v.version {
        Some(VERSION) => {}
        Some(other) => return Err(WireError::Version(other)),
        None => return Err(WireError::Malformed("no \"version\"".into())),
    }
    let env: Envelope =
        serde_json::from_slice(&body).map_err(|e| WireError::Malformed(e.to_string()))?;
    Ok((env.message, fds))
}

async fn read_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        stream.readable().await?;
        let r = stream.try_io(Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
            let mut iov = [IoSliceMut::new(&mut buf[got..])];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut received = Vec::new();
            let cmsgs = msg
                .cmsgs()
                .map_err(|_| std::io::Error::other("file descriptors truncated"))?;
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(list) = c {
                    received.extend(list);
                }
            }
            Ok((msg.bytes, received))
        });
        match r {
            Ok((n, received)) => {
                // SAFETY: the kernel just installed these fds in our table
                // for this message (SCM_RIGHTS); nothing else knows them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
                if n == 0 {
                    return Err(WireError::Closed);
                }
                got += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Answers a message of another version or shape with a refusal the peer
/// can read whatever version it speaks (best effort).
pub async fn refuse(stream: &UnixStream, why: &WireError) {
    let _ = send(
        stream,
        &Message::Refused {
            error: why.to_string(),
        },
        &[],
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn messages_and_fds_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let msg = Message::Listeners {
            names: vec!["lease".into()],
        };
        send(&a, &msg, &[file.as_fd()]).await.unwrap();
        let (got, fds) = recv(&b).await.unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fds[0].as_raw_fd())).unwrap();
        assert_eq!(link, std::path::Path::new("/dev/null"));
    }

    #[tokio::test]
    async fn another_version_is_refused_and_garbage_is_malformed() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = UnixStream::pair().unwrap();
        let body = br#"{"version":2,"op":"takeover","extra":1}"#;
        a.write_all(&(body.len() as u32).to_be_bytes())
            .await
            .unwrap();
        a.write_all(body).await.unwrap();
        assert!(matches!(recv(&b).await, Err(WireError::Version(2))));
        let body = br#"{"version":1,"op":"dance"}"#;
        a.write_all(&(body.len() as u32).to_be_bytes())
            .await
            .unwrap();
        a.write_all(body).await.unwrap();
        assert!(matches!(recv(&b).await, Err(WireError::Malformed(_))));
        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        assert!(matches!(recv(&b).await, Err(WireError::TooLarge(_))));
        drop(a);
        assert!(matches!(recv(&b).await, Err(WireError::Closed)));
    }
}
