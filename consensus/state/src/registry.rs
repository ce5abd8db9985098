//! The replicated model registry: which model versions exist, what files
//! they are made of, and which nodes hold every verified byte of them.
//!
//! Table (in the state column family): `models`, key `name \0 version (u32
//! big-endian)` -> [`ModelEntry`]. Only manifests and holder sets live in
//! Raft; the bytes live content-addressed in each node's data dir and move
//! between nodes over the internal port.
//!
//! Everything here is deterministic and validated identically on every
//! replica: a manifest that breaks a limit is refused before it is proposed
//! and again when applied.

use std::collections::BTreeSet;

use crate::codec::{decode_row, encode_row};
use crate::txn::Txn;
use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::error::{Result, StateError};

const MODELS_TABLE: &str = "models";

/// Longest model name, in bytes.
pub const MAX_MODEL_NAME_BYTES: usize = 64;
/// Longest architecture name, in bytes.
pub const MAX_ARCHITECTURE_BYTES: usize = 64;
/// Most files in one model.
pub const MAX_MODEL_FILES: usize = 64;
/// Longest file path in a manifest, in bytes.
pub const MAX_MODEL_PATH_BYTES: usize = 256;
/// Largest total size of one model version (16 GiB).
pub const MAX_MODEL_BYTES: u64 = 16 << 30;
/// Most model versions in the registry.
pub const MAX_MODEL_VERSIONS: usize = 256;

/// One file of a model: where it goes in the model directory and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFile {
    /// Relative path inside the model directory, `/`-separated, e.g.
    /// `1_Pooling/config.json`.
    pub path: String,
    /// sha256 of the content, 64 lowercase hex digits. It is also the blob's name.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// A model version as recorded in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// Name clients use, `[a-z0-9._-]`, 1..=[`MAX_MODEL_NAME_BYTES`] bytes.
    pub name: String,
    /// Version, at least 1.
    pub version: u32,
    /// What the engine loads it as, e.g. `all-minilm-l6-v2`.
    pub architecture: String,
    /// The files, sorted by path.
    pub files: Vec<ModelFile>,
}

impl ModelManifest {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Checks names, counts and sizes; the error names the field.
    pub fn validate(&self) -> Result<()> {
        check_name("name", &self.name)?;
        if self.version == 0 {
            return Err(StateError::invalid("version", "must be at least 1"));
        }
        if self.architecture.is_empty() || self.architecture.len() > MAX_ARCHITECTURE_BYTES {
            return Err(StateError::invalid(
                "architecture",
                format!("must be 1..={MAX_ARCHITECTURE_BYTES} bytes"),
            ));
        }
        if self.files.is_empty() || self.files.len() > MAX_MODEL_FILES {
            return Err(StateError::invalid(
                "files",
                format!("must hold 1..={MAX_MODEL_FILES} files, got {}", self.files.len()),
            ));
        }
        let mut total = 0u64;
        for (i, f) in self.files.iter().enumerate() {
            check_path(&format!("files[{i}].path"), &f.path)?;
            if !is_sha256_hex(&f.sha256) {
                return Err(StateError::invalid(
                    &format!("files[{i}].sha256"),
                    "must be 64 lowercase hex digits",
                ));
            }
            total = total.saturating_add(f.size);
            if i > 0 && self.files[i - 1].path >= f.path {
                return Err(StateError::invalid(
                    &format!("files[{i}].path"),
                    "paths must be unique and sorted",
                ));
            }
        }
        if total > MAX_MODEL_BYTES {
            return Err(StateError::invalid(
                "files",
                format!("total {total} bytes; the limit is {MAX_MODEL_BYTES}"),
            ));
        }
        Ok(())
    }
}

/// Whether `s` is a sha256 digest in lowercase hex.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks a model name; the error names `field`.
pub fn check_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_MODEL_NAME_BYTES {
        return Err(StateError::invalid(
            field,
            format!("must be 1..={MAX_MODEL_NAME_BYTES} bytes"),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(StateError::invalid(
            field,
            format!("{name:?} may only hold a-z, 0-9, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

/// Paths are joined to a node's model directory, so they must stay inside it.
fn check_path(field: &str, path: &str) -> Result<()> {
    if path.is_empty() || path.len() > MAX_MODEL_PATH_BYTES {
        return Err(StateError::invalid(
            field,
            format!("must be 1..={MAX_MODEL_PATH_BYTES} bytes"),
        ));
    }
    let ok = !path.starts_with('/')
        && !path.contains('\\')
        && !path.chars().any(char::is_control)
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if !ok {
        return Err(StateError::invalid(
            field,
            format!("{path:?} must be a relative path without '.', '..' or empty parts"),
        ));
    }
    Ok(())
}

/// A registered model version and the nodes holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// What the version is made of.
    pub manifest: ModelManifest,
    /// Nodes that reported every file present and verified.
    pub holders: BTreeSet<NodeId>,
}

crate::row_v1!(ModelEntry, "model entry");

/// A registry change, carried in [`crate::Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelCommand {
    /// Registers a version whose files `holder` already holds.
    Add {
        /// The version.
        manifest: ModelManifest,
        /// The node the files were uploaded to.
        holder: NodeId,
    },
    /// Unregisters a version; nodes then delete its files.
    Remove {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
    },
    /// `node` now holds every file of the version, verified.
    Held {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// The holder.
        node: NodeId,
    },
}

impl ModelCommand {
    /// The command carrying this registry change.
    pub fn into_command(self) -> crate::Command {
        crate::Command::Model(self)
    }

    /// What the registry did, from the response to a registry command.
    pub fn outcome(response: crate::Response) -> Result<ModelOutcome> {
        match response {
            crate::Response::Model(outcome) => Ok(outcome),
            other => Err(StateError::UnexpectedResponse {
                expected: "a registry command",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Checks the command's fields; the error names the field.
    pub fn validate(&self) -> Result<()> {
        match self {
            ModelCommand::Add { manifest, .. } => manifest.validate(),
            ModelCommand::Remove { name, version } | ModelCommand::Held { name, version, .. } => {
                check_name("name", name)?;
                if *version == 0 {
                    return Err(StateError::invalid("version", "must be at least 1"));
                }
                Ok(())
            }
        }
    }

    /// Approximate encoded size, for batching decisions.
    pub fn approx_size(&self) -> usize {
        match self {
            ModelCommand::Add { manifest, .. } => {
                manifest.name.len() + manifest.architecture.len() + manifest.files.len() * 128 + 32
            }
            ModelCommand::Remove { name, .. } | ModelCommand::Held { name, .. } => name.len() + 24,
        }
    }
}

/// What a [`ModelCommand`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelOutcome {
    /// The version was registered.
    Added,
    /// The same manifest was already registered (the holder was recorded).
    Unchanged,
    /// Another manifest holds this name and version; nothing changed.
    Conflict,
    /// The version was unregistered.
    Removed,
    /// The holder was recorded.
    Held,
    /// No such version; nothing changed.
    NotFound,
    /// The registry already holds [`MAX_MODEL_VERSIONS`] versions.
    Full,
}

fn key(name: &str, version: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 5);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn decode_entry(b: &[u8]) -> Result<ModelEntry> {
    decode_row(b)
}

fn put_entry(txn: &mut dyn Txn, entry: &ModelEntry) -> Result<()> {
    txn.put(
        MODELS_TABLE,
        &key(&entry.manifest.name, entry.manifest.version),
        encode_row(entry)?,
    )?;
    Ok(())
}

/// The entry for `name` `version`, if registered.
pub fn get(txn: &dyn Txn, name: &str, version: u32) -> Result<Option<ModelEntry>> {
    txn.get(MODELS_TABLE, &key(name, version))?
        .map(|b| decode_entry(&b))
        .transpose()
}

/// Every registered version, ordered by name then version.
pub fn list(txn: &dyn Txn) -> Result<Vec<ModelEntry>> {
    txn.scan(MODELS_TABLE, b"", None, MAX_MODEL_VERSIONS + 1)?
        .into_iter()
        .map(|(_, v)| decode_entry(&v))
        .collect()
}

/// Applies a validated registry command.
pub(crate) fn apply(txn: &mut dyn Txn, cmd: &ModelCommand) -> Result<ModelOutcome> {
    match cmd {
        ModelCommand::Add { manifest, holder } => {
            if let Some(mut entry) = get(txn, &manifest.name, manifest.version)? {
                if entry.manifest != *manifest {
                    return Ok(ModelOutcome::Conflict);
                }
                if entry.holders.insert(*holder) {
                    put_entry(txn, &entry)?;
                }
                return Ok(ModelOutcome::Unchanged);
            }
            if txn.scan(MODELS_TABLE, b"", None, MAX_MODEL_VERSIONS)?.len() >= MAX_MODEL_VERSIONS {
                return Ok(ModelOutcome::Full);
            }
            put_entry(
                txn,
                &ModelEntry {
                    manifest: manifest.clone(),
                    holders: BTreeSet::from([*holder]),
                },
            )?;
            Ok(ModelOutcome::Added)
        }
        ModelCommand::Remove { name, version } => {
            if get(txn, name, *version)?.is_none() {
                return Ok(ModelOutcome::NotFound);
            }
            txn.delete(MODELS_TABLE, &key(name, *version))?;
            Ok(ModelOutcome::Removed)
        }
        ModelCommand::Held { name, version, node } => {
            let Some(mut entry) = get(txn, name, *version)? else {
                return Ok(ModelOutcome::NotFound);
            };
            if entry.holders.insert(*node) {
                put_entry(txn, &entry)?;
            }
            Ok(ModelOutcome::Held)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemTxn;

    fn manifest(name: &str, version: u32, digest: char) -> ModelManifest {
        ModelManifest {
            name: name.into(),
            version,
            architecture: "all-minilm-l6-v2".into(),
            files: vec![
                ModelFile {
                    path: "config.json".into(),
                    sha256: digest.to_string().repeat(64),
                    size: 10,
                },
                ModelFile {
                    path: "model.safetensors".into(),
                    sha256: "b".repeat(64),
                    size: 20,
                },
            ],
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut m = manifest("minilm", 1, 'a');
        m.validate().unwrap();
        assert_eq!(m.total_bytes(), 30);
        let field = |m: &ModelManifest| match m.validate().unwrap_err() {
            StateError::InvalidArgument { field, .. } => field,
            e => panic!("{e}"),
        };
        m.name = "MiniLM".into();
        assert_eq!(field(&m), "name");
        m.name = "minilm".into();
        m.version = 0;
        assert_eq!(field(&m), "version");
        m.version = 1;
        for bad in ["../etc/passwd", "/abs", "a//b", "a/./b", ""] {
            m.files[1].path = bad.into();
            assert_eq!(field(&m), "files[1].path", "{bad}");
        }
        m.files[1].path = "config.json".into();
        assert_eq!(field(&m), "files[1].path", "duplicate path");
        m.files[1].path = "z.bin".into();
        m.files[1].sha256 = "B".repeat(64);
        assert_eq!(field(&m), "files[1].sha256");
        m.files[1].sha256 = "b".repeat(64);
        m.files[1].size = MAX_MODEL_BYTES;
        assert_eq!(field(&m), "files");
    }

    #[test]
    fn add_is_idempotent_conflicts_are_refused_and_holders_accumulate() {
        let mut txn = MemTxn::new();
        let m1 = manifest("minilm", 1, 'a');
        let add = |m: &ModelManifest, holder| ModelCommand::Add {
            manifest: m.clone(),
            holder,
        };
        assert_eq!(apply(&mut txn, &add(&m1, 1)).unwrap(), ModelOutcome::Added);
        assert_eq!(apply(&mut txn, &add(&m1, 2)).unwrap(), ModelOutcome::Unchanged);
        assert_eq!(
            apply(&mut txn, &add(&manifest("minilm", 1, 'c'), 1)).unwrap(),
            ModelOutcome::Conflict
        );
        let held = ModelCommand::Held {
            name: "minilm".into(),
            version: 1,
            node: 3,
        };
        assert_eq!(apply(&mut txn, &held).unwrap(), ModelOutcome::Held);
        assert_eq!(
            apply(&mut txn, &add(&manifest("minilm", 2, 'a'), 1)).unwrap(),
            ModelOutcome::Added
        );
        let all = list(&txn).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].manifest, m1, "ordered by name then version");
        assert_eq!(all[0].holders, BTreeSet::from([1, 2, 3]));
        let remove = ModelCommand::Remove {
            name: "minilm".into(),
            version: 1,
        };
        assert_eq!(apply(&mut txn, &remove).unwrap(), ModelOutcome::Removed);
        assert_eq!(apply(&mut txn, &remove).unwrap(), ModelOutcome::NotFound);
        assert_eq!(apply(&mut txn, &held).unwrap(), ModelOutcome::NotFound);
        assert_eq!(get(&txn, "minilm", 1).unwrap(), None);
        assert!(get(&txn, "minilm", 2).unwrap().is_some());
    }

    #[test]
    fn the_registry_is_bounded() {
        let mut txn = MemTxn::new();
        for v in 1..=MAX_MODEL_VERSIONS as u32 {
            let cmd = ModelCommand::Add {
                manifest: manifest("m", v, 'a'),
                holder: 1,
            };
            assert_eq!(apply(&mut txn, &cmd).unwrap(), ModelOutcome::Added);
        }
        let cmd = ModelCommand::Add {
            manifest: manifest("m", 10_000, 'a'),
            holder: 1,
        };
        assert_eq!(apply(&mut txn, &cmd).unwrap(), ModelOutcome::Full);
    }
}
