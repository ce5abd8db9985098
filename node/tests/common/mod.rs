//! Test harness: real `cell0` processes on loopback, driven through the
//! public API and the CLI only.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use cell0_proto::v1::agents_client::AgentsClient;
use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::kv_client::KvClient;
use cell0_proto::v1::nodes_client::NodesClient;
use cell0_proto::v1::{self, StatusResponse};
use tonic::transport::Channel;

pub const DEADLINE: Duration = Duration::from_secs(60);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cell0")
}

/// Addresses of one node: a loopback address of its own with the default
/// ports. Probing for a free ephemeral port and releasing it races with every
/// other test and outgoing connection; an address unique to this process and
/// node, with ports below the ephemeral range, cannot be taken by anyone else.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub ip: Ipv4Addr,
    pub public: u16,
    pub internal: u16,
    pub http: u16,
    pub gossip: u16,
}

impl Ports {
    pub fn new() -> Self {
        static NEXT: AtomicU8 = AtomicU8::new(2);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < 255, "too many nodes in one test process");
        let pid = std::process::id();
        Ports {
            ip: Ipv4Addr::new(127, (pid >> 8) as u8, pid as u8, n),
            public: 7100,
            internal: 7101,
            http: 7103,
            gossip: 7102,
        }
    }

    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    pub fn endpoint(&self) -> String {
        self.addr(self.public)
    }
}

/// One `cell0 run` process.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub ports: Ports,
    pub child: Child,
    pub join: Option<String>,
    /// Flags every start of this node gets (a config file).
    pub extra: Vec<String>,
    /// A command the node runs under (`ip netns exec NS`), on every start.
    pub wrapper: Vec<String>,
}

impl Node {
    /// Starts a node; `join` is the endpoint of a member, or `None` to
    /// bootstrap.
    pub fn start(name: &str, dir: &Path, ports: Ports, join: Option<String>) -> Node {
        Self::start_with(name, dir, ports, join, Vec::new(), &[])
    }

    /// [`Node::start`] with `extra` flags on every start and `env` on this
    /// one only.
    pub fn start_with(
        name: &str,
        dir: &Path,
        ports: Ports,
        join: Option<String>,
        extra: Vec<String>,
        env: &[(&str, &str)],
    ) -> Node {
        let mut flags = match &join {
            Some(j) => vec!["--join".to_string(), j.clone()],
            None => vec!["--bootstrap".to_string()],
        };
        flags.extend(extra.iter().cloned());
        Node {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            ports,
            child: spawn(&[], name, dir, ports, &flags, env),
            join,
            extra,
            wrapper: Vec::new(),
        }
    }

    /// Starts a node with exactly `flags` (also on every restart) and `env`
    /// on this start; no `--bootstrap` or `--join` of its own.
    pub fn start_flags(name: &str, dir: &Path, ports: Ports, flags: Vec<String>, env: &[(&str, &str)]) -> Node {
        Self::start_wrapped(Vec::new(), name, dir, ports, flags, env)
    }

    /// [`Node::start_flags`] under `wrapper` (e.g. `ip netns exec NS`).
    pub fn start_wrapped(
        wrapper: Vec<String>,
        name: &str,
        dir: &Path,
        ports: Ports,
        flags: Vec<String>,
        env: &[(&str, &str)],
    ) -> Node {
        Node {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            ports,
            child: spawn(&wrapper, name, dir, ports, &flags, env),
            join: None,
            extra: flags,
            wrapper,
        }
    }

    /// Starts the node again on its data dir and ports, with no cluster flags.
    pub fn restart(&mut self) {
        self.restart_env(&[]);
    }

    /// [`Node::restart`] with `env` on this start.
    pub fn restart_env(&mut self, env: &[(&str, &str)]) {
        self.child = spawn(&self.wrapper, &self.name, &self.dir, self.ports, &self.extra, env);
    }

    pub fn endpoint(&self) -> String {
        self.ports.endpoint()
    }

    /// The flags of this node's `cell0 run` (what `cell0 doctor` takes).
    pub fn flags(&self) -> Vec<String> {
        run_flags(&self.name, &self.dir, self.ports, &self.extra)
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn sigterm(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        wait_exit(&mut self.child, DEADLINE)
    }

    /// HTTP status code of GET `path` on the ops port, if it answered.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(SocketAddr::from((self.ports.ip, self.ports.http)), path)
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.http_get("/ready"), Some((200, _)))
    }

    /// Waits until /ready answers 200, failing with the node's log otherwise.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        while !self.is_ready() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready in time:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }
}

/// Node `i`'s ports in `lab`, on its own address.
pub fn lab_ports(lab: &cell0_chaos::lab::Lab, i: usize) -> Ports {
    Ports {
        ip: lab.ip(i),
        public: 7100,
        internal: 7101,
        http: 7103,
        gossip: 7102,
    }
}

/// The flags `cell0 run` gets for a node (also what `cell0 doctor` takes).
pub fn run_flags(name: &str, dir: &Path, ports: Ports, extra: &[String]) -> Vec<String> {
    let mut flags = Vec::new();
    // Plaintext between nodes unless the test gives certificates.
    if !extra.iter().any(|f| f == "--tls-ca" || f == "--insecure") {
        flags.push("--insecure".to_string());
    }
    flags.extend([
        "--data-dir".to_string(),
        dir.display().to_string(),
        "--name".to_string(),
        name.to_string(),
        "--listen-public".to_string(),
        ports.addr(ports.public),
        "--listen-internal".to_string(),
        ports.addr(ports.internal),
        "--listen-http".to_string(),
        ports.addr(ports.http),
    ]);
    flags.extend(extra.iter().cloned());
    flags
}

/// Spawns `cell0 run` for a node (under `wrapper`, which must exec it in
/// the same process), its log appended to `<dir>.log`.
fn spawn(wrapper: &[String], name: &str, dir: &Path, ports: Ports, extra: &[String], env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .unwrap();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    command
        .arg("run")
        .args(run_flags(name, dir, ports, extra))
        .env("CELL0_LOG_LEVEL", "info,openraft=warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn cell0")
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "process did not exit in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((code, body))
}

/// Starts a cluster of `n` nodes: the first bootstraps, the rest join it.
pub fn start_cluster(root: &Path, n: usize) -> Vec<Node> {
    start_cluster_with(root, n, &[])
}

/// [`start_cluster`] with `extra` flags on every node.
pub fn start_cluster_with(root: &Path, n: usize, extra: &[String]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for i in 1..=n {
        let join = nodes.first().map(|f| f.endpoint());
        nodes.push(Node::start_with(
            &format!("node{i}"),
            &root.join(format!("node{i}")),
            Ports::new(),
            join,
            extra.to_vec(),
            &[],
        ));
    }
    for n in nodes.iter_mut() {
        n.wait_ready();
    }
    nodes
}

/// Polls `cond` every 50 ms until it holds, failing with `what` after
/// [`DEADLINE`].
pub async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let end = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every member the node at `endpoint` lists, gossip-only ones included.
pub async fn members(endpoint: &str) -> Vec<v1::Member> {
    ClusterClient::new(channel(endpoint).await)
        .members(v1::MembersRequest {})
        .await
        .unwrap()
        .into_inner()
        .members
}

/// Runs the CLI with `args`.
pub fn cli(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run cell0 CLI")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub async fn channel(endpoint: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap()
}

pub async fn kv(endpoint: &str) -> KvClient<Channel> {
    KvClient::new(channel(endpoint).await)
}

pub async fn status(endpoint: &str) -> StatusResponse {
    ClusterClient::new(channel(endpoint).await)
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

pub async fn put(endpoint: &str, key: &str, value: &str) -> Result<v1::PutResponse, tonic::Status> {
    kv(endpoint)
        .await
        .put(v1::PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            prev_kv: false,
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn get(endpoint: &str, key: &str, serializable: bool) -> Option<Vec<u8>> {
    let consistency = if serializable {
        v1::Consistency::Serializable
    } else {
        v1::Consistency::Linearizable
    };
    kv(endpoint)
        .await
        .get(v1::GetRequest {
            key: key.as_bytes().to_vec().into(),
            consistency: consistency as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .kv
        .map(|kv| kv.value.to_vec())
}

/// The services gRPC reflection lists through the given version of the
/// protocol (`v1` or `v1alpha`, which tonic-reflection generates alike).
macro_rules! reflection_services {
    ($version:ident, $endpoint:expr) => {{
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

        let mut client = ServerReflectionClient::new(channel($endpoint).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = client
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.message().await.unwrap().expect("a reflection reply");
        match reply.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<String>>()
            }
            other => panic!("unexpected reflection reply {other:?}"),
        }
    }};
}

/// The services reflection `v1` lists.
pub async fn list_services(endpoint: &str) -> Vec<String> {
    reflection_services!(v1, endpoint)
}

/// The services reflection `v1alpha` lists (what Python's grpcio-reflection
/// and older grpcurl builds ask).
pub async fn list_services_v1alpha(endpoint: &str) -> Vec<String> {
    reflection_services!(v1alpha, endpoint)
}

/// Every agent (up to 1,000), in name order.
pub async fn agents(endpoint: &str) -> Vec<v1::AgentInfo> {
    AgentsClient::new(channel(endpoint).await)
        .list(v1::ListAgentsRequest {
            start_after: String::new(),
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .agents
}

/// Every node with its resources and scheduling state.
pub async fn nodes(endpoint: &str) -> Vec<v1::NodeInfo> {
    NodesClient::new(channel(endpoint).await)
        .list(v1::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
}

/// Registers the test model (`models/all-minilm-l6-v2`, from
/// `scripts/fetch-model.sh`) as `minilm` version 1 with the cluster of
/// `endpoint`.
pub fn add_test_model(endpoint: &str) {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-minilm-l6-v2");
    let added = cli(&[
        "model",
        "add",
        model.to_str().unwrap(),
        "--name",
        "minilm",
        "--version",
        "1",
        "--endpoint",
        endpoint,
    ]);
    assert!(added.status.success(), "{}", stderr(&added));
}

/// A test CA in `dir` (created with it), valid 30 days.
pub fn test_ca(dir: &Path) -> cell0_tls::CaFiles {
    std::fs::create_dir_all(dir).unwrap();
    let files = cell0_tls::CaFiles::in_dir(dir);
    cell0_tls::certs::create_ca(&files, "test", cell0_tls::Validity::days(30).unwrap()).unwrap();
    files
}

/// A certificate for `node` of `site` from `ca`, valid `validity`, in `dir`.
pub fn test_cert(
    ca: &cell0_tls::CaFiles,
    dir: &Path,
    node: &str,
    site: &str,
    validity: cell0_tls::Validity,
) -> cell0_tls::NodeFiles {
    let out = cell0_tls::NodeFiles::in_dir(dir, node);
    let request = cell0_tls::NodeCertRequest {
        node: node.into(),
        site: site.into(),
        sans: vec![],
        validity,
    };
    cell0_tls::certs::create_node_cert(ca, &out, &request).unwrap();
    out
}

/// The first 1,000 memory entries of `agent`, asked of the node at
/// `endpoint`.
pub async fn memory_of(endpoint: &str, agent: &str) -> Result<Vec<v1::MemoryEntry>, tonic::Status> {
    cell0_proto::v1::tasks_client::TasksClient::new(channel(endpoint).await)
        .list_memory(v1::ListMemoryRequest {
            agent: agent.into(),
            start_after: String::new(),
            limit: 1000,
        })
        .await
        .map(|r| r.into_inner().entries)
}
