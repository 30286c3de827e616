//! The fixture's command line: the handshake era it speaks and the faults
//! it injects (see the binary's own doc).

/// Which handshake(s) the fixture answers.
#[derive(Clone, Copy, PartialEq, Debug, Default)]
pub enum Era {
    #[default]
    Legacy,
    Stateless,
    Both,
}

/// Command-line options.
#[derive(Debug, Default)]
pub struct Opts {
    pub era: Era,
    pub fail_start: bool,
    pub init_delay_ms: u64,
    pub list_delay_ms: u64,
    pub garbage_at_start: bool,
    pub ignore_sigterm: bool,
    pub exit_after: Option<u64>,
    /// Leave every request before `initialize` unanswered (a server that
    /// ignores the `server/discover` probe).
    pub silent_before_init: bool,
}

/// Parses `std::env::args`.
pub fn parse_args() -> Result<Opts, String> {
    let mut opts = Opts::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next());
        let mut value = || value().ok_or_else(|| format!("{flag} needs a value"));
        let mut num = || value()?.parse().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--era" => {
                opts.era = match value()?.as_str() {
                    "legacy" => Era::Legacy,
                    "stateless" => Era::Stateless,
                    "both" => Era::Both,
                    other => return Err(format!("--era: unknown era {other:?}")),
                }
            }
            "--fail-start" => opts.fail_start = true,
            "--garbage-at-start" => opts.garbage_at_start = true,
            "--ignore-sigterm" => opts.ignore_sigterm = true,
            "--init-delay-ms" => opts.init_delay_ms = num()?,
            "--list-delay-ms" => opts.list_delay_ms = num()?,
            "--exit-after" => opts.exit_after = Some(num()?),
            "--silent-before-init" => opts.silent_before_init = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}
