//! Under systemd with `Type=notify`, a real node process says READY=1 once
//! it is ready, pings the watchdog when asked, and says STOPPING=1 when it
//! is told to stop.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// Receives datagrams from `socket` until `want` arrived, failing after
/// [`DEADLINE`]; everything received, in order.
fn receive_until(socket: &UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let end = Instant::now() + DEADLINE;
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|m| m.lines().any(|l| l == want)) {
        assert!(Instant::now() < end, "no {want} in time; got {seen:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn a_node_tells_systemd_it_is_ready_alive_and_stopping() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let env = [("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")];
    let mut node = Node::start_flags(
        "node1",
        &root.path().join("node1"),
        Ports::new(),
        vec!["--bootstrap".into()],
        &env,
    );
    let mut seen = Vec::new();
    receive_until(&socket, "READY=1", &mut seen);
    assert!(node.is_ready(), "READY=1 came before /ready said so");
    // The watchdog keeps being pinged after READY=1.
    seen.clear();
    receive_until(&socket, "WATCHDOG=1", &mut seen);
    let status = node.sigterm();
    assert!(status.success(), "{status:?}");
    receive_until(&socket, "STOPPING=1", &mut seen);
}
