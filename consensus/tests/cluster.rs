//! Multi-node tests: three Raft members in one process, each on its own
//! RocksDB in a temp dir, wired over real gRPC on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_consensus::network::{TcpTransport, Transport};
use cell0_consensus::testkit::{LocalNode, local_cluster};
use cell0_consensus::{
    Command, Consensus, ConsensusConfig, ConsensusError, Consistency, PreconditionCause, Response, UnavailableCause,
    registry,
};

const DEADLINE: Duration = Duration::from_secs(30);

fn config() -> ConsensusConfig {
    ConsensusConfig {
        heartbeat_ms: 100,
        election_timeout_min_ms: 500,
        election_timeout_max_ms: 1000,
        ..Default::default()
    }
}

async fn cluster(root: &std::path::Path, n: u64, config: ConsensusConfig) -> Vec<LocalNode> {
    local_cluster(root, n, config).await.unwrap()
}

fn put(k: impl Into<Vec<u8>>, v: impl Into<Vec<u8>>) -> Command {
    Command::Put {
        key: k.into(),
        value: v.into(),
    }
}

async fn value(c: &Consensus, key: &str, consistency: Consistency) -> Option<Vec<u8>> {
    c.get(key.as_bytes(), consistency).await.unwrap().0.map(|kv| kv.value)
}

/// Whether `c`'s replica switched to the request window's second layout.
/// Whether the replica's request window is in generations and its
/// history in groups: the newest layouts, which the first `RequestV3`
/// switches to.
async fn switched(c: &Consensus) -> bool {
    c.read(Consistency::Linearizable, |txn| {
        Ok(txn.get("meta", b"request_gens")?.is_some() && txn.get("meta", b"history_groups")?.is_some())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_any_node_are_read_linearizably_everywhere() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 3, config()).await;
    let voters: BTreeSet<u64> = nodes[0]
        .consensus
        .members()
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));

    for (i, node) in nodes.iter().enumerate() {
        let r = node
            .consensus
            .propose(put(format!("k{i}"), format!("v{i}")))
            .await
            .unwrap();
        assert!(matches!(r, Response::Put { .. }), "{r:?}");
    }
    for node in &nodes {
        for i in 0..3 {
            assert_eq!(
                value(&node.consensus, &format!("k{i}"), Consistency::Linearizable).await,
                Some(format!("v{i}").into_bytes()),
                "node {} key k{i}",
                node.id()
            );
        }
    }
    // A write through a follower is visible to a linearizable read through
    // another follower immediately after it is acknowledged.
    let leader = nodes[0].consensus.leader().unwrap().0;
    let followers: Vec<&LocalNode> = nodes.iter().filter(|n| n.id() != leader).collect();
    for round in 0..20 {
        followers[0]
            .consensus
            .propose(put("x", format!("{round}")))
            .await
            .unwrap();
        assert_eq!(
            value(&followers[1].consensus, "x", Consistency::Linearizable).await,
            Some(format!("{round}").into_bytes())
        );
    }
    let err = nodes[1]
        .consensus
        .propose(put(vec![b'k'; 4097], "v"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");

    // Every member reads the newest log format, so the leader proposes
    // `RequestV3` (once it heard from each): the first one switched the
    // request window to generations and the history to groups on every
    // replica, and the history still reads every write back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !switched(&followers[0].consensus).await {
        assert!(tokio::time::Instant::now() < deadline, "no RequestV3 within 10 s");
        followers[0].consensus.propose(put("y", "1")).await.unwrap();
    }
    for round in 0..3 {
        followers[1]
            .consensus
            .propose(put("x", format!("after{round}")))
            .await
            .unwrap();
    }
    for node in &nodes {
        assert!(switched(&node.consensus).await, "node {}", node.id());
        // A linearizable read waits until the replica applied every write.
        assert_eq!(
            value(&node.consensus, "x", Consistency::Linearizable).await,
            Some(b"after2".to_vec())
        );
        let values: Vec<Vec<u8>> = node
            .consensus
            .history(b"x", 1, 100)
            .unwrap()
            .into_iter()
            .map(|ev| ev.kv.value)
            .collect();
        let expected: Vec<Vec<u8>> = (0..20)
            .map(|r| format!("{r}"))
            .chain((0..3).map(|r| format!("after{r}")))
            .map(String::into_bytes)
            .collect();
        assert_eq!(values, expected, "node {}", node.id());
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_resume_after_the_leader_stops_and_it_catches_up_on_return() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), 3, config()).await;
    nodes[0].consensus.propose(put("before", "1")).await.unwrap();

    let leader = nodes[0].consensus.leader().unwrap().0;
    let idx = nodes.iter().position(|n| n.id() == leader).unwrap();
    let stopped = nodes.remove(idx).stop().await;

    for i in 0..50 {
        nodes[i % 2]
            .consensus
            .propose(put(format!("after{i}"), "v"))
            .await
            .unwrap();
    }
    let new_leader = nodes[0].consensus.leader().unwrap().0;
    assert_ne!(new_leader, leader);

    let back = LocalNode::restart(stopped, config()).await.unwrap();
    let target = nodes[0].consensus.status().commit_index;
    back.consensus
        .raft()
        .wait(Some(DEADLINE))
        .applied_index_at_least(Some(target), "the old leader catches up")
        .await
        .unwrap();
    assert_eq!(
        value(&back.consensus, "after49", Consistency::Serializable).await,
        Some(b"v".to_vec())
    );
    assert_eq!(
        value(&back.consensus, "before", Consistency::Serializable).await,
        Some(b"1".to_vec())
    );
    back.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_learner_catches_up_by_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let cfg = ConsensusConfig {
        snapshot_every: 20,
        // On the entry count alone: this small state is mostly history.
        snapshot_log_percent: 0,
        keep_logs_after_snapshot: 0,
        ..config()
    };
    let nodes = cluster(root.path(), 3, cfg.clone()).await;
    // More than two snapshot intervals, one entry per write.
    for i in 0..60 {
        nodes[0].consensus.propose(put(format!("k{i:03}"), "v")).await.unwrap();
    }
    nodes[0]
        .consensus
        .raft()
        .wait(Some(DEADLINE))
        .metrics(|m| m.purged.map_or(0, |p| p.index) >= 40, "the leader purges its log")
        .await
        .unwrap();

    let learner = LocalNode::start(4, root.path().join("n4"), None, cfg).await.unwrap();
    nodes[0]
        .consensus
        .join(4, learner.consensus.info().clone())
        .await
        .unwrap();
    let member = nodes[0].consensus.members().into_iter().find(|m| m.id == 4).unwrap();
    assert!(!member.voter, "a fourth node stays a learner with raft.voters = 3");
    let target = nodes[0].consensus.status().commit_index;
    learner
        .consensus
        .raft()
        .wait(Some(DEADLINE))
        .applied_index_at_least(Some(target), "the learner applies the log")
        .await
        .unwrap();
    let snap = learner.consensus.raft().metrics().borrow().snapshot;
    assert!(snap.is_some(), "the learner installed a snapshot");
    let (kvs, more, _) = learner
        .consensus
        .range(b"k", b"", 0, Consistency::Serializable)
        .await
        .unwrap();
    assert_eq!((kvs.len(), more), (60, false));
    learner.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_restart_keeps_every_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 3, config()).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = nodes[i % 3].consensus.clone();
        tasks.push(tokio::spawn(async move {
            c.propose(put(format!("k{i:03}"), format!("{i}"))).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut stopped = Vec::new();
    for n in nodes {
        stopped.push(n.stop().await);
    }
    let mut nodes = Vec::new();
    for s in stopped {
        nodes.push(LocalNode::restart(s, config()).await.unwrap());
    }
    nodes[0].consensus.wait_for_leader(DEADLINE).await.unwrap();
    for n in &nodes {
        let (kvs, _, _) = n
            .consensus
            .range(b"k", b"", 0, Consistency::Linearizable)
            .await
            .unwrap();
        assert_eq!(kvs.len(), 200, "node {}", n.id());
        for kv in kvs {
            let i: usize = String::from_utf8(kv.key[1..].to_vec()).unwrap().parse().unwrap();
            assert_eq!(kv.value, i.to_string().into_bytes());
        }
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_each_apply_once() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 3, config()).await;
    let leader_id = nodes[0].consensus.leader().unwrap().0;
    let leader = nodes.iter().find(|n| n.id() == leader_id).unwrap();
    let before = leader.consensus.status().last_log_index;
    let revision = leader.consensus.revision().unwrap();
    let mut tasks = Vec::new();
    for i in 0..256 {
        let c = leader.consensus.clone();
        tasks.push(tokio::spawn(async move { c.propose(put(format!("w{i}"), "v")).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // How many entries the writes share depends on scheduling (the grouping
    // itself is unit-tested in the batcher); that each applies once does not.
    let entries = leader.consensus.status().last_log_index - before;
    assert!(entries <= 256, "256 writes took {entries} log entries");
    assert_eq!(leader.consensus.revision().unwrap(), revision + 256);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_changes_replicate_and_wake_every_replica() {
    use cell0_consensus::{ModelCommand, ModelFile, ModelManifest, ModelOutcome};

    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 3, config()).await;
    let mut watches: Vec<_> = nodes
        .iter()
        .map(|n| n.consensus.watch_table(cell0_consensus::Table::Models))
        .collect();
    for w in &mut watches {
        w.borrow_and_update();
    }
    let manifest = ModelManifest {
        name: "minilm".into(),
        version: 1,
        architecture: "all-minilm-l6-v2".into(),
        files: vec![ModelFile {
            path: "model.safetensors".into(),
            sha256: "a".repeat(64),
            size: 1,
        }],
    };
    // Through a follower: forwarded to the leader like any write.
    let follower = nodes
        .iter()
        .find(|n| n.consensus.leader().map(|l| l.0) != Some(n.consensus.id()))
        .unwrap();
    let add = ModelCommand::Add {
        manifest: manifest.clone(),
        holder: 1,
    };
    assert_eq!(
        ModelCommand::outcome(follower.consensus.propose(add.clone().into_command()).await.unwrap()).unwrap(),
        ModelOutcome::Added
    );
    for (node, w) in nodes.iter().zip(&mut watches) {
        tokio::time::timeout(DEADLINE, w.changed()).await.unwrap().unwrap();
        let models = node
            .consensus
            .read(Consistency::Serializable, registry::list)
            .await
            .unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].manifest, manifest);
    }
    let held = ModelCommand::Held {
        name: "minilm".into(),
        version: 1,
        node: 3,
    };
    assert_eq!(
        ModelCommand::outcome(nodes[0].consensus.propose(held.into_command()).await.unwrap()).unwrap(),
        ModelOutcome::Held
    );
    let models = nodes[1]
        .consensus
        .read(Consistency::Linearizable, registry::list)
        .await
        .unwrap();
    assert_eq!(models[0].holders, BTreeSet::from([1, 3]));
    // An invalid manifest is refused before it is proposed, naming the field.
    let mut bad = manifest.clone();
    bad.files[0].path = "../escape".into();
    let err = nodes[0]
        .consensus
        .propose(
            ModelCommand::Add {
                manifest: bad,
                holder: 1,
            }
            .into_command(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("files[0].path"), "{err}");
}

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn reachable(c: &Consensus, id: u64) -> bool {
    c.members().iter().any(|m| m.id == id && m.reachable)
}

fn voters(c: &Consensus) -> BTreeSet<u64> {
    c.members().iter().filter(|m| m.voter).map(|m| m.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_whose_internal_address_reaches_another_node_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 1, config()).await;
    let leader = &nodes[0].consensus;
    let joiner = LocalNode::start(2, root.path().join("n2"), None, config())
        .await
        .unwrap();
    let bystander = LocalNode::start(3, root.path().join("n3"), None, config())
        .await
        .unwrap();

    // The address of a process that is not node 2 (like a loopback default
    // that reaches the leader's host): the handshake answers node 3.
    let mut wrong = joiner.consensus.info().clone();
    wrong.internal_addr = bystander.addr.to_string();
    let err = leader.join(2, wrong).await.unwrap_err();
    assert!(
        matches!(&err, ConsensusError::InvalidArgument { field, reason } if field == "internal_addr" && reason.contains("reaches node 0000000000000003")),
        "{err}"
    );
    // The leader's own address is refused as a duplicate.
    let mut own = joiner.consensus.info().clone();
    own.internal_addr = nodes[0].addr.to_string();
    let err = leader.join(2, own).await.unwrap_err();
    assert!(
        matches!(&err, ConsensusError::InvalidArgument { field, .. } if field == "internal_addr"),
        "{err}"
    );
    assert_eq!(leader.members().len(), 1, "no bad member was added");

    leader.join(2, joiner.consensus.info().clone()).await.unwrap();
    assert_eq!(voters(leader), BTreeSet::from([1, 2]));
    assert_ne!(leader.cluster_id(), 0);
    joiner
        .consensus
        .raft()
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.membership_config.membership().voter_ids().count() == 2,
            "node 2 knows it votes",
        )
        .await
        .unwrap();
    assert_eq!(
        joiner.consensus.cluster_id(),
        leader.cluster_id(),
        "the joiner learned the cluster id"
    );
    for n in [joiner, bystander] {
        n.stop().await;
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_join_does_not_promote_an_unreachable_learner() {
    let config = ConsensusConfig {
        request_timeout_ms: 3_000,
        ..config()
    };
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 1, config.clone()).await;
    let leader = &nodes[0].consensus;
    let learner = LocalNode::start(2, root.path().join("n2"), None, config.clone())
        .await
        .unwrap();
    let info = learner.consensus.info().clone();
    // A first join that added the learner and then failed before promoting.
    leader.raft().add_learner(2, info.clone(), true).await.unwrap();
    learner.stop().await;
    wait_until("the leader sees node 2 down", || !reachable(leader, 2)).await;

    let err = leader.join(2, info).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConsensusError::FailedPrecondition {
                cause: PreconditionCause::UnreachableLearner,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(voters(leader), BTreeSet::from([1]), "the dead learner was not promoted");
    leader.propose(put("still", "writable")).await.unwrap();
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_voter_while_another_is_down_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), 3, config()).await;
    let leader_id = nodes[0].consensus.leader().unwrap().0;
    let followers: Vec<u64> = nodes.iter().map(LocalNode::id).filter(|id| *id != leader_id).collect();
    let down = nodes.iter().position(|n| n.id() == followers[1]).unwrap();
    nodes.remove(down).stop().await;
    let leader = nodes.iter().find(|n| n.id() == leader_id).unwrap().consensus.clone();
    wait_until("the leader sees the stopped voter down", || {
        !reachable(&leader, followers[1])
    })
    .await;

    // {leader, down} would need both to commit: refused, not wedged.
    let err = leader.remove(followers[0]).await.unwrap_err();
    assert!(
        matches!(&err, ConsensusError::FailedPrecondition { cause: PreconditionCause::QuorumAtRisk, message } if message.contains("quorum")),
        "{err}"
    );
    assert_eq!(voters(&leader).len(), 3);
    leader.propose(put("after", "refusal")).await.unwrap();
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_reports_the_revision_of_the_data_it_returns() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 1, config()).await;
    let c = nodes[0].consensus.clone();
    let base = c.revision().unwrap();
    let writes = 300u64;
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..writes {
                c.propose(put(format!("a/{i:04}"), "v")).await.unwrap();
            }
        })
    };
    // Every put creates a new key and advances the revision by one, so a
    // consistent page at revision R holds exactly R - base keys.
    let mut reads = 0;
    loop {
        let (kvs, more, revision) = c.range(b"a/", b"", 0, Consistency::Serializable).await.unwrap();
        assert!(!more);
        assert_eq!(kvs.len() as u64, revision - base, "range at revision {revision}");
        let (kv, revision) = c.get(b"a/0000", Consistency::Serializable).await.unwrap();
        assert_eq!(kv.is_some(), revision > base);
        reads += 1;
        if revision - base == writes {
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    assert!(reads > 0);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_lagging_by_large_entries_catches_up_through_bounded_calls() {
    // Half-MiB entries and at most about 2 MiB per AppendEntries call: the
    // follower catches up through many bounded calls (that a call over the
    // budget is cut is unit-tested in the network module). The timeouts are
    // generous so that a loaded machine cannot fail the bounded calls.
    let config = ConsensusConfig {
        heartbeat_ms: 1_000,
        election_timeout_min_ms: 5_000,
        election_timeout_max_ms: 10_000,
        max_batch_bytes: 1024 * 1024,
        max_append_bytes: 2 * 1024 * 1024 + 64 * 1024,
        max_append_entries: 64,
        ..ConsensusConfig::default()
    };
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), 3, config.clone()).await;
    let leader_id = nodes[0].consensus.leader().unwrap().0;
    let lagging = nodes.iter().position(|n| n.id() != leader_id).unwrap();
    let stopped = nodes.remove(lagging).stop().await;
    let leader = nodes.iter().find(|n| n.id() == leader_id).unwrap().consensus.clone();
    let value = vec![7u8; 512 * 1024];
    for i in 0..20 {
        leader.propose(put(format!("big/{i:02}"), value.clone())).await.unwrap();
    }
    let target = leader.status().commit_index;
    let back = LocalNode::restart(stopped, config).await.unwrap();
    back.consensus
        .raft()
        .wait(Some(4 * DEADLINE))
        .applied_index_at_least(Some(target), "the lagging follower catches up")
        .await
        .unwrap();
    let (kv, _) = back.consensus.get(b"big/19", Consistency::Serializable).await.unwrap();
    assert_eq!(kv.map(|kv| kv.value.len()), Some(value.len()));
    back.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

/// A transport that records every address it dials and cuts the ones it is
/// told to, like a partition.
#[derive(Debug)]
struct Faulty {
    tcp: TcpTransport,
    dialled: Mutex<BTreeSet<String>>,
    cut: BTreeSet<String>,
}

impl Transport for Faulty {
    fn connect(&self, addr: &str) -> Result<tonic::transport::Channel, ConsensusError> {
        self.dialled.lock().unwrap().insert(addr.to_string());
        if self.cut.contains(addr) {
            // Port 1 on loopback refuses every connection.
            return self.tcp.connect("127.0.0.1:1");
        }
        self.tcp.connect(addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_connection_to_another_node_goes_through_the_transport() {
    let config = || ConsensusConfig {
        request_timeout_ms: 2_000,
        ..config()
    };
    let root = tempfile::tempdir().unwrap();
    let second = LocalNode::start(2, root.path().join("n2"), None, config())
        .await
        .unwrap();
    let third = LocalNode::start(3, root.path().join("n3"), None, config())
        .await
        .unwrap();
    let transport = Arc::new(Faulty {
        tcp: TcpTransport {
            connect_timeout: Duration::from_secs(2),
            source: None,
        },
        dialled: Mutex::new(BTreeSet::new()),
        cut: BTreeSet::from([third.addr.to_string()]),
    });
    let first = LocalNode::start_with_transport(1, root.path().join("n1"), None, config(), transport.clone())
        .await
        .unwrap();
    first.consensus.initialize().await.unwrap();
    first.consensus.join(2, second.consensus.info().clone()).await.unwrap();
    first.consensus.propose(put("through", "the transport")).await.unwrap();
    assert_eq!(
        value(&second.consensus, "through", Consistency::Linearizable).await,
        Some(b"the transport".to_vec())
    );
    // Node 3 is cut off from node 1's transport: the join handshake fails.
    let err = first
        .consensus
        .join(3, third.consensus.info().clone())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConsensusError::Unavailable {
                cause: UnavailableCause::NodeUnreachable,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(voters(&first.consensus), BTreeSet::from([1, 2]));
    let dialled = transport.dialled.lock().unwrap().clone();
    assert!(dialled.contains(&second.addr.to_string()), "{dialled:?}");
    assert!(dialled.contains(&third.addr.to_string()), "{dialled:?}");
    for n in [first, second, third] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_on_the_in_memory_engine_serves_writes_and_reads() {
    // The simulator's path: the same member over MemEngine instead of RocksDB.
    let info = cell0_consensus::NodeInfo {
        name: "mem".into(),
        site: "local".into(),
        public_addr: "127.0.0.1:1".into(),
        internal_addr: "127.0.0.1:1".into(),
    };
    let snapshots = tempfile::tempdir().unwrap();
    let backend = cell0_consensus::StorageBackend::Memory {
        snapshot_dir: snapshots.path().to_path_buf(),
    };
    let c = Consensus::start(1, info, config(), backend).await.unwrap();
    c.initialize().await.unwrap();
    c.propose(put("m", "1")).await.unwrap();
    assert_eq!(value(&c, "m", Consistency::Linearizable).await, Some(b"1".to_vec()));
    assert_ne!(c.cluster_id(), 0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_shutdown_are_refused_as_never_applied() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 1, config()).await;
    let c = nodes[0].consensus.clone();
    c.propose(put("before", "1")).await.unwrap();
    c.shutdown().await;
    // The group-commit task was stopped and joined: a later write is not
    // queued forever, and it is refused as provably not applied.
    let err = tokio::time::timeout(DEADLINE, c.propose(put("after", "1")))
        .await
        .expect("a write after shutdown is answered")
        .unwrap_err();
    assert!(matches!(err, ConsensusError::ShuttingDown), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesced_linearizable_reads_see_every_acknowledged_write_across_a_leader_change() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), 3, config()).await;
    let leader = nodes[0].consensus.wait_for_leader(DEADLINE).await.unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Four concurrent readers per node, so reads of one node share rounds.
    let mut readers = Vec::new();
    for node in &nodes {
        for _ in 0..4 {
            let (c, acked, done) = (node.consensus.clone(), acked.clone(), done.clone());
            readers.push(tokio::spawn(async move {
                let (mut served, mut last) = (0u64, 0u64);
                while !done.load(SeqCst) {
                    let floor = acked.load(SeqCst);
                    match c.get(b"counter", Consistency::Linearizable).await {
                        Ok((kv, _)) => {
                            let v: u64 = kv.map_or(0, |kv| String::from_utf8(kv.value).unwrap().parse().unwrap());
                            assert!(v >= floor, "read {v} after write {floor} was acknowledged");
                            assert!(v >= last, "read {v} after reading {last}");
                            (served, last) = (served + 1, v);
                        }
                        // Retryable while the leadership moves.
                        Err(ConsensusError::Unavailable { .. }) => {}
                        // The old leader was stopped.
                        Err(ConsensusError::ShuttingDown) => break,
                        Err(e) => panic!("read failed: {e:?}"),
                    }
                }
                served
            }));
        }
    }
    // Writes go through a node that outlives the old leader.
    let writer = nodes
        .iter()
        .find(|n| n.consensus.id() != leader)
        .unwrap()
        .consensus
        .clone();
    let mut acknowledged = 0;
    for i in 1..=150u64 {
        if i == 50 {
            let at = nodes.iter().position(|n| n.consensus.id() == leader).unwrap();
            nodes.remove(at).stop().await;
            wait_until("another node leads", || {
                writer.leader().is_some_and(|(id, _)| id != leader)
            })
            .await;
        }
        // A write whose outcome is unknown is not counted as acknowledged.
        if writer.propose(put("counter", i.to_string())).await.is_ok() {
            acked.store(i, SeqCst);
            acknowledged += 1;
        }
    }
    done.store(true, SeqCst);
    let mut served = 0;
    for r in readers {
        served += r.await.unwrap();
    }
    assert!(acknowledged >= 140, "only {acknowledged} writes acknowledged");
    assert!(served > 0);
    for n in nodes {
        n.stop().await;
    }
}

/// A leader whose followers are all gone: with leader leases, its
/// linearizable reads go on from its lease and stop once the lease runs
/// out (half the election timeout's upper bound after the last AppendEntries
/// a quorum acknowledged); without them they stop at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_its_followers_reads_only_while_its_lease_holds() {
    for lease_reads in [true, false] {
        // A read lease of 10 s: far longer than stopping two nodes takes.
        let config = ConsensusConfig {
            heartbeat_ms: 100,
            election_timeout_min_ms: 10_000,
            election_timeout_max_ms: 20_000,
            request_timeout_ms: 2_000,
            lease_reads,
            ..Default::default()
        };
        let root = tempfile::tempdir().unwrap();
        let mut nodes = cluster(root.path(), 3, config).await;
        let leader = nodes[0].consensus.wait_for_leader(DEADLINE).await.unwrap();
        let at = nodes.iter().position(|n| n.consensus.id() == leader).unwrap();
        let leader = nodes.remove(at);
        leader.consensus.propose(put("k", "v")).await.unwrap();
        assert_eq!(
            value(&leader.consensus, "k", Consistency::Linearizable).await,
            Some(b"v".to_vec())
        );
        for n in nodes {
            n.stop().await;
        }
        let first = leader.consensus.get(b"k", Consistency::Linearizable).await;
        if lease_reads {
            assert_eq!(
                first.unwrap().0.map(|kv| kv.value),
                Some(b"v".to_vec()),
                "read under lease"
            );
            // The lease runs out: reads need a quorum again and fail.
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                match leader.consensus.get(b"k", Consistency::Linearizable).await {
                    Ok(_) => {}
                    Err(ConsensusError::Unavailable { .. }) => break,
                    Err(e) => panic!("read failed: {e:?}"),
                }
                assert!(tokio::time::Instant::now() < deadline, "reads went on past the lease");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            assert!(matches!(first, Err(ConsensusError::Unavailable { .. })), "{first:?}");
        }
        // Serializable reads need no leadership at all.
        assert_eq!(
            value(&leader.consensus, "k", Consistency::Serializable).await,
            Some(b"v".to_vec())
        );
        leader.stop().await;
    }
}
