//! A network lab for real node processes: one network namespace per node,
//! each with a veth pair onto a bridge in the caller's namespace, so that
//! the links between nodes can be cut while clients (on the bridge's
//! address) still reach every node.
//!
//! A cut between nodes `a` and `b` is a blackhole route to `b` in `a`'s
//! namespace and one to `a` in `b`'s: nothing passes either way, and the
//! bridge's address stays reachable (an isolated leader still answers its
//! clients, which is what a stale read needs).
//!
//! Needs root (CAP_NET_ADMIN) and `ip`. Invariants: every namespace, link
//! and route the lab made is removed on drop, also after a panic; names
//! carry the process id, so labs of concurrent processes do not collide.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

/// What can go wrong building or changing the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Not running as root.
    #[error("network namespaces need root (CAP_NET_ADMIN); run as root or pick a scenario without partitions")]
    NotRoot,
    /// An `ip` command failed.
    #[error("ip {args}: {detail}")]
    Ip {
        /// Its arguments.
        args: String,
        /// Its error output.
        detail: String,
    },
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    let out = Command::new("ip").args(args).output().map_err(|e| LabError::Ip {
        args: args.join(" "),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Ip {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A bridge and one namespace per node.
pub struct Lab {
    tag: String,
    net: [u8; 2],
    nodes: usize,
    /// The cut links, as (lower, higher) node indexes.
    cuts: BTreeSet<(usize, usize)>,
}

impl Lab {
    /// A lab of `nodes` namespaces on 10.x.y.0/24 (x.y from the process id).
    pub fn new(nodes: usize) -> Result<Lab, LabError> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        let pid = std::process::id();
        let lab = Lab {
            tag: format!("ch{:05}", pid % 100_000),
            net: [(pid >> 8) as u8, pid as u8],
            nodes,
            cuts: BTreeSet::new(),
        };
        lab.remove();
        let bridge = lab.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", lab.gateway()), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..nodes {
            let ns = lab.namespace(i);
            let host = lab.veth(i);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &host, "master", &bridge])?;
            ip(&["link", "set", &host, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", lab.ip(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn bridge(&self) -> String {
        format!("{}b", self.tag)
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

    /// The command prefix that runs a program in node `i`'s namespace.
    pub fn wrapper(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", &self.namespace(i)].map(String::from).to_vec()
    }

    /// Leaves exactly the links inside each of `groups` (node indexes)
    /// connected; every link between two groups is cut. Nodes in no group
    /// are cut from every other node.
    pub fn partition(&mut self, groups: &[Vec<usize>]) -> Result<(), LabError> {
        let group_of = |n: usize| groups.iter().position(|g| g.contains(&n));
        let mut want = BTreeSet::new();
        for a in 0..self.nodes {
            for b in a + 1..self.nodes {
                if group_of(a).is_none() || group_of(a) != group_of(b) {
                    want.insert((a, b));
                }
            }
        }
        let heal: Vec<_> = self.cuts.difference(&want).copied().collect();
        let cut: Vec<_> = want.difference(&self.cuts).copied().collect();
        for (a, b) in heal {
            self.route("del", a, b)?;
            self.route("del", b, a)?;
            self.cuts.remove(&(a, b));
        }
        for (a, b) in cut {
            self.route("add", a, b)?;
            self.route("add", b, a)?;
            self.cuts.insert((a, b));
        }
        Ok(())
    }

    /// Connects every node to every other again.
    pub fn heal(&mut self) -> Result<(), LabError> {
        let all = vec![(0..self.nodes).collect()];
        self.partition(&all)
    }

    fn route(&self, verb: &str, from: usize, to: usize) -> Result<(), LabError> {
        ip(&[
            "-n",
            &self.namespace(from),
            "route",
            verb,
            "blackhole",
            &format!("{}/32", self.ip(to)),
        ])
    }

    /// Removes what this lab's names denote (ignoring what is not there).
    fn remove(&self) {
        for i in 0..self.nodes {
            let _ = Command::new("ip").args(["netns", "del", &self.namespace(i)]).output();
            let _ = Command::new("ip").args(["link", "del", &self.veth(i)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).output();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove();
    }
}
