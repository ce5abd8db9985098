//! HTTP operations endpoints: `/metrics` (Prometheus), `/live`, `/ready`,
//! `/health` and `/health/deep` (JSON), for load balancers, Kubernetes probes
//! and people.
//!
//! Liveness means the process serves HTTP; readiness means it can answer
//! consistent requests (a leader is known and the local replica has applied
//! everything known committed); health adds the storage and Raft checks.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use cell0_consensus::{Consensus, Role};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

/// What readiness depends on besides Raft: whether this node is still asking
/// to be admitted (a joining node is not ready until its join completed, so
/// "all nodes ready" means "all nodes in their final role").
#[derive(Clone)]
pub struct Readiness {
    consensus: Consensus,
    joining: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Readiness {
    /// Readiness of `consensus`, not yet joining.
    pub fn new(consensus: Consensus) -> Self {
        Self {
            consensus,
            joining: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Marks whether a join is in progress.
    pub fn set_joining(&self, joining: bool) {
        self.joining.send_replace(joining);
    }

    /// Changes of whether a join is in progress.
    pub fn joining_changes(&self) -> tokio::sync::watch::Receiver<bool> {
        self.joining.subscribe()
    }

    /// Why the node is not ready, or `None` when it is. A replica that has
    /// not applied everything committed gets [`APPLY_GRACE`] to apply what
    /// was committed when it was asked: under writes the commit index runs
    /// a moment ahead of the applied one all the time, and that is no lag.
    pub async fn not_ready_reason(&self) -> Option<String> {
        if *self.joining.borrow() {
            return Some("joining the cluster".into());
        }
        let s = self.consensus.status();
        if !s.initialized {
            return Some("not a member of a cluster yet".into());
        }
        if s.leader.is_none() {
            return Some("no leader known".into());
        }
        if s.applied_index < s.commit_index && self.consensus.wait_applied(s.commit_index, APPLY_GRACE).await.is_err() {
            return Some(format!(
                "applied index {} behind commit index {} after {} ms",
                self.consensus.status().applied_index,
                s.commit_index,
                APPLY_GRACE.as_millis()
            ));
        }
        None
    }
}

/// How long readiness waits for the local replica to apply what was
/// committed when it looked ([`Readiness::not_ready_reason`]).
pub const APPLY_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Ops {
    consensus: Consensus,
    readiness: Readiness,
    metrics: PrometheusHandle,
}

/// The router of the HTTP port.
pub fn router(readiness: Readiness, metrics: PrometheusHandle) -> Router {
    let consensus = readiness.consensus.clone();
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/health", get(health))
        .route("/health/deep", get(health_deep))
        .with_state(Ops {
            consensus,
            readiness,
            metrics,
        })
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], ops.metrics.render())
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    match ops.readiness.not_ready_reason().await {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn health(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.consensus.status().role == Role::Shutdown {
        (StatusCode::SERVICE_UNAVAILABLE, "raft stopped\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

#[derive(Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

#[derive(Serialize)]
struct Peer {
    id: u64,
    name: String,
    internal_addr: String,
    voter: bool,
    leader: bool,
    matched_index: u64,
}

#[derive(Serialize)]
struct Deep {
    ok: bool,
    node_id: u64,
    storage: Check,
    raft: Check,
    ready: Check,
    peers: Vec<Peer>,
}

async fn health_deep(State(ops): State<Ops>) -> impl IntoResponse {
    let c = &ops.consensus;
    let storage = match c.revision() {
        Ok(rev) => Check {
            ok: true,
            detail: format!("revision {rev}"),
        },
        Err(e) => Check {
            ok: false,
            detail: e.to_string(),
        },
    };
    let s = c.status();
    let raft = Check {
        ok: s.role != Role::Shutdown,
        detail: format!(
            "role {:?}, term {}, leader {}, commit {}, applied {}",
            s.role,
            s.term,
            s.leader.map_or("none".to_string(), |l| l.to_string()),
            s.commit_index,
            s.applied_index
        ),
    };
    let ready = match ops.readiness.not_ready_reason().await {
        None => Check {
            ok: true,
            detail: "ready".into(),
        },
        Some(r) => Check { ok: false, detail: r },
    };
    let peers = c
        .members()
        .into_iter()
        .map(|m| Peer {
            id: m.id,
            name: m.info.name,
            internal_addr: m.info.internal_addr,
            voter: m.voter,
            leader: m.leader,
            matched_index: m.matched_index,
        })
        .collect();
    let ok = storage.ok && raft.ok && ready.ok;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Deep {
            ok,
            node_id: c.id(),
            storage,
            raft,
            ready,
            peers,
        }),
    )
}
