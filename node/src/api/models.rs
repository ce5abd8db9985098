//! `cell0.v1.Models`: uploads of model files to this node and the
//! replicated registry of model versions.
//!
//! An upload is admitted against the node's upload quota and free-space
//! reserve (`ResourceExhausted` otherwise), must keep sending (an upload idle
//! for `models.upload_idle_timeout_secs` is aborted with `DeadlineExceeded`
//! and its partial file deleted), and pins its blob from before the node
//! looks for it until the `Add` that uses it was applied here.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cell0_consensus::{
    Consensus, ConsensusError, Consistency, MAX_MODEL_BYTES, ModelCommand, ModelFile, ModelManifest, ModelOutcome,
    is_sha256_hex, registry,
};
use cell0_proto::v1::models_server::Models;
use cell0_proto::v1::{self, upload_request::Part};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{ApiError, RequestGate};
use crate::models::store::BlobStore;
use crate::models::{ModelError, ModelManager};

/// The Models service of one node.
pub struct ModelsApi {
    consensus: Consensus,
    models: ModelManager,
    gate: RequestGate,
}

impl ModelsApi {
    /// A service over `consensus`'s registry and `models`' store, within the
    /// node's request budget `gate`.
    pub fn new(consensus: Consensus, models: ModelManager, gate: RequestGate) -> Self {
        Self {
            consensus,
            models,
            gate,
        }
    }

    async fn receive<S>(&self, mut stream: S) -> Result<bool, ApiError>
    where
        S: Stream<Item = Result<v1::UploadRequest, Status>> + Unpin,
    {
        let store = self.models.store().clone();
        let idle = store.config().upload_idle_timeout();
        let Some(v1::UploadRequest {
            part: Some(Part::Header(header)),
        }) = next_part(&mut stream, idle).await?
        else {
            return Err(ApiError::invalid("header", "must be the first message"));
        };
        if !is_sha256_hex(&header.sha256) {
            return Err(ApiError::invalid("header.sha256", "must be 64 lowercase hex digits"));
        }
        if header.size > MAX_MODEL_BYTES {
            return Err(ApiError::invalid(
                "header.size",
                format!("is {} bytes; the limit is {MAX_MODEL_BYTES}", header.size),
            ));
        }
        // Pinned before the node looks for the blob: no cleanup pass can
        // delete it between that look, its rename and the Add that uses it.
        let pin = store.pin(&header.sha256);
        if self.models.holds(&header.sha256, header.size).await? {
            // Answering before the bytes arrive ends the call: the client
            // stops sending instead of streaming a file the node holds.
            pin.keep_for_add(0);
            return Ok(false);
        }
        receive_data(&store, &header, &mut stream).await?;
        self.models.uploaded(&header.sha256);
        pin.keep_for_add(header.size);
        Ok(true)
    }
}

/// The next message of an upload, or an error once it sent nothing for `idle`.
async fn next_part<S>(stream: &mut S, idle: Duration) -> Result<Option<v1::UploadRequest>, ApiError>
where
    S: Stream<Item = Result<v1::UploadRequest, Status>> + Unpin,
{
    match tokio::time::timeout(idle, stream.next()).await {
        Err(_) => Err(ApiError::UploadIdle { idle }),
        Ok(None) => Ok(None),
        Ok(Some(Ok(msg))) => Ok(Some(msg)),
        Ok(Some(Err(s))) => Err(ModelError::Io(format!("upload stream broke: {}", s.message())).into()),
    }
}

/// Receives the data of an upload whose `header` was read into `store`, and
/// commits the file once it is whole and hashes to `header.sha256`. Any
/// early return drops the partial file, which deletes it and gives its bytes
/// back to the upload quota.
async fn receive_data<S>(store: &Arc<BlobStore>, header: &v1::BlobHeader, stream: &mut S) -> Result<(), ApiError>
where
    S: Stream<Item = Result<v1::UploadRequest, Status>> + Unpin,
{
    let reservation = store.admit_upload(header.size).await?;
    let mut partial = store.start_upload(&header.sha256, reservation)?;
    let idle = store.config().upload_idle_timeout();
    while let Some(msg) = next_part(stream, idle).await? {
        let Some(Part::Data(data)) = msg.part else {
            return Err(ApiError::invalid("header", "may only be sent in the first message"));
        };
        if partial.len() + data.len() as u64 > header.size {
            return Err(ApiError::invalid(
                "data",
                format!("exceeds header.size ({} bytes)", header.size),
            ));
        }
        partial.write(&data)?;
    }
    if partial.len() != header.size {
        return Err(ApiError::invalid(
            "data",
            format!("ended after {} bytes; header.size is {}", partial.len(), header.size),
        ));
    }
    let (store, sha, size) = (store.clone(), header.sha256.clone(), header.size);
    tokio::task::spawn_blocking(move || store.commit(partial, &sha, size))
        .await
        .map_err(|e| ModelError::Io(e.to_string()))?
        .map_err(|e| match e {
            ModelError::Corrupt { detail, .. } => {
                ApiError::invalid("data", format!("does not match header.sha256: {detail}"))
            }
            other => other.into(),
        })
}

/// Refuses a manifest in which one path is both a file and a directory
/// (`a` and `a/b`): no node could lay it out.
fn check_layout(manifest: &ModelManifest) -> Result<(), ApiError> {
    let files: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    for f in &manifest.files {
        let mut parent = f.path.as_str();
        while let Some((dir, _)) = parent.rsplit_once('/') {
            if files.contains(dir) {
                return Err(ApiError::invalid(
                    "manifest.files",
                    format!(
                        "name {dir:?} as a file and as the directory of {:?}; a path cannot be both",
                        f.path
                    ),
                ));
            }
            parent = dir;
        }
    }
    Ok(())
}

fn manifest_from_proto(m: Option<v1::ModelManifest>) -> Result<ModelManifest, ApiError> {
    let m = m.ok_or_else(|| ApiError::invalid("manifest", "is required"))?;
    let mut files: Vec<ModelFile> = m
        .files
        .into_iter()
        .map(|f| ModelFile {
            path: f.path,
            sha256: f.sha256,
            size: f.size,
        })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(ModelManifest {
        name: m.name,
        version: m.version,
        architecture: m.architecture,
        files,
    })
}

fn manifest_to_proto(m: ModelManifest) -> v1::ModelManifest {
    v1::ModelManifest {
        name: m.name,
        version: m.version,
        architecture: m.architecture,
        files: m
            .files
            .into_iter()
            .map(|f| v1::ModelFile {
                path: f.path,
                sha256: f.sha256,
                size: f.size,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Models for ModelsApi {
    async fn upload(
        &self,
        request: Request<Streaming<v1::UploadRequest>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        self.gate
            .observe("Models/Upload", async {
                let stored = self.receive(request.into_inner()).await?;
                Ok(Response::new(v1::UploadResponse { stored }))
            })
            .await
    }

    async fn add(&self, request: Request<v1::AddModelRequest>) -> Result<Response<v1::AddModelResponse>, Status> {
        self.gate
            .observe("Models/Add", async {
                let manifest = manifest_from_proto(request.into_inner().manifest)?;
                check_layout(&manifest)?;
                let (name, version) = (manifest.name.clone(), manifest.version);
                match self.models.add(manifest).await? {
                    ModelOutcome::Added => Ok(Response::new(v1::AddModelResponse { created: true })),
                    ModelOutcome::Unchanged => Ok(Response::new(v1::AddModelResponse { created: false })),
                    ModelOutcome::Conflict => Err(ApiError::VersionConflict { name, version }),
                    ModelOutcome::Full => Err(ApiError::RegistryFull {
                        limit: cell0_consensus::registry::MAX_MODEL_VERSIONS,
                    }),
                    other => Err(ApiError::Internal(format!("unexpected registry outcome {other:?}"))),
                }
            })
            .await
    }

    async fn list(&self, _request: Request<v1::ListModelsRequest>) -> Result<Response<v1::ListModelsResponse>, Status> {
        self.gate
            .observe("Models/List", async {
                let entries = self.consensus.read(Consistency::Linearizable, registry::list).await?;
                Ok(Response::new(v1::ListModelsResponse {
                    models: entries
                        .into_iter()
                        .map(|e| v1::ModelVersion {
                            total_bytes: e.manifest.total_bytes(),
                            manifest: Some(manifest_to_proto(e.manifest)),
                            holders: e.holders.into_iter().collect(),
                        })
                        .collect(),
                }))
            })
            .await
    }

    async fn remove(
        &self,
        request: Request<v1::RemoveModelRequest>,
    ) -> Result<Response<v1::RemoveModelResponse>, Status> {
        self.gate
            .observe("Models/Remove", async {
                let req = request.into_inner();
                let cmd = ModelCommand::Remove {
                    name: req.name.clone(),
                    version: req.version,
                };
                match ModelCommand::outcome(self.consensus.propose(cmd.into_command()).await?)
                    .map_err(ConsensusError::from)?
                {
                    ModelOutcome::Removed => Ok(Response::new(v1::RemoveModelResponse {})),
                    _ => Err(ApiError::VersionNotRegistered {
                        name: req.name,
                        version: req.version,
                    }),
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::reason_of;
    use crate::config::ModelsConfig;
    use sha2::{Digest, Sha256};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    fn data(bytes: &[u8]) -> Result<v1::UploadRequest, Status> {
        Ok(v1::UploadRequest {
            part: Some(Part::Data(bytes.to_vec().into())),
        })
    }

    fn header(bytes: &[u8]) -> v1::BlobHeader {
        v1::BlobHeader {
            sha256: Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect(),
            size: bytes.len() as u64,
        }
    }

    fn partial_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("partial")).unwrap().count()
    }

    #[tokio::test]
    async fn an_idle_upload_is_aborted_and_its_partial_file_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelsConfig {
            upload_idle_timeout_secs: 1,
            free_space_reserve_bytes: 0,
            ..ModelsConfig::default()
        };
        let store = Arc::new(BlobStore::open_with(dir.path(), config).unwrap());
        let file = b"0123456789".as_slice();
        let header = header(file);

        // Steady chunks: stored.
        let (tx, rx) = mpsc::channel(4);
        let mut stream = ReceiverStream::new(rx);
        tx.send(data(&file[..5])).await.unwrap();
        tx.send(data(&file[5..])).await.unwrap();
        drop(tx);
        receive_data(&store, &header, &mut stream).await.unwrap();
        assert!(store.has(&header.sha256));
        std::fs::remove_file(store.blob_path(&header.sha256)).unwrap();

        // One chunk, then the client stays connected and silent.
        let (tx, rx) = mpsc::channel(4);
        let mut stream = ReceiverStream::new(rx);
        tx.send(data(&file[..5])).await.unwrap();
        let err = Status::from(receive_data(&store, &header, &mut stream).await.unwrap_err());
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert_eq!(reason_of(&err).as_deref(), Some("UPLOAD_IDLE_TIMEOUT"), "{err:?}");
        assert!(
            err.message().contains("models.upload_idle_timeout_secs"),
            "{}",
            err.message()
        );
        assert_eq!(partial_files(dir.path()), 0, "the partial file is deleted");
        assert_eq!(store.upload_bytes(), 0, "the quota is given back");
        assert!(!store.has(&header.sha256));
        drop(tx);
    }

    #[tokio::test]
    async fn uploads_past_the_quota_are_resource_exhausted() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelsConfig {
            upload_quota_bytes: 1 << 20,
            free_space_reserve_bytes: 0,
            ..ModelsConfig::default()
        };
        let store = Arc::new(BlobStore::open_with(dir.path(), config).unwrap());
        let big = vec![5u8; (1 << 20) + 1];
        let (tx, rx) = mpsc::channel(1);
        let mut stream = ReceiverStream::new(rx);
        drop(tx);
        let err = Status::from(receive_data(&store, &header(&big), &mut stream).await.unwrap_err());
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert_eq!(reason_of(&err).as_deref(), Some("UPLOAD_QUOTA_EXCEEDED"), "{err:?}");
        assert!(err.message().contains("models.upload_quota_bytes"), "{}", err.message());
        assert_eq!(partial_files(dir.path()), 0);
    }

    #[test]
    fn a_path_that_is_both_a_file_and_a_directory_is_refused() {
        let manifest = |paths: &[&str]| ModelManifest {
            name: "m".into(),
            version: 1,
            architecture: "all-minilm-l6-v2".into(),
            files: paths
                .iter()
                .map(|p| ModelFile {
                    path: p.to_string(),
                    sha256: "0".repeat(64),
                    size: 1,
                })
                .collect(),
        };
        let err = Status::from(check_layout(&manifest(&["a", "a-b", "a/b/c", "z"])).unwrap_err());
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(reason_of(&err).as_deref(), Some("INVALID_ARGUMENT_FIELD"));
        assert!(err.message().starts_with("manifest.files "), "{}", err.message());
        assert!(err.message().contains("\"a/b/c\""), "{}", err.message());
        check_layout(&manifest(&["a-b", "a/b", "a/c", "ab/c"])).unwrap();
    }
}
