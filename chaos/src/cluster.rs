//! A cluster of real `cell0` processes for fault injection: started on
//! loopback (each node on an address of its own), or, with a [`Lab`], each
//! in its own network namespace so that links between nodes can be cut.
//!
//! Without a lab, a [`Proxy`] can stand in front of every node's internal
//! port (each node advertises its proxy's address), so that links can be
//! slowed, cut one way and reset without root. Nodes can run under
//! libfaketime, so that their wall clocks can be skewed one by one, and on
//! a tmpfs data dir of their own (root), so that their disks can be filled.
//!
//! Invariants: every process the cluster started is killed and reaped on
//! drop, also after a panic, before its proxy stops and its tmpfs mounts
//! go; a paused process is resumed before it is killed; node `0`
//! bootstraps on its first start, and every other start joins through all
//! the other nodes (so a node that left is added again).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::{RaftRole, StatusRequest};

use crate::lab::Lab;
use crate::proxy::{Proxy, ProxyError, Route};

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
    /// The fault proxy.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A tmpfs could not be mounted, or a disk filled or freed.
    #[error("{what}: {detail}")]
    Disk {
        /// What was done.
        what: String,
        /// Why it failed.
        detail: String,
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
/// The port of a node's fault proxy, on the node's address.
const PROXY: u16 = 7111;

/// The file that fills a node's disk ([`Cluster::fill_disk`]).
const FILLER: &str = "chaos-filler";

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
    /// Its tmpfs data dir is mounted.
    mounted: bool,
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
    /// Put a fault proxy in front of every node's internal port (not with
    /// a lab); [`Cluster::proxy`].
    pub proxy: bool,
    /// Run every node under this libfaketime library, so that its clock
    /// can be skewed ([`Cluster::skew_clock`]).
    pub faketime: Option<PathBuf>,
    /// Give every node a tmpfs data dir of this many bytes (needs root),
    /// so that its disk can be filled ([`Cluster::fill_disk`]).
    pub disk_bytes: Option<u64>,
}

impl ClusterOptions {
    /// Nodes of `bin` with their files under `dir`, no extra environment
    /// and no fault machinery.
    pub fn new(bin: PathBuf, dir: PathBuf) -> Self {
        Self {
            bin,
            dir,
            env: Vec::new(),
            proxy: false,
            faketime: None,
            disk_bytes: None,
        }
    }
}

/// Where libfaketime is on Debian (`scripts/setup.sh` installs it).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The cluster.
pub struct Cluster {
    options: ClusterOptions,
    nodes: Vec<NodeProcess>,
    proxy: Option<Proxy>,
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
                    mounted: false,
                }
            })
            .collect();
        let mut cluster = Cluster {
            options,
            nodes,
            proxy: None,
        };
        if cluster.options.proxy && lab.is_none() {
            let routes: Vec<Route> = cluster
                .nodes
                .iter()
                .map(|node| Route {
                    listen: SocketAddr::from((node.ip, PROXY)),
                    upstream: SocketAddr::from((node.ip, INTERNAL)),
                    source: node.ip.into(),
                })
                .collect();
            cluster.proxy = Some(Proxy::start(&routes, u64::from(pid))?);
        }
        for i in 0..n {
            cluster.prepare(i)?;
        }
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

    /// The fault proxy in front of the nodes' internal ports, if the
    /// cluster has one.
    pub fn proxy(&self) -> Option<&Proxy> {
        self.proxy.as_ref()
    }

    /// Makes node `i`'s data dir (a tmpfs when asked) and its clock file.
    fn prepare(&mut self, i: usize) -> Result<(), ClusterError> {
        let dir = self.nodes[i].dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| ClusterError::Process {
            what: format!("making {}", dir.display()),
            source,
        })?;
        if let Some(bytes) = self.options.disk_bytes {
            let size = format!("size={bytes}");
            run_tool(
                "mount",
                &["-t", "tmpfs", "-o", &size, "tmpfs", &dir.display().to_string()],
            )?;
            self.nodes[i].mounted = true;
        }
        if self.options.faketime.is_some() {
            self.skew_clock(i, 0)?;
        }
        Ok(())
    }

    fn clock_file(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.with_extension("faketime")
    }

    /// Sets node `i`'s wall clock `offset_s` seconds off the real one
    /// (libfaketime reads the file again within a second); its monotonic
    /// clock is left alone.
    pub fn skew_clock(&self, i: usize, offset_s: i64) -> Result<(), ClusterError> {
        let file = self.clock_file(i);
        std::fs::write(&file, format!("{offset_s:+}\n")).map_err(|source| ClusterError::Process {
            what: format!("writing {}", file.display()),
            source,
        })
    }

    /// Fills node `i`'s tmpfs data dir until no byte is left; how many
    /// bytes it wrote.
    pub fn fill_disk(&self, i: usize) -> Result<u64, ClusterError> {
        let path = self.nodes[i].dir.join(FILLER);
        let disk_error = |detail: String| ClusterError::Disk {
            what: format!("filling {}", path.display()),
            detail,
        };
        if !self.nodes[i].mounted {
            return Err(disk_error(
                "the node has no tmpfs of its own (ClusterOptions::disk_bytes)".into(),
            ));
        }
        let mut file = std::fs::File::create(&path).map_err(|e| disk_error(e.to_string()))?;
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(disk_error(e.to_string())),
            }
        }
        Ok(written)
    }

    /// Frees what [`Cluster::fill_disk`] took.
    pub fn free_disk(&self, i: usize) -> Result<(), ClusterError> {
        let path = self.nodes[i].dir.join(FILLER);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ClusterError::Disk {
                what: format!("removing {}", path.display()),
                detail: e.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Whether node `i`'s process is still running (it may have exited on
    /// its own, e.g. on a full disk).
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
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
        if self.proxy.is_some() {
            command.args(["--advertise-internal", &format!("{ip}:{PROXY}")]);
        }
        if let Some(lib) = &self.options.faketime {
            command
                .env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", self.clock_file(i))
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_DONT_RESET", "1");
        }
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

/// A channel to `endpoint` for a quick probe: 500 ms to connect, 1 s per
/// call; `None` when it cannot connect.
pub(crate) async fn probe_channel(endpoint: &str) -> Option<tonic::transport::Channel> {
    tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()
}

async fn status(endpoint: &str) -> Option<cell0_proto::v1::StatusResponse> {
    let channel = probe_channel(endpoint).await?;
    ClusterClient::new(channel)
        .status(StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Runs `program` with `args`; its error output when it fails.
fn run_tool(program: &str, args: &[&str]) -> Result<(), ClusterError> {
    let what = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| ClusterError::Disk {
            what: what.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Disk {
            what,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.kill(i);
        }
        self.proxy = None;
        for node in &self.nodes {
            if node.mounted {
                let _ = run_tool("umount", &["-l", &node.dir.display().to_string()]);
            }
        }
    }
}
