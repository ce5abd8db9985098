//! The public gRPC API (`cell0.v1`): request validation, per-request
//! metrics and trace ids. Handlers fail with an [`ApiError`]; [`error`] is
//! the only place an error becomes a gRPC status (code, message,
//! `google.rpc.ErrorInfo` reason and the leader hint).
//!
//! Every call passes [`auth::AuthLayer`] first (trace id, ACL token,
//! audit line), then [`dispatch::KvFirstLayer`] (Kv calls straight to the
//! Kv handlers, unary ones through [`unary`], the rest through tonic's
//! router), then every handler runs
//! through [`RequestGate::observe`]. A node has one
//! [`RequestGate`] (made by `server::run`) shared by all of its services,
//! so the concurrent-request budget belongs to the node: several nodes in
//! one process (tests, the simulator) each have their own.

pub mod acl;
pub mod agents;
pub mod auth;
pub mod cluster;
pub mod connlimit;
pub mod dispatch;
pub mod error;
pub mod forward;
pub mod inference;
pub mod kv;
pub mod models;
pub mod ratelimit;
pub mod sites;
pub mod tasks;
pub mod unary;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;
use tokio::time::Instant;

use cell0_consensus::KeyValue;
use cell0_proto::v1;
use tonic::Status;
use tracing::Instrument;

pub use error::{ApiError, LEADER_METADATA};

/// Most requests one node handles at once on its public port (a watch
/// counts only while it starts; streams have their own limit). Beyond it a
/// request fails at once with RESOURCE_EXHAUSTED instead of queueing memory.
pub const MAX_CONCURRENT_REQUESTS: usize = 1024;

/// A key-value pair on the wire.
pub fn kv_to_proto(kv: KeyValue) -> v1::KeyValue {
    v1::KeyValue {
        key: kv.key.into(),
        value: kv.value.into(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
    }
}

/// One node's budget of concurrent requests: [`MAX_CONCURRENT_REQUESTS`]
/// permits. Clones share the budget; a gate made with `default()` has its
/// own. `server::run` makes one per node and hands a clone to every service
/// of that node.
#[derive(Clone, Debug)]
pub struct RequestGate {
    permits: Arc<Semaphore>,
    /// Each method's metric handles, made at its first request.
    methods: Arc<RwLock<HashMap<&'static str, MethodMetrics>>>,
}

impl Default for RequestGate {
    /// A gate with a budget of its own of [`MAX_CONCURRENT_REQUESTS`].
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
            methods: Arc::default(),
        }
    }
}

/// One method's handles of the request metrics: finding a metric by name
/// and labels in the recorder's registry builds and hashes its key, which
/// on every request cost more than the count it records.
struct MethodMetrics {
    /// `cell0_grpc_requests_total{method,code="Ok"}`.
    succeeded: metrics::Counter,
    /// `cell0_grpc_request_duration_seconds{method}`.
    duration: metrics::Histogram,
}

impl std::fmt::Debug for MethodMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MethodMetrics")
    }
}

impl MethodMetrics {
    fn new(method: &'static str) -> Self {
        Self {
            succeeded: metrics::counter!(REQUESTS_METRIC, "method" => method, "code" => code_label(tonic::Code::Ok)),
            duration: metrics::histogram!(REQUEST_DURATION_METRIC, "method" => method),
        }
    }
}

/// Requests answered, by method and gRPC code.
const REQUESTS_METRIC: &str = "cell0_grpc_requests_total";
/// How long requests took, by method.
const REQUEST_DURATION_METRIC: &str = "cell0_grpc_request_duration_seconds";

impl RequestGate {
    /// Runs one request handler inside a span with a trace id, turns its
    /// error into the status the client gets, and records
    /// `cell0_grpc_requests_total{method,code}` and the request duration.
    ///
    /// The span is at debug level: the log subscriber formats a span's
    /// fields when it is made, which at the default level cost every
    /// request more than its metrics did, for the few logs a handler
    /// writes. Those logs name the trace id themselves, as the failure
    /// logged here does ([`auth::current_trace_id`]).
    ///
    /// The handler holds one permit of this gate while it runs; when none is
    /// free it is not run and the request fails at once with
    /// [`ApiError::TooManyRequests`] (`RESOURCE_EXHAUSTED`).
    pub async fn observe<T, F>(&self, method: &'static str, handler: F) -> Result<T, Status>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        // The id the access layer gave the call (and returned in the
        // `cell0-trace-id` header); a fresh one outside it (tests).
        let trace_id = auth::current_trace_id();
        let started = Instant::now();
        let result = match self.permits.try_acquire() {
            Ok(_permit) => {
                handler
                    .instrument(tracing::debug_span!("request", method, trace_id = %trace_id))
                    .await
            }
            Err(_) => Err(ApiError::TooManyRequests),
        };
        let result = result.map_err(Status::from);
        if let Err(s) = &result {
            if matches!(s.code(), tonic::Code::Internal | tonic::Code::Unknown) {
                tracing::warn!(method, trace_id = %trace_id, error = %s.message(), "request failed");
            }
            metrics::counter!(REQUESTS_METRIC, "method" => method, "code" => code_label(s.code())).increment(1);
        }
        let elapsed = started.elapsed().as_secs_f64();
        self.with_method_metrics(method, |handles| {
            if result.is_ok() {
                handles.succeeded.increment(1);
            }
            handles.duration.record(elapsed);
        });
        result
    }

    /// Calls `f` with `method`'s metric handles, made at its first request.
    fn with_method_metrics(&self, method: &'static str, f: impl FnOnce(&MethodMetrics)) {
        if let Some(handles) = self.methods.read().unwrap_or_else(|p| p.into_inner()).get(method) {
            return f(handles);
        }
        let mut methods = self.methods.write().unwrap_or_else(|p| p.into_inner());
        f(methods.entry(method).or_insert_with(|| MethodMetrics::new(method)));
    }
}

/// `code` as the `code` label of `cell0_grpc_requests_total` spells it
/// (its Rust name), without formatting a string on every request.
pub(crate) fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tonic::Code;

    use super::*;

    /// Holds every permit of `gate`, as [`MAX_CONCURRENT_REQUESTS`]
    /// requests in flight would.
    fn exhaust(gate: &RequestGate) -> tokio::sync::SemaphorePermit<'_> {
        let all = u32::try_from(MAX_CONCURRENT_REQUESTS).expect("limit fits u32");
        gate.permits.try_acquire_many(all).expect("all permits free")
    }

    #[test]
    fn code_labels_are_the_codes_rust_names() {
        for i in 0..=16 {
            let code = Code::from(i);
            assert_eq!(code_label(code), format!("{code:?}"), "code {i}");
        }
    }

    #[tokio::test]
    async fn a_full_gate_answers_too_many_requests_without_running_the_handler() {
        let gate = RequestGate::default();
        let ran = AtomicUsize::new(0);
        let handler = || async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ApiError>(7)
        };

        let held = exhaust(&gate);
        let s = gate.observe("Test/Full", handler()).await.expect_err("refused");
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(error::reason_of(&s).as_deref(), Some("TOO_MANY_REQUESTS"));
        // A clone shares the budget.
        let s = gate.clone().observe("Test/Full", handler()).await.expect_err("refused");
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(ran.load(Ordering::SeqCst), 0);

        drop(held);
        assert_eq!(gate.observe("Test/Full", handler()).await.expect("served"), 7);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        // The permit is given back when the handler ends.
        assert_eq!(gate.permits.available_permits(), MAX_CONCURRENT_REQUESTS);
    }

    #[tokio::test]
    async fn two_gates_do_not_share_permits() {
        let a = RequestGate::default();
        let b = RequestGate::default();
        let _held = exhaust(&a);

        let s = a
            .observe("Test/A", async { Ok::<_, ApiError>(()) })
            .await
            .expect_err("a is full");
        assert_eq!(s.code(), Code::ResourceExhausted);
        b.observe("Test/B", async { Ok::<_, ApiError>(()) })
            .await
            .expect("b has its own budget");
        assert_eq!(b.permits.available_permits(), MAX_CONCURRENT_REQUESTS);
    }
}
