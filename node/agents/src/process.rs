//! The `process` driver: a supervised long-running process.
//!
//! The process is restarted by its restart policy with exponential backoff
//! (from [`MIN_BACKOFF`] to [`MAX_BACKOFF`], reset once it ran
//! [`STABLE_AFTER`]). A stop sends SIGTERM to its process group, waits the
//! grace period, then SIGKILLs the group.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rustix::process::Signal;
use tokio::sync::watch;

use crate::sandbox::{GroupGuard, Limits, Sandbox, kill_group};

/// First wait before a restart.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before a restart.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A process that ran this long resets the backoff and the failure count.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// When an ended process starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Never.
    Never,
    /// After a failure, up to this many times in a row.
    OnFailure(u32),
    /// Always.
    Always,
}

/// How a supervised process ended for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Stopped on request.
    Stopped,
    /// Exited successfully and the policy does not restart it.
    Completed,
    /// Failed and the policy gives up, with the last failure.
    Failed(String),
}

/// What to supervise.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// Program and arguments.
    pub command: &'a [String],
    /// Restart policy.
    pub restart: Restart,
    /// Between SIGTERM and SIGKILL on stop.
    pub grace: Duration,
    /// Memory limit (no CPU limit: it runs indefinitely).
    pub limits: Limits,
}

/// Runs `spec` until `stop` rises or the restart policy gives up.
/// `on_start` is called each time the process has started.
pub async fn supervise(
    sandbox: &Sandbox,
    workdir: &Path,
    agent: &str,
    incarnation: u64,
    spec: Spec<'_>,
    mut on_start: impl FnMut(),
    mut stop: watch::Receiver<bool>,
) -> End {
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        let group = sandbox.memory_group(spec.limits);
        let spawned = sandbox
            .command(spec.command, workdir, agent, incarnation, spec.limits, group.as_ref())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let failure = match spawned {
            Err(e) => format!("cannot start {:?}: {e}", spec.command[0]),
            Ok(mut child) => {
                let Some(pid) = child.id() else {
                    return End::Failed("the process exited before it could be watched".into());
                };
                let guard = GroupGuard(pid);
                if let Some(g) = &group {
                    let _ = g.add(pid);
                }
                on_start();
                let started = tokio::time::Instant::now();
                tokio::select! {
                    status = child.wait() => {
                        if started.elapsed() >= STABLE_AFTER {
                            failures = 0;
                            backoff = MIN_BACKOFF;
                        }
                        match status {
                            Ok(s) if s.success() => {
                                if spec.restart != Restart::Always {
                                    return End::Completed;
                                }
                                String::new()
                            }
                            Ok(s) => match s.signal() {
                                Some(sig) => format!("killed by signal {sig}"),
                                None => format!("exited with status {}", s.code().unwrap_or(-1)),
                            },
                            Err(e) => format!("cannot wait for the process: {e}"),
                        }
                    }
                    () = stopped(&mut stop) => {
                        kill_group(pid, Signal::TERM);
                        if tokio::time::timeout(spec.grace, child.wait()).await.is_err() {
                            tracing::info!(agent, incarnation, "process ignored SIGTERM; killing it");
                        }
                        drop(guard);
                        let _ = child.wait().await;
                        return End::Stopped;
                    }
                }
            }
        };
        if !failure.is_empty() {
            failures += 1;
            match spec.restart {
                Restart::Never => return End::Failed(failure),
                Restart::OnFailure(max) if failures > max => return End::Failed(failure),
                _ => tracing::info!(agent, incarnation, %failure, "agent process failed; restarting"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut stop) => return End::Stopped,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(command: &[String], restart: Restart) -> Spec<'_> {
        Spec {
            command,
            restart,
            grace: Duration::from_millis(200),
            limits: Limits {
                memory_mb: 256,
                cpu_seconds: 0,
            },
        }
    }

    #[tokio::test]
    async fn a_failing_process_is_restarted_until_the_policy_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
        let sandbox = Sandbox::new(&dir.path().join("agents")).unwrap();
        let workdir = sandbox.workdir("p", 1).unwrap();
        let cmd = vec!["/bin/sh".to_string(), "-c".into(), "exit 4".into()];
        let (_tx, rx) = watch::channel(false);
        let mut starts = 0;
        let end = supervise(
            &sandbox,
            &workdir,
            "p",
            1,
            spec(&cmd, Restart::OnFailure(2)),
            || starts += 1,
            rx,
        )
        .await;
        assert_eq!(end, End::Failed("exited with status 4".into()));
        assert_eq!(starts, 3);
    }

    #[tokio::test]
    async fn a_stop_terms_then_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
        let sandbox = Sandbox::new(&dir.path().join("agents")).unwrap();
        let workdir = sandbox.workdir("p", 1).unwrap();
        // Ignores SIGTERM: only the SIGKILL after the grace period ends it.
        let cmd = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            "trap '' TERM; touch up; sleep 60 & wait".into(),
        ];
        let (tx, rx) = watch::channel(false);
        let up = workdir.join("up");
        let stopper = async {
            let end = tokio::time::Instant::now() + Duration::from_secs(30);
            while !up.exists() {
                assert!(tokio::time::Instant::now() < end, "the process never started");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tx.send(true).unwrap();
        };
        let (end, ()) = tokio::join!(
            supervise(&sandbox, &workdir, "p", 1, spec(&cmd, Restart::Always), || {}, rx),
            stopper
        );
        assert_eq!(end, End::Stopped);
    }
}
