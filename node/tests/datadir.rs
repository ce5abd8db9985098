//! End-to-end tests of a node's data dir: real `cell0` processes started and
//! stopped on it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn a_node_that_lost_its_raft_store_refuses_to_start_and_says_how_to_recover() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("node1");
    let mut node = Node::start("node1", &dir, Ports::new(), None);
    node.wait_ready();
    assert!(node.sigterm().success());

    // Its identity stays, its Raft store (vote and log) is gone: starting
    // would bring the same member back with no memory of what it voted for.
    std::fs::remove_dir_all(dir.join("raft")).unwrap();
    for what in ["missing", "empty"] {
        node.restart();
        let status = wait_exit(&mut node.child, DEADLINE);
        assert!(!status.success(), "a node with a {what} raft/ started:\n{}", node.log());
        let log = node.log();
        assert!(log.contains("lost its Raft state"), "{what} raft/:\n{log}");
        assert!(log.contains("cell0 remove"), "the way back is named:\n{log}");
        assert!(log.contains("empty data dir"), "the way back is named:\n{log}");
        assert!(!dir.join("raft/CURRENT").exists(), "no new store was created");
        std::fs::create_dir_all(dir.join("raft")).unwrap();
    }

    // Started on an empty data dir, as the message says, it comes up again.
    std::fs::remove_dir_all(&dir).unwrap();
    let mut fresh = Node::start("node1", &dir, node.ports, None);
    fresh.wait_ready();
}
