//! A cluster of real etcd 3.4 processes on loopback, the reference that
//! `cell0-chaos failover` measures Cell0 against.
//!
//! Member *i* (from 0) is named `e<i+1>`, listens for clients on
//! `127.0.0.1:<base_port + 10(i+1)>` and for peers on the port after it,
//! exactly as `scripts/bench-vs-etcd.sh` lays etcd out, and keeps its data
//! in `<dir>/etcd<i+1>` and its log in `<dir>/etcd<i+1>.log`. The members
//! run with etcd's own defaults (100 ms heartbeat, 1 s election timeout, no
//! pre-vote in 3.4); `ETCD_*` variables of the caller's environment are
//! not passed on, since etcd reads them as flags. A restarted member finds
//! its data dir and rejoins as the member it was (etcd then ignores the
//! `--initial-cluster*` flags).
//!
//! Which member leads comes from etcd's `Maintenance/Status`
//! ([`crate::etcd`]): every member answers with its own member id and the
//! id of the leader it knows.
//!
//! Invariants: every process the cluster started is killed and reaped on
//! drop, also after a panic; a member whose process exited while the
//! cluster waits for it is reported at once, with its log, instead of
//! being waited for.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::ClusterError;
use crate::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::etcd::etcdserverpb::{StatusRequest, StatusResponse};

/// How the members run.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// The `etcd` binary (3.4).
    pub bin: PathBuf,
    /// Where the members' data dirs and logs go.
    pub dir: PathBuf,
    /// Member *i*'s client port is `base_port + 10(i+1)`, its peer port
    /// the one after.
    pub base_port: u16,
    /// How many members (3 or more, odd).
    pub members: usize,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// The running members.
pub struct EtcdCluster {
    options: EtcdOptions,
    members: Vec<Member>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Starts every member and waits (at most `limit`) until each answers
    /// `Status` and all of them know the same leader.
    pub async fn start(options: EtcdOptions, limit: Duration) -> Result<EtcdCluster, ClusterError> {
        std::fs::create_dir_all(&options.dir).map_err(|source| ClusterError::Process {
            what: format!("making {}", options.dir.display()),
            source,
        })?;
        let mut members = Vec::with_capacity(options.members);
        for i in 0..options.members {
            let client_port = u16::try_from(i + 1)
                .ok()
                .and_then(|k| k.checked_mul(10))
                .and_then(|k| options.base_port.checked_add(k))
                .and_then(|p| p.checked_add(1).map(|peer| (p, peer)));
            let Some((client_port, peer_port)) = client_port else {
                return Err(ClusterError::Process {
                    what: format!("placing etcd member {i} above port {}", options.base_port),
                    source: std::io::Error::other("the ports do not fit below 65536"),
                });
            };
            members.push(Member {
                name: format!("e{}", i + 1),
                client_port,
                peer_port,
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            options,
            members,
            initial_cluster,
        };
        // All at once: a new etcd member waits for its peers before it serves.
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_leader(limit).await?;
        Ok(cluster)
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i`'s client address, `127.0.0.1:port`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// Member `i`'s log file.
    pub fn log(&self, i: usize) -> PathBuf {
        self.options.dir.join(format!("etcd{}.log", i + 1))
    }

    /// Where the members' files are.
    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    fn spawn(&mut self, i: usize) -> Result<(), ClusterError> {
        let log_path = self.log(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| ClusterError::Process {
                what: format!("opening {}", log_path.display()),
                source,
            })?;
        let member = &self.members[i];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(&self.options.bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(&key);
            }
        }
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.options.dir.join(format!("etcd{}", i + 1)))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", "cell0-failover"])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = command.spawn().map_err(|source| ClusterError::Process {
            what: format!("starting etcd member {} ({})", member.name, self.options.bin.display()),
            source,
        })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Kills member `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data dir (after [`EtcdCluster::kill`]).
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        self.kill(i);
        self.spawn(i)
    }

    /// Member `i`'s `Status`, if it answers within a second.
    pub async fn status(&self, i: usize) -> Option<StatusResponse> {
        let channel = crate::cluster::probe_channel(&self.endpoint(i)).await?;
        MaintenanceClient::new(channel)
            .status(StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// The index of the leader when every member answers and all name the
    /// same leader, one of them.
    pub async fn agreed_leader(&self) -> Option<usize> {
        let mut ids = Vec::with_capacity(self.members.len());
        let mut leader = None;
        for i in 0..self.members.len() {
            let status = self.status(i).await?;
            if status.leader == 0 || leader.is_some_and(|l| l != status.leader) {
                return None;
            }
            leader = Some(status.leader);
            ids.push(status.header.map_or(0, |h| h.member_id));
        }
        let leader = leader?;
        ids.iter().position(|id| *id == leader)
    }

    /// Member `i`'s process exited (it was started and is gone).
    fn exited(&mut self, i: usize) -> bool {
        match self.members[i].child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits until every member answers and all agree on one leader, for
    /// at most `limit`; the leader's index.
    pub async fn wait_leader(&mut self, limit: Duration) -> Result<usize, ClusterError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(leader) = self.agreed_leader().await {
                return Ok(leader);
            }
            for i in 0..self.members.len() {
                if self.exited(i) {
                    return Err(ClusterError::Process {
                        what: format!(
                            "etcd member {} exited; its log is {}",
                            self.members[i].name,
                            self.log(i).display()
                        ),
                        source: std::io::Error::other("exited"),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Process {
                    what: format!(
                        "waiting {} s for the etcd members to agree on a leader; their logs are in {}",
                        limit.as_secs(),
                        self.options.dir.display()
                    ),
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                });
            }
            // A poll interval of the wait, not a synchronization.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
