//! Failover, measured: kill -9 the leader of a 3-node cluster again and
//! again under write load, and time how long writes take to succeed again,
//! for Cell0 ([`Cluster`]) or etcd 3.4 ([`EtcdCluster`]) alike.
//!
//! # The workload
//!
//! `writers` clients write unique keys (`failover/<writer>/<n>`, 64-byte
//! values) in a closed loop, each request with a short deadline
//! (`request_timeout`, 500 ms by default). Writer *w* has a connection of
//! its own to every node and starts on node *w* mod 3; after a failed or
//! timed-out request it moves on to the next node, after a pause of
//! [`ERROR_PAUSE`], and it goes back to its own node when a round begins, so
//! the writers stay spread over all nodes. Every acknowledged write is
//! recorded with when it was sent, when it was acknowledged and through
//! which node.
//!
//! # A round
//!
//! 1. Wait until every node answers its status call and all name the same
//!    leader, then let the writes flow for `settle` (2 s): the round starts
//!    only when the leader is still the same afterwards and writes were
//!    acknowledged in the last half second of it.
//! 2. Note the time *K* and kill the leader with SIGKILL.
//! 3. **recovery**: from *K* to the acknowledgement of the first write that
//!    was *sent* after *K* (through a surviving node). This is what a
//!    client that starts writing at the moment of the crash waits.
//!    **gap**: the longest stretch without any acknowledgement through a
//!    surviving node, from the last one before *K* to that first
//!    recovered write (writes in flight at *K* may still be acknowledged
//!    in between). **elected**: from *K* until a surviving node's status
//!    names a leader other than the killed node (polled every
//!    [`STATUS_POLL`]), the election's share of the recovery. **terms**:
//!    how many terms the survivors moved on by then (1: the first
//!    candidate won; more: votes were refused, for a shorter log or a
//!    leader lease, or split).
//! 4. Restart the killed node on its data dir, and go on with the next
//!    round (whose step 1 waits for it to be back).
//!
//! Terms that begin during a settle time, with every node up, are counted
//! as *unplanned elections*: what too short election timeouts cause on a
//! loaded machine.
//!
//! Cell0 and etcd differ in how a write that reached a follower just before
//! the crash ends: a Cell0 follower retries it on the new leader as soon as
//! it learns of it, while etcd forwards it as a Raft proposal that the dead
//! leader took with it, so it waits for the client's deadline. An etcd
//! client therefore writes again only when a deadline ran out after the
//! election, and etcd's recovery times step with `request_timeout`; the
//! election time shows the difference.
//!
//! A round in which no write succeeds within `recovery_limit` counts as not
//! recovered (its times are left out and counted, and they rank above every
//! measured time in the percentiles).
//!
//! The percentiles are nearest-rank: p*q* of *n* times is the
//! ⌈*q* *n* / 100⌉-th smallest, so with 20 rounds p50 is the 10th and p99
//! the largest.
//!
//! # Invariants
//!
//! The only waits are the measurement's own (the settle time, the pause
//! after a failed write, the poll intervals of status calls); every
//! synchronization is on an event (an acknowledgement, a status answer).
//! Every process started is killed and reaped when [`run`] returns, also
//! on error, or when its future is dropped ([`command`] drops it on SIGINT
//! or SIGTERM), since the clusters kill their processes when dropped and
//! [`run`] owns them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_proto::v1::cluster_client::ClusterClient;
use prost::bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::cluster::{Cluster, ClusterError, ClusterOptions};
use crate::config::Target;
use crate::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::etcd_cluster::{EtcdCluster, EtcdOptions};
use crate::kv::KvClient;

/// Nodes in the measured cluster.
pub const NODES: usize = 3;

/// How long a writer pauses after a failed write before the next one.
pub const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// How often the survivors' status is asked while a round waits for the
/// new leader.
pub const STATUS_POLL: Duration = Duration::from_millis(20);

/// Bytes of every value written.
pub const VALUE_BYTES: usize = 64;

/// How long a cluster may take to start, or to be healthy again after a
/// restart.
pub const READY_LIMIT: Duration = Duration::from_secs(60);

/// Writes must have been acknowledged this recently when the settle time
/// ends.
const FLOWING: Duration = Duration::from_millis(500);

/// Deadline of one status call.
const STATUS_TIMEOUT: Duration = Duration::from_millis(300);

/// What a measurement needs.
#[derive(Debug, Clone)]
pub struct FailoverOptions {
    /// The system measured.
    pub target: Target,
    /// The name its results go under (the target's, or e.g. a tuning's).
    pub label: String,
    /// Rounds: how many times the leader is killed.
    pub kills: usize,
    /// Concurrent writers.
    pub writers: usize,
    /// Deadline of every write.
    pub request_timeout: Duration,
    /// How long writes flow between a healthy cluster and the next kill.
    pub settle: Duration,
    /// How long a round waits for a write to succeed before it counts as
    /// not recovered.
    pub recovery_limit: Duration,
    /// Where the nodes' data dirs and logs go.
    pub dir: PathBuf,
    /// The `cell0` binary (target `cell0`).
    pub cell0_bin: PathBuf,
    /// A config file for every Cell0 node (`CELL0_CONFIG`), e.g. with
    /// `[raft]` timeouts to try.
    pub cell0_config: Option<PathBuf>,
    /// The Cell0 nodes' log filter (`CELL0_LOG_LEVEL`; default: the
    /// cluster's, `info,openraft=warn`).
    pub cell0_log_level: Option<String>,
    /// The `etcd` binary, 3.4 (target `etcd`).
    pub etcd_bin: PathBuf,
    /// etcd member *i*'s client port is `etcd_base_port + 10(i+1)`.
    pub etcd_base_port: u16,
}

/// What can stop a measurement.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// Starting, killing or restarting processes.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The cluster did not become healthy, or writes did not flow.
    #[error("{0}")]
    Unhealthy(String),
    /// Stopped by a signal (everything started is gone).
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
    /// A command-line value that cannot work.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing a results file.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// One kill and what followed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    /// From 1.
    pub round: usize,
    /// The node killed (the leader), from 0.
    pub killed: usize,
    /// The leader once the cluster was healthy again, if it was.
    pub new_leader: Option<usize>,
    /// Milliseconds from the kill until a survivor named another leader.
    pub elected_ms: Option<f64>,
    /// How many terms the survivors moved on from the killed leader's by
    /// the time writes succeeded again: 1 when the first election won,
    /// more when votes were refused or split.
    pub terms: Option<u64>,
    /// Milliseconds from the kill until the first write sent after it was
    /// acknowledged; `None`: not within the recovery limit.
    pub recovery_ms: Option<f64>,
    /// The longest stretch without an acknowledgement through a surviving
    /// node, in milliseconds, around the kill.
    pub gap_ms: Option<f64>,
    /// Writes that failed or timed out between the kill and the recovery.
    pub failed_writes: u64,
}

/// Nearest-rank percentiles of a set of times in milliseconds. A time that
/// is missing (not recovered) ranks above every measured one; a percentile
/// that falls on one is `None`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Times, measured or not.
    pub n: usize,
    /// Of them, not measured.
    pub missing: usize,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Largest.
    pub max_ms: Option<f64>,
}

impl Stats {
    /// The percentiles of `times`.
    pub fn of(times: impl IntoIterator<Item = Option<f64>>) -> Stats {
        let mut measured: Vec<f64> = Vec::new();
        let mut missing = 0;
        for t in times {
            match t {
                Some(t) => measured.push(t),
                None => missing += 1,
            }
        }
        measured.sort_by(f64::total_cmp);
        let n = measured.len() + missing;
        let at = |q: f64| -> Option<f64> {
            if n == 0 {
                return None;
            }
            let rank = ((q / 100.0) * n as f64).ceil().max(1.0) as usize;
            measured.get(rank - 1).copied()
        };
        Stats {
            n,
            missing,
            p50_ms: at(50.0),
            p90_ms: at(90.0),
            p99_ms: at(99.0),
            max_ms: at(100.0),
        }
    }
}

/// The results of one measurement (one cluster, `kills` rounds), as
/// written to its JSON file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The system measured.
    pub target: Target,
    /// The name its results go under.
    pub label: String,
    /// Concurrent writers.
    pub writers: usize,
    /// Deadline of every write, in milliseconds.
    pub request_timeout_ms: u64,
    /// Settle time before each kill, in milliseconds.
    pub settle_ms: u64,
    /// The Cell0 nodes' config file, if one was given.
    pub cell0_config: Option<String>,
    /// Every round.
    pub rounds: Vec<Round>,
    /// Terms that began while no node was down (during the settle times):
    /// elections nobody caused, which shorter timeouts risk.
    pub unplanned_elections: u64,
    /// Writes acknowledged over the whole measurement.
    pub writes_ok: u64,
    /// Writes that failed or timed out over the whole measurement.
    pub writes_failed: u64,
    /// Percentiles of the rounds' recovery times.
    pub recovery: Stats,
    /// Percentiles of the rounds' gaps.
    pub gap: Stats,
    /// Percentiles of the rounds' election times.
    pub elected: Stats,
}

impl FailoverReport {
    /// A report of `rounds` (the percentiles computed from them).
    fn new(
        options: &FailoverOptions,
        rounds: Vec<Round>,
        unplanned_elections: u64,
        writes_ok: u64,
        writes_failed: u64,
    ) -> Self {
        FailoverReport {
            target: options.target,
            label: options.label.clone(),
            writers: options.writers,
            request_timeout_ms: u64::try_from(options.request_timeout.as_millis()).unwrap_or(u64::MAX),
            settle_ms: u64::try_from(options.settle.as_millis()).unwrap_or(u64::MAX),
            cell0_config: options.cell0_config.as_ref().map(|p| p.display().to_string()),
            recovery: Stats::of(rounds.iter().map(|r| r.recovery_ms)),
            gap: Stats::of(rounds.iter().map(|r| r.gap_ms)),
            elected: Stats::of(rounds.iter().map(|r| r.elected_ms)),
            rounds,
            unplanned_elections,
            writes_ok,
            writes_failed,
        }
    }

    /// Reads a report written by a measurement.
    pub fn read(path: &std::path::Path) -> Result<Self, FailoverError> {
        let file_error = |reason: String| FailoverError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| file_error(e.to_string()))
    }

    /// Writes the report as JSON.
    pub fn write(&self, path: &std::path::Path) -> Result<(), FailoverError> {
        let file_error = |reason: String| FailoverError::File {
            path: path.display().to_string(),
            reason,
        };
        let json = serde_json::to_string_pretty(self).map_err(|e| file_error(e.to_string()))?;
        std::fs::write(path, json + "\n").map_err(|e| file_error(e.to_string()))
    }
}

/// One markdown table of `reports`: their rounds pooled per label (in the
/// order labels first appear), the recovery, gap and election percentiles
/// of each, and, when an `etcd` target is among them, each other label's
/// recovery p50 and p99 as a multiple of etcd's.
pub fn table(reports: &[FailoverReport]) -> String {
    let mut labels: Vec<(String, Target, Vec<Round>, usize, u64)> = Vec::new();
    for r in reports {
        match labels.iter_mut().find(|(l, ..)| *l == r.label) {
            Some((_, _, rounds, _, unplanned)) => {
                rounds.extend(r.rounds.iter().cloned());
                *unplanned += r.unplanned_elections;
            }
            None => labels.push((
                r.label.clone(),
                r.target,
                r.rounds.clone(),
                r.writers,
                r.unplanned_elections,
            )),
        }
    }
    let ms = |t: Option<f64>| t.map_or_else(|| "n/r".to_string(), |t| format!("{t:.0}"));
    let mut out = String::new();
    out.push_str(
        "| system | kills | writers | recovery p50 | p90 | p99 | max | gap p50 | gap p99 | elected p50 | elected p99 | >1 term | unplanned elections | not recovered |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut summaries = Vec::new();
    for (label, target, rounds, writers, unplanned) in &labels {
        let recovery = Stats::of(rounds.iter().map(|r| r.recovery_ms));
        let gap = Stats::of(rounds.iter().map(|r| r.gap_ms));
        let elected = Stats::of(rounds.iter().map(|r| r.elected_ms));
        out.push_str(&format!(
            "| {label} | {} | {writers} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {unplanned} | {} |\n",
            rounds.len(),
            ms(recovery.p50_ms),
            ms(recovery.p90_ms),
            ms(recovery.p99_ms),
            ms(recovery.max_ms),
            ms(gap.p50_ms),
            ms(gap.p99_ms),
            ms(elected.p50_ms),
            ms(elected.p99_ms),
            rounds.iter().filter(|r| r.terms.is_some_and(|t| t > 1)).count(),
            recovery.missing,
        ));
        summaries.push((label.clone(), *target, recovery));
    }
    out.push_str(
        "\nTimes in milliseconds, nearest-rank percentiles (n/r: a round that did not recover ranks there); \
         >1 term: rounds whose new leader needed more than one election; unplanned: elections while no node was down.\n",
    );
    if let Some((etcd_label, _, etcd)) = summaries.iter().find(|(_, t, _)| *t == Target::Etcd) {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "n/a".to_string(),
        };
        for (label, _, s) in summaries.iter().filter(|(l, ..)| l != etcd_label) {
            out.push_str(&format!(
                "{label} / {etcd_label}: recovery p50 x{}, p99 x{}\n",
                ratio(s.p50_ms, etcd.p50_ms),
                ratio(s.p99_ms, etcd.p99_ms)
            ));
        }
    }
    out
}

/// One acknowledged write.
#[derive(Debug, Clone, Copy)]
struct Ack {
    sent: Instant,
    done: Instant,
    node: usize,
}

/// What the writers and the rounds share.
struct Shared {
    acks: Mutex<Vec<Ack>>,
    /// Counts acknowledgements, so that a round can wait for the next one.
    acked: watch::Sender<u64>,
    ok: AtomicU64,
    failed: AtomicU64,
    /// Bumped when a round begins: every writer goes back to its own node.
    epoch: AtomicU64,
}

impl Shared {
    fn acks(&self) -> std::sync::MutexGuard<'_, Vec<Ack>> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ack(&self, ack: Ack) {
        self.acks().push(ack);
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.acked.send_modify(|n| *n += 1);
    }
}

/// The processes of either system.
enum Servers {
    Cell0(Cluster),
    Etcd(EtcdCluster),
}

impl Servers {
    async fn start(options: &FailoverOptions) -> Result<Servers, FailoverError> {
        match options.target {
            Target::Cell0 => {
                let mut env = Vec::new();
                if let Some(config) = &options.cell0_config {
                    env.push(("CELL0_CONFIG".to_string(), config.display().to_string()));
                }
                if let Some(level) = &options.cell0_log_level {
                    env.push(("CELL0_LOG_LEVEL".to_string(), level.clone()));
                }
                let cluster_options = ClusterOptions {
                    env,
                    ..ClusterOptions::new(options.cell0_bin.clone(), options.dir.clone())
                };
                // Cluster::start waits with blocking probes.
                let cluster = tokio::task::spawn_blocking(move || Cluster::start(cluster_options, NODES, None))
                    .await
                    .map_err(|e| FailoverError::Unhealthy(format!("starting the cluster: {e}")))??;
                Ok(Servers::Cell0(cluster))
            }
            Target::Etcd => Ok(Servers::Etcd(
                EtcdCluster::start(
                    EtcdOptions {
                        bin: options.etcd_bin.clone(),
                        dir: options.dir.clone(),
                        base_port: options.etcd_base_port,
                        members: NODES,
                    },
                    READY_LIMIT,
                )
                .await?,
            )),
        }
    }

    fn len(&self) -> usize {
        match self {
            Servers::Cell0(c) => c.len(),
            Servers::Etcd(c) => c.len(),
        }
    }

    /// Node `i`'s client URI.
    fn uri(&self, i: usize) -> String {
        match self {
            Servers::Cell0(c) => format!("http://{}", c.endpoint(i)),
            Servers::Etcd(c) => format!("http://{}", c.endpoint(i)),
        }
    }

    fn kill(&mut self, i: usize) -> Result<(), FailoverError> {
        match self {
            Servers::Cell0(c) => c.kill(i)?,
            Servers::Etcd(c) => c.kill(i),
        }
        Ok(())
    }

    fn restart(&mut self, i: usize) -> Result<(), FailoverError> {
        match self {
            Servers::Cell0(c) => c.restart(i)?,
            Servers::Etcd(c) => c.restart(i)?,
        }
        Ok(())
    }

    fn logs(&self) -> String {
        match self {
            Servers::Cell0(c) => c.dir().display().to_string(),
            Servers::Etcd(c) => c.dir().display().to_string(),
        }
    }
}

/// What a node's status call says.
#[derive(Debug, Clone, Copy)]
struct NodeStatus {
    /// Its own id (Cell0 node id, etcd member id).
    id: u64,
    /// The leader it knows, 0 for none.
    leader: u64,
    /// Its Raft term.
    term: u64,
}

/// Every node named the same leader.
#[derive(Debug, Clone)]
struct Agreed {
    /// The leader's index.
    leader: usize,
    /// Every node's id, by index.
    ids: Vec<u64>,
    /// The highest term any node reported.
    term: u64,
}

/// Status calls to every node over connections kept for the whole run.
enum Probe {
    Cell0(Vec<ClusterClient<Channel>>),
    Etcd(Vec<MaintenanceClient<Channel>>),
}

impl Probe {
    fn new(target: Target, uris: &[String]) -> Result<Probe, FailoverError> {
        let channels = uris
            .iter()
            .map(|uri| lazy_channel(uri, STATUS_TIMEOUT))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(match target {
            Target::Cell0 => Probe::Cell0(channels.into_iter().map(ClusterClient::new).collect()),
            Target::Etcd => Probe::Etcd(channels.into_iter().map(MaintenanceClient::new).collect()),
        })
    }

    /// Node `i`'s status, if it answers.
    async fn status(&self, i: usize) -> Option<NodeStatus> {
        match self {
            Probe::Cell0(clients) => {
                let s = clients[i]
                    .clone()
                    .status(cell0_proto::v1::StatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                Some(NodeStatus {
                    id: s.node_id,
                    leader: s.leader_id,
                    term: s.term,
                })
            }
            Probe::Etcd(clients) => {
                let s = clients[i]
                    .clone()
                    .status(crate::etcd::etcdserverpb::StatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                Some(NodeStatus {
                    id: s.header.map_or(0, |h| h.member_id),
                    leader: s.leader,
                    term: s.raft_term,
                })
            }
        }
    }

    /// When every node answers and all name the same leader, one of them.
    async fn agreed_leader(&self, n: usize) -> Option<Agreed> {
        let mut ids = Vec::with_capacity(n);
        let mut leader = None;
        let mut term = 0;
        for i in 0..n {
            let s = self.status(i).await?;
            if s.leader == 0 || leader.is_some_and(|x| x != s.leader) {
                return None;
            }
            leader = Some(s.leader);
            ids.push(s.id);
            term = term.max(s.term);
        }
        let leader = leader?;
        let index = ids.iter().position(|id| *id == leader)?;
        Some(Agreed {
            leader: index,
            ids,
            term,
        })
    }
}

fn lazy_channel(uri: &str, timeout: Duration) -> Result<Channel, FailoverError> {
    Ok(Endpoint::from_shared(uri.to_string())
        .map_err(|e| FailoverError::Unhealthy(format!("bad endpoint {uri}: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// One writer: see the module documentation.
async fn writer(w: usize, clients: Vec<KvClient>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let n = clients.len();
    let home = w % n;
    let mut node = home;
    let mut epoch = shared.epoch.load(Ordering::Relaxed);
    let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
    let mut seq: u64 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let now_epoch = shared.epoch.load(Ordering::Relaxed);
        if now_epoch != epoch {
            epoch = now_epoch;
            node = home;
        }
        let key = Bytes::from(format!("failover/{w}/{seq}"));
        seq += 1;
        let sent = Instant::now();
        let result = tokio::select! {
            biased;
            _ = stop.changed() => return,
            r = clients[node].put(key, value.clone()) => r,
        };
        let done = Instant::now();
        match result {
            Ok(()) => shared.ack(Ack { sent, done, node }),
            Err(_) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                node = (node + 1) % n;
                tokio::select! {
                    biased;
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(ERROR_PAUSE) => {}
                }
            }
        }
    }
}

/// Runs the measurement: starts the cluster, the writers and `kills`
/// rounds; everything it started is gone when it returns. `progress` gets
/// one line per round.
pub async fn run(options: FailoverOptions, mut progress: impl FnMut(&str)) -> Result<FailoverReport, FailoverError> {
    let mut servers = Servers::start(&options).await?;
    let uris: Vec<String> = (0..servers.len()).map(|i| servers.uri(i)).collect();
    let probe = Probe::new(options.target, &uris)?;
    let (acked, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        acks: Mutex::new(Vec::new()),
        acked,
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        epoch: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut writers = Vec::with_capacity(options.writers);
    for w in 0..options.writers {
        let mut clients = Vec::with_capacity(uris.len());
        for uri in &uris {
            clients.push(
                KvClient::lazy(options.target, uri, options.request_timeout)
                    .map_err(|e| FailoverError::Unhealthy(e.to_string()))?,
            );
        }
        writers.push(tokio::spawn(writer(w, clients, shared.clone(), stop_rx.clone())));
    }
    let mut unplanned = 0;
    let result = rounds(&options, &mut servers, &probe, &shared, &mut unplanned, &mut progress).await;
    let _ = stop_tx.send(true);
    for w in writers {
        let _ = w.await;
    }
    drop(servers);
    let rounds = result?;
    Ok(FailoverReport::new(
        &options,
        rounds,
        unplanned,
        shared.ok.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
    ))
}

/// Waits until the cluster is healthy and writes flowed for the settle
/// time, with the same leader before and after; that leader. Adds the
/// elections seen during the settle time to `unplanned`.
async fn settle(
    options: &FailoverOptions,
    servers: &Servers,
    probe: &Probe,
    shared: &Shared,
    unplanned: &mut u64,
) -> Result<Agreed, FailoverError> {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        let before = loop {
            if let Some(agreed) = probe.agreed_leader(servers.len()).await {
                break agreed;
            }
            if Instant::now() > deadline {
                return Err(FailoverError::Unhealthy(format!(
                    "the nodes did not agree on a leader within {} s; logs in {}",
                    READY_LIMIT.as_secs(),
                    servers.logs()
                )));
            }
            tokio::time::sleep(STATUS_POLL).await;
        };
        shared.epoch.fetch_add(1, Ordering::Relaxed);
        shared.acks().clear();
        tokio::time::sleep(options.settle).await;
        let flowing = shared
            .acks()
            .iter()
            .map(|a| a.done)
            .max()
            .is_some_and(|last| last.elapsed() <= FLOWING);
        let after = probe.agreed_leader(servers.len()).await;
        if let Some(after) = &after {
            *unplanned += after.term.saturating_sub(before.term);
        }
        if let Some(after) = after
            && after.leader == before.leader
            && flowing
        {
            return Ok(after);
        }
        if Instant::now() > deadline {
            return Err(FailoverError::Unhealthy(format!(
                "writes did not flow steadily within {} s; logs in {}",
                READY_LIMIT.as_secs(),
                servers.logs()
            )));
        }
    }
}

/// Waits for the first write sent at or after `kill_at` through a node
/// other than `killed` to be acknowledged, until `deadline`; its
/// acknowledgement time.
async fn first_write_after(shared: &Shared, kill_at: Instant, killed: usize, deadline: Instant) -> Option<Instant> {
    let mut acked = shared.acked.subscribe();
    let mut scanned = 0;
    loop {
        acked.borrow_and_update();
        {
            let acks = shared.acks();
            let found = acks[scanned.min(acks.len())..]
                .iter()
                .filter(|a| a.sent >= kill_at && a.node != killed)
                .map(|a| a.done)
                .min();
            if found.is_some() {
                return found;
            }
            scanned = acks.len();
        }
        match tokio::time::timeout_at(deadline, acked.changed()).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
    }
}

/// Polls the survivors until one names a leader other than `killed_id`,
/// until `deadline`; when it first did.
async fn elected(probe: &Probe, n: usize, killed: usize, killed_id: u64, deadline: Instant) -> Option<Instant> {
    while Instant::now() < deadline {
        for i in (0..n).filter(|i| *i != killed) {
            if let Some(s) = probe.status(i).await
                && s.leader != 0
                && s.leader != killed_id
            {
                return Some(Instant::now());
            }
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
    None
}

/// The highest term the survivors report once it is above `before`
/// (etcd reports the term of its last applied entry, which follows the
/// election by a moment), polling for at most a second; `None` when no
/// survivor answers.
async fn term_after(probe: &Probe, n: usize, killed: usize, before: u64) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let mut highest = None;
        for i in (0..n).filter(|i| *i != killed) {
            if let Some(s) = probe.status(i).await {
                highest = highest.max(Some(s.term));
            }
        }
        if highest.is_some_and(|t| t > before) || Instant::now() > deadline {
            return highest;
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// The longest stretch without an acknowledgement through a node other
/// than `killed`, from the last one before `kill_at` to `until`.
fn longest_gap(acks: &[Ack], kill_at: Instant, killed: usize, until: Instant) -> Option<Duration> {
    let last_before = acks
        .iter()
        .filter(|a| a.node != killed && a.done <= kill_at)
        .map(|a| a.done)
        .max()?;
    let mut times: Vec<Instant> = acks
        .iter()
        .filter(|a| a.node != killed && a.done > last_before && a.done <= until)
        .map(|a| a.done)
        .collect();
    times.push(until);
    times.sort();
    let mut previous = last_before;
    let mut longest = Duration::ZERO;
    for t in times {
        longest = longest.max(t.saturating_duration_since(previous));
        previous = t;
    }
    Some(longest)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn rounds(
    options: &FailoverOptions,
    servers: &mut Servers,
    probe: &Probe,
    shared: &Shared,
    unplanned: &mut u64,
    progress: &mut impl FnMut(&str),
) -> Result<Vec<Round>, FailoverError> {
    let n = servers.len();
    let mut rounds: Vec<Round> = Vec::with_capacity(options.kills);
    for round in 1..=options.kills {
        let healthy = settle(options, servers, probe, shared, unplanned).await?;
        let leader = healthy.leader;
        if let Some(previous) = rounds.last_mut() {
            previous.new_leader = Some(leader);
        }
        let failed_before = shared.failed.load(Ordering::Relaxed);
        let kill_at = Instant::now();
        servers.kill(leader)?;
        let deadline = kill_at + options.recovery_limit;
        let (recovered, elected_at) = tokio::join!(
            first_write_after(shared, kill_at, leader, deadline),
            elected(probe, n, leader, healthy.ids[leader], deadline),
        );
        let failed_writes = shared.failed.load(Ordering::Relaxed) - failed_before;
        let term = match recovered {
            Some(_) => term_after(probe, n, leader, healthy.term).await,
            None => None,
        };
        let gap = recovered.and_then(|until| longest_gap(&shared.acks(), kill_at, leader, until));
        let r = Round {
            round,
            killed: leader,
            new_leader: None,
            elected_ms: elected_at.map(|t| millis(t - kill_at)),
            terms: term.map(|t| t.saturating_sub(healthy.term)),
            recovery_ms: recovered.map(|t| millis(t - kill_at)),
            gap_ms: gap.map(millis),
            failed_writes,
        };
        let ms = |t: Option<f64>| t.map_or_else(|| "-".to_string(), |t| format!("{t:.0} ms"));
        progress(&format!(
            "{} round {round}/{}: killed leader node {leader}; new leader named after {}, writes again after {} (gap {}, {failed_writes} failed writes; {} term(s) later)",
            options.label,
            options.kills,
            ms(r.elected_ms),
            ms(r.recovery_ms),
            ms(r.gap_ms),
            r.terms.map_or_else(|| "-".to_string(), |t| t.to_string()),
        ));
        rounds.push(r);
        servers.restart(leader)?;
    }
    // The last round's new leader, once the restarted node is back.
    if let Some(last) = rounds.last_mut() {
        let deadline = Instant::now() + READY_LIMIT;
        while Instant::now() < deadline {
            if let Some(agreed) = probe.agreed_leader(n).await {
                last.new_leader = Some(agreed.leader);
                break;
            }
            tokio::time::sleep(STATUS_POLL).await;
        }
    }
    Ok(rounds)
}

/// `cell0-chaos failover`: the command line of a measurement, or of a
/// comparison of earlier ones.
#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// The system to measure: a 3-node cluster of it is started.
    #[arg(long, value_enum, required_unless_present = "compare")]
    pub target: Option<Target>,
    /// How many times the leader is killed.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub kills: u32,
    /// Concurrent writers (each with a connection to every node).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub writers: u32,
    /// Deadline of every write, in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=10_000))]
    pub request_timeout_ms: u64,
    /// How long writes flow on a healthy cluster before each kill, in
    /// milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub settle_ms: u64,
    /// How long a round waits for writes to succeed again, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub recovery_limit_s: u64,
    /// The name the results go under (default: the target's), e.g. to tell
    /// Cell0 tunings apart.
    #[arg(long)]
    pub label: Option<String>,
    /// Where the nodes' data dirs, logs and `failover.json` go; must not
    /// exist or be empty (default: a new directory under the system's
    /// temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the results (JSON) here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The cell0 binary (default: `cell0` next to this program).
    #[arg(long, env = "CELL0_BIN")]
    pub cell0_bin: Option<PathBuf>,
    /// A config file for every Cell0 node (e.g. a `[raft]` section).
    #[arg(long)]
    pub cell0_config: Option<PathBuf>,
    /// The Cell0 nodes' log filter, e.g. `info` to see elections
    /// (default: `info,openraft=warn`).
    #[arg(long)]
    pub cell0_log_level: Option<String>,
    /// The etcd 3.4 binary.
    #[arg(long, env = "ETCD_BIN", default_value = "etcd")]
    pub etcd_bin: PathBuf,
    /// etcd member i listens for clients on base + 10(i+1), for peers on
    /// the port after.
    #[arg(long, default_value_t = 24400)]
    pub etcd_base_port: u16,
    /// Instead of measuring: pool the results files of earlier runs
    /// (`--json` or `failover.json`) per label and print one table.
    #[arg(long, num_args = 1.., conflicts_with = "target")]
    pub compare: Vec<PathBuf>,
}

/// Runs `cell0-chaos failover`: a measurement (progress on stderr, the
/// table on stdout, the JSON in the run's directory and at `--json`) or,
/// with `--compare`, the table of earlier results. `Ok(false)` when a
/// round did not recover. Needs no runtime of its own: it builds one.
pub fn command(args: FailoverArgs) -> Result<bool, FailoverError> {
    if !args.compare.is_empty() {
        let reports = args
            .compare
            .iter()
            .map(|p| FailoverReport::read(p))
            .collect::<Result<Vec<_>, _>>()?;
        print!("{}", table(&reports));
        return Ok(true);
    }
    let Some(target) = args.target else {
        return Err(FailoverError::Usage("give --target or --compare".into()));
    };
    let cell0_bin = match args.cell0_bin {
        Some(b) => b,
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("cell0")))
            .unwrap_or_else(|| PathBuf::from("cell0")),
    };
    if target == Target::Cell0 && !cell0_bin.exists() {
        return Err(FailoverError::Usage(format!(
            "no cell0 binary at {} (give --cell0-bin)",
            cell0_bin.display()
        )));
    }
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!(
            "cell0-failover-{}-{}-{}",
            target.name(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        )),
    };
    if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(FailoverError::Usage(format!(
            "{} is not empty: give a new --dir",
            dir.display()
        )));
    }
    let options = FailoverOptions {
        target,
        label: args.label.unwrap_or_else(|| target.name().to_string()),
        kills: args.kills as usize,
        writers: args.writers as usize,
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        settle: Duration::from_millis(args.settle_ms),
        recovery_limit: Duration::from_secs(args.recovery_limit_s),
        dir: dir.clone(),
        cell0_bin,
        cell0_config: args.cell0_config,
        cell0_log_level: args.cell0_log_level,
        etcd_bin: args.etcd_bin,
        etcd_base_port: args.etcd_base_port,
    };
    eprintln!(
        "cell0-chaos failover: {} ({}), {} kills, {} writers, {} ms write deadline; files in {}",
        options.label,
        target.name(),
        options.kills,
        options.writers,
        args.request_timeout_ms,
        dir.display()
    );
    let runtime = tokio::runtime::Runtime::new().map_err(|e| FailoverError::Usage(format!("a runtime: {e}")))?;
    let report = runtime.block_on(async move {
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| FailoverError::Usage(format!("SIGTERM handler: {e}")))?;
        // Dropping the measurement kills and reaps everything it started.
        tokio::select! {
            r = run(options, |line| eprintln!("{line}")) => r,
            _ = tokio::signal::ctrl_c() => Err(FailoverError::Interrupted("SIGINT")),
            _ = sigterm.recv() => Err(FailoverError::Interrupted("SIGTERM")),
        }
    })?;
    drop(runtime);
    report.write(&dir.join("failover.json"))?;
    if let Some(json) = &args.json {
        report.write(json)?;
    }
    print!("{}", table(std::slice::from_ref(&report)));
    Ok(report.recovery.missing == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_missing_times_rank_last() {
        let s = Stats::of((1..=20).map(|i| Some(f64::from(i))));
        assert_eq!(s.n, 20);
        assert_eq!(s.p50_ms, Some(10.0));
        assert_eq!(s.p90_ms, Some(18.0));
        assert_eq!(s.p99_ms, Some(20.0));
        assert_eq!(s.max_ms, Some(20.0));
        let s = Stats::of([Some(3.0), None, Some(1.0), Some(2.0)]);
        assert_eq!(s.missing, 1);
        assert_eq!(s.p50_ms, Some(2.0));
        assert_eq!(s.p99_ms, None);
        assert_eq!(Stats::of([]).p50_ms, None);
    }

    #[test]
    fn the_gap_runs_from_the_last_ack_before_the_kill() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ack = |done: u64, node: usize| Ack {
            sent: at(done.saturating_sub(5)),
            done: at(done),
            node,
        };
        // Node 0 is killed at 100; node 1 acks at 90, 120 (in flight at the
        // kill), then nothing until 900.
        let acks = [ack(90, 1), ack(99, 0), ack(120, 1), ack(900, 2)];
        let gap = longest_gap(&acks, at(100), 0, at(900));
        assert_eq!(gap, Some(Duration::from_millis(780)));
        assert_eq!(longest_gap(&[ack(99, 0)], at(100), 0, at(900)), None);
    }

    #[test]
    fn the_table_pools_labels_and_compares_with_etcd() {
        let round = |ms: f64| Round {
            round: 1,
            killed: 0,
            new_leader: Some(1),
            elected_ms: Some(ms - 50.0),
            terms: Some(1),
            recovery_ms: Some(ms),
            gap_ms: Some(ms + 10.0),
            failed_writes: 3,
        };
        let report = |target, label: &str, ms: f64| FailoverReport {
            target,
            label: label.to_string(),
            writers: 8,
            request_timeout_ms: 500,
            settle_ms: 2000,
            cell0_config: None,
            rounds: vec![round(ms)],
            unplanned_elections: 0,
            writes_ok: 10,
            writes_failed: 3,
            recovery: Stats::default(),
            gap: Stats::default(),
            elected: Stats::default(),
        };
        let t = table(&[
            report(Target::Cell0, "cell0", 1000.0),
            report(Target::Etcd, "etcd", 2000.0),
            report(Target::Cell0, "cell0", 3000.0),
        ]);
        assert!(t.contains("| cell0 | 2 | 8 | 1000 | 3000 | 3000 | 3000 |"), "{t}");
        assert!(t.contains("| etcd | 1 | 8 | 2000 |"), "{t}");
        assert!(t.contains("cell0 / etcd: recovery p50 x0.50, p99 x1.50"), "{t}");
    }
}
