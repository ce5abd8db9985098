//! Configuration of the consensus layer (the `[raft]` section of a node's
//! config file).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::MAX_VALUE_BYTES;
use crate::error::ConsensusError;
use crate::network::MAX_INTERNAL_MESSAGE_BYTES;

/// Tuning of Raft, group commit and request routing. Every field has a
/// default; `validate()` names the field that is out of range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsensusConfig {
    /// Number of voting members the cluster aims for (odd: 1, 3 or 5). Nodes
    /// that join beyond it stay learners.
    pub voters: usize,
    /// Leader heartbeat period, in milliseconds.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout, in milliseconds. Must
    /// be well above `heartbeat_ms`. A follower that hears nothing from its
    /// leader stands for election after `election_timeout_max_ms` (the
    /// leader lease, during which it also refuses to vote for others) plus
    /// a random timeout between the two bounds: 0.9 to 1.2 s at the
    /// defaults, close to etcd's 1 s.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout, in milliseconds.
    pub election_timeout_max_ms: u64,
    /// Whether a leader confirms its leadership for linearizable reads from
    /// its lease instead of a heartbeat round per read index: for half of
    /// `election_timeout_max_ms` after a quorum acknowledged an
    /// AppendEntries it sent (heartbeats and writes renew it), it answers at
    /// once. Voters refuse other candidates for the whole of
    /// `election_timeout_max_ms` after accepting the leader's messages, so
    /// reads stay linearizable as long as no node's clock runs twice as fast
    /// as another's, and every node of the cluster has the same
    /// `election_timeout_max_ms` (a leader's read lease is half of its own).
    /// `false` runs a round for every read index (etcd's ReadIndex), which
    /// does not depend on clocks at all.
    pub lease_reads: bool,
    /// Build a snapshot (and then purge the log) once at least this many
    /// entries were applied since the last one, and (see
    /// `snapshot_log_percent`) enough was written.
    pub snapshot_every: u64,
    /// ... and once the commands applied since the last snapshot weigh at
    /// least this percentage of that snapshot's size: a snapshot copies the
    /// whole state, so a large state is not rebuilt for a few changes; the
    /// log between snapshots stays about this fraction of the state. 0
    /// builds on the entry count alone.
    pub snapshot_log_percent: u64,
    /// Log entries kept behind the last snapshot, so slightly lagging
    /// followers catch up from the log instead of a snapshot.
    pub keep_logs_after_snapshot: u64,
    /// Bytes of a snapshot file per message of a transfer (per
    /// InstallSnapshot call to peers of older builds).
    pub snapshot_chunk_bytes: u64,
    /// Most log entries in one AppendEntries call.
    pub max_append_entries: u64,
    /// Most bytes in one AppendEntries call; a call that would carry more is
    /// split. openraft times an AppendEntries call out after
    /// `heartbeat_ms`, so this must cross the link within half of it:
    /// `max_append_bytes <= link_mbps x heartbeat_ms / 16` (bytes), and hold
    /// at least one full group (`max_batch_bytes`).
    pub max_append_bytes: usize,
    /// The slowest link between two nodes of this site, in megabits per
    /// second: the speed that `max_append_bytes` and `snapshot_chunk_bytes`
    /// are checked against.
    pub link_mbps: u64,
    /// Most client commands the leader groups into one log entry.
    pub max_batch_commands: usize,
    /// Most bytes of commands the leader groups into one log entry.
    pub max_batch_bytes: usize,
    /// Grouped entries proposed concurrently. While they are in flight, new
    /// commands queue up and form the next group. A follower forwards up to
    /// twice this many groups of writes at once. Every entry costs each node
    /// a log write, an fsync and Raft messages whatever its size, so one
    /// entry at a time (fewer, larger groups) spends the least CPU per write
    /// (docs/benchmarks.md); a higher value pipelines entries over links
    /// whose round trip is long against the disk's fsync.
    pub max_inflight_batches: usize,
    /// Commands a client may submit as one batch.
    pub max_client_batch_commands: usize,
    /// How long a request waits for a leader (elections, forwarding) before
    /// it fails with Unavailable, in milliseconds.
    pub request_timeout_ms: u64,
    /// Timeout for one node-to-node call, in milliseconds.
    pub rpc_timeout_ms: u64,
}

impl Default for ConsensusConfig {
    fn default() -> Self {
        Self {
            voters: 3,
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            lease_reads: true,
            snapshot_every: 10_000,
            snapshot_log_percent: 25,
            keep_logs_after_snapshot: 1_000,
            snapshot_chunk_bytes: 4 * 1024 * 1024,
            max_append_entries: 1024,
            max_append_bytes: 4 * 1024 * 1024,
            link_mbps: 1000,
            max_batch_commands: 1024,
            max_batch_bytes: 2 * 1024 * 1024,
            max_inflight_batches: 1,
            max_client_batch_commands: 1024,
            request_timeout_ms: 10_000,
            rpc_timeout_ms: 5_000,
        }
    }
}

fn bad(field: &str, reason: impl Into<String>) -> ConsensusError {
    ConsensusError::invalid(&format!("raft.{field}"), reason)
}

impl ConsensusConfig {
    /// How long opening a connection to another node may take: the call
    /// timeout, but at most 2 s.
    pub fn connect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.rpc_timeout_ms.min(2_000))
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConsensusError> {
        if !matches!(self.voters, 1 | 3 | 5 | 7) {
            return Err(bad("voters", format!("is {}; use 1, 3, 5 or 7", self.voters)));
        }
        if self.heartbeat_ms == 0 {
            return Err(bad("heartbeat_ms", "must be positive"));
        }
        const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
        if self.heartbeat_ms > MAX_TIMEOUT_MS {
            return Err(bad("heartbeat_ms", format!("must be at most {MAX_TIMEOUT_MS} (a day)")));
        }
        for (field, value) in [
            ("election_timeout_max_ms", self.election_timeout_max_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("rpc_timeout_ms", self.rpc_timeout_ms),
        ] {
            if value > MAX_TIMEOUT_MS {
                return Err(bad(field, format!("must be at most {MAX_TIMEOUT_MS} (a day)")));
            }
        }
        let min_election = self.heartbeat_ms.saturating_mul(3);
        if self.election_timeout_min_ms < min_election {
            return Err(bad(
                "election_timeout_min_ms",
                format!(
                    "is {}; it must be at least 3 x heartbeat_ms ({min_election})",
                    self.election_timeout_min_ms,
                ),
            ));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(bad(
                "election_timeout_max_ms",
                "must be greater than election_timeout_min_ms",
            ));
        }
        if self.snapshot_every == 0 {
            return Err(bad("snapshot_every", "must be positive"));
        }
        if self.snapshot_log_percent > 1000 {
            return Err(bad("snapshot_log_percent", "must be in 0..=1000"));
        }
        let chunk_cap = (MAX_INTERNAL_MESSAGE_BYTES / 2) as u64;
        if self.snapshot_chunk_bytes == 0 || self.snapshot_chunk_bytes > chunk_cap {
            return Err(bad("snapshot_chunk_bytes", format!("must be in 1..={chunk_cap}")));
        }
        if self.max_batch_commands == 0 {
            return Err(bad("max_batch_commands", "must be positive"));
        }
        if self.max_batch_bytes < MAX_VALUE_BYTES {
            return Err(bad(
                "max_batch_bytes",
                format!("must be at least the value limit {MAX_VALUE_BYTES}"),
            ));
        }
        if self.max_append_entries == 0 || self.max_append_entries > 1024 {
            return Err(bad("max_append_entries", "must be in 1..=1024"));
        }
        // One AppendEntries call must also fit the internal message limit.
        if self.max_append_bytes > MAX_INTERNAL_MESSAGE_BYTES / 2 {
            return Err(bad(
                "max_append_bytes",
                format!("must be at most {}", MAX_INTERNAL_MESSAGE_BYTES / 2),
            ));
        }
        if self.link_mbps == 0 {
            return Err(bad("link_mbps", "must be positive"));
        }
        // Bytes the link carries in half a heartbeat: 1 Mbit/s is 125 bytes/ms.
        let append_budget = self.link_mbps.saturating_mul(125).saturating_mul(self.heartbeat_ms) / 2;
        let min_append = self.max_batch_bytes as u64 + MAX_VALUE_BYTES as u64;
        if (self.max_append_bytes as u64) < min_append || self.max_append_bytes as u64 > append_budget {
            return Err(bad(
                "max_append_bytes",
                format!(
                    "is {}; it must hold one full group (max_batch_bytes + 1 MiB = {min_append}) and cross a {} Mbit/s link in half of heartbeat_ms ({append_budget} bytes)",
                    self.max_append_bytes, self.link_mbps
                ),
            ));
        }
        let chunk_budget = self.link_mbps.saturating_mul(125).saturating_mul(self.rpc_timeout_ms) / 2;
        if self.snapshot_chunk_bytes > chunk_budget {
            return Err(bad(
                "snapshot_chunk_bytes",
                format!(
                    "is {}; it must cross a {} Mbit/s link in half of rpc_timeout_ms ({chunk_budget} bytes)",
                    self.snapshot_chunk_bytes, self.link_mbps
                ),
            ));
        }
        if self.max_inflight_batches == 0 {
            return Err(bad("max_inflight_batches", "must be positive"));
        }
        if self.max_client_batch_commands == 0 {
            return Err(bad("max_client_batch_commands", "must be positive"));
        }
        if self.request_timeout_ms == 0 || self.rpc_timeout_ms == 0 {
            return Err(bad("request_timeout_ms", "timeouts must be positive"));
        }
        Ok(())
    }

    /// The openraft configuration derived from this one.
    pub(crate) fn to_openraft(&self) -> Result<openraft::Config, ConsensusError> {
        let config = openraft::Config {
            cluster_name: "cell0".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            read_lease: self
                .read_lease()
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            install_snapshot_timeout: self.rpc_timeout_ms,
            max_payload_entries: self.max_append_entries,
            // Built when `crate::snapshots` says so.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_in_snapshot_log_to_keep: self.keep_logs_after_snapshot,
            // A restarted leader leads again only through an election: one
            // restored without one knows only its stored commit index, which
            // may lag the writes it acknowledged, so its read index could
            // miss one; and after a power loss it would reuse the log ids of
            // its unsynced tail (consensus/vendor/README.md).
            enable_leader_restore: false,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| ConsensusError::invalid("raft", e.to_string()))
    }

    /// How long a leader's leadership holds for reads after a quorum
    /// acknowledged it: half the voters' leader lease (`lease_reads`), or
    /// `None` when every read index runs a round.
    pub fn read_lease(&self) -> Option<Duration> {
        self.lease_reads
            .then(|| Duration::from_millis(self.election_timeout_max_ms / 2))
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub(crate) fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.rpc_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_fields() {
        ConsensusConfig::default().validate().unwrap();
        ConsensusConfig::default().to_openraft().unwrap();
        let c = ConsensusConfig {
            voters: 2,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("raft.voters"));
        let c = ConsensusConfig {
            election_timeout_min_ms: 100,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("raft.election_timeout_min_ms")
        );
        let c = ConsensusConfig {
            max_append_entries: 0,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("raft.max_append_entries")
        );
    }

    #[test]
    fn the_read_lease_is_half_the_voters_leader_lease_or_off() {
        let c = ConsensusConfig::default();
        assert_eq!(c.read_lease(), Some(Duration::from_millis(300)));
        assert_eq!(c.to_openraft().unwrap().read_lease, 300);
        let off = ConsensusConfig {
            lease_reads: false,
            ..Default::default()
        };
        assert_eq!(off.read_lease(), None);
        assert_eq!(off.to_openraft().unwrap().read_lease, 0);
        // openraft refuses a read lease the voters' lease does not cover.
        let err = openraft::Config {
            read_lease: 600,
            election_timeout_max: 600,
            ..openraft::Config::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("read_lease"), "{err}");
    }

    #[test]
    fn huge_timeouts_are_refused_instead_of_overflowing() {
        let c = ConsensusConfig {
            heartbeat_ms: u64::MAX,
            election_timeout_min_ms: u64::MAX - 1,
            election_timeout_max_ms: u64::MAX,
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("raft.heartbeat_ms"), "{err}");
        let c = ConsensusConfig {
            heartbeat_ms: u64::MAX / 2,
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn append_calls_must_fit_the_heartbeat_at_the_link_speed() {
        // 100 Mbit/s carries 12,500 bytes a millisecond: 937,500 bytes in
        // half of a 150 ms heartbeat, less than one full group.
        let slow = ConsensusConfig {
            link_mbps: 100,
            ..Default::default()
        };
        let err = slow.validate().unwrap_err().to_string();
        assert!(err.contains("raft.max_append_bytes"), "{err}");
        let small = ConsensusConfig {
            max_append_bytes: 1024,
            ..Default::default()
        };
        assert!(
            small
                .validate()
                .unwrap_err()
                .to_string()
                .contains("raft.max_append_bytes")
        );
    }
}
