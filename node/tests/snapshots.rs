//! Backups, restores and snapshot crash safety with the `cell0` binary:
//! real processes on loopback, used through the CLI and the public API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "CLI failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", stdout(o)))
}

/// A config file that snapshots every 20 entries, keeps no log behind the
/// snapshot, and sends snapshots in 64 KiB chunks: a new member must catch
/// up by a snapshot of many chunks.
fn snapshot_config(root: &Path) -> Vec<String> {
    let path = root.join("cell0.toml");
    std::fs::write(
        &path,
        "[raft]\nsnapshot_every = 20\nsnapshot_log_percent = 0\nkeep_logs_after_snapshot = 0\nsnapshot_chunk_bytes = 65536\n",
    )
    .unwrap();
    vec!["--config".into(), path.display().to_string()]
}

fn value(i: usize, size: usize) -> String {
    format!("{i:06}").repeat(size / 6)
}

/// Waits until the node at `endpoint` has applied `index`.
async fn wait_applied(endpoint: &str, index: u64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if status(endpoint).await.applied_index >= index {
            return;
        }
        assert!(Instant::now() < deadline, "{endpoint} did not reach index {index}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_snapshot_restores_into_a_new_cluster_and_damaged_files_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let nodes = start_cluster(root.path(), 3);
    for i in 0..200 {
        put(&nodes[i % 3].endpoint(), &format!("k{i:03}"), &value(i, 600))
            .await
            .unwrap();
    }
    let file = root.path().join("backup.snap");
    let file_arg = file.display().to_string();
    let saved = json(&cli(&[
        "snapshot",
        "save",
        &file_arg,
        "--endpoint",
        &nodes[1].endpoint(),
        "--output",
        "json",
    ]));
    assert!(saved["index"].as_u64().unwrap() > 0, "{saved}");
    assert!(saved["rows"].as_u64().unwrap() >= 200, "{saved}");
    let inspected = json(&cli(&["snapshot", "inspect", &file_arg, "--output", "json"]));
    assert_eq!(inspected["sha256"], saved["sha256"]);
    assert_eq!(inspected["cluster_id"], saved["cluster_id"]);
    // Saving over an existing file is refused.
    let again = cli(&["snapshot", "save", &file_arg, "--endpoint", &nodes[0].endpoint()]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already exists"), "{}", stderr(&again));

    // Damaged and truncated copies are refused by inspect and restore.
    let bytes = std::fs::read(&file).unwrap();
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x10;
    for (name, content, says) in [
        ("damaged.snap", damaged, "refused"),
        ("short.snap", bytes[..bytes.len() - 10].to_vec(), "truncated"),
    ] {
        let path = root.path().join(name);
        std::fs::write(&path, content).unwrap();
        let path = path.display().to_string();
        let out = cli(&["snapshot", "inspect", &path]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(says), "{name}: {}", stderr(&out));
        let dir = root.path().join(format!("{name}.restored")).display().to_string();
        let out = cli(&["snapshot", "restore", &path, "--data-dir", &dir]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(says), "{name}: {}", stderr(&out));
    }

    // The old cluster goes away; the restored node serves its data alone.
    let old_dir = nodes[1].dir.display().to_string();
    drop(nodes);
    // Disaster recovery's dry run reports the survivor's log and changes nothing.
    let dry = json(&cli(&[
        "operator",
        "recover",
        "--data-dir",
        &old_dir,
        "--dry-run",
        "--output",
        "json",
    ]));
    assert!(
        dry["kept_last_index"].as_u64().unwrap() >= saved["index"].as_u64().unwrap(),
        "{dry}"
    );
    assert_eq!(dry["removed"].as_array().map(Vec::len), Some(2), "{dry}");
    let ports = Ports::new();
    let dir = root.path().join("restored");
    let restored = json(&cli(&[
        "snapshot",
        "restore",
        &file_arg,
        "--data-dir",
        &dir.display().to_string(),
        "--name",
        "restored",
        "--listen-public",
        &ports.addr(ports.public),
        "--listen-internal",
        &ports.addr(ports.internal),
        "--listen-http",
        &ports.addr(ports.http),
        "--output",
        "json",
    ]));
    assert_ne!(restored["cluster_id"], saved["cluster_id"]);
    assert_eq!(restored["previous_cluster_id"], saved["cluster_id"]);
    let mut node = Node::start("restored", &dir, ports, None);
    node.wait_ready();
    for i in (0..200).step_by(17) {
        assert_eq!(
            get(&node.endpoint(), &format!("k{i:03}"), false).await,
            Some(value(i, 600).into_bytes())
        );
    }
    put(&node.endpoint(), "after", "restore").await.unwrap();
    let members = json(&cli(&["members", "--endpoint", &node.endpoint(), "--output", "json"]));
    assert_eq!(members.as_array().map(Vec::len), Some(1), "{members}");
}

/// Starts a fourth node that must catch up by snapshot and crashes at
/// `crash_at` (`CELL0_CRASH_AT`), then restarts it and checks it catches up.
async fn crash_while_catching_up(crash_at: &str) {
    let root = tempfile::tempdir().unwrap();
    let config = snapshot_config(root.path());
    let nodes = start_cluster_with(root.path(), 3, &config);
    // One write per entry, about 6 MiB in all.
    for i in 0..400 {
        put(&nodes[0].endpoint(), &format!("k{i:03}"), &value(i, 16 * 1024))
            .await
            .unwrap();
    }
    let target = status(&nodes[0].endpoint()).await.commit_index;

    let mut fourth = Node::start_with(
        "node4",
        &root.path().join("node4"),
        Ports::new(),
        Some(nodes[0].endpoint()),
        config.clone(),
        &[("CELL0_CRASH_AT", crash_at)],
    );
    let status_code = wait_exit(&mut fourth.child, DEADLINE);
    assert!(!status_code.success(), "node4 should have crashed at {crash_at}");
    assert!(fourth.log().contains("crashing at"), "{}", fourth.log());

    fourth.restart();
    fourth.wait_ready();
    wait_applied(&fourth.endpoint(), target).await;
    for i in (0..400).step_by(37) {
        assert_eq!(
            get(&fourth.endpoint(), &format!("k{i:03}"), true).await,
            Some(value(i, 16 * 1024).into_bytes()),
            "key {i} on the restarted node"
        );
    }
    // Nothing of the interrupted attempt is left behind, once transfers
    // still in flight have ended.
    let snapshots = root.path().join("node4").join("raft").join("snapshots");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let files: Vec<String> = std::fs::read_dir(&snapshots)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        if files.iter().all(|f| f.ends_with(".snap")) {
            break;
        }
        assert!(Instant::now() < deadline, "{files:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_receiving_a_snapshot_restarts_and_catches_up() {
    crash_while_catching_up("snapshot-receive:1000000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_installing_a_snapshot_restarts_and_catches_up() {
    crash_while_catching_up("snapshot-load:1").await;
}

/// Peak resident memory allowed to any node while a new member catches up
/// (the state-at-scale bound; the full 2 GB run is `scripts/bench-snapshot.sh`).
const RSS_LIMIT_BYTES: u64 = 512 << 20;

/// Peak resident memory of process `pid` since it started, from
/// `/proc/PID/status` (`VmHWM`).
fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Every pair on the node at `endpoint`, page by page, as a client sees it.
async fn all_pairs(endpoint: &str, consistency: cell0_proto::v1::Consistency) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut client = kv(endpoint).await;
    let mut pairs = Vec::new();
    let mut start_after = Vec::new();
    loop {
        let page = client
            .range(cell0_proto::v1::RangeRequest {
                start_after: start_after.clone().into(),
                consistency: consistency as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pairs.extend(page.kvs.iter().map(|kv| (kv.key.to_vec(), kv.value.to_vec())));
        match (page.more, page.kvs.last()) {
            (true, Some(last)) => start_after = last.key.to_vec(),
            _ => return pairs,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_catches_up_by_snapshot_within_the_memory_bound_and_holds_the_same_state() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("cell0.toml");
    std::fs::write(
        &path,
        "[raft]\nsnapshot_every = 64\nsnapshot_log_percent = 0\nkeep_logs_after_snapshot = 0\n",
    )
    .unwrap();
    let config = vec!["--config".to_string(), path.display().to_string()];
    let nodes = start_cluster_with(root.path(), 3, &config);
    // 48 MiB of values, written by 8 clients.
    const KEYS: usize = 768;
    const VALUE: usize = 64 * 1024;
    let endpoint = nodes[0].endpoint();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                for i in (w..KEYS).step_by(8) {
                    // On a machine busy with other tests a 64 KiB write can
                    // miss the commit deadline; the same put is safe to send
                    // again, and the state is compared at the end.
                    let deadline = Instant::now() + DEADLINE;
                    while let Err(e) = put(&endpoint, &format!("k{i:04}"), &value(i, VALUE)).await {
                        let retriable = matches!(
                            e.code(),
                            tonic::Code::Unknown
                                | tonic::Code::Unavailable
                                | tonic::Code::Cancelled
                                | tonic::Code::DeadlineExceeded
                        );
                        assert!(retriable && Instant::now() < deadline, "put k{i:04}: {e}");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let target = status(&endpoint).await.commit_index;
    // The leader groups concurrent puts, at most 8 (one per writer) in an
    // entry: 768 puts are at least 96 entries, so every node built a
    // snapshot (and purged the log it covers) before the new member joins.
    let deadline = Instant::now() + DEADLINE;
    while !nodes.iter().all(|n| n.log().contains("built snapshot")) {
        assert!(Instant::now() < deadline, "no snapshot built: {}", nodes[0].log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let fourth = Node::start_with(
        "node4",
        &root.path().join("node4"),
        Ports::new(),
        Some(endpoint.clone()),
        config.clone(),
        &[],
    );
    let deadline = Instant::now() + DEADLINE;
    while !(fourth.is_ready() && status(&fourth.endpoint()).await.applied_index >= target) {
        assert!(
            Instant::now() < deadline,
            "node4 did not catch up: {}\nnode1 (the writes' node): {}",
            fourth.log(),
            nodes[0].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fourth.log().contains("installed snapshot"),
        "node4 caught up by a snapshot: {}\nnode1: {}",
        fourth.log(),
        nodes[0].log()
    );
    for (i, node) in nodes.iter().chain([&fourth]).enumerate() {
        let peak = peak_rss_bytes(node.child.id()).expect("the node runs");
        assert!(peak < RSS_LIMIT_BYTES, "node{} peaked at {} MiB", i + 1, peak >> 20);
    }
    let on_leader = all_pairs(&endpoint, cell0_proto::v1::Consistency::Linearizable).await;
    assert_eq!(on_leader.len(), KEYS);
    assert!(
        all_pairs(&fourth.endpoint(), cell0_proto::v1::Consistency::Serializable).await == on_leader,
        "node4 holds exactly the leader's pairs"
    );
}
