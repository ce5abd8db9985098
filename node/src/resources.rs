//! What this node offers for placement, and reporting it through Raft.
//!
//! The record is measured at start (CPUs, memory, the inference engine's
//! backend and adapter) plus what the operator configures (GPU memory, which
//! wgpu does not report, and the node's labels), and written once the node
//! is in a cluster, so the scheduler reads every node's resources and
//! labels from the replicated state.
//!
//! The report runs as the supervised task `resources`: it ends once the
//! record is written, and at once when the node stops (an attempt in flight
//! is abandoned; the next start reports again).

use std::collections::BTreeMap;

use cell0_consensus::{Consensus, ConsensusError, Consistency, NodeCommand, NodeResources, nodes};
use cell0_inference::BackendInfo;
use tokio::sync::watch;

use crate::supervisor::{Backoff, stopped};

/// Physical memory in bytes from /proc/meminfo (0 where unavailable).
fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// This node's resources given the engine it runs and the configured GPU memory.
pub fn measure(engine: &BackendInfo, gpu_memory_mb: u64) -> NodeResources {
    let gpu = matches!(engine.device_type.as_str(), "discrete-gpu" | "integrated-gpu");
    NodeResources {
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes: memory_bytes(),
        inference_backend: engine.backend.clone(),
        adapter: engine.adapter.clone(),
        device_type: engine.device_type.clone(),
        gpu,
        gpu_memory_bytes: if gpu { gpu_memory_mb * 1024 * 1024 } else { 0 },
    }
}

/// Writes `resources` and `labels` for this node unless the replicated
/// records already say the same; retries (the node may still be joining)
/// until done or `stop` turns true.
pub async fn report(
    consensus: Consensus,
    resources: NodeResources,
    labels: BTreeMap<String, String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::default();
    loop {
        let attempt = async {
            let id = consensus.id();
            let (current, current_labels) = consensus
                .read(Consistency::Serializable, move |txn| {
                    Ok((nodes::resources_of(txn, id)?, nodes::labels_of(txn, id)?))
                })
                .await
                .unwrap_or_default();
            let mut wrote = false;
            if current.as_ref() != Some(&resources) {
                let set = NodeCommand::SetResources {
                    node: id,
                    resources: resources.clone(),
                };
                if !NodeCommand::stored(consensus.propose(set.into_command()).await?)? {
                    return Err(ConsensusError::invalid(
                        "resources",
                        format!(
                            "cannot be stored: the cluster already has {} node records",
                            nodes::MAX_NODES
                        ),
                    ));
                }
                wrote = true;
            }
            if current_labels != labels {
                let set = NodeCommand::SetLabels {
                    node: id,
                    labels: labels.clone(),
                };
                if !NodeCommand::stored(consensus.propose(set.into_command()).await?)? {
                    return Err(ConsensusError::invalid("labels", "the node has no record yet"));
                }
                wrote = true;
            }
            Ok(wrote)
        };
        let outcome = tokio::select! {
            outcome = attempt => outcome,
            () = stopped(&mut stop) => return,
        };
        match outcome {
            Ok(false) => return,
            Ok(true) => {
                tracing::info!(
                    backend = %resources.inference_backend,
                    gpu = resources.gpu,
                    cpu_cores = resources.cpu_cores,
                    "reported node resources"
                );
                return;
            }
            Err(e) => tracing::debug!(error = %e, "cannot report node resources yet; will retry"),
        }
        // Until this node is a member no write can succeed: back off, but
        // stop waiting on shutdown.
        if !backoff.wait(&mut stop).await {
            return;
        }
    }
}
