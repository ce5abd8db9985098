//! The task supervisor: every background loop of a node runs in one
//! [`Supervisor`], by name, so none is lost and shutdown can wait for all.
//!
//! A task is a future spawned on the tokio runtime with a static name (the
//! name is the `task` label of `cell0_task_failures_total`, so the label set
//! stays bounded). Each task is given the supervisor's stop signal
//! ([`Supervisor::stop_signal`]) and is expected to return soon after it
//! turns true. [`Supervisor::shutdown`] raises the signal, waits until every
//! task has returned or the deadline has passed, and cancels what is left.
//!
//! Invariants:
//! - every task spawned here ends in exactly one [`TaskEnd`]: it finished
//!   (returned `()` or `Ok`), failed (returned `Err`), panicked (caught; the
//!   panic does not reach the runtime and is not lost), or was cancelled at
//!   the shutdown deadline;
//! - a failure or panic is logged with the task's name and counted in
//!   `cell0_task_failures_total{task}` when it happens, not when the node
//!   stops;
//! - after [`Supervisor::shutdown`] returns no task of this supervisor runs
//!   any more (except one blocked inside a poll, which nothing can stop; it
//!   is recorded as cancelled), and spawning is refused;
//! - transient tasks (watch pumps: many, short-lived) are tracked like the
//!   others while they run, but one that finishes normally is only counted,
//!   so the record does not grow with every watch ever served; the list of
//!   ended tasks is capped at [`MAX_RECORDED`] entries in any case.
//!
//! A task holds only a weak reference to the supervisor: dropping every
//! [`Supervisor`] handle without a shutdown drops the stop sender, which the
//! tasks see as the stop signal too.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// The counter of tasks that failed or panicked, by task name.
pub const TASK_FAILURES_METRIC: &str = "cell0_task_failures_total";
/// Most ended tasks the record lists; later ones are only counted.
pub const MAX_RECORDED: usize = 4096;
/// How long cancelled tasks get to be dropped after the deadline.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// How a supervised task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEnd {
    /// It returned `()` or `Ok`.
    Finished,
    /// It returned an error (the error, with its causes).
    Failed(String),
    /// It panicked (the panic message).
    Panicked(String),
    /// It was still running at the shutdown deadline and was cancelled.
    Cancelled,
}

impl TaskEnd {
    /// Whether the task failed, panicked or was cancelled.
    pub fn is_problem(&self) -> bool {
        !matches!(self, TaskEnd::Finished)
    }
}

/// One ended task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// The task's name.
    pub name: &'static str,
    /// How it ended.
    pub end: TaskEnd,
    /// Whether the stop signal had been raised when it ended.
    pub after_stop: bool,
}

/// What a supervisor has run: a snapshot for tests and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Tasks spawned, by name (transient ones included).
    pub spawned: BTreeMap<&'static str, u64>,
    /// Ended tasks in the order they ended, except transient tasks that
    /// finished normally (counted in `transient_finished`).
    pub ended: Vec<TaskRecord>,
    /// Transient tasks that finished normally, by name.
    pub transient_finished: BTreeMap<&'static str, u64>,
    /// Ended tasks left out of `ended` because it was full.
    pub unrecorded: u64,
    /// Names of the tasks still running.
    pub running: Vec<&'static str>,
    /// Whether [`Supervisor::shutdown`] has completed.
    pub shut_down: bool,
}

impl Record {
    /// The ended tasks that failed, panicked or were cancelled.
    pub fn problems(&self) -> Vec<&TaskRecord> {
        self.ended.iter().filter(|t| t.end.is_problem()).collect()
    }

    /// Whether every task was joined: shutdown completed, nothing runs, and
    /// no task failed, panicked or was cancelled at the deadline.
    pub fn all_joined_cleanly(&self) -> bool {
        self.shut_down && self.running.is_empty() && self.unrecorded == 0 && self.problems().is_empty()
    }
}

/// What a task's future may return: `()` or `Result<(), E>`.
pub trait TaskOutput {
    /// The error, rendered with its causes, if the task failed.
    fn into_outcome(self) -> Result<(), String>;
}

impl TaskOutput for () {
    fn into_outcome(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: std::fmt::Display> TaskOutput for Result<(), E> {
    fn into_outcome(self) -> Result<(), String> {
        self.map_err(|e| format!("{e:#}"))
    }
}

struct Running {
    name: &'static str,
    transient: bool,
    handle: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    running: BTreeMap<u64, Running>,
    spawned: BTreeMap<&'static str, u64>,
    ended: Vec<TaskRecord>,
    transient_finished: BTreeMap<&'static str, u64>,
    unrecorded: u64,
    closed: bool,
}

impl State {
    fn push(&mut self, record: TaskRecord) {
        if self.ended.len() < MAX_RECORDED {
            self.ended.push(record);
        } else {
            self.unrecorded += 1;
        }
    }
}

struct Shared {
    stop: watch::Sender<bool>,
    /// The number of running tasks, for [`Supervisor::shutdown`] to wait on.
    running: watch::Sender<usize>,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held, but a poisoned
        // record is still the best record there is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records how task `id` ended, unless the deadline already recorded it
    /// as cancelled.
    fn finish(&self, id: u64, end: TaskEnd) {
        let after_stop = *self.stop.borrow();
        let name = {
            let mut state = self.lock();
            let Some(task) = state.running.remove(&id) else {
                return;
            };
            self.running.send_replace(state.running.len());
            if task.transient && end == TaskEnd::Finished {
                *state.transient_finished.entry(task.name).or_default() += 1;
            } else {
                state.push(TaskRecord {
                    name: task.name,
                    end: end.clone(),
                    after_stop,
                });
            }
            task.name
        };
        match &end {
            TaskEnd::Finished => tracing::debug!(task = name, "task finished"),
            TaskEnd::Failed(error) => {
                metrics::counter!(TASK_FAILURES_METRIC, "task" => name).increment(1);
                if after_stop {
                    tracing::warn!(task = name, %error, "task failed while the node was stopping");
                } else {
                    tracing::error!(task = name, %error, "task failed");
                }
            }
            TaskEnd::Panicked(message) => {
                metrics::counter!(TASK_FAILURES_METRIC, "task" => name).increment(1);
                tracing::error!(task = name, panic = %message, "task panicked");
            }
            TaskEnd::Cancelled => {}
        }
    }
}

/// The supervisor of one node's background tasks. Cheap to clone; every
/// clone is the same supervisor.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("stopping", &self.is_stopping())
            .field("running", &*self.shared.running.borrow())
            .finish()
    }
}

impl Supervisor {
    /// A supervisor with no tasks and the stop signal down.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                stop: watch::Sender::new(false),
                running: watch::Sender::new(0),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The stop signal: turns true when shutdown begins (wait on it with
    /// [`stopped`]).
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.shared.stop.subscribe()
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        *self.shared.stop.borrow()
    }

    /// Runs `task` as the long-lived task `name`. Returns false (and drops
    /// `task` unpolled) once the supervisor has shut down.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> bool
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        self.start(name, false, task)
    }

    /// Runs `task` as one of the many short-lived tasks `name` (a watch
    /// pump): like [`Supervisor::spawn`], but a normal end is only counted.
    pub fn spawn_transient<F>(&self, name: &'static str, task: F) -> bool
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        self.start(name, true, task)
    }

    fn start<F>(&self, name: &'static str, transient: bool, task: F) -> bool
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        let mut state = self.shared.lock();
        if state.closed {
            tracing::warn!(task = name, "not started: the node has shut down");
            return false;
        }
        let id = state.next_id;
        state.next_id += 1;
        *state.spawned.entry(name).or_default() += 1;
        state.running.insert(
            id,
            Running {
                name,
                transient,
                handle: None,
            },
        );
        self.shared.running.send_replace(state.running.len());
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        // The task ends under the span it was started in (the node's, in a
        // process running several), so its logs say whose task it was.
        let handle = tokio::spawn(
            async move {
                let end = match AssertUnwindSafe(task).catch_unwind().await {
                    Ok(output) => match output.into_outcome() {
                        Ok(()) => TaskEnd::Finished,
                        Err(e) => TaskEnd::Failed(e),
                    },
                    Err(panic) => TaskEnd::Panicked(panic_message(panic.as_ref())),
                };
                if let Some(shared) = shared.upgrade() {
                    shared.finish(id, end);
                }
            }
            .instrument(tracing::Span::current()),
        );
        // The task may have ended already (it waits for this lock to record
        // that, so it cannot have): keep its handle for the deadline.
        if let Some(running) = state.running.get_mut(&id) {
            running.handle = Some(handle);
        }
        true
    }

    /// Raises the stop signal, waits up to `deadline` for every task to
    /// return, cancels the ones still running (recorded as
    /// [`TaskEnd::Cancelled`]), refuses new tasks from then on, and returns
    /// the record. Calling it again returns the record at once.
    pub async fn shutdown(&self, deadline: Duration) -> Record {
        self.shared.stop.send_replace(true);
        let mut running = self.shared.running.subscribe();
        // An error would mean the sender is gone, but `self` holds it.
        let _ = tokio::time::timeout(deadline, running.wait_for(|n| *n == 0)).await;
        let left: Vec<(&'static str, JoinHandle<()>)> = {
            let mut state = self.shared.lock();
            state.closed = true;
            let left = std::mem::take(&mut state.running);
            self.shared.running.send_replace(0);
            let mut handles = Vec::new();
            for task in left.into_values() {
                state.push(TaskRecord {
                    name: task.name,
                    end: TaskEnd::Cancelled,
                    after_stop: true,
                });
                if let Some(handle) = task.handle {
                    handle.abort();
                    handles.push((task.name, handle));
                }
            }
            handles
        };
        for (name, _) in &left {
            tracing::warn!(task = name, "task still running after {deadline:?}; cancelled");
        }
        // Wait for the cancelled tasks to be dropped, so nothing of theirs
        // outlives the node; a task blocked inside a poll cannot be.
        let handles = left.into_iter().map(|(_, h)| h);
        if tokio::time::timeout(CANCEL_GRACE, futures::future::join_all(handles))
            .await
            .is_err()
        {
            tracing::warn!("a cancelled task is blocked and cannot be stopped");
        }
        self.record()
    }

    /// A snapshot of what this supervisor has run.
    pub fn record(&self) -> Record {
        let state = self.shared.lock();
        Record {
            spawned: state.spawned.clone(),
            ended: state.ended.clone(),
            transient_finished: state.transient_finished.clone(),
            unrecorded: state.unrecorded,
            running: state.running.values().map(|t| t.name).collect(),
            shut_down: state.closed,
        }
    }
}

/// Resolves once the stop signal behind `rx` is raised (or its supervisor is
/// gone, which also means stop).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Exponential backoff that gives up waiting when the stop signal rises:
/// the one retry pause of the node's loops (by default it starts at 200 ms
/// and doubles up to 5 s).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    first: std::time::Duration,
    next: std::time::Duration,
    max: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(std::time::Duration::from_millis(200), std::time::Duration::from_secs(5))
    }
}

impl Backoff {
    /// Pauses from `first`, doubling up to `max`.
    pub fn new(first: std::time::Duration, max: std::time::Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }

    /// The next pause, doubling the one after it.
    pub fn next_pause(&mut self) -> std::time::Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    /// Starts again from the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Waits out the next pause; false when `stop` rose meanwhile (the caller
    /// returns).
    pub async fn wait(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let pause = self.next_pause();
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = stopped(stop) => false,
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_task_ends_in_the_record_with_how_it_ended() {
        let supervisor = Supervisor::new();
        let (ran_tx, ran_rx) = tokio::sync::oneshot::channel();
        assert!(supervisor.spawn("finishes", async move {
            let _ = ran_tx.send(());
        }));
        assert!(supervisor.spawn("fails", async { Err::<(), _>(anyhow::anyhow!("boom")) }));
        assert!(supervisor.spawn("panics", async {
            if true {
                panic!("on purpose");
            }
        }));
        let mut stop = supervisor.stop_signal();
        assert!(supervisor.spawn("waits", async move { stopped(&mut stop).await }));
        for _ in 0..3 {
            let mut stop = supervisor.stop_signal();
            assert!(supervisor.spawn_transient("watch", async move { stopped(&mut stop).await }));
        }
        let _ = ran_rx.await;

        let record = supervisor.shutdown(Duration::from_secs(30)).await;
        assert!(record.shut_down);
        assert!(record.running.is_empty(), "{record:?}");
        let end = |name: &str| record.ended.iter().find(|t| t.name == name).map(|t| t.end.clone());
        assert_eq!(end("finishes"), Some(TaskEnd::Finished));
        assert_eq!(end("fails"), Some(TaskEnd::Failed("boom".into())));
        assert_eq!(end("panics"), Some(TaskEnd::Panicked("on purpose".into())));
        assert_eq!(end("waits"), Some(TaskEnd::Finished));
        assert!(record.ended.iter().any(|t| t.name == "waits" && t.after_stop));
        assert_eq!(end("watch"), None, "finished transient tasks are only counted");
        assert_eq!(record.transient_finished.get("watch"), Some(&3));
        assert_eq!(record.spawned.get("watch"), Some(&3));
        assert_eq!(record.problems().len(), 2);
        assert!(!record.all_joined_cleanly());

        assert!(
            !supervisor.spawn("late", async {}),
            "a shut-down supervisor refuses tasks"
        );
        assert_eq!(supervisor.record().spawned.get("late"), None);
    }

    #[tokio::test]
    async fn a_task_that_ignores_the_stop_signal_is_cancelled_at_the_deadline() {
        let supervisor = Supervisor::new();
        let mut stop = supervisor.stop_signal();
        assert!(supervisor.spawn("obeys", async move { stopped(&mut stop).await }));
        assert!(supervisor.spawn("ignores", std::future::pending::<()>()));
        let record = supervisor.shutdown(Duration::from_millis(100)).await;
        assert!(record.running.is_empty());
        let ignored: Vec<_> = record.ended.iter().filter(|t| t.name == "ignores").collect();
        assert_eq!(ignored.len(), 1);
        assert_eq!(ignored[0].end, TaskEnd::Cancelled);
        assert!(
            record
                .ended
                .iter()
                .any(|t| t.name == "obeys" && t.end == TaskEnd::Finished)
        );
        assert!(!record.all_joined_cleanly());
        // A second shutdown changes nothing.
        assert_eq!(supervisor.shutdown(Duration::from_millis(1)).await, record);
    }

    #[tokio::test]
    async fn dropping_the_supervisor_stops_its_tasks() {
        let supervisor = Supervisor::new();
        let mut stop = supervisor.stop_signal();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        assert!(supervisor.spawn("waits", async move {
            stopped(&mut stop).await;
            let _ = done_tx.send(());
        }));
        drop(supervisor);
        assert!(done_rx.await.is_ok());
    }
}
