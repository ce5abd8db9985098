//! The public gRPC API (`cell0.v1`): request validation, per-request
//! metrics and trace ids. Handlers fail with an [`ApiError`]; [`error`] is
//! the only place an error becomes a gRPC status (code, message,
//! `google.rpc.ErrorInfo` reason and the leader hint).

pub mod cluster;
pub mod error;
pub mod inference;
pub mod kv;
pub mod models;

use std::future::Future;
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

/// The process's budget of concurrent requests (one node per process).
static IN_FLIGHT: std::sync::LazyLock<tokio::sync::Semaphore> =
    std::sync::LazyLock::new(|| tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS));

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

/// Runs one request handler inside a span with a trace id, turns its error
/// into the status the client gets, and records
/// `cell0_grpc_requests_total{method,code}` and the request duration.
pub async fn observe<T, F>(method: &'static str, handler: F) -> Result<T, Status>
where
    F: Future<Output = Result<T, ApiError>>,
{
    let trace_id = format!("{:016x}", rand::random::<u64>());
    let started = Instant::now();
    let result = match IN_FLIGHT.try_acquire() {
        Ok(_permit) => {
            handler
                .instrument(tracing::info_span!("request", method, trace_id = %trace_id))
                .await
        }
        Err(_) => Err(ApiError::TooManyRequests),
    };
    let result = result.map_err(Status::from);
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    if let Err(s) = &result
        && matches!(s.code(), tonic::Code::Internal | tonic::Code::Unknown)
    {
        tracing::warn!(method, trace_id = %trace_id, error = %s.message(), "request failed");
    }
    metrics::counter!("cell0_grpc_requests_total", "method" => method, "code" => format!("{code:?}")).increment(1);
    metrics::histogram!("cell0_grpc_request_duration_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
    result
}
