//! openraft's storage conformance suite against both engines, plus the
//! state-machine properties the suite does not cover (atomic applies,
//! snapshot round trips, restart without replay).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use cell0_storage::{LogStore, MemEngine, RocksEngine, StateMachineStore};
use common::{SetApply, Sm, TestConfig, read, set_entry};
use openraft::RaftSnapshotBuilder;
use openraft::StorageError;
use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};

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
    assert_eq!(read(&sm, "a"), Some(b"2".to_vec()));
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

    assert_eq!(read(&dst, "stale"), None);
    assert_eq!(read(&dst, "k04999"), Some(b"v".to_vec()));
    let (applied, _) = dst.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(5000));
    let current = dst.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.snapshot_id, snap.meta.snapshot_id);
}
