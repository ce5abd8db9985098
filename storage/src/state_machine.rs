//! openraft's `RaftStateMachine` over any [`Engine`], generic over the
//! application through [`Apply`].
//!
//! Invariants:
//! - One apply call is one atomic engine write holding the data of every
//!   entry, the last applied log id and the last membership: after a crash the
//!   state is exactly that of some applied prefix of the log.
//! - Snapshots are read from a point-in-time view, so they are consistent
//!   with the applied id they carry even while applies continue.
//! - Installing a snapshot replaces the whole state in one atomic write.
//! - The stored snapshot (what `get_current_snapshot` returns) only moves
//!   forward: a built or installed snapshot replaces it only when its last log
//!   id is greater, and that read-compare-write runs under one lock shared by
//!   every clone of the store, so a slow build never overwrites a newer
//!   snapshot installed meanwhile.
//! - Snapshot builds, installs and reads of the stored snapshot run through
//!   `engine::run_blocking`, so they never stall the other tasks of an async
//!   worker; each call returns after that work, so applies and installs stay
//!   in the order openraft issues them.

use std::io::Cursor;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cell0_state::codec::frame_unversioned;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, RaftTypeConfig, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::engine::{Cf, Durability, Engine, ReadView, WriteBatch, run_blocking, scan_all};
use crate::error::{decode, decode_prefix, encode};
use crate::txn::{EngineTxn, Txn};

const APPLIED_KEY: &[u8] = b"sm/applied";
const MEMBERSHIP_KEY: &[u8] = b"sm/membership";
const SNAPSHOT_KEY: &[u8] = b"sm/snapshot";
/// Format of [`SnapshotPayload`] this build writes: 2 holds rows with their
/// layout byte. Format 1 (rows without it, from builds before data dir
/// format 1) is still installed, its rows framed as layout 1.
const SNAPSHOT_FORMAT: u32 = 2;
/// The snapshot format whose rows carry no layout byte.
const SNAPSHOT_FORMAT_UNVERSIONED: u32 = 1;

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

    /// Called after a snapshot replaced the whole state, with read access to
    /// the new state.
    fn snapshot_installed(&self, state: &dyn Txn);
}

/// A snapshot as stored in [`Cf::Meta`]: openraft's meta plus the payload.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct StoredSnapshot<C: RaftTypeConfig> {
    /// Must stay the first field: [`stored_snapshot_log_id`] decodes it alone.
    meta: SnapshotMeta<u64, C::Node>,
    data: Vec<u8>,
}

/// Snapshot payload: every row of [`Cf::State`], in key order.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
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
    snapshot_seq: Arc<AtomicU64>,
    /// Held across the read-compare-write of the stored snapshot, by builds
    /// and installs of every clone.
    snapshot_lock: Arc<Mutex<()>>,
    _c: PhantomData<fn() -> C>,
}

impl<C, E, A> Clone for StateMachineStore<C, E, A> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            apply: self.apply.clone(),
            snapshot_seq: self.snapshot_seq.clone(),
            snapshot_lock: self.snapshot_lock.clone(),
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
    // Decode only the meta (the first field), not the payload.
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

impl<C, E, A> StateMachineStore<C, E, A>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>, SnapshotData = Cursor<Vec<u8>>>,
    E: Engine,
    A: Apply<C>,
{
    /// A state machine over `engine`, applying commands with `apply`. A
    /// data dir of an older format is upgraded first (see `format`).
    pub fn new(engine: Arc<E>, apply: Arc<A>) -> crate::Result<Self> {
        crate::format::upgrade(engine.as_ref())?;
        Ok(Self {
            engine,
            apply,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            snapshot_lock: Arc::new(Mutex::new(())),
            _c: PhantomData,
        })
    }

    /// The engine, for read paths that bypass Raft (serializable reads).
    pub fn engine(&self) -> &Arc<E> {
        &self.engine
    }

    fn applied_from(view: &dyn ReadView) -> crate::Result<AppliedState<C::Node>> {
        let applied = match view.get(Cf::Meta, APPLIED_KEY)? {
            Some(b) => decode::<Option<LogId<u64>>>("applied log id", &b)?,
            None => None,
        };
        let membership = match view.get(Cf::Meta, MEMBERSHIP_KEY)? {
            Some(b) => decode::<StoredMembership<u64, C::Node>>("membership", &b)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    /// Builds a snapshot from a point-in-time view of `engine` and stores it
    /// if it is newer than the stored one. Returns the snapshot and whether it
    /// was stored.
    fn build(
        engine: &E,
        snapshot_seq: &AtomicU64,
        snapshot_lock: &Mutex<()>,
    ) -> crate::Result<(StoredSnapshot<C>, bool)> {
        let mut out = None;
        engine.with_view(&mut |view| {
            let (last_log_id, last_membership) = Self::applied_from(view)?;
            let rows = scan_all(view, Cf::State)?;
            let data = encode(&SnapshotPayload {
                format: SNAPSHOT_FORMAT,
                rows,
            })?;
            out = Some((last_log_id, last_membership, data));
            Ok(())
        })?;
        let Some((last_log_id, last_membership, data)) = out else {
            return Err(crate::Error::Io("snapshot view produced nothing".into()));
        };
        let seq = snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match &last_log_id {
            Some(id) => format!("{}-{}-{}-{seq}", id.leader_id.term, id.leader_id.node_id, id.index),
            None => format!("empty-{seq}"),
        };
        let stored = StoredSnapshot::<C> {
            meta: SnapshotMeta {
                last_log_id,
                last_membership,
                snapshot_id,
            },
            data,
        };
        let _guard = lock_snapshot(snapshot_lock);
        // A snapshot installed (or built) while this one was being built may
        // be newer than this build's view: never replace it with an older
        // one, or lagging followers would be sent stale state from now on.
        if !supersedes(&stored.meta.last_log_id, stored_snapshot_log_id::<C>(engine)?) {
            return Ok((stored, false));
        }
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, SNAPSHOT_KEY, encode(&stored)?);
        // Buffered is enough: the purge that may follow goes through the same
        // write-ahead log after this record, so it never survives without it.
        engine.write(batch, Durability::Buffered)?;
        Ok((stored, true))
    }

    /// Replaces the whole state of `engine` with a received snapshot, stores
    /// the snapshot if it is newer than the stored one, then tells `apply`.
    fn install(
        engine: &E,
        apply: &A,
        snapshot_lock: &Mutex<()>,
        meta: SnapshotMeta<u64, C::Node>,
        data: Vec<u8>,
    ) -> crate::Result<()> {
        let payload: SnapshotPayload = decode("snapshot", &data)?;
        let unversioned = match payload.format {
            SNAPSHOT_FORMAT => false,
            SNAPSHOT_FORMAT_UNVERSIONED => true,
            other => {
                return Err(crate::Error::Corrupt {
                    what: "snapshot",
                    detail: format!("format {other} is neither {SNAPSHOT_FORMAT_UNVERSIONED} nor {SNAPSHOT_FORMAT}"),
                });
            }
        };
        tracing::info!(snapshot = %meta.snapshot_id, rows = payload.rows.len(), bytes = data.len(), "installing snapshot");
        let mut batch = WriteBatch::new();
        // Table names are UTF-8, which never contains 0xff, so every state
        // key sorts below [0xff].
        batch.delete_range(Cf::State, Vec::new(), vec![0xff]);
        for (k, v) in payload.rows {
            let v = if unversioned { frame_unversioned(&v) } else { v };
            batch.put(Cf::State, k, v);
        }
        batch.put(Cf::Meta, APPLIED_KEY, encode(&meta.last_log_id)?);
        batch.put(Cf::Meta, MEMBERSHIP_KEY, encode(&meta.last_membership)?);
        {
            let _guard = lock_snapshot(snapshot_lock);
            // openraft installs only snapshots beyond its committed index, and
            // a stored snapshot never goes beyond the applied one, so this
            // holds in practice; checked anyway so the stored snapshot can
            // only move forward. The state is replaced either way, as openraft
            // asks.
            if supersedes(&meta.last_log_id, stored_snapshot_log_id::<C>(engine)?) {
                let stored = StoredSnapshot::<C> { meta, data };
                batch.put(Cf::Meta, SNAPSHOT_KEY, encode(&stored)?);
            } else {
                tracing::warn!(snapshot = %meta.snapshot_id, "installed snapshot is not newer than the stored one; keeping the stored one");
            }
            engine.write(batch, Durability::Sync)?;
        }
        apply.snapshot_installed(&EngineTxn::new(engine));
        Ok(())
    }
}

impl<C, E, A> RaftSnapshotBuilder<C> for StateMachineStore<C, E, A>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>, SnapshotData = Cursor<Vec<u8>>>,
    E: Engine,
    A: Apply<C>,
{
    async fn build_snapshot(&mut self) -> SResult<Snapshot<C>> {
        let seq = self.snapshot_seq.clone();
        let lock = self.snapshot_lock.clone();
        let (StoredSnapshot { meta, data }, stored) =
            run_blocking(&self.engine, move |engine| Self::build(engine, &seq, &lock))
                .await
                .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, &e)))?;
        // A build older than the stored snapshot is still returned, not an
        // error: openraft 0.9 treats any StorageError as fatal, and it keeps
        // only the snapshot meta with the greatest last log id
        // (`finish_building_snapshot` ignores one that is not newer, and so
        // schedules no purge for it), so the older result is simply dropped.
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), stored, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl<C, E, A> RaftStateMachine<C> for StateMachineStore<C, E, A>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>, SnapshotData = Cursor<Vec<u8>>>,
    E: Engine,
    A: Apply<C>,
{
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> SResult<AppliedState<C::Node>> {
        Self::applied_from(self.engine.as_ref()).map_err(read_sm_err)
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<C::R>>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut txn = EngineTxn::new(self.engine.as_ref());
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
        let mut batch = WriteBatch::new();
        txn.into_batch(&mut batch);
        batch.put(
            Cf::Meta,
            APPLIED_KEY,
            encode(&Some(last_applied)).map_err(write_sm_err)?,
        );
        if let Some(m) = membership {
            batch.put(Cf::Meta, MEMBERSHIP_KEY, encode(&m).map_err(write_sm_err)?);
        }
        // Applied entries are already durable in the log; see the crate docs
        // for why this write needs no fsync of its own.
        self.engine.write(batch, Durability::Buffered).map_err(write_sm_err)?;
        self.apply.publish(events);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, C::Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let sig = meta.signature();
        let apply = self.apply.clone();
        let lock = self.snapshot_lock.clone();
        let meta = meta.clone();
        let data = snapshot.into_inner();
        run_blocking(&self.engine, move |engine| {
            Self::install(engine, &apply, &lock, meta, data)
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::read_snapshot(Some(sig), &e)))
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<C>>> {
        let stored = run_blocking(&self.engine, |engine| match engine.get(Cf::Meta, SNAPSHOT_KEY)? {
            Some(bytes) => Ok(Some(decode::<StoredSnapshot<C>>("stored snapshot", &bytes)?)),
            None => Ok(None),
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
