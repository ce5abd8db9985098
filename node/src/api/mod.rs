//! The public gRPC API (`cell0.v1`): request validation, the mapping of
//! consensus errors to gRPC status codes (the only place it happens), and
//! per-request metrics and trace ids.

pub mod cluster;
pub mod inference;
pub mod kv;
pub mod models;

use std::future::Future;
use std::time::Instant;

use cell0_consensus::{ConsensusError, KeyValue};
use cell0_inference::InferenceError;
use cell0_proto::v1;
use tonic::Status;
use tracing::Instrument;

use crate::models::ModelError;

/// Metadata key carrying the leader's public address on `Unavailable`.
pub const LEADER_METADATA: &str = "cell0-leader";

/// Most requests one node handles at once on its public port (a watch
/// counts only while it starts; streams have their own limit). Beyond it a
/// request fails at once with RESOURCE_EXHAUSTED instead of queueing memory.
pub const MAX_CONCURRENT_REQUESTS: usize = 1024;

/// The process's budget of concurrent requests (one node per process).
static IN_FLIGHT: std::sync::LazyLock<tokio::sync::Semaphore> =
    std::sync::LazyLock::new(|| tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS));

/// Maps a consensus error to the gRPC status a client sees.
pub fn to_status(e: ConsensusError) -> Status {
    match e {
        ConsensusError::InvalidArgument { field, reason } => Status::invalid_argument(format!("{field} {reason}")),
        ConsensusError::Unavailable {
            reason,
            leader_id,
            leader_addr,
        } => {
            let mut status = Status::unavailable(reason);
            if let Some(addr) = leader_addr.or(leader_id.map(|id| id.to_string()))
                && let Ok(v) = addr.parse()
            {
                status.metadata_mut().insert(LEADER_METADATA, v);
            }
            status
        }
        ConsensusError::Indeterminate(m) => Status::unknown(format!("write outcome unknown: {m}")),
        ConsensusError::Compacted { requested, oldest } => Status::out_of_range(format!(
            "revision {requested} is compacted; the oldest retained revision is {oldest}"
        )),
        ConsensusError::NotFound(m) => Status::not_found(m),
        ConsensusError::ShuttingDown => Status::unavailable("the node is shutting down"),
        ConsensusError::Internal(m) => Status::internal(m),
        ConsensusError::FailedPrecondition(m) => Status::failed_precondition(m),
    }
}

/// Maps a model or engine error to the gRPC status a client sees.
pub fn model_status(e: ModelError) -> Status {
    match e {
        ModelError::Invalid { .. } | ModelError::Ambiguous { .. } => Status::invalid_argument(e.to_string()),
        ModelError::UnknownModel { .. } | ModelError::UnknownVersion { .. } => Status::not_found(e.to_string()),
        ModelError::NoModels | ModelError::NotUploaded { .. } => Status::failed_precondition(e.to_string()),
        ModelError::NotReady { .. } | ModelError::Peer { .. } | ModelError::NoHolder { .. } => {
            Status::unavailable(e.to_string())
        }
        ModelError::Corrupt { .. } => Status::data_loss(e.to_string()),
        ModelError::Io(_) => Status::internal(e.to_string()),
        ModelError::Inference(InferenceError::InvalidRequest { field, message }) => {
            Status::invalid_argument(format!("{field} {message}"))
        }
        ModelError::Inference(InferenceError::BatcherClosed) => Status::unavailable(e.to_string()),
        ModelError::Inference(other) => Status::internal(other.to_string()),
        ModelError::Consensus(c) => to_status(c),
    }
}

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

/// Runs one request handler inside a span with a trace id, and records
/// `cell0_grpc_requests_total{method,code}` and the request duration.
pub async fn observe<T, F>(method: &'static str, handler: F) -> Result<T, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    let trace_id = format!("{:016x}", rand::random::<u64>());
    let started = Instant::now();
    let result = match IN_FLIGHT.try_acquire() {
        Ok(_permit) => {
            handler
                .instrument(tracing::info_span!("request", method, trace_id = %trace_id))
                .await
        }
        Err(_) => Err(Status::resource_exhausted(format!(
            "this node is handling {MAX_CONCURRENT_REQUESTS} requests; retry later"
        ))),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_carries_the_leader_hint() {
        let s = to_status(ConsensusError::Unavailable {
            reason: "no quorum".into(),
            leader_id: Some(7),
            leader_addr: Some("10.0.0.7:7100".into()),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_METADATA).unwrap(), "10.0.0.7:7100");
        let s = to_status(ConsensusError::invalid("key", "must not be empty"));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "key must not be empty");
    }
}
