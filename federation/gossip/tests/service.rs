//! Integration tests of the gossip loop: real swarms on the in-process
//! memory network (private network, noise, yamux, gossipsub), each driven by
//! `service::run` with its own membership table.
//!
//! No sleep is used for synchronisation: every wait is on the observers'
//! channel under a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use cell0_gossip::service::{self, Observer};
use cell0_gossip::transport::{Network, Transport, TransportConfig};
use cell0_gossip::{Addresses, DetectorConfig, Heartbeat, MemberView, MembershipEvent};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::{mpsc, oneshot};

/// How long the nodes may take to hear each other.
const DEADLINE: Duration = Duration::from_secs(20);

/// Reports every member this node hears for the first time as
/// (this node, the member).
struct Recorder {
    heartbeat: Heartbeat,
    joined: mpsc::UnboundedSender<(u64, u64)>,
}

impl Observer for Recorder {
    fn heartbeat(&mut self) -> Heartbeat {
        self.heartbeat.clone()
    }

    fn changed(&mut self, events: &[MembershipEvent]) {
        for event in events {
            if let MembershipEvent::Joined(hb) = event {
                let _ = self.joined.send((self.heartbeat.node_id, hb.node_id));
            }
        }
    }

    fn ticked(&mut self, _members: Vec<MemberView>, _now_ms: u64) {}
}

/// Starts node `id` on `/memory/<port>`, joining `join`, beating every
/// `every`; returns its address, the sender that stops it and its task.
async fn start_node(
    id: u64,
    port: u16,
    join: Option<SocketAddr>,
    every: Duration,
    joined: mpsc::UnboundedSender<(u64, u64)>,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let keypair = Keypair::generate_ed25519();
    let peer_id = PeerId::from(keypair.public());
    let mut config = TransportConfig::new(SocketAddr::from(([127, 0, 0, 1], port)), keypair, "cell0-service-test");
    config.network = Network::Memory;
    config.psk = Some([7u8; 32]);
    config.join = join.iter().map(|a| a.to_string()).collect();
    config.redial = Duration::from_millis(500);
    let transport = Transport::start(config, |_: &PeerId, _: &[u8]| true, std::future::pending())
        .await
        .unwrap();
    let addr = transport.listen_addr();
    let mut recorder = Recorder {
        heartbeat: Heartbeat::new(
            id,
            &peer_id,
            format!("node{id}"),
            "test".into(),
            Addresses {
                gossip: addr.to_string(),
                ..Addresses::default()
            },
        ),
        joined,
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let detector = DetectorConfig::for_interval_ms(every.as_millis() as u64);
        service::run(transport, id, every, detector, &mut recorder, async move {
            let _ = stop_rx.await;
        })
        .await;
    });
    (addr, stop_tx, task)
}

/// Two nodes beating once a minute hear each other long before the first
/// minute is out: a node's first beat goes out shortly after its first peer
/// subscribes, not a whole interval later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_is_heard_without_waiting_for_a_whole_interval() {
    let every = Duration::from_secs(60);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (seed, stop1, task1) = start_node(1, 42_001, None, every, tx.clone()).await;
    let (_, stop2, task2) = start_node(2, 42_002, Some(seed), every, tx).await;
    let mut heard = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while heard.len() < 2 {
            let pair = rx.recv().await.expect("a node stopped");
            if !heard.contains(&pair) {
                heard.push(pair);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("within {DEADLINE:?} only {heard:?} of (1, 2) and (2, 1) were heard"));
    heard.sort_unstable();
    assert_eq!(heard, vec![(1, 2), (2, 1)]);
    for stop in [stop1, stop2] {
        let _ = stop.send(());
    }
    task1.await.unwrap();
    task2.await.unwrap();
}
