//! Nodes in one process: each test runs `cell0` nodes as futures of this
//! process through `server::run_with(config, shutdown, supervisor)`, talks to
//! them through the public gRPC API on loopback, stops them through their
//! shutdown futures, and checks from each node's supervisor record how every
//! background task ended.
//!
//! Every node listens on a loopback address of its own (see
//! `common::Ports`), so no port is probed and released.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cell0::config::{LogFormat, NodeConfig};
use cell0::server;
use cell0::supervisor::{Record, Supervisor};
use cell0_proto::v1;
use common::{DEADLINE, Ports, get, kv, put};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Tasks every node runs, whatever its role.
const EVERY_NODE_TASKS: [&str; 7] = [
    "grpc-public",
    "grpc-internal",
    "http",
    "raft-metrics",
    "health",
    "models",
    "resources",
];

/// One node running inside this process.
struct InProcessNode {
    name: String,
    ports: Ports,
    tasks: Supervisor,
    stop: Option<oneshot::Sender<()>>,
    run: JoinHandle<anyhow::Result<()>>,
}

impl InProcessNode {
    /// Starts a node in `dir`; `join` is a member's endpoint, or `None` to
    /// bootstrap.
    fn start(name: &str, dir: &Path, join: Option<String>) -> Self {
        let ports = Ports::new();
        let mut config = NodeConfig {
            data_dir: dir.to_path_buf(),
            name: Some(name.to_string()),
            ..NodeConfig::default()
        };
        config.listen.public = SocketAddr::from((ports.ip, ports.public));
        config.listen.internal = SocketAddr::from((ports.ip, ports.internal));
        config.listen.http = SocketAddr::from((ports.ip, ports.http));
        config.tls.insecure = true;
        match join {
            Some(j) => config.join = vec![j],
            None => config.bootstrap = true,
        }
        // No wgpu adapter probing: these tests do not infer.
        config.inference.backend = cell0_inference::BackendKind::Cpu;
        let tasks = Supervisor::new();
        let (stop, stopped) = oneshot::channel::<()>();
        // A dropped sender (a failed test) stops the node too.
        let shutdown = async move {
            let _ = stopped.await;
        };
        let run = tokio::spawn(
            server::run_with(config, shutdown, tasks.clone()).instrument(tracing::info_span!("node", name)),
        );
        InProcessNode {
            name: name.to_string(),
            ports,
            tasks,
            stop: Some(stop),
            run,
        }
    }

    fn endpoint(&self) -> String {
        self.ports.endpoint()
    }

    /// Waits until the node's /ready answers 200.
    async fn wait_ready(&mut self) {
        let addr = SocketAddr::from((self.ports.ip, self.ports.http));
        let deadline = Instant::now() + DEADLINE;
        while http_status(addr, "/ready").await != Some(200) {
            if self.run.is_finished() {
                let ended = (&mut self.run).await;
                panic!("{} stopped before it was ready: {ended:?}", self.name);
            }
            assert!(Instant::now() < deadline, "{} not ready in time", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Raises the node's shutdown future.
    fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the node, asserts its run future returned Ok, and returns its
    /// supervisor's record.
    async fn stop(mut self) -> Record {
        self.begin_stop();
        let ended = tokio::time::timeout(DEADLINE, &mut self.run)
            .await
            .unwrap_or_else(|_| panic!("{} did not stop in time", self.name));
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{} returned an error: {e:#}", self.name),
            Err(e) => panic!("{}'s run task failed: {e}", self.name),
        }
        self.tasks.record()
    }
}

/// The status code of GET `path`, if the server answered.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.ok()?;
        reply.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

fn init_logging() {
    // Every test is its own process under nextest; under `cargo test` the
    // second call finds a logger already installed, which is fine.
    let _ = cell0::telemetry::init_logging(LogFormat::Text, "info,openraft=warn");
}

/// Asserts that `record` shows every task of a node joined at shutdown:
/// none still running, none cancelled at the deadline, none failed.
fn assert_joined_cleanly(name: &str, record: &Record, expected: &[&str]) {
    assert!(record.all_joined_cleanly(), "{name}: {record:#?}");
    for task in expected {
        assert!(
            record.spawned.contains_key(task),
            "{name} did not run task {task}: {record:#?}"
        );
        assert!(
            record.ended.iter().any(|t| t.name == *task),
            "{name}'s task {task} did not end: {record:#?}"
        );
    }
}

/// Three nodes under `root`: node1 bootstraps, the others join through
/// it; returns once all are ready.
async fn start_three(root: &std::path::Path) -> Vec<InProcessNode> {
    let mut nodes = vec![InProcessNode::start("node1", &root.join("node1"), None)];
    nodes[0].wait_ready().await;
    let seed = nodes[0].endpoint();
    for i in 2..=3 {
        let name = format!("node{i}");
        nodes.push(InProcessNode::start(&name, &root.join(&name), Some(seed.clone())));
    }
    for node in &mut nodes {
        node.wait_ready().await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_in_process_nodes_form_a_cluster_and_join_every_task_at_shutdown() {
    init_logging();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_three(root.path()).await;

    // A write through one node, a linearizable read through another.
    put(&nodes[1].endpoint(), "greeting", "hello").await.unwrap();
    assert_eq!(
        get(&nodes[2].endpoint(), "greeting", false).await,
        Some(b"hello".to_vec())
    );

    // Stop all three at once, then check each record.
    for node in &mut nodes {
        node.begin_stop();
    }
    for (i, node) in nodes.into_iter().enumerate() {
        let name = node.name.clone();
        let record = node.stop().await;
        let mut expected = EVERY_NODE_TASKS.to_vec();
        if i > 0 {
            expected.push("join");
        }
        assert_joined_cleanly(&name, &record, &expected);
    }
}

/// Peers keep long-lived Exchange streams open to a node (the leader's
/// AppendEntries, a follower's forwarded writes). A node stopped alone,
/// while its peers still run and hold them, must still drain and join its
/// internal server: its streams end with its stop signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_stopped_while_its_peers_hold_streams_to_it_joins_every_task() {
    init_logging();
    let root = tempfile::tempdir().unwrap();
    let nodes = start_three(root.path()).await;
    // Writes through every node: each follower forwards to the leader,
    // and the leader replicates to both, each over a stream.
    for (i, node) in nodes.iter().enumerate() {
        put(&node.endpoint(), &format!("k{i}"), "v").await.unwrap();
    }

    // One at a time, the others still running.
    for node in nodes.into_iter().rev() {
        let name = node.name.clone();
        let mut expected = EVERY_NODE_TASKS.to_vec();
        if name != "node1" {
            expected.push("join");
        }
        let record = node.stop().await;
        assert_joined_cleanly(&name, &record, &expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_a_node_ends_its_open_watch_with_unavailable() {
    init_logging();
    let root = tempfile::tempdir().unwrap();
    let mut node = InProcessNode::start("node1", &root.path().join("node1"), None);
    node.wait_ready().await;
    let endpoint = node.endpoint();

    let mut stream = kv(&endpoint)
        .await
        .watch(v1::WatchRequest {
            prefix: "w/".into(),
            start_revision: 0,
            require_leader: false,
        })
        .await
        .unwrap()
        .into_inner();
    // The first event shows the stream is being pumped.
    put(&endpoint, "w/1", "v").await.unwrap();
    let first = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the first event arrives")
        .unwrap()
        .expect("a message");
    assert_eq!(first.events.len(), 1);

    node.begin_stop();
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the watch ends when its node stops");
    match end {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains("shutting down"), "{status:?}");
        }
        Ok(message) => panic!("expected UNAVAILABLE, got {message:?}"),
    }
    drop(stream);

    let record = node.stop().await;
    assert_joined_cleanly("node1", &record, &EVERY_NODE_TASKS);
    // The pump was a supervised task and ended on its own, before the
    // deadline (a cancelled one would be in the record as a problem).
    assert_eq!(record.spawned.get("watch"), Some(&1), "{record:#?}");
    assert_eq!(record.transient_finished.get("watch"), Some(&1), "{record:#?}");
}
