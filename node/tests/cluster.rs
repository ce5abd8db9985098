//! End-to-end tests of the `cell0` binary: real processes on loopback, used
//! only through the public gRPC API, the HTTP port and the CLI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use cell0_proto::v1;
use common::*;
use tonic_types::StatusExt;

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "CLI failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", stdout(o)))
}

/// The `google.rpc.ErrorInfo` of a status from a node (domain `cell0`).
fn error_info(s: &tonic::Status) -> tonic_types::ErrorInfo {
    let info = s
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {s:?}"));
    assert_eq!(info.domain, "cell0", "{s:?}");
    info
}

fn leader_of(nodes: &[Node]) -> usize {
    let out = json(&cli(&[
        "members",
        "--output",
        "json",
        "--endpoint",
        &nodes[0].endpoint(),
    ]));
    let leader = out
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["leader"] == true)
        .expect("a leader");
    let name = leader["name"].as_str().unwrap();
    nodes.iter().position(|n| n.name == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_through_the_cli_and_survive_a_leader_kill() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(root.path(), 3);

    let members = json(&cli(&[
        "members",
        "--output",
        "json",
        "--endpoint",
        &nodes[2].endpoint(),
    ]));
    let members = members.as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m["role"] == "voter"), "{members:?}");
    assert_eq!(members.iter().filter(|m| m["leader"] == true).count(), 1);

    let out = cli(&["kv", "put", "greeting", "hello", "--endpoint", &nodes[2].endpoint()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = cli(&["kv", "get", "greeting", "--endpoint", &nodes[0].endpoint()]);
    assert_eq!(stdout(&got).trim(), "hello");
    // The previous pair only when asked for, through every node.
    for node in &nodes {
        let endpoint = node.endpoint();
        let asked = json(&cli(&[
            "kv",
            "put",
            "greeting",
            "hi",
            "--prev-kv",
            "--output",
            "json",
            "--endpoint",
            &endpoint,
        ]));
        assert_eq!(asked["prev_kv"]["value"], "hello", "{asked}");
        assert_eq!(put(&endpoint, "greeting", "hello").await.unwrap().prev_kv, None);
    }
    let new_key = json(&cli(&[
        "kv",
        "put",
        "fresh",
        "x",
        "--prev-kv",
        "--output",
        "json",
        "--endpoint",
        &nodes[1].endpoint(),
    ]));
    assert!(new_key["prev_kv"].is_null(), "{new_key}");

    // kill -9 the leader: writes through the survivors succeed again.
    let leader = leader_of(&nodes);
    nodes[leader].kill9();
    let survivor = nodes[(leader + 1) % 3].endpoint();
    let started = Instant::now();
    loop {
        match put(&survivor, "after-kill", "yes").await {
            Ok(_) => break,
            Err(s) => assert!(started.elapsed() < DEADLINE, "writes did not resume: {s}"),
        }
    }
    for i in 0..20 {
        put(&survivor, &format!("k{i}"), "v").await.unwrap();
    }

    // The killed node restarts from its data dir alone and catches up.
    nodes[leader].restart();
    nodes[leader].wait_ready();
    let back = nodes[leader].endpoint();
    assert_eq!(get(&back, "k19", false).await, Some(b"v".to_vec()));
    let deadline = Instant::now() + DEADLINE;
    while get(&back, "k19", true).await.is_none() {
        assert!(Instant::now() < deadline, "restarted node did not catch up");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&back, "after-kill", true).await, Some(b"yes".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_as_a_learner() {
    let root = tempfile::tempdir().unwrap();
    let nodes = start_cluster(root.path(), 3);
    let mut fourth = Node::start(
        "node4",
        &root.path().join("node4"),
        Ports::new(),
        Some(nodes[1].endpoint()),
    );
    fourth.wait_ready();
    let members = json(&cli(&[
        "members",
        "--output",
        "json",
        "--endpoint",
        &nodes[0].endpoint(),
    ]));
    let m4 = members
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "node4")
        .expect("node4 is a member");
    assert_eq!(m4["role"], "learner");
    put(&nodes[0].endpoint(), "seen-by-4", "1").await.unwrap();
    assert_eq!(get(&fourth.endpoint(), "seen-by-4", false).await, Some(b"1".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_keeps_acknowledged_writes() {
    let root = tempfile::tempdir().unwrap();
    let mut node = Node::start("solo", &root.path().join("solo"), Ports::new(), None);
    node.wait_ready();
    for i in 0..50 {
        put(&node.endpoint(), &format!("k{i}"), &i.to_string()).await.unwrap();
    }
    let status = node.sigterm();
    assert!(status.success(), "exit status {status}:\n{}", node.log());
    assert!(node.log().contains("stopped"), "{}", node.log());
    node.restart();
    node.wait_ready();
    for i in 0..50 {
        assert_eq!(
            get(&node.endpoint(), &format!("k{i}"), false).await,
            Some(i.to_string().into_bytes())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_acknowledged_writes_loses_none() {
    let root = tempfile::tempdir().unwrap();
    let mut node = Node::start("solo", &root.path().join("solo"), Ports::new(), None);
    node.wait_ready();
    // Many concurrent writers, so acknowledged writes are still in flight in
    // every layer when the process dies.
    let endpoint = node.endpoint();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = kv(&endpoint).await;
            let mut acked = Vec::new();
            for i in 0..25 {
                let key = format!("w{w}/{i}");
                client
                    .put(v1::PutRequest {
                        key: key.clone().into_bytes().into(),
                        value: b"v".to_vec().into(),
                        prev_kv: false,
                    })
                    .await
                    .unwrap();
                acked.push(key);
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    node.kill9();
    node.restart();
    node.wait_ready();
    for key in &acked {
        assert_eq!(get(&endpoint, key, false).await, Some(b"v".to_vec()), "lost {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_reflection_are_served() {
    let root = tempfile::tempdir().unwrap();
    let mut node = Node::start("solo", &root.path().join("solo"), Ports::new(), None);
    node.wait_ready();
    put(&node.endpoint(), "m", "1").await.unwrap();
    put(&node.endpoint(), "m", "2").await.unwrap();
    let refused = put(&node.endpoint(), "", "1")
        .await
        .expect_err("an empty key is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // A method the Kv service does not have: UNIMPLEMENTED, as for any
    // unknown path.
    let mut grpc = tonic::client::Grpc::new(channel(&node.endpoint()).await);
    grpc.ready().await.unwrap();
    let unknown = grpc
        .unary(
            tonic::Request::new(v1::GetRequest::default()),
            tonic::codegen::http::uri::PathAndQuery::from_static("/cell0.v1.Kv/NoSuchMethod"),
            tonic_prost::ProstCodec::<v1::GetRequest, v1::GetResponse>::default(),
        )
        .await
        .expect_err("the Kv service has no such method");
    assert_eq!(unknown.code(), tonic::Code::Unimplemented);
    assert_eq!(node.http_get("/live").unwrap().0, 200);
    let (code, body) = node.http_get("/health/deep").unwrap();
    assert_eq!(code, 200, "{body}");
    let deep: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(deep["ok"], true);
    let (_, metrics) = node.http_get("/metrics").unwrap();
    for name in [
        "cell0_raft_term",
        "cell0_raft_commit_index",
        "cell0_grpc_requests_total",
        "cell0_write_duration_seconds",
        "cell0_raft_log_fsync_duration_seconds",
        "cell0_raft_log_appends_per_fsync",
        // Apply took the put's entry from the log's recent entries.
        "cell0_raft_log_entries_read_total{source=\"memory\"}",
    ] {
        assert!(metrics.contains(name), "missing {name} in:\n{metrics}");
    }
    // Each request counted once under its method and code, and timed.
    for line in [
        "cell0_grpc_requests_total{method=\"Kv/Put\",code=\"Ok\"} 2",
        "cell0_grpc_requests_total{method=\"Kv/Put\",code=\"InvalidArgument\"} 1",
        "cell0_grpc_request_duration_seconds_count{method=\"Kv/Put\"} 3",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in:\n{metrics}");
    }

    let services = list_services(&node.endpoint()).await;
    for s in [
        "cell0.v1.Kv",
        "cell0.v1.Cluster",
        "cell0.v1.Acl",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|x| x == s), "{s} not in {services:?}");
    }
    // The same through v1alpha, for clients that speak only that.
    let services = list_services_v1alpha(&node.endpoint()).await;
    for s in [
        "cell0.v1.Kv",
        "cell0.v1.Cluster",
        "cell0.v1.Acl",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|x| x == s), "v1alpha: {s} not in {services:?}");
    }
}

/// After every commit the commit index runs a moment ahead of the applied
/// one; that is no lag, so a node under writes stays ready throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_under_writes_stays_ready() {
    let root = tempfile::tempdir().unwrap();
    let mut node = Node::start("solo", &root.path().join("solo"), Ports::new(), None);
    node.wait_ready();
    let endpoint = node.endpoint();
    let writer = tokio::spawn(async move {
        for i in 0..300 {
            put(&endpoint, &format!("k{i}"), "v").await.unwrap();
        }
    });
    let mut probes = 0;
    while !writer.is_finished() {
        let (code, body) = tokio::task::block_in_place(|| node.http_get("/ready")).unwrap();
        assert_eq!(code, 200, "probe {probes} under writes: {body}");
        probes += 1;
    }
    writer.await.unwrap();
    assert!(probes > 0, "no probe ran while the writes did");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_one_clear_message() {
    let root = tempfile::tempdir().unwrap();
    let mut node = Node::start("solo", &root.path().join("solo"), Ports::new(), None);
    node.wait_ready();

    // The code, the stable reason and the field travel in the status; the
    // message names the field for people.
    let err = put(&node.endpoint(), &"k".repeat(4097), "v").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let info = error_info(&err);
    assert_eq!(info.reason, "INVALID_ARGUMENT_FIELD", "{err:?}");
    assert_eq!(info.metadata.get("field").map(String::as_str), Some("key"), "{err:?}");
    assert!(err.message().starts_with("key is 4097 bytes"), "{}", err.message());
    let err = put(&node.endpoint(), "", "v").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let info = error_info(&err);
    assert_eq!(info.reason, "INVALID_ARGUMENT_FIELD", "{err:?}");
    assert_eq!(info.metadata.get("field").map(String::as_str), Some("key"), "{err:?}");
    let err = put(&node.endpoint(), "k", &"x".repeat(1024 * 1024 + 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        error_info(&err).metadata.get("field").map(String::as_str),
        Some("value")
    );
    assert!(err.message().contains("value is 1048577 bytes"), "{}", err.message());
    let err = kv(&node.endpoint())
        .await
        .range(v1::RangeRequest {
            prefix: "p".into(),
            limit: 10_001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let info = error_info(&err);
    assert_eq!(info.reason, "INVALID_ARGUMENT_FIELD", "{err:?}");
    assert_eq!(info.metadata.get("field").map(String::as_str), Some("limit"), "{err:?}");
    let out = cli(&["kv", "put", &"k".repeat(4097), "v", "--endpoint", &node.endpoint()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error: invalid argument (INVALID_ARGUMENT_FIELD): key is 4097 bytes"),
        "{}",
        stderr(&out)
    );

    let out = cli(&["run", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--no-such-flag"), "{}", stderr(&out));

    let out = cli(&["run", "--config", "/nonexistent/cell0.toml"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot read /nonexistent/cell0.toml"),
        "{}",
        stderr(&out)
    );

    let busy = node.endpoint();
    let dir = root.path().join("other");
    let out = cli(&[
        "run",
        "--insecure",
        "--data-dir",
        dir.to_str().unwrap(),
        "--listen-public",
        &busy,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("cannot listen on {busy} (listen.public)")),
        "{}",
        stderr(&out)
    );

    // A loopback address no node listens on.
    let out = cli(&["status", "--endpoint", &Ports::new().endpoint()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach a cell0 node"), "{}", stderr(&out));

    let out = cli(&["kv", "get", "missing", "--endpoint", &node.endpoint()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_requiring_a_leader_ends_when_its_node_loses_the_quorum() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(root.path(), 3);
    let leader = leader_of(&nodes);
    let watched = (leader + 1) % nodes.len();
    let mut stream = kv(&nodes[watched].endpoint())
        .await
        .watch(v1::WatchRequest {
            prefix: "w/".into(),
            start_revision: 0,
            require_leader: true,
        })
        .await
        .unwrap()
        .into_inner();
    put(&nodes[leader].endpoint(), "w/1", "v").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the first event arrives")
        .unwrap()
        .expect("a message");
    assert_eq!(first.events.len(), 1);

    for (i, n) in nodes.iter_mut().enumerate() {
        if i != watched {
            n.kill9();
        }
    }
    // Cut off from the quorum, the node has no leader after an election
    // timeout; the watch ends instead of going silent.
    let end = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the watch ends");
    let status = end.expect_err("an error status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert_eq!(error_info(&status).reason, "NO_LEADER", "{status:?}");
}
