//! Site links: QUIC connections between nodes of different sites, mutual
//! TLS against the cluster CA, ALPN [`cell0_tls::WAN_ALPN`].
//!
//! Every node with federation enabled listens on the federation port and
//! dials each address of its `join` list, again and again with backoff
//! while the link is down. A link opens with a [`Hello`] from each end on
//! one bidirectional stream; then each end sends its site's summary at
//! once and again whenever the node publishes one
//! ([`Federation::publish`]), one [`Envelope`] per unidirectional stream,
//! and merges what it receives into its [`Catalog`].
//!
//! Invariants:
//! - Both ends present a certificate chained to the cluster CA (rustls
//!   refuses anything else: another CA, an expired certificate) and the
//!   peer's certificate names the site its `Hello` claims. A peer of this
//!   node's own site, of a site outside `allowed_sites` (when set), or
//!   speaking another link protocol is refused; both ends log why, and the
//!   refused end sees the reason in the close frame.
//! - A summary is taken only from a link to the site it describes.
//! - Every task here stops when `run`'s stop future completes: the
//!   endpoint is closed, every link task is joined, and `run` returns.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cell0_proto::federation::v1::{Envelope, ForwardRequest, ForwardResponse, Hello, SiteSummary, envelope};
use cell0_tls::rustls::pki_types::CertificateDer;
use cell0_tls::{INTERNAL_SERVER_NAME, Listener, TlsMaterial};
use prost::Message;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream, TransportConfig, VarInt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::FederationError;
use crate::catalog::{Catalog, Merge, SiteStatus, SiteView};

/// The link protocol this build speaks (in [`Hello::protocol`]).
pub const PROTOCOL: u32 = 1;

/// Most bytes of one message (one stream).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How long connecting plus the hello exchange may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long reading one summary stream may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a link's round-trip time is copied into the catalog.
const RTT_REFRESH: Duration = Duration::from_secs(1);

/// Interval of QUIC keep-alive packets on an idle link.
const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// A link with no packet for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Flow-control windows sized for long fat links (100 ms at a few hundred
/// Mbit/s): per stream, and per connection each way.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// Redial delays: doubled after each failure up to the maximum; back to
/// the minimum after a link that stayed up [`HEALTHY_LINK`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const HEALTHY_LINK: Duration = Duration::from_secs(10);

/// Forwarded calls one link serves at once (QUIC stream credit: a peer
/// opening more waits).
const MAX_FORWARDED_PER_LINK: u32 = 256;

/// gRPC status codes a [`ForwardResponse`] carries when this crate answers
/// itself (the node's answers carry their own).
const CODE_FAILED_PRECONDITION: u32 = 9;
const CODE_UNIMPLEMENTED: u32 = 12;

/// QUIC application close codes.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_REFUSED: u32 = 1;
const CLOSE_BAD_MESSAGE: u32 = 2;

/// What a node's site links need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// This node's site.
    pub site: String,
    /// This node's id.
    pub node_id: u64,
    /// This node's name.
    pub node_name: String,
    /// This node's build, as other sites see it.
    pub version: String,
    /// UDP address of the federation port.
    pub listen: SocketAddr,
    /// The federation address other sites dial back (host:port).
    pub advertise: String,
    /// Federation addresses (host:port) of nodes of other sites to link to.
    pub join: Vec<String>,
    /// A site not heard for this long is unreachable.
    pub site_timeout: Duration,
    /// The only sites links are accepted from and made to; empty: every
    /// site with a certificate of the cluster CA.
    pub allowed_sites: Vec<String>,
}

/// Why a peer was refused after its TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its certificate names no site.
    #[error("its certificate names no site: {0}")]
    NoSite(String),
    /// Its certificate names another site than it claims.
    #[error("its certificate is for site {certificate:?}, but it says it is of site {claimed:?}")]
    SiteMismatch {
        /// The certificate's site.
        certificate: String,
        /// The site in its hello.
        claimed: String,
    },
    /// It is of this node's own site.
    #[error("it is of this node's own site {0:?}; site links join different sites")]
    OwnSite(String),
    /// Its site is not allowed here.
    #[error("site {0:?} is not in federation.allowed_sites")]
    NotAllowed(String),
    /// It speaks another link protocol.
    #[error("it speaks link protocol {0}; this node speaks {ours}", ours = PROTOCOL)]
    Protocol(u32),
}

impl Refusal {
    /// A stable label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::NoSite(_) => "no_site",
            Refusal::SiteMismatch { .. } => "site_mismatch",
            Refusal::OwnSite(_) => "own_site",
            Refusal::NotAllowed(_) => "not_allowed",
            Refusal::Protocol(_) => "protocol",
        }
    }
}

/// Checks a peer's hello against its certificate's site and this node's
/// rules.
pub fn check_peer(config: &LinkConfig, certificate_site: &str, hello: &Hello) -> Result<(), Refusal> {
    if hello.protocol != PROTOCOL {
        return Err(Refusal::Protocol(hello.protocol));
    }
    if certificate_site != hello.site {
        return Err(Refusal::SiteMismatch {
            certificate: certificate_site.to_string(),
            claimed: hello.site.clone(),
        });
    }
    if hello.site == config.site {
        return Err(Refusal::OwnSite(hello.site.clone()));
    }
    if !config.allowed_sites.is_empty() && !config.allowed_sites.contains(&hello.site) {
        return Err(Refusal::NotAllowed(hello.site.clone()));
    }
    Ok(())
}

/// Serves calls that other sites forward to this node's site.
pub trait ForwardHandler: Send + Sync + 'static {
    /// Serves `request`, forwarded by a node of `from_site`.
    fn serve(&self, from_site: &str, request: ForwardRequest) -> Pin<Box<dyn Future<Output = ForwardResponse> + Send>>;
}

/// Why a call could not be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// No link to the site is open, or nothing was heard from it within
    /// the site timeout.
    #[error("site {site:?} is unreachable from this node: {why}")]
    Unreachable {
        /// The target site.
        site: String,
        /// Why, in words.
        why: String,
    },
    /// The link failed during the call.
    #[error("forwarding to site {site:?} failed: {reason}")]
    Failed {
        /// The target site.
        site: String,
        /// What failed.
        reason: String,
    },
    /// The site did not answer within the call's deadline.
    #[error("site {0:?} did not answer before the call's deadline")]
    Timeout(String),
}

/// How the link to one address of the join list is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialStatus {
    /// The address, as configured.
    pub addr: String,
    /// The site it linked to, while the link is up.
    pub linked_site: Option<String>,
    /// Why the last attempt failed (cleared once a link is up).
    pub last_error: Option<String>,
    /// Failed attempts since the last link.
    pub failures: u64,
}

/// One open link.
#[derive(Debug, Clone)]
struct OpenLink {
    site: String,
    connection: Connection,
}

/// The other end of a link, as its hello and certificate say.
#[derive(Debug, Clone)]
struct Peer {
    site: String,
    node_id: u64,
    node_name: String,
    remote: SocketAddr,
}

struct Inner {
    config: LinkConfig,
    material: TlsMaterial,
    endpoint: Endpoint,
    catalog: Mutex<Catalog>,
    /// Open links by QUIC stable id.
    links: Mutex<BTreeMap<usize, OpenLink>>,
    /// Per address of the join list.
    dials: Mutex<BTreeMap<String, DialStatus>>,
    /// Serves forwarded calls, once the node set it.
    handler: OnceLock<Arc<dyn ForwardHandler>>,
    local: watch::Sender<Option<SiteSummary>>,
}

impl Inner {
    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn links(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, OpenLink>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_dial(&self, addr: &str, update: impl FnOnce(&mut DialStatus)) {
        let mut dials = self.dials.lock().unwrap_or_else(|p| p.into_inner());
        let status = dials.entry(addr.to_string()).or_insert_with(|| DialStatus {
            addr: addr.to_string(),
            linked_site: None,
            last_error: None,
            failures: 0,
        });
        update(status);
    }

    fn hello(&self) -> Hello {
        Hello {
            protocol: PROTOCOL,
            site: self.config.site.clone(),
            node_id: self.config.node_id,
            node_name: self.config.node_name.clone(),
            version: self.config.version.clone(),
            wan_addr: self.config.advertise.clone(),
        }
    }

    /// Sets the catalog's RTT to `site` from the links open to it.
    fn refresh_rtt(&self, site: &str) {
        let rtt = self
            .links()
            .values()
            .filter(|l| l.site == site)
            .map(|l| l.connection.rtt())
            .min();
        self.catalog().set_rtt(site, rtt);
    }
}

/// A node's site links and catalog; cheap to clone.
#[derive(Clone)]
pub struct Federation {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("site", &self.inner.config.site)
            .field("listen", &self.inner.config.listen)
            .finish()
    }
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // IDLE_TIMEOUT is far below QUIC's varint bound.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(u64::from(CONNECTION_WINDOW));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_FORWARDED_PER_LINK));
    Arc::new(t)
}

fn server_config(material: &TlsMaterial) -> Result<quinn::ServerConfig, FederationError> {
    let crypto = QuicServerConfig::try_from(material.server(Listener::Wan))
        .map_err(|e| FederationError::Crypto(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

fn client_config(material: &TlsMaterial) -> Result<quinn::ClientConfig, FederationError> {
    let crypto =
        QuicClientConfig::try_from(material.wan_client()).map_err(|e| FederationError::Crypto(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// The site the peer's certificate names.
fn certificate_site(connection: &Connection) -> Result<String, Refusal> {
    let chain = connection
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| Refusal::NoSite("no certificate was presented".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| Refusal::NoSite("the certificate chain is empty".into()))?;
    cell0_tls::site_of(leaf).map_err(Refusal::NoSite)
}

/// Why one link attempt failed.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("{}", chain(.0))]
    Read(#[from] quinn::ReadToEndError),
    #[error("{}", chain(.0))]
    Write(#[from] quinn::WriteError),
    #[error("the stream was closed early")]
    Closed(#[from] quinn::ClosedStream),
    #[error("not a valid message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("{0}")]
    Setup(#[from] FederationError),
}

/// `e` and its sources, so that "connection lost" says why (the peer's
/// close reason, the TLS alert).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        // Wrappers often repeat their source's words.
        if !parts.last().is_some_and(|last| last.ends_with(&part)) {
            parts.push(part);
        }
        source = s.source();
    }
    parts.join(": ")
}

impl LinkError {
    fn label(&self) -> &'static str {
        match self {
            LinkError::Refused(r) => r.as_str(),
            LinkError::Timeout(_) => "timeout",
            LinkError::Resolve(_) => "resolve",
            _ => "connection",
        }
    }
}

async fn within<T, E: Into<LinkError>>(
    what: &'static str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(LinkError::Timeout(what)),
    }
}

/// Waits until `halt` says stop.
async fn halted(halt: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens once `run` ends.
    let _ = halt.wait_for(|h| *h).await;
}

impl Federation {
    /// Binds the federation port; [`Federation::run`] then serves it.
    /// Must be called inside a tokio runtime.
    pub fn bind(config: LinkConfig, material: TlsMaterial) -> Result<Self, FederationError> {
        let endpoint =
            Endpoint::server(server_config(&material)?, config.listen).map_err(|source| FederationError::Bind {
                addr: config.listen,
                source,
            })?;
        let catalog = Catalog::new(config.site.clone(), config.site_timeout);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                material,
                endpoint,
                catalog: Mutex::new(catalog),
                links: Mutex::new(BTreeMap::new()),
                dials: Mutex::new(BTreeMap::new()),
                handler: OnceLock::new(),
                local: watch::Sender::new(None),
            }),
        })
    }

    /// The UDP address the federation port is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, FederationError> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(|source| FederationError::Bind {
                addr: self.inner.config.listen,
                source,
            })
    }

    /// Sends `summary` on every link at once, and on every link that
    /// opens later. Call it whenever the site changes and at least every
    /// few seconds: other sites count each summary as hearing from this
    /// one.
    pub fn publish(&self, summary: SiteSummary) {
        self.inner.local.send_replace(Some(summary));
    }

    /// Every other site this node has heard of, by name. RTTs are the
    /// ones each open link copied in, at most a second old.
    pub fn sites(&self) -> Vec<SiteView> {
        self.inner.catalog().view(Instant::now())
    }

    /// Serves the calls other sites forward to this one with `handler`
    /// (set once; until then they are answered UNIMPLEMENTED).
    pub fn serve_forwarded(&self, handler: Arc<dyn ForwardHandler>) {
        let _ = self.inner.handler.set(handler);
    }

    /// Sends `request` to a node of `request.target_site` over the open
    /// link with the smallest round-trip time, and waits up to `timeout`
    /// for its answer. Nothing is retried: the caller's call may or may not
    /// have been served when this fails after sending.
    pub async fn forward(&self, request: ForwardRequest, timeout: Duration) -> Result<ForwardResponse, ForwardError> {
        let site = request.target_site.clone();
        let unreachable = |why: String| ForwardError::Unreachable {
            site: site.clone(),
            why,
        };
        // A link the site stopped answering on stays open until its idle
        // timeout: the catalog knows sooner.
        let silent = self
            .inner
            .catalog()
            .view(Instant::now())
            .into_iter()
            .find(|v| v.summary.site == site && v.status == SiteStatus::Unreachable);
        if let Some(v) = silent {
            return Err(unreachable(format!(
                "nothing heard from it for {:.1} s",
                v.last_heard.as_secs_f64()
            )));
        }
        let connection = self
            .inner
            .links()
            .values()
            .filter(|l| l.site == site)
            .min_by_key(|l| l.connection.rtt())
            .map(|l| l.connection.clone())
            .ok_or_else(|| unreachable("no site link to it is open".into()))?;
        let exchange = async {
            let (mut send, mut recv) = connection.open_bi().await?;
            send.write_all(&request.encode_to_vec()).await?;
            send.finish()?;
            let bytes = recv.read_to_end(MAX_MESSAGE_BYTES).await?;
            Ok::<_, LinkError>(ForwardResponse::decode(bytes.as_slice())?)
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(ForwardError::Failed {
                site,
                reason: e.to_string(),
            }),
            Err(_) => Err(ForwardError::Timeout(site)),
        };
        let label = match &result {
            Ok(_) => "ok",
            Err(ForwardError::Unreachable { .. }) => "unreachable",
            Err(ForwardError::Failed { .. }) => "failed",
            Err(ForwardError::Timeout(_)) => "timeout",
        };
        metrics::counter!("cell0_federation_forwarded_total", "direction" => "out", "result" => label).increment(1);
        result
    }

    /// How the link to each address of the join list is doing.
    pub fn dials(&self) -> Vec<DialStatus> {
        self.inner
            .dials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The smallest round-trip time over open links, per linked site.
    pub fn rtts(&self) -> BTreeMap<String, Duration> {
        let mut out: BTreeMap<String, Duration> = BTreeMap::new();
        for link in self.inner.links().values() {
            let rtt = link.connection.rtt();
            out.entry(link.site.clone())
                .and_modify(|r| *r = (*r).min(rtt))
                .or_insert(rtt);
        }
        out
    }

    /// Serves the federation port and keeps the links of the join list up
    /// until `stop` completes; then closes every link and returns.
    pub async fn run(self, stop: impl Future<Output = ()>) -> Result<(), FederationError> {
        let (halt_tx, halt) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(self.inner.clone(), halt.clone()));
        for addr in self.inner.config.join.clone() {
            tasks.spawn(dial_loop(self.inner.clone(), addr, halt.clone()));
        }
        tasks.spawn(reload_loop(self.inner.clone(), halt.clone()));
        tracing::info!(listen = %self.inner.config.listen, site = %self.inner.config.site, join = ?self.inner.config.join, "site links listening");
        stop.await;
        halt_tx.send_replace(true);
        self.inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined
                && e.is_panic()
            {
                tracing::error!(error = %e, "a site link task panicked");
            }
        }
        // Let the close frames leave; bounded, as a peer may be gone.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
        Ok(())
    }
}

/// Picks up reloaded certificates for new incoming links (dials read the
/// newest client configuration each time).
async fn reload_loop(inner: Arc<Inner>, mut halt: watch::Receiver<bool>) {
    let mut current = inner.material.server(Listener::Wan);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = halted(&mut halt) => return,
            _ = tick.tick() => {}
        }
        let newest = inner.material.server(Listener::Wan);
        if Arc::ptr_eq(&newest, &current) {
            continue;
        }
        current = newest;
        match server_config(&inner.material) {
            Ok(config) => inner.endpoint.set_server_config(Some(config)),
            Err(e) => tracing::warn!(error = %e, "cannot use the reloaded certificate for site links"),
        }
    }
}

async fn accept_loop(inner: Arc<Inner>, mut halt: watch::Receiver<bool>) {
    let mut links = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            () = halted(&mut halt) => break,
            incoming = inner.endpoint.accept() => incoming,
            Some(_) = links.join_next(), if !links.is_empty() => continue,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        let inner = inner.clone();
        let halt = halt.clone();
        links.spawn(async move {
            match accept(&inner, incoming).await {
                Ok((connection, peer)) => drive(&inner, connection, peer, halt).await,
                Err(e) => {
                    metrics::counter!("cell0_federation_link_attempts_total", "direction" => "in", "result" => e.label())
                        .increment(1);
                    tracing::warn!(%remote, error = %e, "refused a site link");
                }
            }
        });
    }
    while links.join_next().await.is_some() {}
}

impl Peer {
    fn new(hello: Hello, connection: &Connection) -> Self {
        Self {
            site: hello.site,
            node_id: hello.node_id,
            node_name: hello.node_name,
            remote: connection.remote_address(),
        }
    }
}

/// Reads the other end's hello: the whole stream.
async fn read_hello(recv: &mut RecvStream) -> Result<Hello, LinkError> {
    let bytes = within("reading the hello", recv.read_to_end(MAX_MESSAGE_BYTES)).await?;
    Ok(Hello::decode(bytes.as_slice())?)
}

/// Sends this node's hello and finishes the stream.
async fn send_hello(inner: &Inner, send: &mut SendStream) -> Result<(), LinkError> {
    within("sending the hello", send.write_all(&inner.hello().encode_to_vec())).await?;
    send.finish()?;
    Ok(())
}

async fn accept(inner: &Inner, incoming: quinn::Incoming) -> Result<(Connection, Peer), LinkError> {
    let connection = within("the TLS handshake", std::future::IntoFuture::into_future(incoming)).await?;
    let result = async {
        let certificate = certificate_site(&connection)?;
        let (mut send, mut recv) = within("waiting for the hello", connection.accept_bi()).await?;
        let hello = read_hello(&mut recv).await?;
        check_peer(&inner.config, &certificate, &hello)?;
        send_hello(inner, &mut send).await?;
        Ok(Peer::new(hello, &connection))
    }
    .await;
    match result {
        Ok(peer) => Ok((connection, peer)),
        Err(e) => {
            let code = if matches!(e, LinkError::Refused(_)) {
                CLOSE_REFUSED
            } else {
                CLOSE_BAD_MESSAGE
            };
            connection.close(VarInt::from_u32(code), e.to_string().as_bytes());
            Err(e)
        }
    }
}

async fn dial(inner: &Inner, addr: &str) -> Result<(Connection, Peer), LinkError> {
    let target = tokio::net::lookup_host(addr)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| LinkError::Resolve(addr.to_string()))?;
    let connecting = inner
        .endpoint
        .connect_with(client_config(&inner.material)?, target, INTERNAL_SERVER_NAME)?;
    let connection = within("the TLS handshake", connecting).await?;
    let result = async {
        let certificate = certificate_site(&connection)?;
        let (mut send, mut recv) = within("opening the hello stream", connection.open_bi()).await?;
        send_hello(inner, &mut send).await?;
        let hello = read_hello(&mut recv).await?;
        check_peer(&inner.config, &certificate, &hello)?;
        Ok(Peer::new(hello, &connection))
    }
    .await;
    match result {
        Ok(peer) => Ok((connection, peer)),
        Err(e) => {
            if matches!(e, LinkError::Refused(_)) {
                connection.close(VarInt::from_u32(CLOSE_REFUSED), e.to_string().as_bytes());
            }
            Err(e)
        }
    }
}

async fn dial_loop(inner: Arc<Inner>, addr: String, mut halt: watch::Receiver<bool>) {
    let mut backoff = MIN_BACKOFF;
    let mut last_error: Option<String> = None;
    inner.set_dial(&addr, |_| {});
    loop {
        if *halt.borrow() {
            return;
        }
        match dial(&inner, &addr).await {
            Ok((connection, peer)) => {
                last_error = None;
                let opened = Instant::now();
                inner.set_dial(&addr, |d| {
                    d.linked_site = Some(peer.site.clone());
                    d.last_error = None;
                    d.failures = 0;
                });
                drive(&inner, connection, peer, halt.clone()).await;
                inner.set_dial(&addr, |d| d.linked_site = None);
                if opened.elapsed() >= HEALTHY_LINK {
                    backoff = MIN_BACKOFF;
                }
            }
            Err(e) => {
                metrics::counter!("cell0_federation_link_attempts_total", "direction" => "out", "result" => e.label())
                    .increment(1);
                let message = e.to_string();
                inner.set_dial(&addr, |d| {
                    d.last_error = Some(message.clone());
                    d.failures += 1;
                });
                // Once per kind of failure, not on every retry.
                if last_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(%addr, error = %message, "cannot link to the site gateway; retrying");
                } else {
                    tracing::debug!(%addr, error = %message, "cannot link to the site gateway; retrying");
                }
                last_error = Some(message);
            }
        }
        tokio::select! {
            () = halted(&mut halt) => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs one established link until it closes or `halt`: sends this site's
/// summary every publish interval, merges the other's.
async fn drive(inner: &Inner, connection: Connection, peer: Peer, mut halt: watch::Receiver<bool>) {
    let id = connection.stable_id();
    inner.links().insert(
        id,
        OpenLink {
            site: peer.site.clone(),
            connection: connection.clone(),
        },
    );
    metrics::gauge!("cell0_federation_links").increment(1.0);
    tracing::info!(site = %peer.site, node = %peer.node_name, node_id = peer.node_id, remote = %peer.remote, "site link up");
    let mut rtt_tick = tokio::time::interval(RTT_REFRESH);
    rtt_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut local = inner.local.subscribe();
    // The newest summary at once, then every one the node publishes.
    local.mark_changed();
    // Calls the other site forwarded here, being served.
    let mut forwarded = JoinSet::new();
    let why = loop {
        tokio::select! {
            () = halted(&mut halt) => {
                connection.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
                break "shutting down".to_string();
            }
            e = connection.closed() => break e.to_string(),
            changed = local.changed() => {
                if changed.is_err() {
                    break "the federation stopped".to_string();
                }
                let summary = local.borrow_and_update().clone();
                if let Some(summary) = summary
                    && let Err(e) = send(&connection, summary).await
                {
                    break format!("sending a summary: {e}");
                }
            }
            _ = rtt_tick.tick() => inner.refresh_rtt(&peer.site),
            Some(_) = forwarded.join_next(), if !forwarded.is_empty() => {}
            stream = connection.accept_bi() => {
                let (send, recv) = match stream {
                    Ok(s) => s,
                    Err(e) => break e.to_string(),
                };
                forwarded.spawn(serve_forwarded(
                    inner.handler.get().cloned(),
                    inner.config.site.clone(),
                    peer.site.clone(),
                    send,
                    recv,
                ));
            }
            stream = connection.accept_uni() => {
                let mut recv = match stream {
                    Ok(r) => r,
                    Err(e) => break e.to_string(),
                };
                let bytes = match tokio::time::timeout(READ_TIMEOUT, recv.read_to_end(MAX_MESSAGE_BYTES)).await {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => break format!("reading a message: {e}"),
                    Err(_) => break "reading a message timed out".to_string(),
                };
                match Envelope::decode(bytes.as_slice()) {
                    Ok(Envelope { body: Some(envelope::Body::Summary(summary)) }) => {
                        metrics::counter!("cell0_federation_summaries_total", "direction" => "in").increment(1);
                        let merged = inner.catalog().merge(&peer.site, summary, Instant::now());
                        if merged == Merge::Added {
                            tracing::info!(site = %peer.site, "learned a site");
                        }
                    }
                    // A message of a newer build this one does not know.
                    Ok(Envelope { body: None }) => {}
                    Err(e) => {
                        connection.close(VarInt::from_u32(CLOSE_BAD_MESSAGE), b"not a valid message");
                        break format!("not a valid message: {e}");
                    }
                }
            }
        }
    };
    forwarded.shutdown().await;
    inner.links().remove(&id);
    inner.refresh_rtt(&peer.site);
    metrics::gauge!("cell0_federation_links").decrement(1.0);
    tracing::info!(site = %peer.site, node = %peer.node_name, remote = %peer.remote, why = %why, "site link down");
}

/// Reads one forwarded call from a link, serves it and writes the answer.
async fn serve_forwarded(
    handler: Option<Arc<dyn ForwardHandler>>,
    own_site: String,
    from_site: String,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let request = match tokio::time::timeout(READ_TIMEOUT, recv.read_to_end(MAX_MESSAGE_BYTES)).await {
        Ok(Ok(bytes)) => match ForwardRequest::decode(bytes.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(site = %from_site, error = %e, "a forwarded call is not a valid message");
                return;
            }
        },
        Ok(Err(e)) => {
            tracing::debug!(site = %from_site, error = %chain(&e), "reading a forwarded call failed");
            return;
        }
        Err(_) => return,
    };
    let refuse = |code, message: String| ForwardResponse {
        request_id: request.request_id.clone(),
        code,
        message,
        ..ForwardResponse::default()
    };
    let response = if request.target_site != own_site {
        // No relaying: the sender must link to the target itself.
        refuse(
            CODE_FAILED_PRECONDITION,
            format!(
                "this node is of site {own_site:?}, not {:?}; sites do not relay calls",
                request.target_site
            ),
        )
    } else {
        match handler {
            Some(h) => h.serve(&from_site, request).await,
            None => refuse(CODE_UNIMPLEMENTED, "this node serves no forwarded calls yet".into()),
        }
    };
    metrics::counter!("cell0_federation_forwarded_total", "direction" => "in", "result" => if response.code == 0 { "ok" } else { "error" })
        .increment(1);
    if send.write_all(&response.encode_to_vec()).await.is_ok() {
        let _ = send.finish();
        // Wait until the peer has the whole answer (or is gone) before the
        // stream is dropped.
        let _ = tokio::time::timeout(READ_TIMEOUT, send.stopped()).await;
    }
}

async fn send(connection: &Connection, summary: SiteSummary) -> Result<(), LinkError> {
    let bytes = Envelope {
        body: Some(envelope::Body::Summary(summary)),
    }
    .encode_to_vec();
    let mut stream = within("opening a stream", connection.open_uni()).await?;
    within("sending a summary", stream.write_all(&bytes)).await?;
    stream.finish()?;
    metrics::counter!("cell0_federation_summaries_total", "direction" => "out").increment(1);
    Ok(())
}
