//! The model manager: converges this node on the replicated registry.
//!
//! A background loop wakes on every applied registry change (and retries
//! with backoff while something is missing). For each registered version it
//! makes sure every file is present and verified — hashing stored blobs once
//! per process start and fetching missing or corrupted ones from holders —
//! then lays the files out, loads them into an engine behind an
//! [`EmbedBatcher`] (whose worker runs as the transient supervised task
//! `embed-batcher` until the version is unloaded), and records this node as
//! a holder through Raft. Removed versions are unloaded and their files
//! deleted.
//!
//! Invariants: a blob is loaded only after its sha256 matched in this
//! process; this node reports itself a holder only of versions it has
//! loaded; one loop owns all fetching, so no blob is fetched twice at once;
//! a cleanup pass deletes only blobs that neither the registry it read nor a
//! pin taken before that read keeps (see [`BlobStore::pin`]), and an upload's
//! pin is released only once its `Add` was applied on this node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use cell0_consensus::{
    Consensus, ConsensusError, Consistency, ModelCommand, ModelEntry, ModelManifest, ModelOutcome, registry,
};
use cell0_inference::{BackendInfo, EmbedBatcher, InferenceConfig, InferenceError, ModelSource, TextEmbedder};
use tokio::sync::watch;

use super::ModelError;
use super::store::{BlobPin, BlobStore, Verdict};
use super::transfer::fetch_blob;
use crate::supervisor::{Backoff, Supervisor, stopped};

/// First retry delay after a failed reconcile; doubled up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How long `add` waits for this node to apply the `Add` it proposed before
/// it leaves the uploads' pins to expire on their own.
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// Files a manifest must have for the engine to load it.
const REQUIRED_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// A registered version, by name and number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelKey {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u32,
}

impl std::fmt::Display for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

enum ServedState {
    Fetching { held: u64, total: u64 },
    Loading,
    Ready(Arc<EmbedBatcher>),
    Failed(String),
}

struct Served {
    manifest: ModelManifest,
    state: ServedState,
}

/// How a version is doing on this node, for `Inference.Info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModelView {
    /// The version.
    pub key: ModelKey,
    /// What the engine loads it as.
    pub architecture: String,
    /// `ready`, `fetching`, `loading` or `failed`.
    pub state: &'static str,
    /// Fetch progress or the failure.
    pub detail: String,
    /// Embedding length (0 until loaded).
    pub dim: usize,
    /// Token limit per text (0 until loaded).
    pub max_tokens: usize,
}

/// Vectors from [`ModelManager::embed`].
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The version that answered.
    pub key: ModelKey,
    /// Length of each vector.
    pub dim: usize,
    /// One unit vector per text.
    pub vectors: Vec<Vec<f32>>,
}

struct Inner {
    consensus: Consensus,
    store: Arc<BlobStore>,
    config: InferenceConfig,
    engine: BackendInfo,
    served: RwLock<BTreeMap<ModelKey, Served>>,
    /// Blobs hashed (or written and hashed) by this process.
    verified: Mutex<BTreeSet<String>>,
    /// The node's supervisor, which runs each loaded version's batch worker.
    tasks: Supervisor,
}

/// The node's models. Cheap to clone.
#[derive(Clone)]
pub struct ModelManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ModelManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelManager")
            .field("engine", &self.inner.engine)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ModelError> + Send + 'static,
) -> Result<T, ModelError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ModelError::Io(format!("blocking task failed: {e}")))?
}

impl ModelManager {
    /// Opens the engine's backend once to learn what it runs on (failing
    /// fast on a bad `inference` config), and starts the reconcile loop as
    /// the supervised task `models`, which ends when the supervisor stops.
    /// Each version it loads gets its batch worker spawned into `tasks` too.
    pub async fn start(
        consensus: Consensus,
        store: Arc<BlobStore>,
        config: InferenceConfig,
        tasks: &Supervisor,
    ) -> Result<Self, ModelError> {
        let probe = config.clone();
        let engine = blocking(move || Ok(cell0_inference::open_backend(&probe)?.info())).await?;
        tracing::info!(
            backend = %engine.backend,
            adapter = %engine.adapter,
            device_type = %engine.device_type,
            "inference engine ready"
        );
        let inner = Arc::new(Inner {
            consensus,
            store,
            config,
            engine,
            served: RwLock::new(BTreeMap::new()),
            verified: Mutex::new(BTreeSet::new()),
            tasks: tasks.clone(),
        });
        tasks.spawn("models", reconcile_loop(inner.clone(), tasks.stop_signal()));
        Ok(Self { inner })
    }

    /// What the engine runs on.
    pub fn engine(&self) -> &BackendInfo {
        &self.inner.engine
    }

    /// The engine's configuration (request limits).
    pub fn config(&self) -> &InferenceConfig {
        &self.inner.config
    }

    /// The node's file store.
    pub fn store(&self) -> &Arc<BlobStore> {
        &self.inner.store
    }

    /// Records that blob `sha256` was uploaded and verified.
    pub fn uploaded(&self, sha256: &str) {
        lock(&self.inner.verified).insert(sha256.to_string());
    }

    /// Whether this node holds blob `sha256` of `size` bytes, so an upload
    /// of it can stop. A stored blob of another size is hashed: if it does
    /// not hash to its name it is deleted and the upload takes its place; if
    /// it does, `header.size` is wrong. (A blob of the right size is hashed
    /// by the reconcile loop before any use, like every stored blob.)
    pub async fn holds(&self, sha256: &str, size: u64) -> Result<bool, ModelError> {
        let Some(held) = self.inner.store.len(sha256) else {
            return Ok(false);
        };
        if held == size {
            return Ok(true);
        }
        let (store, sha) = (self.inner.store.clone(), sha256.to_string());
        match blocking(move || store.verify(&sha, size)).await? {
            Verdict::Corrupt => {
                metrics::counter!("cell0_model_blob_corrupt_total").increment(1);
                tracing::warn!(
                    sha256,
                    "stored file failed verification; deleted, taking the upload instead"
                );
                Ok(false)
            }
            Verdict::Verified => Ok(true),
            Verdict::OtherSize { held } => {
                lock(&self.inner.verified).insert(sha256.to_string());
                Err(ModelError::invalid(
                    "header.size",
                    format!("is {size}, but the file with this sha256 holds {held} bytes"),
                ))
            }
        }
    }

    /// Registers `manifest` with this node as its first holder. Every file
    /// must have been uploaded here, with the size the manifest gives, and
    /// the architecture must be one the engine knows.
    ///
    /// The files stay pinned from before the check that they are here until
    /// this node applied the `Add`, and then the uploads' own pins are
    /// released: from that point the registry keeps them.
    pub async fn add(&self, manifest: ModelManifest) -> Result<ModelOutcome, ModelError> {
        manifest.validate().map_err(|e| prefixed("manifest.", e.into()))?;
        cell0_inference::model_spec(&manifest.architecture)
            .map_err(|e| ModelError::invalid("manifest.architecture", e.to_string()))?;
        for required in REQUIRED_FILES {
            if !manifest.files.iter().any(|f| f.path == required) {
                return Err(ModelError::invalid(
                    "manifest.files",
                    format!("lack {required}, which {} needs", manifest.architecture),
                ));
            }
        }
        let store = &self.inner.store;
        let _pins: Vec<BlobPin> = manifest.files.iter().map(|f| store.pin(&f.sha256)).collect();
        for (i, f) in manifest.files.iter().enumerate() {
            match store.len(&f.sha256) {
                None => {
                    return Err(ModelError::NotUploaded {
                        path: f.path.clone(),
                        sha256: f.sha256.clone(),
                    });
                }
                Some(held) if held != f.size => {
                    return Err(ModelError::invalid(
                        &format!("manifest.files[{i}].size"),
                        format!(
                            "is {}, but the file uploaded for {} ({}) holds {held} bytes",
                            f.size, f.path, f.sha256
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let add = ModelCommand::Add {
            manifest: manifest.clone(),
            holder: self.inner.consensus.id(),
        };
        let outcome = ModelCommand::outcome(self.inner.consensus.propose(add.into_command()).await?)
            .map_err(ConsensusError::from)?;
        if matches!(outcome, ModelOutcome::Added | ModelOutcome::Unchanged) {
            // A linearizable read barrier returns once this replica applied
            // everything committed before it, the Add included.
            let applied =
                tokio::time::timeout(APPLY_WAIT, self.inner.consensus.read_barrier(Consistency::Linearizable)).await;
            match applied {
                Ok(Ok(())) => {
                    for f in &manifest.files {
                        store.added(&f.sha256);
                    }
                }
                Ok(Err(e)) => tracing::warn!(
                    model = %manifest.name, version = manifest.version, error = %e,
                    "registered, but cannot tell whether this node applied it; its uploads stay pinned until they expire"
                ),
                Err(_) => tracing::warn!(
                    model = %manifest.name, version = manifest.version,
                    "registered, but this node has not applied it after {APPLY_WAIT:?}; its uploads stay pinned until they expire"
                ),
            }
        }
        Ok(outcome)
    }

    /// Every registered version as this node serves it.
    pub fn served(&self) -> Vec<ServedModelView> {
        let served = self.inner.served.read().unwrap_or_else(|p| p.into_inner());
        served
            .iter()
            .map(|(key, s)| {
                let (state, detail, info) = match &s.state {
                    ServedState::Ready(b) => ("ready", String::new(), Some(b.model_info())),
                    ServedState::Fetching { held, total } => ("fetching", progress(*held, *total), None),
                    ServedState::Loading => ("loading", String::new(), None),
                    ServedState::Failed(m) => ("failed", m.clone(), None),
                };
                ServedModelView {
                    key: key.clone(),
                    architecture: s.manifest.architecture.clone(),
                    state,
                    detail,
                    dim: info.as_ref().map_or(0, |i| i.dim),
                    max_tokens: info.map_or(0, |i| i.max_tokens),
                }
            })
            .collect()
    }

    /// Embeds `texts` with the named version (empty name: the only
    /// registered model; version 0: its highest ready version).
    pub async fn embed(&self, name: &str, version: u32, texts: &[String]) -> Result<Embedded, ModelError> {
        let (key, batcher) = self.select(name, version)?;
        let vectors = batcher.embed(texts).await?;
        Ok(Embedded {
            key,
            dim: batcher.model_info().dim,
            vectors,
        })
    }

    fn select(&self, name: &str, version: u32) -> Result<(ModelKey, Arc<EmbedBatcher>), ModelError> {
        let served = self.inner.served.read().unwrap_or_else(|p| p.into_inner());
        let names: BTreeSet<&str> = served.keys().map(|k| k.name.as_str()).collect();
        let name = match (name, names.len()) {
            (_, 0) => return Err(ModelError::NoModels),
            ("", 1) => names.first().copied().unwrap_or_default(),
            ("", _) => {
                return Err(ModelError::Ambiguous {
                    names: names.into_iter().collect::<Vec<_>>().join(", "),
                });
            }
            (n, _) if !names.contains(n) => return Err(ModelError::UnknownModel { name: n.to_string() }),
            (n, _) => n,
        };
        let key = if version == 0 {
            // The highest version this node can serve now, so a new version
            // being fetched does not interrupt the previous one; the highest
            // registered one (for its progress) when none is ready.
            let versions = || served.iter().filter(|(k, _)| k.name == name);
            versions()
                .filter(|(_, s)| matches!(s.state, ServedState::Ready(_)))
                .map(|(k, _)| k)
                .max()
                .or_else(|| versions().map(|(k, _)| k).max())
                .cloned()
        } else {
            Some(ModelKey {
                name: name.to_string(),
                version,
            })
        };
        let Some((key, s)) = key.and_then(|k| served.get_key_value(&k)) else {
            return Err(ModelError::UnknownVersion {
                name: name.to_string(),
                version,
            });
        };
        let detail = match &s.state {
            ServedState::Ready(b) => return Ok((key.clone(), b.clone())),
            ServedState::Fetching { held, total } => format!("fetching its files, {}", progress(*held, *total)),
            ServedState::Loading => "loading it into the engine".into(),
            ServedState::Failed(m) => m.clone(),
        };
        Err(ModelError::NotReady {
            name: key.name.clone(),
            version: key.version,
            detail,
        })
    }
}

fn prefixed(prefix: &str, e: cell0_consensus::ConsensusError) -> ModelError {
    match e {
        cell0_consensus::ConsensusError::InvalidArgument { field, reason } => {
            ModelError::invalid(&format!("{prefix}{field}"), reason)
        }
        other => ModelError::Consensus(other),
    }
}

fn progress(held: u64, total: u64) -> String {
    let pct = if total == 0 {
        100.0
    } else {
        held as f64 * 100.0 / total as f64
    };
    format!("{pct:.0}% of {:.1} MB", total as f64 / 1e6)
}

async fn reconcile_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut changes = inner.consensus.watch_table(cell0_consensus::Table::Models);
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    loop {
        changes.borrow_and_update();
        let complete = match reconcile(&inner).await {
            Ok(complete) => complete,
            Err(e) => {
                tracing::warn!(error = %e, "model reconcile failed; will retry");
                false
            }
        };
        if complete {
            backoff.reset();
        }
        // Only a pass that left work undone retries on its own; the pause
        // is taken only then (select! evaluates disabled branches too).
        let retry = (!complete).then(|| backoff.next_pause());
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// One pass over the registry; true when every version is ready here.
async fn reconcile(inner: &Arc<Inner>) -> Result<bool, ModelError> {
    // Pins first: an upload's pin is released only after its Add was applied
    // here, so a pin gone by the time the registry is read below is one the
    // registry read already keeps.
    let pinned = inner.store.pinned();
    let entries = inner.consensus.read(Consistency::Serializable, registry::list).await?;
    let wanted: BTreeMap<ModelKey, ModelEntry> = entries
        .into_iter()
        .map(|e| {
            (
                ModelKey {
                    name: e.manifest.name.clone(),
                    version: e.manifest.version,
                },
                e,
            )
        })
        .collect();
    let gone: Vec<ModelKey> = {
        let mut served = inner.served.write().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<ModelKey> = served.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for k in &gone {
            served.remove(k);
        }
        gone
    };
    for key in &gone {
        inner.store.uninstall(&key.name, key.version)?;
        tracing::info!(model = %key, "model removed from the registry; unloaded");
    }
    collect_garbage(inner, &wanted, pinned)?;
    let mut complete = true;
    for (key, entry) in &wanted {
        if let Err(e) = ensure(inner, key, entry).await {
            complete = false;
            // A loaded version keeps serving when only reporting it failed.
            if !is_ready(inner, key, &entry.manifest) {
                tracing::warn!(model = %key, error = %e, "model not ready; will retry");
                set_state(inner, key, &entry.manifest, ServedState::Failed(e.to_string()));
            } else {
                tracing::warn!(model = %key, error = %e, "cannot record this node as a holder yet; will retry");
            }
        }
    }
    metrics::gauge!("cell0_models_ready").set(
        inner
            .served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| matches!(s.state, ServedState::Ready(_)))
            .count() as f64,
    );
    Ok(complete)
}

/// Deletes the files that no version in `wanted` uses and no pin keeps:
/// neither one of `pinned`, taken before `wanted` was read, nor one taken
/// since (the store checks those as it deletes).
fn collect_garbage(
    inner: &Inner,
    wanted: &BTreeMap<ModelKey, ModelEntry>,
    mut keep: BTreeSet<String>,
) -> Result<(), ModelError> {
    keep.extend(
        wanted
            .values()
            .flat_map(|e| e.manifest.files.iter().map(|f| f.sha256.clone())),
    );
    let removed = inner.store.retain(|d| keep.contains(d))?;
    if removed > 0 {
        lock(&inner.verified).retain(|d| inner.store.has(d));
        tracing::info!(removed, "deleted model files no registered version uses");
    }
    Ok(())
}

fn set_state(inner: &Inner, key: &ModelKey, manifest: &ModelManifest, state: ServedState) {
    let mut served = inner.served.write().unwrap_or_else(|p| p.into_inner());
    served.insert(
        key.clone(),
        Served {
            manifest: manifest.clone(),
            state,
        },
    );
}

/// Whether `key` is loaded with exactly `manifest`'s files (a version removed
/// and registered again with other files between two passes is not).
fn is_ready(inner: &Inner, key: &ModelKey, manifest: &ModelManifest) -> bool {
    let served = inner.served.read().unwrap_or_else(|p| p.into_inner());
    served
        .get(key)
        .is_some_and(|s| s.manifest == *manifest && matches!(s.state, ServedState::Ready(_)))
}

async fn ensure(inner: &Arc<Inner>, key: &ModelKey, entry: &ModelEntry) -> Result<(), ModelError> {
    if !is_ready(inner, key, &entry.manifest) {
        ensure_files(inner, key, entry).await?;
        set_state(inner, key, &entry.manifest, ServedState::Loading);
        let batcher = load(inner, &entry.manifest).await?;
        set_state(inner, key, &entry.manifest, ServedState::Ready(Arc::new(batcher)));
        tracing::info!(model = %key, "model ready");
    }
    let me = inner.consensus.id();
    if !entry.holders.contains(&me) {
        let held = ModelCommand::Held {
            name: key.name.clone(),
            version: key.version,
            node: me,
        };
        inner.consensus.propose(held.into_command()).await?;
    }
    Ok(())
}

async fn load(inner: &Arc<Inner>, manifest: &ModelManifest) -> Result<EmbedBatcher, ModelError> {
    let store = inner.store.clone();
    let config = inner.config.clone();
    let m = manifest.clone();
    let embedder = blocking(move || {
        let dir = store.install(&m)?;
        // The registry verified every file against the manifest; the
        // catalogue's digests would refuse fine-tuned weights.
        let source = ModelSource {
            name: m.architecture.clone(),
            dir,
            verify_sha256: false,
        };
        Ok(TextEmbedder::load(&source, &config)?)
    })
    .await?;
    let (batcher, worker) = EmbedBatcher::new(Arc::new(embedder), &inner.config, None)?;
    // The worker returns when the version is unloaded (its batcher dropped),
    // which happens as often as versions come and go: a transient task.
    if !inner.tasks.spawn_transient("embed-batcher", worker.run()) {
        return Err(InferenceError::BatcherClosed.into());
    }
    Ok(batcher)
}

/// The error of a manifest whose file `i` names a good blob with the wrong
/// size: it fails this version only, and the blob stays for the others.
fn wrong_size(i: usize, file: &cell0_consensus::ModelFile, held: u64) -> ModelError {
    ModelError::invalid(
        &format!("files[{i}].size"),
        format!(
            "is {}, but {} (sha256 {}) holds {held} bytes; the file is kept, and this version cannot load until it \
             is removed and added again with the right size",
            file.size, file.path, file.sha256
        ),
    )
}

/// Makes every file of `entry` present and verified in this process.
async fn ensure_files(inner: &Arc<Inner>, key: &ModelKey, entry: &ModelEntry) -> Result<(), ModelError> {
    let total = entry.manifest.total_bytes();
    let mut done = 0u64;
    for (i, file) in entry.manifest.files.iter().enumerate() {
        let held = inner.store.len(&file.sha256);
        let verified = lock(&inner.verified).contains(&file.sha256);
        if let Some(held) = held
            && verified
        {
            if held != file.size {
                return Err(wrong_size(i, file, held));
            }
            done += file.size;
            continue;
        }
        if held.is_some() {
            let (store, sha, size) = (inner.store.clone(), file.sha256.clone(), file.size);
            match blocking(move || store.verify(&sha, size)).await? {
                Verdict::Verified => {
                    lock(&inner.verified).insert(file.sha256.clone());
                    done += file.size;
                    continue;
                }
                Verdict::OtherSize { held } => {
                    lock(&inner.verified).insert(file.sha256.clone());
                    return Err(wrong_size(i, file, held));
                }
                Verdict::Corrupt => {
                    metrics::counter!("cell0_model_blob_corrupt_total").increment(1);
                    tracing::warn!(model = %key, path = %file.path, sha256 = %file.sha256, "stored file failed verification; deleted, fetching it again");
                }
            }
        }
        inner
            .store
            .check_free_space(file.size)
            .await
            .map_err(|e| ModelError::Io(format!("cannot fetch {}: {e}", file.path)))?;
        set_state(inner, key, &entry.manifest, ServedState::Fetching { held: done, total });
        match fetch_from_holders(inner, key, entry, file, done, total).await {
            Ok(()) => {}
            Err(ModelError::Invalid { .. }) => {
                // The holders sent the blob (it hashes to its name), but it is
                // not the size the manifest gives.
                lock(&inner.verified).insert(file.sha256.clone());
                let held = inner.store.len(&file.sha256).unwrap_or_default();
                return Err(wrong_size(i, file, held));
            }
            Err(e) => return Err(e),
        }
        lock(&inner.verified).insert(file.sha256.clone());
        done += file.size;
    }
    Ok(())
}

async fn fetch_from_holders(
    inner: &Arc<Inner>,
    key: &ModelKey,
    entry: &ModelEntry,
    file: &cell0_consensus::ModelFile,
    done: u64,
    total: u64,
) -> Result<(), ModelError> {
    let me = inner.consensus.id();
    let peers: Vec<String> = inner
        .consensus
        .members()
        .into_iter()
        .filter(|m| m.id != me && entry.holders.contains(&m.id))
        .map(|m| m.info.internal_addr)
        .collect();
    let mut last = ModelError::NoHolder {
        sha256: file.sha256.clone(),
    };
    for addr in peers {
        tracing::info!(model = %key, path = %file.path, bytes = file.size, %addr, "fetching model file");
        let started = Instant::now();
        let mut logged_decile = 0;
        let mut on_progress = |held: u64| {
            set_state(
                inner,
                key,
                &entry.manifest,
                ServedState::Fetching {
                    held: done + held,
                    total,
                },
            );
            let decile = (held * 10).checked_div(file.size).unwrap_or(10);
            if decile > logged_decile {
                logged_decile = decile;
                tracing::info!(model = %key, path = %file.path, percent = decile * 10, "fetch progress");
            }
        };
        match fetch_blob(
            &inner.store,
            inner.consensus.channels(),
            &addr,
            &file.sha256,
            file.size,
            &mut on_progress,
        )
        .await
        {
            Ok(()) => {
                tracing::info!(
                    model = %key,
                    path = %file.path,
                    seconds = started.elapsed().as_secs_f64(),
                    "fetched and verified model file"
                );
                return Ok(());
            }
            // Good bytes of another size: no holder can do better.
            Err(e @ ModelError::Invalid { .. }) => return Err(e),
            Err(e) => {
                if matches!(e, ModelError::Corrupt { .. }) {
                    metrics::counter!("cell0_model_blob_corrupt_total").increment(1);
                }
                tracing::warn!(model = %key, path = %file.path, %addr, error = %e, "fetch failed; trying another holder");
                last = e;
            }
        }
    }
    Err(last)
}
