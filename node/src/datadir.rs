//! A node's data directory.
//!
//! Layout: `node.json` (the node's identity, written at first start),
//! `raft/` (the RocksDB database) and `models/` (model files, see
//! [`crate::models::store`]). The identity is created atomically (write
//! to a temporary file, fsync, rename), so a crash during first start leaves
//! either no identity or a whole one. A directory with other content is
//! refused, so a mistyped `--data-dir` never adopts an unrelated folder.
//!
//! A node that lost its Raft store but kept its identity would come back as
//! the same member with no vote and no log: it could vote twice in a term or
//! help elect a leader that lacks acknowledged writes. So the identity
//! records (`raft_created`) that the store was created, and a start that
//! finds the record but not the store is refused with the way to recover.
//! The store is created here, before the record and before Raft ever runs,
//! so a crash between the two leaves a store nothing has used, which the next
//! start simply adopts. Identities written before the record existed take the
//! store's presence as the record.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

const IDENTITY_FILE: &str = "node.json";
const FORMAT: u32 = 1;
/// The Raft store's directory.
const RAFT_DIR: &str = "raft";
/// A file RocksDB writes when it creates a database and keeps for its life.
const RAFT_STORE_MARKER: &str = "CURRENT";

#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    format: u32,
    node_id: u64,
    /// The Raft store was created for this identity: from now on its absence
    /// means the node lost its Raft state. Absent (false) in identities
    /// written by earlier versions.
    #[serde(default)]
    raft_created: bool,
}

/// An opened data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    node_id: u64,
    created: bool,
}

impl DataDir {
    /// Opens `root`, creating it, a new node identity and its Raft store when
    /// it is new or empty. Refuses a directory whose identity records a Raft
    /// store that is gone.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("cannot create data dir {}", root.display()))?;
        let id_path = root.join(IDENTITY_FILE);
        let (mut id, created) = match std::fs::read(&id_path) {
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
                (id, false)
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
                let id = Identity {
                    format: FORMAT,
                    node_id,
                    raft_created: false,
                };
                write_atomically(&id_path, &serde_json::to_vec_pretty(&id)?)?;
                (id, true)
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", id_path.display())),
        };
        let raft = root.join(RAFT_DIR);
        let has_store = raft.join(RAFT_STORE_MARKER).is_file();
        if id.raft_created && !has_store {
            bail!("{}", amnesia_message(root, &raft, id.node_id));
        }
        if !id.raft_created {
            if !has_store {
                // Nothing of Raft ever ran on this identity (it runs only on
                // a store recorded below), so a new store loses nothing.
                cell0_storage::RocksEngine::open(&raft, id.node_id)
                    .with_context(|| format!("cannot create the Raft store in {}", raft.display()))?;
            }
            id.raft_created = true;
            write_atomically(&id_path, &serde_json::to_vec_pretty(&id)?)?;
        }
        restrict(root, &id_path, &raft)?;
        Ok(Self {
            root: root.to_path_buf(),
            node_id: id.node_id,
            created,
        })
    }

    /// The agent runtime's directory (working directories and journal).
    pub fn agents_dir(&self) -> PathBuf {
        self.root.join("agents")
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
        self.root.join(RAFT_DIR)
    }

    /// The model files directory.
    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    /// This node's libp2p key (made on first use).
    pub fn gossip_key_file(&self) -> PathBuf {
        self.root.join("gossip.key")
    }

    /// The audit log's default file.
    pub fn audit_file(&self) -> PathBuf {
        self.root.join("audit").join("audit.log")
    }
}

/// Why a node whose Raft store is gone does not start, and how to recover.
fn amnesia_message(root: &Path, raft: &Path, node_id: u64) -> String {
    format!(
        "this node (id {node_id:016x}) lost its Raft state: {raft} is missing or empty, but {identity} records that \
         the node had a Raft store. Starting it would bring the same cluster member back with no vote and no log, \
         which can elect two leaders or lose acknowledged writes, so it does not start.\n\
         If {raft} was moved or deleted by mistake, put it back. Otherwise, to rejoin as a new member: \
         (1) remove node {node_id:016x} from the cluster through a healthy member: \
         `cell0 remove {node_id:016x} --endpoint MEMBER:7100` (the Cluster.Remove API, node_id {node_id}); \
         (2) move {root} aside (its models/ can be deleted: the node fetches model files again) and start the node \
         on an empty data dir with --join pointing at a member.",
        raft = raft.display(),
        identity = root.join(IDENTITY_FILE).display(),
        root = root.display(),
    )
}

/// Permissions: the data dir may be traversed by others (agent processes
/// run as an unprivileged user reach their working directories under
/// `agents/`) but not listed; the identity, the Raft store and the model
/// files are the node's alone.
fn restrict(root: &Path, identity: &Path, raft: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let models = root.join("models");
    std::fs::create_dir_all(&models)?;
    for (path, mode) in [
        (root, 0o711),
        (identity, 0o600),
        (raft, 0o700),
        (models.as_path(), 0o700),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the permissions of {}", path.display()))?;
    }
    Ok(())
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

    fn identity(dir: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join(IDENTITY_FILE)).unwrap()).unwrap()
    }

    #[test]
    fn identity_is_created_once_and_foreign_dirs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = DataDir::open(dir.path()).unwrap();
        assert!(a.created());
        assert!(
            a.raft_dir().join(RAFT_STORE_MARKER).is_file(),
            "the Raft store is created"
        );
        assert_eq!(identity(dir.path())["raft_created"], true);
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

    #[test]
    fn a_lost_raft_store_is_refused_with_the_way_to_recover() {
        let dir = tempfile::tempdir().unwrap();
        let id = DataDir::open(dir.path()).unwrap().node_id();
        std::fs::remove_dir_all(dir.path().join(RAFT_DIR)).unwrap();
        for _ in 0..2 {
            let err = DataDir::open(dir.path()).unwrap_err().to_string();
            assert!(err.contains("lost its Raft state"), "{err}");
            assert!(err.contains("Cluster.Remove"), "{err}");
            assert!(err.contains(&id.to_string()), "{err}");
            assert!(
                !dir.path().join(RAFT_DIR).join(RAFT_STORE_MARKER).exists(),
                "nothing was recreated"
            );
            // An empty raft/ is no better than a missing one.
            std::fs::create_dir_all(dir.path().join(RAFT_DIR)).unwrap();
        }
    }

    #[test]
    fn a_first_start_that_crashed_before_its_raft_store_existed_starts_again() {
        // The identity of an interrupted first start (or of an earlier
        // version, which did not record the store) and no store.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(IDENTITY_FILE), r#"{"format": 1, "node_id": 42}"#).unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        assert_eq!((d.node_id(), d.created()), (42, false));
        assert!(d.raft_dir().join(RAFT_STORE_MARKER).is_file());
        assert_eq!(identity(dir.path())["raft_created"], true);
        // From now on the store is recorded: losing it is refused.
        std::fs::remove_dir_all(d.raft_dir()).unwrap();
        assert!(DataDir::open(dir.path()).is_err());
    }

    #[test]
    fn a_data_dir_of_an_earlier_version_keeps_opening() {
        let dir = tempfile::tempdir().unwrap();
        drop(cell0_storage::RocksEngine::open(&dir.path().join(RAFT_DIR), 7).unwrap());
        std::fs::write(dir.path().join(IDENTITY_FILE), r#"{"format": 1, "node_id": 7}"#).unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        assert_eq!(d.node_id(), 7);
        assert_eq!(
            identity(dir.path())["raft_created"],
            true,
            "the store's presence is recorded"
        );
        DataDir::open(dir.path()).unwrap();
    }
}
