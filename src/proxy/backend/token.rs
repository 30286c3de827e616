//! A ServiceAccount token file that the kubelet rotates: read again at
//! most every [`TOKEN_REREAD`], so a rotated token is picked up without a
//! file read per request.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A ServiceAccount token file (kubelet rotates it), re-read at most every
/// [`TOKEN_REREAD`].
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(Instant, String)>>,
}

/// How long a read token is reused before the file is read again.
const TOKEN_REREAD: Duration = Duration::from_secs(30);

impl TokenFile {
    /// A token read from `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: Mutex::new(None),
        }
    }

    /// The current token; `None` when the file cannot be read (the broker
    /// then sees an unauthenticated caller and its policy decides).
    pub fn get(&self) -> Option<String> {
        let mut c = self.cached.lock().expect("lock");
        if let Some((at, t)) = c.as_ref() {
            if at.elapsed() < TOKEN_REREAD {
                return Some(t.clone());
            }
        }
        match std::fs::read_to_string(&self.path) {
            Ok(t) if !t.trim().is_empty() => {
                let t = t.trim().to_string();
                *c = Some((Instant::now(), t.clone()));
                Some(t)
            }
            _ => {
                tracing::warn!(path = %self.path.display(), "cannot read the ServiceAccount token");
                None
            }
        }
    }
}
