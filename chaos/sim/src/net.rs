//! The simulated network: every connection between two members of a
//! simulated cluster, in memory, under a seeded random number generator.
//!
//! A member dials another through [`SimTransport`], the consensus crate's
//! [`Transport`] seam: tonic's HTTP/2 channel runs over an in-memory pipe
//! instead of a TCP socket, so replication, votes, forwarding and joins run
//! the same code as on the real network. Each connection is two pipes, one
//! per direction, with a pump between the two ends of each: it reads what
//! one side wrote and delivers it to the other after a delay drawn for that
//! chunk (the link's latency), in order, as TCP would.
//!
//! Faults, all decided by the simulation's generator:
//! - **latency**: every chunk waits between [`NetParams::latency_min`] and
//!   [`NetParams::latency_max`], plus a link's extra delay while it is
//!   slowed ([`SimNet::slow`]); never reordered within a connection.
//! - **loss**: a chunk is lost with probability
//!   [`NetParams::reset_per_chunk`]. A byte stream cannot lose a chunk and
//!   go on, so the loss resets the connection (both sides see it closed),
//!   which is what a TCP connection that lost its peer ends as; the calls
//!   in flight on it fail, and the next call dials again.
//! - **partitions**: a cut link ([`SimNet::cut`]) holds the bytes of its
//!   connections until it is healed (a TCP connection retransmitting), or
//!   resets them (chosen per connection, [`NetParams::reset_on_cut`]); a
//!   dial across it waits until the link heals, so it fails on the dialer's
//!   connect timeout.
//! - **crashes**: a member that is down ([`SimNet::down`]) has its
//!   connections reset and refuses new ones at once (no process behind the
//!   port).
//!
//! Every random choice is a hash of the seed and of where and when it is
//! made (the link, which connection of that link, the simulated instant),
//! not the next draw of a shared generator: tasks that run at the same
//! simulated instant in another order (tokio orders some of them at random,
//! see the crate documentation) still see the same latencies and losses.
//!
//! Invariants: bytes of one direction of a connection arrive in the order
//! they were written, complete, or not at all after a reset; nothing
//! crosses a cut link.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cell0_consensus::network::{Transport, endpoint};
use cell0_consensus::{ConsensusError, NodeId};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tonic::codegen::http::Uri;
use tonic::transport::Channel;

/// Bytes one pipe buffers before its writer waits.
const PIPE_BYTES: usize = 256 * 1024;

/// Most bytes a pump moves as one chunk.
const CHUNK_BYTES: usize = 64 * 1024;

/// The port every simulated member listens on (only part of its address).
const PORT: u16 = 7000;

/// The internal address of simulated member `id`.
pub fn addr_of(id: NodeId) -> String {
    format!("n{id}.sim:{PORT}")
}

/// The member an address of [`addr_of`] names.
pub fn node_of(addr: &str) -> Option<NodeId> {
    let host = addr.strip_suffix(&format!(":{PORT}"))?;
    host.strip_prefix('n')?.strip_suffix(".sim")?.parse().ok()
}

/// How the network behaves when no fault is injected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetParams {
    /// Least one-way delay of a chunk.
    pub latency_min: Duration,
    /// Greatest one-way delay of a chunk (before a link's extra delay).
    pub latency_max: Duration,
    /// Probability that a chunk is lost, which resets its connection.
    pub reset_per_chunk: f64,
    /// Probability that cutting a link resets a connection across it
    /// (otherwise its bytes wait for the heal).
    pub reset_on_cut: f64,
}

impl Default for NetParams {
    fn default() -> Self {
        Self {
            latency_min: Duration::from_micros(200),
            latency_max: Duration::from_millis(3),
            reset_per_chunk: 0.0005,
            reset_on_cut: 0.5,
        }
    }
}

/// Counts of what the network did, for summaries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounts {
    /// Connections opened.
    pub connections: u64,
    /// Connections reset (lost chunks, cuts, crashes).
    pub resets: u64,
    /// Chunks delivered.
    pub chunks: u64,
    /// Dials refused because the target was down.
    pub refused: u64,
}

/// A signal that is set once and wakes every waiter (tokio's `watch`
/// would wake them in a random order).
#[derive(Default)]
struct Signal {
    set: AtomicBool,
    notify: Notify,
}

impl Signal {
    fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.set.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// One open connection.
struct Conn {
    /// The dialing member.
    a: NodeId,
    /// The dialed member.
    b: NodeId,
    /// Which connection from `a` to `b` it is (0 for the first).
    seq: u64,
    /// Resets it; its pumps wait on it.
    reset: Arc<Signal>,
    /// Pump tasks still running; the last one removes the entry.
    tasks: usize,
}

/// What a draw is for (part of its key).
#[derive(Debug, Clone, Copy)]
enum Draw {
    Handshake = 1,
    Latency = 2,
    Loss = 3,
    ResetOnCut = 4,
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct NetState {
    /// The seed every draw is keyed with.
    seed: u64,
    /// When the network was made: draws are keyed by time since then.
    start: Instant,
    params: NetParams,
    /// Dials made so far from one member to another.
    dials: BTreeMap<(NodeId, NodeId), u64>,
    /// Cuts made so far.
    cuts: u64,
    /// Members that are up, with the queue their server accepts from.
    servers: BTreeMap<NodeId, mpsc::UnboundedSender<DuplexStream>>,
    /// Cut links, as (lower id, higher id).
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Extra one-way delay of slowed links, as (lower id, higher id).
    slow: BTreeMap<(NodeId, NodeId), Duration>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    counts: NetCounts,
}

fn link(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl NetState {
    fn reset(&mut self, id: u64) {
        if let Some(conn) = self.conns.remove(&id) {
            conn.reset.set();
            self.counts.resets += 1;
        }
    }

    /// A random number for `what`, keyed by `key` and the simulated time.
    fn draw(&self, what: Draw, key: [u64; 3]) -> u64 {
        let now = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        [what as u64, key[0], key[1], key[2], now]
            .into_iter()
            .fold(mix(self.seed), |h, k| mix(h ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    }

    /// Whether an event of probability `p` happens, for `what` at `key`.
    fn chance(&self, p: f64, what: Draw, key: [u64; 3]) -> bool {
        // 53 random bits as a number in [0, 1).
        let unit = (self.draw(what, key) >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }

    /// The one-way delay from `a` to `b` for `what` at `key`.
    fn latency(&self, a: NodeId, b: NodeId, what: Draw, key: [u64; 3]) -> Duration {
        let (min, max) = (self.params.latency_min, self.params.latency_max);
        let span = u64::try_from(max.saturating_sub(min).as_nanos()).unwrap_or(u64::MAX);
        let base = min + Duration::from_nanos(self.draw(what, key) % span.saturating_add(1));
        base + self.slow.get(&link(a, b)).copied().unwrap_or_default()
    }
}

/// The network of one simulation. Cheap to clone; all clones are one
/// network.
#[derive(Clone)]
pub struct SimNet {
    state: Arc<Mutex<NetState>>,
    /// Notified on every change of links or members, for the dials and
    /// pumps that wait for a heal.
    changed: Arc<Notify>,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet").finish_non_exhaustive()
    }
}

impl SimNet {
    /// A network drawing its randomness from `seed`.
    pub fn new(seed: u64, params: NetParams) -> Self {
        Self {
            state: Arc::new(Mutex::new(NetState {
                seed,
                start: Instant::now(),
                params,
                dials: BTreeMap::new(),
                cuts: 0,
                servers: BTreeMap::new(),
                cut: BTreeSet::new(),
                slow: BTreeMap::new(),
                conns: BTreeMap::new(),
                next_conn: 0,
                counts: NetCounts::default(),
            })),
            changed: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.notify_waiters();
    }

    /// Waits until `done` holds, checking it after every change.
    async fn wait_until(&self, mut done: impl FnMut(&mut NetState) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&mut self.lock()) {
                return;
            }
            notified.await;
        }
    }

    /// What the network did so far.
    pub fn counts(&self) -> NetCounts {
        self.lock().counts
    }

    /// Member `id` is up: its server accepts connections from `incoming`.
    pub fn up(&self, id: NodeId, incoming: mpsc::UnboundedSender<DuplexStream>) {
        self.lock().servers.insert(id, incoming);
        self.bump();
    }

    /// Member `id` is down: its connections are reset and dials to it are
    /// refused.
    pub fn down(&self, id: NodeId) {
        let mut st = self.lock();
        st.servers.remove(&id);
        let doomed: Vec<u64> = st
            .conns
            .iter()
            .filter(|(_, c)| c.a == id || c.b == id)
            .map(|(k, _)| *k)
            .collect();
        for k in doomed {
            st.reset(k);
        }
        drop(st);
        self.bump();
    }

    /// Cuts the link between `a` and `b` (both directions). Each of its
    /// connections is reset or held, as the generator decides.
    pub fn cut(&self, a: NodeId, b: NodeId) {
        let mut st = self.lock();
        st.cut.insert(link(a, b));
        st.cuts += 1;
        let cut = st.cuts;
        let p = st.params.reset_on_cut;
        let doomed: Vec<u64> = st
            .conns
            .iter()
            .filter(|(_, c)| link(c.a, c.b) == link(a, b))
            .filter(|(_, c)| st.chance(p, Draw::ResetOnCut, [c.a << 32 | c.b, c.seq, cut]))
            .map(|(k, _)| *k)
            .collect();
        for k in doomed {
            st.reset(k);
        }
        drop(st);
        self.bump();
    }

    /// Adds `extra` one-way delay to the link between `a` and `b` (zero
    /// removes it).
    pub fn slow(&self, a: NodeId, b: NodeId, extra: Duration) {
        let mut st = self.lock();
        if extra.is_zero() {
            st.slow.remove(&link(a, b));
        } else {
            st.slow.insert(link(a, b), extra);
        }
    }

    /// Resets every open connection (the calls in flight on them fail; the
    /// next call dials again).
    pub fn reset_all(&self) {
        let mut st = self.lock();
        let all: Vec<u64> = st.conns.keys().copied().collect();
        for k in all {
            st.reset(k);
        }
    }

    /// Heals every cut and slowed link.
    pub fn heal_all(&self) {
        let mut st = self.lock();
        st.cut.clear();
        st.slow.clear();
        drop(st);
        self.bump();
    }

    /// Whether the link between `a` and `b` is cut.
    pub fn is_cut(&self, a: NodeId, b: NodeId) -> bool {
        self.lock().cut.contains(&link(a, b))
    }

    /// Opens a connection from `from` to `to`: the dialer's end. Waits while
    /// the link is cut; refused at once when `to` is down.
    async fn dial(&self, from: NodeId, to: NodeId) -> io::Result<DuplexStream> {
        // The handshake takes a one-way trip.
        let (seq, syn) = {
            let mut st = self.lock();
            let n = st.dials.entry((from, to)).or_default();
            let seq = *n;
            *n += 1;
            (seq, st.latency(from, to, Draw::Handshake, [from, to, seq]))
        };
        tokio::time::sleep(syn).await;
        let mut refused = false;
        self.wait_until(|st| {
            refused = !st.servers.contains_key(&to);
            refused || !st.cut.contains(&link(from, to))
        })
        .await;
        let mut st = self.lock();
        let server = match st.servers.get(&to) {
            Some(server) if !refused => server.clone(),
            _ => {
                st.counts.refused += 1;
                return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "member is down"));
            }
        };
        let (mine, net_mine) = tokio::io::duplex(PIPE_BYTES);
        let (theirs, net_theirs) = tokio::io::duplex(PIPE_BYTES);
        if server.send(theirs).is_err() {
            st.counts.refused += 1;
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "member is down"));
        }
        let id = st.next_conn;
        st.next_conn += 1;
        st.counts.connections += 1;
        let reset = Arc::new(Signal::default());
        st.conns.insert(
            id,
            Conn {
                a: from,
                b: to,
                seq,
                reset: reset.clone(),
                tasks: 4,
            },
        );
        drop(st);
        let (mine_r, mine_w) = tokio::io::split(net_mine);
        let (theirs_r, theirs_w) = tokio::io::split(net_theirs);
        self.pipe(id, seq, from, to, mine_r, theirs_w, reset.clone());
        self.pipe(id, seq, to, from, theirs_r, mine_w, reset);
        Ok(mine)
    }

    /// A pump task ended.
    fn task_done(&self, id: u64) {
        let mut st = self.lock();
        if let Some(conn) = st.conns.get_mut(&id) {
            conn.tasks = conn.tasks.saturating_sub(1);
            if conn.tasks == 0 {
                st.conns.remove(&id);
            }
        }
    }

    /// Starts the two tasks that carry what `from` writes into `src` to
    /// `to`'s `dst`, on connection `id`, the `seq`th from its dialer to the
    /// dialed member.
    #[allow(clippy::too_many_arguments)]
    fn pipe(
        &self,
        id: u64,
        seq: u64,
        from: NodeId,
        to: NodeId,
        mut src: ReadHalf<DuplexStream>,
        mut dst: WriteHalf<DuplexStream>,
        reset: Arc<Signal>,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        // Reader: stamps each chunk with its delivery time.
        let net = self.clone();
        let reset_r = reset.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut last = Instant::now();
            let key = [from << 32 | to, seq, 0];
            loop {
                let n = tokio::select! {
                    biased;
                    () = reset_r.wait() => break,
                    r = src.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    },
                };
                let (at, lost) = {
                    let mut st = net.lock();
                    let p = st.params.reset_per_chunk;
                    let lost = st.chance(p, Draw::Loss, key);
                    if lost {
                        st.reset(id);
                    }
                    (Instant::now() + st.latency(from, to, Draw::Latency, key), lost)
                };
                if lost {
                    break;
                }
                last = last.max(at);
                if tx.send((last, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            net.task_done(id);
        });
        // Writer: delivers each chunk at its time, holding it while the link
        // is cut.
        let net = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    () = reset.wait() => break,
                    m = rx.recv() => m,
                };
                let Some((at, bytes)) = next else {
                    // The writer closed its side: pass the end on.
                    let _ = dst.shutdown().await;
                    break;
                };
                let written = tokio::select! {
                    biased;
                    () = reset.wait() => break,
                    r = async {
                        tokio::time::sleep_until(at).await;
                        net.wait_until(|st| !st.cut.contains(&link(from, to))).await;
                        dst.write_all(&bytes).await
                    } => r,
                };
                if written.is_err() {
                    break;
                }
                net.lock().counts.chunks += 1;
            }
            net.task_done(id);
        });
    }
}

/// A member's [`Transport`] over the simulated network.
#[derive(Clone)]
pub struct SimTransport {
    /// The member dialing.
    pub node: NodeId,
    /// The network.
    pub net: SimNet,
    /// How long a dial may take (a dial across a cut link takes this long
    /// and fails).
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for SimTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTransport").field("node", &self.node).finish()
    }
}

impl Transport for SimTransport {
    fn connect(&self, addr: &str) -> Result<Channel, ConsensusError> {
        let to = node_of(addr)
            .ok_or_else(|| ConsensusError::invalid("internal_addr", format!("{addr:?} is not a simulated member")))?;
        let (net, from) = (self.net.clone(), self.node);
        let connector = tower::service_fn(move |_: Uri| {
            let net = net.clone();
            async move { net.dial(from, to).await.map(TokioIo::new) }
        });
        Ok(endpoint(addr, self.connect_timeout)?.connect_with_connector_lazy(connector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_their_member() {
        assert_eq!(node_of(&addr_of(3)), Some(3));
        assert_eq!(node_of("127.0.0.1:7000"), None);
        assert_eq!(node_of("n3.sim:7001"), None);
    }
}
