//! The engine interface shared by the RocksDB and in-memory backends.
//!
//! The interface is deliberately small: point reads, ordered range scans,
//! atomic write batches and consistent point-in-time views. Everything above
//! it (log store, state machine, transactions) is written once against this
//! trait, so the in-memory engine exercises the same code paths as RocksDB.
//!
//! Invariants:
//! - A [`WriteBatch`] is applied atomically: after a crash all or none of it
//!   is visible.
//! - A [`Durability::Sync`] write is on stable storage when `write` returns,
//!   and so is every logged write that returned before it (one shared
//!   write-ahead log).
//! - A [`Durability::Unlogged`] write is on stable storage once an
//!   [`Engine::flush`] that started after it returned (or a flush the engine
//!   started on its own). Flushes cover every keyspace up to one point, so a
//!   crash keeps the unlogged writes of some prefix of them, whole batches
//!   at a time. Callers keep the two apart: a key written unlogged is not
//!   written logged before the next flush, which the stores above do by
//!   flushing before an install's synced writes (otherwise a crash could
//!   keep the later logged write and lose the unlogged batch before it).
//! - [`Cf::State`] and [`Cf::Staging`] are two physical keyspaces whose
//!   roles a [`WriteOp::PromoteStaging`] swaps in the same atomic write as
//!   the rest of its batch: a snapshot is loaded into the staging keyspace
//!   ([`Engine::bulk_load`]), then becomes the state at once with its applied
//!   index.
//!   A crash before that write leaves the old state; after it, the new one.
//!   A view sees either role assignment whole.
//! - [`run_blocking`] runs engine work that may block (fsync, snapshot
//!   scans) so that it never stalls the other tasks of an async worker, for
//!   engines that say they may block ([`Engine::may_block`]); callers keep
//!   their own ordering.

use std::sync::Arc;

use crate::Result;

/// Column families: independent ordered keyspaces of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Raft log entries, keyed by big-endian log index.
    Log,
    /// Small records: vote, purge point, applied state, snapshot, identity.
    Meta,
    /// Replicated application tables (see [`crate::Txn`]).
    State,
    /// Where a snapshot is loaded before it replaces [`Cf::State`] (see
    /// [`WriteOp::PromoteStaging`]); empty otherwise.
    Staging,
}

impl Cf {
    /// Every column family, in a fixed order.
    pub const ALL: [Cf; 4] = [Cf::Log, Cf::Meta, Cf::State, Cf::Staging];

    /// The column family's name in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Log => "log",
            Cf::Meta => "meta",
            Cf::State => "state",
            Cf::Staging => "staging",
        }
    }
}

/// Which of the two physical state keyspaces holds [`Cf::State`]; the other
/// holds [`Cf::Staging`]. Recorded in [`Cf::Meta`] by the batch that
/// promotes the staging keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct StateSlot(pub(crate) u8);

impl StateSlot {
    /// Meta key of the slot record (absent: slot 0, as in every data dir
    /// written before snapshots were staged).
    pub(crate) const KEY: &'static [u8] = b"engine/state_slot";

    /// The slot after a promotion.
    pub(crate) fn flipped(self) -> Self {
        Self(1 - self.0)
    }

    /// The physical keyspace (0 or 1) that `cf` names under this slot;
    /// `None` for the column families that are not state.
    pub(crate) fn physical(self, cf: Cf) -> Option<u8> {
        match cf {
            Cf::State => Some(self.0),
            Cf::Staging => Some(1 - self.0),
            Cf::Log | Cf::Meta => None,
        }
    }

    /// Decodes the slot record.
    pub(crate) fn decode(bytes: Option<&[u8]>) -> Result<Self> {
        match bytes {
            None => Ok(Self(0)),
            Some([s @ (0 | 1)]) => Ok(Self(*s)),
            Some(other) => Err(crate::Error::Corrupt {
                what: "state slot",
                detail: format!("{other:?} is not [0] or [1]"),
            }),
        }
    }
}

/// Whether a write must reach stable storage before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the write-ahead log before returning.
    Sync,
    /// Leave it in the OS page cache; a later synced write makes it durable.
    Buffered,
    /// Not written to the write-ahead log at all: durable only once a flush
    /// wrote it to the engine's files ([`Engine::flush`], or one the engine
    /// started when its memory filled), lost on any crash before, even a
    /// process crash. For writes that something else makes recoverable:
    /// apply's (the Raft log holds every entry since the last flush, and a
    /// restart applies them again) and bulk loads whose loss is harmless (a
    /// snapshot staged in [`Cf::Staging`], removed at the next start
    /// anyway). It halves their disk writes.
    Unlogged,
}

/// One mutation of a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Insert or overwrite a key.
    Put {
        /// Column family.
        cf: Cf,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove a key.
    Delete {
        /// Column family.
        cf: Cf,
        /// Key.
        key: Vec<u8>,
    },
    /// Remove every key in `[start, end)`.
    DeleteRange {
        /// Column family.
        cf: Cf,
        /// First key removed.
        start: Vec<u8>,
        /// First key kept.
        end: Vec<u8>,
    },
    /// Makes [`Cf::Staging`] the state and the old state the staging
    /// keyspace, atomically with the rest of the batch. The new staging
    /// keyspace still holds the old state until it is cleared.
    PromoteStaging,
}

/// Mutations applied atomically: after a crash either all or none are visible.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put {
            cf,
            key: key.into(),
            value: value.into(),
        });
    }

    /// Whether the batch promotes the staging keyspace.
    pub fn promotes(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, WriteOp::PromoteStaging))
    }

    /// An upper bound of this batch's size in RocksDB's encoding, for
    /// sizing its buffer once: a 12-byte header, then per operation a tag,
    /// a column family id and each slice's length (varints of at most 5
    /// bytes) before the slices.
    pub fn encoded_bytes_bound(&self) -> usize {
        const HEADER: usize = 12;
        const PER_OP: usize = 1 + 5 + 5 + 5;
        HEADER
            + self
                .ops
                .iter()
                .map(|op| {
                    PER_OP
                        + match op {
                            WriteOp::Put { key, value, .. } => key.len() + value.len(),
                            WriteOp::Delete { key, .. } => key.len(),
                            WriteOp::DeleteRange { start, end, .. } => start.len() + end.len(),
                            // RocksDB's engine writes the flipped slot record.
                            WriteOp::PromoteStaging => StateSlot::KEY.len() + 1,
                        }
                })
                .sum::<usize>()
    }

    /// Adds a delete.
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete { cf, key: key.into() });
    }

    /// Adds a range delete of `[start, end)`.
    pub fn delete_range(&mut self, cf: Cf, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::DeleteRange {
            cf,
            start: start.into(),
            end: end.into(),
        });
    }

    /// Adds a promotion of the staging keyspace (see
    /// [`WriteOp::PromoteStaging`]).
    pub fn promote_staging(&mut self) {
        self.ops.push(WriteOp::PromoteStaging);
    }

    /// The queued mutations, in order.
    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    /// Whether the batch holds no mutation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Called with each pair of a walk over a column family ([`ReadView::for_each`]).
pub type RowVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<()> + 'a;

/// Read access to one consistent state of the engine.
pub trait ReadView {
    /// The value of `key`, if present.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Up to `limit` pairs with `start <= key < end` (no upper bound when
    /// `end` is `None`), in key order.
    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// The pair with the greatest key, if any.
    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>>;

    /// Calls `f` with every pair of `cf` in key order, without holding more
    /// than one pair at a time (snapshot builds of any size).
    fn for_each(&self, cf: Cf, f: &mut RowVisitor<'_>) -> Result<()>;
}

/// A storage engine: a [`ReadView`] of the latest state plus atomic writes and
/// point-in-time views.
pub trait Engine: ReadView + Send + Sync + 'static {
    /// Applies `batch` atomically; with [`Durability::Sync`] it is on stable
    /// storage when this returns.
    fn write(&self, batch: WriteBatch, durability: Durability) -> Result<()>;

    /// Runs `f` over a consistent point-in-time view, unaffected by writes
    /// that happen meanwhile.
    fn with_view(&self, f: &mut dyn FnMut(&dyn ReadView) -> Result<()>) -> Result<()>;

    /// Writes buffered and unlogged data to stable storage, every keyspace
    /// up to one point: at shutdown (so the next open has nothing to
    /// recover), before a snapshot is recorded (so the log it lets go of is
    /// applied durably), and before an install's synced writes.
    fn flush(&self) -> Result<()>;

    /// Makes every write that returned before this call durable: one fsync
    /// of the write-ahead log, as a [`Durability::Sync`] write would do.
    fn sync_log(&self) -> Result<()>;

    /// How long a [`Engine::sync_log`] is made to take on the caller's clock,
    /// for engines that do not block ([`Engine::may_block`] false): the
    /// simulator's model of a disk's fsync. Real engines take real time and
    /// return zero.
    fn sync_latency(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Removes every row of `cf`. Engines that can also return the space at
    /// once do so, so that a [`Engine::bulk_load`] into it starts from an
    /// empty keyspace; views taken before still see the rows.
    fn clear(&self, cf: Cf) -> Result<()> {
        delete_all_rows(self, cf)
    }

    /// A loader of rows in strictly increasing key order into `cf`, which
    /// holds no rows (see [`Engine::clear`]). What it loads is visible once
    /// [`BulkLoad::finish`] returns, durable after [`Engine::flush`], and
    /// may be partly there or lost after a crash before: only for keyspaces
    /// whose content is worth nothing until a later write refers to it
    /// ([`Cf::Staging`]). By default, [`Durability::Unlogged`] write batches.
    fn bulk_load(&self, cf: Cf) -> Result<Box<dyn BulkLoad + '_>> {
        Ok(Box::new(BatchLoad {
            engine: self,
            cf,
            batch: WriteBatch::new(),
            batch_bytes: 0,
        }))
    }

    /// Whether this engine's writes and scans may block the calling thread
    /// (disk I/O, fsync) long enough that async callers should run them on a
    /// blocking thread. Engines that never block (in memory) return `false`,
    /// which keeps them deterministic under a simulated runtime.
    fn may_block(&self) -> bool {
        true
    }
}

/// Rows loaded in bulk into an empty keyspace ([`Engine::bulk_load`]).
pub trait BulkLoad {
    /// Adds a row; keys must come in strictly increasing order.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()>;

    /// Makes every row put so far visible in the keyspace.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Bytes of rows per write of [`BatchLoad`].
const BULK_BATCH_BYTES: usize = 4 << 20;

/// The default [`BulkLoad`]: unlogged write batches of [`BULK_BATCH_BYTES`].
struct BatchLoad<'e, E: Engine + ?Sized> {
    engine: &'e E,
    cf: Cf,
    batch: WriteBatch,
    batch_bytes: usize,
}

impl<E: Engine + ?Sized> BulkLoad for BatchLoad<'_, E> {
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.batch_bytes += key.len() + value.len();
        self.batch.put(self.cf, key, value);
        if self.batch_bytes >= BULK_BATCH_BYTES {
            self.batch_bytes = 0;
            self.engine
                .write(std::mem::take(&mut self.batch), Durability::Unlogged)?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.engine.write(self.batch, Durability::Unlogged)
    }
}

/// Deletes every row of `cf` in one buffered write (a range deletion from
/// the empty key to just past its last key), leaving the space to the
/// engine.
pub(crate) fn delete_all_rows<E: Engine + ?Sized>(engine: &E, cf: Cf) -> Result<()> {
    let Some((mut end, _)) = engine.last(cf)? else {
        return Ok(());
    };
    end.push(0);
    let mut batch = WriteBatch::new();
    batch.delete_range(cf, Vec::new(), end);
    engine.write(batch, Durability::Buffered)
}

/// Every pair of `cf` in key order (a data dir upgrade of a small state).
pub(crate) fn scan_all(view: &dyn ReadView, cf: Cf) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut rows = Vec::new();
    view.for_each(cf, &mut |k, v| {
        rows.push((k.to_vec(), v.to_vec()));
        Ok(())
    })?;
    Ok(rows)
}

/// Runs `f` over `engine` on the calling thread; when the engine may block
/// and the runtime has several workers, inside `block_in_place`, so the
/// runtime moves this worker's other tasks (heartbeats, replication) to
/// another thread while the disk works. No hand-off to another thread and
/// back (measured: a `spawn_blocking` hop or an fsync thread cost up to a
/// fifth of the throughput on two cores), and calls made one after another
/// by a caller stay in order.
pub(crate) async fn run_blocking<E, T, F>(engine: &Arc<E>, f: F) -> Result<T>
where
    E: Engine,
    F: FnOnce(&E) -> Result<T>,
{
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if engine.may_block() && multi_thread {
        tokio::task::block_in_place(|| f(engine))
    } else {
        f(engine)
    }
}
