//! Logs and metrics of a running node.
//!
//! Logs go through `tracing` (text or JSON lines). Metrics are recorded with
//! the `metrics` facade and exported in Prometheus format on the HTTP port;
//! every name starts with `cell0_` and carries its unit. Raft gauges are fed
//! from openraft's metrics channel, so they change when Raft does rather
//! than on a poll interval.
//!
//! The metrics recorder is process-global: [`init_metrics`] installs it once
//! and hands every later caller (another node in the same process, as in the
//! in-process tests) the same handle, so such nodes share one registry.

use std::sync::{Mutex, OnceLock};

use anyhow::Context;
use cell0_consensus::{Consensus, Role};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::supervisor::{TASK_FAILURES_METRIC, stopped};

/// Installs the global log subscriber.
pub fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level).with_context(|| format!("log_level {level:?} is not a valid filter"))?;
    // Colours only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// The recorder's handle once installed.
static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();
/// Held while installing, so two nodes starting at once install one recorder.
static INSTALL: Mutex<()> = Mutex::new(());

/// Installs the Prometheus recorder and describes the node's metrics, once
/// per process; later calls return the installed recorder's handle.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = METRICS.get() {
        return Ok(handle.clone());
    }
    let _installing = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = METRICS.get() {
        return Ok(handle.clone());
    }
    let handle = install_metrics()?;
    Ok(METRICS.get_or_init(|| handle).clone())
}

fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_commands".into()), COUNT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(cell0_inference::BATCH_SIZE_METRIC.into()), COUNT_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(cell0_storage::APPENDS_PER_FSYNC_METRIC.into()),
            COUNT_BUCKETS,
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    metrics::describe_gauge!("cell0_raft_term", "Current Raft term.");
    metrics::describe_gauge!(
        "cell0_raft_role",
        "1 for the node's current Raft role (label role), 0 otherwise."
    );
    metrics::describe_gauge!("cell0_raft_commit_index", "Highest log index known committed.");
    metrics::describe_gauge!("cell0_raft_applied_index", "Highest log index applied locally.");
    metrics::describe_gauge!("cell0_raft_last_log_index", "Last log index stored locally.");
    metrics::describe_counter!(
        "cell0_raft_leader_changes_total",
        "Times this node saw the leader change."
    );
    metrics::describe_histogram!(
        "cell0_raft_batch_commands",
        "Client commands grouped into one log entry."
    );
    metrics::describe_histogram!(
        "cell0_write_duration_seconds",
        metrics::Unit::Seconds,
        "Time to apply a write through Raft."
    );
    metrics::describe_histogram!(
        cell0_storage::FSYNC_SECONDS_METRIC,
        metrics::Unit::Seconds,
        "Time of each durable write of Raft log entries: a leader's grouped sync, a follower's synced append."
    );
    metrics::describe_histogram!(
        cell0_storage::APPENDS_PER_FSYNC_METRIC,
        "Raft log appends made durable by one fsync."
    );
    metrics::describe_counter!(
        cell0_storage::ENTRIES_READ_METRIC,
        "Raft log entries read back for apply and replication, from memory (source=memory) or decoded from RocksDB (source=engine)."
    );
    metrics::describe_counter!(
        cell0_storage::ROW_CACHE_READS_METRIC,
        "Point reads of apply answered by the row cache (result=hit) or read from RocksDB (result=miss)."
    );
    metrics::describe_histogram!(
        "cell0_read_duration_seconds",
        metrics::Unit::Seconds,
        "Time to serve a point read, barrier included."
    );
    metrics::describe_counter!(
        "cell0_grpc_requests_total",
        "Public gRPC requests by method and status code."
    );
    metrics::describe_histogram!(
        "cell0_grpc_request_duration_seconds",
        metrics::Unit::Seconds,
        "Public gRPC request duration by method."
    );
    metrics::describe_histogram!(
        cell0_inference::BATCH_SIZE_METRIC,
        "Texts per forward pass of the embedding batcher."
    );
    metrics::describe_counter!(
        cell0_inference::REQUESTS_ABANDONED_METRIC,
        "Embed requests skipped because their caller went away before they ran."
    );
    metrics::describe_counter!(
        "cell0_raft_append_split_total",
        "AppendEntries calls cut down to the byte budget of their peer (at most max_append_bytes)."
    );
    metrics::describe_counter!(
        "cell0_raft_append_shrink_total",
        "Halvings of a peer's AppendEntries byte budget after a call that did not finish in time."
    );
    metrics::describe_counter!(
        "cell0_raft_prompt_elections_total",
        "Elections this node started at once, not on openraft's timer, after its leader lease ran out, by reason."
    );
    metrics::describe_counter!(
        "cell0_scheduler_placements_total",
        "Agent placements committed by this node's scheduler while it led."
    );
    metrics::describe_counter!(
        "cell0_scheduler_plan_refusals_total",
        "Placements of committed plans that the state machine refused (made on a stale view; evaluated again)."
    );
    metrics::describe_gauge!(
        "cell0_scheduler_unplaced_agents",
        "Agents the scheduler's last plan could not place (they wait for the nodes to change)."
    );
    metrics::describe_histogram!(
        "cell0_scheduler_round_duration_seconds",
        metrics::Unit::Seconds,
        "One scheduler round on the leader: read the evaluations and nodes, plan, commit."
    );
    metrics::describe_counter!(
        "cell0_accept_errors_total",
        "Failed accepts on a listening port (each followed by a 100 ms pause)."
    );
    metrics::describe_gauge!(
        "cell0_models_ready",
        "Registered model versions loaded and serving on this node."
    );
    metrics::describe_counter!(
        "cell0_model_fetch_bytes_total",
        metrics::Unit::Bytes,
        "Model file bytes received from peers."
    );
    metrics::describe_counter!(
        "cell0_model_blob_corrupt_total",
        "Model files that failed sha256 verification (deleted and fetched again)."
    );
    metrics::describe_counter!(
        TASK_FAILURES_METRIC,
        "Background tasks of the node (label task) that returned an error or panicked."
    );
    Ok(handle)
}

/// Keeps the Raft gauges current until Raft stops or `stop` turns true.
///
/// Raft's metrics change several times per log entry, so the gauges' handles
/// are found in the recorder once, not on every change.
pub async fn export_raft_metrics(consensus: Consensus, mut stop: watch::Receiver<bool>) {
    let mut rx = consensus.raft().metrics();
    let term = metrics::gauge!("cell0_raft_term");
    let commit_index = metrics::gauge!("cell0_raft_commit_index");
    let applied_index = metrics::gauge!("cell0_raft_applied_index");
    let last_log_index = metrics::gauge!("cell0_raft_last_log_index");
    let roles = [
        (Role::Leader, "leader"),
        (Role::Follower, "follower"),
        (Role::Candidate, "candidate"),
        (Role::Learner, "learner"),
    ]
    .map(|(role, name)| (role, metrics::gauge!("cell0_raft_role", "role" => name)));
    let mut leader = None;
    loop {
        let s = consensus.status();
        term.set(s.term as f64);
        commit_index.set(s.commit_index as f64);
        applied_index.set(s.applied_index as f64);
        last_log_index.set(s.last_log_index as f64);
        for (role, gauge) in &roles {
            gauge.set(if s.role == *role { 1.0 } else { 0.0 });
        }
        if s.leader != leader {
            if leader.is_some() || s.leader.is_some() {
                metrics::counter!("cell0_raft_leader_changes_total").increment(1);
            }
            leader = s.leader;
        }
        if s.role == Role::Shutdown {
            return;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            () = stopped(&mut stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    /// The Prometheus rules in deploy/ use only documented metrics, and
    /// each rule has its runbook paragraph.
    #[test]
    fn every_alert_rule_uses_documented_metrics_and_has_a_runbook() {
        let rules = include_str!("../../deploy/prometheus/alerts.yml");
        let docs = include_str!("../../docs/operations.md");
        let (_, metrics_section) = docs.split_once("## Metrics").expect("a metrics section");
        let mut alerts = 0;
        for line in rules.lines() {
            if let Some(name) = line.trim().strip_prefix("- alert: ") {
                alerts += 1;
                assert!(
                    docs.contains(&format!("### {name}\n")),
                    "{name} has no runbook in docs/operations.md"
                );
                let anchor = format!("docs/operations.md#{}", name.to_lowercase());
                assert!(rules.contains(&anchor), "{name} does not link {anchor}");
            }
            let mut rest = line;
            while let Some(at) = rest.find("cell0_") {
                let metric: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect();
                let base = metric.strip_suffix("_bucket").unwrap_or(&metric);
                assert!(
                    metrics_section.contains(&format!("`{base}")),
                    "{base} (alerts.yml) is not in the metrics table of docs/operations.md"
                );
                rest = &rest[at + metric.len()..];
            }
        }
        assert_eq!(alerts, 8);
    }
}
