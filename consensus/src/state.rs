//! The state machine as openraft sees it: [`cell0_state`]'s deterministic
//! apply, plus what a running node needs around it.
//!
//! - Notifications: after each stored apply, the key-value events go out on
//!   an in-process broadcast ([`Applied`]) for watchers, bounded in bytes
//!   (a large apply is announced as [`Applied::Resync`]), and every table the
//!   apply changed bumps that table's generation ([`TableWatch`]), so any
//!   subsystem waits for "this table changed since generation G" without
//!   polling and without lagging.
//! - The cluster id, cached from the applied state for the transport.
//! - The replica's index of kept requests ([`RequestIndex`]), across
//!   applies, emptied before a snapshot replaces the state.
//!
//! The read functions of the key-value table are re-exported from
//! [`cell0_state::kv`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cell0_state::{RequestIndex, Table, Txn};
use cell0_storage::Apply;
use openraft::LogId;
use tokio::sync::{broadcast, watch};

pub use cell0_state::kv::{
    MAX_RANGE_BYTES, MAX_RANGE_LIMIT, REQUEST_WINDOW_BYTES, REQUEST_WINDOW_ENTRIES, WATCH_HISTORY, cluster_id, get,
    history, range, revision,
};
pub use cell0_state::{EventKind, StateEvent};

use crate::command::Response;
use crate::error::Result;
use crate::types::{SharedCommand, TypeConfig};

/// Most bytes of events one apply notification carries; a larger apply is
/// announced as [`Applied::Resync`] and subscribers re-read the history, so
/// the broadcast buffer stays bounded in bytes.
pub const MAX_NOTIFICATION_BYTES: usize = 64 * 1024;
/// Apply notifications buffered per subscriber before it lags.
pub const NOTIFICATION_CAPACITY: usize = 1024;

/// What the state machine publishes after each stored apply.
#[derive(Debug, Clone)]
pub enum Applied {
    /// Changes of one apply call, in revision order (possibly empty).
    Events(Arc<[StateEvent]>),
    /// A snapshot replaced the state: subscribers must re-read from history.
    Reset {
        /// The store revision after the install.
        revision: u64,
    },
    /// An apply changed more than one notification may carry
    /// ([`MAX_NOTIFICATION_BYTES`]): subscribers re-read from history.
    Resync {
        /// The store revision after the apply.
        revision: u64,
    },
}

/// A receiver of one table's change generation: it changes after every
/// stored apply that changed the table, and after every snapshot install.
pub type TableWatch = watch::Receiver<u64>;

/// What openraft's state machine store applies through.
pub struct KvStateMachine {
    events: broadcast::Sender<Applied>,
    /// Cached current revision, for status reports without a read.
    revision: AtomicU64,
    /// One generation counter per table.
    tables: BTreeMap<Table, watch::Sender<u64>>,
    /// Tables changed by applies not yet published.
    pending: Mutex<BTreeSet<Table>>,
    /// The cluster id once known (0 before), shared with the transport.
    cluster_id: Arc<AtomicU64>,
    /// Approximate bytes of the commands applied since start (snapshot
    /// scheduling, see `crate::snapshots`).
    applied_bytes: AtomicU64,
    /// The requests the window kept while this process applied
    /// ([`RequestIndex`]); emptied when a snapshot replaces the state.
    requests: Mutex<RequestIndex>,
}

impl KvStateMachine {
    /// A state machine whose broadcast buffers `capacity` apply notifications
    /// per subscriber before it lags.
    pub fn new(capacity: usize) -> Self {
        let (events, _) = broadcast::channel(capacity.max(1));
        Self {
            events,
            revision: AtomicU64::new(0),
            tables: Table::ALL.into_iter().map(|t| (t, watch::Sender::new(0))).collect(),
            pending: Mutex::new(BTreeSet::new()),
            cluster_id: Arc::new(AtomicU64::new(0)),
            applied_bytes: AtomicU64::new(0),
            requests: Mutex::new(RequestIndex::default()),
        }
    }

    /// The index of kept requests; one poisoned by a panic is emptied (an
    /// empty index rules nothing out).
    fn requests(&self) -> MutexGuard<'_, RequestIndex> {
        self.requests.lock().unwrap_or_else(|poisoned| {
            let mut index = poisoned.into_inner();
            index.clear();
            self.requests.clear_poison();
            index
        })
    }

    /// Approximate bytes of the commands applied since this process started.
    pub(crate) fn applied_bytes(&self) -> u64 {
        self.applied_bytes.load(Ordering::Relaxed)
    }

    /// The cluster id as applied locally (0 while unknown), shared.
    pub fn cluster_id_cell(&self) -> Arc<AtomicU64> {
        self.cluster_id.clone()
    }

    fn learn_cluster_id(&self, txn: &dyn Txn) -> Result<()> {
        if self.cluster_id.load(Ordering::Acquire) == 0 {
            self.cluster_id.store(cluster_id(txn)?, Ordering::Release);
        }
        Ok(())
    }

    /// A receiver that sees a new generation after each stored change of
    /// `table`.
    pub fn watch_table(&self, table: Table) -> TableWatch {
        match self.tables.get(&table) {
            Some(sender) => sender.subscribe(),
            // Every table has a sender (built from Table::ALL); a receiver of
            // a fresh channel never changes, which is also correct for a
            // table nobody writes.
            None => watch::Sender::new(0).subscribe(),
        }
    }

    fn bump(&self, tables: impl IntoIterator<Item = Table>) {
        for table in tables {
            if let Some(sender) = self.tables.get(&table) {
                sender.send_modify(|generation| *generation += 1);
            }
        }
    }

    /// Subscribes to apply notifications.
    pub fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.events.subscribe()
    }

    /// The revision of the last stored apply, as cached.
    pub fn cached_revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Loads the cached revision and cluster id from storage (after open).
    pub fn load_revision(&self, txn: &dyn Txn) -> Result<()> {
        self.revision.store(revision(txn)?, Ordering::Release);
        self.learn_cluster_id(txn)
    }
}

impl Apply<TypeConfig> for KvStateMachine {
    type Event = StateEvent;

    fn apply(
        &self,
        txn: &mut dyn Txn,
        _log_id: &LogId<u64>,
        cmd: &SharedCommand,
        events: &mut Vec<StateEvent>,
    ) -> cell0_storage::Result<Response> {
        self.applied_bytes
            .fetch_add(cmd.approx_size() as u64, Ordering::Relaxed);
        let applied = cell0_state::apply_indexed(txn, cmd, &mut self.requests())
            .map_err(|cell0_state::ApplyError::Fatal(e)| e)?;
        events.extend(applied.events);
        if applied.changed.contains(&Table::Cluster) {
            self.learn_cluster_id(txn)
                .map_err(|e| cell0_storage::Error::Io(e.to_string()))?;
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(applied.changed);
        Ok(applied.response)
    }

    fn empty_response(&self) -> Response {
        Response::Empty
    }

    fn publish(&self, events: Vec<StateEvent>) {
        if let Some(last) = events.last() {
            self.revision.store(last.revision(), Ordering::Release);
        }
        // No subscriber is not an error: watchers come and go. A large apply
        // is announced without its events, so the buffer stays bounded.
        let bytes: usize = events.iter().map(|e| e.kv.key.len() + e.kv.value.len() + 64).sum();
        let notification = if bytes > MAX_NOTIFICATION_BYTES {
            Applied::Resync {
                revision: self.cached_revision(),
            }
        } else {
            Applied::Events(events.into())
        };
        let _ = self.events.send(notification);
        let changed = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        self.bump(changed);
    }

    fn cluster_id(&self, state: &dyn Txn) -> u64 {
        cell0_state::kv::cluster_id(state).unwrap_or(0)
    }

    fn state_replacing(&self) {
        self.requests().clear();
    }

    fn snapshot_installed(&self, state: &dyn Txn) {
        match revision(state) {
            Ok(rev) => self.revision.store(rev, Ordering::Release),
            Err(e) => tracing::error!(error = %e, "reading the revision of an installed snapshot"),
        }
        if let Err(e) = self.learn_cluster_id(state) {
            tracing::error!(error = %e, "reading the cluster id of an installed snapshot");
        }
        // Subscribers missed the changes the snapshot covers: they resync
        // from the retained history, and every table may have changed.
        let _ = self.events.send(Applied::Reset {
            revision: self.cached_revision(),
        });
        self.bump(Table::ALL);
    }
}

#[cfg(test)]
mod tests {
    use cell0_state::{Command, MemTxn, RequestId};

    use super::*;

    fn request(seq: u64) -> SharedCommand {
        SharedCommand::from(Command::RequestV2 {
            id: RequestId { client: 7, seq },
            cmd: Box::new(Command::Put {
                key: format!("k{seq}").into_bytes(),
                value: b"v".to_vec(),
            }),
        })
    }

    fn apply(sm: &KvStateMachine, state: &mut MemTxn, seq: u64) -> Response {
        let log_id = LogId::default();
        sm.apply(state, &log_id, &request(seq), &mut Vec::new()).unwrap()
    }

    #[test]
    fn a_replaced_state_is_not_judged_by_the_old_ones_index() {
        // Another replica's state, which kept request 3 (after 5).
        let mut snapshot = MemTxn::new();
        let other = KvStateMachine::new(8);
        for seq in [5, 3] {
            apply(&other, &mut snapshot, seq);
        }
        let kept = apply(&other, &mut snapshot, 3);

        // This replica kept 5 only: its index rules 3 out.
        let sm = KvStateMachine::new(8);
        let mut state = MemTxn::new();
        apply(&sm, &mut state, 5);
        // The snapshot replaces the state: a retry of 3 gets the kept answer
        // and is not applied again.
        sm.state_replacing();
        let mut state = snapshot.clone();
        assert_eq!(apply(&sm, &mut state, 3), kept);
        assert!(state.rows().eq(snapshot.rows()), "nothing applied again");
    }
}
