//! `cell0 bench gossip`: N gossip services in this process, each with its
//! own libp2p swarm on loopback TCP (private network, noise, yamux: the
//! real stack) and its own membership table. With `--network memory` the
//! swarms connect through libp2p's in-process memory transport instead of
//! TCP sockets, under the same upgrades. Every node but the first
//! contacts the first one only. Measures
//! - convergence: from the moment the last service started until every node
//!   hears every other alive;
//! - detection: from stopping one node (its swarm closes, like a crash)
//!   until every other node sees it suspect, then dead. The node is stopped
//!   `--settle-ms` after convergence, half a heartbeat interval after one of
//!   its beats: a crash's average distance from the beat before it, so that
//!   the figure does not depend on where in the node's rhythm the run
//!   happens to stop it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cell0_gossip::service::{self, Observer};
use cell0_gossip::transport::{Network, Transport, TransportConfig};
use cell0_gossip::{Addresses, ClusterSecret, DetectorConfig, Heartbeat, MemberState, MemberView, MembershipEvent};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::sync::{Notify, oneshot};

use super::{Output, print_json, print_table};

/// Most nodes one run may start.
const MAX_NODES: usize = 200;
/// Longest settle time one run may ask for, in milliseconds.
const MAX_SETTLE_MS: u64 = 600_000;
/// How often a wait that takes long says what it still waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Pairs named in one progress line at most.
const PROGRESS_EXAMPLES: usize = 5;

/// Options of `cell0 bench gossip`.
#[derive(Args)]
pub struct GossipBench {
    /// Gossip services to start.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Interval between each node's heartbeats, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    heartbeat_ms: u64,
    /// Seconds to wait for each phase before giving up.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Milliseconds the converged nodes keep beating before one is stopped,
    /// so that detection is measured in a running cluster, by detectors
    /// whose history is no longer that of the start, when 50 swarms
    /// connecting at once delay each other's beats (0: right after
    /// convergence, when the others have heard it only once or twice).
    #[arg(long, default_value_t = 10_000)]
    settle_ms: u64,
    /// What carries the connections between the swarms.
    #[arg(long, value_enum, default_value_t = BenchNetwork::Tcp)]
    network: BenchNetwork,
}

/// What carries the connections in `cell0 bench gossip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchNetwork {
    /// Loopback TCP sockets, as between real nodes.
    Tcp,
    /// libp2p's in-process memory transport (no sockets, no system calls).
    Memory,
}

impl BenchNetwork {
    /// The transport's network.
    fn network(self) -> Network {
        match self {
            BenchNetwork::Tcp => Network::Tcp,
            BenchNetwork::Memory => Network::Memory,
        }
    }

    /// The listen address of the `i`th node: memory listeners need a port
    /// of their own, TCP takes any free one.
    fn listen_addr(self, i: usize) -> anyhow::Result<SocketAddr> {
        let port = match self {
            BenchNetwork::Tcp => 0,
            BenchNetwork::Memory => u16::try_from(i + 1)?,
        };
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

#[derive(Debug, Serialize)]
struct GossipReport {
    nodes: usize,
    network: BenchNetwork,
    heartbeat_ms: u64,
    settle_ms: u64,
    start_seconds: f64,
    convergence_seconds: f64,
    suspect_seconds: f64,
    dead_seconds: f64,
}

/// Every node's latest view: observer id -> (member id -> state).
type Views = Arc<Mutex<BTreeMap<u64, BTreeMap<u64, MemberState>>>>;

struct BenchObserver {
    template: Heartbeat,
    views: Views,
    changed: Arc<Notify>,
    /// Told of every heartbeat this node sends.
    beat: Arc<Notify>,
}

impl Observer for BenchObserver {
    fn heartbeat(&mut self) -> Heartbeat {
        self.template.clone()
    }

    fn sent(&mut self, _heartbeat: &Heartbeat) {
        self.beat.notify_waiters();
    }

    fn changed(&mut self, _events: &[MembershipEvent]) {}

    fn ticked(&mut self, members: Vec<MemberView>, _now_ms: u64) {
        let view = members.iter().map(|m| (m.heartbeat.node_id, m.state)).collect();
        if let Ok(mut views) = self.views.lock() {
            views.insert(self.template.node_id, view);
        }
        self.changed.notify_waiters();
    }
}

/// Runs the benchmark.
pub async fn run(output: Output, b: GossipBench) -> anyhow::Result<()> {
    if !(2..=MAX_NODES).contains(&b.nodes) {
        anyhow::bail!("--nodes must be between 2 and {MAX_NODES}");
    }
    if !(100..=60_000).contains(&b.heartbeat_ms) {
        anyhow::bail!("--heartbeat-ms must be between 100 and 60000");
    }
    if b.settle_ms > MAX_SETTLE_MS {
        anyhow::bail!("--settle-ms must be at most {MAX_SETTLE_MS}");
    }
    let timeout = Duration::from_secs(b.timeout.max(1));
    let secret = ClusterSecret::generate();
    let views: Views = Arc::default();
    let changed = Arc::new(Notify::new());
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    let mut seed: Option<SocketAddr> = None;
    let started = Instant::now();
    for i in 0..b.nodes {
        let id = i as u64 + 1;
        let keypair = cell0_gossip::keys::generate_keypair();
        let peer_id = keypair.public().to_peer_id();
        let mut config = TransportConfig::new(b.network.listen_addr(i)?, keypair, "cell0/bench/1");
        config.network = b.network.network();
        config.psk = Some(secret.bytes());
        config.join = seed.iter().map(|a| a.to_string()).collect();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let transport = Transport::start(config, |_, _| true, async move {
            let _ = stop_rx.await;
        })
        .await?;
        let addr = transport.listen_addr();
        seed.get_or_insert(addr);
        let mut observer = BenchObserver {
            template: Heartbeat::new(
                id,
                &peer_id,
                format!("bench{id}"),
                "bench".into(),
                Addresses {
                    gossip: addr.to_string(),
                    ..Addresses::default()
                },
            ),
            views: views.clone(),
            changed: changed.clone(),
            beat: Arc::new(Notify::new()),
        };
        let beat = observer.beat.clone();
        let (service_stop_tx, service_stop_rx) = oneshot::channel::<()>();
        let every = Duration::from_millis(b.heartbeat_ms);
        tasks.push(tokio::spawn(async move {
            service::run(
                transport,
                id,
                every,
                DetectorConfig::for_interval_ms(b.heartbeat_ms),
                &mut observer,
                async move {
                    let _ = service_stop_rx.await;
                },
            )
            .await;
        }));
        stops.push((stop_tx, service_stop_tx, beat));
    }
    let start_seconds = started.elapsed().as_secs_f64();
    let all_started = Instant::now();
    let n = b.nodes as u64;
    eprintln!(
        "{} gossip services started in {start_seconds:.2}s; waiting until every node hears every other",
        b.nodes
    );
    wait_for(
        &views,
        &changed,
        timeout,
        "every node hears every other alive",
        |views| not_alive(views, n).next().is_none(),
        |views| {
            let examples: Vec<String> = not_alive(views, n)
                .take(PROGRESS_EXAMPLES)
                .map(|(me, other, state)| match state {
                    Some(state) => format!("node {me} hears node {other} {state:?}"),
                    None => format!("node {me} has not heard node {other}"),
                })
                .collect();
            format!(
                "{} of {} pairs not alive yet, e.g. {}",
                not_alive(views, n).count(),
                n * (n - 1),
                examples.join("; ")
            )
        },
    )
    .await?;
    let convergence_seconds = all_started.elapsed().as_secs_f64();

    // Timed on purpose, not a wait for a condition: the cluster runs for
    // the settle time, then the last node is stopped half an interval after
    // one of its beats (its swarm closes and its heartbeats stop).
    tokio::time::sleep(Duration::from_millis(b.settle_ms)).await;
    let (victim_stop, victim_service, victim_beat) = stops.pop().ok_or_else(|| anyhow::anyhow!("no node to stop"))?;
    tokio::time::timeout(timeout, victim_beat.notified())
        .await
        .map_err(|_| anyhow::anyhow!("the node to stop sent no heartbeat in {}s", timeout.as_secs()))?;
    tokio::time::sleep(Duration::from_millis(b.heartbeat_ms / 2)).await;
    let victim = n;
    let _ = victim_stop.send(());
    let _ = victim_service.send(());
    let stopped_at = Instant::now();
    if let Ok(mut v) = views.lock() {
        v.remove(&victim);
    }
    let others_see = |state: MemberState| {
        move |views: &BTreeMap<u64, BTreeMap<u64, MemberState>>| {
            (1..n).all(|me| {
                views
                    .get(&me)
                    .is_some_and(|v| v.get(&victim).is_some_and(|s| *s >= state))
            })
        }
    };
    wait_for(
        &views,
        &changed,
        timeout,
        "every node suspects the stopped one",
        others_see(MemberState::Suspect),
        |_| "the stopped node is not suspect everywhere yet".to_owned(),
    )
    .await?;
    let suspect_seconds = stopped_at.elapsed().as_secs_f64();
    wait_for(
        &views,
        &changed,
        timeout,
        "every node sees the stopped one dead",
        others_see(MemberState::Dead),
        |_| "the stopped node is not dead everywhere yet".to_owned(),
    )
    .await?;
    let dead_seconds = stopped_at.elapsed().as_secs_f64();

    for (transport_stop, service_stop, _) in stops {
        let _ = transport_stop.send(());
        let _ = service_stop.send(());
    }
    for t in tasks {
        let _ = t.await;
    }
    let report = GossipReport {
        nodes: b.nodes,
        network: b.network,
        heartbeat_ms: b.heartbeat_ms,
        settle_ms: b.settle_ms,
        start_seconds,
        convergence_seconds,
        suspect_seconds,
        dead_seconds,
    };
    match output {
        Output::Json => print_json(&report),
        Output::Table => {
            print_table(
                &[
                    "NODES",
                    "NETWORK",
                    "HEARTBEAT ms",
                    "SETTLE ms",
                    "START s",
                    "CONVERGENCE s",
                    "ALL SUSPECT s",
                    "ALL DEAD s",
                ],
                &[vec![
                    report.nodes.to_string(),
                    format!("{:?}", report.network).to_lowercase(),
                    report.heartbeat_ms.to_string(),
                    report.settle_ms.to_string(),
                    format!("{:.2}", report.start_seconds),
                    format!("{:.2}", report.convergence_seconds),
                    format!("{:.2}", report.suspect_seconds),
                    format!("{:.2}", report.dead_seconds),
                ]],
            );
            Ok(())
        }
    }
}

/// Every (observer, member) pair of nodes 1..=n where the observer does not
/// hear the member alive, with what it hears instead; lazily, so the check
/// after every tick stops at the first such pair.
fn not_alive(
    views: &BTreeMap<u64, BTreeMap<u64, MemberState>>,
    n: u64,
) -> impl Iterator<Item = (u64, u64, Option<MemberState>)> + '_ {
    (1..=n).flat_map(move |me| {
        let view = views.get(&me);
        (1..=n)
            .filter(move |other| *other != me)
            .map(move |other| (me, other, view.and_then(|v| v.get(&other)).copied()))
            .filter(|(_, _, state)| *state != Some(MemberState::Alive))
    })
}

/// Waits until `cond` holds over the views, re-checking after every tick of
/// any node, for at most `timeout`; every [`PROGRESS_EVERY`] it prints what
/// `progress` says is still missing to stderr.
async fn wait_for(
    views: &Views,
    changed: &Notify,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&BTreeMap<u64, BTreeMap<u64, MemberState>>) -> bool,
    progress: impl Fn(&BTreeMap<u64, BTreeMap<u64, MemberState>>) -> String,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let mut next_progress = started + PROGRESS_EVERY;
    loop {
        let notified = changed.notified();
        let holds = views.lock().map(|v| cond(&v)).unwrap_or(false);
        if holds {
            return Ok(());
        }
        if tokio::time::Instant::now() >= next_progress {
            next_progress += PROGRESS_EVERY;
            if let Ok(v) = views.lock() {
                eprintln!("after {}s: {}", started.elapsed().as_secs(), progress(&v));
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            anyhow::bail!("gave up after {}s waiting until {what}", timeout.as_secs());
        }
    }
}
