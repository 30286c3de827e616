//! How a pool hands processes to sessions ([`Mode`]), and which modes host
//! sessions may ask a pool for (`modes`).
//!
//! A session names its mode on the lease API (`mcp-broker connect --mode`);
//! one that names none uses the pool's `mode`. The operator opts in to
//! anything else, because an exclusive session holds a process of the pool
//! for its whole life (counted against `max`, the node budget and the
//! tenant's share like any process). Sticky use binds nothing, so a pool
//! that allows sticky sessions allows shared ones too.

use super::PoolConfig;
use serde::{Deserialize, Serialize};

/// How a pool hands processes to sessions.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Any warm process, per request.
    #[default]
    Shared,
    /// The session's previous process when it is alive and free, else any.
    Sticky,
    /// One process for the whole session, discarded at its end.
    Exclusive,
}

impl Mode {
    /// Its spelling in config, flags and the lease API, without allocating
    /// (the proxy names it on every request of a session). The serde and
    /// clap names match it (tested).
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Sticky => "sticky",
            Mode::Exclusive => "exclusive",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PoolConfig {
    /// Every mode a session may ask for, the pool's `mode` first.
    pub fn allowed_modes(&self) -> Vec<Mode> {
        let mut out = vec![self.mode];
        for m in self.modes.iter().copied() {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.contains(&Mode::Sticky) && !out.contains(&Mode::Shared) {
            out.push(Mode::Shared);
        }
        out
    }

    /// Whether a session may use the pool in mode `m`.
    /// (Allocation-free: the pool asks on every pick.)
    pub fn allows(&self, m: Mode) -> bool {
        let listed = |m: Mode| m == self.mode || self.modes.contains(&m);
        listed(m) || (m == Mode::Shared && listed(Mode::Sticky))
    }
}

/// The rules on `modes`: when set, it lists `mode` and no mode twice.
pub(super) fn check(c: &PoolConfig) -> Result<(), String> {
    if c.modes.is_empty() {
        return Ok(());
    }
    if !c.modes.contains(&c.mode) {
        return Err(format!(
            "{:?} must include the pool's mode ({:?})",
            c.modes.iter().map(Mode::to_string).collect::<Vec<_>>(),
            c.mode.to_string()
        ));
    }
    for (i, m) in c.modes.iter().enumerate() {
        if c.modes[..i].contains(m) {
            return Err(format!("lists {:?} twice", m.to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_default_to_the_pools_own() {
        let mut c = PoolConfig::new("p", "x", vec![]);
        assert_eq!(c.allowed_modes(), vec![Mode::Shared]);
        assert!(!c.allows(Mode::Exclusive));
        c.mode = Mode::Sticky;
        assert_eq!(c.allowed_modes(), vec![Mode::Sticky, Mode::Shared]);
        c.mode = Mode::Shared;
        c.modes = vec![Mode::Exclusive, Mode::Shared];
        assert_eq!(c.allowed_modes(), vec![Mode::Shared, Mode::Exclusive]);
        assert!(check(&c).is_ok());
        c.modes = vec![Mode::Exclusive];
        assert!(check(&c).unwrap_err().contains("must include"));
        c.modes = vec![Mode::Shared, Mode::Shared];
        assert!(check(&c).unwrap_err().contains("twice"));
    }
}
