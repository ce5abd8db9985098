//! `cell0 run`: wires a node together and runs it until a signal.
//!
//! Start-up order: open the data dir, bind every port (so a port in use fails
//! fast with a clear message), start Raft, open the inference engine (a bad
//! `[inference]` setting fails here) and the model manager, serve, then
//! bootstrap or join.
//! Shutdown on SIGTERM/SIGINT: stop accepting, let in-flight requests finish
//! (bounded), stop Raft, flush storage. A second signal exits at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cell0_consensus::network::nodelay_incoming;
use cell0_consensus::{Consensus, NodeInfo, StorageBackend};
use cell0_proto::internal::blobs_server::BlobsServer;
use cell0_proto::v1::JoinRequest;
use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::cluster_server::ClusterServer;
use cell0_proto::v1::inference_server::InferenceServer;
use cell0_proto::v1::kv_server::KvServer;
use cell0_proto::v1::models_server::ModelsServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::cluster::ClusterApi;
use crate::api::inference::InferenceApi;
use crate::api::kv::KvApi;
use crate::api::models::ModelsApi;
use crate::config::NodeConfig;
use crate::datadir::DataDir;
use crate::models::ModelManager;
use crate::models::store::BlobStore;
use crate::models::transfer::BlobService;
use crate::{ops, resources, telemetry};

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The gRPC services whose health follows the node's readiness.
const HEALTH_SERVICES: [&str; 5] = [
    "",
    "cell0.v1.Kv",
    "cell0.v1.Cluster",
    "cell0.v1.Inference",
    "cell0.v1.Models",
];
/// Largest upload message: 1 MiB chunks plus framing, with room to spare.
const MAX_UPLOAD_MESSAGE_BYTES: usize = 4 << 20;

async fn bind(addr: std::net::SocketAddr, field: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({field})"))
}

/// Runs a node with `config` until SIGTERM or SIGINT.
pub async fn run(config: NodeConfig, pid_file: Option<PathBuf>) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let metrics = telemetry::init_metrics()?;
    let datadir = DataDir::open(&config.data_dir)?;
    let id = datadir.node_id();
    let name = config.name.clone().unwrap_or_else(|| format!("cell0-{:06x}", id >> 40));

    let public = bind(config.listen.public, "listen.public").await?;
    let internal = bind(config.listen.internal, "listen.internal").await?;
    let http = bind(config.listen.http, "listen.http").await?;

    let info = NodeInfo {
        name: name.clone(),
        site: config.site.clone(),
        public_addr: config.advertise_public(),
        internal_addr: config.advertise_internal(),
    };
    tracing::info!(node_id = id, %name, data_dir = %config.data_dir.display(), new = datadir.created(), "starting");
    let consensus = Consensus::start(
        id,
        info.clone(),
        config.raft.clone(),
        StorageBackend::Rocks(datadir.raft_dir()),
    )
    .await
    .context("starting consensus")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move { stopping(&mut rx).await };

    let store = Arc::new(BlobStore::open_with(&datadir.models_dir(), config.models.clone())?);
    let models = ModelManager::start(
        consensus.clone(),
        store.clone(),
        config.inference.clone(),
        stop_rx.clone(),
    )
    .await
    .context("starting the inference engine")?;
    tokio::spawn(resources::report(
        consensus.clone(),
        resources::measure(models.engine(), config.resources.gpu_memory_mb),
        stop_rx.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cell0_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let public_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(KvServer::new(KvApi::new(consensus.clone())))
        .add_service(ClusterServer::new(ClusterApi::new(consensus.clone())))
        .add_service(InferenceServer::new(InferenceApi::new(id, models.clone())))
        .add_service(
            ModelsServer::new(ModelsApi::new(consensus.clone(), models.clone()))
                .max_decoding_message_size(MAX_UPLOAD_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(nodelay_incoming(public), stopped(stop_rx.clone()));
    let internal_server = tonic::transport::Server::builder()
        .add_service(consensus.internal_service())
        .add_service(ClusterServer::new(ClusterApi::new(consensus.clone())))
        .add_service(BlobsServer::new(BlobService::new(store)))
        .serve_with_incoming_shutdown(nodelay_incoming(internal), stopped(stop_rx.clone()));
    let readiness = ops::Readiness::new(consensus.clone());
    let http_server = std::future::IntoFuture::into_future(
        axum::serve(http, ops::router(readiness.clone(), metrics)).with_graceful_shutdown(stopped(stop_rx.clone())),
    );

    let servers = tokio::spawn(async move {
        let (p, i, h) = tokio::join!(public_server, internal_server, http_server);
        p.context("public gRPC server")?;
        i.context("internal gRPC server")?;
        h.context("HTTP server")?;
        anyhow::Ok(())
    });
    tokio::spawn(telemetry::export_raft_metrics(consensus.clone()));

    if !consensus.is_initialized().await {
        if config.join.is_empty() || config.bootstrap {
            tracing::info!("bootstrapping a new cluster");
            consensus.initialize().await?;
        } else {
            readiness.set_joining(true);
            tokio::spawn(join_loop(
                config.join.clone(),
                id,
                info,
                readiness.clone(),
                stop_rx.clone(),
            ));
        }
    } else {
        tracing::info!("rejoining the cluster from the data dir");
    }
    tokio::spawn(report_health(consensus.clone(), readiness, health, stop_rx.clone()));

    if let Some(p) = &pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write pid file {}", p.display()))?;
    }
    tracing::info!(
        public = %config.listen.public,
        internal = %config.listen.internal,
        http = %config.listen.http,
        "serving"
    );

    wait_for_signal().await?;
    tracing::info!("shutting down: draining requests");
    let _ = stop_tx.send(true);
    tokio::spawn(async {
        if wait_for_signal().await.is_ok() {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    });
    match tokio::time::timeout(DRAIN_TIMEOUT, servers).await {
        Ok(Ok(result)) => result?,
        Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
        Err(_) => tracing::warn!("requests still running after {DRAIN_TIMEOUT:?}; closing them"),
    }
    consensus.shutdown().await;
    if let Some(p) = &pid_file {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves once shutdown has begun.
pub(crate) async fn stopping(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means shutdown.
    let _ = rx.wait_for(|s| *s).await;
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Asks the seeds, in turn, to admit this node until one does.
async fn join_loop(
    seeds: Vec<String>,
    id: u64,
    info: NodeInfo,
    readiness: ops::Readiness,
    mut stop: watch::Receiver<bool>,
) {
    let request = JoinRequest {
        node_id: id,
        name: info.name,
        site: info.site,
        public_addr: info.public_addr,
        internal_addr: info.internal_addr,
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        for seed in &seeds {
            match try_join(seed, request.clone()).await {
                Ok(()) => {
                    tracing::info!(%seed, "joined the cluster");
                    readiness.set_joining(false);
                    return;
                }
                Err(e) => tracing::warn!(%seed, error = %e, "join attempt failed; will retry"),
            }
        }
        // Seeds may still be starting: back off, but stop waiting on shutdown.
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopping(&mut stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn try_join(seed: &str, request: JoinRequest) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{seed}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(120))
        .connect()
        .await?;
    ClusterClient::new(channel).join(request).await?;
    Ok(())
}

/// Publishes readiness on the gRPC health service ("" and each API service).
async fn report_health(
    consensus: Consensus,
    readiness: ops::Readiness,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut metrics = consensus.raft().metrics();
    let mut last = None;
    loop {
        let ready = readiness.not_ready_reason().is_none();
        if last != Some(ready) {
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for service in HEALTH_SERVICES {
                health.set_service_status(service, status).await;
            }
            last = Some(ready);
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            () = stopping(&mut stop) => {
                for service in HEALTH_SERVICES {
                    health.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
                }
                return;
            }
        }
    }
}
