//! cell0-state: Cell0's replicated state machine, with no I/O.
//!
//! Everything every replica must compute identically lives here, and nothing
//! else: no openraft, no tokio, no sockets, no clock, no randomness, no
//! unordered iteration. `cell0-consensus` adapts it to openraft and storage;
//! tests and the simulator drive it directly over [`MemTxn`].
//!
//! - [`command`]: the commands carried in log entries, their responses and
//!   the limits checked before proposing.
//! - [`kv`]: the key-value table with etcd-style revisions and its change
//!   history; [`requests`]: the request window (exactly-once writes).
//! - [`registry`]: the model registry; [`nodes`]: node records.
//! - [`agents`]: agents, their allocations (incarnations that fence older
//!   ones) and node scheduling status.
//! - [`tasks`]: agents' tasks (results committed exactly once) and their
//!   memory.
//! - [`handoff`]: agents handed off to or from another site (a two-phase
//!   protocol whose steps are commands here).
//! - [`acl`]: ACL policies and tokens (salted hashes only) and the
//!   authorizer that judges a request against them.
//! - [`txn`]: the storage interface (named tables over one transaction).
//!
//! [`apply`] is the one entry point: it applies a command through a [`Txn`]
//! and reports the response, the key-value events and which [`Table`]s
//! changed, so subscribers can wait for "this table changed" without polling.

pub mod acl;
pub mod agents;
pub mod codec;
pub mod command;
pub mod error;
pub mod handoff;
pub mod kv;
pub mod nodes;
pub mod registry;
pub mod requests;
pub mod tasks;
pub mod txn;

use std::collections::BTreeSet;

pub use command::{Command, KeyValue, Limits, RequestId, Response};
pub use error::{ApplyError, Result, StateError};
pub use kv::{EventKind, StateEvent};
pub use requests::RequestIndex;
pub use txn::{MemTxn, Txn, prefix_end};

/// A node's identity: a random u64 chosen at its first start.
pub type NodeId = u64;

/// The replicated tables a subscriber can wait on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// User keys and values.
    Kv,
    /// The model registry.
    Models,
    /// Node records.
    Nodes,
    /// The cluster's own records (its id).
    Cluster,
    /// Agents, their allocations and node scheduling status.
    Agents,
    /// Agents' tasks and memory.
    Tasks,
    /// ACL policies and tokens.
    Acl,
}

impl Table {
    /// Every table, in a fixed order.
    pub const ALL: [Table; 7] = [
        Table::Kv,
        Table::Models,
        Table::Nodes,
        Table::Cluster,
        Table::Agents,
        Table::Tasks,
        Table::Acl,
    ];
}

/// What applying one command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The command's response (a deterministic refusal is
    /// [`Response::Rejected`]).
    pub response: Response,
    /// Key-value changes, in revision order.
    pub events: Vec<StateEvent>,
    /// The tables the command changed.
    pub changed: BTreeSet<Table>,
}

/// Applies `cmd` through `txn` without what an index of kept requests
/// learns over many applies: [`apply_indexed`] with an empty one, which
/// looks up every request id that is not newer than its client's newest
/// kept answer.
pub fn apply(txn: &mut dyn Txn, cmd: &Command) -> Result<Applied, ApplyError> {
    apply_indexed(txn, cmd, &mut RequestIndex::default())
}

/// Applies `cmd` through `txn`, `index` being the replica's index of kept
/// requests ([`RequestIndex`]: it changes what apply reads, never what it
/// writes or answers). Apply checks the command's structure only (rules
/// that never change); size limits are checked before proposing, so a
/// rolling upgrade that changes one cannot make replicas disagree.
pub fn apply_indexed(txn: &mut dyn Txn, cmd: &Command, index: &mut RequestIndex) -> Result<Applied, ApplyError> {
    if let Err(e) = cmd.check_structure() {
        return Ok(Applied {
            response: Response::Rejected(e.to_string()),
            events: Vec::new(),
            changed: BTreeSet::new(),
        });
    }
    let mut events = Vec::new();
    let mut changed = BTreeSet::new();
    let mut rev = kv::revision(txn)?;
    // Taken for the step and given back once it succeeded: a step that
    // fails leaves the index empty, which rules nothing out.
    let mut books = kv::Books::new(std::mem::take(index));
    let response = kv::apply_command(txn, cmd, &mut rev, &mut books, &mut events, &mut changed)?;
    let kept = books.store(txn, &events)?;
    kv::put_meta_u64(txn, kv::REVISION_KEY, rev)?;
    *index = kept;
    Ok(Applied {
        response,
        events,
        changed,
    })
}
