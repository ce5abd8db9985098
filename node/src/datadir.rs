//! A node's data directory.
//!
//! Layout: `node.json` (the node's identity, written once at first start),
//! `raft/` (the RocksDB database) and `models/` (model files, see
//! [`crate::models::store`]). The identity is created atomically (write
//! to a temporary file, fsync, rename), so a crash during first start leaves
//! either no identity or a whole one. A directory with other content is
//! refused, so a mistyped `--data-dir` never adopts an unrelated folder.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

const IDENTITY_FILE: &str = "node.json";
const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    format: u32,
    node_id: u64,
}

/// An opened data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    node_id: u64,
    created: bool,
}

impl DataDir {
    /// Opens `root`, creating it and a new node identity when it is new or
    /// empty.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("cannot create data dir {}", root.display()))?;
        let id_path = root.join(IDENTITY_FILE);
        match std::fs::read(&id_path) {
            Ok(bytes) => {
                let id: Identity = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "{} is corrupted; restore it or start with an empty data dir",
                        id_path.display()
                    )
                })?;
                if id.format != FORMAT || id.node_id == 0 {
                    bail!("{} has an unsupported format or node id", id_path.display());
                }
                Ok(Self {
                    root: root.to_path_buf(),
                    node_id: id.node_id,
                    created: false,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let foreign = std::fs::read_dir(root)?
                    .flatten()
                    .any(|e| !e.file_name().to_string_lossy().starts_with(IDENTITY_FILE));
                if foreign {
                    bail!(
                        "{} is not empty and is not a Cell0 data dir (no {IDENTITY_FILE}); use an empty or new directory",
                        root.display()
                    );
                }
                let node_id = loop {
                    let id: u64 = rand::random();
                    if id != 0 {
                        break id;
                    }
                };
                write_atomically(
                    &id_path,
                    &serde_json::to_vec_pretty(&Identity {
                        format: FORMAT,
                        node_id,
                    })?,
                )?;
                Ok(Self {
                    root: root.to_path_buf(),
                    node_id,
                    created: true,
                })
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", id_path.display())),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Whether this start created the identity.
    pub fn created(&self) -> bool {
        self.created
    }

    /// The RocksDB directory.
    pub fn raft_dir(&self) -> PathBuf {
        self.root.join("raft")
    }

    /// The model files directory.
    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_foreign_dirs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = DataDir::open(dir.path()).unwrap();
        assert!(a.created());
        let b = DataDir::open(dir.path()).unwrap();
        assert_eq!(a.node_id(), b.node_id());
        assert!(!b.created());

        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("thesis.tex"), "x").unwrap();
        let err = DataDir::open(other.path()).unwrap_err().to_string();
        assert!(err.contains("not a Cell0 data dir"), "{err}");

        std::fs::write(dir.path().join(IDENTITY_FILE), "{garbage").unwrap();
        let err = DataDir::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupted"), "{err}");
    }
}
