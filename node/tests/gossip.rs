//! Discovery through gossip with real processes: `--bootstrap-expect` forms
//! one cluster, `cell0 members` shows what gossip heard, a node with another
//! cluster secret stays out, and a killed node is seen dead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

/// `cell0 keygen`, checked for shape.
fn keygen() -> String {
    let out = cli(&["keygen"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = stdout(&out).trim().to_string();
    assert_eq!(secret.len(), 64, "{secret}");
    assert!(secret.chars().all(|c| c.is_ascii_hexdigit()), "{secret}");
    secret
}

/// Gossip flags of a node that contacts `join` and waits for `expect` nodes.
fn gossip_flags(ports: Ports, join: Ports, expect: usize) -> Vec<String> {
    vec![
        "--listen-gossip".into(),
        ports.addr(ports.gossip),
        "--gossip-join".into(),
        join.addr(join.gossip),
        "--bootstrap-expect".into(),
        expect.to_string(),
    ]
}

/// Starts node `i` of `ports` with gossip and `--bootstrap-expect expect`:
/// node 1 contacts node 2's gossip port, every other node node 1's.
fn start_member(root: &Path, ports: &[Ports], i: usize, expect: usize, secret: &str, extra: &[String]) -> Node {
    let join = if i == 0 { ports[1] } else { ports[0] };
    let mut flags = gossip_flags(ports[i], join, expect);
    flags.extend_from_slice(extra);
    Node::start_flags(
        &format!("node{}", i + 1),
        &root.join(format!("node{}", i + 1)),
        ports[i],
        flags,
        &[("CELL0_GOSSIP_SECRET", secret)],
    )
}

/// The Raft members (id, voter) the node at `endpoint` lists.
async fn raft_members(endpoint: &str) -> BTreeSet<(u64, bool)> {
    members(endpoint)
        .await
        .into_iter()
        .filter(|m| !m.gossip_only)
        .map(|m| (m.id, m.voter))
        .collect()
}

/// The gossip state the node at `endpoint` shows for node `id` ("" if none).
async fn gossip_state(endpoint: &str, id: u64) -> String {
    members(endpoint)
        .await
        .into_iter()
        .find(|m| m.id == id)
        .and_then(|m| m.gossip)
        .map(|g| g.state)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_expect_forms_one_cluster_that_gossip_watches() {
    let root = tempfile::tempdir().unwrap();
    let secret = keygen();
    let ports: Vec<Ports> = (0..3).map(|_| Ports::new()).collect();
    // All three at once.
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| start_member(root.path(), &ports, i, 3, &secret, &[]))
        .collect();
    for n in nodes.iter_mut() {
        n.wait_ready();
    }
    let ids: Vec<u64> = {
        let mut ids = Vec::new();
        for n in &nodes {
            ids.push(status(&n.endpoint()).await.node_id);
        }
        ids
    };
    // One cluster of three voters, the same on every node.
    let expected: BTreeSet<(u64, bool)> = ids.iter().map(|id| (*id, true)).collect();
    for n in &nodes {
        let endpoint = n.endpoint();
        wait_until("every node lists the same three voters", async || {
            raft_members(&endpoint).await == expected
        })
        .await;
    }
    // Exactly one node bootstrapped: the one with the lowest id.
    let lowest = *ids.iter().min().unwrap();
    let bootstrapped: Vec<&Node> = nodes.iter().filter(|n| n.log().contains("forms the cluster")).collect();
    assert_eq!(bootstrapped.len(), 1, "more than one node bootstrapped");
    assert_eq!(
        ids[nodes
            .iter()
            .position(|n| n.log().contains("forms the cluster"))
            .unwrap()],
        lowest
    );

    // Every node hears the others alive, with their version and gossip port.
    for n in &nodes {
        let endpoint = n.endpoint();
        for (i, id) in ids.iter().enumerate() {
            if status(&endpoint).await.node_id == *id {
                continue;
            }
            wait_until("gossip hears every other node alive", async || {
                gossip_state(&endpoint, *id).await == "alive"
            })
            .await;
            let m = members(&endpoint).await.into_iter().find(|m| m.id == *id).unwrap();
            let g = m.gossip.unwrap();
            assert_eq!(g.gossip_addr, ports[i].addr(ports[i].gossip));
            assert!(!g.version.is_empty());
        }
    }
    // The CLI shows the gossip columns.
    let out = cli(&["members", "--endpoint", &nodes[0].endpoint()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("GOSSIP") && text.contains("LAST HEARD") && text.contains("alive"),
        "{text}"
    );

    // A node with another secret, pointed at node 1, stays out of every list.
    let foreign_ports = Ports::new();
    let mut foreign = Node::start_flags(
        "foreign",
        &root.path().join("foreign"),
        foreign_ports,
        gossip_flags(foreign_ports, ports[0], 1),
        &[("CELL0_GOSSIP_SECRET", &keygen())],
    );
    foreign.wait_ready();
    let foreign_id = status(&foreign.endpoint()).await.node_id;
    wait_until("the foreign node's log says why it cannot connect", async || {
        foreign.log().contains("another cluster secret")
    })
    .await;

    // Kill node 3: the others see it dead; the foreign node was never heard.
    nodes[2].kill9();
    for n in &nodes[..2] {
        let endpoint = n.endpoint();
        wait_until("the killed node is seen dead", async || {
            gossip_state(&endpoint, ids[2]).await == "dead"
        })
        .await;
        assert!(
            !members(&endpoint).await.iter().any(|m| m.id == foreign_id),
            "the foreign node was listed"
        );
    }
    let foreign_view: Vec<u64> = members(&foreign.endpoint()).await.iter().map(|m| m.id).collect();
    assert_eq!(foreign_view, vec![foreign_id], "the foreign node heard the cluster");

    // Restarted, it is heard alive again and still a member (no new cluster).
    let log_before = nodes[2].log().len();
    nodes[2].restart_env(&[("CELL0_GOSSIP_SECRET", &secret)]);
    nodes[2].wait_ready();
    let endpoint = nodes[0].endpoint();
    wait_until("the restarted node is heard alive", async || {
        gossip_state(&endpoint, ids[2]).await == "alive"
    })
    .await;
    assert_eq!(raft_members(&endpoint).await, expected);
    let log_after = nodes[2].log();
    assert!(
        !log_after[log_before..].contains("forms the cluster"),
        "a member bootstrapped again"
    );
    assert!(log_after[log_before..].contains("rejoining the cluster from the data dir"));
    foreign.sigterm();
    for n in nodes.iter_mut() {
        n.sigterm();
    }
}

#[test]
fn gossip_without_the_cluster_secret_is_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let out = std::process::Command::new(bin())
        .args([
            "run",
            "--data-dir",
            root.path().join("n").to_str().unwrap(),
            "--listen-public",
            &ports.endpoint(),
            "--listen-internal",
            &ports.addr(ports.internal),
            "--listen-http",
            &ports.addr(ports.http),
            "--listen-gossip",
            &ports.addr(ports.gossip),
        ])
        .env_remove("CELL0_GOSSIP_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("gossip.secret") && err.contains("cell0 keygen"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autopilot_replaces_a_dead_voter_with_a_healthy_learner() {
    let root = tempfile::tempdir().unwrap();
    let secret = keygen();
    let config = root.path().join("cell0.toml");
    std::fs::write(&config, "[autopilot]\ndead_voter_cleanup_ms = 2000\n").unwrap();
    let ports: Vec<Ports> = (0..4).map(|_| Ports::new()).collect();
    let extra = ["--config".to_string(), config.to_str().unwrap().to_string()];
    let start = |i: usize| start_member(root.path(), &ports, i, 3, &secret, &extra);
    let mut nodes: Vec<Node> = (0..3).map(start).collect();
    for n in nodes.iter_mut() {
        n.wait_ready();
    }
    // A fourth node joins the formed cluster as a learner (three voters
    // already).
    nodes.push(start(3));
    nodes[3].wait_ready();
    let mut ids = Vec::new();
    for n in &nodes {
        ids.push(status(&n.endpoint()).await.node_id);
    }
    let endpoint = nodes[0].endpoint();
    wait_until("three voters and one learner", async || {
        let m = raft_members(&endpoint).await;
        m.len() == 4 && m.iter().filter(|(_, voter)| *voter).count() == 3 && m.contains(&(ids[3], false))
    })
    .await;

    // Kill voter 3: autopilot removes it once gossip has seen it dead for
    // two seconds, and promotes the learner.
    nodes[2].kill9();
    let expected: BTreeSet<(u64, bool)> = [ids[0], ids[1], ids[3]].iter().map(|id| (*id, true)).collect();
    for n in [&nodes[0], &nodes[1], &nodes[3]] {
        let endpoint = n.endpoint();
        wait_until("the dead voter is replaced by the learner", async || {
            raft_members(&endpoint).await == expected
        })
        .await;
    }
    let removed_by = [&nodes[0], &nodes[1], &nodes[3]]
        .iter()
        .filter(|n| n.log().contains("autopilot: removing a voter gossip has seen dead"))
        .count();
    assert!(removed_by >= 1, "no node logged the removal");
    // The cluster still takes writes, through the promoted node too.
    put(&nodes[3].endpoint(), "after-autopilot", "yes").await.unwrap();
    assert_eq!(
        get(&nodes[0].endpoint(), "after-autopilot", false).await,
        Some(b"yes".to_vec())
    );
    for i in [0, 1, 3] {
        nodes[i].sigterm();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staggered_starts_and_a_restart_mid_formation_form_one_cluster() {
    let root = tempfile::tempdir().unwrap();
    let secret = keygen();
    let ports: Vec<Ports> = (0..3).map(|_| Ports::new()).collect();
    let start = |i: usize| start_member(root.path(), &ports, i, 3, &secret, &[]);
    // Two nodes wait for a third; one of them is killed and restarted before
    // the third arrives.
    let mut first = start(0);
    let mut second = start(1);
    for n in [&first, &second] {
        wait_until("both waiting nodes hear each other", async || {
            n.log().contains("seen=2")
        })
        .await;
    }
    assert!(
        !first.is_ready() && !second.is_ready(),
        "ready before the cluster formed"
    );
    second.kill9();
    second.restart_env(&[("CELL0_GOSSIP_SECRET", &secret)]);
    let mut third = start(2);
    for n in [&mut first, &mut second, &mut third] {
        n.wait_ready();
    }
    let mut ids = Vec::new();
    for n in [&first, &second, &third] {
        ids.push(status(&n.endpoint()).await.node_id);
    }
    let expected: BTreeSet<(u64, bool)> = ids.iter().map(|id| (*id, true)).collect();
    for n in [&first, &second, &third] {
        let endpoint = n.endpoint();
        wait_until("one cluster of three voters", async || {
            raft_members(&endpoint).await == expected
        })
        .await;
    }
    let formed = [&first, &second, &third]
        .iter()
        .filter(|n| n.log().contains("forms the cluster"))
        .count();
    assert_eq!(formed, 1);
    for n in [&mut first, &mut second, &mut third] {
        n.sigterm();
    }
}
