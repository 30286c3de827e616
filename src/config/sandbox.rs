//! `[pool.sandbox]`, validated: what a pool's processes may do.
//!
//! Everything here is opt-in; [`SandboxConfig::default`] changes nothing.
//! Validation checks shapes only (a user name is well formed, a size parses);
//! whether a user exists or a privilege is held is decided at spawn time by
//! [`crate::process::sandbox`], which is where the answer can change.

use super::raw::RawSandbox;

/// Variables kept when `env_clear = true` and `env_allow` is not given.
pub const DEFAULT_ENV_ALLOW: [&str; 3] = ["PATH", "HOME", "LANG"];

/// A user or group: a name looked up at spawn time, or a numeric id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A numeric uid or gid.
    Id(u32),
    /// A name resolved through the system's user or group database.
    Name(String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Id(n) => write!(f, "{n}"),
            Principal::Name(s) => write!(f, "{s:?}"),
        }
    }
}

pub use super::raw::Network;

/// Restrictions applied to every process of a pool between fork and exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Run as this user (needs root).
    pub user: Option<Principal>,
    /// Run as this group (needs root); defaults to the user's primary group.
    pub group: Option<Principal>,
    /// Start from an empty environment instead of the broker's.
    pub env_clear: bool,
    /// Broker variables copied in when `env_clear` is set; the pool's own
    /// `env` is always added on top.
    pub env_allow: Vec<String>,
    /// RLIMIT_NOFILE: open file descriptors at most.
    pub max_open_files: Option<u64>,
    /// RLIMIT_AS: bytes of virtual address space at most.
    pub max_address_space: Option<u64>,
    /// RLIMIT_NPROC: processes and threads of the (real) user at most.
    pub max_processes: Option<u64>,
    /// PR_SET_NO_NEW_PRIVS: setuid binaries and file capabilities stop working.
    pub no_new_privileges: bool,
    /// Which network the process sees.
    pub network: Network,
}

impl SandboxConfig {
    /// True when nothing is restricted.
    pub fn is_empty(&self) -> bool {
        *self == SandboxConfig::default()
    }
}

/// Parses a byte size: an integer, or a string such as `"512MiB"`, `"2G"`,
/// `"64k"` (binary units: k/K/KiB = 1024 and so on).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: u64 = num.replace('_', "").parse().map_err(|_| {
        format!("{s:?} is not a size; use e.g. \"512MiB\", \"2GiB\" or a byte count")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    num.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A size written as a byte count or a string such as `"512MiB"`.
pub fn size_value(field: &'static str, v: &toml::Value) -> Result<u64, (&'static str, String)> {
    match v {
        toml::Value::Integer(n) if *n > 0 => Ok(*n as u64),
        toml::Value::String(s) => parse_bytes(s).map_err(|m| (field, m)),
        other => Err((
            field,
            format!("{other} is not a size; use e.g. \"512MiB\" or a positive byte count"),
        )),
    }
}

fn principal(field: &'static str, s: &str) -> Result<Principal, (&'static str, String)> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u32>() {
        return Ok(Principal::Id(n));
    }
    let ok = !t.is_empty()
        && t.len() <= 32
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
    if ok {
        Ok(Principal::Name(t.to_string()))
    } else {
        Err((
            field,
            format!("{s:?} is not a user/group name or numeric id"),
        ))
    }
}

/// Validates `[pool.sandbox]`; an error names the field (the caller adds
/// the pool).
pub fn from_raw(r: &RawSandbox) -> Result<SandboxConfig, (&'static str, String)> {
    let mut c = SandboxConfig {
        user: r
            .user
            .as_deref()
            .map(|s| principal("sandbox.user", s))
            .transpose()?,
        group: r
            .group
            .as_deref()
            .map(|s| principal("sandbox.group", s))
            .transpose()?,
        env_clear: r.env_clear.unwrap_or(false),
        no_new_privileges: r.no_new_privileges.unwrap_or(false),
        ..SandboxConfig::default()
    };
    match (&r.env_allow, c.env_clear) {
        (Some(_), false) => {
            return Err((
                "sandbox.env_allow",
                "only applies with env_clear = true (without it every variable is inherited)"
                    .into(),
            ))
        }
        (Some(list), true) => {
            if let Some(bad) = list
                .iter()
                .find(|v| v.is_empty() || v.contains('=') || v.contains('\0'))
            {
                return Err((
                    "sandbox.env_allow",
                    format!("{bad:?} is not a variable name"),
                ));
            }
            c.env_allow = list.clone();
        }
        (None, true) => c.env_allow = DEFAULT_ENV_ALLOW.iter().map(|s| s.to_string()).collect(),
        (None, false) => {}
    }
    for (field, v, slot) in [
        (
            "sandbox.max_open_files",
            r.max_open_files,
            &mut c.max_open_files,
        ),
        (
            "sandbox.max_processes",
            r.max_processes,
            &mut c.max_processes,
        ),
    ] {
        if v == Some(0) {
            return Err((field, "must be at least 1".into()));
        }
        *slot = v;
    }
    c.max_address_space = r
        .max_address_space
        .as_ref()
        .map(|v| size_value("sandbox.max_address_space", v))
        .transpose()?;
    if c.max_address_space.is_some_and(|n| n < 16 << 20) {
        return Err((
            "sandbox.max_address_space",
            "must be at least 16MiB (no program starts in less)".into(),
        ));
    }
    c.network = r.network.unwrap_or_default();
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1_024"), Ok(1024));
        assert_eq!(parse_bytes(" 64 kib "), Ok(64 << 10));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }

    #[test]
    fn env_defaults_and_rules() {
        let r = RawSandbox {
            env_clear: Some(true),
            ..RawSandbox::default()
        };
        assert_eq!(from_raw(&r).unwrap().env_allow, DEFAULT_ENV_ALLOW);
        let r = RawSandbox {
            env_allow: Some(vec!["PATH".into()]),
            ..RawSandbox::default()
        };
        assert_eq!(from_raw(&r).unwrap_err().0, "sandbox.env_allow");
    }

    #[test]
    fn principals() {
        assert_eq!(principal("u", "65534"), Ok(Principal::Id(65534)));
        assert_eq!(
            principal("u", "nobody"),
            Ok(Principal::Name("nobody".into()))
        );
        assert!(principal("u", "no body").is_err());
        assert!(principal("u", "").is_err());
    }
}
