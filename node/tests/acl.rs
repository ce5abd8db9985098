//! ACL tokens on the public port, with real processes: every public method
//! (enumerated from the service descriptors, so new ones are covered) is
//! refused without a token; prefix policies decide key access; a deleted
//! token stops working; each token has its own rate budget; and no token
//! secret ends up in a log, a metric, the audit log, the data dirs or a
//! snapshot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use prost::Message as _;
use tonic::Code;
use tonic::transport::Channel;

/// Every `/cell0.v1.Service/Method` of the public API.
fn public_methods() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(cell0_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in set.file.iter().filter(|f| f.package() == "cell0.v1") {
        for service in &file.service {
            for method in &service.method {
                out.push(format!("/cell0.v1.{}/{}", service.name(), method.name()));
            }
        }
    }
    assert!(out.len() > 30, "{out:?}");
    out
}

/// Calls `path` with an empty request message, with `token` if given; the
/// code it ends with (a stream that keeps going ends with the deadline).
async fn call(channel: &Channel, path: &str, token: Option<&str>) -> (Code, String) {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    request.set_timeout(Duration::from_secs(3));
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    // A stream that was let in (a watch) keeps going: bounded here.
    match tokio::time::timeout(
        Duration::from_secs(5),
        grpc.unary(request, path.parse().unwrap(), codec),
    )
    .await
    {
        Ok(Ok(_)) => (Code::Ok, String::new()),
        Ok(Err(s)) => (s.code(), s.message().to_string()),
        Err(_) => (Code::DeadlineExceeded, "still streaming".into()),
    }
}

/// Runs the CLI against `endpoint` with `token` in CELL0_TOKEN.
fn cli_as(endpoint: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = std::process::Command::new(bin());
    c.args(args).args(["--endpoint", endpoint]).env_remove("CELL0_TOKEN");
    if let Some(t) = token {
        c.env("CELL0_TOKEN", t);
    }
    c.output().expect("run cell0 CLI")
}

/// The secret a token-printing command printed (`secret:   c0....`).
fn secret_of(out: &Output) -> String {
    assert!(out.status.success(), "{}{}", stdout(out), stderr(out));
    stdout(out)
        .lines()
        .find_map(|l| l.strip_prefix("secret:").map(|s| s.trim().to_string()))
        .unwrap_or_else(|| panic!("no secret in {}", stdout(out)))
}

fn accessor_of(out: &Output) -> String {
    stdout(out)
        .lines()
        .find_map(|l| l.strip_prefix("accessor:").map(|s| s.trim().to_string()))
        .unwrap()
}

/// Whether any file under `dir` contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

fn start_acl_cluster(root: &Path, extra: &[&str]) -> Vec<Node> {
    let flags = |first: bool, seed: Option<String>| {
        let mut f: Vec<String> = ["--acl", "--audit"].map(String::from).to_vec();
        f.extend(extra.iter().map(|s| s.to_string()));
        match seed {
            // With ACLs on, joins go to the internal port (the public
            // Cluster/Join needs an operator token).
            Some(s) => f.extend(["--join".to_string(), s]),
            None if first => f.push("--bootstrap".to_string()),
            None => {}
        }
        f
    };
    let first = Node::start_flags("node1", &root.join("node1"), Ports::new(), flags(true, None), &[]);
    let seed = first.ports.addr(first.ports.internal);
    let mut nodes = vec![first];
    for i in 2..=3 {
        nodes.push(Node::start_flags(
            &format!("node{i}"),
            &root.join(format!("node{i}")),
            Ports::new(),
            flags(false, Some(seed.clone())),
            &[],
        ));
    }
    for n in nodes.iter_mut() {
        n.wait_ready();
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_policies_guard_every_method_and_no_secret_leaks() {
    let root = tempfile::tempdir().unwrap();
    let nodes = start_acl_cluster(root.path(), &[]);
    let [e1, e2, e3] = [0, 1, 2].map(|i| nodes[i].endpoint());
    let ch2 = channel(&e2).await;

    // Before bootstrap, a call without a token is told how to start.
    let (code, message) = call(&ch2, "/cell0.v1.Kv/Put", None).await;
    assert_eq!(code, Code::Unauthenticated);
    assert!(message.contains("cell0 acl bootstrap"), "{message}");

    let boot = cli_as(&e3, None, &["acl", "bootstrap"]);
    let management = secret_of(&boot);
    let again = cli_as(&e1, None, &["acl", "bootstrap"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("bootstrapped already"), "{}", stderr(&again));

    // Every public method but bootstrap is refused without a token, or with
    // a malformed or unknown one; health checks stay open.
    let unknown =
        "c0.00000000000000000000000000000000.0000000000000000000000000000000000000000000000000000000000000000";
    for path in public_methods().iter().filter(|p| !p.ends_with(".Acl/Bootstrap")) {
        for token in [None, Some("c0.nope"), Some(unknown)] {
            let (code, message) = call(&ch2, path, token).await;
            assert_eq!(code, Code::Unauthenticated, "{path} with {token:?}: {message}");
        }
    }
    let (code, _) = call(&ch2, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None).await;
    assert_eq!(code, Code::Unauthenticated, "reflection needs a token too");
    let (code, message) = call(&ch2, "/grpc.health.v1.Health/Check", None).await;
    assert_eq!(code, Code::Ok, "{message}");
    // The management token passes the gate of every method (what the empty
    // request then does is the method's business).
    for path in public_methods() {
        let (code, message) = call(&ch2, &path, Some(&management)).await;
        assert!(
            !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
            "{path}: {code:?} {message}"
        );
    }

    // A policy: write under app/, nothing under app/secret/, read elsewhere.
    let set = cli_as(
        &e1,
        Some(&management),
        &[
            "acl",
            "policy",
            "set",
            "app",
            "--rule",
            "kv:app/=write",
            "--rule",
            "kv:app/secret/=deny",
            "--rule",
            "kv=read",
        ],
    );
    assert!(set.status.success(), "{}", stderr(&set));
    let created = cli_as(
        &e1,
        Some(&management),
        &["acl", "token", "create", "--policy", "app", "--description", "app"],
    );
    let app = secret_of(&created);
    let app_accessor = accessor_of(&created);
    let missing = cli_as(&e1, Some(&management), &["acl", "token", "create", "--policy", "nope"]);
    assert!(
        stderr(&missing).contains("ACL_POLICY_NOT_FOUND"),
        "{}",
        stderr(&missing)
    );

    // Made through node1, usable at once on node3.
    let ok = |o: &Output| assert!(o.status.success(), "{}{}", stdout(o), stderr(o));
    let denied = |o: &Output| {
        assert!(!o.status.success(), "{}", stdout(o));
        assert!(
            stderr(o).contains("permission denied (PERMISSION_DENIED)"),
            "{}",
            stderr(o)
        );
    };
    ok(&cli_as(&e3, Some(&app), &["kv", "put", "app/x", "value-not-in-audit"]));
    denied(&cli_as(&e3, Some(&app), &["kv", "put", "other/x", "v"]));
    ok(&cli_as(&e3, Some(&management), &["kv", "put", "other/x", "v"]));
    ok(&cli_as(&e3, Some(&app), &["kv", "get", "other/x"]));
    denied(&cli_as(&e3, Some(&app), &["kv", "get", "app/secret/k"]));
    denied(&cli_as(&e3, Some(&app), &["kv", "ls", "app/"]));
    ok(&cli_as(&e3, Some(&app), &["kv", "ls", "app/x"]));
    denied(&cli_as(&e3, Some(&app), &["agent", "ls"]));
    denied(&cli_as(&e3, Some(&app), &["acl", "token", "ls"]));
    denied(&cli_as(&e3, Some(&app), &["remove", "1"]));
    let whoami = cli_as(&e2, Some(&app), &["acl", "whoami"]);
    ok(&whoami);
    assert!(stdout(&whoami).contains(&app_accessor), "{}", stdout(&whoami));
    let listed = cli_as(&e2, Some(&management), &["acl", "token", "ls", "-o", "json"]);
    ok(&listed);
    assert!(stdout(&listed).contains(&app_accessor));

    // A snapshot, then the token is deleted: it stops working everywhere.
    let snapshot = root.path().join("state.snap");
    ok(&cli_as(
        &e1,
        Some(&management),
        &["snapshot", "save", snapshot.to_str().unwrap()],
    ));
    ok(&cli_as(&e1, Some(&management), &["acl", "token", "rm", &app_accessor]));
    for e in [&e1, &e2, &e3] {
        let o = cli_as(e, Some(&app), &["kv", "get", "other/x"]);
        assert!(stderr(&o).contains("TOKEN_UNKNOWN"), "{e}: {}", stderr(&o));
    }

    // The audit log has the write (key, never the value) and the denials.
    let audit = std::fs::read_to_string(root.path().join("node3/audit/audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let principal = format!("token:{app_accessor}");
    assert!(
        lines.iter().any(|l| l["method"] == "/cell0.v1.Kv/Put"
            && l["result"] == "OK"
            && l["principal"] == principal.as_str()
            && l["target"] == "key \"app/x\""),
        "{audit}"
    );
    assert!(
        lines.iter().any(|l| l["method"] == "/cell0.v1.Kv/Put"
            && l["result"] == "PERMISSION_DENIED"
            && l["target"] == "key \"other/x\""),
        "{audit}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["trace_id"].as_str().is_some_and(|t| t.len() == 16))
    );
    assert!(!audit.contains("value-not-in-audit"));

    // No secret anywhere: data dirs (Raft log, state, snapshots), logs,
    // audit logs, the saved snapshot, the metrics.
    let mut metrics = String::new();
    for n in &nodes {
        metrics.push_str(&n.http_get("/metrics").unwrap().1);
    }
    for secret in [&management, &app] {
        let hex = secret.rsplit('.').next().unwrap();
        assert_eq!(
            files_containing(root.path(), hex.as_bytes()),
            Vec::<String>::new(),
            "secret in files"
        );
        assert!(!metrics.contains(hex));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_its_rate_is_refused_while_another_keeps_its_budget() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("node1");
    let flags = ["--bootstrap", "--acl", "--token-rate", "1"].map(String::from).to_vec();
    let mut node = Node::start_flags("node1", &dir, Ports::new(), flags, &[]);
    node.wait_ready();
    let endpoint = node.endpoint();
    let management = secret_of(&cli_as(&endpoint, None, &["acl", "bootstrap"]));
    assert!(
        cli_as(
            &endpoint,
            Some(&management),
            &["acl", "policy", "set", "status", "--rule", "nodes=read"]
        )
        .status
        .success()
    );
    let a = secret_of(&cli_as(
        &endpoint,
        Some(&management),
        &["acl", "token", "create", "--policy", "status"],
    ));
    let b = secret_of(&cli_as(
        &endpoint,
        Some(&management),
        &["acl", "token", "create", "--policy", "status"],
    ));

    // The management token is not limited: it made the three above.
    // One request per second per token, a burst of one: of ten quick
    // requests with a, the first passes and later ones are refused (unless
    // seconds pass between them, which the count allows for).
    let ch = channel(&endpoint).await;
    let started = std::time::Instant::now();
    let mut passed = 0;
    let mut refused = None;
    for _ in 0..10 {
        match call(&ch, "/cell0.v1.Cluster/Status", Some(&a)).await {
            (Code::Ok, _) => passed += 1,
            (code, message) => refused = Some((code, message)),
        }
    }
    let allowed = 1 + started.elapsed().as_secs() as usize;
    assert!(passed <= allowed, "{passed} passed, at most {allowed} allowed");
    let (code, message) = refused.expect("no request was refused");
    assert_eq!(code, Code::ResourceExhausted);
    assert!(message.contains("from one token"), "{message}");
    // b has its own bucket, full: served from the same connection.
    assert_eq!(call(&ch, "/cell0.v1.Cluster/Status", Some(&b)).await.0, Code::Ok);
}
