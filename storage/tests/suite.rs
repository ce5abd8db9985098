//! openraft's storage conformance suite against both engines, plus the
//! state-machine properties the suite does not cover (atomic applies,
//! snapshot round trips, restart without replay).

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use cell0_storage::{Apply, LogStore, MemEngine, RocksEngine, StateMachineStore, Txn};
use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Set {
    key: String,
    value: String,
}

openraft::declare_raft_types!(
    TestConfig:
        D = Set,
        R = Option<String>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TestConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Sets `key` in table "t" and reports the previous value.
#[derive(Default)]
struct SetApply {
    published: Mutex<Vec<String>>,
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
        txn.put("t", data.key.as_bytes(), data.value.as_bytes())?;
        events.push(data.key.clone());
        Ok(prev.map(|p| String::from_utf8_lossy(&p).into_owned()))
    }

    fn empty_response(&self) -> Option<String> {
        None
    }

    fn publish(&self, events: Vec<String>) {
        self.published.lock().unwrap().extend(events);
    }

    fn snapshot_installed(&self, _state: &dyn Txn) {}
}

type Sm<E> = StateMachineStore<TestConfig, E, SetApply>;

struct RocksBuilder;

impl StoreBuilder<TestConfig, LogStore<TestConfig, RocksEngine>, Sm<RocksEngine>, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore<TestConfig, RocksEngine>, Sm<RocksEngine>), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let (log, sm) = cell0_storage::open_rocks(dir.path(), 1, Arc::new(SetApply::default())).unwrap();
        Ok((dir, log, sm))
    }
}

struct MemBuilder;

impl StoreBuilder<TestConfig, LogStore<TestConfig, MemEngine>, Sm<MemEngine>, ()> for MemBuilder {
    async fn build(&self) -> Result<((), LogStore<TestConfig, MemEngine>, Sm<MemEngine>), StorageError<u64>> {
        let engine = Arc::new(MemEngine::new());
        let sm = StateMachineStore::new(engine.clone(), Arc::new(SetApply::default())).unwrap();
        Ok(((), LogStore::new(engine), sm))
    }
}

#[test]
fn rocksdb_passes_the_openraft_suite() {
    Suite::test_all(RocksBuilder).unwrap();
}

#[test]
fn memory_passes_the_openraft_suite() {
    Suite::test_all(MemBuilder).unwrap();
}

fn set_entry(index: u64, key: &str, value: &str) -> Entry<TestConfig> {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Set {
            key: key.into(),
            value: value.into(),
        }),
    }
}

async fn read(sm: &Sm<RocksEngine>, key: &str) -> Option<Vec<u8>> {
    let txn = cell0_storage::EngineTxn::new(sm.engine().as_ref());
    txn.get("t", key.as_bytes()).unwrap()
}

#[tokio::test]
async fn applied_state_survives_reopen_and_apply_is_ordered() {
    let dir = tempfile::tempdir().unwrap();
    {
        let apply = Arc::new(SetApply::default());
        let (_log, mut sm) = cell0_storage::open_rocks::<TestConfig, _>(dir.path(), 7, apply.clone()).unwrap();
        let out = sm
            .apply(vec![
                set_entry(1, "a", "1"),
                set_entry(2, "a", "2"),
                set_entry(3, "b", "3"),
            ])
            .await
            .unwrap();
        // Later entries of one call see earlier ones.
        assert_eq!(out, vec![None, Some("1".into()), None]);
        assert_eq!(*apply.published.lock().unwrap(), vec!["a", "a", "b"]);
    }
    let (_log, mut sm) =
        cell0_storage::open_rocks::<TestConfig, _>(dir.path(), 7, Arc::new(SetApply::default())).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(3));
    assert_eq!(read(&sm, "a").await, Some(b"2".to_vec()));
}

#[tokio::test]
async fn snapshot_round_trip_replaces_state() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let (_l1, mut src) =
        cell0_storage::open_rocks::<TestConfig, _>(src_dir.path(), 1, Arc::new(SetApply::default())).unwrap();
    let (_l2, mut dst) =
        cell0_storage::open_rocks::<TestConfig, _>(dst_dir.path(), 2, Arc::new(SetApply::default())).unwrap();
    let entries: Vec<_> = (1..=5000).map(|i| set_entry(i, &format!("k{i:05}"), "v")).collect();
    src.apply(entries).await.unwrap();
    dst.apply(vec![set_entry(1, "stale", "x")]).await.unwrap();

    let snap = src.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(5000));
    dst.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();

    assert_eq!(read(&dst, "stale").await, None);
    assert_eq!(read(&dst, "k04999").await, Some(b"v".to_vec()));
    let (applied, _) = dst.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(5000));
    let current = dst.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.snapshot_id, snap.meta.snapshot_id);
}
