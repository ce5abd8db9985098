//! The audit log: one JSON line per mutating call and per denied call on
//! the public port (`[audit]`, `--audit`), written by one named worker and
//! rotated by size.
//!
//! A line: `{"time":"2026-12-03T16:40:01.123Z","time_ms":..,
//! "principal":"token:<accessor>"|"anonymous","client":"127.0.0.1",
//! "method":"/cell0.v1.Kv/Put","target":"key \"app/x\"",
//! "result":"OK"|"PERMISSION_DENIED"|..,"trace_id":".."}`.
//!
//! Invariants:
//! - A line never holds a secret: principals are accessors, targets are
//!   names and keys (never values), and no header is copied.
//! - Callers wait when the worker falls behind (a bounded queue), so no
//!   line is dropped while the node runs; lines reach the OS after each
//!   batch and the disk (fsync) at each rotation and at shutdown.
//! - When the file would pass `max_bytes`, it becomes `audit.log.1`, older
//!   ones shift up, and the one past `max_files` is deleted.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::AuditConfig;
use crate::supervisor::stopped;

/// Lines queued before callers wait.
const QUEUE: usize = 4096;

/// Lines written per batch at most.
const BATCH: usize = 512;

/// How long the worker keeps writing queued lines after the node stops.
const DRAIN: Duration = Duration::from_secs(5);

/// What one audited call did.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// `token:<accessor>` or `anonymous`.
    pub principal: String,
    /// The client's address.
    pub client: Option<IpAddr>,
    /// The gRPC path.
    pub method: String,
    /// What the call named (`key "app/x"`, `agent a`), if known.
    pub target: Option<String>,
    /// The gRPC status the call got.
    pub result: tonic::Code,
    /// The call's trace id.
    pub trace_id: String,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    time_ms: u64,
    principal: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<String>,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a str>,
    result: String,
    trace_id: &'a str,
}

/// The sending side, shared by the public server's layer.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<(SystemTime, AuditRecord)>,
}

impl AuditLog {
    /// Queues a line, waiting while the queue is full.
    pub async fn record(&self, record: AuditRecord) {
        if self.tx.send((SystemTime::now(), record)).await.is_err() {
            metrics::counter!("cell0_audit_dropped_total").increment(1);
        }
    }
}

/// Opens the log at `path` and returns its sender and the worker to run
/// (as task `audit`).
pub fn open(
    config: &AuditConfig,
    path: PathBuf,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(AuditLog, impl Future<Output = anyhow::Result<()>> + use<>)> {
    let file = AuditFile::open(path, config.max_bytes, config.max_files)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    Ok((AuditLog { tx }, write_loop(file, rx, stop)))
}

async fn write_loop(
    mut file: AuditFile,
    mut rx: mpsc::Receiver<(SystemTime, AuditRecord)>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
            }
            _ = stopped(&mut stop) => {
                // Lines of calls still finishing: until the senders are gone
                // or the drain time is up.
                let deadline = tokio::time::Instant::now() + DRAIN;
                while let Ok(n) = tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, BATCH)).await {
                    if n == 0 {
                        break;
                    }
                    file = write_batch(file, std::mem::take(&mut batch)).await?;
                }
                break;
            }
        }
        file = write_batch(file, std::mem::take(&mut batch)).await?;
    }
    // Every way out of the loop leaves the batch written (`recv_many` is
    // cancel-safe: a drain cut short by its deadline received nothing).
    tokio::task::spawn_blocking(move || file.sync())
        .await
        .context("audit log task")?
}

async fn write_batch(mut file: AuditFile, batch: Vec<(SystemTime, AuditRecord)>) -> anyhow::Result<AuditFile> {
    if batch.is_empty() {
        return Ok(file);
    }
    tokio::task::spawn_blocking(move || {
        for (at, record) in &batch {
            file.append(&render(*at, record)?)?;
        }
        file.flush()?;
        metrics::counter!("cell0_audit_lines_total").increment(batch.len() as u64);
        Ok(file)
    })
    .await
    .context("audit log task")?
}

fn render(at: SystemTime, r: &AuditRecord) -> anyhow::Result<Vec<u8>> {
    let time_ms = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let line = Line {
        time: rfc3339_ms(time_ms),
        time_ms,
        principal: &r.principal,
        client: r.client.map(|c| c.to_string()),
        method: &r.method,
        target: r.target.as_deref(),
        result: code_name(r.result),
        trace_id: &r.trace_id,
    };
    let mut out = serde_json::to_vec(&line).context("encoding an audit line")?;
    out.push(b'\n');
    Ok(out)
}

/// `PermissionDenied` as `PERMISSION_DENIED`, as gRPC spells codes.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in crate::api::code_label(code).chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// The open file and its rotation.
struct AuditFile {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    size: u64,
    max_bytes: u64,
    max_files: u32,
}

impl AuditFile {
    fn open(path: PathBuf, max_bytes: u64, max_files: u32) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let (out, size) = open_append(&path)?;
        Ok(Self {
            path,
            out,
            size,
            max_bytes,
            max_files,
        })
    }

    fn append(&mut self, line: &[u8]) -> anyhow::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.out
            .write_all(line)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn sync(mut self) -> anyhow::Result<()> {
        self.flush()?;
        self.out
            .get_ref()
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))
    }

    fn rotate(&mut self) -> anyhow::Result<()> {
        self.flush()?;
        self.out
            .get_ref()
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        let numbered = |n: u32| rotated(&self.path, n);
        let _ = std::fs::remove_file(numbered(self.max_files));
        for n in (1..self.max_files).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1)).with_context(|| format!("rotating {}", from.display()))?;
            }
        }
        std::fs::rename(&self.path, numbered(1)).with_context(|| format!("rotating {}", self.path.display()))?;
        let (out, size) = open_append(&self.path)?;
        self.out = out;
        self.size = size;
        metrics::counter!("cell0_audit_rotations_total").increment(1);
        Ok(())
    }
}

/// `audit.log.N` next to `path`.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{n}"));
    path.with_file_name(name)
}

fn open_append(path: &Path) -> anyhow::Result<(std::io::BufWriter<std::fs::File>, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the audit log {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((std::io::BufWriter::new(file), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> AuditRecord {
        AuditRecord {
            principal: "anonymous".into(),
            client: Some("127.0.0.1".parse().unwrap()),
            method: "/cell0.v1.Kv/Put".into(),
            target: Some(format!("key \"k{i}\"")),
            result: tonic::Code::PermissionDenied,
            trace_id: format!("{i:016x}"),
        }
    }

    #[test]
    fn times_and_codes_are_spelled_as_people_expect() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_796_255_999_999), "2026-12-02T23:59:59.999Z");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
    }

    #[tokio::test]
    async fn lines_are_json_and_the_file_rotates_by_size_keeping_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let config = AuditConfig {
            enabled: true,
            path: Some(path.clone()),
            max_bytes: 4096,
            max_files: 2,
        };
        let (tx, stop) = watch::channel(false);
        let (log, worker) = open(&config, path.clone(), stop).unwrap();
        let worker = tokio::spawn(worker);
        for i in 0..200 {
            log.record(record(i)).await;
        }
        tx.send(true).unwrap();
        drop(log);
        worker.await.unwrap().unwrap();

        let mut lines = Vec::new();
        for file in [rotated(&path, 2), rotated(&path, 1), path.clone()] {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.len() as u64 <= config.max_bytes, "{} is too big", file.display());
            lines.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()),
            );
        }
        assert!(!rotated(&path, 3).exists(), "only max_files rotated files are kept");
        // The newest lines survive, in order, each with every field.
        let last = lines.last().unwrap();
        assert_eq!(last["trace_id"], format!("{:016x}", 199));
        assert_eq!(last["result"], "PERMISSION_DENIED");
        assert_eq!(last["method"], "/cell0.v1.Kv/Put");
        assert_eq!(last["client"], "127.0.0.1");
        let ids: Vec<u64> = lines
            .iter()
            .map(|l| u64::from_str_radix(l["trace_id"].as_str().unwrap(), 16).unwrap())
            .collect();
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "lines are contiguous: {ids:?}"
        );
        assert!(ids.len() < 200, "old lines were rotated away");
    }
}
