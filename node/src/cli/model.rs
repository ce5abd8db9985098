//! `cell0 model ...`: the replicated model registry.
//!
//! `add` hashes every file of a directory, streams each to the answering
//! node (which verifies it) and then registers the manifest; the other
//! nodes fetch the files from it in the background.
//!
//! An upload has no overall deadline, since a large file on a slow link may
//! take far longer than any fixed limit; it fails only when the node stops
//! taking its data for [`UPLOAD_IDLE_TIMEOUT`].

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::Context;
use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::models_client::ModelsClient;
use cell0_proto::v1::{self, upload_request::Part};
use clap::Subcommand;
use futures::Stream;
use serde::Serialize;

use super::{Output, REQUEST_TIMEOUT, connect, connect_streaming, print_json, print_list, rpc_error};

/// Bytes per upload message.
const UPLOAD_CHUNK_BYTES: usize = 1 << 20;
/// An upload fails when the node takes none of its data for this long.
const UPLOAD_IDLE_TIMEOUT: Duration = REQUEST_TIMEOUT;
/// After the last chunk the node syncs the file before it answers: it gets
/// the idle timeout plus one second per this many bytes of the file.
const SYNC_BYTES_PER_SECOND: u64 = 64 << 20;

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
        let mut progress = super::ProgressLine::new(format!("uploading {label}"), size, UPLOAD_CHUNK_BYTES as u64 + 1);
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK_BYTES];
            let n = match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            sent += n as u64;
            progress.update(sent);
            let msg = v1::UploadRequest {
                part: Some(Part::Data(buf.into())),
            };
            if tx.blocking_send(msg).is_err() {
                return;
            }
        }
        progress.finish();
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// When the transport last took a message of an upload, and whether it
/// took them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    last: Instant,
    ended: bool,
}

fn read_progress(p: &Mutex<Progress>) -> Progress {
    *p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Passes an upload's messages through, noting when each is taken.
struct Watched<S> {
    inner: S,
    progress: Arc<Mutex<Progress>>,
}

impl<S: Stream + Unpin> Stream for Watched<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<S::Item>> {
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(item) = &next {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            p.last = Instant::now();
            p.ended = item.is_none();
        }
        next
    }
}

/// Uploads one file and returns whether the node stored it (false: it held
/// it already). The call has no overall deadline; it fails when the node
/// takes no data for `idle`, or, once every chunk is sent, does not answer
/// within `idle` plus the time to sync the file.
async fn upload_file(
    client: &mut ModelsClient<super::Conn>,
    path: PathBuf,
    sha256: String,
    size: u64,
    label: String,
    idle: Duration,
) -> anyhow::Result<bool> {
    let progress = Arc::new(Mutex::new(Progress {
        last: Instant::now(),
        ended: false,
    }));
    let stream = Watched {
        inner: upload_stream(path, sha256, size, label),
        progress: progress.clone(),
    };
    let after_last = idle + Duration::from_secs(size / SYNC_BYTES_PER_SECOND);
    let call = client.upload(stream);
    tokio::pin!(call);
    loop {
        let seen = read_progress(&progress);
        let limit = if seen.ended { after_last } else { idle };
        tokio::select! {
            reply = &mut call => return Ok(reply.map_err(rpc_error)?.into_inner().stored),
            () = tokio::time::sleep_until((seen.last + limit).into()) => {
                if read_progress(&progress) != seen {
                    continue;
                }
                if seen.ended {
                    anyhow::bail!(
                        "the node did not confirm the file within {} s of its last chunk",
                        limit.as_secs_f64()
                    );
                }
                anyhow::bail!(
                    "the node took no upload data for {} s; it may be overloaded or unreachable \
                     (an upload that keeps moving has no time limit)",
                    idle.as_secs_f64()
                );
            }
        }
    }
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
    let mut uploader = ModelsClient::new(connect_streaming(endpoint).await?);
    for (rel, path, sha256, size) in uploads {
        let stored = upload_file(&mut uploader, path, sha256, size, rel.clone(), UPLOAD_IDLE_TIMEOUT)
            .await
            .with_context(|| format!("uploading {rel}"))?;
        if !stored {
            eprintln!("  {rel}: already on the node");
        }
    }
    let total_bytes = manifest_files.iter().map(|f| f.size).sum();
    let count = manifest_files.len();
    let created = ModelsClient::new(connect(endpoint).await?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use cell0_proto::v1::models_server::{Models, ModelsServer};
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status, Streaming};

    /// A node that takes upload messages one per `pace`, or none after the
    /// header when `pace` is `None`.
    struct SlowNode {
        pace: Option<Duration>,
    }

    #[tonic::async_trait]
    impl Models for SlowNode {
        async fn upload(
            &self,
            request: Request<Streaming<v1::UploadRequest>>,
        ) -> Result<Response<v1::UploadResponse>, Status> {
            let mut stream = request.into_inner();
            while stream.message().await?.is_some() {
                match self.pace {
                    Some(pace) => tokio::time::sleep(pace).await,
                    None => std::future::pending::<()>().await,
                }
            }
            Ok(Response::new(v1::UploadResponse { stored: true }))
        }

        async fn add(&self, _: Request<v1::AddModelRequest>) -> Result<Response<v1::AddModelResponse>, Status> {
            Err(Status::unimplemented("add"))
        }

        async fn list(&self, _: Request<v1::ListModelsRequest>) -> Result<Response<v1::ListModelsResponse>, Status> {
            Err(Status::unimplemented("list"))
        }

        async fn remove(
            &self,
            _: Request<v1::RemoveModelRequest>,
        ) -> Result<Response<v1::RemoveModelResponse>, Status> {
            Err(Status::unimplemented("remove"))
        }
    }

    /// Starts `node` on a loopback port and returns a streaming client of it.
    async fn serve(node: SlowNode) -> ModelsClient<crate::cli::Conn> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ModelsServer::new(node))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        ModelsClient::new(connect_streaming(&addr.to_string()).await.unwrap())
    }

    /// A file of `chunks` upload messages.
    fn file(dir: &Path, chunks: usize) -> (PathBuf, u64) {
        let path = dir.join("model.safetensors");
        std::fs::write(&path, vec![0u8; chunks * UPLOAD_CHUNK_BYTES]).unwrap();
        (path, (chunks * UPLOAD_CHUNK_BYTES) as u64)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_that_keeps_moving_outlives_the_idle_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (path, size) = file(dir.path(), 32);
        let mut client = serve(SlowNode {
            pace: Some(Duration::from_millis(100)),
        })
        .await;
        let idle = Duration::from_secs(2);
        let started = Instant::now();
        let stored = upload_file(&mut client, path, "0".repeat(64), size, "f".into(), idle)
            .await
            .unwrap();
        assert!(stored);
        assert!(
            started.elapsed() > idle,
            "the upload ran longer than the idle timeout ({:?})",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_the_node_stops_taking_fails_after_the_idle_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (path, size) = file(dir.path(), 32);
        let mut client = serve(SlowNode { pace: None }).await;
        let err = upload_file(
            &mut client,
            path,
            "0".repeat(64),
            size,
            "f".into(),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("took no upload data for 1 s"), "{err:#}");
    }
}
