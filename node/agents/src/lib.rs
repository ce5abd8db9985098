//! cell0-agents: the agent runtime of one node. It starts and stops agents
//! and runs their tasks through drivers, in a sandbox, and knows nothing of
//! Raft: the node decides what runs (from its replicated allocations) and
//! commits what comes out (results, memory changes, status reports).
//!
//! - [`sandbox`]: how every agent process starts: a cleared environment,
//!   its own working directory, an unprivileged user when the node runs as
//!   root, rlimits, its own process group (killed as a whole), a
//!   parent-death signal and, where the machine has cgroup v1 memory, a
//!   memory cgroup.
//! - [`exec`]: one command per task, input on stdin, output from stdout.
//! - [`process`]: a supervised long-running process with a restart policy.
//! - [`inference`]: tasks answered with embeddings and the agent's memory
//!   (`embed`, `remember`, `recall`, `forget`).
//! - [`journal`]: each incarnation's start and stop on the monotonic clock,
//!   so tests can check that no two incarnations of an agent overlapped.
//!
//! Invariant: every process an agent starts lives in a process group the
//! runtime kills as a whole when the task or the incarnation ends, and dies
//! with the node (parent-death signal), so nothing of an incarnation
//! outlives its stop.

pub mod exec;
pub mod inference;
pub mod journal;
pub mod process;
pub mod sandbox;

pub use sandbox::{Limits, Sandbox};
