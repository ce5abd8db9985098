//! Replicated commands, their responses, and the limits they must respect.
//!
//! A [`Command`] is what a Raft entry carries. Its serde encoding is the log
//! format, so variants are append-only: never reorder, remove or change the
//! fields of an existing variant; add a new one instead (the variant index is
//! the version tag, like a protobuf field number).

use serde::{Deserialize, Serialize};

use crate::acl::{AclCommand, AclOutcome};
use crate::agents::{AgentCommand, AgentOutcome};
use crate::error::StateError;
use crate::handoff::{HandoffCommand, HandoffOutcome};
use crate::nodes::NodeCommand;
use crate::registry::{ModelCommand, ModelOutcome};
use crate::tasks::{TaskCommand, TaskOutcome};

/// Largest key, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// A change to the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets `key` to `value`; the answer carries the previous pair.
    Put {
        /// Key, 1..=[`MAX_KEY_BYTES`] bytes.
        #[serde(with = "crate::codec::bytes")]
        key: Vec<u8>,
        /// Value, at most [`MAX_VALUE_BYTES`] bytes.
        #[serde(with = "crate::codec::bytes")]
        value: Vec<u8>,
    },
    /// Removes `key`.
    Delete {
        /// Key, 1..=[`MAX_KEY_BYTES`] bytes.
        #[serde(with = "crate::codec::bytes")]
        key: Vec<u8>,
    },
    /// Sets `key` to `value` if its mod revision is `expected_revision`
    /// (0: the key must be absent).
    Cas {
        /// Key, 1..=[`MAX_KEY_BYTES`] bytes.
        #[serde(with = "crate::codec::bytes")]
        key: Vec<u8>,
        /// Required mod revision; 0 means absent.
        expected_revision: u64,
        /// New value, at most [`MAX_VALUE_BYTES`] bytes.
        #[serde(with = "crate::codec::bytes")]
        value: Vec<u8>,
    },
    /// Commands applied in order in one atomic step, each with its own
    /// response. The leader also uses it to group concurrent client writes
    /// into one log entry.
    Batch(Vec<Command>),
    /// A change to the model registry.
    Model(ModelCommand),
    /// A change to node records.
    Node(NodeCommand),
    /// A client command with a request id: the state machine applies it once
    /// and answers a retry of the same id with the first answer, as long as
    /// the id is within the deduplication window (Raft's client sessions,
    /// Ongaro's thesis section 6.3).
    Request {
        /// Who sent it and its sequence number.
        id: RequestId,
        /// The command itself; never another `Request`.
        cmd: Box<Command>,
    },
    /// Records the cluster's id once, when the cluster is formed; a later one
    /// is ignored. Every internal message carries it.
    InitCluster {
        /// A random non-zero id.
        cluster_id: u64,
    },
    /// A change to agents, their allocations or node scheduling status.
    Agent(AgentCommand),
    /// A change to agents' tasks or memory.
    Task(TaskCommand),
    /// A change to ACL policies or tokens.
    Acl(AclCommand),
    /// A step of an agent's handoff to or from another site.
    Handoff(HandoffCommand),
    /// [`Command::Request`] with the cheaper bookkeeping: the first one in
    /// the log switches the request window to generations
    /// ([`crate::requests`]) and the watch history to chunks
    /// ([`crate::kv`]), for both variants from then on. Same meaning
    /// otherwise; the node proposes this one.
    RequestV2 {
        /// Who sent it and its sequence number.
        id: RequestId,
        /// The command itself; never another request.
        cmd: Box<Command>,
    },
    /// [`Command::Put`] answered without the previous pair (etcd's put
    /// without `prev_kv`): the request window then keeps only the written
    /// pair's revisions. The node proposes this one unless the client asks
    /// for the previous pair.
    PutWithoutPrev {
        /// Key, 1..=[`MAX_KEY_BYTES`] bytes.
        #[serde(with = "crate::codec::bytes")]
        key: Vec<u8>,
        /// Value, at most [`MAX_VALUE_BYTES`] bytes.
        #[serde(with = "crate::codec::bytes")]
        value: Vec<u8>,
    },
    /// [`Command::RequestV2`] whose first one in the log also switches the
    /// watch history to groups ([`crate::kv`]: each apply step's events in
    /// one row, without the values their pairs still hold), for every
    /// command from then on. Same meaning otherwise; the node proposes this
    /// one once every member reads it.
    RequestV3 {
        /// Who sent it and its sequence number.
        id: RequestId,
        /// The command itself; never another request.
        cmd: Box<Command>,
    },
}

/// Identifies one client request across retries: the sending process (a
/// random id chosen at start) and a sequence number it never reuses. A
/// retry resends the very command the id was first sent with (the window
/// of [`crate::requests`] keeps a written pair's key and value only in that
/// command).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The sending process.
    pub client: u64,
    /// Increasing per client.
    pub seq: u64,
}

/// A key with its value and revisions, as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    #[serde(with = "crate::codec::bytes")]
    pub key: Vec<u8>,
    /// The value.
    #[serde(with = "crate::codec::bytes")]
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: u64,
    /// Revision of the last write to the key.
    pub mod_revision: u64,
    /// Writes since creation (1 after the first).
    pub version: u64,
}

/// The outcome of applying a [`Command`]. `revision` is the store's revision
/// right after the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The answer to a blank or membership entry.
    Empty,
    /// A put happened.
    Put {
        /// The written pair's revisions. Its key and value are the
        /// command's and are left out (empty), on every replica and for
        /// retries: the caller has them ([`Response::put_back_written_pairs`]
        /// puts them back).
        kv: KeyValue,
        /// The previous pair, if any.
        prev: Option<KeyValue>,
    },
    /// A delete was applied (a no-op when the key was absent).
    Delete {
        /// Store revision after the delete.
        revision: u64,
        /// The removed pair, if any.
        prev: Option<KeyValue>,
    },
    /// A compare-and-swap was evaluated.
    Cas {
        /// Store revision after the command.
        revision: u64,
        /// Whether the value was written.
        succeeded: bool,
        /// The new pair on success, the current one (if any) on failure.
        kv: Option<KeyValue>,
    },
    /// Responses of a [`Command::Batch`], in order.
    Batch(Vec<Response>),
    /// What a [`Command::Model`] did.
    Model(ModelOutcome),
    /// Whether a [`Command::Node`] record was stored (false: the table is full).
    Node {
        /// Stored.
        stored: bool,
    },
    /// The state machine refused the command (it violates a limit). Every
    /// replica refuses it identically.
    Rejected(String),
    /// The cluster's id after a [`Command::InitCluster`].
    ClusterId(u64),
    /// What a [`Command::Agent`] did.
    Agent(AgentOutcome),
    /// What a [`Command::Task`] did.
    Task(TaskOutcome),
    /// What a [`Command::Acl`] did.
    Acl(AclOutcome),
    /// What a [`Command::Handoff`] did.
    Handoff(HandoffOutcome),
}

impl Response {
    /// Puts back the key and value of each pair `cmd` wrote, which answers
    /// leave out ([`Response::Put`]), for nodes of older builds that show
    /// them.
    pub fn put_back_written_pairs(&mut self, cmd: &Command) {
        crate::requests::restore_written_pairs(cmd, self);
    }
}

/// Limits a command must respect, checked before proposing and again,
/// deterministically, when applying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most commands in one client batch.
    pub max_batch_commands: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_commands: 1024,
        }
    }
}

/// Checks a key's size; the error names `field`.
pub fn check_key(field: &str, key: &[u8]) -> Result<(), StateError> {
    if key.is_empty() {
        return Err(StateError::invalid(field, "must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StateError::invalid(
            field,
            format!("is {} bytes; the limit is {MAX_KEY_BYTES}", key.len()),
        ));
    }
    Ok(())
}

fn prefix_field(prefix: &str, e: StateError) -> StateError {
    match e {
        StateError::InvalidArgument { field, reason } => StateError::invalid(&format!("{prefix}{field}"), reason),
        other => other,
    }
}

fn check_value(field: &str, value: &[u8]) -> Result<(), StateError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(StateError::invalid(
            field,
            format!("is {} bytes; the limit is {MAX_VALUE_BYTES}", value.len()),
        ));
    }
    Ok(())
}

impl Command {
    /// Checks structure (see [`Command::check_structure`]), sizes and
    /// counts; the error names the offending field.
    pub fn validate(&self, limits: &Limits) -> Result<(), StateError> {
        self.check_structure()?;
        self.validate_sizes(limits)
    }

    /// Checks sizes and counts. A nested command's error is prefixed with
    /// where it sits only once there is one: a valid command formats no
    /// field name.
    fn validate_sizes(&self, limits: &Limits) -> Result<(), StateError> {
        match self {
            Command::Put { key, value } | Command::PutWithoutPrev { key, value } | Command::Cas { key, value, .. } => {
                check_key("key", key)?;
                check_value("value", value)
            }
            Command::Delete { key } => check_key("key", key),
            Command::Batch(cmds) => {
                if cmds.len() > limits.max_batch_commands {
                    return Err(StateError::invalid(
                        "batch",
                        format!(
                            "has {} commands; the limit is {}",
                            cmds.len(),
                            limits.max_batch_commands
                        ),
                    ));
                }
                for (i, c) in cmds.iter().enumerate() {
                    c.validate_sizes(limits)
                        .map_err(|e| prefix_field(&format!("batch[{i}]."), e))?;
                }
                Ok(())
            }
            Command::Model(m) => m.validate(),
            Command::Node(n) => n.validate(),
            Command::Agent(a) => a.validate(),
            Command::Task(t) => t.validate(),
            Command::Acl(a) => a.validate(),
            Command::Handoff(h) => h.validate(),
            Command::Request { cmd, .. } | Command::RequestV2 { cmd, .. } | Command::RequestV3 { cmd, .. } => {
                cmd.validate_sizes(limits)
            }
            Command::InitCluster { cluster_id } => {
                if *cluster_id == 0 {
                    return Err(StateError::invalid("cluster_id", "must not be 0"));
                }
                Ok(())
            }
        }
    }

    /// Checks only what apply needs for safety, with rules fixed for every
    /// version of the log format: a batch nests at most twice (the leader
    /// groups client batches; deeper nesting is never produced, and refusing
    /// it bounds apply's recursion), and a request id never wraps another
    /// request at any depth (each id is answered once per apply). Size limits
    /// are checked before proposing, not in apply, so changing one in a
    /// rolling upgrade cannot make replicas disagree.
    pub fn check_structure(&self) -> Result<(), StateError> {
        self.check_structure_at(&Place::Top, 0, false)
    }

    fn check_structure_at(&self, at: &Place<'_>, depth: usize, in_request: bool) -> Result<(), StateError> {
        match self {
            Command::Batch(cmds) => {
                if depth >= 2 {
                    return Err(StateError::invalid(
                        &format!("{}batch", at.path()),
                        "is nested too deeply",
                    ));
                }
                cmds.iter()
                    .enumerate()
                    .try_for_each(|(i, c)| c.check_structure_at(&Place::InBatch(at, i), depth + 1, in_request))
            }
            Command::Request { cmd, .. } | Command::RequestV2 { cmd, .. } | Command::RequestV3 { cmd, .. } => {
                if in_request {
                    return Err(StateError::invalid(
                        &format!("{}request", at.path()),
                        "is inside another request",
                    ));
                }
                cmd.check_structure_at(at, depth, true)
            }
            _ => Ok(()),
        }
    }

    /// Whether this is, or a batch holds, a [`Command::RequestV2`], which
    /// nodes of older builds cannot apply.
    pub fn carries_request_v2(&self) -> bool {
        match self {
            Command::RequestV2 { .. } => true,
            Command::Batch(cmds) => cmds.iter().any(Command::carries_request_v2),
            _ => false,
        }
    }

    /// Whether this is, or a batch holds, a [`Command::RequestV3`], which
    /// nodes of older builds cannot apply.
    pub fn carries_request_v3(&self) -> bool {
        match self {
            Command::RequestV3 { .. } => true,
            Command::Batch(cmds) => cmds.iter().any(Command::carries_request_v3),
            _ => false,
        }
    }

    /// Whether this is, or a batch or request holds, a
    /// [`Command::PutWithoutPrev`], which nodes of older builds cannot apply.
    pub fn carries_put_without_prev(&self) -> bool {
        match self {
            Command::PutWithoutPrev { .. } => true,
            Command::Batch(cmds) => cmds.iter().any(Command::carries_put_without_prev),
            Command::Request { cmd, .. } | Command::RequestV2 { cmd, .. } | Command::RequestV3 { cmd, .. } => {
                cmd.carries_put_without_prev()
            }
            _ => false,
        }
    }

    /// Every [`Command::PutWithoutPrev`] as the [`Command::Put`] that nodes
    /// of older builds apply, in batches and requests too: the same write,
    /// answered with the previous pair, which the caller leaves out.
    pub fn with_prev_puts(self) -> Command {
        match self {
            Command::PutWithoutPrev { key, value } => Command::Put { key, value },
            Command::Batch(cmds) => Command::Batch(cmds.into_iter().map(Command::with_prev_puts).collect()),
            Command::Request { id, cmd } => Command::Request {
                id,
                cmd: Box::new(cmd.with_prev_puts()),
            },
            Command::RequestV2 { id, cmd } => Command::RequestV2 {
                id,
                cmd: Box::new(cmd.with_prev_puts()),
            },
            Command::RequestV3 { id, cmd } => Command::RequestV3 {
                id,
                cmd: Box::new(cmd.with_prev_puts()),
            },
            other => other,
        }
    }

    /// Every request, in batches too, as a [`Command::RequestV2`]; any
    /// other command as it is.
    pub fn into_request_v2(self) -> Command {
        self.map_requests(|id, cmd| Command::RequestV2 { id, cmd })
    }

    /// Every request, in batches too, as a [`Command::RequestV3`]; any
    /// other command as it is.
    pub fn into_request_v3(self) -> Command {
        self.map_requests(|id, cmd| Command::RequestV3 { id, cmd })
    }

    fn map_requests(self, to: fn(RequestId, Box<Command>) -> Command) -> Command {
        match self {
            Command::Request { id, cmd } | Command::RequestV2 { id, cmd } | Command::RequestV3 { id, cmd } => {
                to(id, cmd)
            }
            Command::Batch(cmds) => Command::Batch(cmds.into_iter().map(|c| c.map_requests(to)).collect()),
            other => other,
        }
    }

    /// Approximate encoded size, for batching decisions.
    pub fn approx_size(&self) -> usize {
        match self {
            Command::Put { key, value } | Command::PutWithoutPrev { key, value } | Command::Cas { key, value, .. } => {
                key.len() + value.len() + 16
            }
            Command::Delete { key } => key.len() + 8,
            Command::Batch(cmds) => cmds.iter().map(Command::approx_size).sum::<usize>() + 8,
            Command::Model(m) => m.approx_size(),
            Command::Node(_) => 128,
            Command::Request { cmd, .. } | Command::RequestV2 { cmd, .. } | Command::RequestV3 { cmd, .. } => {
                cmd.approx_size() + 16
            }
            Command::InitCluster { .. } => 16,
            Command::Agent(a) => a.approx_size(),
            Command::Task(t) => t.approx_size(),
            Command::Acl(a) => a.approx_size(),
            Command::Handoff(h) => h.approx_size(),
        }
    }
}

/// Where a command sits inside the one [`Command::check_structure`] checks;
/// spelled out as a field path (`batch[3].batch[0].`) only for a refusal, so
/// checking a well-formed entry of many commands allocates nothing.
enum Place<'a> {
    /// The command itself.
    Top,
    /// Element `usize` of a batch at the given place.
    InBatch(&'a Place<'a>, usize),
}

impl Place<'_> {
    fn path(&self) -> String {
        match self {
            Place::Top => String::new(),
            Place::InBatch(parent, i) => format!("{}batch[{i}].", parent.path()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let limits = Limits::default();
        let err = Command::Put {
            key: vec![b'k'; MAX_KEY_BYTES + 1],
            value: vec![],
        }
        .validate(&limits)
        .unwrap_err();
        assert!(err.to_string().contains("key"), "{err}");
        let err = Command::Batch(vec![
            Command::Delete { key: b"a".to_vec() },
            Command::Put {
                key: b"b".to_vec(),
                value: vec![0; MAX_VALUE_BYTES + 1],
            },
        ])
        .validate(&limits)
        .unwrap_err();
        assert!(err.to_string().contains("batch[1].value"), "{err}");
        let err = Command::Delete { key: vec![] }.validate(&limits).unwrap_err();
        assert!(err.to_string().contains("key must not be empty"), "{err}");
        let many = Command::Batch(vec![Command::Delete { key: b"a".to_vec() }; 1025]);
        assert!(
            many.validate(&limits)
                .unwrap_err()
                .to_string()
                .contains("limit is 1024")
        );
        let nested = Command::Batch(vec![Command::Batch(vec![Command::Batch(vec![])])]);
        assert!(nested.validate(&limits).is_err());
        Command::Put {
            key: vec![1; MAX_KEY_BYTES],
            value: vec![0; MAX_VALUE_BYTES],
        }
        .validate(&limits)
        .unwrap();
    }
}
