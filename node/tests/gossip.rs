//! Discovery through gossip with real processes: `--bootstrap-expect` forms
//! one cluster, `cell0 members` shows what gossip heard, a node with another
//! cluster secret stays out, and a killed node is seen dead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use cell0_chaos::lab::Lab;
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
        "--join".into(),
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
async fn five_nodes_expecting_three_form_one_cluster_and_autopilot_replaces_a_dead_voter() {
    let root = tempfile::tempdir().unwrap();
    let secret = keygen();
    let config = root.path().join("cell0.toml");
    std::fs::write(&config, "[autopilot]\ndead_voter_cleanup_ms = 2000\n").unwrap();
    let ports: Vec<Ports> = (0..5).map(|_| Ports::new()).collect();
    let extra = ["--config".to_string(), config.to_str().unwrap().to_string()];
    // Five nodes, all with --bootstrap-expect 3 and --join naming node 1
    // (node 1 names node 2), started in reverse order.
    let mut nodes: Vec<Node> = (0..5)
        .rev()
        .map(|i| start_member(root.path(), &ports, i, 3, &secret, &extra))
        .collect();
    nodes.reverse();
    for n in nodes.iter_mut() {
        n.wait_ready();
    }
    let mut ids = Vec::new();
    for n in &nodes {
        ids.push(status(&n.endpoint()).await.node_id);
    }
    // One cluster: three voters and two learners, the same on every node.
    for n in &nodes {
        let endpoint = n.endpoint();
        wait_until("three voters and two learners everywhere", async || {
            let m = raft_members(&endpoint).await;
            m.len() == 5 && m.iter().filter(|(_, voter)| *voter).count() == 3
        })
        .await;
    }
    let formed = nodes.iter().filter(|n| n.log().contains("forms the cluster")).count();
    assert_eq!(formed, 1, "more than one node bootstrapped");
    let before = raft_members(&nodes[0].endpoint()).await;

    // Kill -9 a voter that does not lead: autopilot removes it once gossip
    // has seen it dead for two seconds and promotes a learner.
    let leader = status(&nodes[0].endpoint()).await.leader_id;
    let victim = (0..5)
        .find(|i| ids[*i] != leader && before.contains(&(ids[*i], true)))
        .unwrap();
    nodes[victim].kill9();
    let survivors: Vec<usize> = (0..5).filter(|i| *i != victim).collect();
    for i in &survivors {
        let endpoint = nodes[*i].endpoint();
        wait_until("the dead voter is replaced by a learner", async || {
            let m = raft_members(&endpoint).await;
            m.len() == 4
                && m.iter().filter(|(_, voter)| *voter).count() == 3
                && !m.iter().any(|(id, _)| *id == ids[victim])
        })
        .await;
        wait_until("the killed node is seen and recorded dead", async || {
            members(&endpoint).await.iter().any(|m| {
                m.id == ids[victim]
                    && m.gossip.as_ref().is_some_and(|g| g.state == "dead")
                    && m.liveness.as_ref().is_some_and(|l| l.state == "dead")
            })
        })
        .await;
    }
    // Every survivor's Members agrees on the Raft membership.
    let agreed = raft_members(&nodes[survivors[0]].endpoint()).await;
    for i in &survivors {
        assert_eq!(raft_members(&nodes[*i].endpoint()).await, agreed);
    }
    let logged = survivors
        .iter()
        .filter(|i| {
            nodes[**i]
                .log()
                .contains("autopilot: removing a voter gossip has seen dead")
        })
        .count();
    assert!(logged >= 1, "no node logged the removal");
    // The cluster still takes writes.
    let last = nodes[survivors[3]].endpoint();
    put(&last, "after-autopilot", "yes").await.unwrap();
    assert_eq!(
        get(&nodes[survivors[0]].endpoint(), "after-autopilot", false).await,
        Some(b"yes".to_vec())
    );
    for i in survivors {
        nodes[i].sigterm();
    }
}

/// `cell0 members --output json` run in node `i`'s namespace against it.
fn members_in(lab: &Lab, i: usize) -> Vec<serde_json::Value> {
    let mut command = std::process::Command::new("ip");
    command.args(["netns", "exec", &lab.namespace(i), bin(), "members", "--output", "json"]);
    command.args(["--endpoint", &lab_ports(lab, i).endpoint()]);
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A field of the member with id `id` (16 hex digits) in `members`.
fn field<'a>(members: &'a [serde_json::Value], id: u64, name: &str) -> &'a str {
    members
        .iter()
        .find(|m| m["id"] == format!("{id:016x}"))
        .and_then(|m| m[name].as_str())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_minority_never_records_the_majority_dead() {
    let mut lab = match Lab::new(3) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let root = tempfile::tempdir().unwrap();
    let secret = keygen();
    let ports: Vec<Ports> = (0..3).map(|i| lab_ports(&lab, i)).collect();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            let join = if i == 0 { ports[1] } else { ports[0] };
            Node::start_wrapped(
                lab.wrapper(i),
                &format!("node{}", i + 1),
                &root.path().join(format!("node{}", i + 1)),
                ports[i],
                gossip_flags(ports[i], join, 3),
                &[("CELL0_GOSSIP_SECRET", &secret)],
            )
        })
        .collect();
    for n in nodes.iter_mut() {
        n.wait_ready();
    }
    let mut ids = Vec::new();
    for n in &nodes {
        ids.push(status(&n.endpoint()).await.node_id);
    }
    let leader = status(&nodes[0].endpoint()).await.leader_id;
    let cut = (0..3).find(|i| ids[*i] != leader).unwrap();
    let majority: Vec<usize> = (0..3).filter(|i| *i != cut).collect();
    for i in &majority {
        let endpoint = nodes[*i].endpoint();
        wait_until("gossip hears every node alive", async || {
            let m = members(&endpoint).await;
            ids.iter().all(|id| {
                m.iter()
                    .any(|m| m.id == *id && m.gossip.as_ref().is_some_and(|g| g.state == "alive"))
            })
        })
        .await;
    }

    lab.partition(&[vec![cut], majority.clone()]).unwrap();
    // The majority's leader records the cut node dead.
    for i in &majority {
        let endpoint = nodes[*i].endpoint();
        wait_until("the majority records the cut node dead", async || {
            members(&endpoint)
                .await
                .iter()
                .any(|m| m.id == ids[cut] && m.liveness.as_ref().is_some_and(|l| l.state == "dead"))
        })
        .await;
    }
    // The cut node hears the majority dead but records nothing: it has no
    // quorum to commit with.
    wait_until("the cut node's gossip sees the majority dead", async || {
        let m = members_in(&lab, cut);
        majority.iter().all(|i| field(&m, ids[*i], "gossip") == "dead")
    })
    .await;
    let m = members_in(&lab, cut);
    for i in &majority {
        assert_eq!(
            field(&m, ids[*i], "liveness"),
            "",
            "the minority recorded a verdict: {m:?}"
        );
    }

    lab.heal().unwrap();
    // After healing: nobody stays suspect or dead, the cut node is recorded
    // alive again, and no majority node was ever judged.
    for i in 0..3 {
        wait_until("every node hears every node alive again", async || {
            let m = members_in(&lab, i);
            ids.iter().all(|id| field(&m, *id, "gossip") == "alive")
                && field(&m, ids[cut], "liveness") == "alive"
                && majority.iter().all(|j| field(&m, ids[*j], "liveness").is_empty())
        })
        .await;
    }
    for n in nodes.iter_mut() {
        n.sigterm();
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
