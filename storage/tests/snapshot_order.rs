//! The stored snapshot only moves forward: a build that started before a newer
//! snapshot was installed must not replace it when it finishes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use cell0_storage::{MemEngine, StateMachineStore};
use common::{HookedEngine, SetApply, Sm, read, set_entry};
use openraft::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;
use tokio::sync::oneshot;

/// Signals sent by a paused view: "the view was read", then waits for "go on".
type Pause = (oneshot::Sender<()>, mpsc::Receiver<()>);

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
    // after reading its view (its engine holds the caller of a view, once
    // read, until the test lets it go).
    let pause: Arc<Mutex<Option<Pause>>> = Arc::default();
    let paused = pause.clone();
    let engine = Arc::new(HookedEngine {
        on_view: Box::new(move || {
            let taken = paused.lock().unwrap().take();
            if let Some((viewed, go)) = taken {
                viewed.send(()).unwrap();
                go.recv().unwrap();
            }
        }),
        ..HookedEngine::default()
    });
    let mut follower: Sm<HookedEngine> = StateMachineStore::new(
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
    *pause.lock().unwrap() = Some((viewed_tx, go_rx));
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
