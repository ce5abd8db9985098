//! `cell0 snapshot save | restore | inspect` and `cell0 operator recover`:
//! backups, restores and disaster recovery.
//!
//! `save` is a client of any node (the node serves a consistent snapshot as
//! of a linearizable read); `restore`, `inspect` and `recover` work offline
//! on files and data dirs. A saved file is written under a temporary name
//! and renamed only once its checksum is verified, so a file named FILE is
//! always whole; a damaged or truncated file is refused by every command
//! with what is wrong with it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cell0_consensus::offline;
use cell0_proto::v1;
use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_storage::snapshot::{self, FileSummary};
use serde::Serialize;

use super::{Output, ProgressLine, connect_streaming, print_json, rpc_error};
use crate::config::NodeConfig;
use crate::datadir::DataDir;

/// Files smaller than this show no progress.
const PROGRESS_MIN_BYTES: u64 = 8 << 20;

/// What `save` and `inspect` report about a file.
#[derive(Debug, Serialize)]
pub struct FileReport {
    /// The file.
    pub file: PathBuf,
    /// The log index the state is at.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// The cluster the state belongs to, hex.
    pub cluster_id: String,
    /// Size of the file.
    pub size_bytes: u64,
    /// Number of state rows.
    pub rows: u64,
    /// SHA-256 of the file up to its checksum, hex.
    pub sha256: String,
    /// When the node wrote it, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

fn report(file: &Path, summary: &FileSummary) -> anyhow::Result<FileReport> {
    let (index, term) =
        offline::position(summary).with_context(|| format!("{} has an unreadable header", file.display()))?;
    Ok(FileReport {
        file: file.to_path_buf(),
        index,
        term,
        cluster_id: format!("{:016x}", summary.header.cluster_id),
        size_bytes: summary.file_bytes,
        rows: summary.rows,
        sha256: summary.sha256.clone(),
        created_unix_ms: summary.header.created_unix_ms,
    })
}

fn print_report(r: &FileReport, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(r),
        Output::Table => {
            super::print_table(
                &["FILE", "INDEX", "TERM", "CLUSTER", "SIZE", "ROWS", "SHA256"],
                &[vec![
                    r.file.display().to_string(),
                    r.index.to_string(),
                    r.term.to_string(),
                    r.cluster_id.clone(),
                    format!("{:.1} MiB", r.size_bytes as f64 / (1024.0 * 1024.0)),
                    r.rows.to_string(),
                    r.sha256.clone(),
                ]],
            );
            Ok(())
        }
    }
}

/// Reads and checks all of `file`, showing progress.
fn verify(file: &Path) -> anyhow::Result<FileSummary> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let mut progress = ProgressLine::new(format!("checking {}", file.display()), size, PROGRESS_MIN_BYTES);
    let summary = snapshot::verify(file, &mut |done, _| progress.update(done));
    progress.finish();
    Ok(summary?)
}

/// `cell0 snapshot save FILE`: streams a consistent snapshot from the node
/// at `endpoint` into FILE.
pub async fn save(endpoint: &str, output: Output, file: &Path) -> anyhow::Result<()> {
    if file.exists() {
        bail!("{} already exists; choose a new file name", file.display());
    }
    let mut client = ClusterClient::new(connect_streaming(endpoint).await?).max_decoding_message_size(4 << 20);
    let mut stream = client
        .save_snapshot(v1::SaveSnapshotRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let part = snapshot::part_path(file);
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&part).with_context(|| format!("cannot create {}", part.display()))?,
    );
    let mut progress = None;
    let mut received = 0u64;
    let written: anyhow::Result<()> = async {
        // Each message must come within this long of the previous one.
        let idle = super::REQUEST_TIMEOUT;
        loop {
            let msg = match tokio::time::timeout(idle, stream.message()).await {
                Err(_) => bail!("the node sent nothing for {}s", idle.as_secs()),
                Ok(m) => m.map_err(rpc_error)?,
            };
            let Some(msg) = msg else { break };
            if let Some(info) = msg.info {
                progress = Some(ProgressLine::new(
                    format!("saving snapshot at index {}", info.index),
                    info.size_bytes,
                    PROGRESS_MIN_BYTES,
                ));
            }
            out.write_all(&msg.data)
                .with_context(|| format!("cannot write {}", part.display()))?;
            received += msg.data.len() as u64;
            if let Some(p) = progress.as_mut() {
                p.update(received);
            }
        }
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(())
    }
    .await;
    if let Some(p) = progress.as_mut() {
        p.finish();
    }
    let summary = written.and_then(|()| verify(&part));
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e.context("the snapshot was not saved"));
        }
    };
    std::fs::rename(&part, file).with_context(|| format!("cannot rename {} to {}", part.display(), file.display()))?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        snapshot::sync_dir(dir)?;
    }
    print_report(&report(file, &summary)?, output)
}

/// `cell0 snapshot inspect FILE`: checks a file and describes it.
pub fn inspect(output: Output, file: &Path) -> anyhow::Result<()> {
    let summary = verify(file)?;
    print_report(&report(file, &summary)?, output)
}

/// What `restore` did.
#[derive(Debug, Serialize)]
struct RestoreOutput {
    data_dir: PathBuf,
    node_id: String,
    node_name: String,
    cluster_id: String,
    previous_cluster_id: String,
    index: u64,
    rows: u64,
}

/// `cell0 snapshot restore FILE --data-dir DIR`: a new data dir holding the
/// file's state, as the only voter of a new cluster, with the identity the
/// node will run with (`config`: the same flags as `cell0 run`).
pub async fn restore(output: Output, file: &Path, config: &NodeConfig) -> anyhow::Result<()> {
    let summary = verify(file)?;
    let dir = &config.data_dir;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} is not empty; restore into a new or empty directory", dir.display());
    }
    let datadir = DataDir::open(dir)?;
    let info = crate::server::node_info(config, datadir.node_id());
    let name = info.name.clone();
    let rows = summary.rows;
    let report = offline::restore(&datadir.raft_dir(), datadir.node_id(), info, file, summary)
        .await
        .context("restoring the snapshot")?;
    let out = RestoreOutput {
        data_dir: dir.clone(),
        node_id: format!("{:016x}", datadir.node_id()),
        node_name: name,
        cluster_id: format!("{:016x}", report.cluster_id),
        previous_cluster_id: format!("{:016x}", report.old_cluster_id),
        index: report.index,
        rows,
    };
    match output {
        Output::Json => print_json(&out),
        Output::Table => {
            println!(
                "restored {} rows (log index {}) into {} as node {} ({}) of a new cluster {} (was {}).",
                out.rows,
                out.index,
                dir.display(),
                out.node_id,
                out.node_name,
                out.cluster_id,
                out.previous_cluster_id
            );
            println!(
                "Start it with `cell0 run --data-dir {}` and the same name and addresses, then start the other nodes \
                 on empty data dirs with --join pointing at it.",
                dir.display()
            );
            Ok(())
        }
    }
}

/// `a, b` or `none`.
fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// What `recover` did.
#[derive(Debug, Serialize)]
struct RecoverOutput {
    data_dir: PathBuf,
    node_id: String,
    dry_run: bool,
    kept_last_index: u64,
    kept_last_term: u64,
    term: u64,
    removed: Vec<String>,
}

/// `cell0 operator recover --data-dir DIR`: forces this stopped node's
/// store into a one-member configuration after quorum is lost.
pub async fn recover(output: Output, dir: &Path, dry_run: bool) -> anyhow::Result<()> {
    if !dir.join("node.json").is_file() {
        bail!("{} is not a Cell0 data dir (no node.json)", dir.display());
    }
    let datadir = DataDir::open(dir)?;
    let report = offline::recover(&datadir.raft_dir(), datadir.node_id(), dry_run)
        .await
        .context("recovering the data dir")?;
    let out = RecoverOutput {
        data_dir: dir.to_path_buf(),
        node_id: format!("{:016x}", datadir.node_id()),
        dry_run,
        kept_last_index: report.kept_last_index,
        kept_last_term: report.kept_last_term,
        term: report.term,
        removed: report.removed.iter().map(|id| format!("{id:016x}")).collect(),
    };
    match output {
        Output::Json => print_json(&out),
        Output::Table if dry_run => {
            println!(
                "node {} has entries up to index {} (term {}); recovering it would remove: {}. Nothing was changed.",
                out.node_id,
                out.kept_last_index,
                out.kept_last_term,
                list_or_none(&out.removed)
            );
            Ok(())
        }
        Output::Table => {
            println!(
                "node {} is now the only member (term {}); every entry up to index {} is kept. Removed: {}.",
                out.node_id,
                out.term,
                out.kept_last_index,
                list_or_none(&out.removed)
            );
            println!(
                "Start it with `cell0 run --data-dir {}`; wipe the data dirs of the removed nodes before they join again.",
                dir.display()
            );
            Ok(())
        }
    }
}
