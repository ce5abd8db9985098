//! openraft's `RaftLogStorage` over any [`Engine`].
//!
//! Invariants:
//! - `append_as_leader` (a leader's own new entries) returns once they are
//!   written (buffered, one engine write): from then on they are readable,
//!   so the leader sends them to its followers while they sync. It hands its
//!   callback `Ok` only after a sync of the engine's log that started after
//!   that write returned ([`Engine::sync_log`]): an acknowledged entry
//!   survives a power loss. openraft (patched, `consensus/vendor/README.md`)
//!   counts the leader's own copy towards the commit quorum only then.
//! - `append` (a follower's, which waits for the callback before it
//!   answers) writes synced and then calls the callback, on the calling
//!   thread: cheaper than a hand-off to the sync loop and back. While the
//!   disk's last such sync took under [`INLINE_SYNC_LIMIT`] it does so
//!   without `block_in_place`, on the worker itself. In-memory
//!   engines take the leader's path for both, so that the simulator's sync
//!   latency ([`Engine::sync_latency`]) applies to every member.
//! - Syncs are grouped: one runs at a time, off the caller's task (a
//!   blocking thread; for in-memory engines a task that first waits the
//!   engine's simulated latency), and covers every append written before it
//!   started; it ends as soon as no append waits, so nothing outlives the
//!   appends it serves.
//! - The vote is written synced before `save_vote` returns.
//! - The purge point is written in the same batch that deletes the entries,
//!   so the log never has a gap openraft does not know of.
//! - The commit record is best effort, as openraft allows: `save_committed`
//!   only remembers it, and the next `append` writes it in its own batch,
//!   so a commit costs no engine write of its own on any node. openraft
//!   reads the record only at start, to re-apply committed entries the
//!   state machine lacks; an older record (or none) only leaves them to be
//!   applied once the leader tells the commit index again, and the state
//!   machine's applied index, written with every apply, bounds it from
//!   below.
//! - Synced writes (the vote, truncation, and a follower's append after a
//!   slow sync) run through `engine::run_blocking`, so a slow fsync never
//!   stalls the other tasks of an async worker (heartbeats). A leader's
//!   buffered append is written on the calling thread: it waits for no
//!   disk, and `block_in_place` (which wakes a thread to take over the
//!   worker's other tasks) cost more than the write, on every write's path
//!   (docs/benchmarks.md). Each call
//!   returns after its write, so writes reach the engine in the order
//!   openraft issues them.
//! - The newest entries stay in memory too (`recent`, at most
//!   [`RECENT_ENTRIES_BYTES`] of encoded entries, each exactly the log's
//!   entry at its index): reads that start among them (apply, replication
//!   to followers that keep up) take them from there, and only older ones
//!   are read from the engine and decoded.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError, Vote};

use crate::engine::{Cf, Durability, Engine, ReadView, WriteBatch, run_blocking};
use crate::error::{decode, encode};
use crate::recent::{RecentEntries, SizedEntry};

/// Seconds each durable write of log entries took on this node: a leader's
/// grouped sync, or a follower's synced append (write and fsync).
pub const FSYNC_SECONDS_METRIC: &str = "cell0_raft_log_fsync_duration_seconds";
/// Appends made durable by one of those (its buckets are counts).
pub const APPENDS_PER_FSYNC_METRIC: &str = "cell0_raft_log_appends_per_fsync";
/// Log entries read back (apply, replication), labelled by where from:
/// `source="memory"` (the recent entries) or `source="engine"` (decoded).
pub const ENTRIES_READ_METRIC: &str = "cell0_raft_log_entries_read_total";
/// Most bytes of encoded entries a log store keeps in memory.
pub const RECENT_ENTRIES_BYTES: usize = 4 << 20;
/// A follower's synced append runs on the calling async worker while the
/// previous one took less than this; after a slower one (a slow disk), the
/// next runs in `block_in_place`, so the worker's other tasks move to
/// another thread while the disk works.
const INLINE_SYNC_LIMIT: Duration = Duration::from_millis(1);

const VOTE_KEY: &[u8] = b"raft/vote";
const COMMITTED_KEY: &[u8] = b"raft/committed";
const PURGED_KEY: &[u8] = b"raft/last_purged";

/// Repairs the log after a snapshot install that a crash interrupted.
///
/// openraft purges the log up to a received snapshot as soon as it hands the
/// snapshot to the state machine, before the state machine has loaded it; a
/// crash in between leaves the log purged past the applied state, which
/// openraft refuses at the next start (the purge point must not pass the
/// committed index). Nothing is lost by moving the purge point back to the
/// applied state: the leader counts the snapshot only once it is installed,
/// so no entry at or after it was acknowledged, and none can be in the log
/// (entries follow a snapshot only once it is installed; any found is an
/// error, not repaired). The commit record is clamped the same way. The
/// leader then sends the snapshot again.
pub(crate) fn repair_interrupted_install<E: Engine>(engine: &E, applied: Option<LogId<u64>>) -> crate::Result<()> {
    let purged: Option<LogId<u64>> = read_meta(engine, PURGED_KEY, "last purged log id")?;
    if purged <= applied {
        return Ok(());
    }
    if engine.last(Cf::Log)?.is_some() {
        return Err(crate::Error::Corrupt {
            what: "raft log",
            detail: format!("purged up to {purged:?}, past the applied state {applied:?}, with entries after it"),
        });
    }
    let committed: Option<LogId<u64>> = read_meta(engine, COMMITTED_KEY, "committed log id")?.flatten();
    tracing::warn!(
        ?purged,
        ?applied,
        "a snapshot install was interrupted; the leader will send it again"
    );
    let mut batch = WriteBatch::new();
    match applied {
        Some(a) => batch.put(Cf::Meta, PURGED_KEY, encode(&a)?),
        None => batch.delete(Cf::Meta, PURGED_KEY),
    }
    batch.put(Cf::Meta, COMMITTED_KEY, encode(&committed.min(applied))?);
    engine.write(batch, Durability::Sync)
}

/// Key of the log entry at `index`: big-endian, so keys sort by index.
fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The Raft log and vote of one node.
pub struct LogStore<C: RaftTypeConfig, E> {
    engine: Arc<E>,
    /// Most bytes of encoded entries one replication read returns (always at
    /// least one entry).
    read_budget: usize,
    /// The commit record not written yet.
    unwritten_commit: Arc<UnwrittenCommit>,
    /// Appends written and waiting for their sync.
    syncs: Arc<Syncs<C>>,
    /// The newest entries, decoded.
    recent: Arc<RecentEntries<C>>,
    /// Its metric handles, shared with its clones and its sync loop.
    metrics: Arc<LogMetrics>,
    /// How long this store's last synced append (a follower's) took: under
    /// [`INLINE_SYNC_LIMIT`], the next one runs on the calling worker.
    last_append_sync: Duration,
}

impl<C: RaftTypeConfig, E> Clone for LogStore<C, E> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            read_budget: self.read_budget,
            unwritten_commit: self.unwritten_commit.clone(),
            syncs: self.syncs.clone(),
            recent: self.recent.clone(),
            metrics: self.metrics.clone(),
            last_append_sync: self.last_append_sync,
        }
    }
}

/// Starts the sync loop of `syncs`: on a blocking thread for engines that
/// block, as a task that first waits the engine's simulated sync latency
/// otherwise (in memory, on the simulator's clock), inline without a runtime.
/// The loop ends as soon as no append waits.
fn start_syncs<C: RaftTypeConfig, E: Engine>(syncs: Arc<Syncs<C>>, engine: Arc<E>, metrics: Arc<LogMetrics>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        syncs.run(&*engine, &metrics);
        return;
    };
    if engine.may_block() {
        runtime.spawn_blocking(move || syncs.run(&*engine, &metrics));
    } else {
        runtime.spawn(async move {
            let latency = engine.sync_latency();
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            syncs.run(&*engine, &metrics);
        });
    }
}

/// A log store's metric handles, found in the metrics recorder once:
/// finding one by name hashes its key, on every append and read.
struct LogMetrics {
    /// [`FSYNC_SECONDS_METRIC`].
    fsync_seconds: metrics::Histogram,
    /// [`APPENDS_PER_FSYNC_METRIC`].
    appends_per_fsync: metrics::Histogram,
    /// [`ENTRIES_READ_METRIC`] `{source="memory"}`.
    read_from_memory: metrics::Counter,
    /// [`ENTRIES_READ_METRIC`] `{source="engine"}`.
    read_from_engine: metrics::Counter,
}

/// Where log entries were read back from.
#[derive(Clone, Copy)]
enum ReadSource {
    /// The recent entries, in memory.
    Memory,
    /// The engine, decoded.
    Engine,
}

impl LogMetrics {
    fn new() -> Self {
        Self {
            fsync_seconds: metrics::histogram!(FSYNC_SECONDS_METRIC),
            appends_per_fsync: metrics::histogram!(APPENDS_PER_FSYNC_METRIC),
            read_from_memory: metrics::counter!(ENTRIES_READ_METRIC, "source" => "memory"),
            read_from_engine: metrics::counter!(ENTRIES_READ_METRIC, "source" => "engine"),
        }
    }

    /// Records one durable write of log entries that started at `started`
    /// and made `appends` appends durable.
    fn fsync(&self, started: Instant, appends: usize) {
        self.fsync_seconds.record(started.elapsed().as_secs_f64());
        self.appends_per_fsync.record(appends as f64);
    }

    /// Counts `entries` read back from `source`.
    fn reads(&self, entries: usize, source: ReadSource) {
        if entries > 0 {
            let counter = match source {
                ReadSource::Memory => &self.read_from_memory,
                ReadSource::Engine => &self.read_from_engine,
            };
            counter.increment(entries as u64);
        }
    }
}

/// The error openraft's flush callback gets for a failed engine write.
fn flush_error(e: &crate::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Group commit of appends: the callbacks of appends whose entries are
/// written (visible) but not yet synced, and whether a sync is running. One
/// sync at a time covers every append written before it started.
struct Syncs<C: RaftTypeConfig> {
    state: Mutex<SyncState<C>>,
}

struct SyncState<C: RaftTypeConfig> {
    waiting: Vec<LogFlushed<C>>,
    running: bool,
}

impl<C: RaftTypeConfig> Default for Syncs<C> {
    fn default() -> Self {
        Self {
            state: Mutex::new(SyncState {
                waiting: Vec::new(),
                running: false,
            }),
        }
    }
}

impl<C: RaftTypeConfig> Syncs<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState<C>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `callback` for the next sync; true when the caller must start
    /// the sync loop (none runs).
    fn queue(&self, callback: LogFlushed<C>) -> bool {
        let mut state = self.lock();
        state.waiting.push(callback);
        !std::mem::replace(&mut state.running, true)
    }

    /// Syncs until nothing waits, then marks the loop stopped.
    fn run<E: Engine>(&self, engine: &E, metrics: &LogMetrics) {
        loop {
            let batch = {
                let mut state = self.lock();
                if state.waiting.is_empty() {
                    state.running = false;
                    return;
                }
                std::mem::take(&mut state.waiting)
            };
            let started = Instant::now();
            let result = engine.sync_log();
            metrics.fsync(started, batch.len());
            for callback in batch {
                callback.log_io_completed(result.as_ref().map(|_| ()).map_err(flush_error));
            }
        }
    }
}

/// The newest commit record openraft saved that no engine write carried
/// yet (`None` inside: "nothing committed").
#[derive(Debug, Default)]
struct UnwrittenCommit(Mutex<Option<Option<LogId<u64>>>>);

impl UnwrittenCommit {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Option<LogId<u64>>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers `committed` for the next write.
    fn set(&self, committed: Option<LogId<u64>>) {
        *self.lock() = Some(committed);
    }

    /// The record to write, if one is waiting; it is written (or lost with
    /// a failed write, which the next `save_committed` makes good).
    fn take(&self) -> Option<Option<LogId<u64>>> {
        self.lock().take()
    }

    /// The record waiting to be written, if any.
    fn peek(&self) -> Option<Option<LogId<u64>>> {
        *self.lock()
    }
}

/// Entries read per engine scan while a replication read fills its budget.
const READ_PAGE_ENTRIES: usize = 16;

impl<C: RaftTypeConfig, E: Engine> LogStore<C, E> {
    /// A log store over `engine`.
    pub fn new(engine: Arc<E>) -> Self {
        Self {
            engine,
            read_budget: usize::MAX,
            unwritten_commit: Arc::default(),
            syncs: Arc::default(),
            recent: Arc::new(RecentEntries::new(RECENT_ENTRIES_BYTES)),
            metrics: Arc::new(LogMetrics::new()),
            last_append_sync: Duration::ZERO,
        }
    }

    /// This store keeping at most `bytes` of encoded entries in memory
    /// instead of [`RECENT_ENTRIES_BYTES`] (0: every read decodes).
    pub fn with_recent_entries(mut self, bytes: usize) -> Self {
        self.recent = Arc::new(RecentEntries::new(bytes));
        self
    }

    /// This store with replication reads (openraft's
    /// `limited_get_log_entries`) cut at `bytes` of encoded entries, so one
    /// AppendEntries call holds at most that much (and at least one entry)
    /// however many entries it may carry.
    pub fn with_read_budget(mut self, bytes: usize) -> Self {
        self.read_budget = bytes;
        self
    }
}

type SResult<T> = Result<T, StorageError<u64>>;

fn read_err(e: crate::Error) -> StorageError<u64> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: crate::Error) -> StorageError<u64> {
    StorageIOError::write_logs(&e).into()
}

impl<C, E> LogStore<C, E>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>>,
    E: Engine,
{
    /// Offline (no Raft running on this store): makes the log empty, purged
    /// up to `last`, with `vote` and no commit record, as after installing
    /// a snapshot that ends at `last` (`cell0 snapshot restore`). The vote's
    /// term must be at least `last`'s, so the next election's term is above
    /// every entry's.
    pub fn reset_to_snapshot(&self, last: Option<LogId<u64>>, vote: &Vote<u64>) -> crate::Result<()> {
        self.recent.clear();
        let mut batch = WriteBatch::new();
        batch.delete_range(Cf::Log, log_key(0), log_key(u64::MAX));
        batch.delete(Cf::Log, log_key(u64::MAX));
        batch.put(Cf::Meta, VOTE_KEY, encode(vote)?);
        batch.delete(Cf::Meta, COMMITTED_KEY);
        match last {
            Some(last) => batch.put(Cf::Meta, PURGED_KEY, encode(&last)?),
            None => batch.delete(Cf::Meta, PURGED_KEY),
        }
        self.engine.write(batch, Durability::Sync)
    }

    /// Offline (no Raft running on this store): appends `entries` after the
    /// last one and records `vote`, in one synced write (`cell0 operator
    /// recover`).
    pub fn force_append(&self, entries: &[Entry<C>], vote: &Vote<u64>) -> crate::Result<()> {
        self.recent.clear();
        let mut batch = WriteBatch::new();
        for entry in entries {
            batch.put(Cf::Log, log_key(entry.log_id.index), encode(entry)?);
        }
        batch.put(Cf::Meta, VOTE_KEY, encode(vote)?);
        self.engine.write(batch, Durability::Sync)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8], what: &'static str) -> crate::Result<Option<T>> {
        read_meta(self.engine.as_ref(), key, what)
    }
}

/// The record `key` of [`Cf::Meta`], decoded, if present.
fn read_meta<T: serde::de::DeserializeOwned>(
    engine: &dyn ReadView,
    key: &[u8],
    what: &'static str,
) -> crate::Result<Option<T>> {
    match engine.get(Cf::Meta, key)? {
        Some(bytes) => Ok(Some(decode(what, &bytes)?)),
        None => Ok(None),
    }
}

impl<C, E> RaftLogReader<C> for LogStore<C, E>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>>,
    C::D: Clone,
    E: Engine,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<C>>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.checked_add(1),
            Bound::Excluded(x) => Some(*x),
            Bound::Unbounded => None,
        };
        if let Some(end) = end
            && end <= start
        {
            return Ok(Vec::new());
        }
        let mut entries = self.recent.read(start, end.unwrap_or(u64::MAX), usize::MAX).entries;
        let next = start + entries.len() as u64;
        self.metrics.reads(entries.len(), ReadSource::Memory);
        if end.is_some_and(|end| next >= end) {
            return Ok(entries);
        }
        let end_key = end.map(log_key);
        let rows = self
            .engine
            .scan(Cf::Log, &log_key(next), end_key.as_ref().map(|k| &k[..]), usize::MAX)
            .map_err(read_err)?;
        self.metrics.reads(rows.len(), ReadSource::Engine);
        for (_, v) in &rows {
            entries.push(decode::<Entry<C>>("log entry", v).map_err(read_err)?);
        }
        Ok(entries)
    }

    /// The entries from `start` on, before `end`, up to the read budget in
    /// encoded bytes (always at least one).
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> SResult<Vec<Entry<C>>> {
        let served = self.recent.read(start, end, self.read_budget);
        let mut entries = served.entries;
        let mut bytes = served.bytes;
        let mut next = start + entries.len() as u64;
        self.metrics.reads(entries.len(), ReadSource::Memory);
        if served.budget_spent {
            return Ok(entries);
        }
        let end_key = log_key(end);
        let from_memory = entries.len();
        while next < end {
            let rows = self
                .engine
                .scan(Cf::Log, &log_key(next), Some(&end_key), READ_PAGE_ENTRIES)
                .map_err(read_err)?;
            if rows.is_empty() {
                break;
            }
            for (_, v) in &rows {
                bytes = bytes.saturating_add(v.len());
                if bytes > self.read_budget && !entries.is_empty() {
                    self.metrics.reads(entries.len() - from_memory, ReadSource::Engine);
                    return Ok(entries);
                }
                let entry = decode::<Entry<C>>("log entry", v).map_err(read_err)?;
                next = entry.log_id.index + 1;
                entries.push(entry);
            }
        }
        self.metrics.reads(entries.len() - from_memory, ReadSource::Engine);
        Ok(entries)
    }
}

impl<C, E> LogStore<C, E>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>>,
    E: Engine,
{
    /// One batch holding `entries` and the commit record waiting to be
    /// written, if any; and the entries with their encoded sizes, for the
    /// recent entries once the batch is written.
    fn append_batch<I>(&self, entries: I) -> SResult<(WriteBatch, Vec<SizedEntry<C>>)>
    where
        I: IntoIterator<Item = Entry<C>>,
    {
        let mut batch = WriteBatch::new();
        let mut appended = Vec::new();
        for entry in entries {
            let encoded = encode(&entry).map_err(write_err)?;
            let encoded_len = encoded.len();
            batch.put(Cf::Log, log_key(entry.log_id.index), encoded);
            appended.push(SizedEntry { entry, encoded_len });
        }
        if let Some(committed) = self.unwritten_commit.take() {
            batch.put(Cf::Meta, COMMITTED_KEY, encode(&committed).map_err(write_err)?);
        }
        Ok((batch, appended))
    }

    /// Writes `batch` buffered (readable once this returns), on this
    /// thread, adds `appended` to the recent entries and queues `callback`
    /// for the next grouped sync.
    async fn write_then_sync(
        &self,
        batch: WriteBatch,
        appended: Vec<SizedEntry<C>>,
        callback: LogFlushed<C>,
    ) -> SResult<()> {
        if let Err(e) = self.engine.write(batch, Durability::Buffered) {
            callback.log_io_completed(Err(flush_error(&e)));
            return Err(write_err(e));
        }
        self.recent.appended(appended);
        if self.syncs.queue(callback) {
            start_syncs(self.syncs.clone(), self.engine.clone(), self.metrics.clone());
        }
        Ok(())
    }
}

impl<C, E> RaftLogStorage<C> for LogStore<C, E>
where
    C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>>,
    C::D: Clone,
    E: Engine,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> SResult<LogState<C>> {
        let last_purged_log_id: Option<LogId<u64>> =
            self.get_meta(PURGED_KEY, "last purged log id").map_err(read_err)?;
        let last = match self.engine.last(Cf::Log).map_err(read_err)? {
            Some((_, v)) => Some(decode::<Entry<C>>("log entry", &v).map_err(read_err)?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> SResult<()> {
        let mut batch = WriteBatch::new();
        batch.put(
            Cf::Meta,
            VOTE_KEY,
            encode(vote).map_err(|e| StorageIOError::write_vote(&e))?,
        );
        run_blocking(&self.engine, move |e| e.write(batch, Durability::Sync))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<u64>>> {
        self.get_meta(VOTE_KEY, "vote")
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> SResult<()> {
        // Written with the next append (the module's invariants): losing it
        // only means re-applying from the applied index.
        self.unwritten_commit.set(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<u64>>> {
        if let Some(committed) = self.unwritten_commit.peek() {
            return Ok(committed);
        }
        Ok(self
            .get_meta::<Option<LogId<u64>>>(COMMITTED_KEY, "committed log id")
            .map_err(read_err)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (batch, appended) = self.append_batch(entries)?;
        if !self.engine.may_block() {
            // In memory: the same path as a leader's, so that the
            // simulator's sync latency applies to every member.
            return self.write_then_sync(batch, appended, callback).await;
        }
        // A follower waits for the callback before it answers: one synced
        // write on this thread costs less than a hand-off to the sync loop.
        // On a fast disk it stays on this worker: `block_in_place` would
        // hand the worker's other tasks to another thread and the answer
        // would come back through it, about 0.1 ms on a put's path at one
        // client (docs/benchmarks.md).
        let started = Instant::now();
        let written = if self.last_append_sync < INLINE_SYNC_LIMIT {
            self.engine.write(batch, Durability::Sync)
        } else {
            run_blocking(&self.engine, move |e| e.write(batch, Durability::Sync)).await
        };
        self.last_append_sync = started.elapsed();
        self.metrics.fsync(started, 1);
        if written.is_ok() {
            self.recent.appended(appended);
        }
        callback.log_io_completed(written.as_ref().map(|_| ()).map_err(flush_error));
        written.map_err(write_err)
    }

    async fn append_as_leader<I>(&mut self, entries: I, callback: LogFlushed<C>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (batch, appended) = self.append_batch(entries)?;
        self.write_then_sync(batch, appended, callback).await
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> SResult<()> {
        self.recent.truncate(log_id.index);
        let mut batch = WriteBatch::new();
        batch.delete_range(Cf::Log, log_key(log_id.index), log_key(u64::MAX));
        batch.delete(Cf::Log, log_key(u64::MAX));
        run_blocking(&self.engine, move |e| e.write(batch, Durability::Sync))
            .await
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> SResult<()> {
        self.recent.purge(log_id.index);
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, PURGED_KEY, encode(&log_id).map_err(write_err)?);
        batch.delete_range(Cf::Log, log_key(0), log_key(log_id.index.saturating_add(1)));
        // Purging only discards entries a durable snapshot covers; losing the
        // purge on a crash leaves extra entries openraft ignores.
        self.engine.write(batch, Durability::Buffered).map_err(write_err)
    }
}
