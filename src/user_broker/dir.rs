//! The per-user broker's directory: where its socket, lock, pid and log
//! files live, and the checks that make it the user's alone.
//!
//! `$XDG_RUNTIME_DIR/mcp-broker` when the session has a runtime directory
//! (already private to the user), else `/tmp/mcp-broker-UID`. In `/tmp`
//! anyone may create that name first, so an existing directory is used only
//! when it is a real directory (not a symlink) owned by the user; its mode
//! is then narrowed to 0700.

use nix::unistd::getuid;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a directory owned by uid {uid} (it belongs to uid {owner}{kind}); \
         refusing to put the broker's socket there"
    )]
    NotOurs {
        path: String,
        uid: u32,
        owner: u32,
        kind: &'static str,
    },
}

/// The per-user directory for the calling user.
pub fn default_dir() -> Result<PathBuf, DirError> {
    Ok(match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() && Path::new(&d).is_absolute() => {
            PathBuf::from(d).join("mcp-broker")
        }
        _ => PathBuf::from(format!("/tmp/mcp-broker-{}", getuid().as_raw())),
    })
}

/// Creates `dir` with mode 0700 if missing; checks that it is a directory
/// owned by the caller and narrows its mode to 0700.
pub fn prepare(dir: &Path) -> Result<(), DirError> {
    let shown = || dir.display().to_string();
    let create = |source| DirError::Create {
        path: shown(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The parent is missing (a --socket path in a fresh place).
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(dir)
                .map_err(create)?
        }
        Err(e) => return Err(create(e)),
    }
    let uid = getuid().as_raw();
    let meta = std::fs::symlink_metadata(dir).map_err(create)?;
    if !meta.is_dir() || meta.uid() != uid {
        return Err(DirError::NotOurs {
            path: shown(),
            uid,
            owner: meta.uid(),
            kind: if meta.file_type().is_symlink() {
                ", and is a symlink"
            } else if !meta.is_dir() {
                ", and is not a directory"
            } else {
                ""
            },
        });
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(create)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_private_and_narrows_loose_modes() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/mcp-broker");
        prepare(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn refuses_symlinks_and_files() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = prepare(&link).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        let file = t.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = prepare(&file).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }
}
