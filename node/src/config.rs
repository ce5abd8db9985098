//! Node configuration: one serde struct, loaded from defaults, then a TOML
//! file, then `CELL0_*` environment variables, then command-line flags (each
//! layer overrides the one before).
//!
//! Every field is documented and has a default in code; [`NodeConfig::validate`]
//! names the field that is wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cell0_consensus::ConsensusConfig;
use cell0_inference::{InferenceConfig, InferenceError};
use serde::{Deserialize, Serialize};

/// Everything a node needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Directory holding the node's identity and database. Created if
    /// missing.
    pub data_dir: PathBuf,
    /// Human-readable node name; defaults to `cell0-` and the node id's first
    /// hex digits.
    pub name: Option<String>,
    /// The site (region) this node runs in.
    pub site: String,
    /// Listen addresses.
    pub listen: ListenConfig,
    /// Addresses other nodes and clients use to reach this node; each
    /// defaults to the matching listen address, which must then not be a
    /// wildcard (0.0.0.0 or ::).
    pub advertise: AdvertiseConfig,
    /// Nodes to contact when this node is not yet in a cluster (host:port;
    /// a DNS name may resolve to several nodes). With gossip enabled these
    /// are gossip addresses: gossip finds every other node from any one of
    /// them, and this node joins the cluster they belong to (or forms one,
    /// with `bootstrap_expect`). Without gossip they are members' public or
    /// internal addresses, asked for admission in turn.
    pub join: Vec<String>,
    /// Start a new cluster with this node as its first member if it is not in
    /// one yet. Implied when `join` is empty and `bootstrap_expect` unset.
    pub bootstrap: bool,
    /// Form the cluster once this many freshly started nodes see each other
    /// through gossip (Consul's `bootstrap_expect`): the one with the lowest
    /// id bootstraps, the others join it; a node already in a cluster never
    /// bootstraps again. Needs gossip; excludes `bootstrap`.
    pub bootstrap_expect: Option<usize>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax. At `debug` every line logged while
    /// a public-API request is handled also names its method and trace id
    /// (a span per request, which costs each request some CPU); at `info`
    /// and above the lines about a request name its trace id themselves.
    pub log_level: String,
    /// Threads that run the node's async tasks (request handling, Raft,
    /// replication); disk writes and other blocking work run on threads of
    /// their own besides. Default: one per core. Give nodes that share a
    /// machine a share of its cores each: every hand-off between tasks on
    /// different threads costs a wake-up, and more threads than cores only
    /// add such hand-offs (`scripts/bootstrap-cluster.sh` gives each of its
    /// N nodes cores / N, at least 1; docs/benchmarks.md). 1 to 1024.
    pub worker_threads: Option<usize>,
    /// Raft, group commit and routing.
    pub raft: ConsensusConfig,
    /// The local inference engine: backend, batching and request limits.
    pub inference: InferenceConfig,
    /// Model files on this node: upload limits and the disk space kept free.
    pub models: ModelsConfig,
    /// Resources offered beyond what the node measures itself.
    pub resources: ResourcesConfig,
    /// The agent runtime: node leases and task concurrency.
    pub agents: AgentsConfig,
    /// Discovery and failure detection over libp2p gossip.
    pub gossip: GossipConfig,
    /// Automatic voter management on the leader (needs gossip).
    pub autopilot: AutopilotConfig,
    /// Mutual TLS between nodes on the internal port.
    pub tls: TlsConfig,
    /// Site links to other sites (QUIC, mutual TLS) and the site catalog.
    pub federation: FederationConfig,
    /// Request limits on the public port.
    pub limits: LimitsConfig,
    /// Access control (tokens and policies) on the public port.
    pub acl: AclConfig,
    /// The audit log of mutating and denied calls.
    pub audit: AuditConfig,
}

/// Access control on the public port (`[acl]`, docs/security.md). Give
/// every node the same setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Every call but health checks and `Acl/Bootstrap` needs a token
    /// (`authorization: Bearer ...`) whose policies allow it (`--acl`).
    pub enabled: bool,
}

/// The audit log (`[audit]`): one JSON line per mutating call and per
/// denied call, rotated by size. Lines hold no secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Write the log (`--audit`).
    pub enabled: bool,
    /// The file; `<data_dir>/audit/audit.log` when unset.
    pub path: Option<PathBuf>,
    /// Rotate when the file would pass this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` is the newest).
    pub max_files: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: None,
            max_bytes: 64 * 1024 * 1024,
            max_files: 5,
        }
    }
}

impl AuditConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(4096..=(1 << 40)).contains(&self.max_bytes) {
            return Err(bad("audit.max_bytes", "must be 4096 to 1099511627776 (1 TiB)"));
        }
        if !(1..=1000).contains(&self.max_files) {
            return Err(bad("audit.max_files", "must be 1 to 1000"));
        }
        Ok(())
    }
}

/// A configured burst, where 0 means "the same as the rate".
fn burst_or_rate(burst: u32, rate: u32) -> u32 {
    if burst == 0 { rate } else { burst }
}

/// Request limits on the public port (`[limits]`); the defaults set none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests per second one client address may send (a token bucket per
    /// IP address; health checks and reflection are exempt); 0: no limit.
    pub client_rate: u32,
    /// Requests one client address may send at once after a pause; 0: the
    /// same as `client_rate`.
    pub client_burst: u32,
    /// Requests per second one ACL token may send, on each node (a token
    /// bucket per token; management tokens are not limited; needs
    /// `acl.enabled`); 0: no limit.
    pub token_rate: u32,
    /// Requests one token may send at once after a pause; 0: the same as
    /// `token_rate`.
    pub token_burst: u32,
}

impl LimitsConfig {
    /// The burst per client address in effect.
    pub fn burst(&self) -> u32 {
        burst_or_rate(self.client_burst, self.client_rate)
    }

    /// The burst per token in effect.
    pub fn token_burst(&self) -> u32 {
        burst_or_rate(self.token_burst, self.token_rate)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("limits.client_rate", self.client_rate),
            ("limits.client_burst", self.client_burst),
            ("limits.token_rate", self.token_rate),
            ("limits.token_burst", self.token_burst),
        ] {
            if v > 1_000_000 {
                return Err(bad(field, "must be at most 1000000 (0 turns it off)"));
            }
        }
        Ok(())
    }
}

/// Mutual TLS on the internal port (`[tls]`): Raft, forwarding, joins,
/// leases and blob transfer. Both ends present a certificate signed by the
/// cluster CA (`cell0 tls ca create`, `cell0 tls cert create`); the files
/// are checked for changes every `reload_ms` and reloaded without a
/// restart. Either all three files or `insecure`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate (PEM), the same on every node.
    pub ca_file: Option<PathBuf>,
    /// This node's certificate (PEM), signed by the CA.
    pub cert_file: Option<PathBuf>,
    /// This node's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Run the internal port in plaintext: anyone who reaches it can act
    /// as a node. For development only; `cell0 run --dev` sets it.
    pub insecure: bool,
    /// Serve the public port over TLS too, with this node's certificate
    /// (clients verify it against the CA: `cell0 --ca FILE`); needs the
    /// files.
    pub public: bool,
    /// How often the files are checked for changes, in milliseconds.
    pub reload_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            ca_file: None,
            cert_file: None,
            key_file: None,
            insecure: false,
            public: false,
            reload_ms: 5_000,
        }
    }
}

impl TlsConfig {
    /// The files, when TLS is on.
    pub fn files(&self) -> Option<cell0_tls::TlsFiles> {
        match (&self.ca_file, &self.cert_file, &self.key_file) {
            (Some(ca), Some(cert), Some(key)) if !self.insecure => Some(cell0_tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let given = [
            ("tls.ca_file", &self.ca_file),
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
        ];
        if self.insecure {
            if let Some((field, _)) = given.iter().find(|(_, f)| f.is_some()) {
                return Err(bad(field, "cannot be combined with tls.insecure (--insecure)"));
            }
            if self.public {
                return Err(bad(
                    "tls.public",
                    "needs the TLS files; cannot be combined with tls.insecure",
                ));
            }
        } else if let Some((field, _)) = given.iter().find(|(_, f)| f.is_none()) {
            return Err(bad(
                field,
                "mutual TLS between nodes needs the cluster CA, this node's certificate and its key \
                 (--tls-ca, --tls-cert, --tls-key; make them with `cell0 tls ca create` and `cell0 tls cert create`), \
                 or run with --insecure for plaintext between nodes (development only; --dev implies it)",
            ));
        }
        if !(100..=3_600_000).contains(&self.reload_ms) {
            return Err(bad("tls.reload_ms", "must be 100 to 3600000 (one hour)"));
        }
        Ok(())
    }
}

/// Autopilot (`[autopilot]`): on the leader, removes voters gossip has seen
/// dead for `dead_voter_cleanup_ms` and promotes healthy learners to keep
/// `raft.voters` voters, never making a change that could lose quorum. Runs
/// only where gossip runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutopilotConfig {
    /// Run autopilot.
    pub enabled: bool,
    /// How long gossip must have seen a voter dead before it is removed, in
    /// milliseconds.
    pub dead_voter_cleanup_ms: u64,
}

impl Default for AutopilotConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dead_voter_cleanup_ms: 30_000,
        }
    }
}

/// Gossip (`[gossip]`): libp2p on its own port, signed heartbeats, a
/// phi-accrual failure detector per peer. Off unless enabled; what it
/// learns shows in `cell0 members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipConfig {
    /// Run gossip on `listen`.
    pub enabled: bool,
    /// libp2p TCP listen address.
    pub listen: SocketAddr,
    /// Gossip address advertised to other nodes (host:port); defaults to
    /// `listen`, which must then not be a wildcard.
    pub advertise: Option<String>,
    /// The cluster secret: 64 hex digits from `cell0 keygen`, the same on
    /// every node. Nodes without it cannot connect. Required when gossip is
    /// enabled, unless `allow_no_secret`.
    pub secret: Option<String>,
    /// Run gossip without a cluster secret (any node that reaches the port
    /// can take part): for development only; `cell0 run --dev` sets it.
    pub allow_no_secret: bool,
    /// Interval between this node's heartbeats, in milliseconds.
    pub heartbeat_ms: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 7102)),
            advertise: None,
            secret: None,
            allow_no_secret: false,
            heartbeat_ms: 1_000,
        }
    }
}

impl GossipConfig {
    /// The cluster secret, parsed; `None` without one.
    pub fn cluster_secret(&self) -> Result<Option<cell0_gossip::ClusterSecret>, ConfigError> {
        self.secret
            .as_deref()
            .map(cell0_gossip::ClusterSecret::parse)
            .transpose()
            .map_err(|e| bad("gossip.secret", e.to_string()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if self.cluster_secret()?.is_none() && !self.allow_no_secret {
            return Err(bad(
                "gossip.secret",
                "gossip needs the cluster secret (make one with `cell0 keygen`, give every node the same with \
                 --gossip-secret or CELL0_GOSSIP_SECRET); only a --dev node runs gossip without one",
            ));
        }
        check_advertised(&self.advertise, self.listen, "gossip.advertise", "gossip.listen")?;
        if !(100..=60_000).contains(&self.heartbeat_ms) {
            return Err(bad("gossip.heartbeat_ms", "must be 100 to 60000"));
        }
        Ok(())
    }
}

/// Site links (`[federation]`): QUIC with mutual TLS against the cluster CA
/// to nodes of other sites, each of them its own cluster; what they publish
/// shows in `cell0 site ls`. Off unless enabled; needs the `tls.*` files,
/// and this node's certificate must name its site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// Run site links on `listen`.
    pub enabled: bool,
    /// UDP listen address of the federation port.
    pub listen: SocketAddr,
    /// Federation address advertised to other sites (host:port); defaults
    /// to `listen`, which must then not be a wildcard.
    pub advertise: Option<String>,
    /// Federation addresses (host:port) of nodes of other sites to link
    /// to, kept up with reconnects (`--join-wan`). Give every gateway of a
    /// site the same list.
    pub join: Vec<String>,
    /// Longest interval between two summaries this node sends on each link,
    /// in milliseconds (a change of the site's leader, nodes, capacity or
    /// version is sent within 100 ms).
    pub publish_ms: u64,
    /// A site not heard for this long is listed unreachable, in
    /// milliseconds.
    pub site_timeout_ms: u64,
    /// The only sites this node links with; empty: every site whose node
    /// certificates the cluster CA signed.
    pub allowed_sites: Vec<String>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 7104)),
            advertise: None,
            join: Vec::new(),
            publish_ms: 1_000,
            site_timeout_ms: 5_000,
            allowed_sites: Vec::new(),
        }
    }
}

/// Most addresses in `federation.join` and sites in
/// `federation.allowed_sites`.
pub const MAX_FEDERATION_ENTRIES: usize = 64;

impl FederationConfig {
    /// The federation address other sites dial.
    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    fn validate(&self, tls: &TlsConfig) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if tls.files().is_none() {
            return Err(bad(
                "federation.enabled",
                "site links need mutual TLS: set tls.ca_file, tls.cert_file and tls.key_file (--tls-ca, --tls-cert, --tls-key)",
            ));
        }
        check_advertised(
            &self.advertise,
            self.listen,
            "federation.advertise",
            "federation.listen",
        )?;
        check_join("federation.join", &self.join)?;
        if self.join.len() > MAX_FEDERATION_ENTRIES {
            return Err(bad(
                "federation.join",
                format!("at most {MAX_FEDERATION_ENTRIES} addresses"),
            ));
        }
        if !(100..=60_000).contains(&self.publish_ms) {
            return Err(bad("federation.publish_ms", "must be 100 to 60000"));
        }
        if self.site_timeout_ms < 2 * self.publish_ms || self.site_timeout_ms > 600_000 {
            return Err(bad(
                "federation.site_timeout_ms",
                "must be at least twice federation.publish_ms and at most 600000",
            ));
        }
        if self.allowed_sites.len() > MAX_FEDERATION_ENTRIES {
            return Err(bad(
                "federation.allowed_sites",
                format!("at most {MAX_FEDERATION_ENTRIES} sites"),
            ));
        }
        for (i, site) in self.allowed_sites.iter().enumerate() {
            if site.is_empty() || site.len() > 64 {
                return Err(bad(
                    &format!("federation.allowed_sites[{i}]"),
                    "must be 1 to 64 characters",
                ));
            }
        }
        Ok(())
    }
}

/// The agent runtime (`[agents]`). Every node runs agents the scheduler
/// places on it; `cell0 node eligibility --disable` keeps new ones away.
///
/// A node holds a lease with the leader, renewed every fifth of
/// `node_lease_ms`. Without a renewal it stops its agents once
/// `node_lease_ms - lease_margin_ms` passed since the last successful
/// renewal was sent; the leader declares it down only after
/// `node_lease_ms + lease_margin_ms` passed since it received that renewal,
/// so the agents have stopped before they run elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsConfig {
    /// The node lease, in milliseconds.
    pub node_lease_ms: u64,
    /// Safety margin on both sides of the lease for clock-rate differences
    /// and scheduling delays, in milliseconds; less than half the lease.
    pub lease_margin_ms: u64,
    /// Tasks this node runs at once, over all of its agents (each agent
    /// runs one task at a time, in submission order).
    pub max_parallel_tasks: usize,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            node_lease_ms: 2_500,
            lease_margin_ms: 500,
            max_parallel_tasks: 16,
        }
    }
}

impl AgentsConfig {
    /// The lease as a duration.
    pub fn node_lease(&self) -> Duration {
        Duration::from_millis(self.node_lease_ms)
    }

    /// How often a node renews its lease: a fifth of it.
    pub fn renewal_period(&self) -> Duration {
        self.node_lease() / 5
    }

    /// The margin as a duration.
    pub fn lease_margin(&self) -> Duration {
        Duration::from_millis(self.lease_margin_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(300..=600_000).contains(&self.node_lease_ms) {
            return Err(bad(
                "agents.node_lease_ms",
                format!("must be in 300..=600000, got {}", self.node_lease_ms),
            ));
        }
        if self.lease_margin_ms == 0 || self.lease_margin_ms * 2 >= self.node_lease_ms {
            return Err(bad(
                "agents.lease_margin_ms",
                format!(
                    "must be at least 1 and less than half of agents.node_lease_ms ({}), got {}",
                    self.node_lease_ms, self.lease_margin_ms
                ),
            ));
        }
        if !(1..=1024).contains(&self.max_parallel_tasks) {
            return Err(bad(
                "agents.max_parallel_tasks",
                format!("must be in 1..=1024, got {}", self.max_parallel_tasks),
            ));
        }
        Ok(())
    }
}

/// Model files on this node (`[models]`): limits on uploads, and the free
/// space kept on the data dir's filesystem so Raft can always write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// An upload that sends no data for this many seconds is aborted and its
    /// partial file deleted (uploads are not resumable; the client sends the
    /// file again).
    pub upload_idle_timeout_secs: u64,
    /// Most bytes that uploads in progress and uploaded files no registered
    /// version uses yet may hold together; an upload that would pass it is
    /// refused. Each upload counts with the size its header declares.
    pub upload_quota_bytes: u64,
    /// How long, in seconds, an uploaded file waits for the `model add` that
    /// uses it. Until then no cleanup deletes it and it counts against
    /// `upload_quota_bytes`; after that it is garbage like any unused file.
    pub upload_grace_secs: u64,
    /// Bytes to keep free on the data dir's filesystem: an upload, or a fetch
    /// of a model file from a peer, that would leave less is refused, so the
    /// Raft log can still be written. 0 turns the check off. Free space is
    /// read with statvfs; where it cannot be read the check is skipped (with
    /// a warning in the log).
    pub free_space_reserve_bytes: u64,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            upload_idle_timeout_secs: 60,
            // Two of the largest model versions the registry accepts.
            upload_quota_bytes: 2 * cell0_consensus::MAX_MODEL_BYTES,
            upload_grace_secs: 3600,
            free_space_reserve_bytes: 1 << 30,
        }
    }
}

impl ModelsConfig {
    /// `upload_idle_timeout_secs` as a duration.
    pub fn upload_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.upload_idle_timeout_secs)
    }

    /// `upload_grace_secs` as a duration.
    pub fn upload_grace(&self) -> Duration {
        Duration::from_secs(self.upload_grace_secs)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=3600).contains(&self.upload_idle_timeout_secs) {
            return Err(bad(
                "models.upload_idle_timeout_secs",
                format!("must be in 1..=3600, got {}", self.upload_idle_timeout_secs),
            ));
        }
        if self.upload_quota_bytes < 1 << 20 {
            return Err(bad(
                "models.upload_quota_bytes",
                format!("must be at least 1 MiB (1048576), got {}", self.upload_quota_bytes),
            ));
        }
        if !(60..=7 * 86_400).contains(&self.upload_grace_secs) {
            return Err(bad(
                "models.upload_grace_secs",
                format!("must be in 60..=604800 (one week), got {}", self.upload_grace_secs),
            ));
        }
        Ok(())
    }
}

/// Resources the node cannot measure itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourcesConfig {
    /// GPU memory to offer, in MiB, when the engine runs on a hardware GPU
    /// (wgpu does not report it); 0 means unknown.
    pub gpu_memory_mb: u64,
    /// Labels of this node (`labels = { zone = "a" }`), which agents'
    /// `constraints.labels` must match; at most 32, keys and values of at
    /// most 256 bytes.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Listen addresses of the node's ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// Public gRPC API (clients, CLI).
    pub public: SocketAddr,
    /// Internal gRPC API (Raft, forwarding). Unless it is a wildcard, this
    /// node's connections to other nodes also come from its address.
    pub internal: SocketAddr,
    /// HTTP operations endpoints (/metrics, /health, /ready, /live).
    pub http: SocketAddr,
}

/// Advertised addresses (host:port); empty means "same as listen".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvertiseConfig {
    /// Advertised public gRPC address.
    pub public: Option<String>,
    /// Advertised internal gRPC address.
    pub internal: Option<String>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            public: SocketAddr::from(([127, 0, 0, 1], 7100)),
            internal: SocketAddr::from(([127, 0, 0, 1], 7101)),
            http: SocketAddr::from(([127, 0, 0, 1], 7103)),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("cell0-data"),
            name: None,
            site: "default".into(),
            listen: ListenConfig::default(),
            advertise: AdvertiseConfig::default(),
            join: Vec::new(),
            bootstrap: false,
            bootstrap_expect: None,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            worker_threads: None,
            raft: ConsensusConfig::default(),
            inference: InferenceConfig::default(),
            models: ModelsConfig::default(),
            resources: ResourcesConfig::default(),
            agents: AgentsConfig::default(),
            gossip: GossipConfig::default(),
            autopilot: AutopilotConfig::default(),
            tls: TlsConfig::default(),
            federation: FederationConfig::default(),
            limits: LimitsConfig::default(),
            acl: AclConfig::default(),
            audit: AuditConfig::default(),
        }
    }
}

/// Most threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Most nodes `bootstrap_expect` may wait for.
pub const MAX_BOOTSTRAP_EXPECT: usize = 16;

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The field (dotted path, as in the TOML file).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// An advertised address must be set when its listen address is a wildcard
/// (others could not reach 0.0.0.0 or ::).
fn check_advertised(
    advertise: &Option<String>,
    listen: SocketAddr,
    advertise_field: &str,
    listen_field: &str,
) -> Result<(), ConfigError> {
    if advertise.is_none() && listen.ip().is_unspecified() {
        return Err(bad(
            advertise_field,
            format!("must be set when {listen_field} is a wildcard address"),
        ));
    }
    Ok(())
}

/// Every entry of a join list (`field`) must be host:port.
fn check_join(field: &str, join: &[String]) -> Result<(), ConfigError> {
    for (i, j) in join.iter().enumerate() {
        if !j.contains(':') {
            return Err(bad(&format!("{field}[{i}]"), format!("{j:?} is not host:port")));
        }
    }
    Ok(())
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

impl NodeConfig {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| bad("config", format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses a configuration file's text; `origin` names it in errors.
    /// Does not validate ([`NodeConfig::validate`] does).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| bad("config", format!("{origin}: {}", e.message())))
    }

    /// The address other nodes use for the internal API.
    pub fn advertise_internal(&self) -> String {
        self.advertise
            .internal
            .clone()
            .unwrap_or_else(|| self.listen.internal.to_string())
    }

    /// The address this node's connections to other nodes come from: the
    /// internal listen address, unless that is a wildcard (then the
    /// operating system picks).
    pub fn internal_source(&self) -> Option<std::net::IpAddr> {
        let ip = self.listen.internal.ip();
        (!ip.is_unspecified()).then_some(ip)
    }

    /// The address clients use for the public API.
    pub fn advertise_public(&self) -> String {
        self.advertise
            .public
            .clone()
            .unwrap_or_else(|| self.listen.public.to_string())
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty"));
        }
        if let Some(name) = &self.name
            && (name.is_empty() || name.len() > 64)
        {
            return Err(bad("name", "must be 1 to 64 characters"));
        }
        if self.site.is_empty() || self.site.len() > 64 {
            return Err(bad("site", "must be 1 to 64 characters"));
        }
        if let Some(n) = self.worker_threads
            && !(1..=MAX_WORKER_THREADS).contains(&n)
        {
            return Err(bad("worker_threads", format!("must be 1 to {MAX_WORKER_THREADS}")));
        }
        let mut ports = vec![
            ("listen.public", self.listen.public),
            ("listen.internal", self.listen.internal),
            ("listen.http", self.listen.http),
        ];
        if self.gossip.enabled {
            ports.push(("gossip.listen", self.gossip.listen));
        }
        for (i, (a_name, a)) in ports.iter().enumerate() {
            for (b_name, b) in &ports[i + 1..] {
                if a == b && a.port() != 0 {
                    return Err(bad(b_name, format!("{b} is also {a_name}")));
                }
            }
        }
        check_advertised(
            &self.advertise.public,
            self.listen.public,
            "advertise.public",
            "listen.public",
        )?;
        check_advertised(
            &self.advertise.internal,
            self.listen.internal,
            "advertise.internal",
            "listen.internal",
        )?;
        check_join("join", &self.join)?;
        if self.log_level.is_empty() {
            return Err(bad("log_level", "must not be empty"));
        }
        self.gossip.validate()?;
        if !(1_000..=86_400_000).contains(&self.autopilot.dead_voter_cleanup_ms) {
            return Err(bad(
                "autopilot.dead_voter_cleanup_ms",
                "must be 1000 to 86400000 (one day)",
            ));
        }
        if let Some(n) = self.bootstrap_expect {
            if !(1..=MAX_BOOTSTRAP_EXPECT).contains(&n) {
                return Err(bad("bootstrap_expect", format!("must be 1 to {MAX_BOOTSTRAP_EXPECT}")));
            }
            if !self.gossip.enabled {
                return Err(bad(
                    "bootstrap_expect",
                    "needs gossip: set gossip.enabled (or --listen-gossip)",
                ));
            }
            if self.bootstrap {
                return Err(bad("bootstrap_expect", "cannot be combined with bootstrap"));
            }
        }
        self.raft.validate().map_err(|e| match e {
            cell0_consensus::ConsensusError::InvalidArgument { field, reason } => bad(&field, reason),
            other => bad("raft", other.to_string()),
        })?;
        self.inference.validate().map_err(|e| match e {
            InferenceError::InvalidConfig { field, message } => bad(&format!("inference.{field}"), message),
            other => bad("inference", other.to_string()),
        })?;
        cell0_consensus::nodes::check_labels("resources.labels", &self.resources.labels).map_err(|e| match e {
            cell0_state::StateError::InvalidArgument { field, reason } => bad(&field, reason),
            other => bad("resources.labels", other.to_string()),
        })?;
        self.agents.validate()?;
        self.models.validate()?;
        self.limits.validate()?;
        if self.limits.token_rate > 0 && !self.acl.enabled {
            return Err(bad(
                "limits.token_rate",
                "limits tokens, so it needs acl.enabled (--acl)",
            ));
        }
        self.audit.validate()?;
        // Last, so that a config with one bad field names that field.
        self.tls.validate()?;
        self.federation.validate(&self.tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_toml_overrides_fields() {
        let err = NodeConfig::default().validate().unwrap_err();
        assert_eq!(err.field, "tls.ca_file", "TLS or --insecure: {err}");
        assert!(err.to_string().contains("--insecure"), "{err}");
        let mut c = NodeConfig::default();
        c.tls.insecure = true;
        c.validate().unwrap();
        c.tls.cert_file = Some("node.pem".into());
        assert_eq!(c.validate().unwrap_err().field, "tls.cert_file");
        let c: NodeConfig = toml::from_str(
            r#"
            site = "eu"
            [listen]
            public = "127.0.0.1:8100"
            [raft]
            voters = 5
            "#,
        )
        .unwrap();
        assert_eq!(c.site, "eu");
        assert_eq!(c.listen.public.port(), 8100);
        assert_eq!(c.listen.internal.port(), 7101, "unset fields keep defaults");
        assert_eq!(c.raft.voters, 5);
        let mut c = c;
        c.tls.insecure = true;
        c.validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let err = toml::from_str::<NodeConfig>("sit = 1").unwrap_err();
        assert!(err.to_string().contains("unknown field `sit`"), "{err}");
        let mut c = NodeConfig::default();
        c.resources.labels.insert("zone".into(), "x".repeat(300));
        assert_eq!(c.validate().unwrap_err().field, "resources.labels.zone");
        let mut c = NodeConfig::default();
        c.listen.http = c.listen.public;
        assert_eq!(c.validate().unwrap_err().field, "listen.http");
        let mut c = NodeConfig::default();
        c.listen.public = "0.0.0.0:7100".parse().unwrap();
        assert_eq!(c.validate().unwrap_err().field, "advertise.public");
        let mut c = NodeConfig::default();
        c.raft.voters = 4;
        assert_eq!(c.validate().unwrap_err().field, "raft.voters");
        for threads in ["0", "1025"] {
            let c: NodeConfig = toml::from_str(&format!("worker_threads = {threads}")).unwrap();
            assert_eq!(c.validate().unwrap_err().field, "worker_threads", "{threads}");
        }
        let mut c: NodeConfig = toml::from_str("worker_threads = 1").unwrap();
        c.tls.insecure = true;
        c.validate().unwrap();
        let c: NodeConfig = toml::from_str("[inference]\nbackend = \"cpu\"\nmax_batch = 0").unwrap();
        assert_eq!(c.validate().unwrap_err().field, "inference.max_batch");
        let err = toml::from_str::<NodeConfig>("[inference]\nbackend = \"tpu\"").unwrap_err();
        assert!(err.to_string().contains("unknown variant"), "{err}");
        for (toml, field) in [
            ("upload_idle_timeout_secs = 0", "models.upload_idle_timeout_secs"),
            ("upload_quota_bytes = 10", "models.upload_quota_bytes"),
            ("upload_grace_secs = 1", "models.upload_grace_secs"),
        ] {
            let c: NodeConfig = toml::from_str(&format!("[models]\n{toml}")).unwrap();
            assert_eq!(c.validate().unwrap_err().field, field, "{toml}");
        }
        let mut c: NodeConfig = toml::from_str("[federation]\nenabled = true").unwrap();
        c.tls.insecure = true;
        assert_eq!(
            c.validate().unwrap_err().field,
            "federation.enabled",
            "site links need TLS"
        );
        c.tls = TlsConfig {
            ca_file: Some("ca.pem".into()),
            cert_file: Some("n.pem".into()),
            key_file: Some("n-key.pem".into()),
            ..TlsConfig::default()
        };
        c.validate().unwrap();
        c.federation.site_timeout_ms = c.federation.publish_ms;
        assert_eq!(c.validate().unwrap_err().field, "federation.site_timeout_ms");
        c.federation.site_timeout_ms = 5_000;
        c.federation.join = vec!["nowhere".into()];
        assert_eq!(c.validate().unwrap_err().field, "federation.join[0]");
        c.federation.join.clear();
        c.federation.listen = "0.0.0.0:7104".parse().unwrap();
        assert_eq!(c.validate().unwrap_err().field, "federation.advertise");
        let mut c: NodeConfig = toml::from_str("[models]\nfree_space_reserve_bytes = 0").unwrap();
        c.tls.insecure = true;
        c.validate().unwrap();
    }
}
