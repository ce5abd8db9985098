//! `cell0 doctor`: checks one node's machine and its view of the cluster,
//! and prints each problem with the fix.
//!
//! It reads the node's configuration (the config file and flags `cell0 run`
//! gets) and checks:
//! - **config**: the configuration is valid;
//! - **ports**: with the node running, each listen address accepts
//!   connections; with it stopped, each can be bound (one taken by another
//!   program is a problem);
//! - **data dir**: it exists and is a writable directory (or can be made),
//!   not writable by every user, with at least [`MIN_FREE_BYTES`] and
//!   [`MIN_FREE_PERCENT`] of its filesystem free;
//! - **certificates**: the CA and node certificate are valid now and for
//!   [`CERT_WARN_DAYS`] more days;
//!
//! and, while the node runs (its HTTP port answers `/live`):
//! - **inference**: the engine answers, on the backend the config asks for,
//!   and serves a model;
//! - **cluster**: a leader is known; this node is a member in the leader's
//!   view (one that left cannot tell from its own); the cluster has the
//!   voters `raft.voters` asks for (a warning); every member answers and is
//!   not recorded dead;
//! - **clock**: every member's clock is within [`MAX_CLOCK_OFFSET_MS`] of
//!   this machine's (after allowing for the round trip).
//!
//! Invariants: doctor changes nothing (its probe file in the data dir is
//! removed again); every problem comes with a fix; the exit status is
//! non-zero exactly when a problem was found (warnings do not fail).

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cell0_inference::BackendKind;
use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::inference_client::InferenceClient;
use cell0_proto::v1::{self, MembersRequest, StatusRequest};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Conn, Output, connect, print_json, rpc_error_line};
use crate::config::{NodeConfig, TlsConfig};
use crate::scheduling::now_ms;

/// Less free space than this on the data dir's filesystem is a problem.
pub const MIN_FREE_BYTES: u64 = 1 << 30;

/// Less than this share of the data dir's filesystem free is a problem.
pub const MIN_FREE_PERCENT: u64 = 5;

/// A certificate that expires within this many days is a warning.
pub const CERT_WARN_DAYS: i64 = 30;

/// A member's clock further than this from this machine's is a problem.
pub const MAX_CLOCK_OFFSET_MS: i64 = 500;

/// How long doctor waits for any one answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Worth a look; does not fail doctor.
    Warn,
    /// Wrong; doctor fails.
    Problem,
    /// Not checked, and why is in the detail.
    Skipped,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked (`port public`, `data dir`, ...).
    pub check: String,
    /// How it came out.
    pub verdict: Verdict,
    /// What doctor saw.
    pub detail: String,
    /// What to do about it (empty when nothing is wrong).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Finding {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(check, Verdict::Ok, detail, "")
    }

    fn warn(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(check, Verdict::Warn, detail, fix)
    }

    fn problem(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(check, Verdict::Problem, detail, fix)
    }

    fn skipped(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(check, Verdict::Skipped, detail, "")
    }

    fn new(check: impl Into<String>, verdict: Verdict, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            verdict,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

#[derive(Serialize)]
struct Report<'a> {
    problems: usize,
    warnings: usize,
    findings: &'a [Finding],
}

/// `cell0 doctor`: runs every check for the node `config` describes,
/// prints the findings and fails when one is a problem.
pub async fn run(config: &NodeConfig, output: Output) -> anyhow::Result<()> {
    let findings = examine(config).await;
    let count = |v: Verdict| findings.iter().filter(|f| f.verdict == v).count();
    let (problems, warnings) = (count(Verdict::Problem), count(Verdict::Warn));
    match output {
        Output::Json => print_json(&Report {
            problems,
            warnings,
            findings: &findings,
        })?,
        Output::Table => print_findings(&findings, problems, warnings),
    }
    if problems > 0 {
        anyhow::bail!("doctor found {problems} problem(s)");
    }
    Ok(())
}

/// Every finding for the node `config` describes.
pub async fn examine(config: &NodeConfig) -> Vec<Finding> {
    let mut findings = vec![check_config(config)];
    let http = local(config.listen.http);
    let running = answers_live(http).await;
    findings.extend(check_ports(config, running).await);
    findings.extend(check_data_dir(&config.data_dir));
    findings.extend(check_certificates(&config.tls));
    if !running {
        findings.push(Finding::skipped(
            "node",
            format!("the node is not running (nothing answers /live on {http}): checked what it needs to start"),
        ));
        return findings;
    }
    let endpoint = local(config.listen.public).to_string();
    match connect(&endpoint).await {
        Ok(conn) => {
            findings.push(check_inference(conn.clone(), config.inference.backend).await);
            findings.extend(check_cluster(conn, config.raft.voters).await);
        }
        Err(e) => findings.push(Finding::problem(
            "node",
            format!("the node's HTTP port answers but its public API at {endpoint} does not: {e:#}"),
            "read the node's log (journalctl -u cell0); with --tls-public, pass --ca",
        )),
    }
    findings
}

fn print_findings(findings: &[Finding], problems: usize, warnings: usize) {
    let width = findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
    for f in findings {
        let verdict = match f.verdict {
            Verdict::Ok => "ok",
            Verdict::Warn => "WARN",
            Verdict::Problem => "PROBLEM",
            Verdict::Skipped => "skipped",
        };
        println!("{verdict:<8} {:<width$}  {}", f.check, f.detail);
        if !f.fix.is_empty() {
            println!("{:<8} {:<width$}  fix: {}", "", "", f.fix);
        }
    }
    println!("{problems} problem(s), {warnings} warning(s)");
}

/// `addr` with an unspecified IP (listen on all) replaced by loopback, to
/// reach the node from its own machine.
fn local(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

fn check_config(config: &NodeConfig) -> Finding {
    match config.validate() {
        Ok(()) => Finding::ok("config", "valid"),
        Err(e) => Finding::problem(
            "config",
            e.to_string(),
            format!("correct `{}` in the config file or its flag", e.field),
        ),
    }
}

/// Whether an HTTP server at `addr` answers `GET /live` with 200.
async fn answers_live(addr: SocketAddr) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /live HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<bool, std::io::Error>(answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200"))
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(true)))
}

/// The listen addresses of `config`: (check name, address, flag).
fn listen_addresses(config: &NodeConfig) -> Vec<(&'static str, SocketAddr, &'static str)> {
    let mut ports = vec![
        ("port public", config.listen.public, "--listen-public"),
        ("port internal", config.listen.internal, "--listen-internal"),
        ("port http", config.listen.http, "--listen-http"),
    ];
    if config.gossip.enabled {
        ports.push(("port gossip", config.gossip.listen, "--listen-gossip"));
    }
    ports
}

async fn check_ports(config: &NodeConfig, running: bool) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (check, addr, flag) in listen_addresses(config) {
        let finding = if running {
            let connected = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(local(addr))).await;
            match connected {
                Ok(Ok(_)) => Finding::ok(check, format!("{addr} accepts connections")),
                Ok(Err(e)) => Finding::problem(
                    check,
                    format!("{addr} refuses connections although the node runs: {e}"),
                    "read the node's log (journalctl -u cell0) for the listener's error",
                ),
                Err(_) => Finding::problem(
                    check,
                    format!("{addr} does not accept a connection within {PROBE_TIMEOUT:?}"),
                    "the node may be overloaded or stopped: read its log and `cell0 status`",
                ),
            }
        } else {
            match std::net::TcpListener::bind(addr) {
                Ok(_) => Finding::ok(check, format!("{addr} is free")),
                Err(e) if e.kind() == ErrorKind::AddrInUse => Finding::problem(
                    check,
                    format!("{addr} is in use by another program"),
                    format!(
                        "find it with `ss -ltnp 'sport = :{}'` and stop it, or give the node another address ({flag})",
                        addr.port()
                    ),
                ),
                Err(e) if e.kind() == ErrorKind::AddrNotAvailable => Finding::problem(
                    check,
                    format!("{addr} is not an address of this machine"),
                    format!("use an address of one of this machine's interfaces, or 0.0.0.0 ({flag})"),
                ),
                Err(e) if e.kind() == ErrorKind::PermissionDenied => Finding::problem(
                    check,
                    format!("{addr} may not be bound by this user: {e}"),
                    format!("use a port above 1023, or grant CAP_NET_BIND_SERVICE ({flag})"),
                ),
                Err(e) => Finding::problem(check, format!("{addr} cannot be bound: {e}"), format!("check {flag}")),
            }
        };
        findings.push(finding);
    }
    findings
}

/// The directory itself if it exists, else the closest ancestor that does.
fn existing_ancestor(path: &Path) -> Option<PathBuf> {
    path.ancestors().find(|p| p.exists()).map(Path::to_path_buf)
}

fn check_data_dir(dir: &Path) -> Vec<Finding> {
    const CHECK: &str = "data dir";
    let shown = dir.display();
    let mut findings = Vec::new();
    let existing = match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return vec![Finding::problem(
                CHECK,
                format!("{shown} exists but is not a directory"),
                "point --data-dir at a directory",
            )];
        }
        Ok(meta) => {
            use std::os::unix::fs::PermissionsExt;
            findings.push(probe_write(dir));
            if meta.permissions().mode() & 0o002 != 0 {
                findings.push(Finding::warn(
                    CHECK,
                    format!("{shown} is writable by every user of this machine"),
                    format!("chmod o-w {shown}"),
                ));
            }
            dir.to_path_buf()
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let Some(parent) = existing_ancestor(dir) else {
                return vec![Finding::problem(
                    CHECK,
                    format!("{shown} cannot be made"),
                    "check the path",
                )];
            };
            match rustix::fs::access(&parent, rustix::fs::Access::WRITE_OK) {
                Ok(()) => findings.push(Finding::ok(
                    CHECK,
                    format!("{shown} does not exist yet; the node makes it in {}", parent.display()),
                )),
                Err(e) => findings.push(Finding::problem(
                    CHECK,
                    format!("{shown} does not exist and cannot be made in {}: {e}", parent.display()),
                    format!("make it for the node's user: install -d -o <user> {shown}"),
                )),
            }
            parent
        }
        Err(e) => {
            return vec![Finding::problem(
                CHECK,
                format!("{shown} cannot be read: {e}"),
                "check the permissions of the path",
            )];
        }
    };
    findings.push(check_free_space(&existing));
    findings
}

/// Writes, syncs and removes a file in `dir`.
fn probe_write(dir: &Path) -> Finding {
    let probe = dir.join(format!(".cell0-doctor-{}", std::process::id()));
    let written = (|| {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&probe)?;
        file.write_all(b"cell0 doctor\n")?;
        file.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    match written {
        Ok(()) => Finding::ok("data dir", format!("{} is writable", dir.display())),
        Err(e) => Finding::problem(
            "data dir",
            format!("{} is not writable: {e}", dir.display()),
            format!(
                "run doctor and the node as the data dir's owner, or chown -R <user> {}",
                dir.display()
            ),
        ),
    }
}

fn check_free_space(dir: &Path) -> Finding {
    const CHECK: &str = "disk";
    let stat = match rustix::fs::statvfs(dir) {
        Ok(stat) => stat,
        Err(e) => {
            return Finding::problem(
                CHECK,
                format!("cannot read the free space of {}: {e}", dir.display()),
                "check the path",
            );
        }
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    let total = stat.f_blocks.saturating_mul(stat.f_frsize);
    let percent = free.saturating_mul(100).checked_div(total).unwrap_or(0);
    let mib = |b: u64| b / (1 << 20);
    let detail = format!(
        "{} MiB free of {} MiB ({percent}%) on the filesystem of {}",
        mib(free),
        mib(total),
        dir.display()
    );
    if free < MIN_FREE_BYTES || percent < MIN_FREE_PERCENT {
        Finding::problem(
            CHECK,
            detail,
            format!(
                "free space there or move the data dir to a larger disk: the node needs at least {} MiB and {MIN_FREE_PERCENT}% free (a full disk stops every write)",
                mib(MIN_FREE_BYTES)
            ),
        )
    } else {
        Finding::ok(CHECK, detail)
    }
}

fn check_certificates(tls: &TlsConfig) -> Vec<Finding> {
    let files = [("ca certificate", &tls.ca_file), ("node certificate", &tls.cert_file)];
    if files.iter().all(|(_, f)| f.is_none()) {
        return vec![if tls.insecure {
            Finding::warn(
                "tls",
                "plaintext between nodes (--insecure): anyone who reaches the internal port can act as a node",
                "make certificates with `cell0 tls ca create` and `cell0 tls cert create`, then start with --tls-ca, --tls-cert and --tls-key",
            )
        } else {
            Finding::skipped("tls", "no certificate files are configured")
        }];
    }
    files
        .into_iter()
        .filter_map(|(check, file)| file.as_deref().map(|f| check_certificate(check, f)))
        .collect()
}

fn check_certificate(check: &str, file: &Path) -> Finding {
    let validity = match cell0_tls::Validity::of_file(file) {
        Ok(v) => v,
        Err(e) => {
            return Finding::problem(check, e.describe(), "point the flag at the PEM file `cell0 tls` wrote");
        }
    };
    let now = time::OffsetDateTime::now_utc();
    let date = |t: time::OffsetDateTime| t.date().to_string();
    let renew = "make a new one with `cell0 tls cert create` (a new CA with `cell0 tls ca create`) and replace the file: nodes reload certificate files without a restart";
    if now > validity.until {
        Finding::problem(
            check,
            format!("{} expired on {}", file.display(), date(validity.until)),
            renew,
        )
    } else if now < validity.from {
        Finding::problem(
            check,
            format!(
                "{} is not valid before {}: this machine's clock may be wrong",
                file.display(),
                date(validity.from)
            ),
            "check the clock (timedatectl) and time synchronisation",
        )
    } else {
        let days = (validity.until - now).whole_days();
        let detail = format!(
            "{} is valid until {} ({days} days)",
            file.display(),
            date(validity.until)
        );
        if days < CERT_WARN_DAYS {
            Finding::warn(check, detail, renew)
        } else {
            Finding::ok(check, detail)
        }
    }
}

async fn check_inference(conn: Conn, wanted: BackendKind) -> Finding {
    const CHECK: &str = "inference";
    let info = match InferenceClient::new(conn).info(v1::InferenceInfoRequest {}).await {
        Ok(info) => info.into_inner(),
        Err(s) => {
            let fix = match s.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => rpc_fix(&s),
                _ => "read the node's log; --inference-backend cpu runs the CPU engine",
            };
            return Finding::problem(
                CHECK,
                format!("the inference engine does not answer: {}", rpc_error_line(&s)),
                fix,
            );
        }
    };
    let detail = format!(
        "{} backend on {} ({} model(s) served)",
        info.backend,
        info.adapter,
        info.models.len()
    );
    if wanted == BackendKind::Wgpu && info.backend != "wgpu" {
        Finding::problem(
            CHECK,
            format!("wgpu was asked for but the node runs the {detail}"),
            "install a Vulkan driver (scripts/setup.sh installs lavapipe), or use --inference-backend cpu",
        )
    } else if info.models.is_empty() {
        Finding::warn(CHECK, detail, "add a model: cell0 model add (docs/inference.md)")
    } else {
        Finding::ok(CHECK, detail)
    }
}

/// How one member answered `Status`, with the clock offset it showed.
struct Answer {
    status: v1::StatusResponse,
    /// Its clock minus this machine's, at the middle of the round trip.
    offset_ms: i64,
    /// Half the round trip: how far off the offset may be.
    uncertainty_ms: i64,
}

async fn ask_status(conn: Conn) -> Result<Answer, String> {
    let sent = now_ms();
    let answer = tokio::time::timeout(PROBE_TIMEOUT, ClusterClient::new(conn).status(StatusRequest {})).await;
    let received = now_ms();
    let status = match answer {
        Ok(Ok(s)) => s.into_inner(),
        Ok(Err(s)) => return Err(rpc_error_line(&s)),
        Err(_) => return Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    };
    let middle = i64::try_from(sent / 2 + received / 2).unwrap_or(i64::MAX);
    let theirs = i64::try_from(status.unix_time_ms).unwrap_or(i64::MAX);
    Ok(Answer {
        status,
        offset_ms: theirs.saturating_sub(middle),
        uncertainty_ms: i64::try_from(received.saturating_sub(sent) / 2 + 1).unwrap_or(i64::MAX),
    })
}

/// The fix for a call the node refused or could not answer.
fn rpc_fix(s: &tonic::Status) -> &'static str {
    match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            "pass an ACL token that may read nodes and models (--token or CELL0_TOKEN)"
        }
        _ => "read the node's log (journalctl -u cell0)",
    }
}

async fn members_of(conn: Conn) -> Result<Vec<v1::Member>, tonic::Status> {
    let members = ClusterClient::new(conn)
        .members(MembersRequest {})
        .await?
        .into_inner()
        .members;
    Ok(members.into_iter().filter(|m| !m.gossip_only).collect())
}

async fn check_cluster(conn: Conn, wanted_voters: usize) -> Vec<Finding> {
    let mut findings = Vec::new();
    let local = match ClusterClient::new(conn.clone()).status(StatusRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            return vec![Finding::problem(
                "cluster",
                format!("the node does not answer Status: {}", rpc_error_line(&s)),
                rpc_fix(&s),
            )];
        }
    };
    let local_view = match members_of(conn).await {
        Ok(m) => m,
        Err(s) => {
            return vec![Finding::problem(
                "cluster",
                format!("the node does not answer Members: {}", rpc_error_line(&s)),
                rpc_fix(&s),
            )];
        }
    };
    if local.leader_id == 0 {
        return vec![Finding::problem(
            "cluster",
            format!("node {} knows no leader", local.node_name),
            "a majority of the voters must run and reach each other: see `cell0 members` and the nodes' logs",
        )];
    }
    // The leader's view decides: a node that left cannot hear its own
    // removal, so its own view may still list it.
    let leader_addr = local_view
        .iter()
        .find(|m| m.id == local.leader_id && m.id != local.node_id)
        .map(|m| m.public_addr.clone());
    let members = match leader_addr {
        Some(addr) => match connect(&addr).await {
            Ok(c) => members_of(c).await.unwrap_or(local_view),
            Err(_) => local_view,
        },
        None => local_view,
    };
    if !members.iter().any(|m| m.id == local.node_id) {
        return vec![Finding::problem(
            "cluster",
            format!(
                "node {} is not a member of its cluster: it left or was removed",
                local.node_name
            ),
            "start it with --join naming a member, and it is added again (docs/operations.md, Cluster membership)",
        )];
    }
    let leader = members
        .iter()
        .find(|m| m.id == local.leader_id)
        .map_or_else(|| format!("{:016x}", local.leader_id), |m| m.name.clone());
    let voters = members.iter().filter(|m| m.voter).count();
    let detail = format!("leader {leader}, {} member(s), {voters} voter(s)", members.len());
    findings.push(if voters < wanted_voters {
        Finding::warn(
            "cluster",
            format!("{detail}; raft.voters asks for {wanted_voters}"),
            "add nodes: a node that joins while the cluster is short of voters becomes one",
        )
    } else {
        Finding::ok("cluster", detail)
    });
    let mut worst_offset: Option<(String, i64)> = None;
    for m in &members {
        let check = format!("member {}", m.name);
        let id = format!("{:016x}", m.id);
        if let Some(l) = m.liveness.as_ref().filter(|l| l.state == "dead") {
            findings.push(Finding::problem(
                check,
                format!("node {} ({id}) is recorded dead: {}", m.name, l.reason),
                format!("restart it, or remove it for good with `cell0 remove {id}`"),
            ));
            continue;
        }
        let answer = match connect(&m.public_addr).await {
            Ok(c) => ask_status(c).await,
            Err(e) => Err(format!("{e:#}")),
        };
        match answer {
            Err(e) => findings.push(Finding::problem(
                check,
                format!("node {} ({id}) does not answer at {}: {e}", m.name, m.public_addr),
                format!("start it, or check the network between the nodes; `cell0 remove {id}` removes it for good"),
            )),
            Ok(a) => {
                let off = a.offset_ms.abs().saturating_sub(a.uncertainty_ms).max(0);
                if off > MAX_CLOCK_OFFSET_MS {
                    let direction = if a.offset_ms > 0 { "ahead of" } else { "behind" };
                    findings.push(Finding::problem(
                        "clock",
                        format!(
                            "the clock of {} is {} ms {direction} this machine's (±{} ms)",
                            m.name,
                            a.offset_ms.abs(),
                            a.uncertainty_ms
                        ),
                        "run time synchronisation (chrony or systemd-timesyncd) on every node",
                    ));
                }
                if worst_offset.as_ref().is_none_or(|(_, w)| a.offset_ms.abs() > w.abs()) {
                    worst_offset = Some((m.name.clone(), a.offset_ms));
                }
                let lag = a.status.commit_index.saturating_sub(a.status.applied_index);
                findings.push(Finding::ok(
                    check,
                    format!(
                        "{} answers at {}, applied index {} (lag {lag})",
                        if m.voter { "voter" } else { "learner" },
                        m.public_addr,
                        a.status.applied_index
                    ),
                ));
            }
        }
    }
    if let Some((name, offset)) = worst_offset
        && !findings.iter().any(|f| f.check == "clock")
    {
        findings.push(Finding::ok(
            "clock",
            format!("every answering member within {MAX_CLOCK_OFFSET_MS} ms (largest offset {offset} ms, {name})"),
        ));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_address_is_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:7100".parse().unwrap();
        assert_eq!(local(any), "127.0.0.1:7100".parse::<SocketAddr>().unwrap());
        let any6: SocketAddr = "[::]:7100".parse().unwrap();
        assert_eq!(local(any6), "[::1]:7100".parse::<SocketAddr>().unwrap());
        let given: SocketAddr = "10.0.0.5:7100".parse().unwrap();
        assert_eq!(local(given), given);
    }

    #[test]
    fn a_data_dir_that_is_a_file_or_cannot_be_written_is_a_problem() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let findings = check_data_dir(&file);
        assert_eq!(findings[0].verdict, Verdict::Problem, "{findings:?}");
        assert!(findings[0].detail.contains("not a directory"));
        let missing = root.path().join("a/b");
        let findings = check_data_dir(&missing);
        assert!(findings[0].detail.contains("does not exist yet"), "{findings:?}");
        assert!(findings.iter().any(|f| f.check == "disk"), "{findings:?}");
    }

    #[test]
    fn an_expired_certificate_is_a_problem_and_a_missing_one_is_named() {
        let root = tempfile::tempdir().unwrap();
        let ca = cell0_tls::CaFiles::in_dir(root.path());
        let now = time::OffsetDateTime::now_utc();
        let expired = cell0_tls::Validity {
            from: now - time::Duration::days(10),
            until: now - time::Duration::days(1),
        };
        cell0_tls::certs::create_ca(&ca, "test", expired).unwrap();
        let f = check_certificate("ca certificate", &ca.cert);
        assert_eq!(f.verdict, Verdict::Problem);
        assert!(f.detail.contains("expired"), "{f:?}");
        let soon = cell0_tls::Validity::days(3).unwrap();
        let ca2 = cell0_tls::CaFiles::in_dir(&root.path().join("x"));
        std::fs::create_dir_all(root.path().join("x")).unwrap();
        cell0_tls::certs::create_ca(&ca2, "test", soon).unwrap();
        assert_eq!(check_certificate("ca certificate", &ca2.cert).verdict, Verdict::Warn);
        let f = check_certificate("node certificate", &root.path().join("missing.pem"));
        assert_eq!(f.verdict, Verdict::Problem);
        assert!(f.detail.contains("missing.pem"), "{f:?}");
    }
}
