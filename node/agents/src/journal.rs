//! Each incarnation's start and stop, one JSON line each, with the time on
//! the machine's monotonic clock (`CLOCK_MONOTONIC`, shared by every
//! process of one machine): the record tests use to check that no two
//! incarnations of an agent ever ran at the same time.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The agent.
    pub agent: String,
    /// Its incarnation.
    pub incarnation: u64,
    /// `started` or `stopped`.
    pub event: String,
    /// `CLOCK_MONOTONIC`, in nanoseconds.
    pub monotonic_ns: u64,
}

/// An append-only journal file.
#[derive(Debug)]
pub struct Journal {
    file: Mutex<std::fs::File>,
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

impl Journal {
    /// Opens (appending) the journal at `path`.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Journal { file: Mutex::new(file) })
    }

    /// Appends a record of `event` now.
    pub fn record(&self, agent: &str, incarnation: u64, event: &str) {
        let record = Record {
            agent: agent.to_string(),
            incarnation,
            event: event.to_string(),
            monotonic_ns: monotonic_ns(),
        };
        let Ok(mut line) = serde_json::to_vec(&record) else {
            return;
        };
        line.push(b'\n');
        let Ok(mut file) = self.file.lock() else {
            return;
        };
        if let Err(e) = file.write_all(&line) {
            tracing::warn!(error = %e, "cannot append to the agent journal");
        }
    }
}

/// Reads the records of the journal at `path`.
pub fn read(path: &Path) -> io::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).map_err(io::Error::other))
        .collect()
}
