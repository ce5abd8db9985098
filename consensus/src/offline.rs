//! Offline operations on a stopped node's Raft store: restoring a snapshot
//! file into a new data dir (`cell0 snapshot restore`), and forcing a new
//! one-member configuration after quorum is lost (`cell0 operator
//! recover`, like etcd's `--force-new-cluster`).
//!
//! Invariants:
//! - Both run only while no Raft runs on the store (the node is stopped;
//!   RocksDB's lock refuses a running node's store).
//! - A restore only writes into a store with no log, no vote and no applied
//!   state, and gives the restored state a new cluster id: nodes of the old
//!   cluster are refused by the new one (and the other way round), so the
//!   two never mix.
//! - A recovery keeps every entry the node has, committed or not, and
//!   appends one membership entry (this node alone as voter) in a term above
//!   any it saw, with a vote for itself in that term (not committed: the
//!   node still wins an election, alone, before it leads). The first entry
//!   of its new term commits everything before it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use cell0_storage::snapshot::FileSummary;
use cell0_storage::{Engine as _, LogStore, ReadView as _, RocksEngine, SNAPSHOT_DIR, StateMachineStore};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader, StoredMembership, Vote};

use crate::error::{ConsensusError, Result};
use crate::inner::random_u64;
use crate::state::{self, KvStateMachine};
use crate::types::{NodeId, NodeInfo, TypeConfig};

type Stores = (
    LogStore<TypeConfig, RocksEngine>,
    StateMachineStore<TypeConfig, RocksEngine, KvStateMachine>,
    Arc<RocksEngine>,
);

fn open(raft_dir: &Path, node_id: NodeId) -> Result<Stores> {
    let engine = Arc::new(RocksEngine::open(raft_dir, node_id)?);
    let sm = StateMachineStore::new(
        engine.clone(),
        Arc::new(KvStateMachine::new(state::NOTIFICATION_CAPACITY)),
        raft_dir.join(SNAPSHOT_DIR),
    )?;
    Ok((LogStore::new(engine.clone()), sm, engine))
}

fn storage_err(e: openraft::StorageError<NodeId>) -> ConsensusError {
    ConsensusError::Internal(e.to_string())
}

/// The log index and term the state in a snapshot file is at, from its
/// header.
pub fn position(summary: &FileSummary) -> Result<(u64, u64)> {
    Ok(last_log_id(summary)?.map_or((0, 0), |l| (l.index, l.leader_id.term)))
}

/// The last log id of the state in a snapshot file, from its header.
fn last_log_id(summary: &FileSummary) -> Result<Option<LogId<NodeId>>> {
    let meta: openraft::SnapshotMeta<NodeId, NodeInfo> =
        cell0_state::codec::decode("snapshot file meta", &summary.header.meta)?;
    Ok(meta.last_log_id)
}

/// A configuration of `node_id` alone, as voter.
fn sole_member(node_id: NodeId, info: NodeInfo) -> Membership<NodeId, NodeInfo> {
    Membership::new(vec![BTreeSet::from([node_id])], BTreeMap::from([(node_id, info)]))
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The checked file.
    pub file: FileSummary,
    /// The cluster the file came from (0: unknown).
    pub old_cluster_id: u64,
    /// The new cluster's id.
    pub cluster_id: u64,
    /// The log index and term the restored state is at.
    pub index: u64,
    /// See `index`.
    pub term: u64,
}

/// Restores the checked snapshot file `file` into the empty Raft store at
/// `raft_dir` of node `node_id`: the whole state, with this node as the
/// only voter of a new cluster. `file` must be checked first
/// ([`cell0_storage::snapshot::verify`]); it is read again while loading
/// and refused if it changed.
pub async fn restore(
    raft_dir: &Path,
    node_id: NodeId,
    info: NodeInfo,
    file: &Path,
    summary: FileSummary,
) -> Result<RestoreReport> {
    let (mut log, sm, engine) = open(raft_dir, node_id)?;
    let empty = engine.last(cell0_storage::Cf::Log)?.is_none()
        && log.read_vote().await.map_err(storage_err)?.is_none()
        && engine.last(cell0_storage::Cf::State)?.is_none();
    if !empty {
        return Err(ConsensusError::invalid(
            "data_dir",
            "already holds Raft state; restore into a new, empty data dir",
        ));
    }
    let cluster_id = random_u64(node_id);
    let mut old_cluster_id = 0;
    let last = last_log_id(&summary)?;
    let membership = StoredMembership::new(last, sole_member(node_id, info));
    sm.restore(file, membership, &mut |txn| {
        old_cluster_id = cell0_state::kv::cluster_id(txn)?;
        cell0_state::kv::replace_cluster_id(txn, cluster_id)?;
        Ok(())
    })?;
    // A vote in the snapshot's term: the node's first election is in a term
    // above every entry's.
    let term = last.map_or(0, |l| l.leader_id.term);
    log.reset_to_snapshot(last, &Vote::new(term, node_id))?;
    engine.flush()?;
    Ok(RestoreReport {
        file: summary,
        old_cluster_id,
        cluster_id,
        index: last.map_or(0, |l| l.index),
        term,
    })
}

/// What a recovery did.
#[derive(Debug, Clone)]
pub struct RecoverReport {
    /// The last log index the node had, all of it kept.
    pub kept_last_index: u64,
    /// The term of that entry.
    pub kept_last_term: u64,
    /// The index of the new one-member configuration.
    pub config_index: u64,
    /// Its term.
    pub term: u64,
    /// The members that are no longer in the configuration.
    pub removed: Vec<NodeId>,
}

/// Forces a one-member configuration (this node alone) onto the stopped
/// node's Raft store at `raft_dir`, keeping every entry it has. With
/// `dry_run` it only reports what it would do.
pub async fn recover(raft_dir: &Path, node_id: NodeId, dry_run: bool) -> Result<RecoverReport> {
    let (mut log, mut sm, engine) = open(raft_dir, node_id)?;
    let state = log.get_log_state().await.map_err(storage_err)?;
    let Some(last) = state.last_log_id else {
        return Err(ConsensusError::invalid(
            "data_dir",
            "holds no Raft log: this node never belonged to a cluster",
        ));
    };
    let vote = log.read_vote().await.map_err(storage_err)?.unwrap_or_default();
    // The newest configuration: the applied one, or a later one in the log.
    let (_, applied_membership) = sm.applied_state().await.map_err(storage_err)?;
    let mut membership = applied_membership.membership().clone();
    let from = state.last_purged_log_id.map_or(0, |l| l.index + 1);
    let entries = log.try_get_log_entries(from..=last.index).await.map_err(storage_err)?;
    for entry in &entries {
        if let EntryPayload::Membership(m) = &entry.payload {
            membership = m.clone();
        }
    }
    let Some(info) = membership.get_node(&node_id).cloned() else {
        return Err(ConsensusError::invalid(
            "data_dir",
            format!("node {node_id:016x} is not in its last known configuration; recover from a node that is"),
        ));
    };
    let removed: Vec<NodeId> = membership
        .nodes()
        .map(|(id, _)| *id)
        .filter(|id| *id != node_id)
        .collect();
    let term = vote.leader_id().term.max(last.leader_id.term) + 1;
    let entry = Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(term, node_id), last.index + 1),
        payload: EntryPayload::Membership(sole_member(node_id, info)),
    };
    let report = RecoverReport {
        kept_last_index: last.index,
        kept_last_term: last.leader_id.term,
        config_index: last.index + 1,
        term,
        removed,
    };
    if !dry_run {
        log.force_append(&[entry], &Vote::new(term, node_id))?;
        engine.flush()?;
    }
    Ok(report)
}
