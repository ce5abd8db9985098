//! Durability through openraft's storage traits under a simulated power loss:
//! every append acknowledged through its callback and the vote survive, and
//! the state machine comes back as some applied prefix of the log. Also how
//! a follower's synced append waits for a slow disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use cell0_storage::{LogStore, MemEngine, StateMachineStore};
use common::{HookedEngine, SetApply, Sm, TestConfig, read, set_entry};
use openraft::RaftSnapshotBuilder;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{LogId, RaftLogReader, Vote};

type Log = LogStore<TestConfig, MemEngine>;

fn open(engine: &Arc<MemEngine>, snapshots: &std::path::Path) -> (Log, Sm<MemEngine>) {
    let sm = StateMachineStore::new(engine.clone(), Arc::new(SetApply::default()), snapshots.to_path_buf()).unwrap();
    (LogStore::new(engine.clone()), sm)
}

/// Appends `indexes` and returns their log ids once the store acknowledged
/// them: `blocking_append` returns `Ok` only after the store's `LogFlushed`
/// callback reported success.
async fn append_acked(log: &mut Log, indexes: std::ops::RangeInclusive<u64>) -> Vec<LogId<u64>> {
    let entries: Vec<_> = indexes.map(|i| set_entry(i, &format!("k{i}"), "v")).collect();
    let ids = entries.iter().map(|e| e.log_id).collect();
    log.blocking_append(entries).await.unwrap();
    ids
}

/// The indexes of every entry `log` holds.
async fn indexes<E: cell0_storage::Engine>(log: &mut LogStore<TestConfig, E>) -> Vec<u64> {
    let entries = log.try_get_log_entries(0..).await.unwrap();
    entries.iter().map(|e| e.log_id.index).collect()
}

async fn apply(sm: &mut Sm<MemEngine>, indexes: std::ops::RangeInclusive<u64>) {
    let entries: Vec<_> = indexes.map(|i| set_entry(i, &format!("k{i}"), "v")).collect();
    sm.apply(entries).await.unwrap();
}

#[tokio::test]
async fn acknowledged_appends_and_the_vote_survive_power_loss() {
    let engine = Arc::new(MemEngine::new());
    let snapshots = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(&engine, snapshots.path());
    let mut acked = Vec::new();

    log.save_vote(&Vote::new(1, 1)).await.unwrap();
    acked.extend(append_acked(&mut log, 1..=3).await);
    apply(&mut sm, 1..=3).await;
    log.save_committed(Some(acked[2])).await.unwrap();
    // Recording a snapshot flushes the state it covers first.
    let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(3));
    acked.extend(append_acked(&mut log, 4..=6).await);
    apply(&mut sm, 4..=5).await;
    log.save_committed(Some(acked[4])).await.unwrap();
    let vote = Vote::new(2, 1);
    log.save_vote(&vote).await.unwrap();
    // No synced write other than the appends themselves after this point.
    acked.extend(append_acked(&mut log, 7..=9).await);
    apply(&mut sm, 6..=8).await;
    log.save_committed(Some(acked[7])).await.unwrap();
    drop((log, sm));

    // A process crash already loses the applies since the flush (they are
    // unlogged), and keeps the log.
    let crashed = Arc::new(engine.fork());
    let (_, mut sm) = open(&crashed, snapshots.path());
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(3));
    drop(sm);

    engine.power_loss();

    let (mut log, mut sm) = open(&engine, snapshots.path());
    let present: Vec<LogId<u64>> = log
        .try_get_log_entries(0..)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.log_id)
        .collect();
    for id in &acked {
        assert!(
            present.contains(id),
            "acknowledged entry {id} lost; log holds {present:?}"
        );
    }
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, acked.last().copied());
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));

    // Applies are durable only once flushed: those the snapshot's flush
    // covered survive, later ones are lost (synced appends do not keep
    // them), and the state is exactly that of the applied prefix.
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(3));
    assert_eq!(read(&sm, "k3"), Some(b"v".to_vec()));
    assert_eq!(read(&sm, "k4"), None);
    // The log still holds what the state machine lost: it can catch up.
    assert!(present.iter().any(|id| id.index == 4));
    apply(&mut sm, 4..=9).await;
    assert_eq!(read(&sm, "k9"), Some(b"v".to_vec()));
}

#[tokio::test]
async fn the_commit_record_is_written_with_the_next_append() {
    let engine = Arc::new(MemEngine::new());
    let snapshots = tempfile::tempdir().unwrap();
    let (mut log, sm) = open(&engine, snapshots.path());
    let acked = append_acked(&mut log, 1..=3).await;
    log.save_committed(Some(acked[1])).await.unwrap();
    // The store that saved it knows it at once; the engine does not hold it
    // yet, so a store opened over it now reads no record.
    assert_eq!(log.read_committed().await.unwrap(), Some(acked[1]));
    let (mut reopened, _) = open(&engine, snapshots.path());
    assert_eq!(reopened.read_committed().await.unwrap(), None);
    // The next append carries it, under its fsync.
    let more = append_acked(&mut log, 4..=4).await;
    drop((log, sm, reopened));
    engine.power_loss();
    let (mut log, _sm) = open(&engine, snapshots.path());
    assert_eq!(log.read_committed().await.unwrap(), Some(acked[1]));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, more.last().copied());
}

/// An append's entries are readable (so a leader can send them) as soon as
/// the write returns, and its callback reports them only once a sync made
/// them durable: a power loss before that takes them, one after keeps them.
#[tokio::test(start_paused = true)]
async fn an_append_is_readable_at_once_and_acknowledged_once_synced() {
    let engine = Arc::new(MemEngine::new());
    engine.set_sync_latency(std::time::Duration::from_secs(1));
    let snapshots = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open(&engine, snapshots.path());
    let mut writer = log.clone();
    let append = tokio::spawn(async move { writer.blocking_append(vec![set_entry(1, "k1", "v")]).await });
    let mut readable = false;
    for _ in 0..100 {
        if !log.try_get_log_entries(1..2).await.unwrap().is_empty() {
            readable = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(readable, "the appended entry is not readable before its sync");
    assert!(!append.is_finished(), "acknowledged before its sync");
    let lost = Arc::new(engine.fork());
    lost.power_loss();
    let (mut reopened, _) = open(&lost, snapshots.path());
    assert!(reopened.try_get_log_entries(0..).await.unwrap().is_empty());

    append.await.unwrap().unwrap();
    let kept = Arc::new(engine.fork());
    kept.power_loss();
    let (mut reopened, _) = open(&kept, snapshots.path());
    assert_eq!(indexes(&mut reopened).await, [1]);
}

/// A follower's synced append runs on its worker while the disk syncs
/// fast; after a slow sync the next one leaves the worker, so the worker's
/// other tasks run while it waits for the disk. Here the disk's second
/// sync waits for a task spawned on the only worker: inline, the append
/// would wait for a task that cannot run, and fail at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_follower_append_after_a_slow_sync_leaves_the_worker() {
    let (ran_tx, ran_rx) = mpsc::channel::<()>();
    let ran_rx = std::sync::Mutex::new(ran_rx);
    let first = AtomicBool::new(true);
    let engine = Arc::new(HookedEngine {
        on_sync: Box::new(move || {
            if first.swap(false, Ordering::SeqCst) {
                // The first sync is slow, as on a busy disk: the device's
                // latency, which the store must measure, not a wait for
                // another thread (that is the channel below).
                std::thread::sleep(Duration::from_millis(20));
                return Ok(());
            }
            let ran = ran_rx.lock().map_err(|_| cell0_storage::Error::Io("poisoned".into()))?;
            ran.recv_timeout(Duration::from_secs(30))
                .map_err(|_| cell0_storage::Error::Io("the worker's other task never ran during the sync".into()))
        }),
        ..HookedEngine::default()
    });
    // The appends run in a task, on the runtime's only worker (the test's
    // own body runs on another thread).
    let mut log = tokio::spawn(async move {
        let mut log = LogStore::<TestConfig, _>::new(engine);
        log.blocking_append(vec![set_entry(1, "k1", "v")]).await.unwrap();
        tokio::spawn(async move {
            let _ = ran_tx.send(());
        });
        log.blocking_append(vec![set_entry(2, "k2", "v")]).await.unwrap();
        log
    })
    .await
    .unwrap();
    assert_eq!(indexes(&mut log).await, [1, 2]);
}
