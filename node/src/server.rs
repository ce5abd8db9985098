//! `cell0 run`: wires a node together and runs it until its shutdown future
//! resolves (the binary passes one that resolves on SIGTERM/SIGINT; tests
//! pass their own and run several nodes in one process).
//!
//! Start-up order: open the data dir, bind every port (so a port in use fails
//! fast with a clear message), start Raft, open the inference engine (a bad
//! `[inference]` setting fails here) and the model manager, serve, then
//! bootstrap or join.
//!
//! Every background loop of the node (servers, join, health, Raft metrics,
//! resources, models, watch pumps) runs in the node's [`Supervisor`].
//! Shutdown: raise the stop signal (servers stop accepting, loops and watch
//! streams end), join every task within [`DRAIN_TIMEOUT`] (cancelling the
//! rest), then stop Raft and flush storage. Start-up errors after Raft started
//! go through the same shutdown, so no task or Raft outlives a failed
//! [`run`]. A task that failed or panicked at any time makes [`run`] return
//! an error after the shutdown.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cell0_consensus::network::{TcpTransport, Transport, nodelay_incoming, plain_incoming};
use cell0_consensus::{Consensus, NodeInfo, StorageBackend};
use cell0_proto::internal::blobs_server::BlobsServer;
use cell0_proto::v1::JoinRequest;
use cell0_proto::v1::acl_server::AclServer;
use cell0_proto::v1::agents_server::AgentsServer;
use cell0_proto::v1::cluster_client::ClusterClient;
use cell0_proto::v1::cluster_server::ClusterServer;
use cell0_proto::v1::inference_server::InferenceServer;
use cell0_proto::v1::kv_server::KvServer;
use cell0_proto::v1::models_server::ModelsServer;
use cell0_proto::v1::nodes_server::NodesServer;
use cell0_proto::v1::sites_server::SitesServer;
use cell0_proto::v1::tasks_server::TasksServer;
use cell0_tls::{Listener, TlsMaterial};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::RequestGate;
use crate::api::acl::AclApi;
use crate::api::agents::AgentsApi;
use crate::api::auth::AuthLayer;
use crate::api::cluster::ClusterApi;
use crate::api::connlimit;
use crate::api::dispatch::KvFirstLayer;
use crate::api::forward::{LocalReplay, SiteRouteLayer, SiteRouter};
use crate::api::inference::InferenceApi;
use crate::api::kv::KvApi;
use crate::api::models::ModelsApi;
use crate::api::ratelimit::RateLimitLayer;
use crate::api::sites::SitesApi;
use crate::api::tasks::TasksApi;
use crate::audit;
use crate::config::NodeConfig;
use crate::datadir::DataDir;
use crate::handoff::{self, Importer, SiteCalls};
use crate::models::ModelManager;
use crate::models::store::BlobStore;
use crate::models::transfer::BlobService;
use crate::sdnotify;
use crate::supervisor::{Backoff, Supervisor, TaskEnd, stopped};
use crate::{autopilot, federation, gossip, internal_tls};
use crate::{leases, ops, resources, runner, scheduling, telemetry};

/// The record node `id` runs with under `config`: its name (by default
/// derived from the id), site and advertised addresses.
pub fn node_info(config: &NodeConfig, id: u64) -> NodeInfo {
    NodeInfo {
        name: config.name.clone().unwrap_or_else(|| format!("cell0-{:06x}", id >> 40)),
        site: config.site.clone(),
        public_addr: config.advertise_public(),
        internal_addr: config.advertise_internal(),
    }
}

/// How long the node's tasks (in-flight requests included) may take to
/// finish after shutdown began before they are cancelled.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Runs a node with `config` until `shutdown` resolves, then stops it
/// gracefully.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(config, shutdown, Supervisor::new()).await
}

/// [`run`] with the node's tasks in `tasks`, whose record tells afterwards
/// how each ended. One supervisor per run: one already stopped is refused.
pub async fn run_with(config: NodeConfig, shutdown: impl Future<Output = ()>, tasks: Supervisor) -> anyhow::Result<()> {
    if tasks.is_stopping() {
        anyhow::bail!("this supervisor has already stopped; give each node run a new one");
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let metrics = telemetry::init_metrics()?;
    let datadir = DataDir::open(&config.data_dir)?;
    let id = datadir.node_id();

    let internal_tls = config
        .tls
        .files()
        .map(TlsMaterial::load)
        .transpose()
        .context("loading the TLS files (tls.*)")?;
    if internal_tls.is_none() {
        tracing::warn!("--insecure: the internal port runs in plaintext; anyone who reaches it can act as a node");
    }
    let info = node_info(&config, id);
    let site_links = match (&internal_tls, config.federation.enabled) {
        (Some(material), true) => {
            let certified = material.own_site().context("reading the site from tls.cert_file")?;
            if certified != config.site {
                anyhow::bail!(
                    "tls.cert_file is a certificate for site {certified:?}, but this node's site is {:?}: \
                     site links need a certificate for the node's own site (`cell0 tls cert create --site`)",
                    config.site
                );
            }
            let links = federation::link_config(&config, id, &info.name);
            Some(
                cell0_federation::Federation::bind(links, material.clone())
                    .context("starting site links (federation.listen)")?,
            )
        }
        _ => None,
    };
    let listeners = Listeners {
        public: bind(config.listen.public, "listen.public").await?,
        internal: bind(config.listen.internal, "listen.internal").await?,
        tls: internal_tls.clone(),
        http: bind(config.listen.http, "listen.http").await?,
        site_links,
    };
    tracing::info!(node_id = id, name = %info.name, data_dir = %config.data_dir.display(), new = datadir.created(), tls = internal_tls.is_some(), "starting");
    let storage = StorageBackend::Rocks(datadir.raft_dir());
    let source = config.internal_source();
    let transport: Arc<dyn Transport> = match internal_tls {
        Some(material) => Arc::new(internal_tls::MtlsTransport::new(
            material,
            config.raft.connect_timeout(),
            source,
        )),
        None => Arc::new(TcpTransport {
            connect_timeout: config.raft.connect_timeout(),
            source,
        }),
    };
    let consensus = Consensus::start_with_transport(id, info.clone(), config.raft.clone(), storage, transport)
        .await
        .context("starting consensus")?;

    let served = serve(
        &config, &datadir, info, &consensus, listeners, metrics, &tasks, shutdown,
    )
    .await;
    match &served {
        Ok(()) => tracing::info!("shutting down: draining requests"),
        Err(e) => tracing::error!(error = %format!("{e:#}"), "start-up failed; stopping"),
    }
    let record = tasks.shutdown(DRAIN_TIMEOUT).await;
    consensus.shutdown().await;
    served?;
    let failed: Vec<String> = record
        .ended
        .iter()
        .filter_map(|t| match &t.end {
            TaskEnd::Failed(e) => Some(format!("{}: {e}", t.name)),
            TaskEnd::Panicked(m) => Some(format!("{}: panicked: {m}", t.name)),
            TaskEnd::Finished | TaskEnd::Cancelled => None,
        })
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("background tasks failed: {}", failed.join("; "));
    }
    tracing::info!("stopped");
    Ok(())
}

/// A lazy connection to this node's own public port (TLS when
/// `tls.public`), where calls forwarded from other sites are replayed.
fn own_public_channel(config: &NodeConfig) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", config.advertise_public()))
        .context("advertise.public is not a valid address")?
        .tcp_nodelay(true);
    match (&config.tls.ca_file, config.tls.public) {
        (Some(ca), true) => {
            let tls = cell0_tls::material::public_client(ca).map_err(|e| anyhow::anyhow!(e.describe()))?;
            Ok(endpoint.connect_with_connector_lazy(cell0_tls::wire::public_connector(tls)))
        }
        _ => Ok(endpoint.connect_lazy()),
    }
}

/// A gRPC server running until shutdown.
type ServeFuture = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// The node's bound ports.
struct Listeners {
    public: TcpListener,
    internal: TcpListener,
    /// Mutual TLS on the internal listener (and TLS on the public one with
    /// `tls.public`); plaintext when `None` (`--insecure`).
    tls: Option<TlsMaterial>,
    http: TcpListener,
    /// The federation port, bound, when site links are enabled.
    site_links: Option<cell0_federation::Federation>,
}

/// Starts everything above Raft as tasks of `tasks`, bootstraps or joins,
/// and waits for `shutdown`.
#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &NodeConfig,
    datadir: &DataDir,
    info: NodeInfo,
    consensus: &Consensus,
    listeners: Listeners,
    metrics: PrometheusHandle,
    tasks: &Supervisor,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let id = consensus.id();
    let stop = || tasks.stop_signal();
    let when_stopped = |mut rx: watch::Receiver<bool>| async move { stopped(&mut rx).await };

    let store = Arc::new(BlobStore::open_with(&datadir.models_dir(), config.models.clone())?);
    let models = ModelManager::start(consensus.clone(), store.clone(), config.inference.clone(), tasks)
        .await
        .context("starting the inference engine")?;
    tasks.spawn(
        "resources",
        resources::report(
            consensus.clone(),
            resources::measure(models.engine(), config.resources.gpu_memory_mb),
            config.resources.labels.clone(),
            stop(),
        ),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    // Reflection as both `v1` and `v1alpha`: Python's grpcio-reflection
    // client and older grpcurl builds speak only `v1alpha`.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cell0_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;
    let gossip_view = gossip::GossipView::default();
    if config.gossip.enabled {
        tasks.spawn(
            "gossip",
            gossip::run(
                config.gossip.clone(),
                config.join.clone(),
                datadir.gossip_key_file(),
                info.clone(),
                consensus.clone(),
                gossip_view.clone(),
                stop(),
            ),
        );
        if config.autopilot.enabled {
            tasks.spawn(
                "autopilot",
                autopilot::run(
                    consensus.clone(),
                    gossip_view.clone(),
                    config.raft.voters,
                    Duration::from_millis(config.autopilot.dead_voter_cleanup_ms),
                    stop(),
                ),
            );
        }
    }
    let router = SiteRouter::new(config.site.clone(), id, listeners.site_links.clone());
    if let Some(links) = &listeners.site_links {
        links.serve_forwarded(Arc::new(SiteCalls::new(
            LocalReplay::new(own_public_channel(config)?),
            Importer::new(consensus.clone()),
        )));
        tasks.spawn("handoff", handoff::run(consensus.clone(), router.clone(), stop()));
        tasks.spawn("federation", {
            let links = links.clone();
            let stop = when_stopped(stop());
            async move { links.run(stop).await.context("site links") }
        });
        tasks.spawn(
            "federation-summary",
            federation::publish(
                consensus.clone(),
                links.clone(),
                config.federation.advertise_addr(),
                Duration::from_millis(config.federation.publish_ms),
                stop(),
            ),
        );
    }
    // This node's budget of concurrent requests, shared by all of its
    // services (public and internal) and by no other node in the process.
    let gate = RequestGate::default();
    let audit = if config.audit.enabled {
        let path = config.audit.path.clone().unwrap_or_else(|| datadir.audit_file());
        let (log, worker) = audit::open(&config.audit, path.clone(), stop())?;
        tasks.spawn("audit", worker);
        tracing::info!(path = %path.display(), "writing the audit log");
        Some(log)
    } else {
        None
    };
    let kv_api = Arc::new(KvApi::new(consensus.clone(), tasks.clone(), gate.clone()));
    let kv = KvServer::from_arc(kv_api.clone());
    let public_server = cell0_consensus::network::server_builder()
        .max_concurrent_streams(connlimit::MAX_STREAMS_PER_CONNECTION)
        .layer(RateLimitLayer::new(config.limits.client_rate, config.limits.burst()))
        // Before the ACL: a call for another site is checked there.
        .layer(SiteRouteLayer::new(router.clone()))
        .layer(AuthLayer::new(
            consensus,
            config.acl.enabled,
            config.limits.token_rate,
            config.limits.token_burst(),
            audit,
        ))
        .layer(KvFirstLayer::new(kv_api))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(kv)
        .add_service(ClusterServer::new(ClusterApi::new(
            consensus.clone(),
            gate.clone(),
            gossip_view.clone(),
        )))
        .add_service(AgentsServer::new(AgentsApi::new(
            consensus.clone(),
            gate.clone(),
            tasks.clone(),
            router.clone(),
        )))
        .add_service(NodesServer::new(AgentsApi::new(
            consensus.clone(),
            gate.clone(),
            tasks.clone(),
            router.clone(),
        )))
        .add_service(TasksServer::new(TasksApi::new(
            consensus.clone(),
            gate.clone(),
            router.clone(),
        )))
        .add_service(SitesServer::new(SitesApi::new(
            consensus.clone(),
            listeners.site_links.clone(),
            listeners
                .site_links
                .as_ref()
                .map(|_| config.federation.advertise_addr()),
            gate.clone(),
        )))
        .add_service(AclServer::new(AclApi::new(
            consensus.clone(),
            gate.clone(),
            config.acl.enabled,
        )))
        .add_service(InferenceServer::new(InferenceApi::new(
            id,
            models.clone(),
            gate.clone(),
        )))
        .add_service(
            ModelsServer::new(ModelsApi::new(consensus.clone(), models.clone(), gate.clone()))
                .max_decoding_message_size(MAX_UPLOAD_MESSAGE_BYTES),
        );
    let public_server: ServeFuture = match listeners.tls.clone().filter(|_| config.tls.public) {
        Some(material) => Box::pin(public_server.serve_with_incoming_shutdown(
            connlimit::limit(
                cell0_tls::wire::accept(nodelay_incoming(listeners.public), material, Listener::Public),
                connlimit::MAX_PUBLIC_CONNECTIONS,
            ),
            when_stopped(stop()),
        )),
        None => Box::pin(public_server.serve_with_incoming_shutdown(
            connlimit::limit(plain_incoming(listeners.public), connlimit::MAX_PUBLIC_CONNECTIONS),
            when_stopped(stop()),
        )),
    };
    let lease_table = leases::LeaseTable::new(consensus.clone());
    let internal_server = cell0_consensus::network::server_builder()
        .add_service(consensus.internal_service_until(stop()))
        .add_service(ClusterServer::new(ClusterApi::new(
            consensus.clone(),
            gate,
            gossip_view.clone(),
        )))
        .add_service(BlobsServer::new(BlobService::new(store)))
        .add_service(lease_table.service());
    let internal_server: ServeFuture = match listeners.tls {
        Some(material) => {
            tasks.spawn(
                "tls-reload",
                material
                    .clone()
                    .watch(Duration::from_millis(config.tls.reload_ms), when_stopped(stop())),
            );
            Box::pin(internal_server.serve_with_incoming_shutdown(
                cell0_tls::wire::accept(nodelay_incoming(listeners.internal), material, Listener::Internal),
                when_stopped(stop()),
            ))
        }
        None => Box::pin(
            internal_server.serve_with_incoming_shutdown(plain_incoming(listeners.internal), when_stopped(stop())),
        ),
    };
    let readiness = ops::Readiness::new(consensus.clone());
    let http_server = std::future::IntoFuture::into_future(
        axum::serve(listeners.http, ops::router(readiness.clone(), metrics))
            .with_graceful_shutdown(when_stopped(stop())),
    );
    tasks.spawn("grpc-public", async move {
        public_server.await.context("public gRPC server")
    });
    tasks.spawn("grpc-internal", async move {
        internal_server.await.context("internal gRPC server")
    });
    tasks.spawn("http", async move { http_server.await.context("HTTP server") });
    tasks.spawn(
        "raft-metrics",
        telemetry::export_raft_metrics(consensus.clone(), stop()),
    );

    let initialized = consensus.is_initialized().await;
    if initialized {
        tracing::info!("rejoining the cluster from the data dir");
    }
    match Entry::of(config, initialized) {
        Entry::Stay => {}
        Entry::Bootstrap => {
            tracing::info!("bootstrapping a new cluster");
            consensus.initialize().await?;
        }
        Entry::Gossip { task, expect } => {
            readiness.set_joining(!initialized);
            tasks.spawn(
                task,
                form_cluster(
                    consensus.clone(),
                    gossip_view.clone(),
                    expect,
                    info,
                    readiness.clone(),
                    stop(),
                ),
            );
        }
        Entry::Seeds { task } => {
            readiness.set_joining(!initialized);
            tasks.spawn(
                task,
                join_loop(
                    consensus.clone(),
                    config.join.clone(),
                    id,
                    info,
                    readiness.clone(),
                    stop(),
                ),
            );
        }
    }
    if initialized && !config.join.is_empty() {
        tasks.spawn(
            "leave-drain",
            end_leave_drain(consensus.clone(), readiness.clone(), stop()),
        );
    }
    tasks.spawn(
        "scheduler",
        scheduling::run(consensus.clone(), cell0_scheduler::Options::default(), stop()),
    );
    tasks.spawn(
        "lease-expiry",
        leases::expire(lease_table, config.agents.clone(), stop()),
    );
    let (held, lease) = watch::channel(leases::LeaseState::default());
    tasks.spawn(
        "lease",
        leases::renew(consensus.clone(), config.agents.clone(), held, stop()),
    );
    tasks.spawn(
        "agents",
        runner::run(
            consensus.clone(),
            models.clone(),
            datadir.agents_dir(),
            config.agents.max_parallel_tasks,
            lease,
            stop(),
        ),
    );
    tasks.spawn("health", report_health(consensus.clone(), readiness, health, stop()));

    tracing::info!(
        public = %config.listen.public,
        internal = %config.listen.internal,
        http = %config.listen.http,
        "serving"
    );
    shutdown.await;
    Ok(())
}

/// How often formation looks at what gossip has heard.
const FORMATION_POLL: Duration = Duration::from_millis(200);

/// How long the nodes a bootstrap decision rests on must stay the same
/// before the node bootstraps.
const FORMATION_SETTLE: Duration = Duration::from_secs(2);

/// Formation through gossip: waits until gossip shows a cluster member and
/// joins that cluster, or, with `--bootstrap-expect` (`expect`), until it
/// shows enough nodes to form one, then bootstraps (the lowest id)
/// (`cell0_gossip::expect`). Without `expect` it never bootstraps.
async fn form_cluster(
    consensus: Consensus,
    view: gossip::GossipView,
    expect: Option<usize>,
    info: NodeInfo,
    readiness: ops::Readiness,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use cell0_gossip::expect::{Candidate, Decision, decide};
    let id = consensus.id();
    let mut poll = tokio::time::interval(FORMATION_POLL);
    let mut last_seen = None;
    let mut settling: Option<(BTreeSet<u64>, Instant)> = None;
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return Ok(()),
            _ = poll.tick() => {}
        }
        let members = view.members();
        let alive = members
            .iter()
            .filter(|m| m.state == cell0_gossip::MemberState::Alive)
            .map(|m| Candidate {
                node_id: m.heartbeat.node_id,
                cluster_id: m.heartbeat.cluster_id,
            })
            .collect::<Vec<_>>();
        let decision = decide(id, None, expect, &alive);
        // Bootstrap only on a view that held still for the settle time: nodes
        // started together hear each other within a heartbeat or two, and
        // one more node heard in that time may be the lowest.
        if decision == Decision::Bootstrap {
            let seen: BTreeSet<u64> = alive.iter().map(|c| c.node_id).collect();
            let since = match settling.take() {
                Some((view, since)) if view == seen => since,
                _ => Instant::now(),
            };
            let held = since.elapsed() >= FORMATION_SETTLE;
            settling = Some((seen, since));
            if !held {
                continue;
            }
        } else {
            settling = None;
        }
        match decision {
            Decision::Member => return Ok(()),
            Decision::Bootstrap => {
                let expect = expect.unwrap_or_default();
                tracing::info!(
                    expect,
                    "bootstrap-expect: {expect} nodes see each other; this node has the lowest id and forms the cluster"
                );
                consensus.initialize().await?;
                readiness.set_joining(false);
                return Ok(());
            }
            Decision::Join { cluster_id, via } => {
                // Every member of that cluster is a seed, the chosen one first.
                let mut seeds: Vec<&gossip::MemberStatus> = members
                    .iter()
                    .filter(|m| m.heartbeat.cluster_id == Some(cluster_id))
                    .collect();
                seeds.sort_by_key(|m| (m.heartbeat.node_id != via, m.heartbeat.node_id));
                let seeds = seeds
                    .into_iter()
                    .map(|m| m.heartbeat.addresses.internal.clone())
                    .collect();
                tracing::info!(cluster = %format!("{cluster_id:016x}"), via = %format!("{via:016x}"), "bootstrap-expect: joining the cluster a peer formed");
                join_loop(consensus, seeds, id, info, readiness, stop).await;
                return Ok(());
            }
            Decision::Wait { seen } => {
                if last_seen != Some(seen) {
                    match expect {
                        Some(expect) => {
                            tracing::info!(seen, expect, "bootstrap-expect: waiting for nodes to see each other")
                        }
                        None => tracing::info!(seen, "waiting for gossip to find a member of the cluster to join"),
                    }
                    last_seen = Some(seen);
                }
            }
        }
    }
}

/// After a node that left is added again: ends the drain its leave began
/// (`cell0 node leave` drains before it removes), so it takes agents again.
/// A drain for any other reason stays. Waits until the node is ready.
async fn end_leave_drain(
    consensus: Consensus,
    readiness: ops::Readiness,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use cell0_consensus::agents::{self, AgentCommand, NodeState};
    let id = consensus.id();
    let mut poll = tokio::time::interval(FORMATION_POLL);
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return Ok(()),
            _ = poll.tick() => {}
        }
        if readiness.not_ready_reason().await.is_some() {
            continue;
        }
        let status = match consensus
            .read(cell0_consensus::Consistency::Linearizable, move |txn| {
                agents::node_status(txn, id)
            })
            .await
        {
            Ok(status) => status,
            Err(e) => {
                tracing::debug!(error = %e, "reading this node's scheduling status; will retry");
                continue;
            }
        };
        if status.state != NodeState::Draining || status.reason != crate::cli::leave::DRAIN_REASON {
            return Ok(());
        }
        let ended = consensus
            .propose(
                AgentCommand::SetNodeState {
                    node: id,
                    state: NodeState::Ready,
                    reason: "rejoined the cluster".into(),
                    at_ms: crate::scheduling::now_ms(),
                }
                .into_command(),
            )
            .await;
        match ended {
            Ok(_) => {
                tracing::info!("rejoined: this node takes agents again");
                return Ok(());
            }
            Err(e) => tracing::debug!(error = %e, "ending the drain of this node's leave; will retry"),
        }
    }
}

/// How a starting node takes its place in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// A member with no join list: Raft carries on from the data dir.
    Stay,
    /// A new node bootstraps a cluster of its own.
    Bootstrap,
    /// Through gossip (`form_cluster`): `--bootstrap-expect`, a join list
    /// with gossip on, or a gossip member asking to be added again.
    Gossip {
        /// The task's name.
        task: &'static str,
        /// `--bootstrap-expect`.
        expect: Option<usize>,
    },
    /// Through the join list's seeds (`join_loop`), also a member asking
    /// to be added again after it left or was removed (joins are
    /// idempotent).
    Seeds {
        /// The task's name.
        task: &'static str,
    },
}

impl Entry {
    fn of(config: &NodeConfig, initialized: bool) -> Entry {
        if initialized {
            return match (config.join.is_empty(), config.gossip.enabled) {
                (true, _) => Entry::Stay,
                (false, true) => Entry::Gossip {
                    task: "rejoin",
                    expect: None,
                },
                (false, false) => Entry::Seeds { task: "rejoin" },
            };
        }
        let through_gossip = config.gossip.enabled && !config.bootstrap && !config.join.is_empty();
        if config.bootstrap_expect.is_some() || through_gossip {
            Entry::Gossip {
                task: "formation",
                expect: config.bootstrap_expect,
            }
        } else if config.join.is_empty() || config.bootstrap {
            Entry::Bootstrap
        } else {
            Entry::Seeds { task: "join" }
        }
    }
}

/// Asks the seeds, in turn, to admit this node until one does.
async fn join_loop(
    consensus: Consensus,
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
    let mut backoff = Backoff::default();
    loop {
        for seed in &seeds {
            // A join in flight is abandoned on shutdown; the seed finishes
            // or fails it on its own.
            let attempt = tokio::select! {
                r = try_join(&consensus, seed, request.clone()) => r,
                () = stopped(&mut stop) => return,
            };
            match attempt {
                Ok(()) => {
                    tracing::info!(%seed, "joined the cluster");
                    readiness.set_joining(false);
                    return;
                }
                Err(e) => tracing::warn!(%seed, error = %e, "join attempt failed; will retry"),
            }
        }
        // Seeds may still be starting: back off, but stop waiting on shutdown.
        if !backoff.wait(&mut stop).await {
            return;
        }
    }
}

/// How long a join may take at the seed (it waits until this node caught up
/// as a learner).
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

async fn try_join(consensus: &Consensus, seed: &str, request: JoinRequest) -> anyhow::Result<()> {
    // Through the node's transport, like every connection to another node.
    let channel = consensus.channels().channel(seed)?;
    let mut request = tonic::Request::new(request);
    request.set_timeout(JOIN_TIMEOUT);
    ClusterClient::new(channel).join(request).await?;
    Ok(())
}

/// Publishes readiness on the gRPC health service ("" and each API service).
///
/// Looks again when the node's role, vote, leader or membership changes
/// (openraft's server metrics), when a join starts or ends, and every
/// [`ops::APPLY_GRACE`] for a replica falling behind in applying. Not on
/// every change of the log or applied index: under writes those change
/// thousands of times a second, and each look costs a wake-up of this task
/// (measured at about 1 % of a leader's instructions under load).
async fn report_health(
    consensus: Consensus,
    readiness: ops::Readiness,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut server = consensus.raft().server_metrics();
    let mut joining = readiness.joining_changes();
    let mut recheck = tokio::time::interval(ops::APPLY_GRACE);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    // Under systemd (`Type=notify`): READY=1 once, STOPPING=1 on shutdown,
    // and the watchdog while the node runs.
    let systemd = sdnotify::Notifier::from_env();
    let mut watchdog = systemd
        .as_ref()
        .and_then(sdnotify::Notifier::watchdog_interval)
        .map(tokio::time::interval);
    let mut told_ready = false;
    loop {
        let ready = readiness.not_ready_reason().await.is_none();
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
        if ready
            && !told_ready
            && let Some(n) = &systemd
        {
            n.notify("READY=1\nSTATUS=serving");
            told_ready = true;
        }
        tokio::select! {
            r = server.changed() => if r.is_err() { return },
            r = joining.changed() => if r.is_err() { return },
            _ = recheck.tick() => {}
            _ = async {
                match watchdog.as_mut() {
                    Some(w) => w.tick().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(n) = &systemd {
                    n.notify("WATCHDOG=1");
                }
            }
            () = stopped(&mut stop) => {
                if let Some(n) = &systemd {
                    n.notify("STOPPING=1\nSTATUS=shutting down");
                }
                for service in HEALTH_SERVICES {
                    health.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
                }
                return;
            }
        }
    }
}
