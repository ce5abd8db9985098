//! `cell0 node leave`: the node at `--endpoint` leaves the cluster
//! gracefully, like `consul leave`: its agents move to other nodes (a
//! drain), then it is removed from the Raft group through the leader.
//! Afterwards the process can be stopped; started again with `--join`, the
//! node asks to be added again and takes agents again.
//!
//! Invariants:
//! - The last voter never leaves (a cluster cannot remove itself), and the
//!   leader refuses a removal that would leave fewer reachable voters than
//!   a quorum.
//! - The node is removed only after its agents moved away or the drain's
//!   deadline moved the rest at once; agents are never dropped with it.

use std::time::{Duration, Instant};

use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::nodes_client::NodesClient;
use cell0_proto::v1::{self, MembersRequest, StatusRequest};

use super::{Conn, connect, rpc_error};

/// The reason of a leave's drain: a node that is added again ends a drain
/// with this reason (and no other), so it takes agents again.
pub const DRAIN_REASON: &str = "leaving the cluster (cell0 node leave)";

/// Agents of the leaving node that move at once, until the deadline moves
/// the rest together.
const DRAIN_PARALLEL: u32 = 1;

/// How often the drain's progress is read.
const POLL: Duration = Duration::from_millis(500);

/// How long, past the drain's deadline, agents may take to start elsewhere.
const MOVE_GRACE: Duration = Duration::from_secs(60);

/// `cell0 node leave`: drains the node `conn` reaches (the rest of its
/// agents move at once after `drain_deadline`), then removes it.
pub async fn leave(conn: Conn, drain_deadline: Duration) -> anyhow::Result<()> {
    let status = ClusterClient::new(conn.clone())
        .status(StatusRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let (id, name) = (status.node_id, status.node_name);
    if status.leader_id == 0 {
        anyhow::bail!("node {name} ({id:016x}) knows no leader: a node leaves through the leader; see `cell0 members`");
    }
    // The leader's view decides: a node that left cannot hear its own
    // removal, so its own view may still list it.
    let local_view = members_of(conn.clone()).await?;
    let leader = match local_view.iter().find(|m| m.id == status.leader_id && !m.gossip_only) {
        Some(l) if l.id != id => connect(&l.public_addr).await?,
        _ => conn,
    };
    let members = members_of(leader.clone()).await?;
    let Some(me) = members.iter().find(|m| m.id == id && !m.gossip_only) else {
        anyhow::bail!("node {name} ({id:016x}) is not a member of the cluster: it left already, or never joined");
    };
    let voters = members.iter().filter(|m| m.voter && !m.gossip_only).count();
    if me.voter && voters == 1 {
        anyhow::bail!(
            "node {name} ({id:016x}) is the cluster's only voter and cannot leave it: add nodes first, or stop it instead"
        );
    }
    drain(NodesClient::new(leader.clone()), id, &name, drain_deadline).await?;
    eprintln!("removing {name} ({id:016x}) from the Raft group");
    ClusterClient::new(leader)
        .remove(v1::RemoveRequest { node_id: id })
        .await
        .map_err(rpc_error)?;
    eprintln!(
        "node {name} ({id:016x}) left the cluster: stop its process now; started again with --join, it is added again"
    );
    Ok(())
}

async fn members_of(conn: Conn) -> anyhow::Result<Vec<v1::Member>> {
    Ok(ClusterClient::new(conn)
        .members(MembersRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner()
        .members)
}

/// Drains node `id` and waits until no agent is on it.
async fn drain(mut nodes: NodesClient<Conn>, id: u64, name: &str, deadline: Duration) -> anyhow::Result<()> {
    let agents_on = |list: v1::ListNodesResponse| list.nodes.into_iter().find(|n| n.id == id).map(|n| n.agents);
    let listed = nodes
        .list(v1::ListNodesRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    // A node that never reported its resources holds no agents: nothing to move.
    let Some(mut left) = agents_on(listed) else {
        return Ok(());
    };
    nodes
        .drain(v1::DrainNodeRequest {
            node: id,
            max_parallel: DRAIN_PARALLEL,
            deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            reason: DRAIN_REASON.into(),
        })
        .await
        .map_err(rpc_error)?;
    eprintln!("draining {name}: {left} agent(s) to move");
    let give_up = Instant::now() + deadline + MOVE_GRACE;
    while left > 0 {
        if Instant::now() > give_up {
            anyhow::bail!(
                "{left} agent(s) are still on {name} after {:?}; see `cell0 agent ls`, then leave again",
                deadline + MOVE_GRACE
            );
        }
        tokio::time::sleep(POLL).await;
        let listed = nodes
            .list(v1::ListNodesRequest {})
            .await
            .map_err(rpc_error)?
            .into_inner();
        let now = agents_on(listed).unwrap_or(0);
        if now != left {
            eprintln!("draining {name}: {now} agent(s) left");
            left = now;
        }
    }
    Ok(())
}
