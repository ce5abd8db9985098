//! Histories: what a workload's clients did, one JSON object per operation
//! and line (JSONL), in the order the operations completed.
//!
//! Values are register values as the workloads write them: every write
//! writes a value no other write writes (a client's number and its own
//! counter), so a read names the one write it saw. A compare-and-set is
//! recorded by value: the workload read the key's value and revision and
//! asked to replace that revision, which is that value.
//!
//! Invariants:
//! - `status` is `unknown` whenever the operation may or may not have taken
//!   effect (a timed-out or otherwise indeterminate write); `fail` only
//!   when it certainly did not (refused before it reached the log, or a
//!   read, which changes nothing).
//! - Times are microseconds since the workload started, from one monotonic
//!   clock; `invoke_us <= complete_us`.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A register value: unique per write of a workload.
pub type Value = u64;

/// What an operation asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// `Get` of one key.
    Read,
    /// `Put` of one key.
    Write,
    /// `Cas` of one key from an expected value (or absence) to a new one.
    Cas,
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// It took effect (a write) or returned (a read), as recorded.
    Ok,
    /// It certainly did not take effect.
    Fail,
    /// It may or may not have taken effect.
    Unknown,
}

/// How fresh a read asked to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadConsistency {
    /// Reflects every write acknowledged before it started.
    Linearizable,
    /// From the answering node's replica; may be stale.
    Serializable,
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The client (one connection, one operation at a time).
    pub client: u32,
    /// What it asked.
    pub kind: OpKind,
    /// The key.
    pub key: String,
    /// Reads: the consistency asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<ReadConsistency>,
    /// Writes and compare-and-sets: the value written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Compare-and-sets: the value expected (`None`: the key must be absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Value>,
    /// Reads that returned: the value read (`Some(None)`: the key was
    /// absent, written as `null`).
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub read: Option<Option<Value>>,
    /// Compare-and-sets that returned: whether the value was replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succeeded: Option<bool>,
    /// When the client sent it, microseconds since the workload started.
    pub invoke_us: u64,
    /// When the answer (or the error) came.
    pub complete_us: u64,
    /// How it ended.
    pub status: Status,
    /// The node the client talked to.
    pub node: u32,
    /// The error, when it failed or its outcome is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    /// A blank operation of `client` through `node`: a read that has not
    /// run (ok, at time 0, nothing asked or seen); a workload fills in the
    /// rest.
    pub fn blank(client: u32, node: u32) -> Op {
        Op {
            client,
            kind: OpKind::Read,
            key: String::new(),
            consistency: None,
            value: None,
            expect: None,
            read: None,
            succeeded: None,
            invoke_us: 0,
            complete_us: 0,
            status: Status::Ok,
            node,
            error: None,
        }
    }
}

/// A field that is present (even as `null`) is `Some`; only a missing one
/// (serde's `default`) is `None`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<Value>>, D::Error> {
    Option::<Value>::deserialize(d).map(Some)
}

/// What can go wrong reading or writing a history file.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not an operation.
    #[error("{path}:{line}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The line number (from 1).
        line: usize,
        /// Why.
        source: serde_json::Error,
    },
}

/// Writes `ops` to `path`, one JSON object per line.
pub fn write(path: &Path, ops: &[Op]) -> Result<(), HistoryError> {
    let io = |source| HistoryError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    for op in ops {
        let line = serde_json::to_string(op).map_err(|e| io(std::io::Error::other(e)))?;
        writeln!(out, "{line}").map_err(io)?;
    }
    out.flush().map_err(io)
}

/// Reads a history written by [`write()`].
pub fn read(path: &Path) -> Result<Vec<Op>, HistoryError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| HistoryError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut ops = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| HistoryError::Io {
            path: shown.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        ops.push(serde_json::from_str(&line).map_err(|source| HistoryError::Parse {
            path: shown.clone(),
            line: i + 1,
            source,
        })?);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let ops = vec![
            Op {
                client: 1,
                kind: OpKind::Cas,
                key: "r0".into(),
                consistency: None,
                value: Some(7),
                expect: None,
                succeeded: Some(true),
                read: None,
                invoke_us: 10,
                complete_us: 20,
                status: Status::Ok,
                node: 2,
                error: None,
            },
            Op {
                client: 2,
                kind: OpKind::Read,
                key: "r0".into(),
                consistency: Some(ReadConsistency::Linearizable),
                value: None,
                expect: None,
                succeeded: None,
                read: Some(None),
                invoke_us: 11,
                complete_us: 30,
                status: Status::Ok,
                node: 0,
                error: None,
            },
        ];
        write(&path, &ops).unwrap();
        assert_eq!(read(&path).unwrap(), ops);
        std::fs::write(&path, "{\"client\": 1}\n").unwrap();
        let e = read(&path).unwrap_err();
        assert!(e.to_string().contains("h.jsonl:1"), "{e}");
    }
}
