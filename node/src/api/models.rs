//! `cell0.v1.Models`: uploads of model files to this node and the
//! replicated registry of model versions.

use cell0_consensus::{
    Consensus, Consistency, MAX_MODEL_BYTES, ModelCommand, ModelFile, ModelManifest, ModelOutcome, is_sha256_hex,
};
use cell0_proto::v1::models_server::Models;
use cell0_proto::v1::{self, upload_request::Part};
use tonic::{Request, Response, Status, Streaming};

use super::{model_status, observe, to_status};
use crate::models::{ModelError, ModelManager};

/// The Models service of one node.
pub struct ModelsApi {
    consensus: Consensus,
    models: ModelManager,
}

impl ModelsApi {
    /// A service over `consensus`'s registry and `models`' store.
    pub fn new(consensus: Consensus, models: ModelManager) -> Self {
        Self { consensus, models }
    }

    async fn receive(&self, mut stream: Streaming<v1::UploadRequest>) -> Result<bool, ModelError> {
        let first = stream
            .message()
            .await
            .map_err(|s| ModelError::Io(s.message().to_string()))?;
        let Some(v1::UploadRequest {
            part: Some(Part::Header(header)),
        }) = first
        else {
            return Err(ModelError::invalid("header", "must be the first message"));
        };
        if !is_sha256_hex(&header.sha256) {
            return Err(ModelError::invalid("header.sha256", "must be 64 lowercase hex digits"));
        }
        if header.size > MAX_MODEL_BYTES {
            return Err(ModelError::invalid(
                "header.size",
                format!("is {} bytes; the limit is {MAX_MODEL_BYTES}", header.size),
            ));
        }
        let store = self.models.store().clone();
        if store.has(&header.sha256) {
            // Answering before the bytes arrive ends the call: the client
            // stops sending instead of streaming a file the node holds.
            self.models.uploaded(&header.sha256);
            return Ok(false);
        }
        self.models.pin_upload(&header.sha256);
        let mut partial = store.start_upload(&header.sha256)?;
        let mut received = 0u64;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| ModelError::Io(s.message().to_string()))?
        {
            let Some(Part::Data(data)) = msg.part else {
                return Err(ModelError::invalid("header", "may only be sent in the first message"));
            };
            received += data.len() as u64;
            if received > header.size {
                return Err(ModelError::invalid(
                    "data",
                    format!("exceeds header.size ({} bytes)", header.size),
                ));
            }
            partial.write(&data)?;
        }
        let sha = header.sha256.clone();
        tokio::task::spawn_blocking(move || store.commit(partial, &sha, header.size))
            .await
            .map_err(|e| ModelError::Io(e.to_string()))?
            .map_err(|e| match e {
                ModelError::Corrupt { detail, .. } => {
                    ModelError::invalid("data", format!("does not match header.sha256: {detail}"))
                }
                other => other,
            })?;
        self.models.uploaded(&header.sha256);
        Ok(true)
    }
}

fn manifest_from_proto(m: Option<v1::ModelManifest>) -> Result<ModelManifest, Status> {
    let m = m.ok_or_else(|| Status::invalid_argument("manifest is required"))?;
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
        observe("Models/Upload", async {
            let stored = self.receive(request.into_inner()).await.map_err(model_status)?;
            Ok(Response::new(v1::UploadResponse { stored }))
        })
        .await
    }

    async fn add(&self, request: Request<v1::AddModelRequest>) -> Result<Response<v1::AddModelResponse>, Status> {
        observe("Models/Add", async {
            let manifest = manifest_from_proto(request.into_inner().manifest)?;
            let (name, version) = (manifest.name.clone(), manifest.version);
            match self.models.add(manifest).await.map_err(model_status)? {
                ModelOutcome::Added => Ok(Response::new(v1::AddModelResponse { created: true })),
                ModelOutcome::Unchanged => Ok(Response::new(v1::AddModelResponse { created: false })),
                ModelOutcome::Conflict => Err(Status::already_exists(format!(
                    "model {name} version {version} is already registered with other files; use a new version"
                ))),
                ModelOutcome::Full => Err(Status::resource_exhausted(format!(
                    "the registry holds {} versions, its limit; remove one first",
                    cell0_consensus::registry::MAX_MODEL_VERSIONS
                ))),
                other => Err(Status::internal(format!("unexpected registry outcome {other:?}"))),
            }
        })
        .await
    }

    async fn list(&self, _request: Request<v1::ListModelsRequest>) -> Result<Response<v1::ListModelsResponse>, Status> {
        observe("Models/List", async {
            let entries = self
                .consensus
                .models(Consistency::Linearizable)
                .await
                .map_err(to_status)?;
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
        observe("Models/Remove", async {
            let req = request.into_inner();
            let cmd = ModelCommand::Remove {
                name: req.name.clone(),
                version: req.version,
            };
            match self.consensus.model_command(cmd).await.map_err(to_status)? {
                ModelOutcome::Removed => Ok(Response::new(v1::RemoveModelResponse {})),
                _ => Err(Status::not_found(format!(
                    "model {} version {} is not registered",
                    req.name, req.version
                ))),
            }
        })
        .await
    }
}
