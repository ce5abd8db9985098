//! Early replication: a leader sends its new entries to its followers
//! while it writes them itself.
//!
//! openraft 0.9 runs a leader's log append inside its core task and starts
//! replicating only once the append's fsync returned, so a write pays the
//! leader's fsync and then a follower's, one after the other. etcd's leader
//! sends first and writes meanwhile, paying about one. Here the log store
//! shows the leader's entries to [`EarlyReplication`] before its synced
//! write ([`cell0_storage::LeaderAppend`]), and it sends them at once to
//! every idle peer as an ordinary AppendEntries call: the leader's vote,
//! the exact log id before the entries, no commit index. The follower
//! appends and fsyncs them while the leader does; when openraft's own
//! replication call with the same entries arrives, the follower already
//! holds them and answers without writing.
//!
//! Invariants (why this is safe):
//! - The call carries what an AppendEntries call from this leader would:
//!   its committed vote, entries of its own log and the log id before them
//!   as the log store knows it for sure (never guessed; see
//!   `cell0_storage::LeaderAppend`). Raft allows a leader to send such a
//!   call at any time, in any order with its other calls.
//! - Its answer is dropped: the leader counts a follower only from
//!   openraft's own replication, and itself only once its own write is
//!   durable. Nothing about commit changes.
//! - It never carries a commit index, so a follower learns nothing from it
//!   but the entries.
//!
//! It only helps when replication is idle (one client, few writers): a peer
//! with a replication call in flight, or an early call not yet answered,
//! is skipped, so under load nothing is sent twice. Entries above
//! `raft.early_append_bytes` are never sent early.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_storage::LeaderAppend;
use openraft::raft::AppendEntriesRequest;
use openraft::{Entry, LogId, Vote};

use crate::network::{ChannelPool, WireIdentity, encode};
use crate::types::{NodeId, TypeConfig};

/// Whether calls to one peer are under way.
#[derive(Debug, Default)]
pub(crate) struct PeerCalls {
    /// openraft's replication has a call with entries in flight.
    replicating: AtomicBool,
    /// An early call has not been answered yet.
    early: AtomicBool,
}

impl PeerCalls {
    /// Marks openraft's replication call with entries as in flight until
    /// the guard drops.
    pub(crate) fn replicating(self: &Arc<Self>) -> ReplicatingGuard {
        self.replicating.store(true, Ordering::Release);
        ReplicatingGuard(self.clone())
    }
}

/// Clears [`PeerCalls::replicating`] when dropped (the call returned or
/// openraft's timeout dropped it).
pub(crate) struct ReplicatingGuard(Arc<PeerCalls>);

impl Drop for ReplicatingGuard {
    fn drop(&mut self) {
        self.0.replicating.store(false, Ordering::Release);
    }
}

/// A replication target: where it is and what is in flight to it.
#[derive(Debug)]
struct Peer {
    addr: String,
    calls: Arc<PeerCalls>,
}

/// The leader side of early replication, shared by the log store (which
/// calls it) and the network factory (which registers the peers openraft
/// replicates to).
#[derive(Debug)]
pub(crate) struct EarlyReplication {
    pool: Arc<ChannelPool>,
    identity: WireIdentity,
    /// The connections openraft holds to each peer, newest last (votes
    /// open their own for a while; replication holds one for as long as
    /// it replicates to the peer).
    peers: Mutex<BTreeMap<NodeId, Vec<Peer>>>,
    /// Most bytes of entries sent early (0: never).
    max_bytes: usize,
    /// How long an early call may take.
    timeout: Duration,
    runtime: tokio::runtime::Handle,
}

impl EarlyReplication {
    /// Sends entries of up to `max_bytes` early through `pool`, each call
    /// bounded by `timeout`, on the current runtime.
    pub(crate) fn new(pool: Arc<ChannelPool>, identity: WireIdentity, max_bytes: usize, timeout: Duration) -> Self {
        Self {
            pool,
            identity,
            peers: Mutex::new(BTreeMap::new()),
            max_bytes,
            timeout,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Vec<Peer>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// openraft made a connection to `target` at `addr`: early calls go
    /// there from now on (to the newest connection to a peer). The
    /// returned calls are the connection's to mark.
    pub(crate) fn register(&self, target: NodeId, addr: &str) -> Arc<PeerCalls> {
        let calls = Arc::new(PeerCalls::default());
        self.peers().entry(target).or_default().push(Peer {
            addr: addr.to_string(),
            calls: calls.clone(),
        });
        calls
    }

    /// openraft dropped the connection that registered `calls` (the peer
    /// left, or its replication was rebuilt).
    pub(crate) fn unregister(&self, target: NodeId, calls: &Arc<PeerCalls>) {
        let mut peers = self.peers();
        if let Some(held) = peers.get_mut(&target) {
            held.retain(|p| !Arc::ptr_eq(&p.calls, calls));
            if held.is_empty() {
                peers.remove(&target);
            }
        }
    }
}

impl LeaderAppend<TypeConfig> for EarlyReplication {
    fn node(&self) -> u64 {
        self.identity.node
    }

    fn appending(&self, vote: &Vote<u64>, prev: Option<LogId<u64>>, entries: &[Entry<TypeConfig>], bytes: usize) {
        if bytes > self.max_bytes {
            return;
        }
        let idle: Vec<(NodeId, String, Arc<PeerCalls>)> = self
            .peers()
            .iter()
            .filter_map(|(id, held)| Some((id, held.last()?)))
            .filter(|(_, p)| !p.calls.replicating.load(Ordering::Acquire))
            .filter(|(_, p)| !p.calls.early.swap(true, Ordering::AcqRel))
            .map(|(id, p)| (*id, p.addr.clone(), p.calls.clone()))
            .collect();
        if idle.is_empty() {
            return;
        }
        let request = AppendEntriesRequest::<TypeConfig> {
            vote: *vote,
            prev_log_id: prev,
            entries: entries.to_vec(),
            leader_commit: None,
        };
        let message = match encode(&request) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "encoding an early append failed");
                for (_, _, calls) in &idle {
                    calls.early.store(false, Ordering::Release);
                }
                return;
            }
        };
        for (target, addr, calls) in idle {
            let message = self.identity.stamp(message.clone(), target);
            let pool = self.pool.clone();
            let timeout = self.timeout;
            metrics::counter!("cell0_raft_early_appends_total").increment(1);
            // One call, bounded by its timeout; not a loop.
            self.runtime.spawn(async move {
                let mut request = tonic::Request::new(message);
                request.set_timeout(timeout);
                if let Ok(mut client) = pool.client(&addr) {
                    // The answer is dropped: openraft's own call counts.
                    let _ = client.append_entries(request).await;
                }
                calls.early.store(false, Ordering::Release);
            });
        }
    }
}
