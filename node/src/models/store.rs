//! Content-addressed model files in a node's data dir.
//!
//! Layout under `<data_dir>/models/`:
//! - `blobs/<sha256>`: complete files, each verified against its name when
//!   it was committed (and again by the manager before a model is loaded);
//! - `partial/<sha256>`: a fetch in progress, resumed from its length;
//!   `partial/<sha256>.<n>.upload`: an upload in progress;
//! - `installed/<name>/<version>/<path>`: hard links to blobs in the layout
//!   the engine loads, rebuilt from the manifest on every install.
//!
//! Invariant: a file appears under `blobs/` only through a rename after its
//! bytes were synced and hashed to its name, so a crash never leaves a
//! half-written or unverified blob under a final name.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cell0_consensus::ModelManifest;
use sha2::{Digest, Sha256};

use super::ModelError;

/// The model files of one node.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    next_upload: AtomicU64,
}

/// An open partial file that accepts bytes in order.
#[derive(Debug)]
pub struct PartialBlob {
    path: PathBuf,
    file: File,
    hasher: Option<Sha256>,
    written: u64,
}

impl PartialBlob {
    /// Appends `data`.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ModelError> {
        self.file.write_all(data).map_err(|e| io_err(&self.path, e))?;
        if let Some(h) = &mut self.hasher {
            h.update(data);
        }
        self.written += data.len() as u64;
        Ok(())
    }

    /// Bytes in the file so far.
    pub fn len(&self) -> u64 {
        self.written
    }
}

fn io_err(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io(format!("{}: {e}", path.display()))
}

/// The sha256 of `path`'s content, in lowercase hex.
fn sha256_file(path: &Path) -> Result<String, ModelError> {
    Ok(cell0_inference::model::sha256_file(path)?)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sync_dir(dir: &Path) -> Result<(), ModelError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

impl BlobStore {
    /// Opens (creating) the store under `root`. Leftover uploads of an
    /// earlier run are removed; partial fetches are kept to be resumed.
    pub fn open(root: &Path) -> Result<Self, ModelError> {
        for dir in ["blobs", "partial", "installed"] {
            fs::create_dir_all(root.join(dir)).map_err(|e| io_err(&root.join(dir), e))?;
        }
        let partial = root.join("partial");
        for entry in fs::read_dir(&partial).map_err(|e| io_err(&partial, e))?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".upload") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            next_upload: AtomicU64::new(0),
        })
    }

    /// Where the blob `sha256` lives once complete.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }

    /// Whether a complete blob `sha256` is stored.
    pub fn has(&self, sha256: &str) -> bool {
        self.blob_path(sha256).is_file()
    }

    /// Hashes the stored blob and checks it against its name and `size`.
    /// A blob that fails is deleted, so it is fetched again and never loaded.
    pub fn verify(&self, sha256: &str, size: u64) -> Result<bool, ModelError> {
        let path = self.blob_path(sha256);
        let meta = fs::metadata(&path).map_err(|e| io_err(&path, e))?;
        let ok = meta.len() == size && sha256_file(&path)? == sha256;
        if !ok {
            fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
        }
        Ok(ok)
    }

    /// Opens the resumable partial file of a fetch of `sha256` and returns it
    /// positioned at its end (which is where the fetch resumes). A partial
    /// longer than `size` is discarded.
    pub fn resume_fetch(&self, sha256: &str, size: u64) -> Result<PartialBlob, ModelError> {
        let path = self.root.join("partial").join(sha256);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        let mut len = file.metadata().map_err(|e| io_err(&path, e))?.len();
        if len > size {
            file.set_len(0).map_err(|e| io_err(&path, e))?;
            len = 0;
            file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
        }
        Ok(PartialBlob {
            path,
            file,
            hasher: None,
            written: len,
        })
    }

    /// Deletes the partial file of a fetch of `sha256`, so it starts over.
    pub fn discard_fetch(&self, sha256: &str) -> Result<(), ModelError> {
        let path = self.root.join("partial").join(sha256);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&path, e)),
            _ => Ok(()),
        }
    }

    /// Starts an upload; it hashes as it goes and never collides with a
    /// fetch or another upload of the same blob.
    pub fn start_upload(&self, sha256: &str) -> Result<PartialBlob, ModelError> {
        let n = self.next_upload.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join("partial").join(format!("{sha256}.{n}.upload"));
        let file = File::create(&path).map_err(|e| io_err(&path, e))?;
        Ok(PartialBlob {
            path,
            file,
            hasher: Some(Sha256::new()),
            written: 0,
        })
    }

    /// Syncs `partial`, checks that it is `size` bytes hashing to `sha256`,
    /// and moves it under its final name. On a mismatch the partial file is
    /// deleted and [`ModelError::Corrupt`] returned.
    pub fn commit(&self, partial: PartialBlob, sha256: &str, size: u64) -> Result<(), ModelError> {
        let PartialBlob {
            path,
            file,
            hasher,
            written,
        } = partial;
        file.sync_all().map_err(|e| io_err(&path, e))?;
        drop(file);
        let actual = match hasher {
            Some(h) => hex(&h.finalize()),
            None => sha256_file(&path)?,
        };
        if written != size || actual != sha256 {
            let _ = fs::remove_file(&path);
            return Err(ModelError::Corrupt {
                sha256: sha256.to_string(),
                detail: format!("got {written} bytes hashing to {actual}, expected {size} bytes"),
            });
        }
        let dest = self.blob_path(sha256);
        fs::rename(&path, &dest).map_err(|e| io_err(&dest, e))?;
        sync_dir(&self.root.join("blobs"))
    }

    /// Lays out `manifest`'s files (which must all be stored) as hard links
    /// in the directory the engine loads, and returns it.
    pub fn install(&self, manifest: &ModelManifest) -> Result<PathBuf, ModelError> {
        let dir = self.installed_dir(&manifest.name, manifest.version);
        // Rebuilt every time: a re-fetched blob is a new inode, and a link to
        // the old one would keep serving the bad bytes.
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        }
        for f in &manifest.files {
            let dest = dir.join(&f.path);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
            }
            let src = self.blob_path(&f.sha256);
            if fs::hard_link(&src, &dest).is_err() {
                fs::copy(&src, &dest).map_err(|e| io_err(&dest, e))?;
            }
        }
        Ok(dir)
    }

    fn installed_dir(&self, name: &str, version: u32) -> PathBuf {
        self.root.join("installed").join(name).join(version.to_string())
    }

    /// Removes the installed layout of a version (its blobs stay until
    /// [`BlobStore::retain`]).
    pub fn uninstall(&self, name: &str, version: u32) -> Result<(), ModelError> {
        let dir = self.installed_dir(name, version);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        }
        Ok(())
    }

    /// Deletes every blob and partial fetch whose digest `keep` rejects.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Result<usize, ModelError> {
        let mut removed = 0;
        for dir in ["blobs", "partial"] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let digest = name.split('.').next().unwrap_or_default();
                if !keep(digest) && !name.ends_with(".upload") {
                    fs::remove_file(entry.path()).map_err(|e| io_err(&entry.path(), e))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cell0_consensus::ModelFile;

    fn digest(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    #[test]
    fn uploads_are_verified_before_they_get_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"hello model".as_slice();
        let sha = digest(data);
        let mut up = store.start_upload(&sha).unwrap();
        up.write(&data[..5]).unwrap();
        up.write(&data[5..]).unwrap();
        store.commit(up, &sha, data.len() as u64).unwrap();
        assert!(store.has(&sha));
        assert!(store.verify(&sha, data.len() as u64).unwrap());

        let wrong = digest(b"other");
        let mut up = store.start_upload(&wrong).unwrap();
        up.write(data).unwrap();
        let err = store.commit(up, &wrong, data.len() as u64).unwrap_err();
        assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
        assert!(!store.has(&wrong));
    }

    #[test]
    fn a_corrupted_blob_fails_verification_and_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = vec![7u8; 3000];
        let sha = digest(&data);
        let mut up = store.start_upload(&sha).unwrap();
        up.write(&data).unwrap();
        store.commit(up, &sha, 3000).unwrap();
        let mut bad = data.clone();
        bad[1500] ^= 1;
        fs::write(store.blob_path(&sha), &bad).unwrap();
        assert!(!store.verify(&sha, 3000).unwrap());
        assert!(!store.has(&sha), "a bad blob is never kept");
    }

    #[test]
    fn fetches_resume_from_the_partial_length() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let sha = digest(&data);
        let mut p = store.resume_fetch(&sha, 10_000).unwrap();
        p.write(&data[..4000]).unwrap();
        drop(p);
        // Reopened (as after a crash or a lost peer): resumes at 4000.
        let mut p = store.resume_fetch(&sha, 10_000).unwrap();
        assert_eq!(p.len(), 4000);
        p.write(&data[4000..]).unwrap();
        store.commit(p, &sha, 10_000).unwrap();
        assert!(store.verify(&sha, 10_000).unwrap());
        // Kept partial uploads of a crashed run are cleaned at open.
        let up = store.start_upload(&sha).unwrap();
        drop(up);
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
        assert_eq!(store.retain(|_| false).unwrap(), 1);
        assert!(!store.has(&sha));
    }

    #[test]
    fn install_links_files_in_the_manifest_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut files = Vec::new();
        for (path, data) in [("1_Pooling/config.json", b"{}".as_slice()), ("vocab.txt", b"a\nb")] {
            let sha = digest(data);
            let mut up = store.start_upload(&sha).unwrap();
            up.write(data).unwrap();
            store.commit(up, &sha, data.len() as u64).unwrap();
            files.push(ModelFile {
                path: path.into(),
                sha256: sha,
                size: data.len() as u64,
            });
        }
        let manifest = ModelManifest {
            name: "m".into(),
            version: 2,
            architecture: "all-minilm-l6-v2".into(),
            files,
        };
        let installed = store.install(&manifest).unwrap();
        assert_eq!(fs::read(installed.join("1_Pooling/config.json")).unwrap(), b"{}");
        assert_eq!(store.install(&manifest).unwrap(), installed, "reinstall is idempotent");
        store.uninstall("m", 2).unwrap();
        assert!(!installed.exists());
    }
}
