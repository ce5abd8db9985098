//! Mutual TLS between real processes: nodes with certificates from the
//! cluster CA form a cluster; a node whose certificate comes from another
//! CA, has expired, or that has none cannot join or talk to the internal
//! port; a replaced certificate is reloaded without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use cell0_tls::certs::create_node_cert;
use cell0_tls::{CaFiles, NodeCertRequest, NodeFiles, Validity};
use common::*;

fn ca(dir: &Path) -> CaFiles {
    test_ca(dir)
}

/// A certificate for `node` from `ca`, valid `validity`, in `dir`.
fn cert(ca: &CaFiles, dir: &Path, node: &str, validity: Validity) -> NodeFiles {
    test_cert(ca, dir, node, "default", validity)
}

/// The TLS flags of a node.
fn tls_flags(ca: &Path, node: &NodeFiles) -> Vec<String> {
    [
        "--tls-ca",
        ca.to_str().unwrap(),
        "--tls-cert",
        node.cert.to_str().unwrap(),
        "--tls-key",
        node.key.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Starts `name` with `flags` plus `--bootstrap` or `--join` (an internal
/// address).
fn start(root: &Path, name: &str, ports: Ports, join: Option<&str>, mut flags: Vec<String>) -> Node {
    match join {
        Some(j) => flags.extend(["--join".to_string(), j.to_string()]),
        None => flags.push("--bootstrap".into()),
    }
    Node::start_flags(name, &root.join(name), ports, flags, &[])
}

/// The node ids the node at `endpoint` lists as Raft members.
async fn member_ids(endpoint: &str) -> Vec<u64> {
    members(endpoint).await.iter().map(|m| m.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_nodes_with_a_valid_certificate_of_the_cluster_ca_take_part() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let cluster_ca = ca(&certs);
    let valid = || Validity::days(30).unwrap();
    let ports: Vec<Ports> = (0..2).map(|_| Ports::new()).collect();
    let seed = ports[0].addr(ports[0].internal);

    // Two nodes of the cluster CA form a cluster over mutual TLS.
    let n1 = cert(&cluster_ca, &certs, "node1", valid());
    let n2 = cert(&cluster_ca, &certs, "node2", valid());
    let mut nodes = [
        start(root.path(), "node1", ports[0], None, tls_flags(&cluster_ca.cert, &n1)),
        start(
            root.path(),
            "node2",
            ports[1],
            Some(&seed),
            tls_flags(&cluster_ca.cert, &n2),
        ),
    ];
    for n in nodes.iter_mut() {
        n.wait_ready();
    }
    let endpoint = nodes[0].endpoint();
    wait_until("two members", async || member_ids(&endpoint).await.len() == 2).await;
    put(&nodes[1].endpoint(), "over-tls", "yes").await.unwrap();
    assert_eq!(get(&endpoint, "over-tls", false).await, Some(b"yes".to_vec()));

    // Refused: a certificate of another CA, an expired one of the cluster
    // CA, and none at all (plaintext).
    let other_ca = ca(&root.path().join("other"));
    let foreign = cert(&other_ca, &root.path().join("other"), "foreign", valid());
    let expired = cert(
        &cluster_ca,
        &certs,
        "expired",
        Validity {
            from: time::OffsetDateTime::now_utc() - time::Duration::days(10),
            until: time::OffsetDateTime::now_utc() - time::Duration::days(1),
        },
    );
    let outsiders: Vec<(&str, Vec<String>)> = vec![
        ("foreign", tls_flags(&other_ca.cert, &foreign)),
        ("expired", tls_flags(&cluster_ca.cert, &expired)),
        ("plaintext", vec!["--insecure".into()]),
    ];
    for (name, flags) in outsiders {
        let before = nodes[0].log().matches("TLS handshake failed").count();
        let mut outsider = start(root.path(), name, Ports::new(), Some(&seed), flags);
        wait_until("the seed refuses the outsider's handshake", async || {
            nodes[0].log().matches("TLS handshake failed").count() > before
        })
        .await;
        assert!(!outsider.is_ready(), "{name} became ready");
        assert_eq!(member_ids(&endpoint).await.len(), 2, "{name} was admitted");
        outsider.kill9();
    }
    let expired_log = std::fs::read_to_string(root.path().join("expired.log")).unwrap();
    assert!(
        expired_log.contains("outside its validity period"),
        "the expired node was not warned:\n{expired_log}"
    );

    // A replaced certificate (same CA) is picked up without a restart.
    let renewed_dir = root.path().join("renewed");
    std::fs::create_dir_all(&renewed_dir).unwrap();
    let renewed = cert(&cluster_ca, &renewed_dir, "node1", valid());
    replace(&renewed.cert, &n1.cert);
    replace(&renewed.key, &n1.key);
    wait_until("node1 reloads its certificate", async || {
        nodes[0].log().contains("reloaded the TLS certificate and key")
    })
    .await;
    // New connections use it: a third node joins.
    let n3 = cert(&cluster_ca, &certs, "node3", valid());
    let mut third = start(
        root.path(),
        "node3",
        Ports::new(),
        Some(&seed),
        tls_flags(&cluster_ca.cert, &n3),
    );
    third.wait_ready();
    wait_until("three members", async || member_ids(&endpoint).await.len() == 3).await;
    third.sigterm();
    for n in nodes.iter_mut() {
        n.sigterm();
    }
}

/// Moves `from` over `to` in one rename (as a deployment tool would).
fn replace(from: &PathBuf, to: &PathBuf) {
    std::fs::rename(from, to).unwrap();
}

#[test]
fn the_public_port_serves_tls_to_clients_that_trust_the_ca() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let cluster_ca = ca(&certs);
    let ports = Ports::new();
    let out = NodeFiles::in_dir(&certs, "node1");
    let request = NodeCertRequest {
        node: "node1".into(),
        site: "default".into(),
        sans: vec![ports.ip.to_string()],
        validity: Validity::days(30).unwrap(),
    };
    create_node_cert(&cluster_ca, &out, &request).unwrap();
    let mut flags = tls_flags(&cluster_ca.cert, &out);
    flags.push("--tls-public".into());
    let mut node = start(root.path(), "node1", ports, None, flags);
    node.wait_ready();
    let endpoint = node.endpoint();
    let trusted = cluster_ca.cert.to_str().unwrap();
    let put = cli(&["--ca", trusted, "kv", "put", "k", "v", "--endpoint", &endpoint]);
    assert!(put.status.success(), "{}", stderr(&put));
    let get = cli(&["--ca", trusted, "kv", "get", "k", "--endpoint", &endpoint]);
    assert!(get.status.success(), "{}", stderr(&get));
    assert_eq!(stdout(&get).trim(), "v");
    // Without the CA the client cannot talk to it; with another CA neither.
    let plain = cli(&["kv", "get", "k", "--endpoint", &endpoint]);
    assert!(!plain.status.success());
    let other = ca(&root.path().join("other"));
    let wrong = cli(&[
        "--ca",
        other.cert.to_str().unwrap(),
        "kv",
        "get",
        "k",
        "--endpoint",
        &endpoint,
    ]);
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("cannot reach a cell0 node"),
        "{}",
        stderr(&wrong)
    );
    node.sigterm();
}
