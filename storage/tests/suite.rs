//! openraft's storage conformance suite against both engines, plus the
//! state-machine properties the suite does not cover (atomic applies,
//! snapshot round trips, restart without replay).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use cell0_storage::{Cf, LogStore, MemEngine, ReadView as _, RocksEngine, StateMachineStore};
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

impl StoreBuilder<TestConfig, LogStore<TestConfig, MemEngine>, Sm<MemEngine>, tempfile::TempDir> for MemBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore<TestConfig, MemEngine>, Sm<MemEngine>), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(MemEngine::new());
        let sm =
            StateMachineStore::new(engine.clone(), Arc::new(SetApply::default()), dir.path().to_path_buf()).unwrap();
        Ok((dir, LogStore::new(engine), sm))
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
async fn snapshot_round_trip_replaces_state_and_what_apply_reads() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let (_l1, mut src) =
        cell0_storage::open_rocks::<TestConfig, _>(src_dir.path(), 1, Arc::new(SetApply::default())).unwrap();
    let dst_apply = Arc::new(SetApply::default());
    let (_l2, mut dst) = cell0_storage::open_rocks::<TestConfig, _>(dst_dir.path(), 2, dst_apply.clone()).unwrap();
    let entries: Vec<_> = (1..=5000).map(|i| set_entry(i, &format!("k{i:05}"), "v")).collect();
    src.apply(entries).await.unwrap();
    // Rows apply read and wrote before the install (what its row cache
    // holds) must not outlive the state they came from.
    let before = dst
        .apply(vec![set_entry(1, "stale", "x"), set_entry(2, "k04999", "old")])
        .await
        .unwrap();
    assert_eq!(before, vec![None, None]);
    let before = dst
        .apply(vec![set_entry(3, "stale", "y"), set_entry(4, "k04999", "older")])
        .await
        .unwrap();
    assert_eq!(before, vec![Some("x".into()), Some("old".into())]);

    let snap = src.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(5000));
    dst.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    // The application dropped what it derived from the old state before
    // the install, and heard of the new one after.
    assert_eq!(*dst_apply.hooks.lock().unwrap(), ["replacing", "installed"]);

    assert_eq!(read(&dst, "stale"), None);
    assert_eq!(read(&dst, "k04999"), Some(b"v".to_vec()));
    let (applied, _) = dst.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(5000));
    let current = dst.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.snapshot_id, snap.meta.snapshot_id);
    // Apply after the install reads the installed rows.
    let after = dst
        .apply(vec![set_entry(5001, "k04999", "w"), set_entry(5002, "stale", "z")])
        .await
        .unwrap();
    assert_eq!(after, vec![Some("v".into()), None]);
}

#[tokio::test]
async fn a_damaged_snapshot_leaves_the_old_state_and_a_good_one_survives_reopen() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let (_l1, mut src) =
        cell0_storage::open_rocks::<TestConfig, _>(src_dir.path(), 1, Arc::new(SetApply::default())).unwrap();
    let entries: Vec<_> = (1..=3000).map(|i| set_entry(i, &format!("k{i:05}"), "new")).collect();
    src.apply(entries).await.unwrap();
    let snap = src.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let good = snap.snapshot.path().to_path_buf();
    let bytes = std::fs::read(&good).unwrap();
    {
        let dst_apply = Arc::new(SetApply::default());
        let (_l2, mut dst) = cell0_storage::open_rocks::<TestConfig, _>(dst_dir.path(), 2, dst_apply.clone()).unwrap();
        dst.apply(vec![set_entry(1, "k00001", "old")]).await.unwrap();

        // Cut short and damaged copies are refused; the state stays the old one.
        let bad = src_dir.path().join("bad.snap");
        for damaged in [bytes[..bytes.len() / 2].to_vec(), {
            let mut b = bytes.clone();
            let at = b.len() - 100;
            b[at] ^= 1;
            b
        }] {
            std::fs::write(&bad, &damaged).unwrap();
            let file = cell0_storage::SnapshotFile::open(&bad).await.unwrap();
            assert!(dst.install_snapshot(&snap.meta, Box::new(file)).await.is_err());
            assert_eq!(read(&dst, "k00001"), Some(b"old".to_vec()));
            assert_eq!(read(&dst, "k00002"), None);
            let (applied, _) = dst.applied_state().await.unwrap();
            assert_eq!(applied.map(|l| l.index), Some(1));
        }
        // Each refused install still had the application drop what it
        // derived (the state might have been replaced); none was installed.
        assert_eq!(*dst_apply.hooks.lock().unwrap(), ["replacing", "replacing"]);
    }
    // The rows a refused install staged are gone after a reopen.
    let (l2, mut dst) =
        cell0_storage::open_rocks::<TestConfig, _>(dst_dir.path(), 2, Arc::new(SetApply::default())).unwrap();
    assert_eq!(dst.engine().last(Cf::Staging).unwrap(), None);

    let file = cell0_storage::SnapshotFile::open(&good).await.unwrap();
    dst.install_snapshot(&snap.meta, Box::new(file)).await.unwrap();
    drop((l2, dst));
    // The promoted keyspace is the state after a reopen too.
    let (_l2, mut dst) =
        cell0_storage::open_rocks::<TestConfig, _>(dst_dir.path(), 2, Arc::new(SetApply::default())).unwrap();
    assert_eq!(read(&dst, "k00001"), Some(b"new".to_vec()));
    assert_eq!(read(&dst, "k03000"), Some(b"new".to_vec()));
    assert_eq!(dst.engine().last(Cf::Staging).unwrap(), None);
    let (applied, _) = dst.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(3000));
    // Only the installed snapshot's file is left.
    let files = std::fs::read_dir(dst_dir.path().join(cell0_storage::SNAPSHOT_DIR))
        .unwrap()
        .count();
    assert_eq!(files, 1);
    let current = dst.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, snap.meta.last_log_id);
}
