//! A process's state and parent from `/proc/PID/stat`, parsed in one place.
//!
//! The command name (in parentheses) may itself contain spaces and `)`, so
//! the fields are read after the *last* `)`: state first, parent pid second.

/// What `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `Z` for a zombie, ...).
    pub state: char,
    /// The parent's pid.
    pub ppid: u32,
}

impl Stat {
    /// Whether it runs (exists and is not a zombie waiting to be reaped).
    pub fn live(&self) -> bool {
        self.state != 'Z'
    }
}

/// Parses a `stat` line.
pub fn parse(text: &str) -> Option<Stat> {
    let mut f = text.rsplit(')').next()?.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some(Stat { state, ppid })
}

/// Reads process `pid`'s stat; `None` once it is gone (reaped).
pub fn read(pid: u32) -> Option<Stat> {
    parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every pid in `/proc`.
pub fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_after_the_last_paren() {
        let s = parse("42 (a) b (c)) S 7 42 42 0 -1").unwrap();
        assert_eq!(
            s,
            Stat {
                state: 'S',
                ppid: 7
            }
        );
        assert!(!parse("9 (x) Z 1 9").unwrap().live());
        assert_eq!(parse("garbage"), None);
        let me = read(std::process::id()).expect("this process");
        assert!(me.live());
        assert_eq!(me.ppid, nix::unistd::getppid().as_raw() as u32);
    }
}
