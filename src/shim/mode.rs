//! `--mode` on a named pool: the shim sends it with its session (the
//! broker records it for the session's life), after checking that the
//! pool allows it, so a refusal reaches the host at `initialize` and says
//! which setting to change.

use crate::config::Mode;
use crate::proxy::backend::PoolInfo;

/// Whether a pool that allows sessions the modes `allowed` (its `mode` and
/// `modes`, as [`PoolInfo::modes`] lists them) can serve a host session
/// that asked for `want`.
pub fn mode_fits(want: Mode, allowed: &[Mode]) -> bool {
    allowed.contains(&want)
}

/// Why pool `pool` (described by `info`) cannot serve `--mode want`, and
/// what to change.
pub(super) fn refusal(pool: &str, want: Mode, info: &PoolInfo) -> String {
    let allowed: Vec<String> = info.modes.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "pool {pool:?} does not allow --mode {want} (it allows {}); add \"{want}\" to the \
         pool's `modes` setting in the broker's config, e.g. modes = [\"{}\", \"{want}\"] \
         (or use an on-demand pool: mcp-broker connect --mode {want} -- CMD ARGS...)",
        allowed.join(", "),
        info.mode,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_refusal_names_the_pool_the_mode_and_the_setting() {
        let info = PoolInfo {
            mode: Mode::Sticky,
            modes: vec![Mode::Sticky, Mode::Shared],
            era: crate::protocol::Era::Legacy,
            protocol_version: "2025-06-18".into(),
            result: json!({}),
        };
        assert!(mode_fits(Mode::Shared, &info.modes));
        assert!(!mode_fits(Mode::Exclusive, &info.modes));
        let r = refusal("fs", Mode::Exclusive, &info);
        assert!(
            r.contains("pool \"fs\" does not allow --mode exclusive"),
            "{r}"
        );
        assert!(r.contains("it allows \"sticky\", \"shared\""), "{r}");
        assert!(r.contains("modes = [\"sticky\", \"exclusive\"]"), "{r}");
    }
}
