//! Crash and restart (issue #24): a member crashed and started again on
//! what the crash left of its storage recovers its vote, log, state machine
//! and membership, catches up with the writes it missed, and the cluster
//! agrees; a leader restarted before anyone else stood leads again only
//! through an election (no stale read index, no reused log id); and the
//! nemesis's own crashes and restarts pass the checkers.
//!
//! Times are simulated (tokio's paused clock).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use cell0_consensus::{Command, Consensus, Consistency, KeyValue, NodeId, NodeInfo, Role};
use cell0_sim::cluster::{Crash, SimCluster};
use cell0_sim::nemesis::FaultMix;
use cell0_sim::net::{NetParams, SimNet};
use cell0_sim::{SimConfig, run_seed};

fn simulated(test: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(test);
}

fn quiet_net() -> SimNet {
    SimNet::new(
        5,
        NetParams {
            reset_per_chunk: 0.0,
            ..NetParams::default()
        },
    )
}

fn put(key: &str, value: &str) -> Command {
    Command::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

/// Every pair of member `c`'s replica.
async fn replica(c: &Consensus) -> Vec<KeyValue> {
    let (kvs, more, _) = c.range(b"", b"", 10_000, Consistency::Serializable).await.unwrap();
    assert!(!more);
    kvs
}

/// Member `c`'s membership: each member's id, addresses and whether it
/// votes (not who leads, which a restart changes).
fn membership(c: &Consensus) -> Vec<(NodeId, NodeInfo, bool)> {
    c.members().into_iter().map(|m| (m.id, m.info, m.voter)).collect()
}

/// Waits until member `c`'s Raft published what it loaded from storage (its
/// metrics start empty, until its core task first runs).
async fn loaded(c: &Consensus) {
    c.raft()
        .wait(Some(Duration::from_secs(1)))
        .metrics(|m| m.membership_config.membership().nodes().next().is_some(), "loaded")
        .await
        .unwrap();
}

/// Waits until some member that is up leads, and returns it.
async fn leader(cluster: &SimCluster) -> NodeId {
    for _ in 0..200 {
        if let Some(l) = cluster.leader() {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader within 10 s");
}

/// Three members on `net`, with election timeouts of 300, 350 and 400 ms.
async fn three_members(net: SimNet) -> SimCluster {
    SimCluster::start_with_timeouts(net, &[300, 350, 400]).await.unwrap()
}

/// The member that leads, once one does, and its handle.
async fn leading(cluster: &SimCluster) -> (NodeId, Consensus) {
    let id = leader(cluster).await;
    (id, cluster.consensus(id).unwrap().clone())
}

/// Waits until every member that is up applied the leader's last entry, then
/// checks that their replicas are the same; returns the leader's.
async fn agree(cluster: &SimCluster) -> Vec<KeyValue> {
    let lead = cluster.consensus(leader(cluster).await).unwrap().clone();
    let target = lead.status().last_log_index;
    let reference = replica(&lead).await;
    for id in cluster.up() {
        let c = cluster.consensus(id).unwrap();
        c.raft()
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(target), "caught up")
            .await
            .unwrap();
        assert_eq!(replica(c).await, reference, "n{id} differs from the leader");
        assert_eq!(c.status().revision, lead.status().revision, "n{id}'s revision");
    }
    reference
}

#[test]
fn a_lone_member_restarted_on_its_storage_recovers_all_of_it() {
    simulated(async {
        let mut cluster = SimCluster::start_with_timeouts(quiet_net(), &[300]).await.unwrap();
        let mut c = cluster.consensus(1).unwrap().clone();
        for i in 0..20 {
            c.propose(put(&format!("k{i}"), "v")).await.unwrap();
        }
        for crash in [Crash::Process, Crash::PowerLoss] {
            let before = c.status();
            let members = membership(&c);
            let cluster_id = c.cluster_id();
            let state = replica(&c).await;
            assert_eq!(state.len(), 20);
            cluster.crash_as(1, crash).await;
            assert_eq!(c.status().role, Role::Shutdown);
            assert!(cluster.up().is_empty());
            cluster.restart(1).await.unwrap();
            let again = cluster.consensus(1).unwrap().clone();
            loaded(&again).await;
            // Straight from storage, before it leads again: the vote (term),
            // the log (every entry was synced when it was acknowledged), the
            // membership and the cluster id.
            let status = again.status();
            assert_eq!(status.term, before.term, "{crash:?}");
            assert_eq!(status.last_log_index, before.last_log_index, "{crash:?}");
            assert_eq!(membership(&again), members, "{crash:?}");
            assert_ne!(
                status.role,
                Role::Leader,
                "{crash:?}: it leads again without an election"
            );
            assert_eq!(again.cluster_id(), cluster_id, "{crash:?}");
            // The state machine, with its revision: as stored, or re-applied
            // from the log once the member leads (a power loss may have
            // taken applies that were not synced).
            again.wait_for_leader(Duration::from_secs(5)).await.unwrap();
            again
                .raft()
                .wait(Some(Duration::from_secs(5)))
                .applied_index_at_least(Some(before.applied_index), "re-applied")
                .await
                .unwrap();
            assert_eq!(replica(&again).await, state, "{crash:?}");
            assert_eq!(again.revision().unwrap(), before.revision, "{crash:?}");
            assert_eq!(again.status().revision, before.revision, "{crash:?}");
            assert!(
                again.status().term > before.term,
                "{crash:?}: it leads through an election"
            );
            c = again;
        }
        cluster.stop().await;
    });
}

#[test]
fn a_crashed_member_restarts_on_its_storage_catches_up_and_the_cluster_agrees() {
    simulated(async {
        let mut cluster = three_members(quiet_net()).await;
        let first = cluster.consensus(1).unwrap().clone();
        for i in 0..10 {
            first.propose(put(&format!("a{i}"), "1")).await.unwrap();
        }
        agree(&cluster).await;

        // Member 3 loses power; the old incarnation lets go of its engine
        // (every task of it is gone) and the cluster moves on without it.
        let old_disk = Arc::downgrade(&cluster.engine(3).unwrap());
        let old = cluster.consensus(3).unwrap().clone();
        let term = old.status().term;
        cluster.crash(3).await;
        assert_eq!(cluster.up(), vec![1, 2]);
        assert_eq!(old.status().role, Role::Shutdown);
        drop(old);
        assert!(
            old_disk.upgrade().is_none(),
            "the crashed member still holds its engine"
        );
        for i in 0..10 {
            first.propose(put(&format!("b{i}"), "2")).await.unwrap();
        }

        cluster.restart(3).await.unwrap();
        assert_eq!(cluster.up(), vec![1, 2, 3]);
        let third = cluster.consensus(3).unwrap().clone();
        loaded(&third).await;
        assert_eq!(third.members().iter().filter(|m| m.voter).count(), 3);
        assert!(third.status().term >= term, "the vote survived");
        let state = agree(&cluster).await;
        assert_eq!(state.len(), 20);
        // It takes part: a write through it (forwarded to the leader).
        third.propose(put("c", "3")).await.unwrap();
        agree(&cluster).await;

        // The leader's process dies with unsynced writes kept; a new leader
        // is elected among the others, the restarted member 3 included.
        cluster.crash_as(1, Crash::Process).await;
        let new_leader = leader(&cluster).await;
        assert_ne!(new_leader, 1);
        let lead = cluster.consensus(new_leader).unwrap().clone();
        lead.propose(put("d", "4")).await.unwrap();
        cluster.restart(1).await.unwrap();
        cluster.consensus(1).unwrap().propose(put("e", "5")).await.unwrap();
        let state = agree(&cluster).await;
        assert_eq!(state.len(), 23);
        cluster.stop().await;
    });
}

/// The value of `key`, read linearizably through member `c`.
async fn read_linearizable(c: &Consensus, key: &str) -> Option<Vec<u8>> {
    let (kv, _) = c.get(key.as_bytes(), Consistency::Linearizable).await.unwrap();
    kv.map(|kv| kv.value)
}

/// A leader sends its new entries to the followers while its own write of
/// them syncs, and counts its own copy only once that sync returned: with a
/// leader whose syncs take a second, a write is acknowledged on the
/// followers' copies long before, and it survives the leader losing power
/// right after (its own copy with it).
#[test]
fn a_write_commits_on_the_followers_while_the_leaders_sync_runs() {
    simulated(async {
        let mut cluster = three_members(quiet_net()).await;
        let (lead_id, lead) = leading(&cluster).await;
        let slow = Duration::from_secs(1);
        cluster.engine(lead_id).unwrap().set_sync_latency(slow);
        let started = tokio::time::Instant::now();
        lead.propose(put("k", "v")).await.unwrap();
        let took = started.elapsed();
        assert!(took < slow, "the write waited for the leader's own sync: {took:?}");

        cluster.crash_as(lead_id, Crash::PowerLoss).await;
        let next = leader(&cluster).await;
        assert_ne!(next, lead_id);
        let next = cluster.consensus(next).unwrap().clone();
        assert_eq!(read_linearizable(&next, "k").await, Some(b"v".to_vec()));
        cluster.restart(lead_id).await.unwrap();
        let state = agree(&cluster).await;
        assert!(state.iter().any(|kv| kv.key == b"k" && kv.value == b"v"));
        cluster.stop().await;
    });
}

/// A leader that crashes and comes back before anyone else stood does not
/// lead again from its stored vote: it would know only the commit index it
/// stored, which lags the writes it acknowledged, and answer read indexes
/// that miss them. Here a write commits on the leader and one follower while
/// the other is cut off; the leader's process dies (its unlogged applies with
/// it) and restarts at once, while the follower that holds the write is cut
/// off and the other one's syncs are slow (so the write is not known to be
/// committed again soon); a linearizable read through the follower that
/// missed the write must see it. With openraft's leader restore this read
/// returns the value from before the write.
#[test]
fn a_leader_restarted_at_once_serves_no_read_that_misses_its_acknowledged_write() {
    simulated(async {
        let net = quiet_net();
        let mut cluster = three_members(net.clone()).await;
        let (lead_id, lead) = leading(&cluster).await;
        lead.propose(put("k", "old")).await.unwrap();
        agree(&cluster).await;
        let followers: Vec<NodeId> = cluster.ids().into_iter().filter(|&i| i != lead_id).collect();
        let (holder, missed) = (followers[0], followers[1]);

        net.cut(lead_id, missed);
        lead.propose(put("k", "new")).await.unwrap();
        let term = lead.status().term;
        cluster.crash_as(lead_id, Crash::Process).await;
        net.heal_all();
        net.cut(holder, lead_id);
        net.cut(holder, missed);
        cluster
            .engine(missed)
            .unwrap()
            .set_sync_latency(Duration::from_millis(500));
        cluster.restart(lead_id).await.unwrap();
        let again = cluster.consensus(lead_id).unwrap().clone();
        loaded(&again).await;
        assert_ne!(again.status().role, Role::Leader, "it leads again without an election");

        let reader = cluster.consensus(missed).unwrap().clone();
        assert_eq!(read_linearizable(&reader, "k").await, Some(b"new".to_vec()));
        assert!(reader.status().term > term, "the read was served in a later term");
        net.heal_all();
        cluster.engine(missed).unwrap().set_sync_latency(Duration::ZERO);
        agree(&cluster).await;
        cluster.stop().await;
    });
}

/// A leader whose own copy of a write was not yet synced when it lost power
/// (the write committed on the followers' copies) and that comes back
/// before anyone else stood must not lead again from its stored vote: its
/// log lacks that write, and as the leader of the same term it would
/// propose its next entry under the lost one's log id, which the followers
/// take for the entry they hold. Through an election it loses to a follower
/// with the longer log, and every replica keeps the write.
#[test]
fn a_leader_that_lost_its_unsynced_tail_does_not_reuse_its_log_ids() {
    simulated(async {
        let mut cluster = three_members(quiet_net()).await;
        let (lead_id, lead) = leading(&cluster).await;
        cluster
            .engine(lead_id)
            .unwrap()
            .set_sync_latency(Duration::from_secs(1));
        lead.propose(put("k", "v")).await.unwrap();
        let last = lead.status().last_log_index;

        cluster.crash_as(lead_id, Crash::PowerLoss).await;
        cluster.engine(lead_id).unwrap().set_sync_latency(Duration::ZERO);
        cluster.restart(lead_id).await.unwrap();
        let again = cluster.consensus(lead_id).unwrap().clone();
        loaded(&again).await;
        assert!(
            again.status().last_log_index < last,
            "the power loss took the unsynced write"
        );
        again.propose(put("after", "x")).await.unwrap();

        let state = agree(&cluster).await;
        assert!(state.iter().any(|kv| kv.key == b"k" && kv.value == b"v"));
        assert!(state.iter().any(|kv| kv.key == b"after" && kv.value == b"x"));
        cluster.stop().await;
    });
}

/// A lone member is its own quorum: it acknowledges a write only once its
/// own sync returned, so the write survives its power loss.
#[test]
fn a_lone_member_acknowledges_a_write_only_once_it_is_synced() {
    simulated(async {
        let mut cluster = SimCluster::start_with_timeouts(quiet_net(), &[300]).await.unwrap();
        let c = cluster.consensus(1).unwrap().clone();
        let slow = Duration::from_secs(1);
        cluster.engine(1).unwrap().set_sync_latency(slow);
        let started = tokio::time::Instant::now();
        c.propose(put("k", "v")).await.unwrap();
        let took = started.elapsed();
        assert!(took >= slow, "acknowledged before its sync returned: {took:?}");

        cluster.crash_as(1, Crash::PowerLoss).await;
        cluster.restart(1).await.unwrap();
        let again = cluster.consensus(1).unwrap().clone();
        loaded(&again).await;
        again.wait_for_leader(Duration::from_secs(5)).await.unwrap();
        assert_eq!(read_linearizable(&again, "k").await, Some(b"v".to_vec()));
        cluster.stop().await;
    });
}

/// The nemesis's crashes and restarts alone (no other fault): every seed
/// passes the checkers, and the seeds do restart members.
#[test]
fn nemesis_crashes_and_restarts_pass_the_checkers() {
    let config = SimConfig {
        faults: FaultMix {
            crashes: true,
            ..FaultMix::NONE
        },
        ..SimConfig::default()
    };
    let mut restarts = 0;
    for seed in 0..4 {
        let outcome = run_seed(seed, &config).unwrap();
        assert!(outcome.passed(), "{outcome}");
        restarts += outcome
            .timeline
            .iter()
            .filter(|(_, e)| e.starts_with("restart"))
            .count();
    }
    assert!(restarts > 0, "no seed restarted a member");
}
