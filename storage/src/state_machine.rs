//! openraft's `RaftStateMachine` over any [`Engine`], generic over the
//! application through [`Apply`].
//!
//! Invariants:
//! - One apply call is one atomic engine write holding the data of every
//!   entry, the last applied log id and the last membership: after a crash the
//!   state is exactly that of some applied prefix of the log. The write is
//!   unlogged (see the crate docs): that prefix ends at the engine's last
//!   flush, and openraft applies the rest again from the log at start.
//! - A built snapshot is recorded only after an engine flush that started
//!   once its view was taken, so the log it allows openraft to purge is
//!   never needed again to rebuild the state after a crash.
//! - Snapshots are read from a point-in-time view, so they are consistent
//!   with the applied id they carry even while applies continue.
//! - A snapshot is a file (see [`crate::snapshot`]): built from a
//!   point-in-time view row by row, received in chunks into a file, and
//!   loaded row by row into [`Cf::Staging`], which then becomes the state in
//!   one atomic write with the applied log id and membership
//!   ([`WriteOp::PromoteStaging`](crate::WriteOp::PromoteStaging)). No step
//!   holds the state in memory. A crash during a build, a transfer or a load
//!   leaves the old state (and at most a stray `.part` file and staged rows,
//!   both removed at the next open); a crash after the promotion, the new
//!   one. Never a mix.
//! - The stored snapshot is a record in [`Cf::Meta`] (meta and file name);
//!   its file is durable, under its final name, before the record refers to
//!   it, and a replaced file is removed only after the new record is.
//! - The stored snapshot (what `get_current_snapshot` returns) only moves
//!   forward: a built or installed snapshot replaces it only when its last log
//!   id is greater, and that read-compare-write runs under one lock shared by
//!   every clone of the store, so a slow build never overwrites a newer
//!   snapshot installed meanwhile.
//! - Once enabled (after openraft has started), a lagging member is sent a
//!   live snapshot of the current state instead of an older stored one
//!   ([`StateMachineStore::live_snapshots`], [`crate::live`]): streamed from
//!   a point-in-time view through a bounded pipe, never written to disk nor
//!   recorded. Only built and installed snapshots are ever recorded, so what
//!   openraft may purge is decided by durable snapshots alone.
//! - Snapshot builds, installs and reads of the stored snapshot run through
//!   `engine::run_blocking`, so they never stall the other tasks of an async
//!   worker; each call returns after that work, so applies and installs stay
//!   in the order openraft issues them.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cell0_state::codec::frame_unversioned;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, RaftTypeConfig, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::engine::{Cf, Durability, Engine, ReadView, WriteBatch, run_blocking};
use crate::error::{decode, decode_prefix, encode};
use crate::live::{LivePipe, LiveSnapshots};
use crate::preload::{GrowingReader, Growth, Preload, Preloaded, Staging, StagingHold};
use crate::row_cache::RowCache;
use crate::snapshot::{
    FileHeader, FileSummary, LiveBuild, SnapshotFile, SnapshotReader, SnapshotWriter, io_err, is_snapshot_file,
    sync_dir,
};
use crate::txn::{EngineTxn, Txn, lock_cache};

const APPLIED_KEY: &[u8] = b"sm/applied";
const MEMBERSHIP_KEY: &[u8] = b"sm/membership";
/// The stored snapshot: its meta and file name ([`StoredSnapshot`]).
const SNAPSHOT_KEY: &[u8] = b"sm/snapshot_file";
/// Where data dirs of format 1 and older kept their whole snapshot
/// ([`LegacySnapshot`]); moved into a file by the format 2 upgrade.
const LEGACY_SNAPSHOT_KEY: &[u8] = b"sm/snapshot";
/// The payload format of legacy snapshots whose rows carry no layout byte.
const LEGACY_FORMAT_UNVERSIONED: u32 = 1;
/// The payload format of legacy snapshots whose rows carry it.
const LEGACY_FORMAT_VERSIONED: u32 = 2;
/// Bytes of rows between two crash points while a snapshot is loaded.
const LOAD_STEP_BYTES: u64 = 4 << 20;
/// Extension of complete snapshot files.
const SNAPSHOT_EXT: &str = "snap";

/// The application logic of a replicated state machine.
///
/// Implementations must be deterministic: the same entries applied to the
/// same state produce the same writes and responses on every node (no clock,
/// no randomness, no unordered iteration).
pub trait Apply<C: RaftTypeConfig>: Send + Sync + 'static {
    /// What an apply reports to in-process subscribers after it is stored.
    type Event: Send;

    /// Applies the payload of one normal entry through `txn`, appending the
    /// resulting events to `events`.
    fn apply(
        &self,
        txn: &mut dyn Txn,
        log_id: &LogId<u64>,
        data: &C::D,
        events: &mut Vec<Self::Event>,
    ) -> crate::Result<C::R>;

    /// The response to a blank or membership entry.
    fn empty_response(&self) -> C::R;

    /// Receives the events of an apply call once its writes are stored.
    fn publish(&self, events: Vec<Self::Event>);

    /// Called before a snapshot replaces the whole state (whether or not
    /// that then succeeds): whatever the application keeps derived from the
    /// state must be dropped.
    fn state_replacing(&self) {}

    /// Called after a snapshot replaced the whole state, with read access to
    /// the new state.
    fn snapshot_installed(&self, state: &dyn Txn);

    /// The cluster id recorded in `state`, written into snapshot file
    /// headers (0 when there is none).
    fn cluster_id(&self, _state: &dyn Txn) -> u64 {
        0
    }
}

/// The stored snapshot, as recorded in [`Cf::Meta`].
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct StoredSnapshot<C: RaftTypeConfig> {
    /// Must stay the first field: [`stored_snapshot_log_id`] decodes it alone.
    meta: SnapshotMeta<u64, C::Node>,
    /// File name in the snapshot directory.
    file: String,
}

/// A snapshot file opened by blocking code, for openraft.
struct OpenedSnapshot<C: RaftTypeConfig> {
    meta: SnapshotMeta<u64, C::Node>,
    file: std::fs::File,
    path: PathBuf,
}

impl<C: RaftTypeConfig<NodeId = u64, SnapshotData = SnapshotFile>> OpenedSnapshot<C> {
    fn into_snapshot(self) -> crate::Result<Snapshot<C>> {
        Ok(Snapshot {
            meta: self.meta,
            snapshot: Box::new(SnapshotFile::from_std(self.file, self.path)?),
        })
    }
}

/// A whole snapshot as data dirs of format 1 and older stored it.
#[derive(Deserialize)]
#[serde(bound = "")]
struct LegacySnapshot<C: RaftTypeConfig> {
    meta: SnapshotMeta<u64, C::Node>,
    data: Vec<u8>,
}

/// The payload of a legacy snapshot: every state row, in key order. Older
/// nodes still send snapshots in this form.
#[derive(Serialize, Deserialize)]
struct LegacyPayload {
    format: u32,
    rows: Vec<(Vec<u8>, Vec<u8>)>,
}

type SResult<T> = Result<T, StorageError<u64>>;

/// The last applied log id and membership, as openraft asks for them.
type AppliedState<N> = (Option<LogId<u64>>, StoredMembership<u64, N>);

/// The replicated state of one node.
pub struct StateMachineStore<C, E, A> {
    engine: Arc<E>,
    apply: Arc<A>,
    /// Where snapshot files live.
    dir: Arc<PathBuf>,
    snapshot_seq: Arc<AtomicU64>,
    /// Held across the read-compare-write of the stored snapshot, by builds
    /// and installs of every clone, and while the stored file is opened.
    snapshot_lock: Arc<Mutex<()>>,
    /// Who uses [`Cf::Staging`] (see [`crate::preload`]).
    staging: Arc<Staging>,
    /// Whether `get_current_snapshot` builds live snapshots (see
    /// [`StateMachineStore::live_snapshots`]).
    live: LiveSnapshots,
    /// Apply's point reads (see [`crate::row_cache`]).
    row_cache: Arc<Mutex<RowCache>>,
    _c: PhantomData<fn() -> C>,
}

impl<C, E, A> Clone for StateMachineStore<C, E, A> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            apply: self.apply.clone(),
            dir: self.dir.clone(),
            snapshot_seq: self.snapshot_seq.clone(),
            snapshot_lock: self.snapshot_lock.clone(),
            staging: self.staging.clone(),
            live: self.live.clone(),
            row_cache: self.row_cache.clone(),
            _c: PhantomData,
        }
    }
}

/// The last log id of the stored snapshot: `None` when there is none,
/// `Some(None)` for a stored snapshot of the empty state.
fn stored_snapshot_log_id<C: RaftTypeConfig>(view: &dyn ReadView) -> crate::Result<Option<Option<LogId<u64>>>> {
    let Some(bytes) = view.get(Cf::Meta, SNAPSHOT_KEY)? else {
        return Ok(None);
    };
    // Decode only the meta (the first field).
    let meta: SnapshotMeta<u64, C::Node> = decode_prefix("stored snapshot meta", &bytes)?;
    Ok(Some(meta.last_log_id))
}

/// Whether a snapshot up to `new` should replace the stored one: only when
/// none is stored or `new` is strictly greater.
fn supersedes(new: &Option<LogId<u64>>, stored: Option<Option<LogId<u64>>>) -> bool {
    match stored {
        None => true,
        Some(old) => *new > old,
    }
}

fn lock_snapshot(lock: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    // The mutex guards no data, only the order of engine writes; a panic
    // while it was held leaves nothing inconsistent.
    lock.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_sm_err(e: crate::Error) -> StorageError<u64> {
    StorageIOError::read_state_machine(&e).into()
}

fn write_sm_err(e: crate::Error) -> StorageError<u64> {
    StorageIOError::write_state_machine(&e).into()
}

/// Milliseconds since `started` and the MB/s that moving `bytes` in that
/// time makes, for logs.
fn rate(bytes: u64, started: Instant) -> (u64, f64) {
    let secs = started.elapsed().as_secs_f64();
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    (ms, if secs > 0.0 { bytes as f64 / 1e6 / secs } else { 0.0 })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Removes `path`; a file already gone is not an error.
fn remove_file(path: &Path) -> crate::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// The applied log id and membership recorded in `view`.
fn applied_from<N: openraft::Node>(view: &dyn ReadView) -> crate::Result<AppliedState<N>> {
    let applied = match view.get(Cf::Meta, APPLIED_KEY)? {
        Some(b) => decode::<Option<LogId<u64>>>("applied log id", &b)?,
        None => None,
    };
    let membership = match view.get(Cf::Meta, MEMBERSHIP_KEY)? {
        Some(b) => decode::<StoredMembership<u64, N>>("membership", &b)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// A fresh snapshot file name for the state at `last`; the time keeps names
/// unique across restarts (the sequence restarts).
fn file_name_for(last: &Option<LogId<u64>>, seq: u64) -> String {
    let (term, index) = last.map_or((0, 0), |l| (l.leader_id.term, l.index));
    format!("snap-{term}-{index}-{}-{seq}.{SNAPSHOT_EXT}", unix_ms())
}

/// A snapshot id: the applied log id, the time and a sequence number.
fn snapshot_id(last_log_id: &Option<LogId<u64>>, seq: u64) -> String {
    match last_log_id {
        Some(id) => format!(
            "{}-{}-{}-{}-{seq}",
            id.leader_id.term,
            id.leader_id.node_id,
            id.index,
            unix_ms()
        ),
        None => format!("empty-{}-{seq}", unix_ms()),
    }
}

/// The file header of a snapshot of `meta` in cluster `cluster_id`.
fn file_header<N: openraft::Node>(meta: &SnapshotMeta<u64, N>, cluster_id: u64) -> crate::Result<FileHeader> {
    Ok(FileHeader {
        meta: encode(meta)?,
        cluster_id,
        created_unix_ms: unix_ms(),
    })
}

/// The snapshot meta of the state `view` holds (applied log id and
/// membership), and the header of its file.
fn view_header<C, A>(
    view: &dyn ReadView,
    apply: &A,
    seq: u64,
) -> crate::Result<(SnapshotMeta<u64, C::Node>, FileHeader)>
where
    C: RaftTypeConfig<NodeId = u64>,
    A: Apply<C>,
{
    let (last_log_id, last_membership) = applied_from(view)?;
    let meta = SnapshotMeta {
        snapshot_id: snapshot_id(&last_log_id, seq),
        last_log_id,
        last_membership,
    };
    let header = file_header(&meta, apply.cluster_id(&EngineTxn::new(view)))?;
    Ok((meta, header))
}

/// Writes the state of `view` with its applied log id and membership into a
/// new snapshot file at `path`.
fn write_view<C, A>(
    view: &dyn ReadView,
    apply: &A,
    seq: u64,
    path: &Path,
) -> crate::Result<(SnapshotMeta<u64, C::Node>, FileSummary)>
where
    C: RaftTypeConfig<NodeId = u64>,
    A: Apply<C>,
{
    let (meta, header) = view_header::<C, A>(view, apply, seq)?;
    let mut writer = SnapshotWriter::create(path, header)?;
    view.for_each(Cf::State, &mut |k, v| writer.row(k, v))?;
    Ok((meta, writer.finish()?))
}

/// Writes a consistent snapshot of `engine`'s current state to a new file
/// at `path`, without recording it anywhere (`cell0 snapshot save`).
pub fn export_snapshot<C, A>(
    engine: &dyn Engine,
    apply: &A,
    path: &Path,
) -> crate::Result<(SnapshotMeta<u64, C::Node>, FileSummary)>
where
    C: RaftTypeConfig<NodeId = u64>,
    A: Apply<C>,
{
    let mut out = None;
    engine.with_view(&mut |view| {
        out = Some(write_view::<C, A>(view, apply, 0, path)?);
        Ok(())
    })?;
    out.ok_or_else(|| crate::Error::Io("snapshot view produced nothing".into()))
}

impl<C, E, A> StateMachineStore<C, E, A>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>, SnapshotData = SnapshotFile>,
    E: Engine,
    A: Apply<C>,
{
    /// A state machine over `engine`, applying commands with `apply`, with
    /// its snapshot files in `dir` (created if missing). A data dir of an
    /// older format is upgraded first (see `format`); what an interrupted
    /// snapshot build, transfer or install left behind is removed.
    pub fn new(engine: Arc<E>, apply: Arc<A>, dir: PathBuf) -> crate::Result<Self> {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let store = Self {
            engine,
            apply,
            dir: Arc::new(dir),
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            snapshot_lock: Arc::new(Mutex::new(())),
            staging: Arc::new(Staging::default()),
            live: LiveSnapshots::default(),
            row_cache: Arc::new(Mutex::new(RowCache::default())),
            _c: PhantomData,
        };
        crate::format::upgrade(store.engine.as_ref(), &mut |batch| store.convert_legacy_snapshot(batch))?;
        store.remove_leftovers()?;
        Ok(store)
    }

    /// The engine, for read paths that bypass Raft (serializable reads).
    pub fn engine(&self) -> &Arc<E> {
        &self.engine
    }

    /// The directory of the snapshot files.
    pub fn snapshot_dir(&self) -> &Path {
        &self.dir
    }

    /// The switch of live snapshots, off until enabled: once on,
    /// `get_current_snapshot` (which openraft calls to send a snapshot to a
    /// lagging member) returns a live snapshot of the current state whenever
    /// the stored one is older (see `StateMachineStore::start_live`).
    /// Enable it once openraft has started: at startup openraft reads the
    /// stored snapshot to decide how far the log may be purged, which only a
    /// durable snapshot may decide.
    pub fn live_snapshots(&self) -> LiveSnapshots {
        self.live.clone()
    }

    /// Starts a live snapshot of the current state for one transfer: a
    /// point-in-time view is taken now and a blocking task writes its rows,
    /// in the snapshot file format, into a bounded pipe that the transfer
    /// drains (see [`crate::live`]). Nothing is written to disk nor
    /// recorded; dropping the snapshot stops the build. `None` when the
    /// stored snapshot already holds the applied state.
    ///
    /// A new member then installs the state as of now instead of an older
    /// stored snapshot plus every entry since, which it would have to
    /// replay.
    fn start_live(&self) -> crate::Result<Option<Snapshot<C>>> {
        let (applied, _) = applied_from::<C::Node>(self.engine.as_ref())?;
        if stored_snapshot_log_id::<C>(self.engine.as_ref())? == Some(applied) {
            return Ok(None);
        }
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let name = self.dir.join(format!("live-{}-{seq}", unix_ms()));
        let pipe = Arc::new(LivePipe::default());
        // Made first, so that an early return stops the build.
        let build = LiveBuild(pipe.clone());
        let (tx, started) = std::sync::mpsc::sync_channel(1);
        let store = self.clone();
        let writer_name = name.clone();
        tokio::task::spawn_blocking(move || {
            let begun = Instant::now();
            let built = store.engine.with_view(&mut |view| {
                let (meta, header) = view_header::<C, A>(view, store.apply.as_ref(), seq)?;
                let mut writer = SnapshotWriter::create_live(&writer_name, header, pipe.clone())?;
                let id = meta.snapshot_id.clone();
                let _ = tx.send(Ok(meta));
                view.for_each(Cf::State, &mut |k, v| writer.row(k, v))?;
                let summary = writer.finish_live()?;
                let (elapsed_ms, mb_per_s) = rate(summary.file_bytes, begun);
                tracing::info!(snapshot = %id, rows = summary.rows, bytes = summary.file_bytes, elapsed_ms, mb_per_s, "wrote live snapshot");
                Ok(())
            });
            if let Err(e) = built {
                if pipe.is_abandoned() {
                    tracing::info!(error = %e, "live snapshot build stopped: its transfer ended");
                } else {
                    tracing::warn!(error = %e, "live snapshot build failed");
                    pipe.abandon();
                }
                let _ = tx.send(Err(e));
            }
        });
        let meta = started
            .recv()
            .map_err(|_| crate::Error::Io("the live snapshot build ended before it started".into()))??;
        tracing::info!(snapshot = %meta.snapshot_id, "sending a live snapshot");
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(SnapshotFile::live(build, name)),
        }))
    }

    /// Starts loading `file` into staging while it is received, if staging
    /// is free (see [`crate::preload`]); the install finishes the job.
    fn start_preload(&self, file: &mut SnapshotFile) {
        // A file being received always has one; without it, the install
        // loads the file itself.
        let Ok(raw) = file.raw() else {
            return;
        };
        let Some(generation) = self.staging.try_take() else {
            return;
        };
        let growth = Arc::new(Growth::default());
        let reader = GrowingReader::new(raw, growth.clone());
        let (tx, outcome) = std::sync::mpsc::sync_channel(1);
        let engine = self.engine.clone();
        let hold = StagingHold(self.staging.clone());
        let path = file.path().to_path_buf();
        // Ends with its transfer: when the file is complete and read, or
        // abandoned (see the module's invariants).
        tokio::task::spawn_blocking(move || {
            let preloaded = preload_rows(engine.as_ref(), reader, &path, generation);
            drop(hold);
            let _ = tx.send(preloaded);
        });
        file.attach_preload(
            growth,
            Preload {
                outcome: Mutex::new(outcome),
            },
        );
    }

    fn stored(&self) -> crate::Result<Option<StoredSnapshot<C>>> {
        match self.engine.get(Cf::Meta, SNAPSHOT_KEY)? {
            Some(bytes) => Ok(Some(decode("stored snapshot", &bytes)?)),
            None => Ok(None),
        }
    }

    /// A fresh name for a snapshot file of `meta`.
    fn new_file_name(&self, meta: &SnapshotMeta<u64, C::Node>) -> String {
        file_name_for(&meta.last_log_id, self.snapshot_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Removes `.part` files (interrupted builds and transfers), snapshot
    /// files no record refers to, and staged rows of an interrupted install.
    fn remove_leftovers(&self) -> crate::Result<()> {
        let keep = self.stored()?.map(|s| s.file);
        let entries = std::fs::read_dir(self.dir.as_ref()).map_err(io_err(&self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stray = name.ends_with(".part")
                || (name.ends_with(&format!(".{SNAPSHOT_EXT}")) && keep.as_deref() != Some(name.as_str()));
            if stray {
                tracing::info!(file = %name, "removing a leftover snapshot file");
                remove_file(&entry.path())?;
            }
        }
        if self.engine.last(Cf::Staging)?.is_some() {
            tracing::info!("removing the staged rows of an interrupted snapshot install");
            self.engine.clear(Cf::Staging)?;
        }
        let (applied, _) = applied_from::<C::Node>(self.engine.as_ref())?;
        crate::log_store::repair_interrupted_install(self.engine.as_ref(), applied)
    }

    /// The format 2 upgrade: moves a snapshot stored whole in [`Cf::Meta`]
    /// into a file, recording the move in `batch`.
    fn convert_legacy_snapshot(&self, batch: &mut WriteBatch) -> crate::Result<()> {
        let Some(bytes) = self.engine.get(Cf::Meta, LEGACY_SNAPSHOT_KEY)? else {
            return Ok(());
        };
        let legacy: LegacySnapshot<C> = decode("stored snapshot", &bytes)?;
        let path = self.legacy_to_file(&legacy.meta, &legacy.data)?;
        let file = file_name(&path)?;
        tracing::info!(snapshot = %legacy.meta.snapshot_id, %file, "moved the stored snapshot into a file");
        batch.put(
            Cf::Meta,
            SNAPSHOT_KEY,
            encode(&StoredSnapshot::<C> {
                meta: legacy.meta,
                file,
            })?,
        );
        batch.delete(Cf::Meta, LEGACY_SNAPSHOT_KEY);
        Ok(())
    }

    /// Writes a legacy payload (held in memory, as older builds did) into a
    /// snapshot file.
    fn legacy_to_file(&self, meta: &SnapshotMeta<u64, C::Node>, data: &[u8]) -> crate::Result<PathBuf> {
        let payload: LegacyPayload = decode("snapshot", data)?;
        let unversioned = match payload.format {
            LEGACY_FORMAT_VERSIONED => false,
            LEGACY_FORMAT_UNVERSIONED => true,
            other => {
                return Err(crate::Error::Corrupt {
                    what: "snapshot",
                    detail: format!(
                        "format {other} is neither {LEGACY_FORMAT_UNVERSIONED} nor {LEGACY_FORMAT_VERSIONED}"
                    ),
                });
            }
        };
        let path = self.dir.join(self.new_file_name(meta));
        let mut writer = SnapshotWriter::create(&path, file_header(meta, 0)?)?;
        for (k, v) in &payload.rows {
            if unversioned {
                writer.row(k, &frame_unversioned(v))?;
            } else {
                writer.row(k, v)?;
            }
        }
        writer.finish()?;
        Ok(path)
    }

    /// Builds a snapshot file from a point-in-time view and records it if it
    /// is newer than the stored one. Returns it opened, and whether it was
    /// stored.
    fn build(&self) -> crate::Result<(OpenedSnapshot<C>, bool)> {
        let mut out = None;
        let started = Instant::now();
        self.engine.with_view(&mut |view| {
            let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
            let last = applied_from::<C::Node>(view)?.0;
            let path = self.dir.join(file_name_for(&last, seq));
            let (meta, summary) = write_view::<C, A>(view, self.apply.as_ref(), seq, &path)?;
            let (elapsed_ms, mb_per_s) = rate(summary.file_bytes, started);
            tracing::info!(snapshot = %meta.snapshot_id, rows = summary.rows, bytes = summary.file_bytes, elapsed_ms, mb_per_s, "wrote snapshot file");
            out = Some((meta, path));
            Ok(())
        })?;
        let Some((meta, path)) = out else {
            return Err(crate::Error::Io("snapshot view produced nothing".into()));
        };
        // The state the view saw reaches the disk before the record lets
        // openraft purge the log up to it (applies are unlogged).
        self.engine.flush()?;
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let _guard = lock_snapshot(&self.snapshot_lock);
        // A snapshot installed (or built) while this one was being built may
        // be newer than this build's view: never replace it with an older
        // one, or lagging followers would be sent stale state from now on.
        if !supersedes(&meta.last_log_id, stored_snapshot_log_id::<C>(self.engine.as_ref())?) {
            // Still readable through `file`.
            remove_file(&path)?;
            return Ok((OpenedSnapshot { meta, file, path }, false));
        }
        self.record(&meta, &path, WriteBatch::new())?;
        Ok((OpenedSnapshot { meta, file, path }, true))
    }

    /// Writes `batch` plus the record of the stored snapshot (`meta` in the
    /// file at `path`), synced, then removes the file it replaced. Called
    /// with the snapshot lock held.
    fn record(&self, meta: &SnapshotMeta<u64, C::Node>, path: &Path, mut batch: WriteBatch) -> crate::Result<()> {
        let replaced = self.stored()?.map(|s| s.file);
        let file = file_name(path)?;
        batch.put(
            Cf::Meta,
            SNAPSHOT_KEY,
            encode(&StoredSnapshot::<C> {
                meta: meta.clone(),
                file: file.clone(),
            })?,
        );
        self.engine.write(batch, Durability::Sync)?;
        if let Some(old) = replaced.filter(|old| *old != file) {
            remove_file(&self.dir.join(old))?;
        }
        Ok(())
    }

    /// Replaces the whole state with the snapshot in the file at `received`
    /// (its last byte checked before the state changes), records it if it is
    /// newer than the stored one, then tells `apply`.
    fn install(
        &self,
        meta: &SnapshotMeta<u64, C::Node>,
        received: &Path,
        preload: Option<Preload>,
    ) -> crate::Result<()> {
        // The whole state is replaced.
        lock_cache(&self.row_cache).clear();
        self.apply.state_replacing();
        let own = received.parent() == Some(self.dir.as_path());
        let path = if !is_snapshot_file(received)? {
            // An older node's payload: small enough to have been held in
            // memory by its sender.
            let data = std::fs::read(received).map_err(io_err(received))?;
            let path = self.legacy_to_file(meta, &data)?;
            if own {
                remove_file(received)?;
            }
            path
        } else if own {
            // Synced by `load` before anything refers to it, while the kernel
            // writes it back during the load.
            let path = self.dir.join(self.new_file_name(meta));
            std::fs::rename(received, &path).map_err(io_err(received))?;
            path
        } else {
            // Not one of ours (a restore, a test): copy, never move.
            let path = self.dir.join(self.new_file_name(meta));
            std::fs::copy(received, &path).map_err(io_err(received))?;
            path
        };
        match self.load(meta, &path, preload) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Nothing refers to the file yet; staged rows go at the next
                // install or open.
                let _ = remove_file(&path);
                Err(e)
            }
        }
    }

    /// Loads the checked file at `path` (in the snapshot directory) into
    /// [`Cf::Staging`], syncs the file, and promotes it with `meta`'s applied
    /// log id and membership.
    fn load(&self, meta: &SnapshotMeta<u64, C::Node>, path: &Path, preload: Option<Preload>) -> crate::Result<()> {
        let engine = self.engine.as_ref();
        let started = Instant::now();
        // The file is complete, so its preload ends (and gives staging
        // back) by itself.
        let preloaded = preload.map(Preload::wait);
        let current = self.staging.take();
        let _hold = StagingHold(self.staging.clone());
        let check = |file_meta: &[u8]| -> crate::Result<()> {
            let file_meta: SnapshotMeta<u64, C::Node> = decode("snapshot file meta", file_meta)?;
            if file_meta.last_log_id != meta.last_log_id {
                return Err(crate::Error::BadSnapshot {
                    path: path.to_path_buf(),
                    detail: format!(
                        "it holds the state at {:?}, not at {:?}",
                        file_meta.last_log_id, meta.last_log_id
                    ),
                });
            }
            Ok(())
        };
        let (summary, preloaded) = match preloaded {
            Some(Ok(p)) if p.generation == current => {
                check(&p.meta)?;
                (p.summary, true)
            }
            other => {
                if let Some(Err(e)) = other {
                    tracing::info!(error = %e, "the snapshot was not loaded while it arrived; loading it now");
                }
                self.staging.refilled();
                engine.clear(Cf::Staging)?;
                let mut reader = SnapshotReader::open(path)?;
                check(&reader.header().meta)?;
                (load_rows(engine, &mut reader)?, false)
            }
        };
        // The staged rows and the file reach the disk before the promotion
        // refers to them.
        engine.flush()?;
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(path))?;
        sync_dir(&self.dir)?;
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, APPLIED_KEY, encode(&meta.last_log_id)?);
        batch.put(Cf::Meta, MEMBERSHIP_KEY, encode(&meta.last_membership)?);
        batch.promote_staging();
        {
            let _guard = lock_snapshot(&self.snapshot_lock);
            // openraft installs only snapshots beyond its committed index, and
            // a stored snapshot never goes beyond the applied one, so this
            // holds in practice; checked anyway so the stored snapshot can
            // only move forward. The state is replaced either way, as openraft
            // asks.
            if supersedes(&meta.last_log_id, stored_snapshot_log_id::<C>(engine)?) {
                self.record(meta, path, batch)?;
            } else {
                tracing::warn!(snapshot = %meta.snapshot_id, "installed snapshot is not newer than the stored one; keeping the stored one");
                engine.write(batch, Durability::Sync)?;
                remove_file(path)?;
            }
        }
        // The old state, now staged: not needed any more. Deleted without
        // waiting for its space, which `Engine::clear` returns before the
        // next load.
        crate::engine::delete_all_rows(engine, Cf::Staging)?;
        let (elapsed_ms, mb_per_s) = rate(summary.file_bytes, started);
        tracing::info!(
            snapshot = %meta.snapshot_id,
            rows = summary.rows,
            bytes = summary.file_bytes,
            elapsed_ms,
            mb_per_s,
            preloaded,
            "installed snapshot"
        );
        self.apply.snapshot_installed(&EngineTxn::new(engine));
        Ok(())
    }

    /// Offline restore (no Raft running on this store): replaces the whole
    /// state with the checked snapshot file at `path`, with `membership`
    /// instead of the file's, lets `edit` change rows of the result, and
    /// records a fresh snapshot of it. Returns that snapshot's meta.
    pub fn restore(
        &self,
        path: &Path,
        membership: StoredMembership<u64, C::Node>,
        edit: &mut dyn FnMut(&mut dyn Txn) -> crate::Result<()>,
    ) -> crate::Result<SnapshotMeta<u64, C::Node>> {
        let file_meta: SnapshotMeta<u64, C::Node> =
            decode("snapshot file meta", &SnapshotReader::open(path)?.header().meta)?;
        let meta = SnapshotMeta {
            last_log_id: file_meta.last_log_id,
            last_membership: membership,
            snapshot_id: snapshot_id(&file_meta.last_log_id, 0),
        };
        self.install(&meta, path, None)?;
        let engine = self.engine.as_ref();
        let mut txn = EngineTxn::new(engine);
        edit(&mut txn)?;
        let mut batch = WriteBatch::new();
        txn.into_batch(&mut batch);
        engine.write(batch, Durability::Sync)?;
        let mut fresh = None;
        engine.with_view(&mut |view| {
            let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(file_name_for(&meta.last_log_id, seq));
            fresh = Some((write_view::<C, A>(view, self.apply.as_ref(), seq, &path)?.0, path));
            Ok(())
        })?;
        let Some((meta, path)) = fresh else {
            return Err(crate::Error::Io("snapshot view produced nothing".into()));
        };
        let _guard = lock_snapshot(&self.snapshot_lock);
        self.record(&meta, &path, WriteBatch::new())?;
        Ok(meta)
    }

    /// Opens the stored snapshot's file.
    fn open_stored(&self) -> crate::Result<Option<OpenedSnapshot<C>>> {
        let _guard = lock_snapshot(&self.snapshot_lock);
        let Some(stored) = self.stored()? else {
            return Ok(None);
        };
        let path = self.dir.join(&stored.file);
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        Ok(Some(OpenedSnapshot {
            meta: stored.meta,
            file,
            path,
        }))
    }
}

/// Writes every row of `reader` into [`Cf::Staging`] (emptied before) and
/// returns the checked file's summary. Staged rows are worth nothing until a
/// promotion refers to them: no write-ahead log, and a crash leaves them to
/// the next start.
fn load_rows<E: Engine, R: std::io::Read>(engine: &E, reader: &mut SnapshotReader<R>) -> crate::Result<FileSummary> {
    let mut loader = engine.bulk_load(Cf::Staging)?;
    let mut loaded = 0u64;
    let mut next_point = LOAD_STEP_BYTES;
    while let Some((k, v)) = reader.next_row()? {
        loader.put(&k, &v)?;
        loaded += (k.len() + v.len()) as u64;
        if loaded >= next_point {
            crate::crash::point(crate::crash::SNAPSHOT_LOAD, loaded);
            next_point = loaded + LOAD_STEP_BYTES;
        }
    }
    loader.finish()?;
    reader
        .summary()
        .cloned()
        .ok_or_else(|| crate::Error::Io("snapshot rows ended without a summary".into()))
}

/// A preload (see [`crate::preload`]): loads the file that `reader` follows
/// into staging, which the caller took as `generation`.
fn preload_rows<E: Engine>(
    engine: &E,
    reader: GrowingReader,
    path: &Path,
    generation: u64,
) -> crate::Result<Preloaded> {
    engine.clear(Cf::Staging)?;
    let mut reader = SnapshotReader::from_reader(reader, path, 0)?;
    let summary = load_rows(engine, &mut reader)?;
    Ok(Preloaded {
        generation,
        meta: reader.header().meta.clone(),
        summary,
    })
}

/// The file name of `path`, as recorded.
fn file_name(path: &Path) -> crate::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| crate::Error::Io(format!("snapshot path {} has no file name", path.display())))
}

impl<C, E, A> RaftSnapshotBuilder<C> for StateMachineStore<C, E, A>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>, SnapshotData = SnapshotFile>,
    E: Engine,
    A: Apply<C>,
{
    async fn build_snapshot(&mut self) -> SResult<Snapshot<C>> {
        let store = self.clone();
        let (opened, stored) = run_blocking(&self.engine, move |_| store.build())
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, &e)))?;
        // A build older than the stored snapshot is still returned, not an
        // error: openraft 0.9 treats any StorageError as fatal, and it keeps
        // only the snapshot meta with the greatest last log id
        // (`finish_building_snapshot` ignores one that is not newer, and so
        // schedules no purge for it), so the older result is simply dropped.
        tracing::info!(snapshot = %opened.meta.snapshot_id, stored, "built snapshot");
        opened
            .into_snapshot()
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))
    }
}

impl<C, E, A> RaftStateMachine<C> for StateMachineStore<C, E, A>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>, SnapshotData = SnapshotFile>,
    E: Engine,
    A: Apply<C>,
{
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> SResult<AppliedState<C::Node>> {
        applied_from(self.engine.as_ref()).map_err(read_sm_err)
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<C::R>>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut txn = EngineTxn::new(self.engine.as_ref()).with_cache(&self.row_cache);
        let mut responses = Vec::new();
        let mut events = Vec::new();
        let mut last_applied = None;
        let mut membership = None;
        for entry in entries {
            last_applied = Some(entry.log_id);
            let response = match &entry.payload {
                EntryPayload::Normal(data) => self
                    .apply
                    .apply(&mut txn, &entry.log_id, data, &mut events)
                    .map_err(write_sm_err)?,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                    self.apply.empty_response()
                }
                EntryPayload::Blank => self.apply.empty_response(),
            };
            responses.push(response);
        }
        let Some(last_applied) = last_applied else {
            return Ok(responses);
        };
        // Encoded before the transaction hands its writes to the row cache,
        // so that nothing fails between that and the write.
        let applied = encode(&Some(last_applied)).map_err(write_sm_err)?;
        let membership = membership.map(|m| encode(&m)).transpose().map_err(write_sm_err)?;
        let mut batch = WriteBatch::new();
        txn.into_batch(&mut batch);
        batch.put(Cf::Meta, APPLIED_KEY, applied);
        if let Some(m) = membership {
            batch.put(Cf::Meta, MEMBERSHIP_KEY, m);
        }
        // Applied entries are already durable in the log; see the crate docs
        // for why this write needs neither an fsync nor the write-ahead log.
        let written = self.engine.write(batch, Durability::Unlogged);
        let mut cache = lock_cache(&self.row_cache);
        cache.publish_reads();
        if let Err(e) = written {
            // The cache took this step's writes already.
            cache.clear();
            return Err(write_sm_err(e));
        }
        drop(cache);
        self.apply.publish(events);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<SnapshotFile>> {
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("incoming-{}-{seq}.part", unix_ms()));
        tracing::info!(file = %path.display(), "receiving a snapshot");
        let mut file = SnapshotFile::create(&path)
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, &e)))?;
        self.start_preload(&mut file);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, C::Node>,
        snapshot: Box<SnapshotFile>,
    ) -> SResult<()> {
        let sig = meta.signature();
        let received = snapshot.path().to_path_buf();
        let (bytes, since) = snapshot.written();
        let (elapsed_ms, mb_per_s) = rate(bytes, since);
        tracing::info!(snapshot = %meta.snapshot_id, bytes, elapsed_ms, mb_per_s, "received snapshot");
        let mut snapshot = snapshot;
        let preload = snapshot.take_preload();
        // Complete (openraft flushed it when the last chunk arrived, or the
        // stream ended); dropping it only closes this handle.
        drop(snapshot);
        let store = self.clone();
        let meta = meta.clone();
        run_blocking(&self.engine, move |_| store.install(&meta, &received, preload))
            .await
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(Some(sig), &e)))
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<C>>> {
        let store = self.clone();
        let live = self.live.enabled();
        run_blocking(&self.engine, move |_| {
            if live && let Some(snapshot) = store.start_live()? {
                return Ok(Some(snapshot));
            }
            store.open_stored()?.map(OpenedSnapshot::into_snapshot).transpose()
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))
    }
}
