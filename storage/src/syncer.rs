//! The log's fsync thread: appends become durable off the Raft core's path.
//!
//! openraft's `append` contract is "return once the entries are readable,
//! call the callback once they are durable". The log store therefore writes
//! an append without fsync (visible at once, microseconds), and queues its
//! callback here. One named thread (`cell0-log-sync`) takes every queued
//! callback, makes the engine durable with one [`Engine::sync`], and
//! completes them all: appends that arrive while an fsync runs share the
//! next one (group commit), and the Raft core keeps replicating, voting and
//! applying meanwhile instead of waiting on the disk.
//!
//! Invariants:
//! - A callback completes only after an `Engine::sync` that started after
//!   its write returned, so a completed append is durable.
//! - Callbacks complete in the order they were queued.
//! - Engines that never block (in memory) sync and complete inline, so a
//!   simulated runtime stays deterministic.
//! - The thread ends when the last handle is dropped, after completing what
//!   was queued, and that drop joins it.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::engine::Engine;
use crate::{Error, Result};

/// What to do once the queued writes are durable (or the sync failed).
pub(crate) type Completion = Box<dyn FnOnce(Result<()>) + Send>;

/// Handle to the fsync thread of one engine.
pub(crate) struct LogSyncer<E: Engine> {
    engine: Arc<E>,
    queue: Option<mpsc::Sender<Completion>>,
    thread: Option<JoinHandle<()>>,
}

impl<E: Engine> LogSyncer<E> {
    /// Starts the thread for engines that may block; none for the others.
    pub(crate) fn start(engine: Arc<E>) -> Result<Self> {
        if !engine.may_block() {
            return Ok(Self {
                engine,
                queue: None,
                thread: None,
            });
        }
        let (tx, rx) = mpsc::channel::<Completion>();
        let for_thread = engine.clone();
        let thread = std::thread::Builder::new()
            .name("cell0-log-sync".into())
            .spawn(move || run(for_thread.as_ref(), &rx))
            .map_err(|e| Error::Io(format!("starting the log sync thread: {e}")))?;
        Ok(Self {
            engine,
            queue: Some(tx),
            thread: Some(thread),
        })
    }

    /// Calls `done` once every write that returned before this call is
    /// durable.
    pub(crate) fn after_sync(&self, done: Completion) {
        match &self.queue {
            None => done(self.engine.sync()),
            Some(queue) => {
                if let Err(mpsc::SendError(done)) = queue.send(done) {
                    // The thread is gone (it panicked): sync here instead.
                    done(self.engine.sync());
                }
            }
        }
    }
}

fn run<E: Engine>(engine: &E, rx: &mpsc::Receiver<Completion>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let result = engine.sync();
        if let Err(e) = &result {
            tracing::error!(error = %e, "syncing the log failed");
        }
        tracing::trace!(appends = waiting.len(), "log synced");
        for done in waiting {
            done(result.as_ref().map(|_| ()).map_err(|e| Error::Io(e.to_string())));
        }
    }
}

impl<E: Engine> Drop for LogSyncer<E> {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(task = "cell0-log-sync", "the log sync thread panicked");
        }
    }
}
