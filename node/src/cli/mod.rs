//! The command-line client: every command but `run` talks to a node's public
//! gRPC API, prints a table for people or JSON for scripts, and reports
//! failures as one line with a non-zero exit code.

pub mod acl;
pub mod agent;
mod agent_bench;
mod apply_bench;
pub mod bench;
mod disk_bench;
pub mod doctor;
mod gossip_bench;
pub mod infer;
pub mod kv;
pub mod leave;
pub mod model;
pub mod site;
mod sites_bench;
pub mod snapshot;
pub mod task;
pub mod tls;

use std::time::Duration;

use anyhow::Context;
use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::{self, RaftRole};
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How client commands print their results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// How long the CLI waits for the answer to one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Progress of a long transfer on stderr: one updating line on a terminal,
/// a line per 10 % otherwise (logs, pipes). Silent for totals below
/// `min_total` bytes.
pub struct ProgressLine {
    label: String,
    total: u64,
    min_total: u64,
    tty: bool,
    last: Option<u64>,
}

impl ProgressLine {
    /// A display for `label` (e.g. "uploading m.safetensors") of `total` bytes.
    pub fn new(label: impl Into<String>, total: u64, min_total: u64) -> Self {
        Self {
            label: label.into(),
            total,
            min_total,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last: None,
        }
    }

    /// Shows that `done` bytes are through.
    pub fn update(&mut self, done: u64) {
        if self.total < self.min_total {
            return;
        }
        let pct = done.min(self.total) * 100 / self.total.max(1);
        let step = if self.tty { pct } else { pct / 10 * 10 };
        if self.last == Some(step) {
            return;
        }
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        if self.tty {
            eprint!(
                "\r  {} {pct:>3}% ({:.1} of {:.1} MiB)",
                self.label,
                mib(done),
                mib(self.total)
            );
        } else {
            eprintln!("  {} {step:>3}%", self.label);
        }
        self.last = Some(step);
    }

    /// Ends the display (the terminal line gets its newline).
    pub fn finish(&mut self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
        self.last = None;
    }
}

/// A connection to a node's public API whose calls carry this process's ACL
/// token, if it has one ([`use_token`]).
pub type Conn = InterceptedService<Channel, WithToken>;

/// Adds `authorization: Bearer ...` to every call when a token is set, and
/// `cell0-site` when a site is.
#[derive(Debug, Clone, Copy, Default)]
pub struct WithToken;

/// The `authorization` value of `--token`, once set.
static TOKEN: std::sync::OnceLock<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = std::sync::OnceLock::new();

/// The `cell0-site` value of `--site`, once set.
static SITE: std::sync::OnceLock<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = std::sync::OnceLock::new();

impl tonic::service::Interceptor for WithToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = TOKEN.get() {
            request.metadata_mut().insert("authorization", value.clone());
        }
        if let Some(site) = SITE.get() {
            request.metadata_mut().insert("cell0-site", site.clone());
        }
        Ok(request)
    }
}

/// Makes every call of this process ask for site `site` (`--site`): a node
/// of another site forwards it there.
pub fn use_site(site: &str) -> anyhow::Result<()> {
    if site.is_empty() || site.len() > 64 {
        anyhow::bail!("--site must be 1 to 64 characters");
    }
    let value = site
        .parse()
        .with_context(|| format!("--site {site:?} is not valid header text"))?;
    // Set once, before any connection; a second call keeps the first.
    let _ = SITE.set(value);
    Ok(())
}

/// Makes every call of this process carry `token` (`--token`,
/// `CELL0_TOKEN`), after checking that it looks like a Cell0 token.
pub fn use_token(token: &str) -> anyhow::Result<()> {
    let token = token.trim();
    if cell0_state::acl::BearerToken::parse(token).is_none() {
        anyhow::bail!(
            "the token (--token or CELL0_TOKEN) is not a Cell0 ACL token: expected c0.<32 hex digits>.<64 hex \
             digits>, as `cell0 acl bootstrap` and `cell0 acl token create` print it"
        );
    }
    let value = format!("Bearer {token}")
        .parse()
        .context("the token is not valid header text")?;
    // Set once, before any connection; a second call keeps the first.
    let _ = TOKEN.set(value);
    Ok(())
}

/// Connects to a node's public API; every call on the channel gives up after
/// [`REQUEST_TIMEOUT`].
pub async fn connect(endpoint: &str) -> anyhow::Result<Conn> {
    Ok(InterceptedService::new(
        open_channel(endpoint, Some(REQUEST_TIMEOUT)).await?,
        WithToken,
    ))
}

/// Connects to a node's public API for long streams: no call on the channel
/// has an overall deadline, so the caller must bound each call by its
/// progress instead (as `cell0 model add` does for uploads).
pub async fn connect_streaming(endpoint: &str) -> anyhow::Result<Conn> {
    Ok(InterceptedService::new(open_channel(endpoint, None).await?, WithToken))
}

/// The client TLS configuration of `--ca`, once set.
static PUBLIC_TLS: std::sync::OnceLock<std::sync::Arc<cell0_tls::rustls::ClientConfig>> = std::sync::OnceLock::new();

/// Makes every connection of this process to a public port use TLS,
/// trusting the CA certificate in `ca` (`--ca`).
pub fn trust_ca(ca: &std::path::Path) -> anyhow::Result<()> {
    let config = cell0_tls::material::public_client(ca).map_err(|e| anyhow::anyhow!(e.describe()))?;
    // Set once, before any connection; a second call keeps the first.
    let _ = PUBLIC_TLS.set(config);
    Ok(())
}

async fn open_channel(endpoint: &str, timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let uri = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let mut ep = tonic::transport::Endpoint::from_shared(uri)
        .with_context(|| format!("{endpoint:?} is not a valid endpoint (expected host:port)"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .initial_stream_window_size(cell0_consensus::network::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(cell0_consensus::network::CONNECTION_WINDOW_BYTES);
    if let Some(t) = timeout {
        ep = ep.timeout(t);
    }
    let connected = match PUBLIC_TLS.get() {
        Some(tls) => {
            ep.connect_with_connector(cell0_tls::wire::public_connector(tls.clone()))
                .await
        }
        None => ep.connect().await,
    };
    connected.with_context(|| format!("cannot reach a cell0 node at {endpoint}"))
}

/// Turns a gRPC error into one readable line: the code, the node's stable
/// reason when it sent one (`unavailable (NO_LEADER): no leader is
/// elected`), the message and the leader hint.
pub fn rpc_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", rpc_error_line(&s))
}

pub(crate) fn rpc_error_line(s: &tonic::Status) -> String {
    let hint = s
        .metadata()
        .get(crate::api::LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(|l| format!(" (leader: {l})"))
        .unwrap_or_default();
    let reason = crate::api::error::reason_of(s)
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!("{}{reason}: {}{hint}", code_name(s.code()), s.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::OutOfRange => "out of range",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        tonic::Code::Unknown => "unknown outcome",
        tonic::Code::Unimplemented => "not supported by this endpoint",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::DataLoss => "data loss",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission denied",
        _ => "error",
    }
}

/// Prints rows as aligned columns under `headers`.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `views` as JSON, or as a table under `headers` with one `row` per view.
pub fn print_list<T: Serialize>(
    output: Output,
    views: Vec<T>,
    headers: &[&str],
    row: impl Fn(T) -> Vec<String>,
) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&views),
        Output::Table => {
            let rows: Vec<Vec<String>> = views.into_iter().map(row).collect();
            print_table(headers, &rows);
            Ok(())
        }
    }
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn role_name(role: i32) -> &'static str {
    match RaftRole::try_from(role) {
        Ok(RaftRole::Leader) => "leader",
        Ok(RaftRole::Follower) => "follower",
        Ok(RaftRole::Candidate) => "candidate",
        Ok(RaftRole::Learner) => "learner",
        _ => "unknown",
    }
}

#[derive(Serialize)]
struct StatusView {
    node_id: String,
    name: String,
    site: String,
    role: &'static str,
    leader_id: String,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    revision: u64,
    version: String,
}

/// `cell0 status`.
pub async fn status(endpoint: &str, output: Output) -> anyhow::Result<()> {
    let mut client = ClusterClient::new(connect(endpoint).await?);
    let s = client
        .status(v1::StatusRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let view = StatusView {
        node_id: format!("{:016x}", s.node_id),
        name: s.node_name,
        site: s.site,
        role: role_name(s.role),
        leader_id: if s.leader_id == 0 {
            "none".into()
        } else {
            format!("{:016x}", s.leader_id)
        },
        term: s.term,
        commit_index: s.commit_index,
        applied_index: s.applied_index,
        revision: s.revision,
        version: s.version,
    };
    match output {
        Output::Json => print_json(&view),
        Output::Table => {
            let rows = vec![
                vec!["node".into(), format!("{} ({})", view.name, view.node_id)],
                vec!["site".into(), view.site],
                vec!["role".into(), view.role.into()],
                vec!["leader".into(), view.leader_id],
                vec!["term".into(), view.term.to_string()],
                vec!["commit index".into(), view.commit_index.to_string()],
                vec!["applied index".into(), view.applied_index.to_string()],
                vec!["revision".into(), view.revision.to_string()],
                vec!["version".into(), view.version],
            ];
            print_table(&["FIELD", "VALUE"], &rows);
            Ok(())
        }
    }
}

#[derive(Serialize)]
struct MemberView {
    id: String,
    name: String,
    site: String,
    role: &'static str,
    leader: bool,
    public_addr: String,
    internal_addr: String,
    matched_index: u64,
    /// `cpu`, or `wgpu` with the adapter; empty until the node reported.
    inference: String,
    gpu: bool,
    cpu_cores: u32,
    memory_bytes: u64,
    gpu_memory_bytes: u64,
    /// Gossip's view: alive, suspect or dead; empty when unknown.
    gossip: String,
    /// Milliseconds since gossip last heard the member.
    last_heard_ms: Option<u64>,
    /// The version the member reports through gossip.
    version: String,
    /// host:port of its gossip listener.
    gossip_addr: String,
    /// The leader's recorded verdict: alive or dead; empty until judged.
    liveness: String,
    /// Why the leader recorded it.
    liveness_reason: String,
}

/// `cell0 members`.
pub async fn members(endpoint: &str, output: Output) -> anyhow::Result<()> {
    let mut client = ClusterClient::new(connect(endpoint).await?);
    let m = client
        .members(v1::MembersRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let views: Vec<MemberView> = m
        .members
        .into_iter()
        .map(|m| {
            let r = m.resources.unwrap_or_default();
            let g = m.gossip.unwrap_or_default();
            let l = m.liveness.unwrap_or_default();
            MemberView {
                liveness: l.state,
                liveness_reason: l.reason,
                gossip: g.state,
                last_heard_ms: (!g.peer_id.is_empty()).then_some(g.last_heard_ms_ago),
                version: g.version,
                gossip_addr: g.gossip_addr,
                inference: match r.inference_backend.as_str() {
                    "wgpu" => format!("wgpu ({})", r.adapter),
                    other => other.to_string(),
                },
                gpu: r.gpu,
                cpu_cores: r.cpu_cores,
                memory_bytes: r.memory_bytes,
                gpu_memory_bytes: r.gpu_memory_bytes,
                id: format!("{:016x}", m.id),
                name: m.name,
                site: m.site,
                role: if m.gossip_only {
                    "not in raft"
                } else if m.voter {
                    "voter"
                } else {
                    "learner"
                },
                leader: m.leader,
                public_addr: m.public_addr,
                internal_addr: m.internal_addr,
                matched_index: m.matched_index,
            }
        })
        .collect();
    print_list(
        output,
        views,
        &[
            "NAME",
            "ID",
            "SITE",
            "ROLE",
            "PUBLIC",
            "INTERNAL",
            "INFERENCE",
            "GOSSIP",
            "LAST HEARD",
            "RECORDED",
            "VERSION",
        ],
        |v| {
            vec![
                v.name,
                v.id,
                v.site,
                if v.leader {
                    format!("{} (leader)", v.role)
                } else {
                    v.role.into()
                },
                v.public_addr,
                v.internal_addr,
                v.inference,
                if v.gossip.is_empty() { "-".into() } else { v.gossip },
                v.last_heard_ms
                    .map_or_else(|| "-".into(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0)),
                if v.liveness.is_empty() { "-".into() } else { v.liveness },
                if v.version.is_empty() { "-".into() } else { v.version },
            ]
        },
    )
}

/// `cell0 remove ID`: removes a member from the cluster. `ID` is the node id
/// as `cell0 members` prints it (16 hex digits) or in decimal.
pub async fn remove(endpoint: &str, node: &str) -> anyhow::Result<()> {
    let id = parse_node_id(node)?;
    let mut client = ClusterClient::new(connect(endpoint).await?);
    client
        .remove(v1::RemoveRequest { node_id: id })
        .await
        .map_err(rpc_error)?;
    eprintln!("removed node {id:016x}");
    Ok(())
}

/// A node id as `cell0 members` prints it (16 hex digits) or in decimal.
pub(crate) fn parse_node_id(s: &str) -> anyhow::Result<u64> {
    let parsed = if s.len() == 16 {
        u64::from_str_radix(s, 16).ok()
    } else {
        s.parse().ok()
    };
    match parsed {
        Some(id) if id != 0 => Ok(id),
        _ => anyhow::bail!("{s:?} is not a node id: use the 16 hex digits `cell0 members` shows"),
    }
}

#[cfg(test)]
mod rpc_error_tests {
    use super::rpc_error_line;
    use crate::api::ApiError;
    use cell0_consensus::{ConsensusError, UnavailableCause};

    #[test]
    fn the_line_names_the_reason_and_the_leader() {
        let s = tonic::Status::from(ApiError::from(ConsensusError::unavailable(
            UnavailableCause::NoLeader,
            "no leader is elected",
        )));
        assert_eq!(rpc_error_line(&s), "unavailable (NO_LEADER): no leader is elected");
        let s = tonic::Status::from(ApiError::from(ConsensusError::Unavailable {
            cause: UnavailableCause::NotLeader,
            reason: "this node is not the leader".into(),
            leader_id: Some(3),
            leader_addr: Some("10.0.0.3:7100".into()),
        }));
        assert_eq!(
            rpc_error_line(&s),
            "unavailable (NOT_LEADER): this node is not the leader (leader: 10.0.0.3:7100)"
        );
        // A status without an ErrorInfo (a proxy, an older node): no reason.
        let s = tonic::Status::not_found("gone");
        assert_eq!(rpc_error_line(&s), "not found: gone");
    }
}

#[cfg(test)]
mod node_id_tests {
    use super::parse_node_id;

    #[test]
    fn node_ids_parse_as_members_prints_them() {
        assert_eq!(parse_node_id("00000000000000ff").unwrap(), 255);
        assert_eq!(parse_node_id("255").unwrap(), 255);
        assert!(parse_node_id("0").is_err());
        assert!(
            parse_node_id("node1")
                .unwrap_err()
                .to_string()
                .contains("not a node id")
        );
    }
}
