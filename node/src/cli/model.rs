//! `cell0 model ...`: the replicated model registry.
//!
//! `add` hashes every file of a directory, streams each to the answering
//! node (which verifies it) and then registers the manifest; the other
//! nodes fetch the files from it in the background.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::models_client::ModelsClient;
use cell0_proto::v1::{self, upload_request::Part};
use clap::Subcommand;
use serde::Serialize;

use super::{Output, connect, print_json, print_list, rpc_error};

/// Bytes per upload message.
const UPLOAD_CHUNK_BYTES: usize = 1 << 20;

/// Model registry commands.
#[derive(Subcommand)]
pub enum ModelCommand {
    /// Register the model files in DIR as NAME version VERSION.
    #[command(disable_version_flag = true)]
    Add {
        /// Directory holding the model (config.json, tokenizer.json,
        /// model.safetensors, ...); every file in it is part of the model.
        dir: PathBuf,
        /// Model name ([a-z0-9._-], at most 64 bytes).
        #[arg(long)]
        name: String,
        /// Version (1 or more).
        #[arg(long)]
        version: u32,
        /// What the engine loads it as.
        #[arg(long, default_value = cell0_inference::MINILM_L6_V2)]
        architecture: String,
    },
    /// List registered versions and the nodes that hold them.
    Ls,
    /// Unregister a version; every node deletes its files.
    #[command(disable_version_flag = true)]
    Rm {
        /// Model name.
        name: String,
        /// Version.
        #[arg(long)]
        version: u32,
    },
}

/// Runs a model command against `endpoint`.
pub async fn run(endpoint: &str, output: Output, cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Add {
            dir,
            name,
            version,
            architecture,
        } => add(endpoint, output, &dir, name, version, architecture).await,
        ModelCommand::Ls => ls(endpoint, output).await,
        ModelCommand::Rm { name, version } => {
            let mut client = ModelsClient::new(connect(endpoint).await?);
            client
                .remove(v1::RemoveModelRequest {
                    name: name.clone(),
                    version,
                })
                .await
                .map_err(rpc_error)?;
            eprintln!("removed {name} version {version}");
            Ok(())
        }
    }
}

/// Every regular file under `dir`, as sorted `/`-separated relative paths.
fn list_files(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).with_context(|| format!("cannot read directory {}", d.display()))?;
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let rel = path
                    .strip_prefix(dir)?
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, path));
            }
        }
    }
    out.sort();
    if out.is_empty() {
        anyhow::bail!("{} holds no files", dir.display());
    }
    Ok(out)
}

fn hash_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    Ok((cell0_inference::model::sha256_file(path)?, size))
}

/// Streams `path` as an upload: header first, then 1 MiB chunks, read on a
/// blocking thread and printing progress.
fn upload_stream(
    path: PathBuf,
    sha256: String,
    size: u64,
    label: String,
) -> impl tokio_stream::Stream<Item = v1::UploadRequest> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let header = v1::UploadRequest {
            part: Some(Part::Header(v1::BlobHeader { sha256, size })),
        };
        if tx.blocking_send(header).is_err() {
            return;
        }
        let Ok(mut f) = std::fs::File::open(&path) else { return };
        let mut sent = 0u64;
        let mut last_pct = u64::MAX;
        // A terminal gets one updating line; a log gets a line per 10 %.
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK_BYTES];
            let n = match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            sent += n as u64;
            let pct = sent * 100 / size.max(1);
            let step = if tty { pct } else { pct / 10 * 10 };
            if step != last_pct && size > UPLOAD_CHUNK_BYTES as u64 {
                if tty {
                    eprint!("\r  uploading {label} {pct:>3}%");
                } else {
                    eprintln!("  uploading {label} {step:>3}%");
                }
                last_pct = step;
            }
            let msg = v1::UploadRequest {
                part: Some(Part::Data(buf.into())),
            };
            if tx.blocking_send(msg).is_err() {
                return;
            }
        }
        if last_pct != u64::MAX && tty {
            eprintln!();
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[derive(Serialize)]
struct AddView {
    name: String,
    version: u32,
    files: usize,
    total_bytes: u64,
    created: bool,
}

async fn add(
    endpoint: &str,
    output: Output,
    dir: &Path,
    name: String,
    version: u32,
    architecture: String,
) -> anyhow::Result<()> {
    let files = list_files(dir)?;
    let mut manifest_files = Vec::with_capacity(files.len());
    let mut uploads = Vec::with_capacity(files.len());
    eprintln!("hashing {} files in {}", files.len(), dir.display());
    for (rel, path) in files {
        let (sha256, size) = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || hash_file(&path)).await??
        };
        manifest_files.push(v1::ModelFile {
            path: rel.clone(),
            sha256: sha256.clone(),
            size,
        });
        uploads.push((rel, path, sha256, size));
    }
    let channel = connect(endpoint).await?;
    let mut client = ModelsClient::new(channel);
    for (rel, path, sha256, size) in uploads {
        let reply = client
            .upload(upload_stream(path, sha256, size, rel.clone()))
            .await
            .map_err(rpc_error)
            .with_context(|| format!("uploading {rel}"))?
            .into_inner();
        if !reply.stored {
            eprintln!("  {rel}: already on the node");
        }
    }
    let total_bytes = manifest_files.iter().map(|f| f.size).sum();
    let count = manifest_files.len();
    let created = client
        .add(v1::AddModelRequest {
            manifest: Some(v1::ModelManifest {
                name: name.clone(),
                version,
                architecture,
                files: manifest_files,
            }),
        })
        .await
        .map_err(rpc_error)?
        .into_inner()
        .created;
    let view = AddView {
        name,
        version,
        files: count,
        total_bytes,
        created,
    };
    match output {
        Output::Json => print_json(&view),
        Output::Table => {
            println!(
                "{} {} version {} ({} files, {:.1} MB); the other nodes fetch it in the background (see `cell0 model ls`)",
                if created { "registered" } else { "already registered:" },
                view.name,
                view.version,
                view.files,
                view.total_bytes as f64 / 1e6
            );
            Ok(())
        }
    }
}

#[derive(Serialize)]
struct VersionView {
    name: String,
    version: u32,
    architecture: String,
    files: usize,
    total_bytes: u64,
    holders: Vec<String>,
}

async fn ls(endpoint: &str, output: Output) -> anyhow::Result<()> {
    let channel = connect(endpoint).await?;
    let models = ModelsClient::new(channel.clone())
        .list(v1::ListModelsRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner()
        .models;
    let names: BTreeMap<u64, String> = ClusterClient::new(channel)
        .members(v1::MembersRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner()
        .members
        .into_iter()
        .map(|m| (m.id, m.name))
        .collect();
    let views: Vec<VersionView> = models
        .into_iter()
        .filter_map(|m| {
            let manifest = m.manifest?;
            Some(VersionView {
                name: manifest.name,
                version: manifest.version,
                architecture: manifest.architecture,
                files: manifest.files.len(),
                total_bytes: m.total_bytes,
                holders: m
                    .holders
                    .iter()
                    .map(|id| names.get(id).cloned().unwrap_or_else(|| format!("{id:016x}")))
                    .collect(),
            })
        })
        .collect();
    print_list(
        output,
        views,
        &["NAME", "VERSION", "ARCHITECTURE", "FILES", "SIZE", "HELD BY"],
        |v| {
            vec![
                v.name,
                v.version.to_string(),
                v.architecture,
                v.files.to_string(),
                format!("{:.1} MB", v.total_bytes as f64 / 1e6),
                v.holders.join(","),
            ]
        },
    )
}
