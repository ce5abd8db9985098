//! Site links between real processes: two sites (each its own cluster)
//! linked with `--join-wan` list each other in `cell0 site ls` and serve
//! calls for each other (`--site`); a site killed with -9 turns
//! unreachable (calls for it fail naming it) and heals when it restarts;
//! a node
//! with a certificate of another CA is refused and says why; a node whose
//! certificate names another site does not start. An agent with memory and
//! tasks is handed off to another site while tasks keep arriving, and again
//! with the target and then the source crashing mid-handoff: every time
//! exactly one site owns it, the target has all of its memory, and every
//! task has exactly one committed result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use std::time::{Duration, Instant};

use cell0_proto::v1::agents_client::AgentsClient;
use cell0_proto::v1::sites_client::SitesClient;
use cell0_proto::v1::tasks_client::TasksClient;
use cell0_proto::v1::{self, SiteStatus};
use cell0_tls::{CaFiles, NodeFiles, Validity};
use common::*;

/// The federation port of every test node.
const WAN: u16 = 7104;

fn ca(dir: &Path) -> CaFiles {
    test_ca(dir)
}

fn cert(ca: &CaFiles, dir: &Path, node: &str, site: &str) -> NodeFiles {
    test_cert(ca, dir, node, site, Validity::days(30).unwrap())
}

/// The flags of a one-node site `site` with site links, linking to
/// `join_wan` if given.
fn site_flags(ca: &CaFiles, node: &NodeFiles, site: &str, ports: Ports, join_wan: Option<&str>) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--bootstrap",
        "--site",
        site,
        "--tls-ca",
        ca.cert.to_str().unwrap(),
        "--tls-cert",
        node.cert.to_str().unwrap(),
        "--tls-key",
        node.key.to_str().unwrap(),
        "--listen-wan",
        &ports.addr(WAN),
    ]
    .map(String::from)
    .to_vec();
    if let Some(j) = join_wan {
        flags.extend(["--join-wan".to_string(), j.to_string()]);
    }
    flags
}

/// Starts `name`, a one-node site `site` in `root`, with `cert` from `ca`,
/// linking to `join_wan` if given.
fn start_site(
    root: &Path,
    name: &str,
    ca: &CaFiles,
    cert: &NodeFiles,
    site: &str,
    join_wan: Option<&str>,
) -> (Node, Ports) {
    let ports = Ports::new();
    let node = Node::start_flags(
        name,
        &root.join(name),
        ports,
        site_flags(ca, cert, site, ports, join_wan),
        &[],
    );
    (node, ports)
}

/// The sites the node at `endpoint` lists, by name: (status, leader name).
async fn sites(endpoint: &str) -> Vec<(String, i32, String)> {
    let Ok(mut client) = SitesClient::connect(format!("http://{endpoint}")).await else {
        return Vec::new();
    };
    match client.list(v1::ListSitesRequest {}).await {
        Ok(r) => r
            .into_inner()
            .sites
            .into_iter()
            .map(|s| (s.name, s.status, s.leader_name))
            .collect(),
        Err(_) => Vec::new(),
    }
}

async fn status_of(endpoint: &str, site: &str) -> Option<i32> {
    sites(endpoint)
        .await
        .into_iter()
        .find(|(name, _, _)| name == site)
        .map(|(_, status, _)| status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_sites_list_each_other_and_a_killed_site_turns_unreachable_then_heals() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let cluster_ca = ca(&certs);
    let a_cert = cert(&cluster_ca, &certs, "a1", "a");
    let b_cert = cert(&cluster_ca, &certs, "b1", "b");
    let (mut a, pa) = start_site(root.path(), "a1", &cluster_ca, &a_cert, "a", None);
    let wan_a = pa.addr(WAN);
    let (mut b, _) = start_site(root.path(), "b1", &cluster_ca, &b_cert, "b", Some(&wan_a));
    a.wait_ready();
    b.wait_ready();

    let alive = SiteStatus::Alive as i32;
    wait_until("each site lists the other alive with its leader", async || {
        sites(&a.endpoint()).await.contains(&("b".into(), alive, "b1".into()))
            && sites(&b.endpoint()).await.contains(&("a".into(), alive, "a1".into()))
    })
    .await;
    // The node's own site comes first, listed as local.
    let own = sites(&a.endpoint()).await;
    assert_eq!(own[0], ("a".into(), SiteStatus::Local as i32, "a1".into()), "{own:?}");
    let out = cli(&["--endpoint", &a.endpoint(), "--output", "json", "site", "ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let b_row = listed.as_array().unwrap().iter().find(|s| s["name"] == "b").unwrap();
    assert_eq!(b_row["status"], "alive", "{listed}");
    assert_eq!(b_row["nodes"], 1, "{listed}");

    // A call for site b through a node of site a is served by b.
    let a_endpoint = a.endpoint();
    let via_a = |args: &[&str]| {
        let mut all = vec!["--endpoint", a_endpoint.as_str(), "--site", "b"];
        all.extend_from_slice(args);
        cli(&all)
    };
    let out = via_a(&["kv", "put", "greeting", "from-a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        get(&b.endpoint(), "greeting", false).await.as_deref(),
        Some(&b"from-a"[..])
    );
    assert_eq!(
        get(&a.endpoint(), "greeting", false).await,
        None,
        "not written in site a"
    );
    let out = via_a(&["kv", "get", "greeting"]);
    assert!(stdout(&out).contains("from-a"), "{}{}", stdout(&out), stderr(&out));
    let out = via_a(&["status", "--output", "json"]);
    assert!(
        stdout(&out).contains("\"b1\""),
        "status answered by b: {}",
        stdout(&out)
    );
    // Streams are not forwarded.
    let out = via_a(&["kv", "watch", "greeting"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only unary calls are forwarded"),
        "{}",
        stderr(&out)
    );

    // Site b dies: a keeps serving and lists b unreachable; calls for b
    // fail at once, naming it.
    b.kill9();
    wait_until("a lists b unreachable", async || {
        status_of(&a.endpoint(), "b").await == Some(SiteStatus::Unreachable as i32)
    })
    .await;
    put(&a.endpoint(), "k", "written while b is down").await.unwrap();
    let out = via_a(&["kv", "get", "greeting"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("site \"b\" is unreachable"), "{}", stderr(&out));

    // b restarts on its data dir and links again.
    b.restart();
    b.wait_ready();
    wait_until("b is alive again from a", async || {
        status_of(&a.endpoint(), "b").await == Some(alive)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_ca_is_refused_and_a_certificate_for_another_site_does_not_start() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let cluster_ca = ca(&certs);
    let other_ca = ca(&root.path().join("other-ca"));
    let a_cert = cert(&cluster_ca, &certs, "a1", "a");
    let (mut a, pa) = start_site(root.path(), "a1", &cluster_ca, &a_cert, "a", None);
    a.wait_ready();

    // Another CA: its own cluster runs, but no site link forms.
    let foreign_cert = cert(&other_ca, &root.path().join("other-ca"), "c1", "c");
    let wan_a = pa.addr(WAN);
    let (mut c, _) = start_site(root.path(), "c1", &other_ca, &foreign_cert, "c", Some(&wan_a));
    c.wait_ready();
    wait_until("both ends log why the link failed", async || {
        c.log().contains("cannot link to the site gateway") && a.log().contains("refused a site link")
    })
    .await;
    assert_eq!(sites(&a.endpoint()).await.len(), 1, "a lists only itself");
    assert_eq!(sites(&c.endpoint()).await.len(), 1, "c lists only itself");

    // A certificate for site x on a node of site b: refused at start.
    let pb = Ports::new();
    let x_cert = cert(&cluster_ca, &certs, "b1", "x");
    let dir = root.path().join("b1");
    let mut args = vec!["run".to_string()];
    args.extend(run_flags(
        "b1",
        &dir,
        pb,
        &site_flags(&cluster_ca, &x_cert, "b", pb, None),
    ));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli(&args);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("certificate for site \"x\""), "{err}");
}

/// `cell0 agent migrate AGENT --to-site SITE` through `via`, with `extra`
/// flags.
fn migrate(via: &str, agent: &str, site: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--endpoint", via, "agent", "migrate", agent, "--to-site", site];
    args.extend_from_slice(extra);
    cli(&args)
}

/// Waits until the node of `endpoint` embeds with the test model.
async fn wait_model_ready(endpoint: &str) {
    wait_until("the node embeds with the model", async || {
        cli(&["--endpoint", endpoint, "infer", "embed", "ready?", "--model", "minilm"])
            .status
            .success()
    })
    .await;
}

/// Two one-node sites a and b, linked, each holding the test model, with
/// `env` on each first start.
async fn two_sites(root: &Path, a_env: &[(&str, &str)], b_env: &[(&str, &str)]) -> (Node, Node) {
    let certs = root.join("certs");
    let cluster_ca = ca(&certs);
    let a_cert = cert(&cluster_ca, &certs, "a1", "a");
    let b_cert = cert(&cluster_ca, &certs, "b1", "b");
    let pa = Ports::new();
    let mut a = Node::start_flags(
        "a1",
        &root.join("a1"),
        pa,
        site_flags(&cluster_ca, &a_cert, "a", pa, None),
        a_env,
    );
    let pb = Ports::new();
    let wan_a = pa.addr(WAN);
    let mut b = Node::start_flags(
        "b1",
        &root.join("b1"),
        pb,
        site_flags(&cluster_ca, &b_cert, "b", pb, Some(&wan_a)),
        b_env,
    );
    a.wait_ready();
    b.wait_ready();
    add_test_model(&a.endpoint());
    add_test_model(&b.endpoint());
    wait_model_ready(&a.endpoint()).await;
    wait_model_ready(&b.endpoint()).await;
    let alive = SiteStatus::Alive as i32;
    wait_until("the sites list each other alive", async || {
        status_of(&a.endpoint(), "b").await == Some(alive) && status_of(&b.endpoint(), "a").await == Some(alive)
    })
    .await;
    (a, b)
}

/// Runs inference agent `name` in the site of `endpoint`.
async fn run_memo(endpoint: &str, name: &str) {
    AgentsClient::new(channel(endpoint).await)
        .run(v1::RunAgentRequest {
            spec: Some(memo_spec(name, &[])),
        })
        .await
        .unwrap();
}

/// An inference agent `name` that may run in `sites`.
fn memo_spec(name: &str, sites: &[&str]) -> v1::AgentSpec {
    v1::AgentSpec {
        name: name.into(),
        resources: Some(v1::AgentResources {
            cpu_millis: 100,
            memory_mb: 64,
            gpu_memory_mb: 0,
        }),
        constraints: Some(v1::AgentConstraints {
            model: "minilm".into(),
            ..Default::default()
        }),
        kind: Some(v1::agent_spec::Kind::Inference(v1::InferenceConfig {})),
        sites: sites.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn remember(i: usize) -> (String, String) {
    (
        format!(r#"{{"op":"remember","key":"note-{i:03}","text":"note number {i}"}}"#),
        format!("remember-{i}"),
    )
}

/// Submits task `i` for `agent` through `endpoint`, retrying while the
/// agent is moving (UNAVAILABLE) until it is accepted; its id and the site
/// the id belongs to.
async fn submit_until_accepted(endpoint: &str, agent: &str, i: usize) -> (u64, String) {
    let (input, key) = remember(i);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut client = TasksClient::new(channel(endpoint).await);
        let answer = client
            .submit(v1::SubmitTaskRequest {
                agent: agent.into(),
                input: input.clone().into_bytes().into(),
                idempotency_key: key.clone(),
            })
            .await;
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                return (r.id, r.site);
            }
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                // Retrying is what a client does with UNAVAILABLE.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("task {i} was refused: {s:?}"),
        }
    }
}

/// Local view of `agent` at the site of `endpoint` (Agents/List is never
/// forwarded).
async fn local_agent(endpoint: &str, agent: &str) -> v1::AgentInfo {
    AgentsClient::new(channel(endpoint).await)
        .list(v1::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .find(|a| a.spec.as_ref().is_some_and(|s| s.name == agent))
        .expect("the agent is listed")
}

/// Checks that `agent` moved from a to b with tasks `0..n` (idempotency
/// keys `remember-i`; `a_ids` are ids that a gave some of them): b runs it,
/// a points to b, b has every memory entry, and every task has exactly one
/// result, succeeded, reachable through a.
async fn check_moved(a: &Node, b: &Node, agent: &str, n: usize, a_ids: &[u64]) {
    wait_until("site b runs the agent, asked through a", async || {
        let Ok(r) = AgentsClient::new(channel(&a.endpoint()).await)
            .get(v1::GetAgentRequest { name: agent.into() })
            .await
        else {
            return false;
        };
        let info = r.into_inner();
        info.handoff.is_some_and(|h| h.state == "arrived" && h.site == "a")
            && info.allocation.is_some_and(|al| al.status == "running")
    })
    .await;
    // Exactly one owner: a keeps a stopped record that points to b.
    let at_a = local_agent(&a.endpoint(), agent).await;
    assert_eq!(at_a.desired, "stopped", "{at_a:?}");
    assert_eq!(
        at_a.handoff.as_ref().map(|h| (h.state.as_str(), h.site.as_str())),
        Some(("moved", "b"))
    );
    assert!(
        at_a.allocation
            .is_none_or(|al| al.status != "running" && al.status != "pending")
    );
    let at_b = local_agent(&b.endpoint(), agent).await;
    assert_eq!(at_b.desired, "running");

    // Every task, asked for again through a, names one task at b, which
    // succeeded.
    let mut ids = Vec::new();
    for i in 0..n {
        let (id, site) = submit_until_accepted(&a.endpoint(), agent, i).await;
        assert_eq!(site, "b", "a sends the submission on to b");
        let task = TasksClient::new(channel(&b.endpoint()).await)
            .wait(v1::WaitTaskRequest { id, timeout_ms: 30_000 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(task.status, "succeeded", "task {i}: {task:?}");
        ids.push(task.id);
    }
    // An id a gave before the move is answered by b, through a.
    for &id in a_ids {
        let task = TasksClient::new(channel(&a.endpoint()).await)
            .wait(v1::WaitTaskRequest { id, timeout_ms: 30_000 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (task.site.as_str(), task.status.as_str()),
            ("b", "succeeded"),
            "{task:?}"
        );
        assert!(ids.contains(&task.id), "{task:?}");
    }
    let tasks = TasksClient::new(channel(&b.endpoint()).await)
        .list(v1::ListTasksRequest {
            agent: agent.into(),
            start_after: 0,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    for i in 0..n {
        let key = format!("remember-{i}");
        let with_key: Vec<_> = tasks.iter().filter(|t| t.idempotency_key == key).collect();
        assert_eq!(with_key.len(), 1, "task {key} at b: {with_key:?}");
        assert_eq!(with_key[0].status, "succeeded");
        assert!(ids.contains(&with_key[0].id));
    }
    assert_eq!(tasks.len(), n, "no task twice, none extra");
    // b has every memory entry, asked for through a.
    let memory = memory_of(&a.endpoint(), agent).await.unwrap();
    let keys: Vec<String> = memory.iter().map(|e| e.key.clone()).collect();
    let expected: Vec<String> = (0..n).map(|i| format!("note-{i:03}")).collect();
    assert_eq!(keys, expected);
    assert!(memory.iter().all(|e| e.embedding_dims == 384));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moves_to_another_site_with_its_memory_and_tasks_while_tasks_keep_arriving() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = two_sites(root.path(), &[], &[]).await;
    run_memo(&a.endpoint(), "memo").await;
    let mut at_a = Vec::new();
    for i in 0..15 {
        at_a.push(submit_until_accepted(&a.endpoint(), "memo", i).await.0);
    }
    wait_until("some notes are remembered in a", async || {
        memory_of(&a.endpoint(), "memo").await.is_ok_and(|m| !m.is_empty())
    })
    .await;
    // Tasks keep arriving through a while the agent moves.
    let endpoint = a.endpoint();
    let arriving = tokio::spawn(async move {
        for i in 15..30 {
            submit_until_accepted(&endpoint, "memo", i).await;
        }
    });
    let out = migrate(&a.endpoint(), "memo", "b", &["--wait", "120"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("is in site b now"), "{}", stderr(&out));
    arriving.await.unwrap();
    check_moved(&a, &b, "memo", 30, &at_a).await;

    // A name the target owns is not taken over: the move is aborted and
    // the agent keeps running where it was.
    run_memo(&a.endpoint(), "twin").await;
    run_memo(&b.endpoint(), "twin").await;
    let out = migrate(&a.endpoint(), "twin", "b", &["--wait", "60"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("aborted"), "{}", stderr(&out));
    wait_until("twin runs in a again", async || {
        let t = local_agent(&a.endpoint(), "twin").await;
        t.desired == "running" && t.handoff.is_none()
    })
    .await;

    // A spec naming sites is placed by the first that is reachable, through
    // that site's scheduler; it lives there.
    let mut agents_a = AgentsClient::new(channel(&a.endpoint()).await);
    agents_a
        .run(v1::RunAgentRequest {
            spec: Some(memo_spec("placed", &["nowhere", "b", "a"])),
        })
        .await
        .unwrap();
    let placed = local_agent(&b.endpoint(), "placed").await;
    assert_eq!(placed.spec.unwrap().sites, ["nowhere", "b", "a"]);
    let at_a = agents_a.get(v1::GetAgentRequest { name: "placed".into() }).await;
    assert_eq!(at_a.unwrap_err().code(), tonic::Code::NotFound, "it lives in b only");
    wait_until("b runs it", async || {
        local_agent(&b.endpoint(), "placed")
            .await
            .allocation
            .is_some_and(|al| al.status == "running")
    })
    .await;
    // It moves only to a site its spec names.
    let out = migrate(&b.endpoint(), "placed", "a", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = migrate(&a.endpoint(), "memo", "a", &[]);
    // Asked through a, which sends the call on to b, the site that owns it.
    assert!(
        out.status.success(),
        "memo has no sites: it may go anywhere: {}",
        stderr(&out)
    );
    wait_until("memo is back in a, with its memory", async || {
        let m = local_agent(&a.endpoint(), "memo").await;
        m.handoff.is_some_and(|h| h.state == "arrived" && h.site == "b")
            && m.allocation.is_some_and(|al| al.status == "running")
    })
    .await;
    let memory = memory_of(&a.endpoint(), "memo").await.unwrap();
    assert_eq!(memory.len(), 30);
    let pinned = agents_a
        .run(v1::RunAgentRequest {
            spec: Some(memo_spec("pinned", &["b"])),
        })
        .await;
    assert!(pinned.is_ok(), "{pinned:?}");
    let out = migrate(&b.endpoint(), "pinned", "a", &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("may run only in sites [\"b\"]"),
        "{}",
        stderr(&out)
    );
    let nowhere = agents_a
        .run(v1::RunAgentRequest {
            spec: Some(memo_spec("lost", &["nowhere"])),
        })
        .await
        .unwrap_err();
    assert_eq!(nowhere.code(), tonic::Code::Unavailable, "{nowhere:?}");
}

/// Waits until `node` exits, and checks it crashed on purpose.
fn wait_crash(node: &mut Node) {
    let status = wait_exit(&mut node.child, DEADLINE);
    assert_eq!(
        status.code(),
        Some(86),
        "{} did not crash at its failpoint:\n{}",
        node.name,
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_survives_the_target_and_then_the_source_crashing_mid_way() {
    let root = tempfile::tempdir().unwrap();
    // b crashes as it imports the tasks (the move is then cancelled, and
    // made again once b is back); a crashes after the target imported
    // everything and before it commits.
    let (mut a, mut b) = two_sites(
        root.path(),
        &[("CELL0_FAILPOINTS", "crash-at-handoff-imported")],
        &[("CELL0_FAILPOINTS", "crash-at-handoff-import-tasks")],
    )
    .await;
    run_memo(&a.endpoint(), "memo").await;
    let mut at_a = Vec::new();
    for i in 0..10 {
        at_a.push(submit_until_accepted(&a.endpoint(), "memo", i).await.0);
    }
    let out = migrate(&a.endpoint(), "memo", "b", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_crash(&mut b);
    // While b is down the move can be cancelled: memo runs in a again.
    let out = cli(&["--endpoint", &a.endpoint(), "agent", "migrate", "memo", "--cancel"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("memo runs in a again", async || {
        let m = local_agent(&a.endpoint(), "memo").await;
        m.handoff.is_none() && m.allocation.is_some_and(|al| al.status == "running")
    })
    .await;
    b.restart();
    b.wait_ready();
    // b holds a dormant copy of the cancelled move; the next move from a
    // replaces it.
    let out = migrate(&a.endpoint(), "memo", "b", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_crash(&mut a);
    // Until a is back, b holds the agent dormant: nobody runs it.
    let dormant = local_agent(&b.endpoint(), "memo").await;
    assert_eq!(dormant.desired, "stopped", "{dormant:?}");
    assert_eq!(dormant.handoff.map(|h| h.state).as_deref(), Some("arriving"));
    a.restart();
    a.wait_ready();
    check_moved(&a, &b, "memo", 10, &at_a).await;
}
