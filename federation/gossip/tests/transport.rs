//! Integration tests of the gossip transport: real swarms on 127.0.0.1
//! (and on the in-process memory network, under the same upgrades).
//!
//! No sleep is used for synchronisation: every wait is a loop over
//! `next_event` (publishing every 200 ms, since gossipsub needs its mesh)
//! under a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cell0_gossip::transport::{Network, Transport, TransportConfig, TransportError, TransportEvent};
use libp2p::PeerId;
use libp2p::identity::Keypair;

/// How long an exchange may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// How often each node publishes while waiting.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// A configuration on 127.0.0.1, port 0, with a fast redial.
fn config(psk: Option<[u8; 32]>, join: Vec<String>) -> TransportConfig {
    let mut config = TransportConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        Keypair::generate_ed25519(),
        "cell0-test",
    );
    config.psk = psk;
    config.join = join;
    config.redial = Duration::from_millis(500);
    config
}

/// Starts a transport that accepts every message and never shuts down by
/// itself.
async fn start(config: TransportConfig) -> Transport {
    Transport::start(config, |_: &PeerId, _: &[u8]| true, std::future::pending())
        .await
        .unwrap()
}

/// One node of an exchange: what it publishes, what it must receive.
struct Node {
    transport: Transport,
    /// Published every [`PUBLISH_EVERY`].
    publish: Vec<Vec<u8>>,
    /// (author, data) pairs to receive, each at least `times`.
    expect: Vec<(PeerId, Vec<u8>)>,
    times: usize,
}

/// What a node saw during an exchange.
struct Seen {
    transport: Transport,
    events: Vec<TransportEvent>,
}

/// Runs one node: publishes its messages every [`PUBLISH_EVERY`] and reads
/// events until every node counted in `done` has received what it expects
/// (`total` of them; a node that expects nothing does not count).
async fn run_node(node: Node, done: Arc<AtomicUsize>, total: usize) -> Seen {
    let Node {
        mut transport,
        publish,
        expect,
        times,
    } = node;
    let mut counts: HashMap<(PeerId, Vec<u8>), usize> = expect.iter().cloned().map(|k| (k, 0)).collect();
    let mut events = Vec::new();
    let mut satisfied = expect.is_empty();
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    loop {
        if done.load(Ordering::SeqCst) >= total {
            return Seen { transport, events };
        }
        let event = tokio::select! {
            _ = tick.tick() => None,
            event = transport.next_event() => Some(event.expect("transport ended during the exchange")),
        };
        match event {
            None => {
                for data in &publish {
                    transport.publish(data.clone()).await.unwrap();
                }
            }
            Some(event) => {
                if let TransportEvent::Message { source, data } = &event
                    && let Some(count) = counts.get_mut(&(*source, data.clone()))
                {
                    *count += 1;
                }
                if !matches!(event, TransportEvent::Rtt { .. }) {
                    events.push(event);
                }
                if !satisfied && counts.values().all(|&n| n >= times) {
                    satisfied = true;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

/// Runs all nodes concurrently until each one that expects something has
/// received it, or panics after [`DEADLINE`].
async fn exchange(nodes: Vec<Node>) -> Vec<Seen> {
    let total = nodes.iter().filter(|n| !n.expect.is_empty()).count();
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let runs = nodes.into_iter().map(|node| run_node(node, done.clone(), total));
    let seen = tokio::time::timeout(DEADLINE, futures::future::join_all(runs))
        .await
        .unwrap_or_else(|_| panic!("exchange not done after {DEADLINE:?}"));
    eprintln!("exchange done in {:?}", started.elapsed());
    seen
}

/// Messages authored by `peer` in `events`.
fn messages_from(events: &[TransportEvent], peer: PeerId) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, TransportEvent::Message { source, .. } if *source == peer))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_with_same_psk_exchange_messages() {
    let psk = Some([7u8; 32]);
    let a = start(config(psk, Vec::new())).await;
    let seed = a.listen_addr().to_string();
    assert_ne!(a.listen_addr().port(), 0);
    let b = start(config(psk, vec![seed.clone()])).await;
    let c = start(config(psk, vec![seed])).await;
    let (ida, idb, idc) = (a.local_peer_id(), b.local_peer_id(), c.local_peer_id());
    let (ma, mb, mc) = (b"from a".to_vec(), b"from b".to_vec(), b"from c".to_vec());

    let seen = exchange(vec![
        Node {
            transport: a,
            publish: vec![ma.clone()],
            expect: vec![(idb, mb.clone()), (idc, mc.clone())],
            times: 1,
        },
        Node {
            transport: b,
            publish: vec![mb.clone()],
            expect: vec![(ida, ma.clone()), (idc, mc.clone())],
            times: 1,
        },
        Node {
            transport: c,
            publish: vec![mc],
            expect: vec![(ida, ma), (idb, mb)],
            times: 1,
        },
    ])
    .await;

    for s in &seen {
        // Every message delivered comes from another node, never from itself.
        assert_eq!(messages_from(&s.events, s.transport.local_peer_id()), 0);
    }
    for s in seen {
        s.transport.stop().await;
    }
}

/// [`config`] on the memory network, listening on `/memory/<port>`.
fn memory_config(port: u16, psk: Option<[u8; 32]>, join: Vec<String>) -> TransportConfig {
    let mut config = config(psk, join);
    config.network = Network::Memory;
    config.listen = SocketAddr::from(([127, 0, 0, 1], port));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_network_connects_nodes_with_the_same_psk_only() {
    let psk = Some([3u8; 32]);
    let a = start(memory_config(41_001, psk, Vec::new())).await;
    assert_eq!(a.listen_addr().port(), 41_001);
    let seed = a.listen_addr().to_string();
    let b = start(memory_config(41_002, psk, vec![seed.clone()])).await;
    let c = start(memory_config(41_003, psk, vec![seed.clone()])).await;
    let foreign = start(memory_config(41_004, Some([4u8; 32]), vec![seed])).await;
    let (ida, idb, idc, idf) = (
        a.local_peer_id(),
        b.local_peer_id(),
        c.local_peer_id(),
        foreign.local_peer_id(),
    );
    let (ma, mb, mc) = (b"a".to_vec(), b"b".to_vec(), b"c".to_vec());

    let seen = exchange(vec![
        Node {
            transport: a,
            publish: vec![ma.clone()],
            expect: vec![(idb, mb.clone()), (idc, mc.clone())],
            times: 3,
        },
        Node {
            transport: b,
            publish: vec![mb.clone()],
            expect: vec![(ida, ma.clone()), (idc, mc.clone())],
            times: 3,
        },
        Node {
            transport: c,
            publish: vec![mc],
            expect: vec![(ida, ma), (idb, mb)],
            times: 3,
        },
        Node {
            transport: foreign,
            publish: vec![b"foreign".to_vec()],
            expect: Vec::new(),
            times: 0,
        },
    ])
    .await;

    assert!(
        !seen[3].events.iter().any(|e| matches!(
            e,
            TransportEvent::Connected { .. } | TransportEvent::Subscribed { .. } | TransportEvent::Message { .. }
        )),
        "the foreign node got in: {:?}",
        seen[3].events
    );
    for s in &seen[..3] {
        assert_eq!(messages_from(&s.events, idf), 0, "a foreign message got through");
    }
    for s in seen {
        s.transport.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_network_needs_a_listen_port() {
    let err = Transport::start(
        memory_config(0, None, Vec::new()),
        |_: &PeerId, _: &[u8]| true,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("needs a port of its own"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_other_psk_never_connects() {
    let a = start(config(Some([1u8; 32]), Vec::new())).await;
    let seed = a.listen_addr().to_string();
    let b = start(config(Some([1u8; 32]), vec![seed.clone()])).await;
    let foreign = start(config(Some([2u8; 32]), vec![seed])).await;
    let (ida, idb, idf) = (a.local_peer_id(), b.local_peer_id(), foreign.local_peer_id());
    let (ma, mb, mf) = (b"a".to_vec(), b"b".to_vec(), b"foreign".to_vec());

    // a and b receive each other's message several times, so the foreign node
    // (redialling a every 500 ms) has had its chances.
    let seen = exchange(vec![
        Node {
            transport: a,
            publish: vec![ma.clone()],
            expect: vec![(idb, mb.clone())],
            times: 5,
        },
        Node {
            transport: b,
            publish: vec![mb],
            expect: vec![(ida, ma)],
            times: 5,
        },
        Node {
            transport: foreign,
            publish: vec![mf],
            expect: Vec::new(),
            times: 0,
        },
    ])
    .await;

    let foreign_events = &seen[2].events;
    assert!(
        !foreign_events
            .iter()
            .any(|e| matches!(e, TransportEvent::Connected { .. })),
        "foreign node connected: {foreign_events:?}"
    );
    assert!(
        !foreign_events
            .iter()
            .any(|e| matches!(e, TransportEvent::Message { .. }))
    );
    for s in &seen[..2] {
        assert_eq!(messages_from(&s.events, idf), 0, "a foreign message got through");
        assert!(
            !s.events.contains(&TransportEvent::Connected { peer: idf }),
            "the foreign node connected"
        );
    }
    for s in seen {
        s.transport.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_are_not_delivered() {
    let psk = Some([3u8; 32]);
    let a = Transport::start(
        config(psk, Vec::new()),
        |_: &PeerId, data: &[u8]| !data.starts_with(b"bad"),
        std::future::pending(),
    )
    .await
    .unwrap();
    let b = start(config(psk, vec![a.listen_addr().to_string()])).await;
    let idb = b.local_peer_id();
    let (bad, good) = (b"bad message".to_vec(), b"good message".to_vec());

    let seen = exchange(vec![
        Node {
            transport: a,
            publish: Vec::new(),
            expect: vec![(idb, good.clone())],
            times: 5,
        },
        Node {
            transport: b,
            publish: vec![bad.clone(), good.clone()],
            expect: Vec::new(),
            times: 0,
        },
    ])
    .await;

    let from_b: Vec<&Vec<u8>> = seen[0]
        .events
        .iter()
        .filter_map(|e| match e {
            TransportEvent::Message { source, data } if *source == idb => Some(data),
            _ => None,
        })
        .collect();
    assert!(from_b.iter().filter(|d| **d == &good).count() >= 5);
    assert!(
        !from_b.iter().any(|d| d.starts_with(b"bad")),
        "a rejected message was delivered"
    );
    for s in seen {
        s.transport.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_subscribed_and_disconnected_events() {
    let mut a = start(config(None, Vec::new())).await;
    let b = start(config(None, vec![a.listen_addr().to_string()])).await;
    let idb = b.local_peer_id();
    let wait_for = async |t: &mut Transport, want: TransportEvent| {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if t.next_event().await.expect("transport ended") == want {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {want:?} within {DEADLINE:?}"));
    };
    wait_for(&mut a, TransportEvent::Connected { peer: idb }).await;
    wait_for(&mut a, TransportEvent::Subscribed { peer: idb }).await;
    b.stop().await;
    wait_for(&mut a, TransportEvent::Disconnected { peer: idb }).await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_future_ends_the_transport() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut t = Transport::start(config(None, Vec::new()), |_: &PeerId, _: &[u8]| true, async move {
        let _ = rx.await;
    })
    .await
    .unwrap();
    tx.send(()).unwrap();
    tokio::time::timeout(DEADLINE, async { while t.next_event().await.is_some() {} })
        .await
        .unwrap();
    assert!(matches!(t.publish(b"late".to_vec()).await, Err(TransportError::Closed)));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_without_port_is_an_error() {
    let err = Transport::start(
        config(None, vec!["localhost".to_string()]),
        |_: &PeerId, _: &[u8]| true,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, TransportError::InvalidJoinAddress { addr, .. } if addr == "localhost"),
        "{err:?}"
    );
    assert!(err.to_string().contains("localhost"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_join_is_not_fatal() {
    let t = start(config(None, vec!["no-such-host.invalid:7000".to_string()])).await;
    t.publish(b"nobody listens".to_vec()).await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_address_in_use_is_an_error() {
    let a = start(config(None, Vec::new())).await;
    let mut taken = config(None, Vec::new());
    taken.listen = a.listen_addr();
    let err = Transport::start(taken, |_: &PeerId, _: &[u8]| true, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Listen { addr, .. } if addr == a.listen_addr()),
        "{err:?}"
    );
    a.stop().await;
}
