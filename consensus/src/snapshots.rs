//! When to build a snapshot (`snapshot-trigger`).
//!
//! A snapshot is a full copy of the state, so building one costs the whole
//! state's size in reads and writes however little changed. openraft's
//! count-only policy ("every N entries") rebuilds a 2 GB state every N
//! entries; measured, that dominated writes at a few GB. This task builds a
//! snapshot only when both hold: at least `snapshot_every` entries were
//! applied since the last snapshot, and the commands applied since then
//! weigh at least `snapshot_log_percent` % of the last snapshot's size. So
//! the log kept between snapshots stays a bounded fraction of the state, and
//! rebuilding costs a bounded multiple of what was written.
//!
//! Invariants: it only asks openraft to build (openraft builds, stores and
//! purges); it sees the member's stop signal and is joined at shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::state::KvStateMachine;
use crate::task::NamedTask;
use crate::types::Raft;

/// How often the rule is checked.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// The rule's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SnapshotRule {
    pub every_entries: u64,
    pub log_percent: u64,
}

/// Size of the newest snapshot file in `dir` (0 when there is none).
fn snapshot_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
        .filter_map(|e| e.metadata().ok().map(|m| (m.modified().ok(), m.len())))
        .max_by_key(|(modified, _)| *modified)
        .map_or(0, |(_, len)| len)
}

/// Starts the task.
pub(crate) fn spawn(raft: Raft, sm: Arc<KvStateMachine>, dir: PathBuf, rule: SnapshotRule) -> NamedTask {
    NamedTask::spawn("snapshot-trigger", move |stop| run(raft, sm, dir, rule, stop))
}

async fn run(raft: Raft, sm: Arc<KvStateMachine>, dir: PathBuf, rule: SnapshotRule, mut stop: watch::Receiver<bool>) {
    // Applied command bytes when the last snapshot was asked for.
    let mut bytes_at_last = sm.applied_bytes();
    let mut last_index = raft.metrics().borrow().snapshot.map_or(0, |s| s.index);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let (applied, snapshot) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.last_applied.map_or(0, |l| l.index), m.snapshot.map_or(0, |s| s.index))
        };
        if snapshot > last_index {
            // Built meanwhile (installed from a leader, or asked for below).
            last_index = snapshot;
            bytes_at_last = sm.applied_bytes();
        }
        if applied.saturating_sub(snapshot) < rule.every_entries {
            continue;
        }
        let written = sm.applied_bytes().saturating_sub(bytes_at_last);
        let state = snapshot_bytes(&dir);
        if u128::from(written) * 100 < u128::from(state) * u128::from(rule.log_percent) {
            continue;
        }
        tracing::debug!(applied, snapshot, written, state, "building a snapshot");
        if let Err(e) = raft.trigger().snapshot().await {
            tracing::warn!(error = %e, "asking for a snapshot");
            continue;
        }
        bytes_at_last = sm.applied_bytes();
        last_index = applied;
    }
}
