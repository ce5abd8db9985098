//! The one edge where the public API's errors become gRPC statuses.
//!
//! Every error a handler can answer with is an [`ApiError`];
//! `impl From<ApiError> for Status` gives it its gRPC code, its human
//! message, a `google.rpc.ErrorInfo` detail (a stable [`Reason`], the domain
//! [`DOMAIN`] and metadata such as the offending `field` or the `leader`
//! address) and, when the leader's public address is known, the
//! [`LEADER_METADATA`] hint. No other module of the API builds a `Status`.

use std::collections::HashMap;
use std::time::Duration;

use cell0_consensus::{ConsensusError, PreconditionCause, UnavailableCause};
use cell0_inference::InferenceError;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::MAX_CONCURRENT_REQUESTS;
use super::kv::MAX_WATCHES;
use crate::models::ModelError;
use crate::models::store::UploadRefused;

/// The `domain` of every `ErrorInfo` this API sends.
pub const DOMAIN: &str = "cell0";

/// gRPC metadata key carrying the leader's public address (`host:port`) on
/// an error, when that address is known. Never a bare node id.
pub const LEADER_METADATA: &str = "cell0-leader";

/// A stable, machine-readable cause of an error: the `reason` of the
/// `google.rpc.ErrorInfo` in the status details. Clients branch on it; the
/// message is for people and may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A request field is malformed or over a limit; metadata `field`.
    InvalidArgumentField,
    /// The request named no model while several are registered; metadata `field`.
    ModelAmbiguous,
    /// The node asked is not the leader and no leader answered in time.
    NotLeader,
    /// No leader is elected (or known to this node).
    NoLeader,
    /// The leader is known but did not answer.
    LeaderUnreachable,
    /// The leader could not confirm its leadership with a quorum.
    NoQuorum,
    /// The node's replica did not catch up with the leader in time for a read.
    ReplicaBehind,
    /// A joining node cannot be reached at its internal address.
    NodeUnreachable,
    /// Raft refused a membership change (another one is in progress).
    MembershipChangeRefused,
    /// The node is shutting down.
    ShuttingDown,
    /// The embedding engine of the node has stopped.
    EngineStopped,
    /// A write may or may not have been applied.
    OutcomeUnknown,
    /// The requested revision is older than the retained history.
    Compacted,
    /// A membership operation named a node that is not a member.
    NotAMember,
    /// `Join`: the learner does not answer, so it is not promoted.
    UnreachableLearner,
    /// `Join`: the learner answers but is too far behind to vote.
    LearnerBehind,
    /// `Remove`: the change would leave too few reachable voters.
    QuorumAtRisk,
    /// `Join`: the node belongs to another cluster.
    OtherCluster,
    /// Another node sent an internal message in a newer format than this
    /// node reads: upgrade this node.
    NewerMessageFormat,
    /// More concurrent requests than the node accepts.
    TooManyRequests,
    /// The client's address is over its request rate.
    RateLimited,
    /// More concurrent watches than the node serves.
    TooManyWatches,
    /// No model is registered.
    NoModels,
    /// No model has the requested name.
    ModelNotFound,
    /// The model has no such version.
    ModelVersionNotFound,
    /// The version is registered but not ready on this node yet.
    ModelNotReady,
    /// `Add` named a file that was not uploaded to this node.
    FileNotUploaded,
    /// `Add` of a name and version registered with other files.
    ModelVersionConflict,
    /// The registry holds its maximum number of versions.
    RegistryFull,
    /// An upload sent nothing for the idle timeout.
    UploadIdleTimeout,
    /// An upload would pass the node's upload quota.
    UploadQuotaExceeded,
    /// An upload would eat into the free-space reserve of the data dir.
    InsufficientDiskSpace,
    /// A stored file failed verification.
    BlobCorrupt,
    /// A peer could not deliver a file this node needs.
    PeerFetchFailed,
    /// No other node holds a file this node needs.
    NoHolder,
    /// No agent has the requested name.
    AgentNotFound,
    /// The cluster refused an agent operation (a stopped agent, an unknown
    /// one); the message says why.
    AgentRefused,
    /// A task id that does not exist; metadata `task`.
    TaskNotFound,
    /// ACLs are on and the call carries no token (or a malformed one).
    TokenRequired,
    /// The token is not known to the cluster.
    TokenUnknown,
    /// The token's policies do not allow the call; metadata `resource`,
    /// `access`.
    PermissionDenied,
    /// A call for another site (`cell0-site`) found no open site link to
    /// it, or the link failed; metadata `site`.
    SiteUnreachable,
    /// A call for another site got no answer before its deadline; metadata
    /// `site`.
    SiteTimeout,
    /// A streaming call named another site: only unary calls are
    /// forwarded; metadata `method`.
    NotForwardable,
    /// The agent is being handed between sites and takes no calls that
    /// change it until the handoff ends; retry. Metadata `agent`, `site`.
    AgentMoving,
    /// A call followed an agent's forwarding pointers through too many
    /// sites; metadata `hops`.
    TooManyHops,
    /// An ACL call on a node that runs without ACLs.
    AclDisabled,
    /// `Acl/Bootstrap` after the first management token was made.
    AclAlreadyBootstrapped,
    /// A token named a policy that does not exist; metadata `policy`.
    AclPolicyNotFound,
    /// The cluster holds its maximum number of policies or tokens.
    AclFull,
    /// A bug or a storage failure.
    Internal,
}

impl Reason {
    /// Every reason, for documentation checks.
    pub const ALL: [Reason; 51] = [
        Reason::InvalidArgumentField,
        Reason::ModelAmbiguous,
        Reason::NotLeader,
        Reason::NoLeader,
        Reason::LeaderUnreachable,
        Reason::NoQuorum,
        Reason::ReplicaBehind,
        Reason::NodeUnreachable,
        Reason::MembershipChangeRefused,
        Reason::ShuttingDown,
        Reason::EngineStopped,
        Reason::OutcomeUnknown,
        Reason::Compacted,
        Reason::NotAMember,
        Reason::UnreachableLearner,
        Reason::LearnerBehind,
        Reason::QuorumAtRisk,
        Reason::OtherCluster,
        Reason::NewerMessageFormat,
        Reason::TooManyRequests,
        Reason::RateLimited,
        Reason::TooManyWatches,
        Reason::NoModels,
        Reason::ModelNotFound,
        Reason::ModelVersionNotFound,
        Reason::ModelNotReady,
        Reason::FileNotUploaded,
        Reason::ModelVersionConflict,
        Reason::RegistryFull,
        Reason::UploadIdleTimeout,
        Reason::UploadQuotaExceeded,
        Reason::InsufficientDiskSpace,
        Reason::BlobCorrupt,
        Reason::PeerFetchFailed,
        Reason::NoHolder,
        Reason::AgentNotFound,
        Reason::AgentRefused,
        Reason::TaskNotFound,
        Reason::TokenRequired,
        Reason::TokenUnknown,
        Reason::PermissionDenied,
        Reason::SiteUnreachable,
        Reason::SiteTimeout,
        Reason::NotForwardable,
        Reason::AgentMoving,
        Reason::TooManyHops,
        Reason::AclDisabled,
        Reason::AclAlreadyBootstrapped,
        Reason::AclPolicyNotFound,
        Reason::AclFull,
        Reason::Internal,
    ];

    /// The reason as it appears on the wire (UPPER_SNAKE_CASE).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidArgumentField => "INVALID_ARGUMENT_FIELD",
            Reason::ModelAmbiguous => "MODEL_AMBIGUOUS",
            Reason::NotLeader => "NOT_LEADER",
            Reason::NoLeader => "NO_LEADER",
            Reason::LeaderUnreachable => "LEADER_UNREACHABLE",
            Reason::NoQuorum => "NO_QUORUM",
            Reason::ReplicaBehind => "REPLICA_BEHIND",
            Reason::NodeUnreachable => "NODE_UNREACHABLE",
            Reason::MembershipChangeRefused => "MEMBERSHIP_CHANGE_REFUSED",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::EngineStopped => "ENGINE_STOPPED",
            Reason::OutcomeUnknown => "OUTCOME_UNKNOWN",
            Reason::Compacted => "COMPACTED",
            Reason::NotAMember => "NOT_A_MEMBER",
            Reason::UnreachableLearner => "UNREACHABLE_LEARNER",
            Reason::LearnerBehind => "LEARNER_BEHIND",
            Reason::QuorumAtRisk => "QUORUM_AT_RISK",
            Reason::OtherCluster => "OTHER_CLUSTER",
            Reason::NewerMessageFormat => "NEWER_MESSAGE_FORMAT",
            Reason::TooManyRequests => "TOO_MANY_REQUESTS",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::TooManyWatches => "TOO_MANY_WATCHES",
            Reason::NoModels => "NO_MODELS",
            Reason::ModelNotFound => "MODEL_NOT_FOUND",
            Reason::ModelVersionNotFound => "MODEL_VERSION_NOT_FOUND",
            Reason::ModelNotReady => "MODEL_NOT_READY",
            Reason::FileNotUploaded => "FILE_NOT_UPLOADED",
            Reason::ModelVersionConflict => "MODEL_VERSION_CONFLICT",
            Reason::RegistryFull => "REGISTRY_FULL",
            Reason::UploadIdleTimeout => "UPLOAD_IDLE_TIMEOUT",
            Reason::UploadQuotaExceeded => "UPLOAD_QUOTA_EXCEEDED",
            Reason::InsufficientDiskSpace => "INSUFFICIENT_DISK_SPACE",
            Reason::BlobCorrupt => "BLOB_CORRUPT",
            Reason::PeerFetchFailed => "PEER_FETCH_FAILED",
            Reason::NoHolder => "NO_HOLDER",
            Reason::AgentNotFound => "AGENT_NOT_FOUND",
            Reason::AgentRefused => "AGENT_REFUSED",
            Reason::TaskNotFound => "TASK_NOT_FOUND",
            Reason::TokenRequired => "TOKEN_REQUIRED",
            Reason::TokenUnknown => "TOKEN_UNKNOWN",
            Reason::PermissionDenied => "PERMISSION_DENIED",
            Reason::SiteUnreachable => "SITE_UNREACHABLE",
            Reason::SiteTimeout => "SITE_TIMEOUT",
            Reason::NotForwardable => "NOT_FORWARDABLE",
            Reason::AgentMoving => "AGENT_MOVING",
            Reason::TooManyHops => "TOO_MANY_HOPS",
            Reason::AclDisabled => "ACL_DISABLED",
            Reason::AclAlreadyBootstrapped => "ACL_ALREADY_BOOTSTRAPPED",
            Reason::AclPolicyNotFound => "ACL_POLICY_NOT_FOUND",
            Reason::AclFull => "ACL_FULL",
            Reason::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a request to the public API can fail with. Converting it into
/// a [`Status`] is the only way the API answers with an error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A consensus operation failed.
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    /// A model operation or the engine failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An upload was not admitted (quota or free space).
    #[error(transparent)]
    UploadRefused(#[from] UploadRefused),
    /// A request field is malformed; `field` names it.
    #[error("{field} {reason}")]
    InvalidArgument {
        /// The field, e.g. `prefix` or `manifest`.
        field: String,
        /// What is wrong with it, phrased to follow the field's name.
        reason: String,
    },
    /// The node handles [`MAX_CONCURRENT_REQUESTS`] requests already.
    #[error("this node is handling {MAX_CONCURRENT_REQUESTS} requests; retry later")]
    TooManyRequests,
    /// The client's address or token sent more requests than
    /// `limits.client_rate` or `limits.token_rate` allows.
    #[error("rate limit: at most {rate} requests per second from one {per}; retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// The configured rate.
        rate: u32,
        /// What is limited: `client address` or `token`.
        per: &'static str,
        /// When the next request will be allowed.
        retry_after: Duration,
    },
    /// The node serves [`MAX_WATCHES`] watches already.
    #[error("this node serves at most {MAX_WATCHES} watches")]
    TooManyWatches,
    /// A watch with `require_leader` on a node that knows no leader.
    #[error("this node has no leader (require_leader is set)")]
    WatchWithoutLeader,
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// An upload sent nothing for `idle`.
    #[error(
        "the upload sent nothing for {} s (models.upload_idle_timeout_secs); it was aborted and its partial file \
         deleted; send the file again",
        idle.as_secs_f64()
    )]
    UploadIdle {
        /// The idle timeout.
        idle: Duration,
    },
    /// `Add` of a version registered with other files.
    #[error("model {name} version {version} is already registered with other files; use a new version")]
    VersionConflict {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
    },
    /// The registry holds `limit` versions.
    #[error("the registry holds {limit} versions, its limit; remove one first")]
    RegistryFull {
        /// The registry's limit.
        limit: usize,
    },
    /// `Remove` of a version that is not registered.
    #[error("model {name} version {version} is not registered")]
    VersionNotRegistered {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
    },
    /// `Get` of an agent that does not exist.
    #[error("no agent is named {name:?}")]
    AgentNotFound {
        /// The name asked for.
        name: String,
    },
    /// The state machine refused an agent command; the reason says why.
    #[error("{0}")]
    AgentRefused(String),
    /// `Get` or `Wait` of a task that does not exist.
    #[error("no task has id {id}")]
    TaskNotFound {
        /// The id asked for.
        id: u64,
    },
    /// ACLs are on and the call carries no usable token; says why.
    #[error("{0}")]
    TokenRequired(String),
    /// The token is not known to the cluster.
    #[error("the token is not known to this cluster (deleted, mistyped, or from another cluster)")]
    TokenUnknown,
    /// The token's policies do not allow the call.
    #[error("permission denied: {method} needs {resource}:{access}{on}; this token's policies do not grant it")]
    PermissionDenied {
        /// The method called.
        method: String,
        /// The resource it needs.
        resource: &'static str,
        /// The access it needs.
        access: &'static str,
        /// ` on key "..."` or ` on prefix "..."`, or empty.
        on: String,
    },
    /// An ACL call on a node without `--acl`.
    #[error("ACLs are off on this node; start every node with --acl (acl.enabled) to use them")]
    AclDisabled,
    /// Bootstrap ran before.
    #[error("ACLs are bootstrapped already; the first management token was made once and cannot be made again")]
    AclAlreadyBootstrapped,
    /// A token named a policy that does not exist.
    #[error("no ACL policy is named {name:?}")]
    AclPolicyNotFound {
        /// The missing policy.
        name: String,
    },
    /// The cluster holds its maximum of policies or tokens.
    #[error("the cluster holds its maximum number of ACL {what}; delete some first")]
    AclFull {
        /// `policies` or `tokens`.
        what: String,
    },
    /// A call for another site cannot reach it.
    #[error("site {site:?} is unreachable from this node: {why}")]
    SiteUnreachable {
        /// The target site.
        site: String,
        /// Why.
        why: String,
    },
    /// A call for another site got no answer in time; it may or may not
    /// have been served there.
    #[error("site {site:?} did not answer before the call's deadline; the call may or may not have been served there")]
    SiteTimeout {
        /// The target site.
        site: String,
    },
    /// A streaming call for another site.
    #[error(
        "{method} streams, and only unary calls are forwarded to another site ({site:?}); call a node of that site"
    )]
    NotForwardable {
        /// The method.
        method: String,
        /// The target site.
        site: String,
    },
    /// The agent is being handed between sites: calls that change it wait
    /// until the handoff ends.
    #[error("{why}; try again once the move is done")]
    AgentMoving {
        /// The agent.
        agent: String,
        /// The other site of the handoff.
        site: String,
        /// The state machine's words.
        why: String,
    },
    /// A call followed agents' forwarding pointers through too many sites.
    #[error("the call was forwarded through {hops} sites following moved agents; the limit is {limit}")]
    TooManyHops {
        /// Sites so far.
        hops: u32,
        /// The limit.
        limit: u32,
    },
    /// The answer of the site that owns the agent a call was about, passed
    /// through unchanged.
    #[error("{}", .0.message())]
    Remote(Box<Status>),
    /// Something that cannot happen did.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// An [`ApiError::InvalidArgument`] for `field`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        self.describe().code
    }

    /// The stable reason this error is answered with.
    pub fn reason(&self) -> Reason {
        self.describe().reason
    }

    fn describe(&self) -> Described {
        match self {
            ApiError::Consensus(e) => consensus(e),
            ApiError::Model(e) => model(e),
            ApiError::UploadRefused(e) => match e {
                UploadRefused::Quota { quota, .. } => {
                    Described::new(Code::ResourceExhausted, Reason::UploadQuotaExceeded, e.to_string())
                        .with("quota_bytes", quota)
                }
                UploadRefused::Space { available, reserve, .. } => {
                    Described::new(Code::ResourceExhausted, Reason::InsufficientDiskSpace, e.to_string())
                        .with("available_bytes", available)
                        .with("reserve_bytes", reserve)
                }
            },
            ApiError::InvalidArgument { field, .. } => {
                Described::new(Code::InvalidArgument, Reason::InvalidArgumentField, self.to_string())
                    .with("field", field)
            }
            ApiError::TooManyRequests => {
                Described::new(Code::ResourceExhausted, Reason::TooManyRequests, self.to_string())
                    .with("limit", MAX_CONCURRENT_REQUESTS)
            }
            ApiError::RateLimited { rate, retry_after, .. } => {
                let mut d = Described::new(Code::ResourceExhausted, Reason::RateLimited, self.to_string())
                    .with("limit", rate)
                    .with("retry_after_ms", retry_after.as_millis());
                d.retry_after = Some(*retry_after);
                d
            }
            ApiError::TooManyWatches => {
                Described::new(Code::ResourceExhausted, Reason::TooManyWatches, self.to_string())
                    .with("limit", MAX_WATCHES)
            }
            ApiError::WatchWithoutLeader => Described::new(Code::Unavailable, Reason::NoLeader, self.to_string()),
            ApiError::ShuttingDown => Described::new(Code::Unavailable, Reason::ShuttingDown, self.to_string()),
            ApiError::UploadIdle { idle } => {
                Described::new(Code::DeadlineExceeded, Reason::UploadIdleTimeout, self.to_string())
                    .with("idle_timeout_secs", idle.as_secs_f64())
            }
            ApiError::VersionConflict { name, version } => {
                Described::new(Code::AlreadyExists, Reason::ModelVersionConflict, self.to_string())
                    .with("model", name)
                    .with("version", version)
            }
            ApiError::RegistryFull { limit } => {
                Described::new(Code::ResourceExhausted, Reason::RegistryFull, self.to_string()).with("limit", limit)
            }
            ApiError::VersionNotRegistered { name, version } => {
                Described::new(Code::NotFound, Reason::ModelVersionNotFound, self.to_string())
                    .with("model", name)
                    .with("version", version)
            }
            ApiError::AgentNotFound { name } => {
                Described::new(Code::NotFound, Reason::AgentNotFound, self.to_string()).with("agent", name)
            }
            ApiError::AgentRefused(m) => Described::new(Code::FailedPrecondition, Reason::AgentRefused, m.clone()),
            ApiError::TaskNotFound { id } => {
                Described::new(Code::NotFound, Reason::TaskNotFound, self.to_string()).with("task", id)
            }
            ApiError::TokenRequired(m) => Described::new(Code::Unauthenticated, Reason::TokenRequired, m.clone()),
            ApiError::TokenUnknown => Described::new(Code::Unauthenticated, Reason::TokenUnknown, self.to_string()),
            ApiError::PermissionDenied { resource, access, .. } => {
                Described::new(Code::PermissionDenied, Reason::PermissionDenied, self.to_string())
                    .with("resource", resource)
                    .with("access", access)
            }
            ApiError::AclDisabled => Described::new(Code::FailedPrecondition, Reason::AclDisabled, self.to_string()),
            ApiError::AclAlreadyBootstrapped => Described::new(
                Code::FailedPrecondition,
                Reason::AclAlreadyBootstrapped,
                self.to_string(),
            ),
            ApiError::AclPolicyNotFound { name } => {
                Described::new(Code::NotFound, Reason::AclPolicyNotFound, self.to_string()).with("policy", name)
            }
            ApiError::AclFull { .. } => Described::new(Code::ResourceExhausted, Reason::AclFull, self.to_string()),
            ApiError::SiteUnreachable { site, .. } => {
                Described::new(Code::Unavailable, Reason::SiteUnreachable, self.to_string()).with("site", site)
            }
            ApiError::SiteTimeout { site } => {
                Described::new(Code::DeadlineExceeded, Reason::SiteTimeout, self.to_string()).with("site", site)
            }
            ApiError::NotForwardable { method, .. } => {
                Described::new(Code::Unimplemented, Reason::NotForwardable, self.to_string()).with("method", method)
            }
            ApiError::AgentMoving { agent, site, .. } => {
                Described::new(Code::Unavailable, Reason::AgentMoving, self.to_string())
                    .with("agent", agent)
                    .with("site", site)
            }
            ApiError::TooManyHops { hops, .. } => {
                Described::new(Code::FailedPrecondition, Reason::TooManyHops, self.to_string()).with("hops", hops)
            }
            // Never answered as described: `From<ApiError> for Status`
            // passes the remote status through.
            ApiError::Remote(status) => Described::new(status.code(), Reason::Internal, status.message().to_string()),
            ApiError::Internal(m) => Described::new(Code::Internal, Reason::Internal, m.clone()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        if let ApiError::Remote(status) = e {
            return *status;
        }
        let d = e.describe();
        let mut metadata = MetadataMap::new();
        let mut info = d.info;
        if let Some(addr) = d.leader.as_deref().and_then(leader_hint) {
            metadata.insert(LEADER_METADATA, addr.1);
            info.insert("leader".to_string(), addr.0);
        }
        let mut details = ErrorDetails::with_error_info(d.reason.as_str(), DOMAIN, info);
        if d.retry_after.is_some() {
            details.set_retry_info(d.retry_after);
        }
        Status::with_error_details_and_metadata(d.code, d.message, details, metadata)
    }
}

/// The answer of another site to a forwarded call, as the target site's
/// node built it (code, message and details pass through unchanged).
pub fn remote_status(code: u32, message: String, details: bytes::Bytes) -> Status {
    let code = i32::try_from(code).map_or(Code::Unknown, Code::from_i32);
    Status::with_details(code, message, details)
}

/// The reason of a status from this API: the `reason` of its `ErrorInfo`
/// when its domain is [`DOMAIN`]. `None` for a status from elsewhere (the
/// transport, a proxy, an older node).
pub fn reason_of(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .filter(|i| i.domain == DOMAIN)
        .map(|i| i.reason)
}

/// The leader hint for `addr`, as text and as a metadata value, when it is
/// an address (`host:port`); `None` for anything else, such as a bare id.
fn leader_hint(addr: &str) -> Option<(String, MetadataValue<tonic::metadata::Ascii>)> {
    let (host, port) = addr.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().ok().filter(|p| *p != 0).is_none() {
        return None;
    }
    let value = addr.parse().ok()?;
    Some((addr.to_string(), value))
}

/// What one error is answered with.
struct Described {
    code: Code,
    reason: Reason,
    message: String,
    info: HashMap<String, String>,
    /// The leader's public address, when known.
    leader: Option<String>,
    /// When to retry (a `google.rpc.RetryInfo` detail).
    retry_after: Option<Duration>,
}

impl Described {
    fn new(code: Code, reason: Reason, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            info: HashMap::new(),
            leader: None,
            retry_after: None,
        }
    }

    fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.info.insert(key.to_string(), value.to_string());
        self
    }
}

fn consensus(e: &ConsensusError) -> Described {
    match e {
        ConsensusError::InvalidArgument { field, reason } => Described::new(
            Code::InvalidArgument,
            Reason::InvalidArgumentField,
            format!("{field} {reason}"),
        )
        .with("field", field),
        ConsensusError::Unavailable {
            cause,
            reason,
            leader_addr,
            ..
        } => {
            // The id alone is no use to a client: it needs an address.
            let mut d = Described::new(Code::Unavailable, unavailable_reason(*cause), reason.clone());
            d.leader = leader_addr.clone();
            d
        }
        ConsensusError::Indeterminate(m) => Described::new(
            Code::Unknown,
            Reason::OutcomeUnknown,
            format!("write outcome unknown: {m}"),
        ),
        ConsensusError::Compacted { requested, oldest } => {
            Described::new(Code::OutOfRange, Reason::Compacted, e.to_string())
                .with("requested_revision", requested)
                .with("oldest_revision", oldest)
        }
        ConsensusError::NotFound(m) => Described::new(Code::NotFound, Reason::NotAMember, m.clone()),
        ConsensusError::ShuttingDown => Described::new(Code::Unavailable, Reason::ShuttingDown, e.to_string()),
        ConsensusError::Internal(m) => Described::new(Code::Internal, Reason::Internal, m.clone()),
        ConsensusError::FailedPrecondition { cause, message } => {
            Described::new(Code::FailedPrecondition, precondition_reason(*cause), message.clone())
        }
    }
}

/// The reason for each cause of [`ConsensusError::Unavailable`].
fn unavailable_reason(cause: UnavailableCause) -> Reason {
    match cause {
        UnavailableCause::NotLeader => Reason::NotLeader,
        UnavailableCause::NoLeader => Reason::NoLeader,
        UnavailableCause::LeaderUnreachable => Reason::LeaderUnreachable,
        UnavailableCause::NoQuorum => Reason::NoQuorum,
        UnavailableCause::ReplicaBehind => Reason::ReplicaBehind,
        UnavailableCause::NodeUnreachable => Reason::NodeUnreachable,
        UnavailableCause::MembershipChangeRefused => Reason::MembershipChangeRefused,
    }
}

/// The reason for each cause of [`ConsensusError::FailedPrecondition`].
fn precondition_reason(cause: PreconditionCause) -> Reason {
    match cause {
        PreconditionCause::UnreachableLearner => Reason::UnreachableLearner,
        PreconditionCause::LearnerBehind => Reason::LearnerBehind,
        PreconditionCause::QuorumAtRisk => Reason::QuorumAtRisk,
        PreconditionCause::OtherCluster => Reason::OtherCluster,
        PreconditionCause::NewerMessageFormat => Reason::NewerMessageFormat,
    }
}

fn model(e: &ModelError) -> Described {
    let message = e.to_string();
    match e {
        ModelError::Invalid { field, .. } => {
            Described::new(Code::InvalidArgument, Reason::InvalidArgumentField, message).with("field", field)
        }
        ModelError::Ambiguous { .. } => {
            Described::new(Code::InvalidArgument, Reason::ModelAmbiguous, message).with("field", "model")
        }
        ModelError::UnknownModel { name } => {
            Described::new(Code::NotFound, Reason::ModelNotFound, message).with("model", name)
        }
        ModelError::UnknownVersion { name, version } => {
            Described::new(Code::NotFound, Reason::ModelVersionNotFound, message)
                .with("model", name)
                .with("version", version)
        }
        ModelError::NoModels => Described::new(Code::FailedPrecondition, Reason::NoModels, message),
        ModelError::NotUploaded { path, sha256 } => {
            Described::new(Code::FailedPrecondition, Reason::FileNotUploaded, message)
                .with("path", path)
                .with("sha256", sha256)
        }
        ModelError::NotReady { name, version, .. } => Described::new(Code::Unavailable, Reason::ModelNotReady, message)
            .with("model", name)
            .with("version", version),
        ModelError::Peer { .. } => Described::new(Code::Unavailable, Reason::PeerFetchFailed, message),
        ModelError::NoHolder { sha256 } => {
            Described::new(Code::Unavailable, Reason::NoHolder, message).with("sha256", sha256)
        }
        ModelError::Corrupt { sha256, .. } => {
            Described::new(Code::DataLoss, Reason::BlobCorrupt, message).with("sha256", sha256)
        }
        ModelError::Io(_) => Described::new(Code::Internal, Reason::Internal, message),
        ModelError::Inference(InferenceError::InvalidRequest { field, message }) => Described::new(
            Code::InvalidArgument,
            Reason::InvalidArgumentField,
            format!("{field} {message}"),
        )
        .with("field", field),
        ModelError::Inference(InferenceError::BatcherClosed) => {
            Described::new(Code::Unavailable, Reason::EngineStopped, message)
        }
        ModelError::Inference(_) => Described::new(Code::Internal, Reason::Internal, message),
        ModelError::Consensus(c) => consensus(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(s: &Status) -> tonic_types::ErrorInfo {
        s.get_details_error_info().expect("every status carries an ErrorInfo")
    }

    /// One of each variant, with the code and reason it must map to.
    fn consensus_cases() -> Vec<(ConsensusError, Code, Reason)> {
        vec![
            (
                ConsensusError::invalid("key", "must not be empty"),
                Code::InvalidArgument,
                Reason::InvalidArgumentField,
            ),
            (
                ConsensusError::not_leader(None, None),
                Code::Unavailable,
                Reason::NotLeader,
            ),
            (
                ConsensusError::unavailable(UnavailableCause::NoLeader, "no leader is elected"),
                Code::Unavailable,
                Reason::NoLeader,
            ),
            (
                ConsensusError::unavailable(UnavailableCause::NoLeader, "no leader elected yet"),
                Code::Unavailable,
                Reason::NoLeader,
            ),
            (
                ConsensusError::Unavailable {
                    cause: UnavailableCause::LeaderUnreachable,
                    reason: "leader 7 unreachable: connection refused".into(),
                    leader_id: Some(7),
                    leader_addr: Some("10.0.0.7:7100".into()),
                },
                Code::Unavailable,
                Reason::LeaderUnreachable,
            ),
            (
                ConsensusError::unavailable(
                    UnavailableCause::NoQuorum,
                    "leadership not confirmed by a quorum: 1 of 3",
                ),
                Code::Unavailable,
                Reason::NoQuorum,
            ),
            (
                ConsensusError::unavailable(
                    UnavailableCause::ReplicaBehind,
                    "replica did not catch up with the leader: timeout",
                ),
                Code::Unavailable,
                Reason::ReplicaBehind,
            ),
            (
                ConsensusError::unavailable(
                    UnavailableCause::NodeUnreachable,
                    "node 9 cannot be reached at its internal address 10.0.0.9:7200: connection refused",
                ),
                Code::Unavailable,
                Reason::NodeUnreachable,
            ),
            (
                ConsensusError::unavailable(
                    UnavailableCause::MembershipChangeRefused,
                    "membership change refused: in progress",
                ),
                Code::Unavailable,
                Reason::MembershipChangeRefused,
            ),
            (
                ConsensusError::Indeterminate("lost the leader".into()),
                Code::Unknown,
                Reason::OutcomeUnknown,
            ),
            (
                ConsensusError::Compacted {
                    requested: 3,
                    oldest: 10,
                },
                Code::OutOfRange,
                Reason::Compacted,
            ),
            (
                ConsensusError::NotFound("node 5 is not a member".into()),
                Code::NotFound,
                Reason::NotAMember,
            ),
            (ConsensusError::ShuttingDown, Code::Unavailable, Reason::ShuttingDown),
            (
                ConsensusError::Internal("disk on fire".into()),
                Code::Internal,
                Reason::Internal,
            ),
            (
                ConsensusError::refused(
                    PreconditionCause::UnreachableLearner,
                    "learner 4 is not ready to vote: it does not answer and has 0 of 12 log entries; it stays a \
                     learner, join again once it is up",
                ),
                Code::FailedPrecondition,
                Reason::UnreachableLearner,
            ),
            (
                ConsensusError::refused(
                    PreconditionCause::LearnerBehind,
                    "learner 4 is not ready to vote: it is reachable and has 2 of 90000 log entries; it stays a \
                     learner, join again once it is up",
                ),
                Code::FailedPrecondition,
                Reason::LearnerBehind,
            ),
            (
                ConsensusError::refused(
                    PreconditionCause::QuorumAtRisk,
                    "removing node 2 would leave 1 reachable voters of 2, fewer than the quorum of 2 the change \
                     needs to commit; bring the unreachable voters back first",
                ),
                Code::FailedPrecondition,
                Reason::QuorumAtRisk,
            ),
            (
                ConsensusError::refused(
                    PreconditionCause::OtherCluster,
                    "node 4 belongs to another cluster (00000000000000ab); start it with an empty data dir to join \
                     this one",
                ),
                Code::FailedPrecondition,
                Reason::OtherCluster,
            ),
        ]
    }

    #[test]
    fn every_consensus_error_has_a_code_and_a_reason() {
        for (e, code, reason) in consensus_cases() {
            let what = format!("{e:?}");
            // Directly and wrapped in a model error: the same answer.
            for api in [ApiError::from(e.clone()), ApiError::from(ModelError::from(e.clone()))] {
                assert_eq!((api.code(), api.reason()), (code, reason), "{what}");
                let s = Status::from(api);
                assert_eq!(s.code(), code, "{what}");
                let i = info(&s);
                assert_eq!(i.reason, reason.as_str(), "{what}");
                assert_eq!(i.domain, DOMAIN, "{what}");
                assert_eq!(reason_of(&s).as_deref(), Some(reason.as_str()), "{what}");
            }
        }
        // Every variant has a case above; a new variant breaks the build
        // here until it gets one.
        let covered: std::collections::HashSet<&str> = consensus_cases()
            .iter()
            .map(|(e, _, _)| match e {
                ConsensusError::InvalidArgument { .. } => "InvalidArgument",
                ConsensusError::Unavailable { .. } => "Unavailable",
                ConsensusError::Indeterminate(_) => "Indeterminate",
                ConsensusError::Compacted { .. } => "Compacted",
                ConsensusError::NotFound(_) => "NotFound",
                ConsensusError::ShuttingDown => "ShuttingDown",
                ConsensusError::Internal(_) => "Internal",
                ConsensusError::FailedPrecondition { .. } => "FailedPrecondition",
            })
            .collect();
        assert_eq!(covered.len(), 8, "{covered:?}");
    }

    #[test]
    fn messages_and_metadata_name_what_a_client_needs() {
        let s = Status::from(ApiError::from(ConsensusError::invalid("key", "must not be empty")));
        assert_eq!(s.message(), "key must not be empty");
        assert_eq!(info(&s).metadata.get("field").map(String::as_str), Some("key"));

        let s = Status::from(ApiError::from(ConsensusError::Compacted {
            requested: 3,
            oldest: 10,
        }));
        let i = info(&s);
        assert_eq!(i.metadata.get("requested_revision").map(String::as_str), Some("3"));
        assert_eq!(i.metadata.get("oldest_revision").map(String::as_str), Some("10"));

        let s = Status::from(ApiError::from(ConsensusError::NotFound(
            "node 5 is not a member".into(),
        )));
        assert_eq!(s.message(), "node 5 is not a member");

        let s = Status::from(ApiError::invalid("limit", "is 20000; the maximum is 10000"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "limit is 20000; the maximum is 10000");
        assert_eq!(info(&s).metadata.get("field").map(String::as_str), Some("limit"));

        let s = Status::from(ApiError::from(ModelError::Inference(InferenceError::InvalidRequest {
            field: "texts[1]".into(),
            message: "is too long".into(),
        })));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "texts[1] is too long");
        assert_eq!(info(&s).metadata.get("field").map(String::as_str), Some("texts[1]"));
    }

    #[test]
    fn the_leader_hint_is_an_address_or_nothing() {
        let unavailable = |leader_id, leader_addr: Option<&str>| {
            Status::from(ApiError::from(ConsensusError::Unavailable {
                cause: UnavailableCause::NotLeader,
                reason: "this node is not the leader".into(),
                leader_id,
                leader_addr: leader_addr.map(str::to_string),
            }))
        };
        let s = unavailable(Some(7), Some("10.0.0.7:7100"));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()),
            Some("10.0.0.7:7100")
        );
        assert_eq!(
            info(&s).metadata.get("leader").map(String::as_str),
            Some("10.0.0.7:7100")
        );
        assert_eq!(info(&s).reason, "NOT_LEADER");

        // Only the id known: no hint at all, never the bare id.
        for (id, addr) in [
            (Some(7), None),
            (None, None),
            (Some(7), Some("")),
            (Some(7), Some("7")),
            (Some(7), Some("host:")),
            (Some(7), Some(":7100")),
            (Some(7), Some("host:notaport")),
        ] {
            let s = unavailable(id, addr);
            assert!(s.metadata().get(LEADER_METADATA).is_none(), "{id:?} {addr:?}");
            assert!(!info(&s).metadata.contains_key("leader"), "{id:?} {addr:?}");
        }
        assert!(
            unavailable(None, Some("[::1]:7100"))
                .metadata()
                .get(LEADER_METADATA)
                .is_some()
        );

        // No other error carries a hint.
        let s = Status::from(ApiError::from(ConsensusError::ShuttingDown));
        assert!(s.metadata().get(LEADER_METADATA).is_none());
    }

    #[test]
    fn api_errors_have_their_own_reasons() {
        let cases: Vec<(ApiError, Code, Reason)> = vec![
            (
                ApiError::TooManyRequests,
                Code::ResourceExhausted,
                Reason::TooManyRequests,
            ),
            (
                ApiError::RateLimited {
                    rate: 10,
                    per: "client address",
                    retry_after: Duration::from_millis(100),
                },
                Code::ResourceExhausted,
                Reason::RateLimited,
            ),
            (
                ApiError::TooManyWatches,
                Code::ResourceExhausted,
                Reason::TooManyWatches,
            ),
            (ApiError::WatchWithoutLeader, Code::Unavailable, Reason::NoLeader),
            (ApiError::ShuttingDown, Code::Unavailable, Reason::ShuttingDown),
            (
                ApiError::UploadIdle {
                    idle: Duration::from_secs(60),
                },
                Code::DeadlineExceeded,
                Reason::UploadIdleTimeout,
            ),
            (
                ApiError::VersionConflict {
                    name: "m".into(),
                    version: 1,
                },
                Code::AlreadyExists,
                Reason::ModelVersionConflict,
            ),
            (
                ApiError::RegistryFull { limit: 256 },
                Code::ResourceExhausted,
                Reason::RegistryFull,
            ),
            (
                ApiError::VersionNotRegistered {
                    name: "m".into(),
                    version: 1,
                },
                Code::NotFound,
                Reason::ModelVersionNotFound,
            ),
            (ApiError::Internal("x".into()), Code::Internal, Reason::Internal),
            (
                ApiError::from(UploadRefused::Quota {
                    used: 1,
                    size: 2,
                    quota: 2,
                }),
                Code::ResourceExhausted,
                Reason::UploadQuotaExceeded,
            ),
            (
                ApiError::from(UploadRefused::Space {
                    size: 1,
                    available: 1,
                    reserve: 1,
                }),
                Code::ResourceExhausted,
                Reason::InsufficientDiskSpace,
            ),
            (
                ApiError::from(ModelError::NoModels),
                Code::FailedPrecondition,
                Reason::NoModels,
            ),
            (
                ApiError::from(ModelError::Ambiguous { names: "a, b".into() }),
                Code::InvalidArgument,
                Reason::ModelAmbiguous,
            ),
            (
                ApiError::from(ModelError::UnknownModel { name: "m".into() }),
                Code::NotFound,
                Reason::ModelNotFound,
            ),
            (
                ApiError::from(ModelError::UnknownVersion {
                    name: "m".into(),
                    version: 2,
                }),
                Code::NotFound,
                Reason::ModelVersionNotFound,
            ),
            (
                ApiError::from(ModelError::NotReady {
                    name: "m".into(),
                    version: 2,
                    detail: "fetching".into(),
                }),
                Code::Unavailable,
                Reason::ModelNotReady,
            ),
            (
                ApiError::from(ModelError::NotUploaded {
                    path: "a".into(),
                    sha256: "0".repeat(64),
                }),
                Code::FailedPrecondition,
                Reason::FileNotUploaded,
            ),
            (
                ApiError::from(ModelError::Corrupt {
                    sha256: "0".repeat(64),
                    detail: "short".into(),
                }),
                Code::DataLoss,
                Reason::BlobCorrupt,
            ),
            (
                ApiError::from(ModelError::Peer {
                    addr: "a:1".into(),
                    detail: "gone".into(),
                }),
                Code::Unavailable,
                Reason::PeerFetchFailed,
            ),
            (
                ApiError::from(ModelError::NoHolder { sha256: "0".repeat(64) }),
                Code::Unavailable,
                Reason::NoHolder,
            ),
            (
                ApiError::from(ModelError::Io("disk".into())),
                Code::Internal,
                Reason::Internal,
            ),
            (
                ApiError::from(ModelError::Inference(InferenceError::BatcherClosed)),
                Code::Unavailable,
                Reason::EngineStopped,
            ),
            (
                ApiError::from(ModelError::Inference(InferenceError::Backend("x".into()))),
                Code::Internal,
                Reason::Internal,
            ),
            (
                ApiError::TokenRequired("no token".into()),
                Code::Unauthenticated,
                Reason::TokenRequired,
            ),
            (ApiError::TokenUnknown, Code::Unauthenticated, Reason::TokenUnknown),
            (
                ApiError::PermissionDenied {
                    method: "/cell0.v1.Kv/Put".into(),
                    resource: "kv",
                    access: "write",
                    on: String::new(),
                },
                Code::PermissionDenied,
                Reason::PermissionDenied,
            ),
            (
                ApiError::SiteUnreachable {
                    site: "b".into(),
                    why: "no link".into(),
                },
                Code::Unavailable,
                Reason::SiteUnreachable,
            ),
            (
                ApiError::SiteTimeout { site: "b".into() },
                Code::DeadlineExceeded,
                Reason::SiteTimeout,
            ),
            (
                ApiError::NotForwardable {
                    method: "/cell0.v1.Kv/Watch".into(),
                    site: "b".into(),
                },
                Code::Unimplemented,
                Reason::NotForwardable,
            ),
            (ApiError::AclDisabled, Code::FailedPrecondition, Reason::AclDisabled),
            (
                ApiError::AclAlreadyBootstrapped,
                Code::FailedPrecondition,
                Reason::AclAlreadyBootstrapped,
            ),
            (
                ApiError::AclPolicyNotFound { name: "p".into() },
                Code::NotFound,
                Reason::AclPolicyNotFound,
            ),
            (
                ApiError::AclFull { what: "tokens".into() },
                Code::ResourceExhausted,
                Reason::AclFull,
            ),
        ];
        for (e, code, reason) in cases {
            let what = format!("{e:?}");
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{what}");
            assert_eq!(info(&s).reason, reason.as_str(), "{what}");
        }
    }

    #[test]
    fn reasons_are_upper_snake_case_unique_and_documented() {
        let docs = include_str!("../../../docs/api.md");
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            let s = r.as_str();
            assert!(
                !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{s}"
            );
            assert!(seen.insert(s), "{s} twice");
            assert!(
                docs.contains(&format!("| `{s}` |")),
                "{s} is not in the table of docs/api.md"
            );
        }
    }

    #[test]
    fn a_status_from_elsewhere_has_no_reason() {
        assert_eq!(reason_of(&Status::unavailable("proxy")), None);
    }
}
