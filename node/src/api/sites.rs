//! `cell0.v1.Sites`: the federation catalog, answered from this node's
//! site links without a Raft round (its own site from the local replica).

use std::time::Duration;

use cell0_consensus::Consensus;
use cell0_federation::{Federation, SiteStatus, SiteView};
use cell0_proto::federation::v1::SiteSummary;
use cell0_proto::v1::sites_server::Sites;
use cell0_proto::v1::{self};
use tonic::{Request, Response, Status};

use super::RequestGate;

/// The Sites service of one node.
pub struct SitesApi {
    consensus: Consensus,
    federation: Option<Federation>,
    /// This node's federation address, when it runs site links.
    advertise: Option<String>,
    gate: RequestGate,
}

impl SitesApi {
    /// A service answering from `federation` (none when this node runs no
    /// site links: then only its own site is listed).
    pub fn new(
        consensus: Consensus,
        federation: Option<Federation>,
        advertise: Option<String>,
        gate: RequestGate,
    ) -> Self {
        Self {
            consensus,
            federation,
            advertise,
            gate,
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A site on the wire.
fn site_to_proto(
    s: SiteSummary,
    status: v1::SiteStatus,
    rtt_us: u64,
    last_heard_ms: u64,
    gateways: Vec<String>,
) -> v1::SiteInfo {
    v1::SiteInfo {
        name: s.site,
        status: status as i32,
        cluster_id: s.cluster_id,
        leader_id: s.leader_id,
        leader_name: s.leader_name,
        nodes: s
            .nodes
            .into_iter()
            .map(|n| v1::SiteNode {
                id: n.id,
                name: n.name,
                voter: n.voter,
                public_addr: n.public_addr,
            })
            .collect(),
        cpu_millis: s.cpu_millis,
        memory_mb: s.memory_mb,
        gpu_memory_mb: s.gpu_memory_mb,
        version: s.version,
        gateways,
        rtt_us,
        last_heard_ms,
        rtts: s
            .rtts
            .into_iter()
            .map(|r| v1::SiteRtt {
                site: r.site,
                rtt_us: r.rtt_us,
            })
            .collect(),
    }
}

fn view_to_proto(v: SiteView) -> v1::SiteInfo {
    let status = match v.status {
        SiteStatus::Alive => v1::SiteStatus::Alive,
        SiteStatus::Unreachable => v1::SiteStatus::Unreachable,
    };
    let last_heard_ms = u64::try_from(v.last_heard.as_millis()).unwrap_or(u64::MAX);
    site_to_proto(v.summary, status, v.rtt.map_or(0, micros), last_heard_ms, v.gateways)
}

#[tonic::async_trait]
impl Sites for SitesApi {
    async fn list(&self, _request: Request<v1::ListSitesRequest>) -> Result<Response<v1::ListSitesResponse>, Status> {
        self.gate
            .observe("Sites/List", async {
                let rtts = self.federation.as_ref().map(Federation::rtts).unwrap_or_default();
                let gateways = self.advertise.iter().cloned().collect();
                let local = crate::federation::local_summary(&self.consensus, gateways, rtts, 0).await?;
                let gateways = local.gateways.clone();
                let mut sites = vec![site_to_proto(local, v1::SiteStatus::Local, 0, 0, gateways)];
                if let Some(f) = &self.federation {
                    sites.extend(f.sites().into_iter().map(view_to_proto));
                }
                Ok(Response::new(v1::ListSitesResponse {
                    local_site: self.consensus.info().site.clone(),
                    sites,
                }))
            })
            .await
    }
}
