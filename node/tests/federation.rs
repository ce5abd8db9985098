//! Site links between real processes: two sites (each its own cluster)
//! linked with `--join-wan` list each other in `cell0 site ls` and serve
//! calls for each other (`--site`); a site killed with -9 turns
//! unreachable (calls for it fail naming it) and heals when it restarts;
//! a node
//! with a certificate of another CA is refused and says why; a node whose
//! certificate names another site does not start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use cell0_proto::v1::sites_client::SitesClient;
use cell0_proto::v1::{self, SiteStatus};
use cell0_tls::certs::{create_ca, create_node_cert};
use cell0_tls::{CaFiles, NodeCertRequest, NodeFiles, Validity};
use common::*;

/// The federation port of every test node.
const WAN: u16 = 7104;

fn ca(dir: &Path) -> CaFiles {
    std::fs::create_dir_all(dir).unwrap();
    let files = CaFiles::in_dir(dir);
    create_ca(&files, "test", Validity::days(30).unwrap()).unwrap();
    files
}

fn cert(ca: &CaFiles, dir: &Path, node: &str, site: &str) -> NodeFiles {
    let out = NodeFiles::in_dir(dir, node);
    let request = NodeCertRequest {
        node: node.into(),
        site: site.into(),
        sans: vec![],
        validity: Validity::days(30).unwrap(),
    };
    create_node_cert(ca, &out, &request).unwrap();
    out
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
