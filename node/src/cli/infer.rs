//! `cell0 infer ...`: embeddings from a node's engine and what it runs on.

use cell0_proto::v1;
use cell0_proto::v1::inference_client::InferenceClient;
use clap::Subcommand;
use serde::Serialize;

use super::{Output, connect, print_json, print_table, rpc_error};

/// Values of each vector shown in table output.
const SHOWN_VALUES: usize = 4;

/// Inference commands.
#[derive(Subcommand)]
pub enum InferCommand {
    /// Embed each TEXT into a unit vector.
    #[command(disable_version_flag = true)]
    Embed {
        /// Texts to embed.
        #[arg(required = true)]
        texts: Vec<String>,
        /// Model name (default: the only registered model).
        #[arg(long, default_value = "")]
        model: String,
        /// Model version (default: the highest the node has ready).
        #[arg(long, default_value_t = 0)]
        version: u32,
    },
    /// Show the node's backend, adapter, limits and models.
    Info,
}

#[derive(Serialize)]
struct EmbedView {
    model: String,
    version: u32,
    dim: u32,
    embeddings: Vec<Vec<f32>>,
}

#[derive(Serialize)]
struct InfoView {
    node_id: String,
    backend: String,
    adapter: String,
    driver: String,
    device_type: String,
    api: String,
    limits: Vec<(String, u64)>,
    max_batch: u32,
    max_texts_per_request: u32,
    max_text_bytes: u32,
    models: Vec<ModelView>,
}

#[derive(Serialize)]
struct ModelView {
    name: String,
    version: u32,
    architecture: String,
    state: String,
    detail: String,
    dim: u32,
    max_tokens: u32,
}

/// Runs an inference command against `endpoint`.
pub async fn run(endpoint: &str, output: Output, cmd: InferCommand) -> anyhow::Result<()> {
    let mut client = InferenceClient::new(connect(endpoint).await?);
    match cmd {
        InferCommand::Embed { texts, model, version } => {
            let r = client
                .embed(v1::EmbedRequest {
                    texts: texts.clone(),
                    model,
                    version,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let view = EmbedView {
                model: r.model,
                version: r.version,
                dim: r.dim,
                embeddings: r.embeddings.into_iter().map(|e| e.values).collect(),
            };
            match output {
                Output::Json => print_json(&view),
                Output::Table => {
                    println!("model {} version {}, {} dimensions", view.model, view.version, view.dim);
                    let rows: Vec<Vec<String>> = texts
                        .iter()
                        .zip(&view.embeddings)
                        .map(|(t, e)| {
                            let head: Vec<String> = e.iter().take(SHOWN_VALUES).map(|v| format!("{v:+.4}")).collect();
                            vec![t.chars().take(40).collect(), format!("[{}, ...]", head.join(", "))]
                        })
                        .collect();
                    print_table(&["TEXT", "EMBEDDING"], &rows);
                    Ok(())
                }
            }
        }
        InferCommand::Info => {
            let r = client
                .info(v1::InferenceInfoRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            let view = InfoView {
                node_id: format!("{:016x}", r.node_id),
                backend: r.backend,
                adapter: r.adapter,
                driver: r.driver,
                device_type: r.device_type,
                api: r.api,
                limits: r.limits.into_iter().map(|l| (l.name, l.value)).collect(),
                max_batch: r.max_batch,
                max_texts_per_request: r.max_texts_per_request,
                max_text_bytes: r.max_text_bytes,
                models: r
                    .models
                    .into_iter()
                    .map(|m| ModelView {
                        name: m.name,
                        version: m.version,
                        architecture: m.architecture,
                        state: m.state,
                        detail: m.detail,
                        dim: m.dim,
                        max_tokens: m.max_tokens,
                    })
                    .collect(),
            };
            match output {
                Output::Json => print_json(&view),
                Output::Table => {
                    let limits: Vec<String> = view.limits.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let rows = vec![
                        vec!["node".into(), view.node_id],
                        vec!["backend".into(), view.backend],
                        vec!["adapter".into(), view.adapter],
                        vec!["driver".into(), view.driver],
                        vec!["device type".into(), view.device_type],
                        vec!["api".into(), view.api],
                        vec!["limits".into(), limits.join(" ")],
                        vec!["max batch".into(), view.max_batch.to_string()],
                        vec!["max texts/request".into(), view.max_texts_per_request.to_string()],
                        vec!["max text bytes".into(), view.max_text_bytes.to_string()],
                    ];
                    print_table(&["FIELD", "VALUE"], &rows);
                    println!();
                    let rows: Vec<Vec<String>> = view
                        .models
                        .into_iter()
                        .map(|m| {
                            vec![
                                m.name,
                                m.version.to_string(),
                                m.architecture,
                                m.state,
                                m.dim.to_string(),
                                m.detail,
                            ]
                        })
                        .collect();
                    print_table(&["MODEL", "VERSION", "ARCHITECTURE", "STATE", "DIM", "DETAIL"], &rows);
                    Ok(())
                }
            }
        }
    }
}
