//! Failpoints: deliberately broken behaviour that the chaos tests must
//! catch, switched on per process by the environment variable
//! `CELL0_FAILPOINTS` (a comma-separated list). Never set it in
//! production: each one breaks a guarantee on purpose.
//!
//! - `stale-reads`: a node that believes it leads answers linearizable
//!   reads from its replica without confirming its leadership with a
//!   quorum, so an isolated old leader serves stale values.
//!
//! Invariants: the variable is read once per process; with it unset (the
//! default) every failpoint is off.

use std::sync::OnceLock;

/// The environment variable naming the failpoints that are on.
pub const ENV: &str = "CELL0_FAILPOINTS";

fn enabled(name: &str) -> bool {
    static ON: OnceLock<Vec<String>> = OnceLock::new();
    ON.get_or_init(|| {
        let on: Vec<String> = std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if !on.is_empty() {
            tracing::warn!(failpoints = ?on, "failpoints are on: this node breaks guarantees on purpose");
        }
        on
    })
    .iter()
    .any(|f| f == name)
}

/// Whether linearizable reads skip the leadership confirmation on a node
/// that believes it leads.
pub fn stale_reads() -> bool {
    enabled("stale-reads")
}
