//! How agent processes start.
//!
//! Every process gets: an environment holding only `PATH`, `HOME` (its
//! working directory) and `CELL0_AGENT`/`CELL0_INCARNATION`; its own working
//! directory `ROOT/<agent>/<incarnation>`; when the node runs as root, the
//! unprivileged user `nobody` (uid and gid 65534), which cannot read the
//! node's data dir (kept 0700; only the agents' root is traversable);
//! rlimits for CPU seconds, data memory, open files and (as `nobody`)
//! processes; a process group of its own; SIGKILL when the node dies
//! (`PR_SET_PDEATHSIG`); and its memory limit: where `/sys/fs/cgroup/memory`
//! is writable, a memory cgroup (a child joins it right after it starts, and
//! the kernel counts when the limit was hit), else an rlimit on data.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::process::{Pid, Resource, Rlimit, Signal};

/// Open files a sandboxed process may hold.
pub const MAX_OPEN_FILES: u64 = 256;
/// Processes the unprivileged user may run (set only when the node runs as
/// root, since the limit counts every process of the user).
pub const MAX_PROCESSES: u64 = 256;
/// The user and group agent processes run as when the node runs as root.
pub const UNPRIVILEGED_ID: u32 = 65534;
const CGROUP_MEMORY: &str = "/sys/fs/cgroup/memory";
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What one sandboxed process may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory, in MB (rlimit on data, and the cgroup's limit).
    pub memory_mb: u64,
    /// CPU time, in seconds (SIGXCPU past it); 0 for no limit.
    pub cpu_seconds: u64,
}

/// The sandbox of one node's agents.
#[derive(Debug)]
pub struct Sandbox {
    root: PathBuf,
    unprivileged: bool,
    cgroups: Option<PathBuf>,
}

/// Numbers the memory groups of every sandbox in the process (several
/// nodes may share one process, and so the `cell0-<pid>` group).
static NEXT_GROUP: AtomicU64 = AtomicU64::new(0);

impl Sandbox {
    /// A sandbox whose working directories live under `root` (created,
    /// traversable but not listable by others).
    pub fn new(root: &Path) -> io::Result<Sandbox> {
        std::fs::create_dir_all(root)?;
        let unprivileged = rustix::process::geteuid().is_root();
        if unprivileged {
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
        }
        sweep_stale_groups(Path::new(CGROUP_MEMORY));
        let cgroups = Path::new(CGROUP_MEMORY).join(format!("cell0-{}", std::process::id()));
        let cgroups = std::fs::create_dir_all(&cgroups).ok().map(|()| cgroups);
        Ok(Sandbox {
            root: root.to_path_buf(),
            unprivileged,
            cgroups,
        })
    }

    /// Whether processes run as the unprivileged user.
    pub fn is_unprivileged(&self) -> bool {
        self.unprivileged
    }

    /// The working directory of `agent`'s `incarnation`, created (owned by
    /// the unprivileged user when there is one).
    pub fn workdir(&self, agent: &str, incarnation: u64) -> io::Result<PathBuf> {
        let agent_dir = self.root.join(agent);
        let dir = agent_dir.join(incarnation.to_string());
        std::fs::create_dir_all(&dir)?;
        if self.unprivileged {
            std::fs::set_permissions(&agent_dir, std::fs::Permissions::from_mode(0o711))?;
            std::os::unix::fs::chown(&dir, Some(UNPRIVILEGED_ID), Some(UNPRIVILEGED_ID))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(dir)
    }

    /// Removes the working directories of `agent`'s incarnations other
    /// than `keep`.
    pub fn remove_workdirs(&self, agent: &str, keep: Option<u64>) {
        let Ok(entries) = std::fs::read_dir(self.root.join(agent)) else {
            return;
        };
        for entry in entries.flatten() {
            if keep.is_some_and(|k| entry.file_name().to_str() == Some(&k.to_string())) {
                continue;
            }
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }

    /// A command for `argv` in `workdir` under `limits`, in the sandbox.
    /// Memory is limited by `group` when there is one (the kernel then says
    /// when the limit was hit), by an rlimit on data otherwise.
    pub fn command(
        &self,
        argv: &[String],
        workdir: &Path,
        agent: &str,
        incarnation: u64,
        limits: Limits,
        group: Option<&MemoryGroup>,
    ) -> tokio::process::Command {
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", workdir)
            .env("CELL0_AGENT", agent)
            .env("CELL0_INCARNATION", incarnation.to_string())
            .current_dir(workdir)
            .process_group(0);
        if self.unprivileged {
            // std also drops the supplementary groups when root sets a uid.
            cmd.uid(UNPRIVILEGED_ID).gid(UNPRIVILEGED_ID);
        }
        let unprivileged = self.unprivileged;
        let memory = group.is_none().then(|| limits.memory_mb.saturating_mul(1024 * 1024));
        let cpu = limits.cpu_seconds;
        // SAFETY: the closure runs between fork and exec and makes only
        // raw system calls (rustix), which are async-signal-safe; it
        // allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
                let limit = |v: u64| Rlimit {
                    current: Some(v),
                    maximum: Some(v),
                };
                if let Some(memory) = memory {
                    rustix::process::setrlimit(Resource::Data, limit(memory))?;
                }
                rustix::process::setrlimit(Resource::Nofile, limit(MAX_OPEN_FILES))?;
                if cpu > 0 {
                    // SIGXCPU at the soft limit, SIGKILL a second later.
                    rustix::process::setrlimit(
                        Resource::Cpu,
                        Rlimit {
                            current: Some(cpu),
                            maximum: Some(cpu + 1),
                        },
                    )?;
                }
                if unprivileged {
                    rustix::process::setrlimit(Resource::Nproc, limit(MAX_PROCESSES))?;
                }
                Ok(())
            });
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        cmd
    }

    /// A memory cgroup for one process with `limits`, where the machine
    /// has cgroup v1 memory (None otherwise).
    pub fn memory_group(&self, limits: Limits) -> Option<MemoryGroup> {
        let root = self.cgroups.as_ref()?;
        let n = NEXT_GROUP.fetch_add(1, Ordering::Relaxed);
        let dir = root.join(n.to_string());
        std::fs::create_dir(&dir).ok()?;
        let bytes = limits.memory_mb.saturating_mul(1024 * 1024);
        if std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string()).is_err() {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(MemoryGroup { dir })
    }
}

/// Removes the `cell0-<pid>` memory groups under `root` whose process is
/// gone (a node killed with SIGKILL cannot remove its own). A group that
/// still holds a process cannot be removed and stays; so does one whose
/// pid runs again.
fn sweep_stale_groups(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("cell0-")) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let dir = entry.path();
        if let Ok(groups) = std::fs::read_dir(&dir) {
            for group in groups.flatten() {
                if group.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(group.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(dir) = &self.cgroups {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A cgroup v1 memory group, removed on drop.
#[derive(Debug)]
pub struct MemoryGroup {
    dir: PathBuf,
}

impl MemoryGroup {
    /// Moves process `pid` into the group.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }

    /// Whether a process of the group hit the limit.
    pub fn hit_limit(&self) -> bool {
        std::fs::read_to_string(self.dir.join("memory.failcnt"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    }
}

impl Drop for MemoryGroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Kills process group `pgid` with `signal` (gone already is fine).
pub fn kill_group(pgid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// Kills a process group with SIGKILL when dropped: whatever ends a task or
/// an incarnation (completion, timeout, cancellation), nothing of it stays.
#[derive(Debug)]
pub struct GroupGuard(pub u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0, Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn groups_of_processes_that_are_gone_are_swept_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        // A pid that just ended.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = root.path().join(format!("cell0-{dead}"));
        std::fs::create_dir_all(stale.join("0")).unwrap();
        std::fs::create_dir_all(stale.join("7")).unwrap();
        let live = root.path().join(format!("cell0-{}", std::process::id()));
        std::fs::create_dir_all(live.join("0")).unwrap();
        let other = root.path().join("system.slice");
        std::fs::create_dir(&other).unwrap();
        sweep_stale_groups(root.path());
        assert!(!stale.exists(), "the dead process's groups are gone");
        assert!(live.join("0").exists(), "a live process keeps its groups");
        assert!(other.exists(), "other groups are not ours");
    }
}
