//! Replicated node records: what each node offers for placement.
//!
//! Table (in the state column family): `node_resources`, key node id
//! (big-endian) -> [`NodeResources`]. Each node reports its own record at
//! start (CPU, memory, and the inference backend it runs: a node with a
//! hardware GPU says so), so the scheduler can place agents that need a GPU
//! or a model without asking the nodes. Deterministic like every table.
//! The `meta` row `node_records` counts the records (at most
//! [`MAX_NODES`]), so adding one does not scan them.
//!
//! Table `node_liveness`, key node id (big-endian) -> [`NodeLiveness`]: the
//! failure detector's verdict on a node as the Raft leader recorded it
//! (gossip's view is each node's own; this is the one the cluster agrees
//! on). Only nodes with a record get one. It informs operators and
//! placement; rescheduling still waits for the node's lease.

use std::collections::BTreeMap;

use crate::codec::{Counted, decode_row, encode_row, rows_by_node};
use crate::txn::Txn;
use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::error::{Result, StateError};

const RESOURCES_TABLE: &str = "node_resources";
const LABELS_TABLE: &str = "node_labels";
const LIVENESS_TABLE: &str = "node_liveness";
/// Most labels a node may carry.
pub const MAX_NODE_LABELS: usize = 32;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;
/// Longest text field of a record, in bytes.
pub const MAX_RESOURCE_TEXT_BYTES: usize = 256;
/// Most node records kept.
pub const MAX_NODES: usize = 16_384;
/// The node records, counted (in `meta`, key `node_records`).
const RECORDS: Counted = Counted {
    table: RESOURCES_TABLE,
    count_key: b"node_records",
};

/// What a node offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResources {
    /// Logical CPUs.
    pub cpu_cores: u32,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// Inference backend: `cpu` or `wgpu`.
    pub inference_backend: String,
    /// Adapter (GPU) or CPU name the engine runs on.
    pub adapter: String,
    /// `cpu`, `discrete-gpu`, `integrated-gpu`, `virtual-gpu` or `software`.
    pub device_type: String,
    /// Whether the engine runs on a hardware GPU.
    pub gpu: bool,
    /// GPU memory in bytes as configured by the operator (0: unknown; wgpu
    /// does not report it).
    pub gpu_memory_bytes: u64,
}

impl NodeResources {
    /// Checks text lengths; the error names the field.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("resources.inference_backend", &self.inference_backend),
            ("resources.adapter", &self.adapter),
            ("resources.device_type", &self.device_type),
        ] {
            if v.len() > MAX_RESOURCE_TEXT_BYTES {
                return Err(StateError::invalid(
                    field,
                    format!("is {} bytes; the limit is {MAX_RESOURCE_TEXT_BYTES}", v.len()),
                ));
            }
        }
        Ok(())
    }
}

crate::row_v1!(NodeResources, "node record");

/// A node's labels (`zone = "a"`), which agent constraints match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLabels {
    /// Label keys and values.
    pub labels: BTreeMap<String, String>,
}

crate::row_v1!(NodeLabels, "node labels");

/// Checks a set of node labels; the error names `field`.
pub fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_NODE_LABELS {
        return Err(StateError::invalid(
            field,
            format!("has {} labels; the limit is {MAX_NODE_LABELS}", labels.len()),
        ));
    }
    for (k, v) in labels {
        if k.is_empty() {
            return Err(StateError::invalid(field, "has an empty key"));
        }
        for (what, text) in [("key", k), ("value", v)] {
            if text.len() > MAX_LABEL_BYTES {
                return Err(StateError::invalid(
                    &format!("{field}.{k}"),
                    format!("has a {what} of {} bytes; the limit is {MAX_LABEL_BYTES}", text.len()),
                ));
            }
        }
    }
    Ok(())
}

/// The failure detector's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Liveness {
    /// Heard by the leader's gossip.
    Alive,
    /// Not heard by the leader's gossip for long enough to be dead.
    Dead,
}

impl Liveness {
    /// `alive` or `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Dead => "dead",
        }
    }
}

/// A node's liveness as the leader recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLiveness {
    /// The verdict.
    pub liveness: Liveness,
    /// Why (what the detector saw).
    pub reason: String,
    /// Since when (proposing leader's clock, ms).
    pub since_ms: u64,
}

crate::row_v1!(NodeLiveness, "node liveness");

/// A change to node records, carried in [`crate::Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeCommand {
    /// Records what `node` offers, replacing its earlier record.
    SetResources {
        /// The node.
        node: NodeId,
        /// Its resources.
        resources: NodeResources,
    },
    /// Sets `node`'s labels, replacing earlier ones; refused (not stored)
    /// for a node without a record.
    SetLabels {
        /// The node.
        node: NodeId,
        /// Its labels.
        labels: BTreeMap<String, String>,
    },
    /// Records the failure detector's verdict on `node` (proposed by the
    /// leader only); refused (not stored) for a node without a record.
    SetLiveness {
        /// The node.
        node: NodeId,
        /// The verdict.
        liveness: NodeLiveness,
    },
}

impl NodeCommand {
    /// The command carrying this change.
    pub fn into_command(self) -> crate::Command {
        crate::Command::Node(self)
    }

    /// Whether the record was stored (false: the table is full), from the
    /// response to a node-record command.
    pub fn stored(response: crate::Response) -> Result<bool> {
        match response {
            crate::Response::Node { stored } => Ok(stored),
            other => Err(StateError::UnexpectedResponse {
                expected: "a node-record command",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Checks the command's fields.
    pub fn validate(&self) -> Result<()> {
        match self {
            NodeCommand::SetResources { node, resources } => {
                if *node == 0 {
                    return Err(StateError::invalid("node", "must not be 0"));
                }
                resources.validate()
            }
            NodeCommand::SetLabels { node, labels } => {
                if *node == 0 {
                    return Err(StateError::invalid("node", "must not be 0"));
                }
                check_labels("labels", labels)
            }
            NodeCommand::SetLiveness { node, liveness } => {
                if *node == 0 {
                    return Err(StateError::invalid("node", "must not be 0"));
                }
                if liveness.reason.len() > MAX_RESOURCE_TEXT_BYTES {
                    return Err(StateError::invalid(
                        "liveness.reason",
                        format!(
                            "is {} bytes; the limit is {MAX_RESOURCE_TEXT_BYTES}",
                            liveness.reason.len()
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Every node's recorded liveness, by node id (nodes never judged are
/// absent).
pub fn liveness(txn: &dyn Txn) -> Result<BTreeMap<NodeId, NodeLiveness>> {
    rows_by_node(txn, LIVENESS_TABLE)
}

/// The labels of `node` (none when it has not set any).
pub fn labels_of(txn: &dyn Txn, node: NodeId) -> Result<BTreeMap<String, String>> {
    Ok(txn
        .get(LABELS_TABLE, &node.to_be_bytes())?
        .map(|v| decode_row::<NodeLabels>(&v))
        .transpose()?
        .map(|l| l.labels)
        .unwrap_or_default())
}

/// Every node's record, by node id.
pub fn resources(txn: &dyn Txn) -> Result<BTreeMap<NodeId, NodeResources>> {
    rows_by_node(txn, RESOURCES_TABLE)
}

/// Every node's labels, by node id (nodes without labels are absent).
pub fn labels(txn: &dyn Txn) -> Result<BTreeMap<NodeId, BTreeMap<String, String>>> {
    Ok(rows_by_node::<NodeLabels>(txn, LABELS_TABLE)?
        .into_iter()
        .map(|(id, l)| (id, l.labels))
        .collect())
}

/// The record of `node`, if it reported one.
pub fn resources_of(txn: &dyn Txn, node: NodeId) -> Result<Option<NodeResources>> {
    txn.get(RESOURCES_TABLE, &node.to_be_bytes())?
        .map(|v| decode_row(&v))
        .transpose()
}

/// The number of node records.
pub fn record_count(txn: &dyn Txn) -> Result<u64> {
    RECORDS.count(txn)
}

/// Applies a validated node command. A record beyond [`MAX_NODES`] is
/// dropped (returns false); replacing an existing one always succeeds.
pub(crate) fn apply(txn: &mut dyn Txn, cmd: &NodeCommand) -> Result<bool> {
    match cmd {
        NodeCommand::SetResources { node, resources } => {
            let key = node.to_be_bytes();
            if txn.get(RESOURCES_TABLE, &key)?.is_none() && record_count(txn)? >= MAX_NODES as u64 {
                return Ok(false);
            }
            RECORDS.put(txn, &key, resources)?;
            Ok(true)
        }
        NodeCommand::SetLabels { node, labels } => {
            let key = node.to_be_bytes();
            if txn.get(RESOURCES_TABLE, &key)?.is_none() {
                return Ok(false);
            }
            if labels.is_empty() {
                txn.delete(LABELS_TABLE, &key)?;
            } else {
                let row = NodeLabels { labels: labels.clone() };
                txn.put(LABELS_TABLE, &key, encode_row(&row)?)?;
            }
            Ok(true)
        }
        NodeCommand::SetLiveness { node, liveness } => {
            let key = node.to_be_bytes();
            if txn.get(RESOURCES_TABLE, &key)?.is_none() {
                return Ok(false);
            }
            txn.put(LIVENESS_TABLE, &key, encode_row(liveness)?)?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemTxn;
    use crate::kv;

    #[test]
    fn records_stop_at_the_limit_counted_also_in_state_written_before_the_count() {
        let mut txn = MemTxn::new();
        let set = |txn: &mut MemTxn, node| {
            apply(
                txn,
                &NodeCommand::SetResources {
                    node,
                    resources: NodeResources::default(),
                },
            )
            .unwrap()
        };
        for node in 1..=10 {
            assert!(set(&mut txn, node));
        }
        // State from before the count row: the records are counted.
        txn.delete(kv::META_TABLE, RECORDS.count_key).unwrap();
        assert!(set(&mut txn, 11));
        assert_eq!(kv::meta_u64(&txn, RECORDS.count_key).unwrap(), 11);
        for node in 12..=MAX_NODES as u64 {
            assert!(set(&mut txn, node));
        }
        assert!(!set(&mut txn, MAX_NODES as u64 + 1), "one record too many");
        assert!(set(&mut txn, 5), "replacing a record is always allowed");
        assert_eq!(resources(&txn).unwrap().len(), MAX_NODES);
    }

    #[test]
    fn labels_are_kept_only_for_recorded_nodes_and_replaced_whole() {
        let mut txn = MemTxn::new();
        let zone = |z: &str| BTreeMap::from([("zone".to_string(), z.to_string())]);
        let set = |txn: &mut MemTxn, labels| apply(txn, &NodeCommand::SetLabels { node: 1, labels }).unwrap();
        assert!(!set(&mut txn, zone("a")), "no record yet");
        assert!(labels_of(&txn, 1).unwrap().is_empty());
        apply(
            &mut txn,
            &NodeCommand::SetResources {
                node: 1,
                resources: NodeResources::default(),
            },
        )
        .unwrap();
        assert!(set(&mut txn, zone("a")));
        assert_eq!(labels_of(&txn, 1).unwrap(), zone("a"));
        assert!(set(&mut txn, BTreeMap::new()));
        assert!(labels_of(&txn, 1).unwrap().is_empty());
        let too_many: BTreeMap<_, _> = (0..=MAX_NODE_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        let err = NodeCommand::SetLabels {
            node: 1,
            labels: too_many,
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("labels"), "{err}");
    }

    #[test]
    fn records_are_replaced_per_node_and_listed_by_id() {
        let mut txn = MemTxn::new();
        let gpu = NodeResources {
            cpu_cores: 16,
            inference_backend: "wgpu".into(),
            gpu: true,
            ..NodeResources::default()
        };
        let cpu = NodeResources {
            cpu_cores: 2,
            inference_backend: "cpu".into(),
            ..NodeResources::default()
        };
        for (node, r) in [(9, cpu.clone()), (3, cpu.clone()), (9, gpu.clone())] {
            assert!(apply(&mut txn, &NodeCommand::SetResources { node, resources: r }).unwrap());
        }
        let all = resources(&txn).unwrap();
        assert_eq!(all.into_iter().collect::<Vec<_>>(), vec![(3, cpu), (9, gpu)]);
        let long = NodeResources {
            adapter: "x".repeat(MAX_RESOURCE_TEXT_BYTES + 1),
            ..NodeResources::default()
        };
        let err = NodeCommand::SetResources {
            node: 1,
            resources: long,
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("resources.adapter"), "{err}");
    }
}
