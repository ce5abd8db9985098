//! End-to-end tests of agent placement: real processes on loopback, the
//! public API and the CLI only.
//!
//! - agents submitted to any node are placed by the leader's scheduler within
//!   every node's capacity, each with its first incarnation; one too large
//!   for any node stays pending with a reason;
//! - draining a node moves its agents to the others, each with a new
//!   incarnation, and leaves nothing placed on it;
//! - an agent that requires node labels goes to the node that has them, and
//!   one whose labels no node has stays pending saying so;
//! - an agent waiting for room is placed once another agent's stop frees
//!   it (no node event needed);
//! - bad specs are refused naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use cell0_proto::v1;
use cell0_proto::v1::agents_client::AgentsClient;
use cell0_proto::v1::nodes_client::NodesClient;
use common::*;

fn spec(name: &str, cpu_millis: u64) -> v1::AgentSpec {
    v1::AgentSpec {
        name: name.into(),
        resources: Some(v1::AgentResources {
            cpu_millis,
            memory_mb: 16,
            gpu_memory_mb: 0,
        }),
        constraints: None,
        restart: String::new(),
        max_restarts: 0,
        kind: Some(v1::agent_spec::Kind::Exec(v1::ExecConfig {
            command: vec!["/bin/cat".into()],
            timeout_ms: 1000,
            max_output_bytes: 1024,
        })),
        sites: Vec::new(),
    }
}

/// Holding allocations per node, and every node's CPU use within its capacity.
fn placed_per_node(agents: &[v1::AgentInfo]) -> BTreeMap<u64, Vec<String>> {
    let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for a in agents {
        if let Some(al) = &a.allocation
            && matches!(al.status.as_str(), "pending" | "running")
        {
            out.entry(al.node)
                .or_default()
                .push(a.spec.as_ref().unwrap().name.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_placed_within_capacity_and_a_drain_moves_them() {
    let root = tempfile::tempdir().unwrap();
    let cluster = start_cluster(root.path(), 3);
    let endpoints: Vec<String> = cluster.iter().map(|n| n.endpoint()).collect();

    // Every node reports its resources once it is in the cluster.
    wait_until("three nodes report resources", async || {
        nodes(&endpoints[0]).await.len() == 3
    })
    .await;
    let capacity = nodes(&endpoints[0]).await[0].cpu_cores as u64 * 1000;
    assert!(
        nodes(&endpoints[0])
            .await
            .iter()
            .all(|n| n.cpu_cores as u64 * 1000 == capacity)
    );
    // Two nodes' worth of agents, a quarter of a node each, submitted to
    // every node in turn; and one larger than any node.
    let quarter = capacity / 4;
    for i in 0..8 {
        let mut client = AgentsClient::new(channel(&endpoints[i % 3]).await);
        let r = client
            .run(v1::RunAgentRequest {
                spec: Some(spec(&format!("worker-{i}"), quarter)),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.generation, 1);
    }
    // The same spec again changes nothing.
    let again = AgentsClient::new(channel(&endpoints[1]).await)
        .run(v1::RunAgentRequest {
            spec: Some(spec("worker-0", quarter)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.generation, 1);

    // One through the CLI, from a spec file: too large for any node.
    let spec_file = root.path().join("huge.toml");
    std::fs::write(
        &spec_file,
        format!(
            "name = \"huge\"\nkind = \"exec\"\n[resources]\ncpu_millis = {}\nmemory_mb = 16\n[config]\ncommand = [\"/bin/cat\"]\n",
            capacity + 1
        ),
    )
    .unwrap();
    let out = cli(&["--endpoint", &endpoints[2], "agent", "run", spec_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));

    wait_until("every worker is placed", async || {
        let all = agents(&endpoints[0]).await;
        placed_per_node(&all).values().map(Vec::len).sum::<usize>() == 8
    })
    .await;
    wait_until("huge says why it is pending", async || {
        let all = agents(&endpoints[0]).await;
        all.iter()
            .any(|a| a.spec.as_ref().unwrap().name == "huge" && a.pending_reason == "3 nodes lack CPU")
    })
    .await;
    // The scheduler that left it pending counted it, by reason.
    assert!(cluster.iter().any(|n| {
        n.http_get("/metrics")
            .is_some_and(|(_, body)| body.contains("cell0_scheduler_placement_failures_total{reason=\"no_cpu\"}"))
    }));
    let before = agents(&endpoints[0]).await;
    let placed = placed_per_node(&before);
    for (node, names) in &placed {
        assert!(
            names.len() as u64 * quarter <= capacity,
            "node {node:x} over capacity: {names:?}"
        );
    }
    for a in before.iter().filter(|a| a.spec.as_ref().unwrap().name != "huge") {
        assert_eq!(a.allocation.as_ref().unwrap().incarnation, 1, "{a:?}");
    }
    // Usage as the nodes report it matches the placements.
    let used: u64 = nodes(&endpoints[1])
        .await
        .iter()
        .map(|n| n.used.unwrap().cpu_millis)
        .sum();
    assert_eq!(used, 8 * quarter);

    // Drain the busiest node: its agents move, each with a new incarnation.
    let (&drained, moved) = placed.iter().max_by_key(|(_, names)| names.len()).unwrap();
    let out = cli(&["--endpoint", &endpoints[0], "node", "drain", &format!("{drained:016x}")]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the drained node's agents moved", async || {
        let all = agents(&endpoints[0]).await;
        let now = placed_per_node(&all);
        !now.contains_key(&drained) && now.values().map(Vec::len).sum::<usize>() == 8
    })
    .await;
    let after = agents(&endpoints[2]).await;
    for a in &after {
        let name = &a.spec.as_ref().unwrap().name;
        if moved.contains(name) {
            let al = a.allocation.as_ref().unwrap();
            assert_eq!(al.incarnation, 2, "{name} moved with the next incarnation");
            assert_ne!(al.node, drained);
        }
    }
    for (node, names) in placed_per_node(&after) {
        assert!(
            names.len() as u64 * quarter <= capacity,
            "node {node:x} over capacity: {names:?}"
        );
    }
    let listed = cli(&["--endpoint", &endpoints[1], "node", "ls", "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let drained_view = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == format!("{drained:016x}"))
        .unwrap();
    assert_eq!(drained_view["state"], "draining");
    assert_eq!(drained_view["agents"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waiting_for_room_is_placed_once_a_stop_frees_it() {
    let root = tempfile::tempdir().unwrap();
    let cluster = start_cluster(root.path(), 1);
    let endpoint = cluster[0].endpoint();
    wait_until("the node reports resources", async || nodes(&endpoint).await.len() == 1).await;
    let capacity = nodes(&endpoint).await[0].cpu_cores as u64 * 1000;
    let mut client = AgentsClient::new(channel(&endpoint).await);
    // Each takes three quarters of the node: the second waits for room.
    for name in ["first", "second"] {
        client
            .run(v1::RunAgentRequest {
                spec: Some(spec(name, capacity * 3 / 4)),
            })
            .await
            .unwrap();
    }
    wait_until("first is placed and second waits for room", async || {
        let all = agents(&endpoint).await;
        let placed = placed_per_node(&all);
        placed.values().flatten().eq(["first"])
            && all
                .iter()
                .any(|a| a.spec.as_ref().unwrap().name == "second" && a.pending_reason == "1 node lacks CPU")
    })
    .await;

    // Stopping first frees the room; no node record or status changes.
    client
        .stop(v1::StopAgentRequest { name: "first".into() })
        .await
        .unwrap();
    wait_until("second is placed in the room first left", async || {
        placed_per_node(&agents(&endpoint).await)
            .values()
            .flatten()
            .eq(["second"])
    })
    .await;
    assert!(
        cluster[0]
            .http_get("/metrics")
            .is_some_and(|(_, body)| body.contains("cell0_scheduler_unblocked_agents_total")),
        "the leader counted the unblock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_go_to_nodes_with_the_labels_they_require() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("zone-b.toml");
    std::fs::write(&config, "[resources]\nlabels = { zone = \"b\" }\n").unwrap();
    let mut first = Node::start("node1", &root.path().join("node1"), Ports::new(), None);
    first.wait_ready();
    let mut second = Node::start_with(
        "node2",
        &root.path().join("node2"),
        Ports::new(),
        Some(first.endpoint()),
        vec!["--config".into(), config.to_str().unwrap().into()],
        &[],
    );
    second.wait_ready();
    let endpoint = first.endpoint();
    wait_until("node2 reports its labels", async || {
        nodes(&endpoint)
            .await
            .iter()
            .any(|n| n.labels.get("zone").map(String::as_str) == Some("b"))
    })
    .await;
    let zone_b = nodes(&endpoint)
        .await
        .into_iter()
        .find(|n| !n.labels.is_empty())
        .unwrap()
        .id;

    let mut client = AgentsClient::new(channel(&endpoint).await);
    for (name, zone) in [("in-b", "b"), ("in-c", "c")] {
        let mut s = spec(name, 100);
        s.constraints = Some(v1::AgentConstraints {
            labels: [("zone".to_string(), zone.to_string())].into(),
            gpu: false,
            model: String::new(),
        });
        client.run(v1::RunAgentRequest { spec: Some(s) }).await.unwrap();
    }
    wait_until("in-b is placed and in-c says why not", async || {
        let all = agents(&endpoint).await;
        let placed_on_b = all.iter().any(|a| {
            a.spec.as_ref().unwrap().name == "in-b" && a.allocation.as_ref().is_some_and(|al| al.node == zone_b)
        });
        let c_pending = all
            .iter()
            .any(|a| a.spec.as_ref().unwrap().name == "in-c" && a.pending_reason == "2 nodes lack the labels");
        placed_on_b && c_pending
    })
    .await;
    let listed = cli(&["--endpoint", &endpoint, "node", "ls"]);
    assert!(stdout(&listed).contains("zone=b"), "{}", stdout(&listed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_refused_naming_the_field() {
    let root = tempfile::tempdir().unwrap();
    let cluster = start_cluster(root.path(), 1);
    let endpoint = cluster[0].endpoint();
    let mut client = AgentsClient::new(channel(&endpoint).await);
    for (spec, field) in [
        (spec("zero", 0), "spec.resources.cpu_millis"),
        (spec("Bad Name", 100), "spec.name"),
        (
            v1::AgentSpec {
                kind: None,
                ..spec("nokind", 100)
            },
            "spec.kind",
        ),
    ] {
        let err = client.run(v1::RunAgentRequest { spec: Some(spec) }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains(field), "{field}: {err}");
    }
    let missing = client
        .get(v1::GetAgentRequest { name: "ghost".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");

    // Drain settings out of range, or a node that is not a member.
    let mut nodes = NodesClient::new(channel(&endpoint).await);
    let me = common::status(&endpoint).await.node_id;
    for (request, field) in [
        (
            v1::DrainNodeRequest {
                node: me,
                max_parallel: 10_001,
                deadline_ms: 0,
                ..Default::default()
            },
            "max_parallel",
        ),
        (
            v1::DrainNodeRequest {
                node: me,
                max_parallel: 1,
                deadline_ms: u64::MAX,
                ..Default::default()
            },
            "deadline_ms",
        ),
        (
            v1::DrainNodeRequest {
                node: 42,
                max_parallel: 1,
                deadline_ms: 0,
                ..Default::default()
            },
            "node",
        ),
        (
            v1::DrainNodeRequest {
                node: me,
                reason: "x".repeat(257),
                ..Default::default()
            },
            "reason",
        ),
    ] {
        let err = nodes.drain(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains(field), "{field}: {err}");
    }
    let out = cli(&["--endpoint", &endpoint, "node", "drain", "1", "--deadline", "soon"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a duration"), "{}", stderr(&out));

    // The CLI names unknown keys of a spec file.
    let file = root.path().join("bad.toml");
    std::fs::write(
        &file,
        "name = \"x\"\nkind = \"exec\"\nflavour = 1\n[resources]\ncpu_millis = 1\nmemory_mb = 1\n",
    )
    .unwrap();
    let out = cli(&["--endpoint", &endpoint, "agent", "run", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("flavour"), "{}", stderr(&out));

    // A drain past its deadline: the leader lifts its limit.
    let out = cli(&[
        "--endpoint",
        &endpoint,
        "node",
        "drain",
        &format!("{me:016x}"),
        "--max-parallel",
        "1",
        "--deadline",
        "1ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 at a time"), "{}", stderr(&out));
    wait_until("the leader ends the drain's limit at its deadline", async || {
        let listed = nodes.list(v1::ListNodesRequest {}).await.unwrap().into_inner();
        listed
            .nodes
            .iter()
            .any(|n| n.id == me && n.state == "draining" && n.reason.contains("deadline passed"))
    })
    .await;
}
