//! The published volumes on disk, so a restarted broker serves every pod
//! socket again (`<state_dir>/volumes.json`).
//!
//! Invariant: the file is replaced atomically (written beside, fsynced,
//! renamed, directory fsynced), so a crash leaves the old list or the new
//! one, never half of one. Reads are bounded; a file that does not parse is
//! an error naming it, never an empty list that would orphan live sockets.

use super::volume::Volume;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "volumes.json";
/// Largest state file read (a node's volumes take a few hundred KiB).
const MAX_STATE_BYTES: u64 = 16 << 20;
/// The file format this broker writes and reads.
const VERSION: u32 = 1;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Bad { path: String, msg: String },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    volumes: Vec<Volume>,
}

/// The state file of one plugin.
pub struct State {
    path: PathBuf,
}

impl State {
    /// The state kept in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<State, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(State {
            path: dir.join(STATE_FILE),
        })
    }

    fn io(&self, source: std::io::Error) -> StateError {
        StateError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The volumes recorded; none when there is no file yet.
    pub fn load(&self) -> Result<Vec<Volume>, StateError> {
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut text = Vec::new();
        f.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| self.io(e))?;
        let bad = |msg: String| StateError::Bad {
            path: self.path.display().to_string(),
            msg,
        };
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(bad(format!("larger than {MAX_STATE_BYTES} bytes")));
        }
        let file: File = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if file.version != VERSION {
            return Err(bad(format!(
                "format version {} (this broker reads {VERSION})",
                file.version
            )));
        }
        Ok(file.volumes)
    }

    /// Replaces the record with `volumes`, atomically.
    pub fn save(&self, volumes: Vec<Volume>) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(&File {
            version: VERSION,
            volumes,
        })
        .expect("volumes serialize");
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.io(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(id: &str) -> Volume {
        Volume {
            volume_id: id.into(),
            target_path: format!("/t/{id}").into(),
            readonly: false,
            access_mode: 1,
            namespace: "ns".into(),
            service_account: "sa".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            pools: Some(["time".to_string()].into()),
        }
    }

    #[test]
    fn saves_and_loads_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("state")).unwrap();
        assert!(s.load().unwrap().is_empty());
        s.save(vec![volume("a"), volume("b")]).unwrap();
        assert_eq!(s.load().unwrap(), vec![volume("a"), volume("b")]);
        s.save(vec![volume("b")]).unwrap();
        assert_eq!(s.load().unwrap(), vec![volume("b")]);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [STATE_FILE], "no temporary file left");
    }

    #[test]
    fn a_bad_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{\"version\":1,").unwrap();
        assert!(s.load().unwrap_err().to_string().contains(STATE_FILE));
        std::fs::write(
            dir.path().join(STATE_FILE),
            b"{\"version\":9,\"volumes\":[]}",
        )
        .unwrap();
        assert!(s.load().unwrap_err().to_string().contains("version 9"));
    }
}
