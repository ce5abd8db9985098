//! The `exec` driver: one sandboxed command per task, the task's input on
//! stdin, its output from stdout.
//!
//! A task fails, with a reason a person can act on, when the command exits
//! non-zero (with the end of its stderr), is killed by a signal, runs past
//! its wall-clock timeout, exceeds its CPU time (SIGXCPU) or memory, or
//! writes more than `max_output_bytes`. However it ends, its whole process
//! group is killed.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sandbox::{GroupGuard, Limits, Sandbox};

/// The end of stderr kept for a failure's reason, in bytes.
const STDERR_TAIL_BYTES: usize = 1024;

/// One task for an `exec` agent.
#[derive(Debug, Clone)]
pub struct Task<'a> {
    /// Program and arguments.
    pub command: &'a [String],
    /// What goes to stdin.
    pub input: &'a [u8],
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Output kept; more fails the task.
    pub max_output_bytes: u64,
    /// Memory and CPU limits.
    pub limits: Limits,
}

/// Runs `task` in `workdir` for `agent`'s `incarnation`: its stdout, or why
/// it failed.
pub async fn run(
    sandbox: &Sandbox,
    workdir: &Path,
    agent: &str,
    incarnation: u64,
    task: Task<'_>,
) -> Result<Vec<u8>, String> {
    let group = sandbox.memory_group(task.limits);
    let mut child = sandbox
        .command(task.command, workdir, agent, incarnation, task.limits, group.as_ref())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", task.command[0]))?;
    let pid = child.id().ok_or("the task exited before it could be watched")?;
    let _guard = GroupGuard(pid);
    if let Some(group) = &group
        && let Err(e) = group.add(pid)
    {
        tracing::debug!(error = %e, "cannot move a task into its memory cgroup");
    }
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err("the task's pipes are missing".into());
    };
    let input = task.input.to_vec();
    let feed = async move {
        // A command that does not read its input is not an error.
        let _ = stdin.write_all(&input).await;
        drop(stdin);
    };
    let limit = task.max_output_bytes;
    let collect = async move {
        let mut out = Vec::new();
        stdout.take(limit + 1).read_to_end(&mut out).await.map(|_| out)
    };
    let tail = async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        let start = buf.len().saturating_sub(STDERR_TAIL_BYTES);
        String::from_utf8_lossy(&buf[start..]).trim().to_string()
    };
    let work = async {
        let ((), out, err) = tokio::join!(feed, collect, tail);
        (out, err)
    };
    let Ok((out, err)) = tokio::time::timeout(task.timeout, work).await else {
        return Err(format!("timed out after {} ms", task.timeout.as_millis()));
    };
    let out = out.map_err(|e| format!("cannot read the task's output: {e}"))?;
    if out.len() as u64 > limit {
        return Err(format!("wrote more than {limit} bytes of output"));
    }
    let status = match tokio::time::timeout(task.timeout, child.wait()).await {
        Ok(status) => status.map_err(|e| format!("cannot wait for the task: {e}"))?,
        Err(_) => return Err(format!("timed out after {} ms", task.timeout.as_millis())),
    };
    if group.as_ref().is_some_and(|g| g.hit_limit()) && !status.success() {
        return Err(format!("exceeded its memory limit of {} MB", task.limits.memory_mb));
    }
    if let Some(signal) = status.signal() {
        if signal == Signal::XCPU.as_raw()
            || (signal == Signal::KILL.as_raw() && task.limits.cpu_seconds > 0 && err.is_empty())
        {
            return Err(format!("exceeded its CPU time limit of {} s", task.limits.cpu_seconds));
        }
        if group.is_none()
            && [Signal::SEGV, Signal::ABORT, Signal::BUS]
                .iter()
                .any(|s| s.as_raw() == signal)
        {
            // Without a cgroup, a failed allocation under the data rlimit
            // usually ends this way.
            return Err(format!(
                "killed by signal {signal} (its memory limit is {} MB)",
                task.limits.memory_mb
            ));
        }
        return Err(format!("killed by signal {signal}"));
    }
    if !status.success() {
        let code = status.code().unwrap_or(-1);
        return Err(if err.is_empty() {
            format!("exited with status {code}")
        } else {
            format!("exited with status {code}: {err}")
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn task<'a>(command: &'a [String], input: &'a [u8], timeout_ms: u64, memory_mb: u64) -> Task<'a> {
        Task {
            command,
            input,
            timeout: Duration::from_millis(timeout_ms),
            max_output_bytes: 1024,
            limits: Limits {
                memory_mb,
                cpu_seconds: 10,
            },
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    async fn run_in(dir: &Path, command: &[String], t: Task<'_>) -> Result<Vec<u8>, String> {
        // Like a node's data dir: others may traverse it, not list it.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
        let sandbox = Sandbox::new(&dir.join("agents")).unwrap();
        let workdir = sandbox.workdir("a", 1).unwrap();
        run(&sandbox, &workdir, "a", 1, Task { command, ..t }).await
    }

    #[tokio::test]
    async fn input_goes_to_stdin_and_output_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = sh("tr a-z A-Z");
        let out = run_in(dir.path(), &cmd, task(&cmd, b"hello", 10_000, 256))
            .await
            .unwrap();
        assert_eq!(out, b"HELLO");
    }

    #[tokio::test]
    async fn the_environment_is_cleared() {
        // SAFETY: no other thread of this test binary reads the variable.
        unsafe { std::env::set_var("CELL0_SECRET_FOR_TEST", "leak") };
        let dir = tempfile::tempdir().unwrap();
        let cmd = sh("env");
        let out = run_in(dir.path(), &cmd, task(&cmd, b"", 10_000, 256)).await.unwrap();
        let env = String::from_utf8(out).unwrap();
        assert!(!env.contains("CELL0_SECRET_FOR_TEST"), "{env}");
        assert!(env.contains("CELL0_AGENT=a"), "{env}");
    }

    #[tokio::test]
    async fn a_task_past_its_timeout_fails_and_its_group_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("agents/a/1/late");
        let cmd = sh("(sleep 2; touch late) & sleep 30");
        let err = run_in(dir.path(), &cmd, task(&cmd, b"", 300, 256)).await.unwrap_err();
        assert!(err.contains("timed out after 300 ms"), "{err}");
        // The background child was in the group: it never gets to write.
        let cmd = sh("sleep 3");
        let _ = run_in(dir.path(), &cmd, task(&cmd, b"", 10_000, 256)).await;
        assert!(!marker.exists(), "a child of a timed-out task outlived it");
    }

    #[tokio::test]
    async fn a_task_over_its_memory_fails_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = sh("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo done");
        let err = run_in(dir.path(), &cmd, task(&cmd, b"", 60_000, 32)).await.unwrap_err();
        assert!(
            err.contains("memory") || err.contains("allocate") || err.contains("space"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn too_much_output_and_a_failing_command_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = sh("head -c 5000 /dev/zero");
        let err = run_in(dir.path(), &cmd, task(&cmd, b"", 10_000, 256))
            .await
            .unwrap_err();
        assert!(err.contains("more than 1024 bytes"), "{err}");
        let cmd = sh("echo broken >&2; exit 3");
        let err = run_in(dir.path(), &cmd, task(&cmd, b"", 10_000, 256))
            .await
            .unwrap_err();
        assert_eq!(err, "exited with status 3: broken");
    }

    #[tokio::test]
    async fn as_root_a_task_cannot_read_the_nodes_files() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("raft");
        std::fs::create_dir(&secret).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        std::fs::write(secret.join("log"), "secret").unwrap();
        let cmd = sh(&format!("cat {}/log", secret.display()));
        let err = run_in(dir.path(), &cmd, task(&cmd, b"", 10_000, 256))
            .await
            .unwrap_err();
        assert!(err.contains("Permission denied"), "{err}");
    }
}
