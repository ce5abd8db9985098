//! cell0-storage: the durable half of Cell0's Raft.
//!
//! This crate owns everything that touches the disk for consensus:
//!
//! - [`Engine`]: a tiny key-value engine interface over a fixed set of column
//!   families, with a RocksDB implementation ([`RocksEngine`], fsync'd writes)
//!   and an in-memory one ([`MemEngine`]) for unit tests and the simulator.
//! - [`LogStore`]: openraft's `RaftLogStorage` over any engine. `append`
//!   acknowledges only after the entries are durable, with one engine write
//!   per call however many entries it carries.
//! - [`StateMachineStore`]: openraft's `RaftStateMachine` over any engine. It
//!   knows nothing of the application: a [`Apply`] implementation (provided
//!   by the consensus crate) turns each command into reads and writes on a
//!   [`Txn`]; the applied log id and membership land in the same atomic write
//!   as the data, so the state a crash leaves is that of one applied prefix
//!   of the log, with the id saying which. Apply's point reads go through a
//!   bounded row cache (`row_cache`).
//!
//! Both stores of one node share one engine. Apply writes unlogged: its rows
//! skip the write-ahead log and reach the disk with the engine's next
//! flush, which covers every column family at one point (RocksDB's atomic
//! flush). A crash, of the process or the machine, loses what was applied
//! since; the restart applies those entries again from the log, which keeps
//! them: the log lets go of entries only up to a recorded snapshot, and a
//! snapshot is recorded only after a flush that started once the state had
//! applied it. So the log, synced before any write is acknowledged, is the
//! only copy of a write that must reach the disk at once, and a put is
//! written to the write-ahead log once instead of twice.

// openraft's storage traits fix `StorageError` (a large enum) as their error
// type; boxing it is not an option for trait methods we implement.
#![allow(clippy::result_large_err)]

pub mod crash;
mod engine;
mod error;
mod format;
pub mod live;
mod log_store;
mod memory;
mod preload;
mod recent;
#[cfg(feature = "rocksdb")]
mod rocks;
mod row_cache;
pub mod snapshot;
mod state_machine;
mod txn;

pub use cell0_state::prefix_end;
pub use engine::{BulkLoad, Cf, Durability, Engine, ReadView, RowVisitor, WriteBatch, WriteOp};
pub use error::{Error, Result};
pub use format::DATA_FORMAT;
pub use live::LiveSnapshots;
pub use log_store::{
    APPENDS_PER_FSYNC_METRIC, ENTRIES_READ_METRIC, FSYNC_SECONDS_METRIC, LogStore, RECENT_ENTRIES_BYTES,
};
pub use memory::MemEngine;
#[cfg(feature = "rocksdb")]
pub use rocks::RocksEngine;
pub use row_cache::ROW_CACHE_READS_METRIC;
pub use snapshot::SnapshotFile;
pub use state_machine::{Apply, StateMachineStore, export_snapshot};
pub use txn::{EngineTxn, Txn};

/// The directory of snapshot files inside a RocksDB store's directory
/// (RocksDB leaves directories it did not create alone).
pub const SNAPSHOT_DIR: &str = "snapshots";

/// The two Raft stores of a node over one RocksDB database.
#[cfg(feature = "rocksdb")]
pub type RocksStores<C, A> = (LogStore<C, RocksEngine>, StateMachineStore<C, RocksEngine, A>);

/// Opens (or creates) the RocksDB store of a node and returns both Raft
/// stores over it; snapshot files live in its `snapshots/` directory.
///
/// `node_id` is recorded on first open; opening a data dir that belongs to
/// another node fails with [`Error::ForeignDataDir`].
#[cfg(feature = "rocksdb")]
pub fn open_rocks<C, A>(path: &std::path::Path, node_id: u64, apply: std::sync::Arc<A>) -> Result<RocksStores<C, A>>
where
    C: openraft::RaftTypeConfig<NodeId = u64, Entry = openraft::Entry<C>, SnapshotData = SnapshotFile>,
    A: Apply<C>,
{
    let engine = std::sync::Arc::new(RocksEngine::open(path, node_id)?);
    let sm = StateMachineStore::new(engine.clone(), apply, path.join(SNAPSHOT_DIR))?;
    Ok((LogStore::new(engine), sm))
}
