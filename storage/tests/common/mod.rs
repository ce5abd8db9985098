//! Types shared by the storage integration tests: a tiny key-value Raft type
//! config and its [`Apply`] implementation, and the property tests' runner
//! configuration.
//!
//! Each test crate uses only part of this module.
#![allow(dead_code)]

use std::sync::Mutex;

use cell0_storage::{
    Apply, Cf, Durability, Engine, MemEngine, ReadView, RowVisitor, StateMachineStore, Txn, WriteBatch,
};
use openraft::{Entry, EntryPayload, LogId};
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use serde::{Deserialize, Serialize};

/// The command: set `key` in table "t" to `value`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Set {
    pub key: String,
    pub value: String,
}

openraft::declare_raft_types!(
    /// Raft types of the storage tests.
    pub TestConfig:
        D = Set,
        R = Option<String>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TestConfig>,
        SnapshotData = cell0_storage::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Sets `key` in table "t" and reports the previous value.
#[derive(Default)]
pub struct SetApply {
    pub published: Mutex<Vec<String>>,
    /// The snapshot hooks called, in order: `"replacing"`, `"installed"`.
    pub hooks: Mutex<Vec<&'static str>>,
}

impl Apply<TestConfig> for SetApply {
    type Event = String;

    fn apply(
        &self,
        txn: &mut dyn Txn,
        _log_id: &LogId<u64>,
        data: &Set,
        events: &mut Vec<String>,
    ) -> cell0_storage::Result<Option<String>> {
        let prev = txn.get("t", data.key.as_bytes())?;
        txn.put("t", data.key.as_bytes(), data.value.as_bytes().to_vec())?;
        events.push(data.key.clone());
        Ok(prev.map(|p| String::from_utf8_lossy(&p).into_owned()))
    }

    fn empty_response(&self) -> Option<String> {
        None
    }

    fn publish(&self, events: Vec<String>) {
        self.published.lock().unwrap().extend(events);
    }

    fn state_replacing(&self) {
        self.hooks.lock().unwrap().push("replacing");
    }

    fn snapshot_installed(&self, _state: &dyn Txn) {
        self.hooks.lock().unwrap().push("installed");
    }
}

/// The state machine store of the tests.
pub type Sm<E> = StateMachineStore<TestConfig, E, SetApply>;

/// A normal entry of term 1, leader 1, setting `key` to `value`.
pub fn set_entry(index: u64, key: &str, value: &str) -> Entry<TestConfig> {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Set {
            key: key.into(),
            value: value.into(),
        }),
    }
}

/// The value of `key` in table "t" of `sm`.
pub fn read<E: cell0_storage::Engine>(sm: &Sm<E>, key: &str) -> Option<Vec<u8>> {
    let txn = cell0_storage::EngineTxn::new(sm.engine().as_ref());
    txn.get("t", key.as_bytes()).unwrap()
}

/// `cases` cases from a fixed seed, so every run checks the same cases;
/// `PROPTEST_RNG_SEED=<n>` explores others.
pub fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    let seed = if let RngSeed::Fixed(seed) = default.rng_seed {
        seed
    } else {
        0xce11_0000
    };
    ProptestConfig {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..default
    }
}

/// A [`MemEngine`] that, like RocksDB, keeps the default `may_block` (so the
/// stores run its writes off their workers) and lets a test act where a
/// disk would make the caller wait: before every synced write and log sync
/// (`on_sync`), and once a point-in-time view was read (`on_view`).
pub struct HookedEngine {
    pub inner: MemEngine,
    pub on_sync: Box<dyn Fn() -> cell0_storage::Result<()> + Send + Sync>,
    pub on_view: Box<dyn Fn() + Send + Sync>,
}

impl Default for HookedEngine {
    fn default() -> Self {
        Self {
            inner: MemEngine::new(),
            on_sync: Box::new(|| Ok(())),
            on_view: Box::new(|| {}),
        }
    }
}

impl ReadView for HookedEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> cell0_storage::Result<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }

    fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> cell0_storage::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan(cf, start, end, limit)
    }

    fn last(&self, cf: Cf) -> cell0_storage::Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.inner.last(cf)
    }

    fn for_each(&self, cf: Cf, f: &mut RowVisitor<'_>) -> cell0_storage::Result<()> {
        self.inner.for_each(cf, f)
    }
}

impl Engine for HookedEngine {
    fn write(&self, batch: WriteBatch, durability: Durability) -> cell0_storage::Result<()> {
        if durability == Durability::Sync {
            (self.on_sync)()?;
        }
        self.inner.write(batch, durability)
    }

    fn with_view(&self, f: &mut dyn FnMut(&dyn ReadView) -> cell0_storage::Result<()>) -> cell0_storage::Result<()> {
        let res = self.inner.with_view(f);
        (self.on_view)();
        res
    }

    fn flush(&self) -> cell0_storage::Result<()> {
        self.inner.flush()
    }

    fn sync_log(&self) -> cell0_storage::Result<()> {
        (self.on_sync)()?;
        self.inner.sync_log()
    }
}
