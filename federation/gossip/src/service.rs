//! The gossip loop of one node: its heartbeat out every interval (at once
//! after a refutation, and [`FIRST_BEAT_AFTER_CONNECT`] after the node gets
//! its first subscribed peer, the first one of all no later than one
//! interval after start), every heartbeat heard into the membership table,
//! the table re-evaluated every [`TICK`].
//!
//! Invariants:
//! - The loop owns the transport and the table; the caller sees them only
//!   through its [`Observer`]: what to advertise, the changes, and a copy of
//!   the table after every tick.
//! - Time is milliseconds since the loop started (one monotonic origin).
//! - The loop ends when `stop` resolves or the transport ends, and then
//!   stops the transport.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;

use crate::detector::DetectorConfig;
use crate::heartbeat::Heartbeat;
use crate::members::{MemberView, Members, MembershipEvent};
use crate::transport::{Transport, TransportEvent};

/// How often the membership table is re-evaluated.
pub const TICK: Duration = Duration::from_millis(100);

/// How long after this node gets its first subscribed peer (at start, or
/// after it had none) its next heartbeat goes out, unless one is due
/// sooner, the rhythm continuing from there. A node's first beat is due one
/// interval after start (a beat at start would reach nobody), so without
/// this a starting node would stay unknown for up to a whole interval after
/// it connects; the delay leaves a joining node time to reach the peers its
/// first one tells it of, so that the beat finds a mesh.
pub const FIRST_BEAT_AFTER_CONNECT: Duration = Duration::from_millis(300);

/// What the loop asks of and tells its owner.
pub trait Observer: Send {
    /// This node's heartbeat as of now; the loop sets its incarnation and
    /// suspicions.
    fn heartbeat(&mut self) -> Heartbeat;
    /// The heartbeat as sent (with the loop's incarnation and suspicions).
    fn sent(&mut self, _heartbeat: &Heartbeat) {}
    /// Changes of the membership table, as they happen.
    fn changed(&mut self, events: &[MembershipEvent]);
    /// The whole table after a tick, at `now_ms`.
    fn ticked(&mut self, members: Vec<MemberView>, now_ms: u64);
    /// A ping round trip to a connected peer.
    fn rtt(&mut self, _rtt: Duration) {}
}

/// Runs the loop for node `local_id` until `stop` resolves or the transport
/// ends.
pub async fn run(
    mut transport: Transport,
    local_id: u64,
    every: Duration,
    detector: DetectorConfig,
    observer: &mut impl Observer,
    stop: impl Future<Output = ()>,
) {
    let origin = Instant::now();
    let now_ms = move || origin.elapsed().as_millis() as u64;
    let mut members = Members::new(local_id, detector);
    // The first beat one interval from now, or sooner once a peer listens
    // (a beat at start would reach nobody).
    let mut next_beat = Instant::now() + every;
    let mut beat = tokio::time::interval_at(next_beat.into(), every);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(stop);
    // Connected peers subscribed to the topic, from the transport's events
    // (a set, so that an event lost to a full channel cannot make a count
    // drift).
    let mut listeners = BTreeSet::new();
    loop {
        let events = tokio::select! {
            () = &mut stop => break,
            _ = beat.tick() => {
                next_beat = Instant::now() + every;
                let mut hb = observer.heartbeat();
                hb.incarnation = members.incarnation();
                hb.suspects = members.suspects(now_ms());
                observer.sent(&hb);
                match hb.encode() {
                    Ok(bytes) => {
                        if transport.publish(bytes).await.is_err() {
                            tracing::warn!("gossip transport ended");
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot encode this node's heartbeat"),
                }
                Vec::new()
            }
            _ = tick.tick() => {
                let now = now_ms();
                let events = members.tick(now);
                observer.ticked(members.members(now), now);
                events
            }
            event = transport.next_event() => match event {
                None => break,
                Some(TransportEvent::Message { data, .. }) => match Heartbeat::decode(&data) {
                    Ok(hb) => members.observe(hb, now_ms()),
                    Err(_) => Vec::new(),
                },
                Some(TransportEvent::Subscribed { peer }) => {
                    let first = listeners.is_empty();
                    listeners.insert(peer);
                    let early = Instant::now() + FIRST_BEAT_AFTER_CONNECT;
                    // Never later than the beat already due: a peer that
                    // keeps reconnecting must not hold the beats back.
                    if first && early < next_beat {
                        beat.reset_at(early.into());
                        next_beat = early;
                    }
                    Vec::new()
                }
                Some(TransportEvent::Disconnected { peer }) => {
                    listeners.remove(&peer);
                    Vec::new()
                }
                Some(TransportEvent::Connected { .. }) => Vec::new(),
                Some(TransportEvent::Rtt { rtt, .. }) => {
                    observer.rtt(rtt);
                    Vec::new()
                }
            },
        };
        if events.is_empty() {
            continue;
        }
        observer.changed(&events);
        if events.iter().any(|e| matches!(e, MembershipEvent::Refuted { .. })) {
            // Refute without waiting for the next interval.
            beat.reset_immediately();
        }
    }
    transport.stop().await;
}
