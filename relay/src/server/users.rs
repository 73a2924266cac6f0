//! The SMTP AUTH user table, re-read when its file (a mounted Secret) changes.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use mailrelay_smtp::auth::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read users file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("users file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: mailrelay_smtp::auth::CredentialsError,
    },
}

/// Modification time and size: what tells us the file changed.
type Stamp = Option<(SystemTime, u64)>;

#[derive(Debug)]
pub struct UsersSource {
    path: PathBuf,
    current: RwLock<(Arc<Credentials>, Stamp)>,
}

fn stamp(path: &PathBuf) -> Stamp {
    // metadata() follows symlinks, which is how Kubernetes swaps Secret files.
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}

impl UsersSource {
    pub fn load(path: PathBuf) -> Result<Arc<Self>, UsersError> {
        let creds = Self::read(&path)?;
        let st = stamp(&path);
        Ok(Arc::new(UsersSource {
            path,
            current: RwLock::new((Arc::new(creds), st)),
        }))
    }

    fn read(path: &PathBuf) -> Result<Credentials, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
            path: path.clone(),
            source,
        })?;
        Credentials::parse(&text).map_err(|source| UsersError::Parse {
            path: path.clone(),
            source,
        })
    }

    pub fn current(&self) -> Arc<Credentials> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()).0)
    }

    /// Re-reads the file when its timestamp or size changed; a broken file keeps the
    /// previous table in force.
    pub fn reload_if_changed(&self) -> Result<bool, UsersError> {
        let st = stamp(&self.path);
        if st == self.current.read().unwrap_or_else(|p| p.into_inner()).1 {
            return Ok(false);
        }
        let creds = Self::read(&self.path)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(creds), st);
        Ok(true)
    }

    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match me.reload_if_changed() {
                    Ok(true) => {
                        tracing::info!(path = %me.path.display(), "reloaded SMTP AUTH users")
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "keeping previous SMTP AUTH users"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_on_change_and_keeps_old_table_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users");
        std::fs::write(&p, "alice:one\n").unwrap();
        let u = UsersSource::load(p.clone()).unwrap();
        assert!(u.current().verify("alice", "one"));
        assert!(!u.reload_if_changed().unwrap());
        std::fs::write(&p, "alice:two-longer\n").unwrap();
        assert!(u.reload_if_changed().unwrap());
        assert!(u.current().verify("alice", "two-longer"));
        std::fs::write(&p, "broken line without colon\n").unwrap();
        assert!(u.reload_if_changed().is_err());
        assert!(u.current().verify("alice", "two-longer"));
    }
}
