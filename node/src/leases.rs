//! Node leases: the safety behind rescheduling (never two incarnations of
//! an agent whose effects count).
//!
//! Every node renews a lease with the Raft leader over the internal port
//! (`cell0.internal.v1.Leases/Renew`) every fifth of `agents.node_lease_ms`;
//! a renewal is not a Raft write. Times are monotonic (`Instant`):
//! - the node counts its lease from when it *sent* the last renewal the
//!   leader granted, and stops its agents once `lease - margin` passed
//!   without another ([`renew`], task `lease`);
//! - the leader counts from when it *received* the renewal, and only after
//!   confirming its leadership with a quorum (so a deposed leader's grant
//!   predates the new leader's term); it declares a node down, a Raft
//!   command with the reason, once `lease + margin` passed ([`expire`],
//!   task `lease-expiry`);
//! - a new leader grants every node a full lease from the moment it saw
//!   itself leader, as it knows nothing of the old leader's grants;
//! - a leader's decisions from its grants are proposed only in its own
//!   term ([`Consensus::propose_as_leader`]): a leader frozen past its term
//!   that wakes up sees every lease expired, and its verdict must not reach
//!   the new leader through forwarding.
//!
//! Since a renewal is received after it is sent, the node's deadline comes
//! at least `2 * margin` before the leader's, which covers clock-rate
//! differences and scheduling delays. A node declared down that renews
//! again is set ready by the leader; its old allocations were already
//! superseded, so it does not restart them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_consensus::agents::{self, AgentCommand, NodeState};
use cell0_consensus::{Consensus, Consistency, NodeId, Role, nodes};
use cell0_proto::internal::leases_client::LeasesClient;
use cell0_proto::internal::leases_server::{Leases, LeasesServer};
use cell0_proto::internal::{RenewLeaseReply, RenewLeaseRequest};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::config::AgentsConfig;
use crate::scheduling::now_ms;
use crate::supervisor::stopped;

/// What the leader knows of the leases it granted in its current term.
#[derive(Debug, Default)]
struct Grants {
    /// The term these grants belong to.
    term: Option<u64>,
    /// When each node's last renewal was received, or when this leader
    /// first saw the node in this term (a full lease from then).
    renewed: BTreeMap<NodeId, Instant>,
}

/// The leader's side: the renewal service and the expiry loop share it.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    consensus: Consensus,
    grants: Arc<Mutex<Grants>>,
}

impl LeaseTable {
    /// A table for this node's terms as leader.
    pub fn new(consensus: Consensus) -> Self {
        Self {
            consensus,
            grants: Arc::new(Mutex::new(Grants::default())),
        }
    }

    /// The internal gRPC service answering renewals.
    pub fn service(&self) -> LeasesServer<LeaseTable> {
        LeasesServer::new(self.clone())
    }

    /// The grants for `term`, emptied when the term is new (every node is
    /// then granted a full lease from when this leader first looks).
    fn with_term<T>(&self, term: u64, f: impl FnOnce(&mut Grants) -> T) -> T {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if grants.term != Some(term) {
            *grants = Grants {
                term: Some(term),
                renewed: BTreeMap::new(),
            };
        }
        f(&mut grants)
    }
}

#[tonic::async_trait]
impl Leases for LeaseTable {
    async fn renew(&self, request: Request<RenewLeaseRequest>) -> Result<Response<RenewLeaseReply>, Status> {
        let req = request.into_inner();
        if req.cluster_id != self.consensus.cluster_id() {
            return Err(Status::failed_precondition(format!(
                "node {:016x} belongs to cluster {:016x}, this is {:016x}",
                req.node_id,
                req.cluster_id,
                self.consensus.cluster_id()
            )));
        }
        let received = Instant::now();
        let term = self.consensus.status().term;
        // Leadership confirmed after the request arrived (by a quorum
        // round, or by the leader lease, under which no other leader can
        // exist): a newer leader's term begins after this grant.
        if let Err(e) = self.consensus.raft().ensure_linearizable().await {
            return Err(Status::failed_precondition(format!("not the leader: {e}")));
        }
        if self.consensus.status().term != term {
            return Err(Status::failed_precondition(
                "the term changed; renew with the new leader",
            ));
        }
        self.with_term(term, |g| g.renewed.insert(req.node_id, received));
        metrics::counter!("cell0_lease_renewals_granted_total").increment(1);
        let status = self
            .consensus
            .read(Consistency::Serializable, move |txn| {
                agents::node_status(txn, req.node_id)
            })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if status.state == NodeState::Down {
            let command = AgentCommand::SetNodeState {
                node: req.node_id,
                state: NodeState::Ready,
                reason: "lease renewed".into(),
                at_ms: now_ms(),
            };
            self.consensus
                .propose_as_leader(command.into_command(), term)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            tracing::info!(
                node = format_args!("{:016x}", req.node_id),
                "node renewed its lease again: ready"
            );
        }
        Ok(Response::new(RenewLeaseReply {
            leader_id: self.consensus.id(),
        }))
    }
}

/// Task `lease-expiry`: while this node leads, declares down every node
/// whose lease expired (by `lease + margin`). It wakes when the next lease
/// runs out, when leadership changes, and at least every `lease_margin` (to
/// see nodes that joined).
pub async fn expire(table: LeaseTable, config: AgentsConfig, mut stop: watch::Receiver<bool>) {
    let deadline = config.node_lease() + config.lease_margin();
    let idle = config.lease_margin();
    let mut leadership = table.consensus.raft().server_metrics();
    let mut wake = Instant::now() + idle;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            r = leadership.changed() => {
                if r.is_err() {
                    return;
                }
            }
            () = stopped(&mut stop) => return,
        }
        wake = Instant::now() + idle;
        let status = table.consensus.status();
        if status.role != Role::Leader {
            continue;
        }
        let check = match check_leases(&table, status.term, deadline).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read node leases");
                continue;
            }
        };
        if let Some(next) = check.next_expiry {
            wake = wake.min(next);
        }
        for (node, silent) in check.expired {
            let reason = format!("lease expired: no renewal for {} ms", silent.as_millis());
            tracing::warn!(node = format_args!("{node:016x}"), %reason, "declaring node down");
            let command = AgentCommand::SetNodeState {
                node,
                state: NodeState::Down,
                reason,
                at_ms: now_ms(),
            };
            // Decided from this term's grants: it must not be forwarded
            // to a later leader, which granted the node a new lease.
            match table
                .consensus
                .propose_as_leader(command.into_command(), status.term)
                .await
            {
                Ok(_) => metrics::counter!("cell0_lease_expiries_total").increment(1),
                Err(e) => tracing::warn!(error = %e, "cannot declare a node down; will retry"),
            }
        }
    }
}

/// The leader's leases at one moment.
struct LeaseCheck {
    /// Nodes not down whose lease expired, with how long they were silent.
    expired: Vec<(NodeId, Duration)>,
    /// When the first of the other leases expires.
    next_expiry: Option<Instant>,
}

/// Checks the lease of every node that is not down.
async fn check_leases(table: &LeaseTable, term: u64, deadline: Duration) -> cell0_consensus::Result<LeaseCheck> {
    let up = table
        .consensus
        .read(Consistency::Serializable, |txn| {
            let statuses = agents::node_statuses(txn)?;
            Ok(nodes::resources(txn)?
                .into_keys()
                .filter(|id| statuses.get(id).is_none_or(|s| s.state != NodeState::Down))
                .collect::<Vec<_>>())
        })
        .await?;
    let now = Instant::now();
    Ok(table.with_term(term, |g| {
        let mut check = LeaseCheck {
            expired: Vec::new(),
            next_expiry: None,
        };
        for id in up {
            // A node this term has not seen yet (a new leader, a node that
            // just joined) is granted a full lease from now.
            let last = *g.renewed.entry(id).or_insert(now);
            let silent = now.saturating_duration_since(last);
            if silent >= deadline {
                check.expired.push((id, silent));
            } else {
                let at = last + deadline;
                check.next_expiry = Some(check.next_expiry.map_or(at, |n| n.min(at)));
            }
        }
        check
    }))
}

/// What task `lease` publishes to the agent runner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// The node holds its lease: its agents may run.
    pub held: bool,
    /// How many times the lease was granted after not being held. A reader
    /// that sees this number change knows the lease lapsed and came back in
    /// between, even if it never saw `held` false.
    pub grant: u64,
}

/// Pause before retrying a failed renewal (sooner when a new leader shows
/// up), capped at the renewal period.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Task `lease`: renews this node's lease with the leader and publishes
/// whether it holds one, and how many times it was granted ([`LeaseState`]).
///
/// It renews every fifth of the lease, so an election shorter than about
/// `lease * 4/5 - margin` (1.5 s at the defaults) ends before any node's
/// lease runs out: a failed renewal is retried every [`RETRY_PAUSE`] and at
/// once when the node learns of a new leader.
pub async fn renew(
    consensus: Consensus,
    config: AgentsConfig,
    held: watch::Sender<LeaseState>,
    mut stop: watch::Receiver<bool>,
) {
    let every = config.renewal_period();
    let retry = RETRY_PAUSE.min(every);
    let valid_for = config.node_lease() - config.lease_margin();
    let mut leadership = consensus.raft().server_metrics();
    let mut valid_until: Option<Instant> = None;
    loop {
        // Read each time: a joining node learns its cluster's id on joining.
        let request = RenewLeaseRequest {
            cluster_id: consensus.cluster_id(),
            node_id: consensus.id(),
        };
        let sent = Instant::now();
        let expiry = valid_until.filter(|u| *u > sent);
        let attempt = tokio::select! {
            r = renew_once(&consensus, request, every) => r,
            // The lease may run out while a renewal hangs.
            () = tokio::time::sleep_until(expiry.unwrap_or(sent)), if expiry.is_some() => {
                Err("lease ran out while renewing".to_string())
            }
            () = stopped(&mut stop) => return,
        };
        let failed = attempt.is_err();
        let next = match attempt {
            Ok(()) => {
                valid_until = Some(sent + valid_for);
                held.send_if_modified(|s| {
                    if s.held {
                        return false;
                    }
                    s.held = true;
                    s.grant += 1;
                    true
                });
                sent + every
            }
            Err(e) => {
                metrics::counter!("cell0_lease_renewal_failures_total").increment(1);
                tracing::debug!(error = %e, "lease renewal failed");
                leadership.borrow_and_update();
                Instant::now() + retry
            }
        };
        loop {
            let lapsed = valid_until.is_some_and(|u| Instant::now() >= u);
            if lapsed && held.borrow().held {
                tracing::warn!("lease lapsed: stopping this node's agents");
                held.send_modify(|s| s.held = false);
            }
            let wake = match valid_until {
                Some(u) if u > Instant::now() && u < next => u,
                _ => next,
            };
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                // After a failure, a change of leader is worth a retry now.
                r = leadership.changed(), if failed => {
                    if r.is_err() {
                        return;
                    }
                    break;
                }
                () = stopped(&mut stop) => return,
            }
            if Instant::now() >= next {
                break;
            }
        }
    }
}

async fn renew_once(consensus: &Consensus, request: RenewLeaseRequest, timeout: Duration) -> Result<(), String> {
    let Some((_, leader)) = consensus.leader() else {
        return Err("no leader known".into());
    };
    let channel = consensus
        .channels()
        .channel(&leader.internal_addr)
        .map_err(|e| e.to_string())?;
    let mut request = Request::new(request);
    request.set_timeout(timeout);
    LeasesClient::new(channel)
        .renew(request)
        .await
        .map(|_| ())
        .map_err(|e| e.message().to_string())
}
