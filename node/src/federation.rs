//! Site links wired into the node: this site's summary, built from the
//! local replica and Raft status every [`CHANGE_CHECK`], goes to the site
//! links of `cell0-federation` at once when it changed (leader, nodes,
//! capacity, version, gateways) and at least every `federation.publish_ms`;
//! the catalog they fill answers `cell0.v1.Sites/List` (`api::sites`).
//!
//! Every gateway of a site publishes the summary it sees locally
//! (serializable reads: no Raft round per summary); other sites keep the
//! newest by Raft position (`cell0_federation::catalog`). Each site stays
//! its own Raft group: nothing here writes to Raft.

use std::collections::BTreeMap;
use std::time::Duration;

use cell0_consensus::{Consensus, Consistency, nodes};
use cell0_federation::{Federation, LinkConfig};
use cell0_proto::federation::v1::{NodeSummary, SiteRtt, SiteSummary};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::supervisor::stopped;

/// Bytes in a mebibyte.
const MIB: u64 = 1024 * 1024;

/// How often the summary is built to see whether the site changed.
pub const CHANGE_CHECK: Duration = Duration::from_millis(100);

/// The site links' settings from the node's configuration.
pub fn link_config(config: &NodeConfig, node_id: u64, node_name: &str) -> LinkConfig {
    LinkConfig {
        site: config.site.clone(),
        node_id,
        node_name: node_name.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        listen: config.federation.listen,
        advertise: config.federation.advertise_addr(),
        join: config.federation.join.clone(),
        site_timeout: Duration::from_millis(config.federation.site_timeout_ms),
        allowed_sites: config.federation.allowed_sites.clone(),
    }
}

/// This site as this node sees it: Raft position and leader, members,
/// the capacity the nodes reported, and `gateways` and `rtts` from the
/// site links (`seq` orders this node's summaries).
pub async fn local_summary(
    consensus: &Consensus,
    gateways: Vec<String>,
    rtts: BTreeMap<String, Duration>,
    seq: u64,
) -> cell0_consensus::Result<SiteSummary> {
    let status = consensus.status();
    let info = consensus.info();
    let resources = consensus.read(Consistency::Serializable, nodes::resources).await?;
    let members = consensus.members();
    let leader_name = members
        .iter()
        .find(|m| Some(m.id) == status.leader)
        .map(|m| m.info.name.clone())
        .unwrap_or_default();
    Ok(SiteSummary {
        site: info.site.clone(),
        cluster_id: consensus.cluster_id(),
        term: status.term,
        applied_index: status.applied_index,
        seq,
        node_id: status.id,
        leader_id: status.leader.unwrap_or(0),
        leader_name,
        nodes: members
            .into_iter()
            .map(|m| NodeSummary {
                id: m.id,
                name: m.info.name,
                voter: m.voter,
                public_addr: m.info.public_addr,
            })
            .collect(),
        cpu_millis: resources.values().map(|r| u64::from(r.cpu_cores) * 1000).sum(),
        memory_mb: resources.values().map(|r| r.memory_bytes / MIB).sum(),
        gpu_memory_mb: resources.values().map(|r| r.gpu_memory_bytes / MIB).sum(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        gateways,
        rtts: rtts
            .into_iter()
            .map(|(site, rtt)| SiteRtt {
                site,
                rtt_us: u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX),
            })
            .collect(),
    })
}

/// What a summary says about the site, without what moves on every write
/// or every measurement (Raft position, sequence, RTTs).
fn content(s: &SiteSummary) -> SiteSummary {
    SiteSummary {
        term: 0,
        applied_index: 0,
        seq: 0,
        rtts: Vec::new(),
        ..s.clone()
    }
}

/// The `federation-summary` task: builds this site's summary every
/// [`CHANGE_CHECK`] and publishes it when it changed or `every` passed
/// since the last one, until stopped. A failed read skips one round.
pub async fn publish(
    consensus: Consensus,
    federation: Federation,
    advertise: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(CHANGE_CHECK.min(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last: Option<(SiteSummary, tokio::time::Instant)> = None;
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return Ok(()),
            _ = tick.tick() => {}
        }
        let summary = match local_summary(&consensus, vec![advertise.clone()], federation.rtts(), seq + 1).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot build this site's summary; skipping one round");
                continue;
            }
        };
        let due = match &last {
            None => true,
            Some((previous, at)) => at.elapsed() >= every || content(previous) != content(&summary),
        };
        if due {
            seq += 1;
            last = Some((summary.clone(), tokio::time::Instant::now()));
            federation.publish(summary);
            let sites = federation.sites();
            for status in [
                cell0_federation::SiteStatus::Alive,
                cell0_federation::SiteStatus::Unreachable,
            ] {
                let n = sites.iter().filter(|s| s.status == status).count();
                metrics::gauge!("cell0_federation_sites", "status" => status.as_str()).set(n as f64);
            }
        }
    }
}
