//! In-memory engine for unit tests and the deterministic simulator.
//!
//! Same semantics as [`crate::RocksEngine`] except durability: everything is
//! lost when the value is dropped. Never used on the real path.
//!
//! It also simulates a power loss ([`MemEngine::power_loss`]), with the
//! durability model of RocksDB's shared write-ahead log and its flushes:
//! - a [`Durability::Sync`] write is durable, and makes every earlier logged
//!   write durable too (one fsync of the shared log);
//! - a [`Durability::Buffered`] write is durable only once a later synced
//!   write (or a flush) happened;
//! - a [`Durability::Unlogged`] write is durable only once a later
//!   [`Engine::flush`] happened: a synced write does not make it durable;
//! - a power loss discards every write that is not durable, newest first,
//!   whole batches at a time.
//!
//! To do that the engine keeps an undo record (the previous value of each key
//! touched) of every write that is not durable yet, marked unlogged or not.
//! A synced write drops the records of logged writes, a flush all of them,
//! so the undo log only holds the writes since the last flush.
//!
//! A crash of the process that writes to the engine, followed by a restart
//! on the same disk, is [`MemEngine::fork`]: an independent copy of the
//! engine as it is at that instant, for the restarted process, while the
//! crashed one keeps the original until its last task is gone: whatever it
//! still writes after the crash reaches nothing the restart reads. The copy
//! keeps the buffered writes (in the write-ahead log, which the operating
//! system holds) with their undo records, and lacks the unlogged ones since
//! the last flush (in RocksDB's memtables, which died with the process).
//! Calling [`MemEngine::power_loss`] on the copy makes the crash a power
//! loss of the machine too.
//!
//! Invariant: after `power_loss`, the engine holds exactly the logged writes
//! that returned before the last synced write (or flush) returned and the
//! unlogged ones that returned before the last flush did, whole batches at
//! a time; a fork holds those and the buffered writes, and shares nothing
//! mutable with its original. (Exact as long as no logged write of a key
//! follows an unlogged one of it before a flush: see [`crate::Engine`].)

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::Result;
use crate::engine::{Cf, Durability, Engine, ReadView, RowVisitor, StateSlot, WriteBatch, WriteOp};

type Table = BTreeMap<Vec<u8>, Vec<u8>>;

/// A physical keyspace: the log, the meta records, or one of the two state
/// keyspaces that [`Cf::State`] and [`Cf::Staging`] name by turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Space {
    Log,
    Meta,
    State(u8),
}

impl Space {
    fn of(slot: StateSlot, cf: Cf) -> Self {
        match (cf, slot.physical(cf)) {
            (_, Some(physical)) => Space::State(physical),
            (Cf::Log, None) => Space::Log,
            _ => Space::Meta,
        }
    }
}

/// How to undo one buffered mutation on a power loss.
#[derive(Debug, Clone)]
enum Undo {
    /// A key's value before the write (`None`: it was absent).
    Key {
        space: Space,
        key: Vec<u8>,
        previous: Option<Vec<u8>>,
    },
    /// The state slot before a promotion.
    Slot(StateSlot),
}

/// The undo record of a write that is not durable yet.
#[derive(Debug, Clone)]
struct Pending {
    undo: Undo,
    /// Written [`Durability::Unlogged`]: only a flush makes it durable, and
    /// a process crash loses it.
    unlogged: bool,
}

/// The keyspaces, each shared copy-on-write: a view ([`Engine::with_view`])
/// takes a reference to each, and a write copies a keyspace only while a
/// view of it is alive, so a view costs nothing like a copy of the whole
/// store (the log included) per read.
#[derive(Debug, Default, Clone)]
struct State {
    tables: BTreeMap<Space, Arc<Table>>,
    slot: StateSlot,
    /// Undo records of the writes that are not durable yet, oldest first.
    undo: Vec<Pending>,
}

impl State {
    fn table(&self, cf: Cf) -> Option<&Table> {
        self.tables.get(&Space::of(self.slot, cf)).map(|t| &**t)
    }

    /// Undoes the pending writes that `lost` picks, newest first, and keeps
    /// the records of the others.
    fn discard(&mut self, lost: impl Fn(&Pending) -> bool) {
        let mut kept = Vec::new();
        for pending in std::mem::take(&mut self.undo).into_iter().rev() {
            if !lost(&pending) {
                kept.push(pending);
                continue;
            }
            match pending.undo {
                Undo::Key { space, key, previous } => {
                    let table = table_mut(&mut self.tables, space);
                    match previous {
                        Some(v) => table.insert(key, v),
                        None => table.remove(&key),
                    };
                }
                Undo::Slot(slot) => self.slot = slot,
            }
        }
        kept.reverse();
        self.undo = kept;
    }

    /// What one fsync of the write-ahead log does: every logged write is
    /// durable.
    fn synced(&mut self) {
        self.undo.retain(|p| p.unlogged);
    }
}

/// Keyspace `space` of `tables`, for writing (copied first if a view shares
/// it).
fn table_mut(tables: &mut BTreeMap<Space, Arc<Table>>, space: Space) -> &mut Table {
    Arc::make_mut(tables.entry(space).or_default())
}

/// Ordered maps per column family behind one lock.
#[derive(Default)]
pub struct MemEngine {
    state: Mutex<State>,
    /// [`Engine::sync_latency`], in microseconds.
    sync_latency_us: AtomicU64,
}

impl std::fmt::Debug for MemEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counts, not the rows: a store's worth of bytes helps no one.
        let state = self.lock();
        f.debug_struct("MemEngine")
            .field("rows", &state.tables.values().map(|t| t.len()).sum::<usize>())
            .field("pending_mutations", &state.undo.len())
            .finish()
    }
}

impl MemEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// Test and simulation facility: simulates a power loss (or `kill -9` of
    /// the machine) by discarding every write that is not durable (see the
    /// module docs), newest first. The engine stays usable, as after a
    /// reboot: stores opened over it again see exactly what a real disk would
    /// have kept.
    pub fn power_loss(&self) {
        self.lock().discard(|_| true);
    }

    /// Test and simulation facility: an independent copy of this engine as
    /// it is now, without the unlogged writes since the last flush, and
    /// with the buffered writes not yet synced (and what
    /// [`MemEngine::power_loss`] needs to discard them): the disk a process
    /// that crashed at this instant leaves to its restart. Writes to either
    /// engine afterwards do not reach the other. Cheap: keyspaces are shared
    /// copy-on-write until one side writes to them.
    pub fn fork(&self) -> MemEngine {
        let mut state = self.lock().clone();
        state.discard(|p| p.unlogged);
        MemEngine {
            state: Mutex::new(state),
            sync_latency_us: AtomicU64::new(self.sync_latency_us.load(Ordering::Relaxed)),
        }
    }

    /// Test and simulation facility: makes every later log sync
    /// ([`Engine::sync_latency`]) take `latency` on the caller's clock, as a
    /// slow disk would. A fork keeps it.
    pub fn set_sync_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.sync_latency_us.store(us, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a bug in this
        // module's plain map operations; the maps stay consistent, so recover.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn scan_table(t: Option<&Table>, start: &[u8], end: Option<&[u8]>, limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Some(t) = t else { return Vec::new() };
    // Like RocksDB: an empty range, not a panic, when the end is not after
    // the start.
    if end.is_some_and(|e| e <= start) {
        return Vec::new();
    }
    let upper = match end {
        Some(e) => Bound::Excluded(e.to_vec()),
        None => Bound::Unbounded,
    };
    t.range((Bound::Included(start.to_vec()), upper))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn last_of(t: Option<&Table>) -> Option<(Vec<u8>, Vec<u8>)> {
    t.and_then(|t| t.last_key_value().map(|(k, v)| (k.clone(), v.clone())))
}

fn for_each_of(t: Option<&Table>, f: &mut RowVisitor<'_>) -> Result<()> {
    for (k, v) in t.into_iter().flatten() {
        f(k, v)?;
    }
    Ok(())
}

/// A frozen copy of the maps and slot, for [`Engine::with_view`].
struct MemView {
    tables: BTreeMap<Space, Arc<Table>>,
    slot: StateSlot,
}

impl MemView {
    fn table(&self, cf: Cf) -> Option<&Table> {
        self.tables.get(&Space::of(self.slot, cf)).map(|t| &**t)
    }
}

impl ReadView for MemView {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.table(cf).and_then(|t| t.get(key).cloned()))
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(scan_table(self.table(cf), start, end, limit))
    }

    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(last_of(self.table(cf)))
    }

    fn for_each(&self, cf: Cf, f: &mut RowVisitor<'_>) -> Result<()> {
        for_each_of(self.table(cf), f)
    }
}

impl ReadView for MemEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().table(cf).and_then(|t| t.get(key).cloned()))
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(scan_table(self.lock().table(cf), start, end, limit))
    }

    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(last_of(self.lock().table(cf)))
    }

    fn for_each(&self, cf: Cf, f: &mut RowVisitor<'_>) -> Result<()> {
        self.with_view(&mut |view| view.for_each(cf, f))
    }
}

impl Engine for MemEngine {
    fn write(&self, batch: WriteBatch, durability: Durability) -> Result<()> {
        let mut guard = self.lock();
        let State { tables, slot, undo } = &mut *guard;
        // Undo records are only needed for writes a crash can discard.
        let pending = durability != Durability::Sync;
        let unlogged = durability == Durability::Unlogged;
        let mut record = |space: Space, key: &[u8], previous: Option<Vec<u8>>| {
            if pending {
                undo.push(Pending {
                    undo: Undo::Key {
                        space,
                        key: key.to_vec(),
                        previous,
                    },
                    unlogged,
                });
            }
        };
        // Every name resolves under the slot before the batch; a promotion
        // takes effect after it, as in RocksDB.
        let before = *slot;
        let mut promoted = false;
        for op in batch.ops() {
            match op {
                WriteOp::Put { cf, key, value } => {
                    let space = Space::of(before, *cf);
                    let previous = table_mut(tables, space).insert(key.clone(), value.clone());
                    record(space, key, previous);
                }
                WriteOp::Delete { cf, key } => {
                    let space = Space::of(before, *cf);
                    let previous = table_mut(tables, space).remove(key);
                    record(space, key, previous);
                }
                WriteOp::DeleteRange { cf, start, end } => {
                    if start >= end {
                        continue;
                    }
                    let space = Space::of(before, *cf);
                    let t = table_mut(tables, space);
                    let doomed: Vec<Vec<u8>> = t.range(start.clone()..end.clone()).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        let previous = t.remove(&k);
                        record(space, &k, previous);
                    }
                }
                WriteOp::PromoteStaging => promoted = true,
            }
        }
        if promoted {
            *slot = before.flipped();
            if pending {
                undo.push(Pending {
                    undo: Undo::Slot(before),
                    unlogged,
                });
            }
        }
        if !pending {
            guard.synced();
        }
        Ok(())
    }

    fn with_view(&self, f: &mut dyn FnMut(&dyn ReadView) -> Result<()>) -> Result<()> {
        let view = {
            let state = self.lock();
            MemView {
                tables: state.tables.clone(),
                slot: state.slot,
            }
        };
        f(&view)
    }

    fn flush(&self) -> Result<()> {
        self.lock().undo.clear();
        Ok(())
    }

    fn sync_log(&self) -> Result<()> {
        self.lock().synced();
        Ok(())
    }

    fn sync_latency(&self) -> Duration {
        Duration::from_micros(self.sync_latency_us.load(Ordering::Relaxed))
    }

    fn may_block(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(e: &MemEngine, key: &[u8], value: &[u8], d: Durability) {
        let mut b = WriteBatch::new();
        b.put(Cf::State, key.to_vec(), value.to_vec());
        e.write(b, d).unwrap();
    }

    fn all(e: &MemEngine) -> Vec<(Vec<u8>, Vec<u8>)> {
        e.scan(Cf::State, b"", None, usize::MAX).unwrap()
    }

    #[test]
    fn power_loss_discards_writes_after_the_last_synced_one() {
        let e = MemEngine::new();
        put(&e, b"a", b"1", Durability::Buffered);
        // The synced write makes the earlier buffered one durable too.
        put(&e, b"b", b"1", Durability::Sync);
        put(&e, b"a", b"2", Durability::Buffered);
        put(&e, b"c", b"1", Durability::Buffered);
        let mut b = WriteBatch::new();
        b.delete(Cf::State, b"b".to_vec());
        b.delete_range(Cf::State, b"a".to_vec(), b"b".to_vec());
        b.put(Cf::State, b"a".to_vec(), b"3".to_vec());
        e.write(b, Durability::Buffered).unwrap();
        assert_eq!(
            all(&e),
            vec![(b"a".to_vec(), b"3".to_vec()), (b"c".to_vec(), b"1".to_vec())]
        );

        e.power_loss();
        assert_eq!(
            all(&e),
            vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"1".to_vec())]
        );
        // Nothing left to lose; the engine keeps working after the reboot.
        e.power_loss();
        assert_eq!(all(&e).len(), 2);
        put(&e, b"d", b"1", Durability::Buffered);
        e.flush().unwrap();
        e.power_loss();
        assert_eq!(all(&e).len(), 3);
    }

    #[test]
    fn unlogged_writes_are_durable_only_after_a_flush_and_die_with_the_process() {
        let e = MemEngine::new();
        put(&e, b"a", b"1", Durability::Unlogged);
        e.flush().unwrap();
        put(&e, b"a", b"2", Durability::Unlogged);
        put(&e, b"b", b"1", Durability::Buffered);
        put(&e, b"c", b"1", Durability::Unlogged);
        // A synced write makes the buffered write durable, not the unlogged.
        put(&e, b"d", b"1", Durability::Sync);
        e.sync_log().unwrap();
        put(&e, b"e", b"1", Durability::Buffered);
        let flushed_a = (b"a".to_vec(), b"1".to_vec());
        let row = |k: &[u8]| (k.to_vec(), b"1".to_vec());

        // A process crash: the memtables are gone, the operating system
        // still holds the log, synced or not.
        let crashed = e.fork();
        assert_eq!(all(&crashed), vec![flushed_a.clone(), row(b"b"), row(b"d"), row(b"e")]);
        // The machine too: the unsynced buffered write goes as well.
        crashed.power_loss();
        assert_eq!(all(&crashed), vec![flushed_a.clone(), row(b"b"), row(b"d")]);

        let power_lost = e.fork();
        e.power_loss();
        power_lost.power_loss();
        assert_eq!(all(&e), all(&power_lost));

        // After a flush everything stays.
        let e = MemEngine::new();
        put(&e, b"a", b"1", Durability::Unlogged);
        put(&e, b"b", b"1", Durability::Buffered);
        e.flush().unwrap();
        let crashed = e.fork();
        crashed.power_loss();
        assert_eq!(all(&crashed), vec![row(b"a"), row(b"b")]);
    }

    #[test]
    fn a_fork_is_the_disk_a_crash_leaves_and_takes_no_later_write() {
        let e = MemEngine::new();
        put(&e, b"a", b"1", Durability::Sync);
        put(&e, b"b", b"1", Durability::Buffered);
        // A view holds the keyspace while the fork is taken: neither the
        // view nor the fork sees later writes.
        let mut viewed = Vec::new();
        let mut crashed = None;
        e.with_view(&mut |view| {
            crashed = Some(e.fork());
            put(&e, b"c", b"1", Durability::Sync);
            viewed = view.scan(Cf::State, b"", None, usize::MAX)?;
            Ok(())
        })
        .unwrap();
        let crashed = crashed.unwrap();
        assert_eq!(viewed.len(), 2);
        // The crashed process writes on to its engine (synced writes make
        // the earlier buffered one durable there, not in the fork).
        put(&e, b"d", b"1", Durability::Sync);
        assert_eq!(all(&e).len(), 4);
        let kept = vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"1".to_vec())];
        assert_eq!(all(&crashed), kept, "a process crash keeps the unsynced write");
        // The same disk after a power loss: only the synced write.
        let power_lost = crashed.fork();
        power_lost.power_loss();
        assert_eq!(all(&power_lost), kept[..1].to_vec());
        assert_eq!(all(&crashed), kept, "forks are independent");
        // The restarted process writes to its fork only.
        put(&crashed, b"e", b"1", Durability::Buffered);
        assert_eq!(all(&crashed).len(), 3);
        assert_eq!(all(&e).len(), 4);
        assert!(!all(&e).iter().any(|(k, _)| k == b"e"));
        crashed.power_loss();
        assert_eq!(all(&crashed), kept[..1].to_vec());
        assert!(format!("{crashed:?}").contains("rows: 1"));
    }
}
