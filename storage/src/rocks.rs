//! RocksDB engine: the production [`Engine`].
//!
//! One database per node with a column family per [`Cf`]. Synced writes set
//! `WriteOptions::sync`, which fsyncs the shared write-ahead log, so a synced
//! write also makes every earlier buffered write durable (see the crate docs).
//! Unlogged writes skip the log and are durable once a flush wrote their
//! memtables to table files. Flushes are atomic across the column families
//! (`atomic_flush`): every flush, whether a full memtable, the write buffer
//! manager or [`Engine::flush`] started it, writes all of them up to one
//! point, so the unlogged rows a crash leaves are those of one prefix of
//! the writes in every column family at once.
//! On open the store checks an identity record so that a node never starts on
//! another node's data or on a directory that is not a Cell0 store.
//!
//! Memory is bounded: all column families share one block cache of
//! [`BLOCK_CACHE_BYTES`] (RocksDB's default is a cache per column family),
//! and their memtables together stay under [`WRITE_BUFFER_BYTES`] (a write
//! buffer manager flushes the largest one when they reach it). Index and
//! filter blocks live with their table readers and grow with the data, by
//! about 1 % of it and 10 bits a key. Whole-keyspace scans (snapshot builds)
//! read ahead and bypass the cache, so a build neither evicts the working set
//! nor grows it.
//!
//! [`Cf::State`] and [`Cf::Staging`] map to the column families `state` and
//! `state.1`, in the order the [`StateSlot`] record says. The slot is read
//! under a lock that a promoting write holds exclusively, so every view and
//! every batch resolves both names against one slot.

use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions, WriteOptions};
use serde::{Deserialize, Serialize};

use crate::engine::{Cf, Durability, Engine, ReadView, RowVisitor, StateSlot, WriteBatch, WriteOp};
use crate::error::{decode, encode};
use crate::{Error, Result};

/// Meta key of the identity record.
const IDENTITY_KEY: &[u8] = b"identity";
/// On-disk format of this crate; bumped on incompatible changes.
const FORMAT_VERSION: u32 = 1;

/// Written once when a store is created; checked at every open.
#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    format: u32,
    node_id: u64,
}

/// The block cache all column families share (data blocks), in bytes.
pub const BLOCK_CACHE_BYTES: usize = 64 << 20;
/// Bloom filter bits per key: a read of an absent key (every new key's
/// previous value) skips the files that cannot hold it.
const BLOOM_BITS_PER_KEY: f64 = 10.0;
/// The most memory all memtables together hold, in bytes.
pub const WRITE_BUFFER_BYTES: usize = 96 << 20;
/// One memtable's size before it is flushed, in bytes. Every write of a
/// new row searches the memtable's skiplist for its place; for keys spread
/// over the key space that search misses the CPU caches at every level
/// below the top few. At 32 MiB the search was 10 % of a 3-node cluster's
/// CPU under puts over 100,000 keys, at 8 MiB 5.5 % (docs/benchmarks.md);
/// smaller memtables mean more, smaller level-0 files, which the level-0
/// triggers count in bytes ([`L0_COMPACTION_BYTES`]).
const MEMTABLE_BYTES: usize = 8 << 20;
/// Bytes of full memtables flushed into level 0 that start a compaction
/// into level 1 (RocksDB counts files; [`l0_files`] converts). A write
/// load over a key space that fits level 1 rewrites all of level 1 in every
/// such compaction, so this fixes how rare compactions are per byte
/// written, whatever the memtable size: 256 MiB, 8 files of the 32 MiB
/// memtables this store had before (RocksDB's default is 4 files). The
/// files themselves are smaller (compressed), and a column family flushed
/// along with a fuller one (atomic flush) writes smaller files still, so
/// its level 0 compacts after fewer bytes.
const L0_COMPACTION_BYTES: usize = 256 << 20;
/// Bytes of full memtables in level 0 at which RocksDB slows writes down:
/// what its default of 20 files held at 32 MiB memtables.
const L0_SLOWDOWN_BYTES: usize = 640 << 20;
/// Bytes of full memtables in level 0 at which RocksDB stops writes until
/// compaction catches up: what its default of 36 files held at 32 MiB
/// memtables.
const L0_STOP_BYTES: usize = 1152 << 20;
/// Level-0 files holding `bytes` of memtables, one full memtable of
/// [`MEMTABLE_BYTES`] a file (RocksDB's level-0 triggers count files). A point read checks (by bloom
/// filter) up to the compaction trigger's number of level-0 files.
const fn l0_files(bytes: usize) -> i32 {
    (bytes / MEMTABLE_BYTES) as i32
}
/// Readahead of whole-keyspace scans, in bytes.
const SCAN_READAHEAD_BYTES: usize = 2 << 20;

/// Rows of a bulk load per SST file, in bytes: each file is ingested when
/// it is full, so a load never holds more than one on disk outside the
/// database.
const SST_FILE_BYTES: u64 = 128 << 20;
/// Directory, inside the database's, where bulk loads write SST files.
const INGEST_DIR: &str = "ingest";

/// On-disk names of the column families, physical state keyspaces last.
const CF_NAMES: [&str; 4] = ["log", "meta", "state", "state.1"];

/// A RocksDB database holding one node's Raft log and state.
pub struct RocksEngine {
    db: DB,
    path: PathBuf,
    /// Options of the state keyspaces, for SST files written by bulk loads.
    sst_options: Options,
    /// Which physical keyspace is the state; written only by a promotion.
    slot: RwLock<StateSlot>,
}

impl std::fmt::Debug for RocksEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksEngine").field("path", &self.path).finish()
    }
}

impl RocksEngine {
    /// Opens or creates the store at `path` for node `node_id`.
    pub fn open(path: &Path, node_id: u64) -> Result<Self> {
        check_directory(path)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Apply's unlogged writes span `state` and `meta`: see the module docs.
        opts.set_atomic_flush(true);
        opts.increase_parallelism(2);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_db_write_buffer_size(WRITE_BUFFER_BYTES);
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let cfs = CF_NAMES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options(&cache)));
        // Files of a bulk load that a crash interrupted; never ingested.
        let ingest = path.join(INGEST_DIR);
        if ingest.exists() {
            std::fs::remove_dir_all(&ingest).map_err(|e| Error::Io(format!("removing {}: {e}", ingest.display())))?;
        }
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let engine = RocksEngine {
            db,
            path: path.to_path_buf(),
            sst_options: cf_options(&cache),
            slot: RwLock::new(StateSlot::default()),
        };
        let slot = StateSlot::decode(engine.get(Cf::Meta, StateSlot::KEY)?.as_deref())?;
        *engine.slot_mut() = slot;
        engine.check_identity(node_id)?;
        Ok(engine)
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_identity(&self, node_id: u64) -> Result<()> {
        match self.get(Cf::Meta, IDENTITY_KEY)? {
            Some(bytes) => {
                let id: Identity = decode("identity", &bytes)?;
                if id.format != FORMAT_VERSION {
                    return Err(Error::ForeignDataDir {
                        path: self.path.clone(),
                        reason: format!("has storage format {} but this build reads {FORMAT_VERSION}", id.format),
                    });
                }
                if id.node_id != node_id {
                    return Err(Error::ForeignDataDir {
                        path: self.path.clone(),
                        reason: format!("belongs to node {} not node {node_id}", id.node_id),
                    });
                }
                Ok(())
            }
            None => {
                if self.last(Cf::Log)?.is_some() || self.last(Cf::State)?.is_some() {
                    return Err(Error::ForeignDataDir {
                        path: self.path.clone(),
                        reason: "holds data but no identity record".into(),
                    });
                }
                let mut batch = WriteBatch::new();
                batch.put(
                    Cf::Meta,
                    IDENTITY_KEY,
                    encode(&Identity {
                        format: FORMAT_VERSION,
                        node_id,
                    })?,
                );
                self.write(batch, Durability::Sync)
            }
        }
    }

    fn slot(&self) -> RwLockReadGuard<'_, StateSlot> {
        // The guarded value is a plain byte, consistent even after a panic.
        self.slot.read().unwrap_or_else(|p| p.into_inner())
    }

    fn slot_mut(&self) -> RwLockWriteGuard<'_, StateSlot> {
        self.slot.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The column family that `cf` names under `slot`.
    fn cf(&self, slot: StateSlot, cf: Cf) -> Result<&ColumnFamily> {
        let name = match slot.physical(cf) {
            Some(physical) => CF_NAMES[2 + usize::from(physical)],
            None => cf.name(),
        };
        // Every column family is created at open, so a missing handle means a
        // broken database.
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::Io(format!("column family {name} missing")))
    }

    /// Options of every read (each read calls this first).
    fn read_opts(snapshot: Option<&rocksdb::Snapshot<'_>>) -> ReadOptions {
        no_perf_counters();
        let mut ro = ReadOptions::default();
        if let Some(s) = snapshot {
            ro.set_snapshot(s);
        }
        ro
    }

    fn get_at(&self, at: At<'_, '_>, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get_cf_opt(self.cf(at.slot, cf)?, key, &Self::read_opts(at.snapshot))?)
    }

    fn scan_at(
        &self,
        at: At<'_, '_>,
        cf: Cf,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut ro = Self::read_opts(at.snapshot);
        if let Some(end) = end {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let iter = self
            .db
            .iterator_cf_opt(self.cf(at.slot, cf)?, ro, IteratorMode::From(start, Direction::Forward));
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item?;
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    fn last_at(&self, at: At<'_, '_>, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut iter = self
            .db
            .iterator_cf_opt(self.cf(at.slot, cf)?, Self::read_opts(at.snapshot), IteratorMode::End);
        match iter.next() {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some((k.into_vec(), v.into_vec())))
            }
            None => Ok(None),
        }
    }

    fn for_each_at(&self, at: At<'_, '_>, cf: Cf, f: &mut RowVisitor<'_>) -> Result<()> {
        let mut ro = Self::read_opts(at.snapshot);
        ro.fill_cache(false);
        ro.set_readahead_size(SCAN_READAHEAD_BYTES);
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(at.slot, cf)?, ro);
        iter.seek_to_first();
        while let (Some(k), Some(v)) = (iter.key(), iter.value()) {
            f(k, v)?;
            iter.next();
        }
        iter.status()?;
        Ok(())
    }

    /// The latest state, with the slot as it is now.
    fn latest(&self) -> StateSlot {
        *self.slot()
    }
}

/// Where a read looks: a point-in-time snapshot (or the latest state) and the
/// state slot that goes with it.
#[derive(Clone, Copy)]
struct At<'s, 'db> {
    snapshot: Option<&'s rocksdb::Snapshot<'db>>,
    slot: StateSlot,
}

impl At<'_, '_> {
    fn latest(slot: StateSlot) -> Self {
        At { snapshot: None, slot }
    }
}

/// Switches off, once per thread, the counters RocksDB keeps per thread
/// for its perf context (on by default, as `kEnableCount`). Nothing reads
/// them, and each count reaches the thread-local context through its
/// initialisation wrapper: once per key comparison of a memtable insert,
/// 1.5 % of apply's instructions (docs/benchmarks.md). Called by the
/// engine's writes and reads ([`RocksEngine::read_opts`]); the setting is
/// the calling thread's.
fn no_perf_counters() {
    thread_local! {
        static OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    OFF.with(|off| {
        if !off.replace(true) {
            rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
        }
    });
}

/// Options of every column family: the shared cache, bounded memtables.
fn cf_options(cache: &rocksdb::Cache) -> Options {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Index and filter blocks stay with their table readers: about 1 % of the
    // data and 10 bits a key. In a cache this small, whole index blocks
    // evicted and decompressed again took over half the CPU of a write load
    // (measured while writing 256 MiB of 1 KiB values).
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
    let mut opts = Options::default();
    opts.set_block_based_table_factory(&table);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_write_buffer_size(MEMTABLE_BYTES);
    opts.set_max_write_buffer_number(2);
    opts.set_level_zero_file_num_compaction_trigger(l0_files(L0_COMPACTION_BYTES));
    opts.set_level_zero_slowdown_writes_trigger(l0_files(L0_SLOWDOWN_BYTES));
    opts.set_level_zero_stop_writes_trigger(l0_files(L0_STOP_BYTES));
    opts
}

/// Refuses directories that hold something other than a RocksDB database, so
/// a mistyped `--data-dir` never scatters database files into, say, a home
/// directory.
fn check_directory(path: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::ForeignDataDir {
                path: path.to_path_buf(),
                reason: format!("cannot be read ({e})"),
            });
        }
    };
    let mut empty = true;
    for entry in entries.flatten() {
        empty = false;
        if entry.file_name() == "CURRENT" {
            return Ok(());
        }
    }
    if empty {
        Ok(())
    } else {
        Err(Error::ForeignDataDir {
            path: path.to_path_buf(),
            reason: "is not empty and holds no Cell0 database".into(),
        })
    }
}

/// A point-in-time view of a [`RocksEngine`].
struct RocksView<'a> {
    engine: &'a RocksEngine,
    snapshot: rocksdb::Snapshot<'a>,
    slot: StateSlot,
}

impl RocksView<'_> {
    fn at(&self) -> At<'_, '_> {
        At {
            snapshot: Some(&self.snapshot),
            slot: self.slot,
        }
    }
}

impl ReadView for RocksView<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.engine.get_at(self.at(), cf, key)
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.engine.scan_at(self.at(), cf, start, end, limit)
    }

    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.engine.last_at(self.at(), cf)
    }

    fn for_each(&self, cf: Cf, f: &mut RowVisitor<'_>) -> Result<()> {
        self.engine.for_each_at(self.at(), cf, f)
    }
}

impl ReadView for RocksEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_at(At::latest(self.latest()), cf, key)
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_at(At::latest(self.latest()), cf, start, end, limit)
    }

    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.last_at(At::latest(self.latest()), cf)
    }

    fn for_each(&self, cf: Cf, f: &mut RowVisitor<'_>) -> Result<()> {
        // A snapshot, so a long walk sees one state.
        self.with_view(&mut |view| view.for_each(cf, f))
    }
}

impl RocksEngine {
    /// `batch` as a RocksDB batch, its state names resolved under `slot`.
    /// A promotion in it takes effect after the whole batch: the flipped
    /// slot record is its last write.
    fn rocks_batch(&self, slot: StateSlot, batch: &WriteBatch) -> Result<rocksdb::WriteBatch> {
        // Sized once: grown from empty, RocksDB's batch doubled its buffer
        // and copied it each time, which was 4 % of apply's instructions
        // for a grouped entry (docs/benchmarks.md).
        let mut wb = rocksdb::WriteBatch::with_capacity_bytes(batch.encoded_bytes_bound());
        // Each column family's handle found once, not by name per row.
        let mut handles: [Option<&ColumnFamily>; 4] = [None; 4];
        let mut handle = |cf: Cf| -> Result<&ColumnFamily> {
            let at = match cf {
                Cf::Log => 0,
                Cf::Meta => 1,
                Cf::State => 2,
                Cf::Staging => 3,
            };
            match handles[at] {
                Some(found) => Ok(found),
                None => Ok(*handles[at].insert(self.cf(slot, cf)?)),
            }
        };
        for op in batch.ops() {
            match op {
                WriteOp::Put { cf, key, value } => wb.put_cf(handle(*cf)?, key, value),
                WriteOp::Delete { cf, key } => wb.delete_cf(handle(*cf)?, key),
                WriteOp::DeleteRange { cf, start, end } => wb.delete_range_cf(handle(*cf)?, start, end),
                WriteOp::PromoteStaging => {}
            }
        }
        if batch.promotes() {
            wb.put_cf(self.cf(slot, Cf::Meta)?, StateSlot::KEY, [slot.flipped().0]);
        }
        Ok(wb)
    }
}

impl Engine for RocksEngine {
    fn write(&self, batch: WriteBatch, durability: Durability) -> Result<()> {
        no_perf_counters();
        let mut wo = WriteOptions::default();
        wo.set_sync(durability == Durability::Sync);
        wo.disable_wal(durability == Durability::Unlogged);
        if !batch.promotes() {
            let slot = self.slot();
            self.db.write_opt(self.rocks_batch(*slot, &batch)?, &wo)?;
            return Ok(());
        }
        // Exclusive: no view or batch resolves the state names until the
        // promotion is written and the slot flipped.
        let mut slot = self.slot_mut();
        self.db.write_opt(self.rocks_batch(*slot, &batch)?, &wo)?;
        *slot = slot.flipped();
        Ok(())
    }

    /// Deletes the rows, then compacts the keyspace so that it holds no
    /// files (views taken before keep seeing the rows: compaction honours
    /// RocksDB snapshots).
    fn clear(&self, cf: Cf) -> Result<()> {
        crate::engine::delete_all_rows(self, cf)?;
        let slot = self.slot();
        self.db
            .compact_range_cf(self.cf(*slot, cf)?, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// SST files written in key order and ingested (moved, not copied) one
    /// after another: no memtable, no write-ahead log, no compaction of an
    /// empty keyspace.
    fn bulk_load(&self, cf: Cf) -> Result<Box<dyn crate::engine::BulkLoad + '_>> {
        let dir = self.path.join(INGEST_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io(format!("creating {}: {e}", dir.display())))?;
        Ok(Box::new(SstLoad {
            engine: self,
            cf,
            dir,
            writer: None,
            seq: 0,
        }))
    }

    fn with_view(&self, f: &mut dyn FnMut(&dyn ReadView) -> Result<()>) -> Result<()> {
        let view = {
            let slot = self.slot();
            RocksView {
                engine: self,
                snapshot: self.db.snapshot(),
                slot: *slot,
            }
        };
        f(&view)
    }

    fn sync_log(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        // One call, so that the flush is one atomic point for all of them.
        let cfs: Vec<&ColumnFamily> = CF_NAMES.iter().filter_map(|name| self.db.cf_handle(name)).collect();
        self.db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?;
        Ok(())
    }
}

/// A bulk load through SST files ([`Engine::bulk_load`]).
struct SstLoad<'e> {
    engine: &'e RocksEngine,
    cf: Cf,
    dir: PathBuf,
    /// The file being written and its path.
    writer: Option<(rocksdb::SstFileWriter<'e>, PathBuf)>,
    seq: u64,
}

impl SstLoad<'_> {
    /// Finishes the file being written and ingests it.
    fn ingest(&mut self) -> Result<()> {
        let Some((mut writer, path)) = self.writer.take() else {
            return Ok(());
        };
        writer.finish()?;
        let mut opts = rocksdb::IngestExternalFileOptions::default();
        opts.set_move_files(true);
        let slot = self.engine.slot();
        let cf = self.engine.cf(*slot, self.cf)?;
        self.engine.db.ingest_external_file_cf_opts(cf, &opts, vec![&path])?;
        Ok(())
    }
}

impl crate::engine::BulkLoad for SstLoad<'_> {
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if self
            .writer
            .as_ref()
            .is_some_and(|(w, _)| w.file_size() >= SST_FILE_BYTES)
        {
            self.ingest()?;
        }
        let (writer, _) = match &mut self.writer {
            Some(open) => open,
            None => {
                self.seq += 1;
                let path = self.dir.join(format!("load-{}.sst", self.seq));
                let writer = rocksdb::SstFileWriter::create(&self.engine.sst_options);
                writer.open(&path)?;
                self.writer.insert((writer, path))
            }
        };
        writer.put(key, value)?;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.ingest()
    }
}

impl Drop for SstLoad<'_> {
    fn drop(&mut self) {
        // A load given up half way: its last file was never ingested.
        if let Some((_, path)) = self.writer.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_another_nodes_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        drop(RocksEngine::open(dir.path(), 1).unwrap());
        let err = RocksEngine::open(dir.path(), 2).unwrap_err();
        assert!(matches!(err, Error::ForeignDataDir { .. }), "{err}");
        assert!(err.to_string().contains("belongs to node 1"), "{err}");
        RocksEngine::open(dir.path(), 1).unwrap();
    }

    #[test]
    fn a_batch_fits_the_buffer_reserved_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = RocksEngine::open(dir.path(), 1).unwrap();
        let mut batch = WriteBatch::new();
        assert!(engine.rocks_batch(engine.latest(), &batch).unwrap().size_in_bytes() <= batch.encoded_bytes_bound());
        batch.put(Cf::Log, b"k".to_vec(), vec![7; 300_000]);
        batch.put(Cf::State, vec![1; 200], Vec::new());
        batch.delete(Cf::Meta, b"gone".to_vec());
        batch.delete_range(Cf::State, vec![0; 130], vec![9; 20_000]);
        let wb = engine.rocks_batch(engine.latest(), &batch).unwrap();
        let mut promoting = WriteBatch::new();
        promoting.promote_staging();
        let promoted = engine.rocks_batch(engine.latest(), &promoting).unwrap();
        assert!(promoted.size_in_bytes() <= promoting.encoded_bytes_bound());
        assert!(
            wb.size_in_bytes() <= batch.encoded_bytes_bound(),
            "{} > {}",
            wb.size_in_bytes(),
            batch.encoded_bytes_bound()
        );
        assert!(batch.encoded_bytes_bound() < wb.size_in_bytes() + 100);
        engine.write(batch, Durability::Buffered).unwrap();
        assert_eq!(engine.get(Cf::Log, b"k").unwrap().map(|v| v.len()), Some(300_000));
    }

    #[test]
    fn refuses_a_directory_that_is_not_a_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
        let err = RocksEngine::open(dir.path(), 1).unwrap_err();
        assert!(err.to_string().contains("holds no Cell0 database"), "{err}");
    }

    #[test]
    fn corrupted_files_give_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        drop(RocksEngine::open(dir.path(), 1).unwrap());
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let p = entry.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("MANIFEST") || name == "CURRENT" {
                std::fs::write(&p, b"garbage garbage garbage").unwrap();
            }
        }
        let err = RocksEngine::open(dir.path(), 1).unwrap_err();
        assert!(err.to_string().contains("cannot open data dir"), "{err}");
    }

    #[test]
    fn views_do_not_see_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path(), 1).unwrap();
        let mut b = WriteBatch::new();
        b.put(Cf::State, b"a".to_vec(), b"1".to_vec());
        e.write(b, Durability::Sync).unwrap();
        e.with_view(&mut |view| {
            let mut b = WriteBatch::new();
            b.put(Cf::State, b"a".to_vec(), b"2".to_vec());
            e.write(b, Durability::Buffered)?;
            assert_eq!(view.get(Cf::State, b"a")?, Some(b"1".to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(e.get(Cf::State, b"a").unwrap(), Some(b"2".to_vec()));
    }
}
