//! The gossip worker: runs `cell0-gossip` for this node.
//!
//! It starts the libp2p transport with the node's key (`gossip.key` in the
//! data dir) and the cluster secret, runs `cell0_gossip::service` (its
//! heartbeat every `gossip.heartbeat_ms`, the membership table), and keeps
//! a copy of the table for `Cluster.Members` and autopilot
//! ([`GossipView`]).
//!
//! Invariants:
//! - A heartbeat is accepted (and relayed) only if it decodes within the
//!   crate's limits, names the libp2p key that signed it, and does not
//!   come from another cluster; a heartbeat of another cluster is refused
//!   with a warning naming both cluster ids, once per node.
//! - The worker knows nothing of Raft beyond reading this node's cluster
//!   id; membership changes are logged and counted, not written to the
//!   replicated state (formation and autopilot read the view and act
//!   through Raft's own membership calls).
//! - The view's ages are as of the last tick (100 ms at most) plus the time
//!   since it was taken.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use cell0_consensus::{Consensus, NodeInfo};
use cell0_gossip::service::{self, Observer};
use cell0_gossip::transport::{Transport, TransportConfig};
use cell0_gossip::{Addresses, DetectorConfig, Heartbeat, MemberState, MemberView, MembershipEvent};
use tokio::sync::watch;

use crate::config::GossipConfig;
use crate::supervisor::stopped;

/// The gossipsub topic of heartbeats (versioned with the heartbeat layout).
const TOPIC: &str = "cell0/heartbeats/1";

/// What this node's gossip knows, for the API.
#[derive(Clone, Default)]
pub struct GossipView {
    inner: Arc<RwLock<ViewState>>,
}

#[derive(Default)]
struct ViewState {
    /// This node's own heartbeat, as last sent (with its incarnation).
    local: Option<Heartbeat>,
    /// Every member known, with its age in ms at the last update.
    members: Vec<(MemberView, u64)>,
    /// When the copy was taken.
    taken: Option<Instant>,
}

/// One member as the API shows it.
pub struct MemberStatus {
    /// The member's latest heartbeat.
    pub heartbeat: Heartbeat,
    /// Its state.
    pub state: MemberState,
    /// Milliseconds since it was last heard.
    pub last_heard_ms_ago: u64,
}

impl GossipView {
    /// Every member known, this node included (alive, heard now), with its
    /// age as of now; empty when gossip is off.
    pub fn members(&self) -> Vec<MemberStatus> {
        let Ok(state) = self.inner.read() else {
            return Vec::new();
        };
        let since = state.taken.map_or(0, |t| t.elapsed().as_millis() as u64);
        let local = state.local.iter().map(|hb| MemberStatus {
            heartbeat: hb.clone(),
            state: MemberState::Alive,
            last_heard_ms_ago: 0,
        });
        state
            .members
            .iter()
            .map(|(m, age)| MemberStatus {
                heartbeat: m.heartbeat.clone(),
                state: m.state,
                last_heard_ms_ago: age.saturating_add(since),
            })
            .chain(local)
            .collect()
    }

    fn set_local(&self, hb: &Heartbeat) {
        if let Ok(mut state) = self.inner.write() {
            state.local = Some(hb.clone());
        }
    }

    fn publish(&self, members: Vec<MemberView>, now_ms: u64) {
        if let Ok(mut state) = self.inner.write() {
            state.members = members
                .into_iter()
                .map(|m| {
                    let age = now_ms.saturating_sub(m.last_heard_ms);
                    (m, age)
                })
                .collect();
            state.taken = Some(Instant::now());
        }
    }
}

/// Runs gossip for this node (`info` is what it advertises), contacting
/// `join` first, until `stop`.
pub async fn run(
    gossip: GossipConfig,
    join: Vec<String>,
    key_file: PathBuf,
    info: NodeInfo,
    consensus: Consensus,
    view: GossipView,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let gossip = &gossip;
    let keypair = cell0_gossip::load_or_create_keypair(&key_file)?;
    let secret = gossip.cluster_secret()?;
    let local_id = consensus.id();
    let peer_id = keypair.public().to_peer_id();
    let mut transport_config = TransportConfig::new(gossip.listen, keypair, TOPIC.to_string());
    transport_config.join = join;
    transport_config.psk = secret.map(|s| s.bytes());
    let validate = {
        let consensus = consensus.clone();
        let warned = Mutex::new(BTreeSet::new());
        move |source: &cell0_gossip::PeerId, data: &[u8]| accept(&consensus, &warned, source, data)
    };
    let stop_transport = {
        let mut stop = stop.clone();
        async move { stopped(&mut stop).await }
    };
    let transport = Transport::start(transport_config, validate, stop_transport)
        .await
        .with_context(|| format!("starting gossip on {}", gossip.listen))?;
    let advertised = gossip
        .advertise
        .clone()
        .unwrap_or_else(|| transport.listen_addr().to_string());
    tracing::info!(listen = %transport.listen_addr(), %peer_id, secret = secret.is_some(), "gossip started");
    let mut node = NodeObserver {
        template: Heartbeat::new(
            local_id,
            &peer_id,
            info.name,
            info.site,
            Addresses {
                public: info.public_addr,
                internal: info.internal_addr,
                gossip: advertised,
            },
        ),
        consensus,
        view,
    };
    service::run(
        transport,
        local_id,
        Duration::from_millis(gossip.heartbeat_ms),
        DetectorConfig::for_interval_ms(gossip.heartbeat_ms),
        &mut node,
        async move { stopped(&mut stop).await },
    )
    .await;
    tracing::info!("gossip stopped");
    Ok(())
}

/// The node's side of the gossip loop.
struct NodeObserver {
    /// This node's heartbeat, but for the cluster id.
    template: Heartbeat,
    consensus: Consensus,
    view: GossipView,
}

impl Observer for NodeObserver {
    fn heartbeat(&mut self) -> Heartbeat {
        let cluster_id = self.consensus.cluster_id();
        Heartbeat {
            cluster_id: (cluster_id != 0).then_some(cluster_id),
            ..self.template.clone()
        }
    }

    fn sent(&mut self, heartbeat: &Heartbeat) {
        self.view.set_local(heartbeat);
    }

    fn changed(&mut self, events: &[MembershipEvent]) {
        events.iter().for_each(record);
    }

    fn ticked(&mut self, members: Vec<MemberView>, now_ms: u64) {
        for state in [MemberState::Alive, MemberState::Suspect, MemberState::Dead] {
            let n = members.iter().filter(|m| m.state == state).count();
            metrics::gauge!("cell0_gossip_members", "state" => state.as_str()).set(n as f64);
        }
        self.view.publish(members, now_ms);
    }

    fn rtt(&mut self, rtt: Duration) {
        metrics::histogram!("cell0_gossip_heartbeat_rtt_seconds").record(rtt.as_secs_f64());
    }
}

/// Whether a received message is a heartbeat to accept.
fn accept(consensus: &Consensus, warned: &Mutex<BTreeSet<u64>>, source: &cell0_gossip::PeerId, data: &[u8]) -> bool {
    let hb = match Heartbeat::decode(data) {
        Ok(hb) => hb,
        Err(e) => {
            tracing::debug!(%source, error = %e, "refused a gossip message");
            return false;
        }
    };
    if hb.peer_id != source.to_string() {
        tracing::debug!(%source, claimed = %hb.peer_id, "refused a heartbeat signed by another key");
        return false;
    }
    let mine = consensus.cluster_id();
    if let Some(theirs) = hb.cluster_id
        && mine != 0
        && theirs != mine
    {
        if warned.lock().is_ok_and(|mut w| w.insert(hb.node_id)) {
            tracing::warn!(
                node = %format!("{:016x}", hb.node_id),
                name = %hb.name,
                their_cluster = %format!("{theirs:016x}"),
                our_cluster = %format!("{mine:016x}"),
                "refusing gossip from a node of another cluster (it shares the cluster secret but was formed apart)"
            );
        }
        return false;
    }
    true
}

/// Logs and counts one membership change.
fn record(event: &MembershipEvent) {
    match event {
        MembershipEvent::Joined(hb) => {
            tracing::info!(node = %format!("{:016x}", hb.node_id), name = %hb.name, gossip = %hb.addresses.gossip, "gossip: member heard");
        }
        MembershipEvent::Updated(hb) => {
            tracing::info!(node = %format!("{:016x}", hb.node_id), name = %hb.name, "gossip: member advertises new fields");
        }
        MembershipEvent::StateChanged {
            node_id,
            from,
            to,
            reason,
        } => {
            tracing::info!(node = %format!("{node_id:016x}"), from = from.as_str(), to = to.as_str(), ?reason, "gossip: member state changed");
            if *to == MemberState::Suspect {
                metrics::counter!("cell0_gossip_suspicions_total").increment(1);
            }
        }
        MembershipEvent::Refuted { incarnation } => {
            tracing::info!(incarnation, "gossip: refuting a suspicion of this node");
            metrics::counter!("cell0_gossip_refutations_total").increment(1);
        }
    }
}
