//! `cell0.v1.Inference`: embeddings from this node's engine and a view of
//! what it runs on and serves.

use cell0_proto::v1::inference_server::Inference;
use cell0_proto::v1::{self, EngineLimit};
use tonic::{Request, Response, Status};

use super::RequestGate;
use crate::models::ModelManager;

/// The Inference service of one node.
pub struct InferenceApi {
    node_id: u64,
    models: ModelManager,
    gate: RequestGate,
}

impl InferenceApi {
    /// A service answering from `models`, within the node's request budget
    /// `gate`.
    pub fn new(node_id: u64, models: ModelManager, gate: RequestGate) -> Self {
        Self { node_id, models, gate }
    }
}

#[tonic::async_trait]
impl Inference for InferenceApi {
    async fn embed(&self, request: Request<v1::EmbedRequest>) -> Result<Response<v1::EmbedResponse>, Status> {
        self.gate
            .observe("Inference/Embed", async {
                let req = request.into_inner();
                let out = self.models.embed(&req.model, req.version, &req.texts).await?;
                Ok(Response::new(v1::EmbedResponse {
                    embeddings: out.vectors.into_iter().map(|values| v1::Embedding { values }).collect(),
                    model: out.key.name,
                    version: out.key.version,
                    dim: out.dim as u32,
                }))
            })
            .await
    }

    async fn info(
        &self,
        _request: Request<v1::InferenceInfoRequest>,
    ) -> Result<Response<v1::InferenceInfoResponse>, Status> {
        self.gate
            .observe("Inference/Info", async {
                let engine = self.models.engine();
                let config = self.models.config();
                Ok(Response::new(v1::InferenceInfoResponse {
                    node_id: self.node_id,
                    backend: engine.backend.clone(),
                    adapter: engine.adapter.clone(),
                    driver: engine.driver.clone(),
                    device_type: engine.device_type.clone(),
                    api: engine.api.clone(),
                    limits: engine
                        .limits
                        .iter()
                        .map(|(name, value)| EngineLimit {
                            name: name.clone(),
                            value: *value,
                        })
                        .collect(),
                    max_batch: config.max_batch as u32,
                    max_texts_per_request: config.max_texts_per_request as u32,
                    max_text_bytes: config.max_text_bytes as u32,
                    models: self
                        .models
                        .served()
                        .into_iter()
                        .map(|m| v1::ServedModel {
                            name: m.key.name,
                            version: m.key.version,
                            architecture: m.architecture,
                            state: m.state.into(),
                            detail: m.detail,
                            dim: m.dim as u32,
                            max_tokens: m.max_tokens as u32,
                        })
                        .collect(),
                }))
            })
            .await
    }
}
