//! Snapshots at scale, backups and disaster recovery, through the public
//! API of real members on loopback (RocksDB, gRPC):
//! - a new member catches up by a snapshot of the leader's current state
//!   (not its older stored one), streamed in many messages, and ends with
//!   exactly the leader's rows;
//! - a snapshot exported from a loaded cluster restores into a new data dir
//!   as a new cluster with the same rows (but its own cluster id), and a
//!   truncated file is refused;
//! - after losing two of three members for good, the survivor recovers
//!   alone with every write it had.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use cell0_consensus::testkit::{LocalNode, local_cluster};
use cell0_consensus::{Command, Consensus, ConsensusConfig, Consistency, NodeInfo, offline};
use cell0_storage::{Cf, ReadView as _, RocksEngine};

const DEADLINE: Duration = Duration::from_secs(60);

fn config() -> ConsensusConfig {
    ConsensusConfig {
        heartbeat_ms: 100,
        election_timeout_min_ms: 500,
        election_timeout_max_ms: 1000,
        snapshot_every: 200,
        snapshot_log_percent: 0,
        keep_logs_after_snapshot: 0,
        snapshot_chunk_bytes: 64 * 1024,
        ..Default::default()
    }
}

fn put(k: String, v: Vec<u8>) -> Command {
    Command::Put {
        key: k.into_bytes(),
        value: v,
    }
}

/// Writes `n` keys of `size` bytes through `c`, 64 at a time.
async fn load(c: &Consensus, n: usize, size: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let writes = chunk.iter().map(|i| {
            let value = vec![(*i % 251) as u8; size];
            c.propose(put(format!("key/{i:06}"), value))
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
    }
}

/// Every key-value pair `c` holds, read at `consistency`.
async fn all_pairs(c: &Consensus, consistency: Consistency) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut after = Vec::new();
    loop {
        let (page, more, _) = c.range(b"", &after, 1000, consistency).await.unwrap();
        for kv in page {
            after = kv.key.clone();
            out.push((kv.key, kv.value));
        }
        if !more {
            return out;
        }
    }
}

/// Waits until `c` has applied at least `index`.
async fn applied(c: &Consensus, index: u64) {
    c.raft()
        .wait(Some(DEADLINE))
        .applied_index_at_least(Some(index), "caught up")
        .await
        .unwrap();
}

/// Every state row of the stopped store at `dir`, but the cluster id.
fn state_rows(dir: &Path, id: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let engine = RocksEngine::open(dir, id).unwrap();
    let mut rows = Vec::new();
    engine
        .for_each(Cf::State, &mut |k, v| {
            if !k.ends_with(b"cluster_id") {
                rows.push((k.to_vec(), v.to_vec()));
            }
            Ok(())
        })
        .unwrap();
    rows
}

/// Every file in the snapshot directory of the node at `dir`.
fn snapshot_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join(cell0_storage::SNAPSHOT_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_member_catches_up_on_a_large_state_by_a_streamed_snapshot_of_the_current_state() {
    let root = tempfile::tempdir().unwrap();
    // Snapshots only when asked, so the stored one falls behind.
    let config = ConsensusConfig {
        snapshot_every: 1_000_000,
        ..config()
    };
    let nodes = local_cluster(root.path(), 3, config.clone()).await.unwrap();
    let leader = &nodes[0].consensus;
    // About 8 MiB of values: over a hundred 64 KiB messages.
    load(leader, 2000, 4096).await;
    let stored = leader.status().applied_index;
    leader.raft().trigger().snapshot().await.unwrap();
    leader
        .raft()
        .wait(Some(DEADLINE))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= stored), "snapshot built")
        .await
        .unwrap();
    leader.raft().trigger().purge_log(stored).await.unwrap();
    // The trigger only asks: wait until the log is purged, or the new
    // member could still be sent the entries.
    leader
        .raft()
        .wait(Some(DEADLINE))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= stored), "log purged")
        .await
        .unwrap();
    // Written after the stored snapshot: a new member gets them in the
    // snapshot of the current state, not as entries to replay.
    load(leader, 300, 64).await;
    let current = leader.status().applied_index;
    assert!(current > stored);

    let fourth = LocalNode::start(4, root.path().join("n4"), None, config).await.unwrap();
    leader.join(4, fourth.consensus.info().clone()).await.unwrap();
    applied(&fourth.consensus, current).await;
    let snap = fourth.consensus.raft().metrics().borrow().snapshot;
    assert!(
        snap.is_some_and(|s| s.index >= current),
        "caught up by a snapshot of the current state (stored one at {stored}, applied {current}): {snap:?}"
    );
    assert_eq!(
        all_pairs(&fourth.consensus, Consistency::Serializable).await,
        all_pairs(leader, Consistency::Linearizable).await
    );
    // The received snapshot is a file of its own; nothing is left over once
    // transfers still in flight (a replication stream rebuilt by the
    // learner's promotion may have started a second one) have ended.
    // The leader's live file is gone once its transfer ended: only its
    // stored snapshot is left.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let fourth_files = snapshot_files(&root.path().join("n4"));
        let leader_files = snapshot_files(&root.path().join("n1"));
        let one_snap = |files: &[String]| files.len() == 1 && files[0].ends_with(".snap");
        if one_snap(&fourth_files) && one_snap(&leader_files) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new member: {fourth_files:?}, leader: {leader_files:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for n in nodes {
        n.stop().await;
    }
    fourth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exported_snapshot_restores_as_a_new_cluster_and_a_truncated_one_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let nodes = local_cluster(root.path(), 3, config()).await.unwrap();
    load(&nodes[0].consensus, 500, 300).await;
    let acknowledged = nodes[0].consensus.status().applied_index;
    // Exported through a follower: as of a linearizable read there.
    let mut exported = nodes[1].consensus.export_snapshot().await.unwrap();
    let file = root.path().join("backup.snap");
    let mut bytes = Vec::new();
    exported.file.read_to_end(&mut bytes).unwrap();
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(bytes.len() as u64, exported.summary.file_bytes);
    assert!(exported.index >= acknowledged);
    let old_cluster = nodes[0].consensus.cluster_id();
    assert_eq!(exported.summary.header.cluster_id, old_cluster);
    let want = all_pairs(&nodes[0].consensus, Consistency::Linearizable).await;
    let mut stopped = Vec::new();
    for n in nodes {
        stopped.push(n.stop().await);
    }

    let summary = cell0_storage::snapshot::verify(&file, &mut |_, _| {}).unwrap();
    assert_eq!(summary, exported.summary);
    let info = |dir: &str| NodeInfo {
        name: dir.into(),
        site: "local".into(),
        public_addr: "127.0.0.1:1".into(),
        internal_addr: "127.0.0.1:1".into(),
    };

    // A cut-short copy is refused, and leaves nothing restored.
    let short = root.path().join("short.snap");
    std::fs::write(&short, &bytes[..bytes.len() - 40]).unwrap();
    let err = offline::restore(&root.path().join("bad"), 20, info("bad"), &short, summary.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");

    let dir = root.path().join("restored");
    let report = offline::restore(&dir, 10, info("restored"), &file, summary)
        .await
        .unwrap();
    assert_eq!(report.old_cluster_id, old_cluster);
    assert_ne!(report.cluster_id, old_cluster);
    assert_eq!(report.index, exported.index);
    // Every row but the cluster id is the old cluster's.
    assert_eq!(state_rows(&dir, 10), state_rows(&stopped[0].dir, 1));

    let node = LocalNode::start(10, dir, None, config()).await.unwrap();
    let c = &node.consensus;
    c.wait_for_leader(DEADLINE).await.unwrap();
    assert_eq!(c.cluster_id(), report.cluster_id);
    assert_eq!(all_pairs(c, Consistency::Linearizable).await, want);
    let members = c.members();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].id, 10);
    c.propose(put("after".into(), b"restore".to_vec())).await.unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_survivor_recovers_alone_with_every_write_it_had() {
    let root = tempfile::tempdir().unwrap();
    let nodes = local_cluster(root.path(), 3, config()).await.unwrap();
    let leader = &nodes[0].consensus;
    load(leader, 300, 100).await;
    let want = all_pairs(leader, Consistency::Linearizable).await;
    let last = leader.status().last_log_index;
    // The survivor has every entry (it acknowledged them all).
    nodes[2]
        .consensus
        .raft()
        .wait(Some(DEADLINE))
        .metrics(|m| m.last_log_index >= Some(last), "survivor has the log")
        .await
        .unwrap();
    let mut stopped = Vec::new();
    for n in nodes {
        stopped.push(n.stop().await);
    }
    // Nodes 1 and 2 are lost for good; node 3 is stopped with its data.
    let survivor = stopped.pop().unwrap();
    let dry = offline::recover(&survivor.dir, survivor.id, true).await.unwrap();
    let report = offline::recover(&survivor.dir, survivor.id, false).await.unwrap();
    assert_eq!(dry.kept_last_index, report.kept_last_index);
    assert!(report.kept_last_index >= last);
    assert_eq!(report.removed, vec![1, 2]);

    let node = LocalNode::restart(survivor, config()).await.unwrap();
    let c = &node.consensus;
    c.wait_for_leader(DEADLINE).await.unwrap();
    assert_eq!(all_pairs(c, Consistency::Linearizable).await, want);
    let members = c.members();
    assert_eq!(members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![3]);
    c.propose(put("after".into(), b"recovery".to_vec())).await.unwrap();
    node.stop().await;
}
