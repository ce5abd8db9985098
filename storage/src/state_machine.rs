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

use std::io::Cursor;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, RaftTypeConfig, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::engine::{Cf, Durability, Engine, ReadView, WriteBatch};
use crate::error::{decode, encode};
use crate::txn::{EngineTxn, Txn};

const APPLIED_KEY: &[u8] = b"sm/applied";
const MEMBERSHIP_KEY: &[u8] = b"sm/membership";
const SNAPSHOT_KEY: &[u8] = b"sm/snapshot";
/// Format of [`SnapshotPayload`]; bumped on incompatible changes.
const SNAPSHOT_FORMAT: u32 = 1;
/// Rows read per scan while building a snapshot.
const SNAPSHOT_PAGE: usize = 4096;

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
    _c: PhantomData<fn() -> C>,
}

impl<C, E, A> Clone for StateMachineStore<C, E, A> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            apply: self.apply.clone(),
            snapshot_seq: self.snapshot_seq.clone(),
            _c: PhantomData,
        }
    }
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
    /// A state machine over `engine`, applying commands with `apply`.
    pub fn new(engine: Arc<E>, apply: Arc<A>) -> crate::Result<Self> {
        Ok(Self {
            engine,
            apply,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
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

    fn build(&self) -> crate::Result<StoredSnapshot<C>> {
        let mut out = None;
        self.engine.with_view(&mut |view| {
            let (last_log_id, last_membership) = Self::applied_from(view)?;
            let mut rows = Vec::new();
            let mut start = Vec::new();
            loop {
                let page = view.scan(Cf::State, &start, None, SNAPSHOT_PAGE)?;
                let full = page.len() == SNAPSHOT_PAGE;
                if let Some((k, _)) = page.last() {
                    start = k.clone();
                    start.push(0);
                }
                rows.extend(page);
                if !full {
                    break;
                }
            }
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
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
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
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, SNAPSHOT_KEY, encode(&stored)?);
        // Buffered is enough: the purge that may follow goes through the same
        // write-ahead log after this record, so it never survives without it.
        self.engine.write(batch, Durability::Buffered)?;
        Ok(stored)
    }
}

impl<C, E, A> RaftSnapshotBuilder<C> for StateMachineStore<C, E, A>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>, SnapshotData = Cursor<Vec<u8>>>,
    E: Engine,
    A: Apply<C>,
{
    async fn build_snapshot(&mut self) -> SResult<Snapshot<C>> {
        let StoredSnapshot { meta, data } = self
            .build()
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, &e)))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
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
        let snap_err = |e: crate::Error| StorageError::from(StorageIOError::read_snapshot(Some(sig.clone()), &e));
        let data = snapshot.into_inner();
        let payload: SnapshotPayload = decode("snapshot", &data).map_err(snap_err)?;
        if payload.format != SNAPSHOT_FORMAT {
            return Err(snap_err(crate::Error::Corrupt {
                what: "snapshot",
                detail: format!("format {} is not {SNAPSHOT_FORMAT}", payload.format),
            }));
        }
        tracing::info!(snapshot = %meta.snapshot_id, rows = payload.rows.len(), bytes = data.len(), "installing snapshot");
        let mut batch = WriteBatch::new();
        // Table names are UTF-8, which never contains 0xff, so every state
        // key sorts below [0xff].
        batch.delete_range(Cf::State, Vec::new(), vec![0xff]);
        for (k, v) in payload.rows {
            batch.put(Cf::State, k, v);
        }
        batch.put(Cf::Meta, APPLIED_KEY, encode(&meta.last_log_id).map_err(snap_err)?);
        batch.put(
            Cf::Meta,
            MEMBERSHIP_KEY,
            encode(&meta.last_membership).map_err(snap_err)?,
        );
        let stored = StoredSnapshot::<C> {
            meta: meta.clone(),
            data,
        };
        batch.put(Cf::Meta, SNAPSHOT_KEY, encode(&stored).map_err(snap_err)?);
        self.engine.write(batch, Durability::Sync).map_err(snap_err)?;
        self.apply.snapshot_installed(&EngineTxn::new(self.engine.as_ref()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<C>>> {
        let read_err = |e: crate::Error| StorageError::from(StorageIOError::read_snapshot(None, &e));
        let Some(bytes) = self.engine.get(Cf::Meta, SNAPSHOT_KEY).map_err(read_err)? else {
            return Ok(None);
        };
        let stored: StoredSnapshot<C> = decode("stored snapshot", &bytes).map_err(read_err)?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
