//! Live snapshots: the current state streamed from a point-in-time view
//! straight into a transfer.
//!
//! A stored snapshot is a durable file that serves restarts and log
//! compaction. A member that joins or fell behind is better served by the
//! state as of now: it then replays no entry written since the stored
//! snapshot. A live snapshot is written by a build (see
//! `StateMachineStore::start_live`) in the snapshot file format into a
//! [`LivePipe`], a bounded queue of chunks in memory that the transfer
//! drains; nothing goes to disk on the sending side.
//!
//! Invariants:
//! - The pipe holds at most [`PIPE_BYTES`] (plus one chunk): the build waits
//!   for the transfer, so memory stays bounded whatever the state's size.
//! - Either side can end it: the build completes or abandons it (an error),
//!   the transfer abandons it by dropping its handle; the other side then
//!   stops, so neither waits forever on the other.
//! - [`LiveSnapshots`] only turns off once on: a peer of an older build that
//!   cannot take a stream of unknown size turns it off, and from then on
//!   every transfer sends the stored snapshot file.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Bytes a live snapshot's build may run ahead of its transfer.
pub const PIPE_BYTES: usize = 16 << 20;

/// Whether lagging members are sent live snapshots; shared by the state
/// machine store (which builds them) and the network (which turns them off
/// for peers of older builds).
#[derive(Debug, Clone, Default)]
pub struct LiveSnapshots(Arc<AtomicU8>);

const LIVE_NOT_YET: u8 = 0;
const LIVE_ON: u8 = 1;
const LIVE_OFF: u8 = 2;

impl LiveSnapshots {
    /// Starts serving live snapshots, unless they were turned off.
    pub fn enable(&self) {
        let _ = self
            .0
            .compare_exchange(LIVE_NOT_YET, LIVE_ON, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Serves stored snapshots only, for good (until the process restarts).
    pub fn disable(&self) {
        self.0.store(LIVE_OFF, Ordering::Release);
    }

    /// Whether live snapshots are served.
    pub fn enabled(&self) -> bool {
        self.0.load(Ordering::Acquire) == LIVE_ON
    }
}

/// The bytes of one live snapshot between its build and its transfer.
#[derive(Debug, Default)]
pub struct LivePipe {
    state: Mutex<PipeState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct PipeState {
    chunks: VecDeque<Vec<u8>>,
    queued: usize,
    end: Option<PipeEnd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PipeEnd {
    Complete,
    Abandoned,
}

fn abandoned() -> std::io::Error {
    std::io::Error::other("the live snapshot was abandoned")
}

impl LivePipe {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        // A queue and counters, consistent even after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, PipeState>) -> MutexGuard<'a, PipeState> {
        self.changed.wait(state).unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `chunk`, waiting while the pipe is full; an error once the
    /// transfer went away.
    fn push(&self, chunk: Vec<u8>) -> std::io::Result<()> {
        let mut state = self.lock();
        loop {
            if state.end.is_some() {
                return Err(abandoned());
            }
            if state.queued < PIPE_BYTES {
                break;
            }
            state = self.wait(state);
        }
        state.queued += chunk.len();
        state.chunks.push_back(chunk);
        self.changed.notify_all();
        Ok(())
    }

    /// The build wrote everything.
    pub(crate) fn complete(&self) {
        self.lock().end.get_or_insert(PipeEnd::Complete);
        self.changed.notify_all();
    }

    /// One side gave up; the other stops.
    pub(crate) fn abandon(&self) {
        self.lock().end.get_or_insert(PipeEnd::Abandoned);
        self.changed.notify_all();
    }

    /// Whether [`LivePipe::abandon`] was called.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.lock().end == Some(PipeEnd::Abandoned)
    }

    /// Takes the next queued bytes, at least one chunk and otherwise at most
    /// `max`, waiting for the build; `None` once it completed and everything
    /// was taken; an error once abandoned (queued bytes are worth nothing
    /// then).
    pub(crate) fn pop(&self, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        let mut state = self.lock();
        loop {
            match state.end {
                Some(PipeEnd::Abandoned) => return Err(abandoned()),
                _ if !state.chunks.is_empty() => break,
                Some(PipeEnd::Complete) => return Ok(None),
                None => state = self.wait(state),
            }
        }
        let mut out = state.chunks.pop_front().unwrap_or_default();
        while let Some(next) = state.chunks.front() {
            if out.len() + next.len() > max {
                break;
            }
            out.extend_from_slice(next);
            state.chunks.pop_front();
        }
        state.queued -= out.len();
        self.changed.notify_all();
        Ok(Some(out))
    }
}

/// The writing end of a [`LivePipe`]: every write becomes one chunk (the
/// snapshot writer buffers rows into large writes).
#[derive(Debug)]
pub(crate) struct PipeSink(pub(crate) Arc<LivePipe>);

impl Write for PipeSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf.to_vec())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_pipe_delivers_in_order_merges_small_chunks_and_ends() {
        let pipe = Arc::new(LivePipe::default());
        let mut sink = PipeSink(pipe.clone());
        sink.write_all(b"ab").unwrap();
        sink.write_all(b"cd").unwrap();
        sink.write_all(b"efg").unwrap();
        pipe.complete();
        assert_eq!(pipe.pop(4).unwrap(), Some(b"abcd".to_vec()));
        assert_eq!(
            pipe.pop(1).unwrap(),
            Some(b"efg".to_vec()),
            "one chunk always comes whole"
        );
        assert_eq!(pipe.pop(4).unwrap(), None);
    }

    #[test]
    fn a_full_pipe_holds_the_build_until_the_transfer_takes_or_leaves() {
        let pipe = Arc::new(LivePipe::default());
        let writer = {
            let pipe = pipe.clone();
            std::thread::spawn(move || {
                let mut sink = PipeSink(pipe);
                for _ in 0..4 {
                    sink.write_all(&vec![7; PIPE_BYTES / 2])?;
                }
                Ok::<_, std::io::Error>(())
            })
        };
        // Three chunks fit (the third goes in below the bound), the fourth
        // waits for a pop.
        let first = pipe.pop(PIPE_BYTES / 2).unwrap().unwrap();
        assert_eq!(first.len(), PIPE_BYTES / 2);
        pipe.abandon();
        // Whatever it was waiting for, the build stops with an error or
        // finishes its last write; it never hangs.
        let _ = writer.join().unwrap();
        assert!(pipe.pop(1).is_err(), "an abandoned pipe gives nothing more");
    }

    #[test]
    fn live_snapshots_stay_off_once_turned_off() {
        let live = LiveSnapshots::default();
        assert!(!live.enabled());
        live.enable();
        assert!(live.enabled());
        live.disable();
        live.enable();
        assert!(!live.enabled());
    }
}
