//! End-to-end tests of the agent runtime: real `cell0` processes on
//! loopback, the public API only, checked against each runtime's own
//! journal of starts and stops.
//!
//! - exec agents answer tasks submitted with idempotency keys: every task
//!   completes exactly once with the right output, a resubmitted key names
//!   the same task, and draining a node under that load moves its agents
//!   with no two incarnations of an agent ever running at the same time;
//! - after kill -9 of a node (the leader too) its agents run elsewhere (the
//!   test prints how long that took) and take tasks again;
//! - a node stopped (SIGSTOP) past its lease loses its agents to other
//!   nodes; resumed, it does not restart them, and the results it finishes
//!   late never count;
//! - an inference agent remembers 100 texts, recalls the expected
//!   neighbours, and recalls the same after it moved to another node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use cell0_agents::journal;
use cell0_proto::v1;
use cell0_proto::v1::agents_client::AgentsClient;
use cell0_proto::v1::nodes_client::NodesClient;
use cell0_proto::v1::tasks_client::TasksClient;
use common::*;

/// A directory agent processes (running as `nobody` when the tests run as
/// root) can traverse to reach their working directories.
fn traversable_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    root
}

/// An exec agent that answers `AGENT:INPUT-IN-CAPITALS`.
fn echo_spec(name: &str) -> v1::AgentSpec {
    v1::AgentSpec {
        name: name.into(),
        // Small enough that 50 fit on one node of a 2-core machine (the
        // drain test's full size moves them all off one).
        resources: Some(v1::AgentResources {
            cpu_millis: 25,
            memory_mb: 64,
            gpu_memory_mb: 0,
        }),
        constraints: None,
        restart: String::new(),
        max_restarts: 0,
        kind: Some(v1::agent_spec::Kind::Exec(v1::ExecConfig {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "printf '%s:' \"$CELL0_AGENT\"; tr a-z A-Z".into(),
            ],
            timeout_ms: 20_000,
            max_output_bytes: 4096,
        })),
        sites: Vec::new(),
    }
}

/// Agents whose allocation is running on a node, by node.
async fn running_per_node(endpoint: &str) -> BTreeMap<u64, Vec<String>> {
    let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for a in agents(endpoint).await {
        if let Some(al) = &a.allocation
            && al.status == "running"
        {
            out.entry(al.node).or_default().push(a.spec.unwrap().name);
        }
    }
    out
}

async fn submit(endpoint: &str, agent: &str, input: &str, key: &str) -> v1::SubmitTaskResponse {
    TasksClient::new(channel(endpoint).await)
        .submit(v1::SubmitTaskRequest {
            agent: agent.into(),
            input: input.as_bytes().to_vec().into(),
            idempotency_key: key.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn wait_task(endpoint: &str, id: u64) -> v1::TaskInfo {
    let mut client = TasksClient::new(channel(endpoint).await);
    let end = Instant::now() + DEADLINE;
    loop {
        let t = client
            .wait(v1::WaitTaskRequest { id, timeout_ms: 10_000 })
            .await
            .unwrap()
            .into_inner();
        if t.status != "queued" {
            return t;
        }
        assert!(Instant::now() < end, "task {id} never completed: {t:?}");
    }
}

/// Checks, from every node's journal, that no two incarnations of an agent
/// ever ran at the same time (the nodes share this machine's monotonic
/// clock); returns how many incarnations ran. A node killed at a
/// monotonic time could not journal its stops: its incarnations ended then
/// at the latest (their processes die with it).
fn assert_no_overlap(dirs: &[(&Path, Option<u64>)]) -> usize {
    let mut spans: BTreeMap<String, BTreeMap<u64, (u64, u64)>> = BTreeMap::new();
    for (dir, killed_at) in dirs {
        let path = dir.join("agents/journal.jsonl");
        let Ok(records) = journal::read(&path) else {
            continue;
        };
        for r in records {
            let span = spans
                .entry(r.agent.clone())
                .or_default()
                .entry(r.incarnation)
                .or_insert((u64::MAX, u64::MAX));
            match r.event.as_str() {
                "started" => span.0 = r.monotonic_ns,
                "stopped" => span.1 = r.monotonic_ns,
                other => panic!("unknown journal event {other:?}"),
            }
        }
        if let Some(killed) = killed_at {
            for incarnations in spans.values_mut() {
                for span in incarnations.values_mut() {
                    if span.1 == u64::MAX && span.0 < *killed {
                        span.1 = *killed;
                    }
                }
            }
        }
    }
    let mut count = 0;
    for (agent, incarnations) in &spans {
        let list: Vec<(u64, (u64, u64))> = incarnations.iter().map(|(i, s)| (*i, *s)).collect();
        for pair in list.windows(2) {
            let ((a, (_, a_end)), (b, (b_start, _))) = (pair[0], pair[1]);
            assert!(
                a_end <= b_start,
                "agent {agent}: incarnation {b} started before incarnation {a} stopped"
            );
        }
        count += list.len();
    }
    count
}

/// The most moves off `drained` at one moment, from the runtimes' own
/// records: a move spans from an incarnation's last stop on that node to
/// the start of a later one elsewhere (a subset of the time the cluster
/// counts it as moving).
fn most_moves_at_once(drained: &Path, dirs: &[(&Path, Option<u64>)]) -> usize {
    let read = |dir: &Path| journal::read(&dir.join("agents/journal.jsonl")).unwrap_or_default();
    let mut stops: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for r in read(drained).into_iter().filter(|r| r.event == "stopped") {
        stops.insert((r.agent, r.incarnation), r.monotonic_ns);
    }
    let mut starts: BTreeMap<String, BTreeMap<u64, u64>> = BTreeMap::new();
    for (dir, _) in dirs.iter().filter(|(d, _)| *d != drained) {
        for r in read(dir).into_iter().filter(|r| r.event == "started") {
            starts.entry(r.agent).or_default().insert(r.incarnation, r.monotonic_ns);
        }
    }
    // +1 at a move's start, -1 at its end; ends sort before starts at a tie.
    let mut edges: Vec<(u64, i64)> = Vec::new();
    for ((agent, incarnation), stopped) in stops {
        let next = starts.get(&agent).and_then(|s| s.range(incarnation + 1..).next());
        if let Some((_, started)) = next {
            edges.push((stopped, 1));
            edges.push((*started, -1));
        }
    }
    edges.sort();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most as usize
}

/// Starts a 3-node cluster and runs `specs` on it; returns once every agent
/// runs.
async fn cluster_running(root: &Path, specs: Vec<v1::AgentSpec>) -> (Vec<Node>, Vec<String>) {
    let cluster = start_cluster(root, 3);
    let endpoints: Vec<String> = cluster.iter().map(|n| n.endpoint()).collect();
    wait_until("three nodes report resources", async || {
        nodes(&endpoints[0]).await.len() == 3
    })
    .await;
    let count = specs.len();
    let mut client = AgentsClient::new(channel(&endpoints[0]).await);
    for spec in specs {
        client.run(v1::RunAgentRequest { spec: Some(spec) }).await.unwrap();
    }
    wait_until("every agent runs", async || {
        running_per_node(&endpoints[0])
            .await
            .values()
            .map(Vec::len)
            .sum::<usize>()
            == count
    })
    .await;
    (cluster, endpoints)
}

/// Moves every agent to the leader; returns the leader's index and id.
async fn agents_on_the_leader(endpoints: &[String]) -> (usize, u64) {
    let leader_id = common::status(&endpoints[0]).await.leader_id;
    let mut leader = None;
    for (i, endpoint) in endpoints.iter().enumerate() {
        if common::status(endpoint).await.node_id == leader_id {
            leader = Some(i);
        }
    }
    let leader = leader.expect("the leader is one of the nodes");
    let mut client = AgentsClient::new(channel(&endpoints[0]).await);
    for (node, names) in running_per_node(&endpoints[0]).await {
        if node == leader_id {
            continue;
        }
        for name in names {
            client
                .migrate(v1::MigrateAgentRequest {
                    name,
                    to_node: leader_id,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    wait_until("every agent runs on the leader", async || {
        let placed = running_per_node(&endpoints[0]).await;
        placed.len() == 1 && placed.contains_key(&leader_id)
    })
    .await;
    (leader, leader_id)
}

/// The index and id of a node that runs agents (bin-packing puts them
/// together), whichever it is, the leader included.
async fn node_with_agents(endpoints: &[String]) -> (usize, u64) {
    let placed = running_per_node(&endpoints[0]).await;
    let mut found = None;
    for (i, endpoint) in endpoints.iter().enumerate() {
        let id = common::status(endpoint).await.node_id;
        if placed.contains_key(&id) {
            found = Some((i, id));
        }
    }
    found.expect("some node runs the agents")
}

/// Agents and tasks of the drain test: a CI-sized run, or the agents
/// issue's acceptance size (50 agents, 1,000 tasks) with
/// `CELL0_FULL_SCALE=1`.
fn drain_test_size() -> (usize, usize) {
    if std::env::var_os("CELL0_FULL_SCALE").is_some() {
        (50, 1000)
    } else {
        (12, 240)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_complete_exactly_once_while_a_drain_moves_their_agents() {
    let root = traversable_root();
    let (agent_count, task_count) = drain_test_size();
    let specs = (0..agent_count).map(|i| echo_spec(&format!("echo-{i}"))).collect();
    let (cluster, endpoints) = cluster_running(root.path(), specs).await;

    // Half the tasks, spread over the nodes; then drain the node with the
    // most agents while the rest arrive.
    const MAX_PARALLEL: u32 = 2;
    let mut ids = Vec::new();
    let mut watch = None;
    let mut drained = None;
    for t in 0..task_count {
        if t == task_count / 2 {
            let placed = running_per_node(&endpoints[0]).await;
            let (busiest, on_it) = placed.iter().max_by_key(|(_, a)| a.len()).unwrap();
            // One agent of that node as a client follows it.
            let mut stream = AgentsClient::new(channel(&endpoints[1]).await)
                .watch(v1::WatchAgentRequest { name: on_it[0].clone() })
                .await
                .unwrap()
                .into_inner();
            let first = stream.message().await.unwrap().unwrap();
            let first = first.allocation.unwrap();
            assert_eq!((first.node, first.status.as_str()), (*busiest, "running"));
            watch = Some((stream, first.incarnation));
            for (i, endpoint) in endpoints.iter().enumerate() {
                if common::status(endpoint).await.node_id == *busiest {
                    drained = Some(i);
                }
            }
            NodesClient::new(channel(&endpoints[0]).await)
                .drain(v1::DrainNodeRequest {
                    node: *busiest,
                    max_parallel: MAX_PARALLEL,
                    deadline_ms: 0,
                    reason: String::new(),
                })
                .await
                .unwrap();
        }
        let agent = format!("echo-{}", t % agent_count);
        let r = submit(
            &endpoints[t % 3],
            &agent,
            &format!("task number {t}"),
            &format!("key-{t}"),
        )
        .await;
        assert!(!r.existing);
        ids.push((t, agent, r.id));
    }
    // A retried key names the task it named first.
    for (t, agent, id) in ids.iter().take(10) {
        let r = submit(&endpoints[(t + 1) % 3], agent, "something else", &format!("key-{t}")).await;
        assert_eq!((r.id, r.existing), (*id, true));
    }
    for (t, agent, id) in &ids {
        let task = wait_task(&endpoints[t % 3], *id).await;
        assert_eq!(task.status, "succeeded", "{task:?}");
        assert_eq!(
            String::from_utf8(task.output.to_vec()).unwrap(),
            format!("{agent}:TASK NUMBER {t}")
        );
        assert!(task.incarnation >= 1);
    }
    // Every task once in its agent's list.
    let mut listed = 0;
    for i in 0..agent_count {
        let page = TasksClient::new(channel(&endpoints[2]).await)
            .list(v1::ListTasksRequest {
                agent: format!("echo-{i}"),
                start_after: 0,
                limit: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tasks.iter().all(|t| t.status == "succeeded"));
        listed += page.tasks.len();
    }
    assert_eq!(listed, task_count);

    // The drained node runs nothing; every agent runs elsewhere.
    wait_until("every agent runs off the drained node", async || {
        let placed = running_per_node(&endpoints[0]).await;
        let draining: Vec<u64> = nodes(&endpoints[0])
            .await
            .iter()
            .filter(|n| n.state == "draining")
            .map(|n| n.id)
            .collect();
        placed.values().map(Vec::len).sum::<usize>() == agent_count && draining.iter().all(|d| !placed.contains_key(d))
    })
    .await;
    // The watch saw the move: the next incarnation, running.
    let (mut stream, before) = watch.unwrap();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let a = stream.message().await.unwrap().expect("the watch ended");
            if a.allocation
                .as_ref()
                .is_some_and(|a| a.incarnation > before && a.status == "running")
            {
                break;
            }
        }
    })
    .await
    .expect("the watch never showed the agent running again");
    let dirs: Vec<(&Path, Option<u64>)> = cluster.iter().map(|n| (n.dir.as_path(), None)).collect();
    let drained = drained.expect("the drained node is one of the nodes");
    let moves = most_moves_at_once(&cluster[drained].dir, &dirs);
    assert!(
        (1..=MAX_PARALLEL as usize).contains(&moves),
        "{moves} moves off the drained node at once; max_parallel is {MAX_PARALLEL}"
    );
    let incarnations = assert_no_overlap(&dirs);
    assert!(
        incarnations > agent_count,
        "the drain moved no agent ({incarnations} incarnations)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_a_nodes_agents_run_elsewhere() {
    let root = traversable_root();
    const AGENTS: usize = 6;
    let specs = (0..AGENTS).map(|i| echo_spec(&format!("survivor-{i}"))).collect();
    let (mut cluster, endpoints) = cluster_running(root.path(), specs).await;
    let (victim, victim_id) = node_with_agents(&endpoints).await;
    let was_leader = common::status(&endpoints[victim]).await.leader_id == victim_id;
    let killed = Instant::now();
    cluster[victim].kill9();
    let killed_at = journal::monotonic_ns();
    let survivor = (victim + 1) % 3;
    let _logs = DumpLogs(cluster.iter().map(|n| n.dir.with_extension("log")).collect());
    wait_until("the killed node's agents run elsewhere", async || {
        let placed = running_per_node(&endpoints[survivor]).await;
        !placed.contains_key(&victim_id) && placed.values().map(Vec::len).sum::<usize>() == AGENTS
    })
    .await;
    // Informational, like the time: a survivor whose lease lapsed during
    // the election stopped its agents for a moment (safe, but an outage).
    let lapsed = cluster
        .iter()
        .enumerate()
        .filter(|(i, n)| {
            *i != victim
                && std::fs::read_to_string(n.dir.with_extension("log")).is_ok_and(|l| l.contains("lease lapsed"))
        })
        .count();
    println!(
        "kill -9 to every agent running elsewhere: {} ms (the killed node led: {was_leader}; survivors whose lease lapsed: {lapsed})",
        killed.elapsed().as_millis()
    );
    for i in 0..AGENTS {
        let agent = format!("survivor-{i}");
        let r = submit(&endpoints[survivor], &agent, "still here", "").await;
        let task = wait_task(&endpoints[survivor], r.id).await;
        assert_eq!(
            String::from_utf8(task.output.to_vec()).unwrap(),
            format!("{agent}:STILL HERE")
        );
    }
    let dirs: Vec<(&Path, Option<u64>)> = cluster
        .iter()
        .enumerate()
        .map(|(i, n)| (n.dir.as_path(), (i == victim).then_some(killed_at)))
        .collect();
    assert_no_overlap(&dirs);
}

fn signal(node: &Node, sig: &str) {
    let pid = node.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// A counter's value in a node's Prometheus text (0 when absent).
fn counter(node: &Node, name: &str) -> u64 {
    let (_, body) = node.http_get("/metrics").expect("metrics answer");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_past_its_lease_loses_its_agents_and_its_late_results() {
    let root = traversable_root();
    const AGENTS: usize = 3;
    let specs = (0..AGENTS)
        .map(|i| {
            let mut spec = echo_spec(&format!("slow-{i}"));
            spec.kind = Some(v1::agent_spec::Kind::Exec(v1::ExecConfig {
                command: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "touch running; sleep 1; printf done".into(),
                ],
                timeout_ms: 20_000,
                max_output_bytes: 64,
            }));
            spec
        })
        .collect();
    let (cluster, endpoints) = cluster_running(root.path(), specs).await;
    // The leader, the harder case: it wakes up still believing it leads,
    // with every lease it granted long expired.
    let (frozen, frozen_id) = agents_on_the_leader(&endpoints).await;
    let other = (frozen + 1) % 3;
    let _logs = DumpLogs(cluster.iter().map(|n| n.dir.with_extension("log")).collect());
    // A task in flight on each agent, then the node freezes mid-task (its
    // tasks' processes run on and finish while it is stopped).
    let mut tasks = Vec::new();
    for i in 0..AGENTS {
        tasks.push(submit(&endpoints[other], &format!("slow-{i}"), "", "").await.id);
    }
    let work = cluster[frozen].dir.join("agents/work");
    let incarnations: BTreeMap<String, u64> = agents(&endpoints[other])
        .await
        .into_iter()
        .map(|a| (a.spec.unwrap().name, a.allocation.unwrap().incarnation))
        .collect();
    wait_until("every task runs on the node", async || {
        incarnations
            .iter()
            .all(|(name, incarnation)| work.join(format!("{name}/{incarnation}/running")).exists())
    })
    .await;
    signal(&cluster[frozen], "-STOP");
    wait_until("the frozen node's agents run elsewhere", async || {
        let placed = running_per_node(&endpoints[other]).await;
        !placed.contains_key(&frozen_id) && placed.values().map(Vec::len).sum::<usize>() == AGENTS
    })
    .await;
    signal(&cluster[frozen], "-CONT");
    // Every task's result comes from the new incarnations.
    for (i, id) in tasks.iter().enumerate() {
        let task = wait_task(&endpoints[other], *id).await;
        assert_eq!(task.status, "succeeded", "{task:?}");
        assert!(
            task.incarnation > incarnations[&format!("slow-{i}")],
            "a result of the frozen incarnation counted: {task:?}"
        );
    }
    // Resumed, the node rejoins (its lease renewed, it is ready again) and
    // never restarts the superseded incarnations.
    wait_until("the resumed node is ready again", async || {
        nodes(&endpoints[other])
            .await
            .iter()
            .any(|n| n.id == frozen_id && n.state == "ready")
    })
    .await;
    let records = journal::read(&cluster[frozen].dir.join("agents/journal.jsonl")).unwrap();
    let started = records.iter().filter(|r| r.event == "started").count();
    assert_eq!(
        started, AGENTS,
        "the resumed node restarted superseded agents: {records:?}"
    );
    assert!(!running_per_node(&endpoints[other]).await.contains_key(&frozen_id));
    println!(
        "late results the resumed node sent and the cluster refused: {}",
        counter(&cluster[frozen], "cell0_agent_task_results_rejected_total")
    );
}

const TOPICS: [&str; 5] = [
    "cooking pasta with tomato sauce and fresh basil",
    "programming in Rust with ownership and borrowing",
    "hiking in the mountains above the tree line",
    "jazz saxophone improvisation in a small club",
    "investing in index funds for retirement",
];

/// The current allocation of agent `name`.
async fn allocation_of(endpoint: &str, name: &str) -> v1::Allocation {
    AgentsClient::new(channel(endpoint).await)
        .get(v1::GetAgentRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .allocation
        .expect("the agent is placed")
}

async fn remember_and_recall(endpoint: &str, agent: &str, query: &str) -> serde_json::Value {
    let r = submit(
        endpoint,
        agent,
        &format!(r#"{{"op":"recall","text":"{query}","k":5}}"#),
        "",
    )
    .await;
    let task = wait_task(endpoint, r.id).await;
    assert_eq!(task.status, "succeeded", "{task:?}");
    serde_json::from_slice(&task.output).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inference_agent_recalls_the_same_after_it_moves() {
    let root = traversable_root();
    let cluster = start_cluster(root.path(), 3);
    let endpoints: Vec<String> = cluster.iter().map(|n| n.endpoint()).collect();
    add_test_model(&endpoints[0]);
    wait_until("every node holds the model", async || {
        let ls = cli(&["model", "ls", "--output", "json", "--endpoint", &endpoints[0]]);
        let v: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap_or_default();
        v[0]["holders"].as_array().is_some_and(|h| h.len() == 3)
    })
    .await;
    let mut spec = echo_spec("memo");
    spec.kind = Some(v1::agent_spec::Kind::Inference(v1::InferenceConfig {}));
    spec.constraints = Some(v1::AgentConstraints {
        model: "minilm".into(),
        ..Default::default()
    });
    AgentsClient::new(channel(&endpoints[0]).await)
        .run(v1::RunAgentRequest { spec: Some(spec) })
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..100 {
        let text = format!("{} (note {i})", TOPICS[i % TOPICS.len()]);
        let input = format!(r#"{{"op":"remember","key":"note-{i:03}","text":"{text}"}}"#);
        ids.push(
            submit(&endpoints[i % 3], "memo", &input, &format!("remember-{i}"))
                .await
                .id,
        );
    }
    for id in ids {
        assert_eq!(wait_task(&endpoints[0], id).await.status, "succeeded");
    }
    let before = remember_and_recall(&endpoints[1], "memo", "how long should spaghetti boil").await;
    let keys: Vec<u64> = before["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap()[5..].parse().unwrap())
        .collect();
    assert_eq!(keys.len(), 5);
    assert!(
        keys.iter().all(|k| k % 5 == 0),
        "recall should find the pasta notes: {before}"
    );

    let first = allocation_of(&endpoints[0], "memo").await;
    AgentsClient::new(channel(&endpoints[0]).await)
        .migrate(v1::MigrateAgentRequest {
            name: "memo".into(),
            to_node: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    wait_until("the agent runs on another node", async || {
        let a = allocation_of(&endpoints[0], "memo").await;
        a.status == "running" && a.node != first.node
    })
    .await;
    let after = remember_and_recall(&endpoints[2], "memo", "how long should spaghetti boil").await;
    assert_eq!(before, after, "recall changed after the move");
    let memory = memory_of(&endpoints[2], "memo").await.unwrap();
    assert_eq!(memory.len(), 100);
    assert!(memory.iter().all(|e| e.embedding_dims == 384));
}

/// Prints the nodes' logs if the test fails.
struct DumpLogs(Vec<std::path::PathBuf>);

impl Drop for DumpLogs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.0 {
                eprintln!(
                    "==== {}\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                );
            }
        }
    }
}
