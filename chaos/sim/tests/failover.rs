//! Failover when the survivors' logs differ (issue #24, docs/benchmarks.md
//! "Failover"): the leader dies right after an entry reached one follower
//! but not the other, and the follower that lags times out first. With
//! prompt elections (`cell0_consensus`'s `elections` module) the follower
//! with the longer log stands as soon as it refuses the lagging one, and
//! again one term up when it loses that term on node id; openraft alone
//! makes it wait for its own timer and then an election timeout more.
//!
//! Times are simulated (tokio's paused clock), so the bounds do not depend
//! on the machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cell0_consensus::{Command, Role};
use cell0_sim::cluster::SimCluster;
use cell0_sim::net::{NetParams, SimNet};
use tokio::time::Instant;

/// Member 1 leads; member 2 (the longer log) times out late, member 3 (the
/// lagging one, and the higher id, so member 2 loses a tie of terms) first.
/// Member 2's leader lease (401 ms) runs out before member 3 stands (601
/// ms after its last heartbeat), so member 2 votes by log alone.
const TIMEOUTS_MS: [u64; 3] = [500, 400, 300];

/// openraft alone elects member 2 here only after its own timer (801 ms
/// after its last heartbeat, checked every 150 ms) and one more election
/// timeout (400 ms) to get past the term that member 3 holds: 1.2 to 1.5
/// s. With prompt elections it is member 3's timer (601 to 751 ms) plus
/// two settle times of 50 ms and a few round trips.
const ELECTED_WITHIN: Duration = Duration::from_millis(1_000);

async fn scenario() {
    let net = SimNet::new(
        24,
        NetParams {
            reset_per_chunk: 0.0,
            ..NetParams::default()
        },
    );
    let mut cluster = SimCluster::start_with_timeouts(net.clone(), &TIMEOUTS_MS)
        .await
        .unwrap();
    let leader = cluster.consensus(1).unwrap().clone();
    assert_eq!(leader.status().role, Role::Leader);
    let term = leader.status().term;
    // Every member holds the log so far.
    let put = |k: &str| Command::Put {
        key: k.as_bytes().to_vec(),
        value: vec![7; 64],
    };
    leader.propose(put("before")).await.unwrap();
    let end = leader.status().last_log_index;
    for id in [2, 3] {
        let c = cluster.consensus(id).unwrap();
        c.raft()
            .wait(Some(Duration::from_secs(5)))
            .metrics(|m| m.last_log_index >= Some(end), "caught up")
            .await
            .unwrap();
    }

    // Member 3 stops hearing from the leader; one more entry commits on 1
    // and 2; then the leader dies.
    net.cut(1, 3);
    leader.propose(put("lagging")).await.unwrap();
    let longer = leader.status().last_log_index;
    cluster
        .consensus(2)
        .unwrap()
        .raft()
        .wait(Some(Duration::from_secs(5)))
        .metrics(|m| m.last_log_index >= Some(longer), "member 2 has the entry")
        .await
        .unwrap();
    assert!(cluster.consensus(3).unwrap().status().last_log_index < longer);
    let killed = Instant::now();
    cluster.crash(1).await;
    net.heal_all();

    // Member 2 (the only one that can win: member 3's log is shorter) leads.
    let survivor = cluster.consensus(2).unwrap().clone();
    survivor
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader == Some(2), "member 2 leads")
        .await
        .unwrap();
    let elected = killed.elapsed();
    let status = survivor.status();
    eprintln!("member 2 leads {elected:?} after the kill, at term {}", status.term);
    assert!(
        elected < ELECTED_WITHIN,
        "member 2 led only {elected:?} after the leader died (simulated time)"
    );
    // Two elections at most: member 2 at member 3's term (lost on node id),
    // then one term up.
    assert!(status.term <= term + 2, "terms {term} -> {}", status.term);

    // The cluster works, and stays calm: no more elections while the leader
    // lives (the watchdog and the triggers need a lapsed leader lease).
    survivor.propose(put("after")).await.unwrap();
    let term = survivor.status().term;
    let calm = Instant::now() + Duration::from_secs(5);
    let other = cluster.consensus(3).unwrap().clone();
    let moved = other
        .raft()
        .wait(Some(calm - Instant::now()))
        .metrics(|m| m.current_term != term, "a new term")
        .await;
    assert!(moved.is_err(), "the term moved on from {term} with a leader alive");
    assert_eq!(survivor.status().role, Role::Leader);
    cluster.stop().await;
}

#[test]
fn the_longer_log_leads_soon_after_the_leader_dies() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(scenario());
}
