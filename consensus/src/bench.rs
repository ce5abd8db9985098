//! Apply measured alone (`cell0 bench apply`): grouped puts applied to a
//! scratch store through the same state machine store a node runs (RocksDB,
//! the row cache, one write batch per apply call), with no Raft, network or
//! client around it. Every replica applies every write, so this is a floor
//! under each node's CPU per put; it isolates apply from the transport for
//! comparing builds.
//!
//! The load: `keys` keys (`load/` and twelve digits, as `cell0-load`
//! writes), each written once first; then log entries of `batch` puts each,
//! every put a [`Command::RequestV3`] holding a [`Command::PutWithoutPrev`]
//! of a key picked by a fixed pseudo-random sequence, from three request
//! senders (one per node of a 3-node cluster, whose forwarded and own writes
//! the leader groups), as a leader's group commit proposes them.
//!
//! Invariants: the store lives in a fresh directory the caller owns; nothing
//! is synced (apply writes buffered, as on a node); the same arguments
//! apply the same entries.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cell0_storage::{RocksEngine, SNAPSHOT_DIR, StateMachineStore};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

use crate::error::{ConsensusError, Result};
use crate::state::{self, KvStateMachine};
use crate::types::TypeConfig;
use crate::{Command, RequestId};

/// Request senders the puts come from.
const SENDERS: u64 = 3;

/// What to apply.
#[derive(Debug, Clone, Copy)]
pub struct ApplyLoad {
    /// Keys in the key space.
    pub keys: u64,
    /// Puts per log entry.
    pub batch: usize,
    /// Bytes of each value.
    pub value_size: usize,
    /// Entries applied, and timed, after the prefill.
    pub entries: u64,
}

/// What [`ApplyRun::run`] measured.
#[derive(Debug, Clone, Copy)]
pub struct ApplyMeasure {
    /// Puts applied.
    pub puts: u64,
    /// Time spent inside apply calls.
    pub apply_time: Duration,
    /// Time from the first timed entry to the last one applied.
    pub elapsed: Duration,
}

/// SplitMix64, for a fixed sequence of keys.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The entries' source: keys, senders' sequence numbers, log positions.
struct Entries {
    value: Vec<u8>,
    rng: u64,
    seq: u64,
    index: u64,
}

impl Entries {
    /// The next entry: puts of `keys` (one each).
    fn entry(&mut self, keys: impl Iterator<Item = u64>) -> Entry<TypeConfig> {
        let puts = keys
            .map(|k| {
                self.seq += 1;
                Command::RequestV3 {
                    id: RequestId {
                        client: 1 + self.seq % SENDERS,
                        seq: self.seq,
                    },
                    cmd: Box::new(Command::PutWithoutPrev {
                        key: format!("load/{k:012}").into_bytes(),
                        value: self.value.clone(),
                    }),
                }
            })
            .collect();
        self.index += 1;
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
            payload: EntryPayload::Normal(Command::Batch(puts).into()),
        }
    }
}

/// A scratch store with every key written once, ready for the timed
/// entries.
pub struct ApplyRun {
    sm: StateMachineStore<TypeConfig, RocksEngine, KvStateMachine>,
    source: Entries,
    load: ApplyLoad,
}

fn storage_err(e: openraft::StorageError<u64>) -> ConsensusError {
    ConsensusError::Internal(e.to_string())
}

impl ApplyRun {
    /// Opens a new store in `dir` and writes each of `load`'s keys once.
    pub async fn prefill(dir: &Path, load: ApplyLoad) -> Result<Self> {
        if load.keys == 0 || load.batch == 0 || load.entries == 0 {
            return Err(ConsensusError::invalid(
                "load",
                "keys, batch and entries must each be at least 1",
            ));
        }
        let engine = Arc::new(RocksEngine::open(dir, 1)?);
        let mut sm = StateMachineStore::new(
            engine,
            Arc::new(KvStateMachine::new(state::NOTIFICATION_CAPACITY)),
            dir.join(SNAPSHOT_DIR),
        )?;
        let mut source = Entries {
            value: (0..load.value_size).map(|i| (i * 131 % 251) as u8).collect(),
            rng: 0x00C0_FFEE,
            seq: 0,
            index: 0,
        };
        let batch = load.batch as u64;
        let mut first = 0;
        while first < load.keys {
            let entry = source.entry(first..(first + batch).min(load.keys));
            sm.apply([entry]).await.map_err(storage_err)?;
            first += batch;
        }
        Ok(Self { sm, source, load })
    }

    /// Applies the timed entries; `progress(done, total)` hears of every
    /// hundredth.
    pub async fn run(mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<ApplyMeasure> {
        let load = self.load;
        let mut apply_time = Duration::ZERO;
        let started = Instant::now();
        for done in 0..load.entries {
            let keys: Vec<u64> = (0..load.batch)
                .map(|_| next(&mut self.source.rng) % load.keys)
                .collect();
            let entry = self.source.entry(keys.into_iter());
            let t = Instant::now();
            self.sm.apply([entry]).await.map_err(storage_err)?;
            apply_time += t.elapsed();
            if (done + 1) % 100 == 0 {
                progress(done + 1, load.entries);
            }
        }
        Ok(ApplyMeasure {
            puts: load.entries * load.batch as u64,
            apply_time,
            elapsed: started.elapsed(),
        })
    }
}
