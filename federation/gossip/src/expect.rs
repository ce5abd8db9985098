//! `--bootstrap-expect N`: when a freshly started node may form the cluster,
//! as pure logic over what gossip has shown it.
//!
//! The rule: a node that belongs to a cluster never bootstraps. A node that
//! sees a member of a cluster joins that cluster. Otherwise, once a node
//! sees N nodes without a cluster (itself included), the one with the
//! lowest id among them bootstraps a cluster alone, and every other node
//! waits until it hears that node's cluster id, then joins through it.
//!
//! Why this never forms two clusters when N nodes are started with the same
//! N: a node bootstraps only when it sees N unclustered nodes and has the
//! lowest id of them. With N nodes in all, every node that sees N sees all
//! of them, so only the node with the lowest id of all can ever bootstrap,
//! and it does so once: the cluster id it then persists makes it a member
//! forever after, also across restarts. Nodes started later, or restarted
//! mid-formation, find the cluster id in heartbeats and join.
//!
//! (Starting more than N nodes with the same N is a misconfiguration, as in
//! Consul; [`decide`] then still never bootstraps a node that can see a
//! cluster member.)

/// What a node knows of one peer, for the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The peer's node id.
    pub node_id: u64,
    /// The cluster it belongs to, if any.
    pub cluster_id: Option<u64>,
}

/// What a node should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It belongs to a cluster: nothing to form.
    Member,
    /// Form a new cluster, alone; the others join it.
    Bootstrap,
    /// Join the cluster `cluster_id` through the node `via`.
    Join {
        /// The cluster to join.
        cluster_id: u64,
        /// A member of it, to ask.
        via: u64,
    },
    /// Not enough nodes seen yet, or waiting for the lowest one to form
    /// the cluster.
    Wait {
        /// Unclustered nodes seen, this one included.
        seen: usize,
    },
}

/// The decision of node `local` (with `local_cluster` if it belongs to one)
/// expecting `expect` nodes, having seen `peers` alive. Without `expect`
/// (a node told only whom to contact) it never bootstraps: it waits for a
/// cluster to join.
pub fn decide(local: u64, local_cluster: Option<u64>, expect: Option<usize>, peers: &[Candidate]) -> Decision {
    if local_cluster.is_some() {
        return Decision::Member;
    }
    // Join the cluster of the lowest-id member seen (any member would do;
    // the lowest makes every node ask the same one).
    if let Some(member) = peers
        .iter()
        .filter(|p| p.node_id != local)
        .filter_map(|p| p.cluster_id.map(|c| (p.node_id, c)))
        .min()
    {
        return Decision::Join {
            cluster_id: member.1,
            via: member.0,
        };
    }
    let mut free: Vec<u64> = peers
        .iter()
        .filter(|p| p.cluster_id.is_none())
        .map(|p| p.node_id)
        .chain(std::iter::once(local))
        .collect();
    free.sort_unstable();
    free.dedup();
    if expect.is_some_and(|n| free.len() >= n.max(1)) && free.first() == Some(&local) {
        Decision::Bootstrap
    } else {
        Decision::Wait { seen: free.len() }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    fn free(id: u64) -> Candidate {
        Candidate {
            node_id: id,
            cluster_id: None,
        }
    }

    #[test]
    fn the_lowest_of_n_bootstraps_and_the_rest_wait_then_join() {
        let peers = [free(5), free(9), free(3)];
        assert_eq!(decide(3, None, Some(3), &peers), Decision::Bootstrap);
        assert_eq!(decide(5, None, Some(3), &peers), Decision::Wait { seen: 3 });
        assert_eq!(decide(9, None, Some(3), &peers[..1]), Decision::Wait { seen: 2 });
        let formed = [
            Candidate {
                node_id: 3,
                cluster_id: Some(77),
            },
            free(9),
        ];
        assert_eq!(
            decide(5, None, Some(3), &formed),
            Decision::Join { cluster_id: 77, via: 3 }
        );
        assert_eq!(decide(3, Some(77), Some(3), &peers), Decision::Member);
        assert_eq!(decide(1, None, Some(1), &[]), Decision::Bootstrap, "expect 1: alone");
        // Told only whom to contact: never forms a cluster, joins one.
        assert_eq!(decide(3, None, None, &peers), Decision::Wait { seen: 3 });
        assert_eq!(
            decide(5, None, None, &formed),
            Decision::Join { cluster_id: 77, via: 3 }
        );
    }

    /// One node's view of the simulation.
    #[derive(Debug, Clone, Default)]
    struct Node {
        cluster: Option<u64>,
        up: bool,
        /// Which nodes this one has heard (gossip is not instant).
        hears: BTreeSet<u64>,
    }

    proptest! {
        /// N nodes start in any order, hear each other in any order, and
        /// may restart (keeping their data dir) at any point: exactly one
        /// cluster forms, and every node ends up in it.
        #[test]
        fn n_nodes_never_form_two_clusters(
            n in 1usize..7,
            ids in proptest::collection::btree_set(1u64..1_000, 7),
            steps in proptest::collection::vec((0usize..7, 0usize..7, 0u8..4), 0..200),
        ) {
            let ids: Vec<u64> = ids.into_iter().take(n).collect();
            prop_assume!(ids.len() == n);
            let mut nodes: BTreeMap<u64, Node> = ids.iter().map(|&id| (id, Node::default())).collect();
            let mut formed = BTreeSet::new();
            let mut next_cluster = 100u64;
            let mut act = |nodes: &mut BTreeMap<u64, Node>, id: u64, formed: &mut BTreeSet<u64>| {
                let node = &nodes[&id];
                if !node.up {
                    return;
                }
                let peers: Vec<Candidate> = node
                    .hears
                    .iter()
                    .filter(|p| nodes[*p].up)
                    .map(|p| Candidate { node_id: *p, cluster_id: nodes[p].cluster })
                    .collect();
                match decide(id, node.cluster, Some(n), &peers) {
                    Decision::Bootstrap => {
                        next_cluster += 1;
                        formed.insert(next_cluster);
                        nodes.get_mut(&id).unwrap().cluster = Some(next_cluster);
                    }
                    Decision::Join { cluster_id, .. } => {
                        nodes.get_mut(&id).unwrap().cluster = Some(cluster_id);
                    }
                    Decision::Member | Decision::Wait { .. } => {}
                }
            };
            for (a, b, kind) in steps {
                let (a, b) = (ids[a % n], ids[b % n]);
                match kind {
                    0 => nodes.get_mut(&a).unwrap().up = true,
                    // A restart: down now, its data dir (cluster) kept, and
                    // it must hear everyone again.
                    1 => {
                        let node = nodes.get_mut(&a).unwrap();
                        node.up = false;
                        node.hears.clear();
                    }
                    2 => {
                        nodes.get_mut(&a).unwrap().hears.insert(b);
                    }
                    _ => act(&mut nodes, a, &mut formed),
                }
                prop_assert!(formed.len() <= 1, "two clusters: {formed:?}");
            }
            // Then everyone is up, hears everyone, and acts until stable.
            for node in nodes.values_mut() {
                node.up = true;
                node.hears = ids.iter().copied().collect();
            }
            for _ in 0..3 {
                for &id in &ids {
                    act(&mut nodes, id, &mut formed);
                }
            }
            prop_assert_eq!(formed.len(), 1);
            let cluster = formed.iter().next().copied();
            for node in nodes.values() {
                prop_assert_eq!(node.cluster, cluster);
            }
        }
    }
}
