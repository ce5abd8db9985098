//! The libp2p swarm under Cell0's gossip: it publishes opaque bytes to every
//! node of the site and hands back what the others publish.
//!
//! [`Transport::start`] builds a swarm whose connections are
//! TCP (nodelay) → optional private-network handshake (pnet, with the
//! cluster's pre-shared key) → noise → yamux, under an upgrade timeout, and
//! whose behaviour is connection limits + identify + Kademlia + gossipsub +
//! ping. It binds the listen address, waits until the listener is up, then
//! moves the swarm into one tokio task (span `gossip_swarm`) that runs until
//! the `shutdown` future resolves, [`Transport::stop`] is called or the
//! [`Transport`] is dropped. The rest of the crate (membership, failure
//! detection) talks to that task through two bounded channels only.
//!
//! Invariants:
//! - Every message delivered as [`TransportEvent::Message`] was signed by its
//!   `source` (gossipsub `ValidationMode::Strict`) and accepted by the
//!   caller's `validate` function; rejected messages are neither delivered nor
//!   forwarded. Messages this node publishes are never delivered back to it.
//! - A node with a different pre-shared key (or none, when this node has
//!   one) never completes a connection: the pnet handshake garbles the
//!   streams, the upgrade fails and is logged at debug level.
//! - [`TransportEvent::Connected`] is emitted when the first connection to a
//!   peer is established and [`TransportEvent::Disconnected`] when its last
//!   one closes, so they alternate per peer (unless an event is dropped, see
//!   below). [`TransportEvent::Subscribed`] follows a connection once the
//!   peer has told its subscription to this node's topic.
//! - The swarm task never blocks on the caller: events go through a bounded
//!   channel of [`EVENT_CHANNEL_CAPACITY`] with `try_send`; when the caller
//!   does not keep up and the channel is full, the *newest* event is dropped,
//!   logged at warn level and counted in `cell0_gossip_events_dropped_total`.
//!   Publications go the other way through a bounded channel of
//!   [`COMMAND_CHANNEL_CAPACITY`]: [`Transport::publish`] waits only while
//!   that many are queued.
//! - Publishing while no peer is subscribed is not an error: the message is
//!   dropped (logged at debug level, counted in
//!   `cell0_gossip_publish_dropped_total{reason="no_peers"}`).
//!
//! Discovery: the join addresses (`host:port`, DNS names resolve to all
//! their addresses) are dialled without a known peer id at start and again
//! every [`TransportConfig::redial`] while no peer is connected. Listen
//! addresses learned through identify go into Kademlia, which is
//! bootstrapped after each new connection and every `redial`, both only
//! while its routing table is small, and every address identify or
//! Kademlia reports for a peer that is not connected yet is dialled, so a
//! small cluster whose nodes joined through different seeds becomes fully
//! connected.
//!
//! Metrics: counters `cell0_gossip_messages_received_total`,
//! `cell0_gossip_bytes_received_total`, `cell0_gossip_messages_rejected_total`,
//! `cell0_gossip_messages_sent_total`, `cell0_gossip_bytes_sent_total`,
//! `cell0_gossip_publish_dropped_total{reason}`,
//! `cell0_gossip_events_dropped_total`,
//! `cell0_gossip_connection_errors_total{direction}` and the gauge
//! `cell0_gossip_connected_peers`.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt as _;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, MemoryTransport};
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport as _, connection_limits, gossipsub, identify, kad, noise, ping,
    pnet, tcp, yamux,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

/// Protocol version announced through identify; peers announcing another
/// one are not added to the routing table.
const IDENTIFY_PROTOCOL_VERSION: &str = "/cell0/id/1.0.0";
/// The Kademlia protocol name (keeps Cell0's DHT apart from any other).
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/cell0/kad/1.0.0");
/// Largest gossip message, protobuf framing and signature included.
const MAX_TRANSMIT_SIZE: usize = 64 * 1024;
/// Capacity of the channel that carries events to [`Transport::next_event`].
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;
/// Capacity of the channel that carries publications to the swarm task.
pub const COMMAND_CHANNEL_CAPACITY: usize = 1024;
/// Time allowed for the pnet + noise + yamux upgrade of a new connection.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of the ping protocol (one RTT sample per connection).
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// Most established connections to one peer.
const MAX_CONNECTIONS_PER_PEER: u32 = 2;
/// Below this many entries the routing table is "small": Kademlia is
/// bootstrapped again every `redial`.
const SMALL_ROUTING_TABLE: usize = 20;
/// Time allowed to resolve all join addresses once.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the listener to report its address at start.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest redial interval accepted (a zero interval would spin).
const MIN_REDIAL: Duration = Duration::from_millis(10);

/// Default gossipsub heartbeat interval.
const DEFAULT_MESH_HEARTBEAT: Duration = Duration::from_millis(500);
/// Default idle connection timeout.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default limit on established connections.
const DEFAULT_MAX_CONNECTIONS: u32 = 512;

/// Peers this node dials on its own once it discovers them; gossipsub needs
/// a handful of neighbours, not a full mesh of connections (50 nodes fully
/// connected cost 2,450 connections).
const DEFAULT_TARGET_PEERS: u32 = 12;
/// Default redial interval.
const DEFAULT_REDIAL: Duration = Duration::from_secs(2);

/// What carries the gossip connections, under the same upgrades (pnet,
/// noise, yamux) either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    /// TCP sockets: what a node uses.
    #[default]
    Tcp,
    /// libp2p's in-process memory transport, for benchmarks of many nodes
    /// in one process (no system calls, no kernel buffers). An address's
    /// port names the listener `/memory/<port>` and its IP is ignored, so
    /// every listen port must be given (not 0) and unique in the process.
    Memory,
}

impl Network {
    /// The multiaddress of `addr` on this network.
    fn multiaddr(self, addr: SocketAddr) -> Multiaddr {
        match self {
            Network::Tcp => Multiaddr::from(addr.ip()).with(Protocol::Tcp(addr.port())),
            Network::Memory => Multiaddr::empty().with(Protocol::Memory(u64::from(addr.port()))),
        }
    }

    /// The port of a listen address this network reported.
    fn listen_port(self, address: &Multiaddr) -> Option<u16> {
        address.iter().find_map(|p| match (self, p) {
            (Network::Tcp, Protocol::Tcp(port)) => Some(port),
            (Network::Memory, Protocol::Memory(port)) => u16::try_from(port).ok(),
            _ => None,
        })
    }
}

/// How to run the gossip transport.
#[derive(Clone)]
pub struct TransportConfig {
    /// What carries the connections (TCP unless a benchmark says otherwise).
    pub network: Network,
    /// Address to listen on (TCP: port 0 allowed, the bound one is reported
    /// by [`Transport::listen_addr`]; memory network: see [`Network::Memory`]).
    pub listen: SocketAddr,
    /// Addresses of other nodes to join: `host:port` (IPv6 as `[addr]:port`);
    /// a DNS name resolves to all its addresses.
    pub join: Vec<String>,
    /// libp2p private-network pre-shared key (pnet); `None` = no private
    /// network.
    pub psk: Option<[u8; 32]>,
    /// This node's libp2p identity.
    pub keypair: Keypair,
    /// Gossipsub topic name.
    pub topic: String,
    /// Gossipsub heartbeat (mesh maintenance) interval.
    pub mesh_heartbeat: Duration,
    /// Connections with no traffic are closed after this.
    pub idle_timeout: Duration,
    /// Most established connections in total.
    pub max_connections: u32,
    /// Discovered peers are dialled only while fewer than this many are
    /// connected (others may still connect to this node).
    pub target_peers: u32,
    /// How often the join addresses are dialled again while no peer is
    /// connected (and Kademlia bootstrap re-run while the routing table is
    /// small).
    pub redial: Duration,
}

impl TransportConfig {
    /// A configuration with defaults: TCP, no join address, no pre-shared key,
    /// mesh heartbeat 500 ms, idle timeout 60 s, at most 512 connections,
    /// 12 peers dialled on discovery, redial every 2 s.
    pub fn new(listen: SocketAddr, keypair: Keypair, topic: impl Into<String>) -> Self {
        Self {
            network: Network::Tcp,
            listen,
            join: Vec::new(),
            psk: None,
            keypair,
            topic: topic.into(),
            mesh_heartbeat: DEFAULT_MESH_HEARTBEAT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            target_peers: DEFAULT_TARGET_PEERS,
            redial: DEFAULT_REDIAL,
        }
    }
}

impl fmt::Debug for TransportConfig {
    /// Never prints the pre-shared key nor the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportConfig")
            .field("network", &self.network)
            .field("listen", &self.listen)
            .field("join", &self.join)
            .field("psk", &self.psk.map(|_| "<redacted>"))
            .field("peer_id", &self.keypair.public().to_peer_id())
            .field("topic", &self.topic)
            .field("mesh_heartbeat", &self.mesh_heartbeat)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .field("target_peers", &self.target_peers)
            .field("redial", &self.redial)
            .finish()
    }
}

/// What the transport reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// A validated gossip message from `source` (the signed author, not the
    /// relaying peer).
    Message {
        /// The author of the message.
        source: PeerId,
        /// The published bytes.
        data: Vec<u8>,
    },
    /// The first connection to `peer` was established.
    Connected {
        /// The peer.
        peer: PeerId,
    },
    /// `peer` subscribed to this node's topic: from now on, what this node
    /// publishes reaches it (through the mesh, or directly while the mesh is
    /// empty).
    Subscribed {
        /// The peer.
        peer: PeerId,
    },
    /// The last connection to `peer` closed.
    Disconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A ping round trip to a connected peer.
    Rtt {
        /// The peer.
        peer: PeerId,
        /// The measured round-trip time.
        rtt: Duration,
    },
}

impl TransportEvent {
    /// A short name of the event's kind, for logs.
    fn kind(&self) -> &'static str {
        match self {
            Self::Message { .. } => "message",
            Self::Connected { .. } => "connected",
            Self::Subscribed { .. } => "subscribed",
            Self::Disconnected { .. } => "disconnected",
            Self::Rtt { .. } => "rtt",
        }
    }
}

/// What can go wrong in the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A join address is not `host:port`.
    #[error("invalid join address {addr:?}: {reason}")]
    InvalidJoinAddress {
        /// The join address as configured.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The libp2p transport (TCP, pnet, noise, yamux) could not be built.
    #[error("building the libp2p transport")]
    BuildTransport(#[source] libp2p::TransportBuilderError),
    /// The libp2p behaviour (gossipsub, Kademlia, ...) could not be built.
    #[error("building the libp2p behaviour")]
    BuildBehaviour(#[source] libp2p::BehaviourBuilderError),
    /// Subscribing to the gossip topic failed.
    #[error("subscribing to gossip topic {topic:?}")]
    Subscribe {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        source: gossipsub::SubscriptionError,
    },
    /// The listen address cannot be used on the configured network.
    #[error("invalid listen address {addr}: {reason}")]
    InvalidListen {
        /// The configured listen address.
        addr: SocketAddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The listen address could not be bound.
    #[error("listening on {addr}")]
    Listen {
        /// The configured listen address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: libp2p::TransportError<std::io::Error>,
    },
    /// The listener closed or failed before reporting its address.
    #[error("listener on {addr} closed before it was up")]
    ListenerClosed {
        /// The configured listen address.
        addr: SocketAddr,
        /// Why, when known.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The listener did not report its address in time.
    #[error("listener on {addr} not up after {timeout:?}")]
    ListenTimeout {
        /// The configured listen address.
        addr: SocketAddr,
        /// How long it was given.
        timeout: Duration,
    },
    /// The swarm task has ended (stopped, shut down or failed).
    #[error("the gossip transport has ended")]
    Closed,
}

/// A request from the [`Transport`] handle to the swarm task.
#[derive(Debug)]
enum Command {
    /// Publish these bytes on the topic.
    Publish(Vec<u8>),
}

/// A running gossip transport: a handle on the swarm task.
///
/// Dropping it ends the task (without waiting for it); [`Transport::stop`]
/// ends it and waits.
#[derive(Debug)]
pub struct Transport {
    /// This node's peer id.
    local_peer_id: PeerId,
    /// The bound listen address.
    listen_addr: SocketAddr,
    /// Publications to the task; dropping it tells the task to end.
    commands: mpsc::Sender<Command>,
    /// Events from the task.
    events: mpsc::Receiver<TransportEvent>,
    /// The swarm task.
    task: JoinHandle<()>,
}

impl Transport {
    /// Builds the swarm, binds `config.listen`, waits until listening, dials
    /// the join addresses, and runs the swarm in a named tokio task until
    /// `shutdown` resolves or the Transport is dropped/stopped.
    ///
    /// `validate(source, data)` decides whether a received message is
    /// accepted (propagated and delivered as [`TransportEvent::Message`]) or
    /// rejected (dropped and not propagated). It runs on the swarm task, so it
    /// must be quick and must not panic.
    ///
    /// Errors: a syntactically invalid join address (no port, bad port),
    /// a failure to build the transport or behaviour, or to bind/listen.
    /// Unresolvable or unreachable join addresses are not errors: they are
    /// logged and retried every `config.redial`.
    pub async fn start<V>(
        config: TransportConfig,
        validate: V,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Transport, TransportError>
    where
        V: Fn(&PeerId, &[u8]) -> bool + Send + 'static,
    {
        let joins = config
            .join
            .iter()
            .map(|raw| parse_join(raw))
            .collect::<Result<Vec<_>, _>>()?;
        if config.network == Network::Memory && config.listen.port() == 0 {
            return Err(TransportError::InvalidListen {
                addr: config.listen,
                reason: "the memory network needs a port of its own, not 0",
            });
        }
        let local_peer_id = config.keypair.public().to_peer_id();
        let mut swarm = build_swarm(&config)?;

        let topic = gossipsub::IdentTopic::new(config.topic.clone());
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|source| TransportError::Subscribe {
                topic: config.topic.clone(),
                source,
            })?;

        // libp2p-tcp sets SO_REUSEPORT on its listeners, so binding a port
        // another process listens on would silently succeed (and split the
        // incoming connections): probe with a plain socket first.
        if config.network == Network::Tcp && config.listen.port() != 0 {
            drop(
                std::net::TcpListener::bind(config.listen).map_err(|error| TransportError::Listen {
                    addr: config.listen,
                    source: libp2p::TransportError::Other(error),
                })?,
            );
        }
        swarm
            .listen_on(config.network.multiaddr(config.listen))
            .map_err(|source| TransportError::Listen {
                addr: config.listen,
                source,
            })?;
        let (listen_addr, early_events) = wait_until_listening(&mut swarm, config.network, config.listen).await?;

        let (command_tx, command_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
        let (event_tx, event_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let span = tracing::info_span!("gossip_swarm", peer = %local_peer_id, listen = %listen_addr);
        let driver = Driver {
            swarm,
            local_peer_id,
            network: config.network,
            listen_addr,
            topic: topic.hash(),
            validate,
            events: event_tx,
            joins,
            redial: config.redial.max(MIN_REDIAL),
            max_connections: config.max_connections,
            target_peers: config.target_peers.max(1),
            resolving: false,
            pending_join_dials: HashSet::new(),
            bootstrap_query: None,
        };
        let task = tokio::spawn(driver.run(command_rx, shutdown, early_events).instrument(span));
        tracing::info!(peer = %local_peer_id, listen = %listen_addr, topic = %config.topic,
            join = ?config.join, private_network = config.psk.is_some(), "gossip transport started");
        Ok(Transport {
            local_peer_id,
            listen_addr,
            commands: command_tx,
            events: event_rx,
            task,
        })
    }

    /// This node's libp2p peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The bound TCP listen address (the real port when `config.listen` had
    /// port 0; the configured IP, possibly unspecified).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// Queues `data` for publication to every subscribed peer.
    ///
    /// Waits only while [`COMMAND_CHANNEL_CAPACITY`] publications are already
    /// queued. Publishing with no peer yet is not an error (the message is
    /// dropped, see the module doc); [`TransportError::Closed`] means the
    /// swarm task has ended.
    pub async fn publish(&self, data: Vec<u8>) -> Result<(), TransportError> {
        self.commands
            .send(Command::Publish(data))
            .await
            .map_err(|_| TransportError::Closed)
    }

    /// The next event; `None` once the swarm task has ended (and every
    /// queued event was read).
    pub async fn next_event(&mut self) -> Option<TransportEvent> {
        self.events.recv().await
    }

    /// Stops the swarm task (closing every connection) and waits for it to
    /// end.
    pub async fn stop(self) {
        let Transport {
            commands,
            task,
            local_peer_id,
            ..
        } = self;
        drop(commands);
        match task.await {
            Ok(()) => tracing::debug!(peer = %local_peer_id, "gossip transport stopped"),
            Err(error) => tracing::error!(peer = %local_peer_id, %error, "gossip swarm task failed"),
        }
    }
}

/// The behaviour of the swarm.
#[derive(NetworkBehaviour)]
struct Behaviour {
    /// Caps on established connections (checked first).
    connection_limits: connection_limits::Behaviour,
    /// Learns peers' listen addresses and protocols.
    identify: identify::Behaviour,
    /// Finds the other nodes of the site.
    kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Carries the messages.
    gossipsub: gossipsub::Behaviour,
    /// Measures round trips.
    ping: ping::Behaviour,
}

/// Builds the swarm (not yet listening).
fn build_swarm(config: &TransportConfig) -> Result<Swarm<Behaviour>, TransportError> {
    let psk = config.psk.map(pnet::PreSharedKey::new);
    let idle_timeout = config.idle_timeout;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| build_transport(key, config.network, psk))
        .map_err(TransportError::BuildTransport)?
        .with_behaviour(|key| build_behaviour(key, config))
        .map_err(TransportError::BuildBehaviour)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build();
    Ok(swarm)
}

/// A boxed error, as the swarm builder wants it.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TCP (nodelay) or memory → pnet (when `psk`) → noise → yamux, with a
/// timeout.
fn build_transport(
    key: &Keypair,
    network: Network,
    psk: Option<pnet::PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, BoxError> {
    match network {
        Network::Tcp => upgrade_connections(tcp::tokio::Transport::new(tcp::Config::new().nodelay(true)), key, psk),
        Network::Memory => upgrade_connections(MemoryTransport::default(), key, psk),
    }
}

/// `base`'s connections → pnet (when `psk`) → noise → yamux, with a timeout.
fn upgrade_connections<T>(
    base: T,
    key: &Keypair,
    psk: Option<pnet::PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, BoxError>
where
    T: libp2p::Transport + Send + Unpin + 'static,
    T::Output: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    let noise = noise::Config::new(key)?;
    let transport = match psk {
        Some(psk) => base
            .and_then(move |socket, _| pnet::PnetConfig::new(psk).handshake(socket))
            .upgrade(upgrade::Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .boxed(),
        None => base
            .upgrade(upgrade::Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .boxed(),
    };
    Ok(transport)
}

/// Connection limits, identify, Kademlia (server mode), gossipsub (signed,
/// strict, validated by the application), ping.
fn build_behaviour(key: &Keypair, config: &TransportConfig) -> Result<Behaviour, BoxError> {
    let peer_id = key.public().to_peer_id();
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER));
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), key.public())
            .with_agent_version(format!("cell0-gossip/{}", env!("CARGO_PKG_VERSION"))),
    );
    let mut kad = kad::Behaviour::with_config(
        peer_id,
        kad::store::MemoryStore::new(peer_id),
        kad::Config::new(KAD_PROTOCOL),
    );
    kad.set_mode(Some(kad::Mode::Server));
    let gossipsub_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(config.mesh_heartbeat)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .mesh_n(6)
        .mesh_n_low(4)
        .mesh_n_high(12)
        // A heartbeat goes to the mesh (6 peers), not to every connected
        // peer: with 50 nodes every node ends up connected to all others,
        // and flooding each heartbeat to 49 peers overflowed the send
        // queues (SlowPeer drops) and doubled the CPU (docs/benchmarks.md).
        .flood_publish(false)
        .max_transmit_size(MAX_TRANSMIT_SIZE)
        .build()?;
    let gossipsub = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossipsub_config)?;
    let ping = ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL));
    Ok(Behaviour {
        connection_limits: connection_limits::Behaviour::new(limits),
        identify,
        kad,
        gossipsub,
        ping,
    })
}

/// Drives the swarm until its listener reports an address; returns the
/// bound address and the other events seen meanwhile (to be handled by the
/// task, so that none is lost).
async fn wait_until_listening(
    swarm: &mut Swarm<Behaviour>,
    network: Network,
    listen: SocketAddr,
) -> Result<(SocketAddr, Vec<SwarmEvent<BehaviourEvent>>), TransportError> {
    let mut early = Vec::new();
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => match network.listen_port(&address) {
                    Some(port) => return Ok(SocketAddr::new(listen.ip(), port)),
                    None => tracing::debug!(%address, "listen address without a port"),
                },
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(TransportError::ListenerClosed {
                        addr: listen,
                        source: reason.err(),
                    });
                }
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(TransportError::ListenerClosed {
                        addr: listen,
                        source: Some(error),
                    });
                }
                other => early.push(other),
            }
        }
    };
    match tokio::time::timeout(LISTEN_TIMEOUT, wait).await {
        Ok(Ok(addr)) => Ok((addr, early)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(TransportError::ListenTimeout {
            addr: listen,
            timeout: LISTEN_TIMEOUT,
        }),
    }
}

/// A syntactically valid join address.
#[derive(Debug, Clone)]
struct JoinAddr {
    /// As configured.
    raw: String,
    /// Host name or IP literal (IPv6 without brackets).
    host: String,
    /// TCP port.
    port: u16,
}

/// Checks that `raw` is `host:port` (IPv6 as `[addr]:port`), port non-zero.
fn parse_join(raw: &str) -> Result<JoinAddr, TransportError> {
    let invalid = |reason| TransportError::InvalidJoinAddress {
        addr: raw.to_owned(),
        reason,
    };
    let trimmed = raw.trim();
    if let Ok(addr) = trimmed.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(invalid("port 0 cannot be dialled"));
        }
        return Ok(JoinAddr {
            raw: raw.to_owned(),
            host: addr.ip().to_string(),
            port: addr.port(),
        });
    }
    let Some((host, port)) = trimmed.rsplit_once(':') else {
        return Err(invalid("missing \":port\""));
    };
    if host.is_empty() {
        return Err(invalid("empty host"));
    }
    if host.contains([':', '[', ']']) {
        return Err(invalid("not host:port (write IPv6 addresses as [addr]:port)"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(invalid("host has characters not allowed in a DNS name"));
    }
    let port: u16 = port.parse().map_err(|_| invalid("port is not a number in 1..=65535"))?;
    if port == 0 {
        return Err(invalid("port 0 cannot be dialled"));
    }
    Ok(JoinAddr {
        raw: raw.to_owned(),
        host: host.to_owned(),
        port,
    })
}

/// Resolves every join address (concurrently); failures are logged and
/// skipped.
async fn resolve_joins(joins: Vec<JoinAddr>) -> Vec<SocketAddr> {
    let lookups = joins.iter().map(|join| async move {
        match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((join.host.as_str(), join.port))).await {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if addrs.is_empty() {
                    tracing::warn!(join = %join.raw, "join address resolves to nothing; will retry");
                }
                addrs
            }
            Ok(Err(error)) => {
                tracing::warn!(join = %join.raw, %error, "cannot resolve join address; will retry");
                Vec::new()
            }
            Err(_) => {
                tracing::warn!(join = %join.raw, timeout = ?RESOLVE_TIMEOUT, "resolving join address timed out; will retry");
                Vec::new()
            }
        }
    });
    let mut addrs: Vec<SocketAddr> = futures::future::join_all(lookups).await.into_iter().flatten().collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// The swarm task's state.
struct Driver<V> {
    /// The swarm.
    swarm: Swarm<Behaviour>,
    /// This node's peer id.
    local_peer_id: PeerId,
    /// What carries the connections.
    network: Network,
    /// The bound listen address.
    listen_addr: SocketAddr,
    /// The gossip topic.
    topic: gossipsub::TopicHash,
    /// The application's message validator.
    validate: V,
    /// Events to the handle.
    events: mpsc::Sender<TransportEvent>,
    /// Join addresses.
    joins: Vec<JoinAddr>,
    /// Redial / re-bootstrap interval.
    redial: Duration,
    /// Most established connections.
    max_connections: u32,
    /// Discovered peers are dialled while fewer are connected.
    target_peers: u32,
    /// Whether a resolution of the join addresses is under way.
    resolving: bool,
    /// Dials of join addresses not finished yet.
    pending_join_dials: HashSet<ConnectionId>,
    /// The last Kademlia bootstrap started.
    bootstrap_query: Option<kad::QueryId>,
}

impl<V> Driver<V>
where
    V: Fn(&PeerId, &[u8]) -> bool + Send + 'static,
{
    /// The task's body: runs until `shutdown`, or the handle is dropped.
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: impl Future<Output = ()>,
        early_events: Vec<SwarmEvent<BehaviourEvent>>,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        for event in early_events {
            self.on_swarm_event(event);
        }
        let (resolved_tx, mut resolved_rx) = mpsc::channel::<Vec<SocketAddr>>(1);
        let mut redial = tokio::time::interval(self.redial);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::debug!("gossip swarm running");
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    tracing::info!("gossip transport shutting down");
                    break;
                }
                command = commands.recv() => match command {
                    Some(Command::Publish(data)) => self.publish(data),
                    None => {
                        tracing::debug!("gossip transport handle stopped or dropped");
                        break;
                    }
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(addrs) = resolved_rx.recv() => {
                    self.resolving = false;
                    self.dial_join_addresses(addrs);
                }
                _ = redial.tick() => self.on_redial_tick(&resolved_tx),
            }
        }
        metrics::gauge!("cell0_gossip_connected_peers").set(0.0);
    }

    /// Publishes on the topic; failures are logged and the message dropped.
    fn publish(&mut self, data: Vec<u8>) {
        let bytes = data.len();
        match self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), data) {
            Ok(id) => {
                metrics::counter!("cell0_gossip_messages_sent_total").increment(1);
                metrics::counter!("cell0_gossip_bytes_sent_total").increment(bytes as u64);
                tracing::trace!(message_id = %id, bytes, "published gossip message");
            }
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                metrics::counter!("cell0_gossip_publish_dropped_total", "reason" => "no_peers").increment(1);
                tracing::debug!(bytes, "no subscribed peer yet: gossip message dropped");
            }
            Err(error) => {
                metrics::counter!("cell0_gossip_publish_dropped_total", "reason" => "error").increment(1);
                tracing::warn!(%error, bytes, "cannot publish gossip message: dropped");
            }
        }
    }

    /// Hands an event to the handle without blocking; drops it when the
    /// channel is full.
    fn emit(&self, event: TransportEvent) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                metrics::counter!("cell0_gossip_events_dropped_total").increment(1);
                tracing::warn!(
                    kind = event.kind(),
                    capacity = EVENT_CHANNEL_CAPACITY,
                    "gossip event channel full: newest event dropped"
                );
            }
            // The handle is gone: the task ends at its next turn.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Number of connected peers.
    fn connected_peers(&self) -> usize {
        self.swarm.connected_peers().count()
    }

    /// Updates the connected-peers gauge.
    fn update_peer_gauge(&self) {
        metrics::gauge!("cell0_gossip_connected_peers").set(self.connected_peers() as f64);
    }

    /// Redial tick: resolve and dial the join addresses when alone, and
    /// re-bootstrap Kademlia while its routing table is small.
    fn on_redial_tick(&mut self, resolved_tx: &mpsc::Sender<Vec<SocketAddr>>) {
        if self.connected_peers() == 0
            && !self.joins.is_empty()
            && !self.resolving
            && self.pending_join_dials.is_empty()
        {
            self.resolving = true;
            let joins = self.joins.clone();
            let tx = resolved_tx.clone();
            tokio::spawn(
                async move {
                    let addrs = resolve_joins(joins).await;
                    // The task may have ended meanwhile: nothing to do then.
                    let _ = tx.send(addrs).await;
                }
                .in_current_span(),
            );
        }
        if self.routing_table_size() < SMALL_ROUTING_TABLE {
            self.bootstrap();
        }
    }

    /// Entries in the Kademlia routing table.
    fn routing_table_size(&mut self) -> usize {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|bucket| bucket.num_entries())
            .sum()
    }

    /// Starts a Kademlia bootstrap unless one is running or no peer is known.
    fn bootstrap(&mut self) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        if let Some(id) = self.bootstrap_query
            && kad.query(&id).is_some()
        {
            return;
        }
        match kad.bootstrap() {
            Ok(id) => {
                tracing::trace!(query = ?id, "kademlia bootstrap started");
                self.bootstrap_query = Some(id);
            }
            Err(kad::NoKnownPeers()) => tracing::trace!("kademlia bootstrap: no known peer yet"),
        }
    }

    /// Dials the resolved join addresses (with no peer id), unless a peer got
    /// connected meanwhile.
    fn dial_join_addresses(&mut self, addrs: Vec<SocketAddr>) {
        if self.connected_peers() > 0 {
            return;
        }
        for addr in addrs {
            let address = self.network.multiaddr(addr);
            if addr == self.listen_addr || self.swarm.listeners().any(|own| *own == address) {
                tracing::trace!(%address, "join address is this node's own: skipped");
                continue;
            }
            let opts = DialOpts::unknown_peer_id().address(address.clone()).build();
            let connection_id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.pending_join_dials.insert(connection_id);
                    tracing::debug!(%address, "dialling join address");
                }
                Err(error) => tracing::debug!(%address, %error, "cannot dial join address"),
            }
        }
    }

    /// Whether `address` is worth dialling: `/ip4|ip6/<ip>/tcp/<port>`
    /// (optionally `/p2p/<id>`), not unspecified nor multicast, loopback only
    /// when this node itself listens on loopback; `/memory/<port>` on the
    /// memory network.
    fn is_dialable(&self, address: &Multiaddr) -> bool {
        let mut parts = address.iter();
        if self.network == Network::Memory {
            return matches!(parts.next(), Some(Protocol::Memory(port)) if port != 0)
                && parts.all(|part| matches!(part, Protocol::P2p(_)));
        }
        let ip = match parts.next() {
            Some(Protocol::Ip4(ip)) => IpAddr::V4(ip),
            Some(Protocol::Ip6(ip)) => IpAddr::V6(ip),
            _ => return false,
        };
        if ip.is_unspecified() || ip.is_multicast() || (ip.is_loopback() && !self.listen_addr.ip().is_loopback()) {
            return false;
        }
        matches!(parts.next(), Some(Protocol::Tcp(port)) if port != 0)
            && parts.all(|part| matches!(part, Protocol::P2p(_)))
    }

    /// Dials `peer` at `addresses` unless it is this node, already connected
    /// (or being dialled), this node has its target of peers, or the
    /// connection limit is reached.
    fn dial_peer(&mut self, peer: PeerId, addresses: Vec<Multiaddr>) {
        if peer == self.local_peer_id || self.swarm.is_connected(&peer) {
            return;
        }
        if self.connected_peers() >= self.target_peers as usize {
            return;
        }
        let addresses: Vec<Multiaddr> = addresses.into_iter().filter(|a| self.is_dialable(a)).collect();
        if addresses.is_empty() {
            return;
        }
        if self.swarm.network_info().connection_counters().num_established() >= self.max_connections {
            tracing::trace!(%peer, "connection limit reached: discovered peer not dialled");
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addresses.clone())
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => tracing::debug!(%peer, ?addresses, "dialling discovered peer"),
            Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(error) => tracing::debug!(%peer, ?addresses, %error, "cannot dial discovered peer"),
        }
    }

    /// Handles one swarm event.
    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossipsub(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => self.on_identify(event),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result, .. })) => match result {
                Ok(rtt) => {
                    tracing::trace!(%peer, ?rtt, "ping");
                    self.emit(TransportEvent::Rtt { peer, rtt });
                }
                Err(error) => tracing::debug!(%peer, %error, "ping failed"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::ConnectionLimits(never)) => match never {},
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.pending_join_dials.remove(&connection_id);
                tracing::debug!(peer = %peer_id, address = %endpoint.get_remote_address(),
                    dialer = endpoint.is_dialer(), connections = num_established.get(), "connection established");
                if num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, address = %endpoint.get_remote_address(), "peer connected");
                    self.update_peer_gauge();
                    self.emit(TransportEvent::Connected { peer: peer_id });
                    // A bootstrap asks the closest peers for theirs; once the
                    // routing table knows enough peers, identify and the
                    // periodic redial find the rest, and every node's
                    // bootstrapping after each of its many connections cost
                    // a tenth of a 50-node run's CPU (docs/benchmarks.md).
                    if self.routing_table_size() < SMALL_ROUTING_TABLE {
                        self.bootstrap();
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                endpoint,
                num_established,
                cause,
                ..
            } => {
                let cause = cause.map(|c| c.to_string());
                tracing::debug!(peer = %peer_id, address = %endpoint.get_remote_address(),
                    connections = num_established, ?cause, "connection closed");
                if num_established == 0 {
                    tracing::info!(peer = %peer_id, ?cause, "peer disconnected");
                    self.update_peer_gauge();
                    self.emit(TransportEvent::Disconnected { peer: peer_id });
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => {
                metrics::counter!("cell0_gossip_connection_errors_total", "direction" => "incoming").increment(1);
                tracing::debug!(address = %send_back_addr, peer = ?peer_id, %error, "incoming connection failed");
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let was_join = self.pending_join_dials.remove(&connection_id);
                metrics::counter!("cell0_gossip_connection_errors_total", "direction" => "outgoing").increment(1);
                if was_join {
                    // Retried every `redial` while no peer is connected.
                    tracing::warn!(peer = ?peer_id, %error,
                        "cannot connect to a join address (a node with another cluster secret fails the handshake here); will retry");
                } else {
                    tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => tracing::info!(%address, "listening"),
            SwarmEvent::ExpiredListenAddr { address, .. } => tracing::info!(%address, "no longer listening"),
            SwarmEvent::ListenerClosed { addresses, reason, .. } => match reason {
                Ok(()) => tracing::warn!(?addresses, "listener closed"),
                Err(error) => tracing::error!(?addresses, %error, "listener failed"),
            },
            SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "listener error"),
            SwarmEvent::NewExternalAddrOfPeer { peer_id, address } => self.dial_peer(peer_id, vec![address]),
            _ => {}
        }
    }

    /// Handles a gossipsub event: validates received messages.
    fn on_gossipsub(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let bytes = message.data.len();
                metrics::counter!("cell0_gossip_messages_received_total").increment(1);
                metrics::counter!("cell0_gossip_bytes_received_total").increment(bytes as u64);
                let source = message.source;
                let accepted = source.is_some_and(|source| (self.validate)(&source, &message.data));
                let acceptance = if accepted {
                    gossipsub::MessageAcceptance::Accept
                } else {
                    gossipsub::MessageAcceptance::Reject
                };
                let cached = self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
                if !cached {
                    tracing::trace!(message_id = %message_id, "message left the cache before validation");
                }
                match source {
                    Some(source) if accepted => {
                        tracing::trace!(%source, via = %propagation_source, bytes, "gossip message accepted");
                        self.emit(TransportEvent::Message {
                            source,
                            data: message.data,
                        });
                    }
                    _ => {
                        metrics::counter!("cell0_gossip_messages_rejected_total").increment(1);
                        tracing::debug!(source = ?source, via = %propagation_source, bytes, "gossip message rejected");
                    }
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic, .. } => {
                tracing::debug!(peer = %peer_id, %topic, "peer subscribed");
                if topic == self.topic {
                    self.emit(TransportEvent::Subscribed { peer: peer_id });
                }
            }
            gossipsub::Event::Unsubscribed { peer_id, topic } => {
                tracing::debug!(peer = %peer_id, %topic, "peer unsubscribed");
            }
            gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            } => {
                tracing::warn!(peer = %peer_id, ?failed_messages, "slow gossip peer");
            }
            _ => {}
        }
    }

    /// Handles an identify event: feeds a Cell0 peer's listen addresses to
    /// Kademlia.
    fn on_identify(&mut self, event: identify::Event) {
        match event {
            identify::Event::Received { peer_id, info, .. } => {
                if info.protocol_version != IDENTIFY_PROTOCOL_VERSION || !info.protocols.contains(&KAD_PROTOCOL) {
                    tracing::debug!(peer = %peer_id, protocol_version = %info.protocol_version,
                        agent = %info.agent_version, "peer is not a cell0 gossip node: not routed");
                    return;
                }
                let mut added = false;
                for address in info.listen_addrs {
                    if self.is_dialable(&address) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, address);
                        added = true;
                    }
                }
                if added && self.routing_table_size() < SMALL_ROUTING_TABLE {
                    self.bootstrap();
                }
            }
            identify::Event::Error { peer_id, error, .. } => {
                tracing::debug!(peer = %peer_id, %error, "identify failed");
            }
            _ => {}
        }
    }

    /// Handles a Kademlia event: dials the peers it learns about.
    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated {
                peer,
                is_new_peer,
                addresses,
                ..
            } => {
                if is_new_peer {
                    tracing::debug!(%peer, "peer added to the routing table");
                }
                self.dial_peer(peer, addresses.into_vec());
            }
            kad::Event::RoutablePeer { peer, address } | kad::Event::PendingRoutablePeer { peer, address } => {
                self.dial_peer(peer, vec![address]);
            }
            kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::Bootstrap(result),
                ..
            } => match result {
                Ok(ok) => tracing::trace!(peer = %ok.peer, remaining = ok.num_remaining, "kademlia bootstrap step"),
                Err(error) => tracing::debug!(%error, "kademlia bootstrap failed"),
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_syntax() {
        assert!(parse_join("localhost").is_err());
        assert!(parse_join("10.0.0.1").is_err());
        assert!(parse_join("::1").is_err());
        assert!(parse_join("host:port").is_err());
        assert!(parse_join("host:0").is_err());
        assert!(parse_join(":7000").is_err());
        assert!(parse_join("a b:7000").is_err());
        let j = parse_join("node-1.example:7000").unwrap();
        assert_eq!((j.host.as_str(), j.port), ("node-1.example", 7000));
        let j = parse_join("[::1]:7000").unwrap();
        assert_eq!((j.host.as_str(), j.port), ("::1", 7000));
        let j = parse_join("127.0.0.1:1").unwrap();
        assert_eq!((j.host.as_str(), j.port), ("127.0.0.1", 1));
    }

    #[test]
    fn error_is_send_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<TransportError>();
    }
}
