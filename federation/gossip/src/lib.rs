//! Discovery and failure detection for the nodes of one site, over libp2p.
//!
//! This crate knows nothing of Raft. It runs a libp2p swarm
//! ([`transport`]), gossips signed heartbeats ([`heartbeat`]), judges every
//! peer with a phi-accrual detector ([`detector`]) and keeps a membership
//! table ([`members`]) whose changes come out as [`MembershipEvent`]s; the
//! node decides what they mean for the replicated state. [`expect`] holds
//! the `--bootstrap-expect` rule, [`keys`] the node key and cluster secret,
//! and [`service`] the loop that ties a transport to a membership table.
//!
//! Everything but [`transport`] and [`service`] is pure logic over an
//! injected clock.

pub mod detector;
pub mod error;
pub mod expect;
pub mod heartbeat;
pub mod keys;
pub mod members;
pub mod service;
pub mod transport;

pub use detector::{DetectorConfig, Liveness, PhiDetector};
pub use error::GossipError;
pub use heartbeat::{Addresses, Heartbeat, Load, Suspicion};
pub use keys::{ClusterSecret, load_or_create_keypair};
pub use libp2p::PeerId;
pub use members::{MemberState, MemberView, Members, MembershipEvent, Reason};
