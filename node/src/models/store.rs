//! Content-addressed model files in a node's data dir.
//!
//! Layout under `<data_dir>/models/`:
//! - `blobs/<sha256>`: complete files, each verified against its name when
//!   it was committed (and again by the manager before a model is loaded);
//! - `partial/<sha256>`: a fetch in progress, resumed from its length;
//!   `partial/<sha256>.<n>.upload`: an upload in progress, deleted when the
//!   upload ends without being committed;
//! - `installed/<name>/<version>/<path>`: hard links to blobs in the layout
//!   the engine loads, rebuilt from the manifest on every install.
//!
//! Invariants: a file appears under `blobs/` only through a rename after its
//! bytes were synced and hashed to its name, so a crash never leaves a
//! half-written or unverified blob under a final name. A blob is deleted only
//! because its bytes do not hash to its name, or by [`BlobStore::retain`],
//! which never deletes a pinned blob: an upload pins its blob before it looks
//! for it or renames it, and the pin lasts until the `Add` that uses the blob
//! was applied on this node ([`BlobStore::added`]) or the upload grace passed.
//!
//! Uploads are admitted against a quota on the bytes they may hold before a
//! registered version uses them, and against a free-space reserve on the
//! data dir's filesystem, so model files never fill the disk Raft writes to.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use cell0_consensus::ModelManifest;
use sha2::{Digest, Sha256};

use super::ModelError;
use crate::config::ModelsConfig;

/// The model files of one node.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    next_upload: AtomicU64,
    config: ModelsConfig,
    pins: Arc<Mutex<Pins>>,
    /// Whether the log already said that free space cannot be measured.
    space_warned: AtomicBool,
}

/// Blobs in use by uploads and adds, and the bytes uploads hold.
#[derive(Debug, Default)]
struct Pins {
    digests: BTreeMap<String, Pin>,
    /// Declared sizes of the uploads being received.
    receiving: u64,
}

#[derive(Debug)]
struct Pin {
    /// Upload streams and adds using the blob now.
    active: u32,
    /// Finished uploads of the blob whose `Add` was not applied here yet.
    waiting: u32,
    /// When the last of them finished.
    since: Instant,
    /// Bytes those uploads stored (0 when the node already held the blob);
    /// they count against the upload quota while the uploads wait.
    bytes: u64,
}

impl Pin {
    fn waits(&self, now: Instant, grace: Duration) -> bool {
        self.waiting > 0 && now.saturating_duration_since(self.since) < grace
    }

    fn holds(&self, now: Instant, grace: Duration) -> bool {
        self.active > 0 || self.waits(now, grace)
    }
}

fn lock(m: &Mutex<Pins>) -> MutexGuard<'_, Pins> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pins {
    fn pending_bytes(&self, now: Instant, grace: Duration) -> u64 {
        self.digests
            .values()
            .filter(|p| p.waits(now, grace))
            .map(|p| p.bytes)
            .sum()
    }

    /// Drops what no longer holds anything.
    fn prune(&mut self, now: Instant, grace: Duration) {
        self.digests.retain(|_, p| p.holds(now, grace));
    }
}

/// Keeps one blob from being deleted as garbage while an upload or an add
/// uses it. Dropping it ends that use; [`BlobPin::keep_for_add`] extends the
/// protection past it.
#[derive(Debug)]
pub struct BlobPin {
    pins: Arc<Mutex<Pins>>,
    sha256: String,
}

impl BlobPin {
    /// Keeps the blob after this pin drops, until an `Add` that uses it was
    /// applied on this node ([`BlobStore::added`]) or the upload grace
    /// passed. `stored` is the bytes the upload wrote (0 when the node
    /// already held the blob); they count against the upload quota meanwhile.
    pub fn keep_for_add(&self, stored: u64) {
        let mut pins = lock(&self.pins);
        if let Some(p) = pins.digests.get_mut(&self.sha256) {
            p.waiting = p.waiting.saturating_add(1);
            p.since = Instant::now();
            p.bytes = p.bytes.max(stored);
        }
    }
}

impl Drop for BlobPin {
    fn drop(&mut self) {
        let mut pins = lock(&self.pins);
        if let Some(p) = pins.digests.get_mut(&self.sha256) {
            p.active = p.active.saturating_sub(1);
            if p.active == 0 && p.waiting == 0 {
                pins.digests.remove(&self.sha256);
            }
        }
    }
}

/// Bytes of the upload quota held by one upload while it is received.
#[derive(Debug)]
pub struct Reservation {
    pins: Arc<Mutex<Pins>>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut pins = lock(&self.pins);
        pins.receiving = pins.receiving.saturating_sub(self.bytes);
    }
}

/// Why an upload (or a fetch) was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum UploadRefused {
    /// The upload quota is spent.
    #[error(
        "this node already holds {used} bytes of uploads in progress and of uploaded files no registered version \
         uses yet; {size} more would pass its limit of {quota} bytes (models.upload_quota_bytes). Add the uploaded \
         files with `cell0 model add`, or wait until unused uploads expire (models.upload_grace_secs)"
    )]
    Quota {
        /// Bytes held now.
        used: u64,
        /// Bytes asked for.
        size: u64,
        /// The quota.
        quota: u64,
    },
    /// The data dir's filesystem is too full.
    #[error(
        "writing {size} bytes would leave less than the {reserve} bytes kept free on the data dir's filesystem \
         (models.free_space_reserve_bytes) so that Raft can still write; {available} bytes are available. \
         Free some space on the node first"
    )]
    Space {
        /// Bytes to write (with the uploads already being received).
        size: u64,
        /// Bytes available on the filesystem.
        available: u64,
        /// The reserve.
        reserve: u64,
    },
}

/// What [`BlobStore::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The blob hashes to its name and has the expected size.
    Verified,
    /// The blob did not hash to its name and was deleted.
    Corrupt,
    /// The blob hashes to its name, so it is good and was kept, but it is not
    /// the size the caller expected: the caller's size is wrong.
    OtherSize {
        /// The blob's real size.
        held: u64,
    },
}

/// An open partial file that accepts bytes in order.
#[derive(Debug)]
pub struct PartialBlob {
    path: PathBuf,
    file: File,
    hasher: Option<Sha256>,
    written: u64,
    /// Set for uploads, whose file is deleted if it is dropped uncommitted
    /// (a fetch's file is kept to be resumed).
    upload: Option<Reservation>,
    done: bool,
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

impl Drop for PartialBlob {
    fn drop(&mut self) {
        if self.upload.is_some() && !self.done {
            let _ = fs::remove_file(&self.path);
        }
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

fn remove_if_present(path: &Path) -> Result<(), ModelError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path, e)),
        _ => Ok(()),
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `dir`
/// (statvfs: free blocks for non-root times the fragment size); `None` when
/// it cannot be read.
async fn available_bytes(dir: &Path) -> Option<u64> {
    let dir = dir.to_path_buf();
    let stat = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&dir))
        .await
        .ok()?
        .ok()?;
    stat.f_bavail.checked_mul(stat.f_frsize)
}

impl BlobStore {
    /// Opens (creating) the store under `root` with the default
    /// [`ModelsConfig`].
    #[cfg(test)]
    pub fn open(root: &Path) -> Result<Self, ModelError> {
        Self::open_with(root, ModelsConfig::default())
    }

    /// Opens (creating) the store under `root`, admitting uploads by
    /// `config`. Leftover uploads of an earlier run are removed; partial
    /// fetches are kept to be resumed.
    pub fn open_with(root: &Path, config: ModelsConfig) -> Result<Self, ModelError> {
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
            config,
            pins: Arc::new(Mutex::new(Pins::default())),
            space_warned: AtomicBool::new(false),
        })
    }

    /// The limits uploads are admitted by.
    pub fn config(&self) -> &ModelsConfig {
        &self.config
    }

    /// Where the blob `sha256` lives once complete.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }

    /// Whether a complete blob `sha256` is stored.
    pub fn has(&self, sha256: &str) -> bool {
        self.blob_path(sha256).is_file()
    }

    /// The size of the stored blob `sha256`, if there is one.
    pub fn len(&self, sha256: &str) -> Option<u64> {
        fs::metadata(self.blob_path(sha256))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Hashes the stored blob and checks it against its name and `size`.
    /// A blob that does not hash to its name is deleted, so it is fetched
    /// again and never loaded; one that does is kept whatever its size, since
    /// a size that disagrees with a good blob is the caller's error.
    pub fn verify(&self, sha256: &str, size: u64) -> Result<Verdict, ModelError> {
        let path = self.blob_path(sha256);
        if sha256_file(&path)? != sha256 {
            remove_if_present(&path)?;
            return Ok(Verdict::Corrupt);
        }
        let held = fs::metadata(&path).map_err(|e| io_err(&path, e))?.len();
        Ok(if held == size {
            Verdict::Verified
        } else {
            Verdict::OtherSize { held }
        })
    }

    /// Keeps blob `sha256` from being deleted as garbage while the returned
    /// pin lives. Take it before looking for the blob, so no cleanup pass
    /// can delete it between the look and its use.
    pub fn pin(&self, sha256: &str) -> BlobPin {
        let mut pins = lock(&self.pins);
        let pin = pins.digests.entry(sha256.to_string()).or_insert_with(|| Pin {
            active: 0,
            waiting: 0,
            since: Instant::now(),
            bytes: 0,
        });
        pin.active = pin.active.saturating_add(1);
        BlobPin {
            pins: self.pins.clone(),
            sha256: sha256.to_string(),
        }
    }

    /// Records that an `Add` using blob `sha256` was applied on this node:
    /// the registry keeps the blob from now on, so one finished upload of it
    /// stops waiting (and stops counting against the quota).
    pub fn added(&self, sha256: &str) {
        let mut pins = lock(&self.pins);
        if let Some(p) = pins.digests.get_mut(sha256) {
            p.waiting = p.waiting.saturating_sub(1);
            if p.waiting == 0 {
                p.bytes = 0;
                if p.active == 0 {
                    pins.digests.remove(sha256);
                }
            }
        }
    }

    /// The blobs pinned now.
    pub fn pinned(&self) -> BTreeSet<String> {
        let now = Instant::now();
        let grace = self.config.upload_grace();
        lock(&self.pins)
            .digests
            .iter()
            .filter(|(_, p)| p.holds(now, grace))
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Bytes held against the upload quota now: uploads being received and
    /// uploaded files whose `Add` has not been applied here.
    #[cfg(test)]
    pub fn upload_bytes(&self) -> u64 {
        let pins = lock(&self.pins);
        pins.receiving + pins.pending_bytes(Instant::now(), self.config.upload_grace())
    }

    /// Checks that writing `size` more bytes (besides the uploads being
    /// received) leaves the free-space reserve on the data dir's filesystem.
    /// Passes, with one warning in the log, where free space cannot be read.
    pub async fn check_free_space(&self, size: u64) -> Result<(), UploadRefused> {
        let reserve = self.config.free_space_reserve_bytes;
        if reserve == 0 {
            return Ok(());
        }
        let Some(available) = available_bytes(&self.root).await else {
            if !self.space_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    dir = %self.root.display(),
                    "cannot read the free space of the data dir's filesystem (statvfs failed); \
                     models.free_space_reserve_bytes is not enforced"
                );
            }
            return Ok(());
        };
        let size = size.saturating_add(lock(&self.pins).receiving);
        if available.saturating_sub(size) < reserve {
            return Err(UploadRefused::Space {
                size,
                available,
                reserve,
            });
        }
        Ok(())
    }

    /// Admits an upload of `size` bytes: checks the free-space reserve and
    /// takes the bytes from the upload quota until the returned reservation
    /// drops.
    pub async fn admit_upload(&self, size: u64) -> Result<Reservation, UploadRefused> {
        self.check_free_space(size).await?;
        self.reserve_upload(size, Instant::now())
    }

    fn reserve_upload(&self, size: u64, now: Instant) -> Result<Reservation, UploadRefused> {
        let quota = self.config.upload_quota_bytes;
        let mut pins = lock(&self.pins);
        let used = pins.receiving + pins.pending_bytes(now, self.config.upload_grace());
        if size > quota.saturating_sub(used) {
            return Err(UploadRefused::Quota { used, size, quota });
        }
        pins.receiving += size;
        Ok(Reservation {
            pins: self.pins.clone(),
            bytes: size,
        })
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
            upload: None,
            done: false,
        })
    }

    /// Deletes the partial file of a fetch of `sha256`, so it starts over.
    pub fn discard_fetch(&self, sha256: &str) -> Result<(), ModelError> {
        remove_if_present(&self.root.join("partial").join(sha256))
    }

    /// Starts an upload admitted with `reservation`; it hashes as it goes,
    /// never collides with a fetch or another upload of the same blob, and
    /// its file is deleted if it is dropped before [`BlobStore::commit`].
    pub fn start_upload(&self, sha256: &str, reservation: Reservation) -> Result<PartialBlob, ModelError> {
        let n = self.next_upload.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join("partial").join(format!("{sha256}.{n}.upload"));
        let file = File::create(&path).map_err(|e| io_err(&path, e))?;
        Ok(PartialBlob {
            path,
            file,
            hasher: Some(Sha256::new()),
            written: 0,
            upload: Some(reservation),
            done: false,
        })
    }

    /// Syncs `partial`, checks that it hashes to `sha256`, and moves it under
    /// its final name. Bytes that hash otherwise are deleted and
    /// [`ModelError::Corrupt`] returned. Bytes that hash to `sha256` are the
    /// blob and are kept even when they are not `size` bytes long; the size
    /// was wrong, which is reported as [`ModelError::Invalid`] on `size`.
    pub fn commit(&self, mut partial: PartialBlob, sha256: &str, size: u64) -> Result<(), ModelError> {
        partial.file.sync_all().map_err(|e| io_err(&partial.path, e))?;
        let actual = match partial.hasher.take() {
            Some(h) => hex(&h.finalize()),
            None => sha256_file(&partial.path)?,
        };
        let written = partial.written;
        if actual != sha256 {
            partial.done = true;
            let _ = fs::remove_file(&partial.path);
            return Err(ModelError::Corrupt {
                sha256: sha256.to_string(),
                detail: format!("got {written} bytes hashing to {actual}, expected {size} bytes"),
            });
        }
        let dest = self.blob_path(sha256);
        fs::rename(&partial.path, &dest).map_err(|e| io_err(&dest, e))?;
        partial.done = true;
        sync_dir(&self.root.join("blobs"))?;
        if written != size {
            return Err(ModelError::invalid(
                "size",
                format!("is {size}, but the file hashing to {sha256} holds {written} bytes (the file is kept)"),
            ));
        }
        Ok(())
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

    /// Deletes every blob and partial fetch whose digest `keep` rejects and
    /// no pin holds. Uploads in progress are never touched.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Result<usize, ModelError> {
        self.retain_at(keep, Instant::now())
    }

    fn retain_at(&self, keep: impl Fn(&str) -> bool, now: Instant) -> Result<usize, ModelError> {
        let grace = self.config.upload_grace();
        let mut removed = 0;
        for dir in ["blobs", "partial"] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let digest = name.split('.').next().unwrap_or_default();
                if name.ends_with(".upload") || keep(digest) {
                    continue;
                }
                // Checked and deleted under the lock: a pin taken before a
                // look for the blob is either seen here or taken after the
                // blob is gone, so the look finds it missing.
                let pins = lock(&self.pins);
                if pins.digests.get(digest).is_some_and(|p| p.holds(now, grace)) {
                    continue;
                }
                remove_if_present(&entry.path())?;
                drop(pins);
                removed += 1;
            }
        }
        lock(&self.pins).prune(now, grace);
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

    fn reservation(store: &BlobStore, size: u64) -> Reservation {
        store.reserve_upload(size, Instant::now()).unwrap()
    }

    /// Uploads `data` whole and returns its digest.
    fn put(store: &BlobStore, data: &[u8]) -> String {
        let sha = digest(data);
        let mut up = store.start_upload(&sha, reservation(store, data.len() as u64)).unwrap();
        up.write(data).unwrap();
        store.commit(up, &sha, data.len() as u64).unwrap();
        sha
    }

    fn uploads_in_progress(dir: &Path) -> usize {
        fs::read_dir(dir.join("partial"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".upload"))
            .count()
    }

    #[test]
    fn uploads_are_verified_before_they_get_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"hello model".as_slice();
        let sha = digest(data);
        let mut up = store.start_upload(&sha, reservation(&store, 11)).unwrap();
        up.write(&data[..5]).unwrap();
        up.write(&data[5..]).unwrap();
        store.commit(up, &sha, data.len() as u64).unwrap();
        assert!(store.has(&sha));
        assert_eq!(store.verify(&sha, data.len() as u64).unwrap(), Verdict::Verified);

        let wrong = digest(b"other");
        let mut up = store.start_upload(&wrong, reservation(&store, 11)).unwrap();
        up.write(data).unwrap();
        let err = store.commit(up, &wrong, data.len() as u64).unwrap_err();
        assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
        assert!(!store.has(&wrong));

        // An upload dropped before its commit (a client gone, an idle
        // timeout) leaves no file and gives its bytes back to the quota.
        let mut up = store.start_upload(&sha, reservation(&store, 11)).unwrap();
        up.write(&data[..3]).unwrap();
        assert_eq!(store.upload_bytes(), 11);
        drop(up);
        assert_eq!(uploads_in_progress(dir.path()), 0);
        assert_eq!(store.upload_bytes(), 0);
    }

    #[test]
    fn a_corrupted_blob_fails_verification_and_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = vec![7u8; 3000];
        let sha = put(&store, &data);
        let mut bad = data.clone();
        bad[1500] ^= 1;
        fs::write(store.blob_path(&sha), &bad).unwrap();
        assert_eq!(store.verify(&sha, 3000).unwrap(), Verdict::Corrupt);
        assert!(!store.has(&sha), "a bad blob is never kept");
    }

    #[test]
    fn a_size_that_contradicts_a_good_blob_is_an_error_and_keeps_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = vec![3u8; 2000];
        let sha = put(&store, &data);
        // Another manifest names the same digest with another size.
        assert_eq!(store.verify(&sha, 2001).unwrap(), Verdict::OtherSize { held: 2000 });
        assert!(
            store.has(&sha),
            "the good blob stays for the manifests that name it rightly"
        );
        assert_eq!(store.verify(&sha, 2000).unwrap(), Verdict::Verified);

        // A fetch for a manifest with the wrong size receives the blob's
        // bytes: they are kept under their name, and the size is the error.
        let other = vec![4u8; 1000];
        let other_sha = digest(&other);
        let mut p = store.resume_fetch(&other_sha, 1500).unwrap();
        p.write(&other).unwrap();
        let err = store.commit(p, &other_sha, 1500).unwrap_err();
        assert!(
            matches!(&err, ModelError::Invalid { field, .. } if field == "size"),
            "{err}"
        );
        assert_eq!(store.len(&other_sha), Some(1000));
        assert_eq!(store.verify(&other_sha, 1000).unwrap(), Verdict::Verified);
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
        assert_eq!(store.verify(&sha, 10_000).unwrap(), Verdict::Verified);
        // Kept partial uploads of a crashed run are cleaned at open.
        let up = store.start_upload(&sha, reservation(&store, 1)).unwrap();
        std::mem::forget(up);
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
        assert_eq!(store.retain(|_| false).unwrap(), 1);
        assert!(!store.has(&sha));
    }

    #[test]
    fn an_uploaded_blob_outlives_cleanup_until_its_add_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"weights".as_slice();
        let sha = digest(data);

        // The upload: pinned before it looks for the blob, streamed,
        // committed; a cleanup pass runs at every step with a registry that
        // does not name the blob yet.
        let pin = store.pin(&sha);
        assert_eq!(store.retain(|_| false).unwrap(), 0);
        let mut up = store.start_upload(&sha, reservation(&store, 7)).unwrap();
        up.write(data).unwrap();
        store.commit(up, &sha, 7).unwrap();
        assert_eq!(store.retain(|_| false).unwrap(), 0);
        pin.keep_for_add(7);
        drop(pin);
        assert_eq!(
            store.retain(|_| false).unwrap(),
            0,
            "the upload session ended, the Add has not come"
        );
        assert!(store.has(&sha));
        assert_eq!(store.upload_bytes(), 7, "an unused upload counts against the quota");

        // A second client uploads the same file (the node holds it).
        let pin = store.pin(&sha);
        assert!(store.has(&sha));
        pin.keep_for_add(0);
        drop(pin);

        // The first client's Add is applied here: the second still waits.
        store.added(&sha);
        assert_eq!(store.retain(|_| false).unwrap(), 0);
        assert_eq!(store.upload_bytes(), 7);
        // The second's too: the registry alone decides now.
        store.added(&sha);
        assert_eq!(store.upload_bytes(), 0);
        assert!(store.pinned().is_empty());
        assert_eq!(store.retain(|d| d == sha).unwrap(), 0);
        assert_eq!(store.retain(|_| false).unwrap(), 1);
        assert!(!store.has(&sha));

        // An upload whose Add never comes is kept for the grace only.
        let pin = store.pin(&sha);
        let mut up = store.start_upload(&sha, reservation(&store, 7)).unwrap();
        up.write(data).unwrap();
        store.commit(up, &sha, 7).unwrap();
        pin.keep_for_add(7);
        drop(pin);
        let later = Instant::now() + store.config().upload_grace() + Duration::from_secs(1);
        assert_eq!(store.retain_at(|_| false, later).unwrap(), 1);
        assert!(!store.has(&sha));
    }

    #[test]
    fn uploads_past_the_quota_or_the_free_space_reserve_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelsConfig {
            upload_quota_bytes: 100,
            ..ModelsConfig::default()
        };
        let store = BlobStore::open_with(dir.path(), config).unwrap();
        let first = reservation(&store, 60);
        let err = store.reserve_upload(41, Instant::now()).unwrap_err();
        assert!(
            matches!(
                err,
                UploadRefused::Quota {
                    used: 60,
                    size: 41,
                    quota: 100
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("models.upload_quota_bytes"), "{err}");
        let second = reservation(&store, 40);
        drop((first, second));
        // Committed uploads waiting for their Add count too.
        let sha = put(&store, &[1u8; 90]);
        let pin = store.pin(&sha);
        pin.keep_for_add(90);
        drop(pin);
        assert!(store.reserve_upload(11, Instant::now()).is_err());
        store.added(&sha);
        drop(reservation(&store, 100));

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let available = rt
            .block_on(available_bytes(dir.path()))
            .expect("statvfs reads the free space");
        assert!(available > 0);
        let config = ModelsConfig {
            free_space_reserve_bytes: available.saturating_mul(2),
            ..ModelsConfig::default()
        };
        let store = BlobStore::open_with(dir.path(), config).unwrap();
        let err = rt.block_on(store.admit_upload(1)).unwrap_err();
        assert!(matches!(err, UploadRefused::Space { .. }), "{err}");
        assert!(err.to_string().contains("models.free_space_reserve_bytes"), "{err}");
        assert_eq!(store.upload_bytes(), 0, "a refused upload holds nothing");
        let config = ModelsConfig {
            free_space_reserve_bytes: 1,
            ..ModelsConfig::default()
        };
        let store = BlobStore::open_with(dir.path(), config).unwrap();
        let admitted = rt.block_on(store.admit_upload(1)).unwrap();
        assert_eq!(store.upload_bytes(), 1);
        drop(admitted);
    }

    #[test]
    fn install_links_files_in_the_manifest_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut files = Vec::new();
        for (path, data) in [("1_Pooling/config.json", b"{}".as_slice()), ("vocab.txt", b"a\nb")] {
            let sha = put(&store, data);
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
