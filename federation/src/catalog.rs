//! The site catalog: what this node knows of every other site, from the
//! summaries their gateways send over site links.
//!
//! Pure logic over an injected clock ([`Instant`] arguments): no sockets,
//! no tasks. The link layer feeds it summaries and round-trip times; the
//! node reads it for `cell0.v1.Sites/List` and for its own summary's RTTs.
//!
//! Invariants:
//! - This node's own site is never stored: its summary comes from the node.
//! - A site's entry only ever comes from that site itself (the link that
//!   delivered it was opened by a node whose certificate names that site);
//!   nothing is relayed.
//! - Among summaries of one site the greatest `(term, applied_index,
//!   node_id, seq)` wins, except that a summary from another cluster (the
//!   site was rebuilt) or arriving after the site went unreachable always
//!   replaces the stored one.
//! - Every summary from a site counts as hearing from it, newer or not; a
//!   site not heard for `site_timeout` is unreachable, and its last summary
//!   stays listed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cell0_proto::federation::v1::SiteSummary;

/// Most sites one catalog holds; summaries of further sites are dropped.
pub const MAX_SITES: usize = 256;

/// Most gateways remembered per site.
pub const MAX_GATEWAYS: usize = 64;

/// How a site looks from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteStatus {
    /// A summary arrived within the site timeout.
    Alive,
    /// Nothing heard within the site timeout.
    Unreachable,
}

impl SiteStatus {
    /// `alive` or `unreachable` (a metric label and log field).
    pub fn as_str(self) -> &'static str {
        match self {
            SiteStatus::Alive => "alive",
            SiteStatus::Unreachable => "unreachable",
        }
    }
}

/// One other site as the catalog shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteView {
    /// Its newest summary.
    pub summary: SiteSummary,
    /// Alive or unreachable.
    pub status: SiteStatus,
    /// Since its last summary.
    pub last_heard: Duration,
    /// The smallest round-trip time over this node's open links to it.
    pub rtt: Option<Duration>,
    /// Federation addresses of its nodes heard within the site timeout.
    pub gateways: Vec<String>,
}

/// What [`Catalog::merge`] did with a summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// The site was not known before.
    Added,
    /// The summary replaced the stored one.
    Updated,
    /// Older than the stored one: only the site's last-heard time moved.
    Heard,
    /// Not stored: about this node's own site, from another site than the
    /// one it describes, or one site too many.
    Ignored,
}

#[derive(Debug, Clone)]
struct Entry {
    summary: SiteSummary,
    heard: Instant,
    rtt: Option<Duration>,
    /// Gateway address -> when a summary last named it.
    gateways: BTreeMap<String, Instant>,
}

/// The catalog of one node.
#[derive(Debug, Clone)]
pub struct Catalog {
    own_site: String,
    site_timeout: Duration,
    sites: BTreeMap<String, Entry>,
}

/// The order of summaries within one site.
fn order(s: &SiteSummary) -> (u64, u64, u64, u64) {
    (s.term, s.applied_index, s.node_id, s.seq)
}

impl Catalog {
    /// An empty catalog of a node of `own_site`; sites not heard for
    /// `site_timeout` are unreachable.
    pub fn new(own_site: impl Into<String>, site_timeout: Duration) -> Self {
        Self {
            own_site: own_site.into(),
            site_timeout,
            sites: BTreeMap::new(),
        }
    }

    /// Takes in `summary`, delivered at `now` by a link to a node of
    /// `from_site` (the site its certificate names).
    pub fn merge(&mut self, from_site: &str, summary: SiteSummary, now: Instant) -> Merge {
        if summary.site == self.own_site || summary.site != from_site {
            return Merge::Ignored;
        }
        if !self.sites.contains_key(&summary.site) && self.sites.len() >= MAX_SITES {
            return Merge::Ignored;
        }
        let timeout = self.site_timeout;
        let gateways = summary.gateways.clone();
        let merged = match self.sites.get_mut(&summary.site) {
            None => {
                self.sites.insert(
                    summary.site.clone(),
                    Entry {
                        summary,
                        heard: now,
                        rtt: None,
                        gateways: BTreeMap::new(),
                    },
                );
                Merge::Added
            }
            Some(entry) => {
                let stale = now.saturating_duration_since(entry.heard) > timeout;
                let rebuilt = entry.summary.cluster_id != summary.cluster_id;
                entry.heard = now;
                if stale || rebuilt || order(&summary) >= order(&entry.summary) {
                    entry.summary = summary;
                    Merge::Updated
                } else {
                    Merge::Heard
                }
            }
        };
        self.heard_gateways(from_site, &gateways, now);
        merged
    }

    /// Records that a summary of `site` named `gateways` at `now`, and
    /// forgets gateways not named within the site timeout.
    fn heard_gateways(&mut self, site: &str, gateways: &[String], now: Instant) {
        let timeout = self.site_timeout;
        if let Some(entry) = self.sites.get_mut(site) {
            for g in gateways.iter().take(MAX_GATEWAYS) {
                entry.gateways.insert(g.clone(), now);
            }
            entry
                .gateways
                .retain(|_, heard| now.saturating_duration_since(*heard) <= timeout);
            while entry.gateways.len() > MAX_GATEWAYS {
                let oldest = entry
                    .gateways
                    .iter()
                    .min_by_key(|(_, heard)| **heard)
                    .map(|(g, _)| g.clone());
                match oldest {
                    Some(g) => entry.gateways.remove(&g),
                    None => break,
                };
            }
        }
    }

    /// Sets the round-trip time to `site` (the smallest over this node's
    /// open links; `None` when none is open).
    pub fn set_rtt(&mut self, site: &str, rtt: Option<Duration>) {
        if let Some(entry) = self.sites.get_mut(site) {
            entry.rtt = rtt;
        }
    }

    /// Every other site, by name, as of `now`.
    pub fn view(&self, now: Instant) -> Vec<SiteView> {
        self.sites
            .values()
            .map(|e| {
                let last_heard = now.saturating_duration_since(e.heard);
                SiteView {
                    summary: e.summary.clone(),
                    status: if last_heard > self.site_timeout {
                        SiteStatus::Unreachable
                    } else {
                        SiteStatus::Alive
                    },
                    last_heard,
                    rtt: e.rtt,
                    gateways: e
                        .gateways
                        .iter()
                        .filter(|(_, heard)| now.saturating_duration_since(**heard) <= self.site_timeout)
                        .map(|(g, _)| g.clone())
                        .collect(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(site: &str, term: u64, applied: u64, seq: u64) -> SiteSummary {
        SiteSummary {
            site: site.into(),
            cluster_id: 7,
            term,
            applied_index: applied,
            seq,
            node_id: 1,
            gateways: vec![format!("{site}-gw:7104")],
            ..SiteSummary::default()
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn newer_summaries_win_and_older_ones_only_count_as_heard() {
        let t0 = Instant::now();
        let mut c = Catalog::new("a", TIMEOUT);
        assert_eq!(c.merge("b", summary("b", 2, 10, 1), t0), Merge::Added);
        assert_eq!(c.merge("b", summary("b", 2, 11, 1), t0), Merge::Updated);
        let later = t0 + Duration::from_secs(3);
        assert_eq!(c.merge("b", summary("b", 2, 9, 5), later), Merge::Heard);
        let view = c.view(later);
        assert_eq!(view.len(), 1);
        assert_eq!(view[0].summary.applied_index, 11);
        assert_eq!(view[0].last_heard, Duration::ZERO);
        assert_eq!(view[0].status, SiteStatus::Alive);
    }

    #[test]
    fn own_site_and_relayed_summaries_are_ignored() {
        let t0 = Instant::now();
        let mut c = Catalog::new("a", TIMEOUT);
        assert_eq!(c.merge("a", summary("a", 1, 1, 1), t0), Merge::Ignored);
        assert_eq!(c.merge("b", summary("c", 1, 1, 1), t0), Merge::Ignored);
        assert!(c.view(t0).is_empty());
    }

    #[test]
    fn a_silent_site_turns_unreachable_and_anything_it_sends_then_replaces_its_summary() {
        let t0 = Instant::now();
        let mut c = Catalog::new("a", TIMEOUT);
        c.merge("b", summary("b", 5, 100, 1), t0);
        assert_eq!(c.view(t0)[0].gateways, ["b-gw:7104"]);
        c.set_rtt("b", Some(Duration::from_millis(50)));
        let silent = t0 + TIMEOUT + Duration::from_millis(1);
        let view = c.view(silent);
        assert_eq!(view[0].status, SiteStatus::Unreachable);
        assert!(view[0].gateways.is_empty(), "gateways age out with the site");
        assert_eq!(view[0].summary.applied_index, 100, "the last summary stays listed");
        // The site restarted from a backup: an older position, but it is
        // what the site is now.
        assert_eq!(c.merge("b", summary("b", 1, 3, 1), silent), Merge::Updated);
        assert_eq!(c.view(silent)[0].status, SiteStatus::Alive);
        assert_eq!(c.view(silent)[0].summary.applied_index, 3);
    }

    #[test]
    fn a_rebuilt_site_replaces_its_summary_at_once() {
        let t0 = Instant::now();
        let mut c = Catalog::new("a", TIMEOUT);
        c.merge("b", summary("b", 5, 100, 1), t0);
        let mut rebuilt = summary("b", 1, 2, 1);
        rebuilt.cluster_id = 8;
        assert_eq!(c.merge("b", rebuilt, t0), Merge::Updated);
        assert_eq!(c.view(t0)[0].summary.cluster_id, 8);
    }

    #[test]
    fn sites_and_gateways_are_bounded() {
        let t0 = Instant::now();
        let mut c = Catalog::new("a", TIMEOUT);
        for i in 0..MAX_SITES + 3 {
            let site = format!("s{i}");
            c.merge(&site, summary(&site, 1, 1, 1), t0);
        }
        assert_eq!(c.view(t0).len(), MAX_SITES);
        let mut many = summary("s0", 1, 1, 2);
        many.gateways = (0..MAX_GATEWAYS + 5).map(|i| format!("g{i}:7104")).collect();
        c.merge("s0", many, t0);
        assert_eq!(c.view(t0)[0].gateways.len(), MAX_GATEWAYS);
    }
}
