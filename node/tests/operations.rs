//! Operator commands against real processes: `cell0 doctor` passes on a
//! healthy cluster and names each problem on a broken one (a node down, a
//! port taken, a nearly full disk); `cell0 node leave` removes a node
//! gracefully, and the node is added again when it starts with --join;
//! `cell0 bench disk` measures synced writes and leaves nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::process::Command;

use common::*;
use serde_json::Value;

/// `cell0 doctor --output json` with `flags`: its exit success and findings.
fn doctor(flags: &[String]) -> (bool, Vec<Value>) {
    let mut args = vec!["doctor".to_string(), "--output".into(), "json".into()];
    args.extend(flags.iter().cloned());
    let out = Command::new(bin()).args(&args).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}\n{}", stdout(&out), stderr(&out)));
    let findings = report["findings"].as_array().unwrap().clone();
    (out.status.success(), findings)
}

/// The findings with verdict `problem`.
fn problems(findings: &[Value]) -> Vec<&Value> {
    findings.iter().filter(|f| f["verdict"] == "problem").collect()
}

fn finding<'a>(findings: &'a [Value], check: &str) -> &'a Value {
    findings
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding in {findings:#?}"))
}

#[test]
fn doctor_passes_on_a_healthy_cluster_and_names_a_node_that_is_down() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(root.path(), 3);
    let (passed, findings) = doctor(&nodes[0].flags());
    // A machine whose own disk is short of space makes the disk check fail;
    // every other check must pass on a healthy cluster.
    let others: Vec<_> = problems(&findings)
        .into_iter()
        .filter(|f| f["check"] != "disk")
        .collect();
    assert!(others.is_empty(), "{findings:#?}");
    assert_eq!(passed, problems(&findings).is_empty(), "{findings:#?}");
    for check in [
        "config",
        "port public",
        "port internal",
        "port http",
        "data dir",
        "inference",
        "cluster",
        "clock",
    ] {
        assert_ne!(
            finding(&findings, check)["verdict"],
            "skipped",
            "{check}: {findings:#?}"
        );
    }
    for n in ["node1", "node2", "node3"] {
        assert_eq!(
            finding(&findings, &format!("member {n}"))["verdict"],
            "ok",
            "{findings:#?}"
        );
    }

    nodes[2].kill9();
    let (passed, findings) = doctor(&nodes[0].flags());
    assert!(!passed, "{findings:#?}");
    let down = finding(&findings, "member node3");
    assert_eq!(down["verdict"], "problem", "{findings:#?}");
    assert!(down["detail"].as_str().unwrap().contains("does not answer"), "{down}");
    assert!(down["fix"].as_str().unwrap().contains("cell0 remove"), "{down}");
}

#[test]
fn doctor_names_a_port_another_program_holds_before_the_node_starts() {
    let root = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let flags = run_flags("node1", &root.path().join("node1"), ports, &["--bootstrap".to_string()]);
    let (passed, findings) = doctor(&flags);
    assert_eq!(finding(&findings, "port public")["verdict"], "ok", "{findings:#?}");
    assert_eq!(finding(&findings, "node")["verdict"], "skipped", "{findings:#?}");
    assert!(
        finding(&findings, "data dir")["detail"]
            .as_str()
            .unwrap()
            .contains("does not exist yet")
    );
    assert_eq!(passed, problems(&findings).is_empty());

    let _taken = TcpListener::bind(ports.endpoint()).unwrap();
    let (passed, findings) = doctor(&flags);
    assert!(!passed, "{findings:#?}");
    let port = finding(&findings, "port public");
    assert_eq!(port["verdict"], "problem", "{findings:#?}");
    assert!(
        port["detail"].as_str().unwrap().contains("in use by another program"),
        "{port}"
    );
    assert!(port["fix"].as_str().unwrap().contains("--listen-public"), "{port}");
    assert_eq!(finding(&findings, "port internal")["verdict"], "ok", "{findings:#?}");

    // The table names the problem and its fix for people.
    let mut args = vec!["doctor".to_string()];
    args.extend(flags);
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("PROBLEM") && text.contains("fix: find it with `ss -ltnp"),
        "{text}"
    );
    // (A machine short of disk space adds the disk check's problem.)
    assert!(stderr(&out).contains("doctor found"), "{}", stderr(&out));
}

/// A small tmpfs mounted for the test, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path) -> Option<SmallDisk> {
        if !cell0_chaos::lab::is_root() {
            eprintln!("skipped: mounting a small filesystem needs root");
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", stderr(&out));
        Some(SmallDisk(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn bench_disk_measures_each_way_and_removes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let out = cli(&["bench", "disk", "--dir", path, "--writes", "20", "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let ways: Vec<&str> = report["ways"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            assert_eq!(w["writes"], 20, "{w}");
            assert!(w["p50_ms"].as_f64().unwrap() > 0.0, "{w}");
            assert!(w["max_ms"].as_f64().unwrap() >= w["p50_ms"].as_f64().unwrap(), "{w}");
            w["way"].as_str().unwrap()
        })
        .collect();
    assert_eq!(ways, ["file append", "file overwrite", "rocksdb log row"]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "files left behind");

    let out = cli(&["bench", "disk", "--dir", path, "--writes", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--writes must be 1 to"), "{}", stderr(&out));
    let missing = dir.path().join("absent");
    let out = cli(&["bench", "disk", "--dir", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--dir"), "{}", stderr(&out));
}

#[test]
fn bench_apply_applies_the_puts_it_reports_and_removes_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let args = ["--keys", "500", "--batch", "10", "--entries", "120", "--output", "json"];
    let out = cli(&[&["bench", "apply", "--dir", path][..], &args[..]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["puts"], 1200, "{report}");
    assert_eq!(
        (report["keys"].clone(), report["batch"].clone()),
        (500.into(), 10.into())
    );
    assert!(report["apply_us_per_put"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["cpu_us_per_put"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "files left behind");

    let out = cli(&["bench", "apply", "--dir", path, "--batch", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--batch must be 1 to"), "{}", stderr(&out));
}

#[test]
fn doctor_names_a_nearly_full_disk() {
    let root = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&root.path().join("small")) else {
        return;
    };
    let data = disk.0.join("node1");
    std::fs::create_dir(&data).unwrap();
    let flags = run_flags("node1", &data, Ports::new(), &["--bootstrap".to_string()]);
    let (passed, findings) = doctor(&flags);
    assert!(!passed, "{findings:#?}");
    let disk_finding = finding(&findings, "disk");
    assert_eq!(disk_finding["verdict"], "problem", "{findings:#?}");
    assert!(
        disk_finding["detail"].as_str().unwrap().contains("MiB free of 16 MiB"),
        "{disk_finding}"
    );
    assert_eq!(finding(&findings, "data dir")["verdict"], "ok", "{findings:#?}");
}

async fn member_ids(endpoint: &str) -> Vec<u64> {
    members(endpoint)
        .await
        .into_iter()
        .filter(|m| !m.gossip_only)
        .map(|m| m.id)
        .collect()
}

/// Node `id` as `cell0 node ls` lists it through `endpoint`.
fn node_state(endpoint: &str, id: u64) -> Option<Value> {
    let out = cli(&["--endpoint", endpoint, "node", "ls", "--output", "json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == format!("{id:016x}"))
        .cloned()
}

#[test]
fn a_node_leaves_gracefully_and_is_added_again_when_it_starts_with_join() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(root.path(), 3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let id2 = rt.block_on(status(&nodes[1].endpoint())).node_id;

    let out = cli(&["--endpoint", &nodes[1].endpoint(), "node", "leave"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("left the cluster"), "{}", stderr(&out));
    assert!(!rt.block_on(member_ids(&nodes[0].endpoint())).contains(&id2));
    rt.block_on(put(&nodes[0].endpoint(), "after-leave", "1")).unwrap();
    // Its leave drained it first.
    let left = node_state(&nodes[0].endpoint(), id2).expect("the node that left is still listed");
    assert_eq!(left["state"], "draining", "{left}");
    assert!(left["reason"].as_str().unwrap().contains("cell0 node leave"), "{left}");
    // Doctor on the node that left says so, from the leader's view.
    let (passed, findings) = doctor(&nodes[1].flags());
    assert!(!passed, "{findings:#?}");
    let cluster = finding(&findings, "cluster");
    assert!(
        cluster["detail"].as_str().unwrap().contains("not a member"),
        "{cluster}"
    );
    // Asked again, the leader says the node is no longer a member.
    let again = cli(&["--endpoint", &nodes[1].endpoint(), "node", "leave"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("left already"), "{}", stderr(&again));

    // Stopped and started again with --join, it is added again and takes
    // agents again (its leave's drain ended).
    assert!(nodes[1].sigterm().success());
    let seed = nodes[0].endpoint();
    nodes[1].extra.extend(["--join".to_string(), seed]);
    nodes[1].restart();
    nodes[1].wait_ready();
    rt.block_on(wait_until("the node that left is a member again", async || {
        member_ids(&nodes[0].endpoint()).await.contains(&id2)
    }));
    rt.block_on(wait_until("the node that left is eligible again", async || {
        node_state(&nodes[0].endpoint(), id2).is_some_and(|n| n["state"] == "ready")
    }));
    assert_eq!(
        rt.block_on(get(&nodes[1].endpoint(), "after-leave", false)).as_deref(),
        Some(&b"1"[..])
    );

    // The leader leaves too; the others elect a new one and keep serving.
    let leader = rt.block_on(status(&nodes[0].endpoint())).leader_id;
    let leader_node = nodes
        .iter()
        .position(|n| rt.block_on(status(&n.endpoint())).node_id == leader)
        .unwrap();
    let out = cli(&["--endpoint", &nodes[leader_node].endpoint(), "node", "leave"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let other = nodes[(leader_node + 1) % 3].endpoint();
    rt.block_on(wait_until("the rest write after the leader left", async || {
        put(&other, "after-leader-left", "1").await.is_ok()
    }));
    assert!(!rt.block_on(member_ids(&other)).contains(&leader));
}

#[test]
fn the_only_voter_refuses_to_leave() {
    let root = tempfile::tempdir().unwrap();
    let nodes = start_cluster(root.path(), 1);
    let out = cli(&["--endpoint", &nodes[0].endpoint(), "node", "leave"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("only voter"), "{}", stderr(&out));
}
