//! Loading a snapshot into staging while it is still being received.
//!
//! A transfer appends the snapshot file chunk by chunk; a preload reads the
//! same file behind it ([`GrowingReader`]: positioned reads up to what was
//! appended, waiting for more) and writes its rows into [`Cf::Staging`], so
//! that when the last byte arrives most of the load is already done and the
//! install only finishes it, checks it and promotes it.
//!
//! Invariants:
//! - [`Cf::Staging`] has one user at a time, recorded in [`Staging`]: a
//!   preload starts only while nobody uses it (otherwise the install loads
//!   the file itself), and an install waits until no preload runs before it
//!   touches staging. Every preload or install that fills staging takes a
//!   new generation; an install promotes preloaded rows only if their
//!   generation is still the current one (no other load ran since), and
//!   loads the file itself otherwise.
//! - A preload never waits on the state machine, only on bytes: it ends
//!   when the file is complete and read, when the transfer is abandoned
//!   (the file dropped without being completed, or written through
//!   openraft's chunked interface), or on a malformed file. So an install
//!   waiting for staging always gets it.
//! - Preloaded rows are worth nothing until an install promotes them; a
//!   crash leaves them to the next start, like any staged rows.
//!
//! [`Cf::Staging`]: crate::Cf::Staging

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::snapshot::FileSummary;

/// How far a file being received has grown, and whether it is complete.
#[derive(Debug, Default)]
pub(crate) struct Growth {
    state: Mutex<GrowthState>,
    changed: Condvar,
}

#[derive(Debug, Default, Clone, Copy)]
struct GrowthState {
    written: u64,
    end: Option<GrowthEnd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrowthEnd {
    Complete,
    Abandoned,
}

impl Growth {
    fn lock(&self) -> MutexGuard<'_, GrowthState> {
        // Plain counters, consistent even after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file now holds `written` bytes.
    pub(crate) fn grew(&self, written: u64) {
        self.lock().written = written;
        self.changed.notify_all();
    }

    /// Nothing more will be appended.
    pub(crate) fn complete(&self) {
        let mut state = self.lock();
        state.end.get_or_insert(GrowthEnd::Complete);
        self.changed.notify_all();
    }

    /// The transfer ended without completing the file (or stopped writing
    /// it in order); readers give up.
    pub(crate) fn abandon(&self) {
        let mut state = self.lock();
        state.end.get_or_insert(GrowthEnd::Abandoned);
        self.changed.notify_all();
    }

    /// Waits until the file holds more than `offset` bytes and returns how
    /// many more, or `None` once it is complete at `offset` or before; an
    /// abandoned file is an error.
    pub(crate) fn wait_beyond(&self, offset: u64) -> std::io::Result<Option<u64>> {
        let mut state = self.lock();
        loop {
            if state.written > offset {
                return Ok(Some(state.written - offset));
            }
            match state.end {
                Some(GrowthEnd::Complete) => return Ok(None),
                Some(GrowthEnd::Abandoned) => {
                    return Err(std::io::Error::other("the snapshot transfer was abandoned"));
                }
                None => state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// Reads a file as it is appended to ([`Growth`]), from its start.
pub(crate) struct GrowingReader {
    file: Arc<File>,
    growth: Arc<Growth>,
    offset: u64,
}

impl GrowingReader {
    pub(crate) fn new(file: Arc<File>, growth: Arc<Growth>) -> Self {
        Self {
            file,
            growth,
            offset: 0,
        }
    }
}

impl Read for GrowingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(available) = self.growth.wait_beyond(self.offset)? else {
            return Ok(0);
        };
        let want = buf.len().min(usize::try_from(available).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Who uses [`crate::Cf::Staging`] (see the module invariants).
#[derive(Debug, Default)]
pub(crate) struct Staging {
    state: Mutex<StagingState>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct StagingState {
    busy: bool,
    /// Bumped by every load into staging.
    generation: u64,
}

impl Staging {
    fn lock(&self) -> MutexGuard<'_, StagingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes staging for a new load if nobody uses it; its generation.
    pub(crate) fn try_take(&self) -> Option<u64> {
        let mut state = self.lock();
        if state.busy {
            return None;
        }
        state.busy = true;
        state.generation += 1;
        Some(state.generation)
    }

    /// Waits until nobody uses staging, then takes it; the generation of
    /// what it holds.
    pub(crate) fn take(&self) -> u64 {
        let mut state = self.lock();
        while state.busy {
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.busy = true;
        state.generation
    }

    /// Marks staging as refilled by the current holder.
    pub(crate) fn refilled(&self) {
        self.lock().generation += 1;
    }

    /// Gives staging back.
    pub(crate) fn give_back(&self) {
        self.lock().busy = false;
        self.freed.notify_all();
    }
}

/// Gives staging back when dropped.
pub(crate) struct StagingHold(pub(crate) Arc<Staging>);

impl Drop for StagingHold {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// What a finished preload left in staging.
#[derive(Debug)]
pub(crate) struct Preloaded {
    /// The staging generation it filled.
    pub(crate) generation: u64,
    /// The file's header meta (the snapshot it holds).
    pub(crate) meta: Vec<u8>,
    /// The checked file.
    pub(crate) summary: FileSummary,
}

/// A preload running behind a transfer.
#[derive(Debug)]
pub(crate) struct Preload {
    /// Its outcome, sent once when it ends (in a mutex only so that the
    /// snapshot file holding it can be shared between threads).
    pub(crate) outcome: Mutex<std::sync::mpsc::Receiver<crate::Result<Preloaded>>>,
}

impl Preload {
    /// Waits for the preload to end (the file is complete, so it does).
    pub(crate) fn wait(self) -> crate::Result<Preloaded> {
        self.outcome
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .recv()
            .map_err(|_| crate::Error::Io("the snapshot preload ended without an outcome".into()))?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    #[test]
    fn a_growing_reader_waits_for_bytes_and_stops_at_the_end_or_an_abandon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut writer = File::create(&path).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let growth = Arc::new(Growth::default());
        let mut reader = GrowingReader::new(file.clone(), growth.clone());
        let grower = {
            let growth = growth.clone();
            std::thread::spawn(move || {
                for chunk in [&b"hello "[..], b"world"] {
                    writer.write_all(chunk).unwrap();
                    let len = writer.metadata().unwrap().len();
                    growth.grew(len);
                }
                growth.complete();
            })
        };
        let mut all = String::new();
        reader.read_to_string(&mut all).unwrap();
        grower.join().unwrap();
        assert_eq!(all, "hello world");

        let growth = Arc::new(Growth::default());
        let mut reader = GrowingReader::new(file, growth.clone());
        growth.grew(5);
        let mut head = [0u8; 5];
        reader.read_exact(&mut head).unwrap();
        growth.abandon();
        assert!(
            reader.read(&mut head).is_err(),
            "an abandoned transfer is an error, not an end"
        );
    }

    #[test]
    fn staging_has_one_user_and_counts_loads() {
        let staging = Arc::new(Staging::default());
        let first = staging.try_take().unwrap();
        assert_eq!(staging.try_take(), None, "taken");
        let waiter = {
            let staging = staging.clone();
            std::thread::spawn(move || staging.take())
        };
        staging.give_back();
        assert_eq!(waiter.join().unwrap(), first, "nothing loaded since");
        staging.refilled();
        staging.give_back();
        assert_eq!(staging.try_take(), Some(first + 2));
    }
}
