//! A fault proxy in front of every node's internal port, owned by the
//! harness: links between nodes can be delayed (with jitter), throttled,
//! cut one way or both, and reset, without root.
//!
//! Node *i* advertises its proxy's address as its internal address, so
//! every other node dials node *i* through the proxy; a node binds its
//! outgoing connections to its own listen address, so the proxy knows which
//! node a connection comes from. A **link** `(from, to)` is every
//! connection `from` opens to `to`: the Raft messages `from` sends to `to`
//! and their answers (replication, votes, forwarding, joins). A one-way cut
//! `(from, to)` therefore loses what `from` asks of `to` while `to`'s
//! requests to `from` still pass; a partition cuts both links of a pair.
//!
//! What a link can do ([`LinkFault`]):
//! - **cut**: nothing is forwarded either way, as in a blackhole: bytes wait
//!   in the sockets (and new connections are accepted and held) until the
//!   cut heals, when they flow again, like TCP retransmitting after a
//!   network outage; peers that gave up closed their end meanwhile;
//! - **delay** with **jitter**: each chunk is held for `delay` plus a random
//!   `0..jitter`, never overtaking the chunk before it (TCP keeps order);
//! - **bandwidth**: at most that many bytes per second each way;
//! - a **reset** ([`Proxy::reset`]) ends every open connection of the link
//!   with a TCP RST.
//!
//! Invariants: the proxy's runtime, listeners and connections stop when it
//! is dropped, also during a panic; a connection from an address that is
//! not a node's passes unharmed; faults change on open connections at once.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Bytes read from a socket at once.
const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks one direction of a connection holds while they wait out a delay.
const QUEUED_CHUNKS: usize = 256;

/// What is done to one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkFault {
    /// Nothing passes (both directions of the link's connections).
    pub cut: bool,
    /// Fixed delay of every chunk.
    pub delay: Duration,
    /// Extra random delay of a chunk, `0..jitter`.
    pub jitter: Duration,
    /// At most this many bytes per second each way (`None`: unlimited).
    pub bandwidth: Option<u64>,
}

impl LinkFault {
    /// A healthy link.
    pub const HEALTHY: LinkFault = LinkFault {
        cut: false,
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        bandwidth: None,
    };

    /// A cut link.
    pub const CUT: LinkFault = LinkFault {
        cut: true,
        ..LinkFault::HEALTHY
    };
}

/// A link's state as its connections watch it.
#[derive(Debug, Clone, Copy, Default)]
struct LinkState {
    fault: LinkFault,
    /// Bumped by every reset: connections opened before it end.
    resets: u64,
}

/// What can go wrong starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Its runtime could not start.
    #[error("starting the fault proxy's runtime: {0}")]
    Runtime(std::io::Error),
    /// A listener could not bind.
    #[error("the fault proxy cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// One proxied node: where the proxy listens and where it forwards.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The address other nodes dial (the node advertises it).
    pub listen: SocketAddr,
    /// The node's real internal address.
    pub upstream: SocketAddr,
    /// The address the node's own outgoing connections come from.
    pub source: IpAddr,
}

/// The proxy: one listener per node, a fault per ordered pair of nodes.
pub struct Proxy {
    runtime: Option<tokio::runtime::Runtime>,
    /// `links[from][to]`.
    links: Vec<Vec<watch::Sender<LinkState>>>,
    /// `bound[node]`: where node's listener listens.
    bound: Vec<SocketAddr>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("nodes", &self.links.len()).finish()
    }
}

impl Proxy {
    /// Starts listening for every route (node `i` is `routes[i]`); `seed`
    /// draws the jitter.
    pub fn start(routes: &[Route], seed: u64) -> Result<Proxy, ProxyError> {
        // Listeners first: a failure then drops no runtime, which may not
        // happen inside the caller's async context.
        let mut listeners = Vec::with_capacity(routes.len());
        for route in routes {
            let bind_error = |source| ProxyError::Bind {
                addr: route.listen,
                source,
            };
            let listener = std::net::TcpListener::bind(route.listen).map_err(bind_error)?;
            listener.set_nonblocking(true).map_err(bind_error)?;
            let bound = listener.local_addr().map_err(bind_error)?;
            listeners.push((listener, bound));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chaos-proxy")
            .enable_all()
            .build()
            .map_err(ProxyError::Runtime)?;
        let n = routes.len();
        let links: Vec<Vec<watch::Sender<LinkState>>> = (0..n)
            .map(|_| (0..n).map(|_| watch::Sender::new(LinkState::default())).collect())
            .collect();
        let sources: Arc<BTreeMap<IpAddr, usize>> =
            Arc::new(routes.iter().enumerate().map(|(i, r)| (r.source, i)).collect());
        let mut bound = Vec::with_capacity(n);
        for (to, (route, (listener, addr))) in routes.iter().zip(listeners).enumerate() {
            let inbound: Vec<watch::Receiver<LinkState>> = links.iter().map(|row| row[to].subscribe()).collect();
            runtime.spawn(accept_loop(
                listener,
                route.upstream,
                sources.clone(),
                inbound,
                seed ^ (to as u64) << 32,
            ));
            bound.push(addr);
        }
        Ok(Proxy {
            runtime: Some(runtime),
            links,
            bound,
        })
    }

    /// The address node `node`'s listener is bound to (a route's port 0
    /// is resolved here).
    pub fn listen_addr(&self, node: usize) -> Option<SocketAddr> {
        self.bound.get(node).copied()
    }

    /// Sets link `(from, to)`'s fault (open connections follow at once).
    pub fn set(&self, from: usize, to: usize, fault: LinkFault) {
        if let Some(link) = self.links.get(from).and_then(|row| row.get(to)) {
            link.send_modify(|s| s.fault = fault);
        }
    }

    /// Sets the fault of both links between `a` and `b`.
    pub fn set_both(&self, a: usize, b: usize, fault: LinkFault) {
        self.set(a, b, fault);
        self.set(b, a, fault);
    }

    /// Cuts every link between different groups (a node in no group is
    /// cut from everyone) and heals every other link.
    pub fn partition(&self, groups: &[Vec<usize>]) {
        let group_of = |n: usize| groups.iter().position(|g| g.contains(&n));
        for from in 0..self.links.len() {
            for to in 0..self.links.len() {
                let apart = from != to && (group_of(from).is_none() || group_of(from) != group_of(to));
                self.set(from, to, if apart { LinkFault::CUT } else { LinkFault::HEALTHY });
            }
        }
    }

    /// Ends every open connection of link `(from, to)` with a reset.
    pub fn reset(&self, from: usize, to: usize) {
        if let Some(link) = self.links.get(from).and_then(|row| row.get(to)) {
            link.send_modify(|s| s.resets += 1);
        }
    }

    /// Every link healthy again.
    pub fn heal(&self) {
        for row in &self.links {
            for link in row {
                link.send_modify(|s| s.fault = LinkFault::HEALTHY);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Accepts connections to one node and forwards each under its link's
/// fault.
async fn accept_loop(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    sources: Arc<BTreeMap<IpAddr, usize>>,
    inbound: Vec<watch::Receiver<LinkState>>,
    seed: u64,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "fault proxy: cannot use its listener");
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "fault proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let link = sources
            .get(&peer.ip())
            .and_then(|from| inbound.get(*from))
            .cloned()
            .unwrap_or_else(|| watch::Sender::new(LinkState::default()).subscribe());
        tokio::spawn(connection(client, upstream, link, rng.random()));
    }
}

/// One proxied connection: waits while the link is cut, then connects
/// upstream and pumps both ways until both sides closed or a reset.
async fn connection(client: TcpStream, upstream: SocketAddr, mut link: watch::Receiver<LinkState>, seed: u64) {
    let opened = link.borrow().resets;
    // A cut link holds a new connection as a blackhole holds its SYN.
    let usable = match link.wait_for(|s| !s.fault.cut || s.resets != opened).await {
        Ok(s) => s.resets == opened,
        Err(_) => false,
    };
    if !usable {
        return reset(&client);
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return reset(&client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, link.clone(), opened, seed),
        pump(server_read, client_write, link, opened, seed.rotate_left(17)),
    );
}

/// Makes `stream` close with a TCP RST when it is dropped.
fn reset(stream: &TcpStream) {
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// Until the link is reset after `opened` (or the proxy is gone).
async fn wait_reset(link: &mut watch::Receiver<LinkState>, opened: u64) {
    let _ = link.wait_for(|s| s.resets != opened).await.map(|_| ());
}

type ReadHalf = tokio::net::tcp::OwnedReadHalf;
type WriteHalf = tokio::net::tcp::OwnedWriteHalf;

/// Copies `from` to `to` under the link's fault until `from` ends (then
/// closes `to`'s direction) or the link is reset (then both sockets close
/// with a reset).
async fn pump(mut from: ReadHalf, mut to: WriteHalf, link: watch::Receiver<LinkState>, opened: u64, seed: u64) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let mut gate = link.clone();
    let mut resets = link.clone();
    let reader = async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut last_release = Instant::now();
        let mut buf = vec![0u8; CHUNK_BYTES];
        let was_reset = loop {
            let reset_now = match gate.wait_for(|s| !s.fault.cut || s.resets != opened).await {
                Ok(s) => s.resets != opened,
                Err(_) => true,
            };
            if reset_now {
                break true;
            }
            let n = tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break false,
                    Ok(n) => n,
                },
                _ = wait_reset(&mut resets, opened) => break true,
            };
            let fault = gate.borrow().fault;
            let jitter = if fault.jitter.is_zero() {
                Duration::ZERO
            } else {
                rng.random_range(Duration::ZERO..fault.jitter)
            };
            // Never overtake the chunk before (TCP keeps order).
            last_release = (Instant::now() + fault.delay + jitter).max(last_release);
            if tx.send((last_release, buf[..n].to_vec())).await.is_err() {
                break false;
            }
        };
        if was_reset {
            reset(from.as_ref());
        }
        from
    };
    let mut gate = link.clone();
    let mut resets = link;
    let writer = async move {
        let was_reset = loop {
            let Some((release, chunk)) = rx.recv().await else {
                break false;
            };
            let ready = async {
                tokio::time::sleep_until(release).await;
                matches!(gate.wait_for(|s| !s.fault.cut || s.resets != opened).await, Ok(s) if s.resets == opened)
            };
            let ready = tokio::select! {
                ready = ready => ready,
                _ = wait_reset(&mut resets, opened) => break true,
            };
            if !ready || to.write_all(&chunk).await.is_err() {
                break gate.borrow().resets != opened;
            }
            let bandwidth = gate.borrow().fault.bandwidth;
            if let Some(rate) = bandwidth.filter(|r| *r > 0) {
                tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / rate as f64)).await;
            }
        };
        if was_reset {
            reset(to.as_ref());
        } else {
            let _ = to.shutdown().await;
        }
        to
    };
    // Both halves drop here, together: a socket set to reset closes with one.
    let _ = tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on `addr`, in the proxy's own runtime for simplicity.
    async fn echo(listener: TcpListener) {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    /// Two "nodes": node 0 connects from 127.0.0.1 to node 1's proxy.
    async fn setup() -> (Proxy, SocketAddr) {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(echo(upstream));
        let routes = [
            Route {
                listen: "127.0.0.1:0".parse().unwrap(),
                upstream: upstream_addr,
                source: "127.0.0.1".parse().unwrap(),
            },
            Route {
                listen: "127.0.0.1:0".parse().unwrap(),
                upstream: upstream_addr,
                source: "127.0.0.9".parse().unwrap(),
            },
        ];
        let proxy = Proxy::start(&routes, 7).unwrap();
        let listen = proxy.listen_addr(1).unwrap();
        (proxy, listen)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_healthy_link_passes_bytes_both_ways() {
        let (_proxy, addr) = setup().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_holds_bytes_until_it_heals_and_a_reset_ends_the_connection() {
        let (proxy, addr) = setup().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(round_trip(&mut s, b"one").await.unwrap(), b"one");
        proxy.set(0, 1, LinkFault::CUT);
        s.write_all(b"two").await.unwrap();
        let mut got = [0u8; 3];
        // Nothing comes back while cut.
        let held = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut got)).await;
        assert!(held.is_err(), "bytes passed a cut link");
        proxy.set(0, 1, LinkFault::HEALTHY);
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"two");
        // The other direction's link does not touch this connection.
        proxy.set(1, 0, LinkFault::CUT);
        assert_eq!(round_trip(&mut s, b"three").await.unwrap(), b"three");
        proxy.reset(0, 1);
        let mut rest = Vec::new();
        let ended = s.read_to_end(&mut rest).await;
        assert!(ended.is_err() || rest.is_empty(), "the connection outlived a reset");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delayed_link_keeps_the_order_of_bytes() {
        let (proxy, addr) = setup().await;
        proxy.set(
            0,
            1,
            LinkFault {
                delay: Duration::from_millis(5),
                jitter: Duration::from_millis(20),
                bandwidth: Some(1_000_000),
                ..LinkFault::HEALTHY
            },
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        let msg: Vec<u8> = (0..50u8).collect();
        for b in &msg {
            s.write_all(&[*b]).await.unwrap();
        }
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }
}
