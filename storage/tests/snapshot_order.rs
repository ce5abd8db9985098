//! The stored snapshot only moves forward: a build that started before a newer
//! snapshot was installed must not replace it when it finishes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use cell0_storage::{Cf, Engine, MemEngine, ReadView, StateMachineStore, WriteBatch};
use common::{SetApply, Sm, read, set_entry};
use openraft::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;
use tokio::sync::oneshot;

/// Signals sent by a paused view: "the view was read", then waits for "go on".
type Pause = (oneshot::Sender<()>, mpsc::Receiver<()>);

/// A [`MemEngine`] whose next point-in-time view, once read, holds the caller
/// until the test lets it go: a snapshot build frozen between reading its
/// view and storing its result. Like RocksDB it keeps the default
/// `may_block`, so the store runs builds and installs on blocking threads.
#[derive(Default)]
struct PausingEngine {
    inner: MemEngine,
    pause: Mutex<Option<Pause>>,
}

impl ReadView for PausingEngine {
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

    fn for_each(&self, cf: Cf, f: &mut cell0_storage::RowVisitor<'_>) -> cell0_storage::Result<()> {
        self.inner.for_each(cf, f)
    }
}

impl Engine for PausingEngine {
    fn write(&self, batch: WriteBatch, durability: cell0_storage::Durability) -> cell0_storage::Result<()> {
        self.inner.write(batch, durability)
    }

    fn with_view(&self, f: &mut dyn FnMut(&dyn ReadView) -> cell0_storage::Result<()>) -> cell0_storage::Result<()> {
        let res = self.inner.with_view(f);
        let pause = self.pause.lock().unwrap().take();
        if let Some((viewed, go)) = pause {
            viewed.send(()).unwrap();
            go.recv().unwrap();
        }
        res
    }

    fn flush(&self) -> cell0_storage::Result<()> {
        self.inner.flush()
    }

    fn sync_log(&self) -> cell0_storage::Result<()> {
        self.inner.sync_log()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_build_does_not_replace_a_newer_installed_snapshot() {
    let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The leader's state at index 10, as a snapshot.
    let mut leader: Sm<MemEngine> = StateMachineStore::new(
        Arc::new(MemEngine::new()),
        Arc::new(SetApply::default()),
        leader_dir.path().to_path_buf(),
    )
    .unwrap();
    leader
        .apply(
            (1..=10)
                .map(|i| set_entry(i, &format!("k{i:02}"), "leader"))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let installed = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(installed.meta.last_log_id.map(|l| l.index), Some(10));

    // A follower at index 3 starts building a snapshot; it is frozen right
    // after reading its view.
    let engine = Arc::new(PausingEngine::default());
    let mut follower: Sm<PausingEngine> = StateMachineStore::new(
        engine.clone(),
        Arc::new(SetApply::default()),
        follower_dir.path().to_path_buf(),
    )
    .unwrap();
    follower
        .apply(
            (1..=3)
                .map(|i| set_entry(i, &format!("k{i:02}"), "follower"))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let (viewed_tx, viewed_rx) = oneshot::channel();
    let (go_tx, go_rx) = mpsc::channel();
    *engine.pause.lock().unwrap() = Some((viewed_tx, go_rx));
    let mut builder = follower.get_snapshot_builder().await;
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    viewed_rx.await.unwrap();

    // Meanwhile the leader's snapshot at 10 is installed.
    follower
        .install_snapshot(&installed.meta, installed.snapshot)
        .await
        .unwrap();

    // The stale build finishes: it is returned (openraft ignores a snapshot
    // older than its own) but must not replace the installed one.
    go_tx.send(()).unwrap();
    let built = build.await.unwrap().unwrap();
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(3));
    let current = follower.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(10));
    assert_eq!(current.meta.snapshot_id, installed.meta.snapshot_id);
    assert_eq!(read(&follower, "k10"), Some(b"leader".to_vec()));

    // A newer build still replaces it.
    follower.apply(vec![set_entry(11, "k11", "follower")]).await.unwrap();
    let newer = follower.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let current = follower.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(11));
    assert_eq!(current.meta.snapshot_id, newer.meta.snapshot_id);
}
