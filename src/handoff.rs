//! Upgrading and restarting the broker without failing a request or
//! showing a cold start.
//!
//! Two ways, one wire ([`wire`]: versioned JSON with fds over
//! `SCM_RIGHTS`, on the [`control`] socket beside the lease socket):
//! * take-over: a new broker that finds a live one on its socket warms its
//!   pools first, then takes the listening sockets ([`registry`]) over;
//!   the old one drains and exits ([`start`], [`run`]);
//! * in-place upgrade: the broker re-executes itself keeping its pid,
//!   passing listeners, process pipes and pool state ([`upgrade`]); the
//!   new image adopts every process.
//!
//! Invariant: a listening socket is never closed while a broker hands it
//! on, so a connection made meanwhile waits in its backlog, never fails.

pub mod control;
pub mod registry;
pub mod run;
pub mod start;
pub mod upgrade;
pub mod wire;
