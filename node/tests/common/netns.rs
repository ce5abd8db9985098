//! Network namespaces for tests that cut links: every node in a namespace
//! of its own, one veth pair each onto a bridge in the test's namespace.
//! Taking a node's bridge-side veth down partitions it from every other
//! node (and from the test), while it still reaches itself.
//!
//! Needs root (CAP_NET_ADMIN) and `ip`; [`Lab::new`] returns `None`, with
//! a line saying why, when the test does not run as root. Everything made
//! is removed on drop, also after a panic.

use std::net::Ipv4Addr;
use std::process::Command;

use super::{Ports, is_root};

/// A bridge and one namespace per node.
pub struct Lab {
    tag: String,
    bridge: String,
    net: [u8; 2],
    nodes: usize,
}

/// Runs `ip args`, failing the test with its output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    /// A lab of `nodes` namespaces on 10.x.y.0/24 (x.y from the process id),
    /// or `None` when not root.
    pub fn new(nodes: usize) -> Option<Lab> {
        if !is_root() {
            eprintln!("skipped: network namespaces need root");
            return None;
        }
        let pid = std::process::id();
        let tag = format!("c0{:05}", pid % 100_000);
        let lab = Lab {
            bridge: format!("{tag}b"),
            tag,
            net: [(pid >> 8) as u8, pid as u8],
            nodes,
        };
        lab.remove();
        ip(&["link", "add", &lab.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", lab.gateway()), "dev", &lab.bridge]);
        ip(&["link", "set", &lab.bridge, "up"]);
        for i in 0..nodes {
            let ns = lab.namespace(i);
            let host = lab.veth(i);
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &host, "master", &lab.bridge]);
            ip(&["link", "set", &host, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", lab.ip(i)), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        Some(lab)
    }

    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net[0], self.net[1], 1)
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net[0], self.net[1], 2 + i as u8)
    }

    /// Node `i`'s namespace.
    pub fn namespace(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    fn veth(&self, i: usize) -> String {
        format!("{}v{i}", self.tag)
    }

    /// Node `i`'s ports, on its own address.
    pub fn ports(&self, i: usize) -> Ports {
        Ports {
            ip: self.ip(i),
            public: 7100,
            internal: 7101,
            http: 7103,
            gossip: 7102,
        }
    }

    /// What runs a command in node `i`'s namespace.
    pub fn wrapper(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", &self.namespace(i)].map(String::from).to_vec()
    }

    /// Cuts node `i` off from every other node and the test.
    pub fn isolate(&self, i: usize) {
        ip(&["link", "set", &self.veth(i), "down"]);
    }

    /// Connects node `i` again.
    pub fn heal(&self, i: usize) {
        ip(&["link", "set", &self.veth(i), "up"]);
    }

    /// Removes what this lab's names denote (ignoring what is not there).
    fn remove(&self) {
        for i in 0..self.nodes {
            let _ = Command::new("ip").args(["netns", "del", &self.namespace(i)]).output();
            let _ = Command::new("ip").args(["link", "del", &self.veth(i)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove();
    }
}
