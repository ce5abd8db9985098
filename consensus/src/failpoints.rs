//! Failpoints: deliberately broken behaviour that the chaos tests must
//! catch, switched on per process by the environment variable
//! `CELL0_FAILPOINTS` (a comma-separated list). Never set it in
//! production: each one breaks a guarantee on purpose.
//!
//! - `stale-reads`: every node answers linearizable reads from its own
//!   replica without a read index (no leadership confirmed by a quorum, no
//!   wait for the commit index): a lagging follower or an isolated old
//!   leader serves stale values.
//! - `no-prompt-elections`: nodes stand for election only on openraft's
//!   own timers, never at once (see `crate::elections`). Breaks no
//!   guarantee, only slows failover; it is here to measure the difference.
//! - `crash-at-<point>`: the process exits at once (code 86) when it
//!   reaches a named point ([`crash_at`]), as a power cut there would: how
//!   the tests crash a node between two steps of a protocol.
//!
//! Invariants: the variable is read once per process; with it unset (the
//! default) every failpoint is off. Tests that run a whole cluster inside
//! one process (the simulator, `cell0_sim`) switch a failpoint for
//! that process with its setter ([`set_stale_reads`]), which wins over the
//! variable; nothing else calls a setter.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

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

/// What [`set_stale_reads`] decided: `UNSET` (the variable decides),
/// `OFF` or `ON`.
static STALE_READS_SET: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

/// Whether linearizable reads are served from the local replica without a
/// read index.
pub fn stale_reads() -> bool {
    match STALE_READS_SET.load(Ordering::Relaxed) {
        OFF => false,
        ON => true,
        _ => enabled("stale-reads"),
    }
}

/// Switches `stale-reads` on (`Some(true)`) or off (`Some(false)`) for every
/// node of this process, whatever `CELL0_FAILPOINTS` says; `None` hands the
/// decision back to the variable. For tests only: a test process that runs
/// a cluster in-process (the simulator) has no per-node environment.
pub fn set_stale_reads(on: Option<bool>) {
    let v = match on {
        None => UNSET,
        Some(false) => OFF,
        Some(true) => ON,
    };
    STALE_READS_SET.store(v, Ordering::Relaxed);
}

/// Whether prompt elections (`crate::elections`) are off for this process.
pub fn no_prompt_elections() -> bool {
    enabled("no-prompt-elections")
}

/// The exit code of a process that crashed on purpose at a failpoint.
pub const CRASH_EXIT_CODE: i32 = 86;

/// Exits the process at once if `crash-at-<point>` is on.
pub fn crash_at(point: &str) {
    if enabled(&format!("crash-at-{point}")) {
        tracing::error!(%point, "crashing on purpose (failpoint)");
        std::process::exit(CRASH_EXIT_CODE);
    }
}
