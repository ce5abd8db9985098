//! A named background task of one member: it sees a stop signal and is
//! joined with a deadline when the member shuts down. The node's supervisor
//! owns the node's loops; these are the ones inside consensus (group commit,
//! read-index rounds), stopped and joined by `Consensus::shutdown`.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A spawned task with its stop signal.
pub(crate) struct NamedTask {
    name: &'static str,
    stop: watch::Sender<bool>,
    handle: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl NamedTask {
    /// Spawns `run`, handing it the receiver of the stop signal.
    pub(crate) fn spawn<F, Fut>(name: &'static str, run: F) -> Self
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        let handle = tokio::spawn(run(stopped));
        Self {
            name,
            stop,
            handle: std::sync::Mutex::new(Some(handle)),
        }
    }

    /// Signals the task to stop.
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Whether [`NamedTask::stop`] was called.
    pub(crate) fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits up to `deadline` for the task to end; one that panicked or
    /// overran is logged and counted in `cell0_task_failures_total{task}`.
    pub(crate) async fn join(&self, deadline: Duration) {
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut handle) = handle else { return };
        let failure = match tokio::time::timeout(deadline, &mut handle).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => {
                handle.abort();
                format!("still running after {} ms", deadline.as_millis())
            }
        };
        tracing::error!(task = self.name, error = %failure, "background task failed");
        metrics::counter!("cell0_task_failures_total", "task" => self.name).increment(1);
    }
}

/// Resolves once `stop` is signalled (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
