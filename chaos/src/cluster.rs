//! A cluster of real `cell0` processes for fault injection: started on
//! loopback (each node on an address of its own), or, with a [`Lab`], each
//! in its own network namespace so that links between nodes can be cut.
//!
//! Invariants: every process the cluster started is killed and reaped on
//! drop, also after a panic; a paused process is resumed before it is
//! killed; node `0` bootstraps on its first start, and every other start
//! joins through all the other nodes (so a node that left is added again).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::{RaftRole, StatusRequest};

use crate::lab::Lab;

/// What can go wrong running the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A process could not be started or signalled.
    #[error("{what}")]
    Process {
        /// What was done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A node was not ready in time.
    #[error("node {node} was not ready within {seconds} s; its log is {log}, ending:\n{tail}")]
    NotReady {
        /// The node.
        node: usize,
        /// How long was waited.
        seconds: u64,
        /// Its log file.
        log: String,
        /// The last lines of its log.
        tail: String,
    },
}

/// Public, internal and HTTP ports of every node (each node has its own
/// address).
const PUBLIC: u16 = 7100;
const INTERNAL: u16 = 7101;
const HTTP: u16 = 7103;

/// Lines of a node's log an error about it shows.
const LOG_TAIL_LINES: usize = 30;

/// How long a graceful leave may take.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// One node process.
struct NodeProcess {
    ip: Ipv4Addr,
    dir: PathBuf,
    wrapper: Vec<String>,
    child: Option<Child>,
    paused: bool,
    /// Started before: it joins (or rejoins) instead of bootstrapping.
    started: bool,
}

/// How the cluster's nodes run.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `cell0` binary.
    pub bin: PathBuf,
    /// Where the nodes' data dirs and logs go.
    pub dir: PathBuf,
    /// Extra environment of every node (e.g. failpoints).
    pub env: Vec<(String, String)>,
}

/// The cluster.
pub struct Cluster {
    options: ClusterOptions,
    nodes: Vec<NodeProcess>,
}

impl Cluster {
    /// Starts `n` nodes (in `lab`'s namespaces when given) and waits until
    /// every one is ready.
    pub fn start(options: ClusterOptions, n: usize, lab: Option<&Lab>) -> Result<Cluster, ClusterError> {
        std::fs::create_dir_all(&options.dir).map_err(|source| ClusterError::Process {
            what: format!("making {}", options.dir.display()),
            source,
        })?;
        let pid = std::process::id();
        let nodes = (0..n)
            .map(|i| {
                let (ip, wrapper) = match lab {
                    Some(lab) => (lab.ip(i), lab.wrapper(i)),
                    None => (Ipv4Addr::new(127, (pid >> 8) as u8, pid as u8, 2 + i as u8), Vec::new()),
                };
                NodeProcess {
                    ip,
                    dir: options.dir.join(format!("node{i}")),
                    wrapper,
                    child: None,
                    paused: false,
                    started: false,
                }
            })
            .collect();
        let mut cluster = Cluster { options, nodes };
        for i in 0..n {
            cluster.spawn(i)?;
            cluster.wait_ready(i, Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s public gRPC address.
    pub fn endpoint(&self, i: usize) -> String {
        format!("{}:{PUBLIC}", self.nodes[i].ip)
    }

    /// Node `i`'s log file.
    pub fn log(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.with_extension("log")
    }

    fn spawn(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = &self.nodes[i];
        let log_path = node.dir.with_extension("log");
        let process_error = |what: String| move |source| ClusterError::Process { what, source };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(process_error(format!("opening {}", log_path.display())))?;
        let mut command = match node.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.options.bin);
                c
            }
            None => Command::new(&self.options.bin),
        };
        let ip = node.ip;
        command
            .arg("run")
            .arg("--insecure")
            .arg("--data-dir")
            .arg(&node.dir)
            .args(["--name", &format!("node{i}")])
            .args(["--listen-public", &format!("{ip}:{PUBLIC}")])
            .args(["--listen-internal", &format!("{ip}:{INTERNAL}")])
            .args(["--listen-http", &format!("{ip}:{HTTP}")]);
        if i == 0 && !node.started {
            command.arg("--bootstrap");
        } else {
            // Every other node is a seed: a restarted node that left (or
            // was removed) asks to be added again through any of them.
            let seeds: Vec<String> = (0..self.nodes.len())
                .filter(|j| *j != i)
                .map(|j| self.endpoint(j))
                .collect();
            command.args(["--join", &seeds.join(",")]);
        }
        let child = command
            .env("CELL0_LOG_LEVEL", "info,openraft=warn")
            .envs(self.options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(process_error(format!("starting node {i}")))?;
        self.nodes[i].child = Some(child);
        self.nodes[i].paused = false;
        self.nodes[i].started = true;
        Ok(())
    }

    /// Whether node `i`'s `/ready` answers 200.
    pub fn is_ready(&self, i: usize) -> bool {
        let addr = SocketAddr::from((self.nodes[i].ip, HTTP));
        let probe = || -> std::io::Result<bool> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"))
        };
        probe().unwrap_or(false)
    }

    /// Waits until node `i` is ready, for at most `limit`.
    pub fn wait_ready(&self, i: usize, limit: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + limit;
        while !self.is_ready(i) {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.log(i)).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                return Err(ClusterError::NotReady {
                    node: i,
                    seconds: limit.as_secs(),
                    log: self.log(i).display().to_string(),
                    tail: lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn signal(&self, i: usize, signal: &str) -> Result<(), ClusterError> {
        let Some(child) = &self.nodes[i].child else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .map_err(|source| ClusterError::Process {
                what: format!("kill {signal} node {i}"),
                source,
            })?;
        if !status.success() {
            return Err(ClusterError::Process {
                what: format!("kill {signal} node {i}"),
                source: std::io::Error::other(format!("{status}")),
            });
        }
        Ok(())
    }

    /// Kills node `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) -> Result<(), ClusterError> {
        if self.nodes[i].paused {
            self.resume(i)?;
        }
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts node `i` again on its data dir (after [`Cluster::kill`]).
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        self.kill(i)?;
        self.spawn(i)
    }

    /// Stops node `i` with SIGSTOP.
    pub fn pause(&mut self, i: usize) -> Result<(), ClusterError> {
        self.signal(i, "-STOP")?;
        self.nodes[i].paused = true;
        Ok(())
    }

    /// Resumes node `i` with SIGCONT.
    pub fn resume(&mut self, i: usize) -> Result<(), ClusterError> {
        self.signal(i, "-CONT")?;
        self.nodes[i].paused = false;
        Ok(())
    }

    /// Node `i` leaves the cluster gracefully (`cell0 node leave`), within
    /// [`LEAVE_TIMEOUT`]; the CLI's error when it fails.
    pub fn leave(&self, i: usize) -> Result<(), String> {
        let mut child = Command::new(&self.options.bin)
            .args([
                "--endpoint",
                &self.endpoint(i),
                "node",
                "leave",
                "--drain-deadline",
                "10s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting cell0 node leave: {e}"))?;
        let deadline = Instant::now() + LEAVE_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    return Err(format!("{status}: {}", err.trim()));
                }
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("no answer within {LEAVE_TIMEOUT:?}"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The index of the node that node `asked` believes leads, if it
    /// answers and knows one.
    pub async fn leader(&self, asked: usize) -> Option<usize> {
        let status = status(&self.endpoint(asked)).await?;
        if status.leader_id == 0 {
            return None;
        }
        for i in 0..self.nodes.len() {
            if let Some(s) = self::status(&self.endpoint(i)).await
                && s.node_id == status.leader_id
            {
                return Some(i);
            }
        }
        None
    }

    /// The index of a node that answers as leader.
    pub async fn any_leader(&self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if let Some(s) = status(&self.endpoint(i)).await
                && s.role == RaftRole::Leader as i32
            {
                return Some(i);
            }
        }
        None
    }

    /// Where the nodes' files are.
    pub fn dir(&self) -> &Path {
        &self.options.dir
    }
}

async fn status(endpoint: &str) -> Option<cell0_proto::v1::StatusResponse> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    ClusterClient::new(channel)
        .status(StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.kill(i);
        }
    }
}
