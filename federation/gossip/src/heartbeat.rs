//! The heartbeat every node gossips about once a second.
//!
//! Invariants:
//! - On the wire a heartbeat is a versioned envelope (`Envelope`) encoded
//!   with postcard; a new field means a new variant, and a node decodes
//!   every variant it knows. A message it cannot decode is rejected, never
//!   half-read.
//! - Every size is bounded ([`Limits`]): a decoded heartbeat that breaks a
//!   bound is rejected like an undecodable one, so one bad peer cannot make
//!   the others hold unbounded data.
//! - Gossipsub signs every message with the sender's libp2p key, and
//!   [`Heartbeat::peer_id`] must name that key: a node cannot speak for
//!   another.

use serde::{Deserialize, Serialize};

use crate::error::GossipError;

/// Bounds of a heartbeat's fields.
pub struct Limits;

impl Limits {
    /// Most bytes of an encoded heartbeat.
    pub const MAX_ENCODED_BYTES: usize = 32 * 1024;
    /// Most bytes of a name, site, version or address.
    pub const MAX_TEXT_BYTES: usize = 256;
    /// Most suspicions one heartbeat carries.
    pub const MAX_SUSPECTS: usize = 256;
}

/// How busy a node is, as it reports itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Agents running on the node.
    pub agents: u32,
    /// One-minute load average times 100.
    pub load_avg_x100: u32,
}

/// "I suspect `node_id` as of its `incarnation`."
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Suspicion {
    /// The suspected node.
    pub node_id: u64,
    /// The incarnation the suspicion is about; a higher one refutes it.
    pub incarnation: u64,
}

/// The addresses a node serves on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addresses {
    /// Public gRPC API, host:port.
    pub public: String,
    /// Internal gRPC (Raft, forwarding), host:port.
    pub internal: String,
    /// Gossip (libp2p TCP), host:port.
    pub gossip: String,
}

/// One node's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node's Cell0 id.
    pub node_id: u64,
    /// The node's libp2p peer id, as a string: must be the signer's.
    pub peer_id: String,
    /// The node's name.
    pub name: String,
    /// The node's site.
    pub site: String,
    /// The cluster the node belongs to, once it joined one.
    pub cluster_id: Option<u64>,
    /// Where the node serves.
    pub addresses: Addresses,
    /// The node's software version.
    pub version: String,
    /// Raised by the node to refute a suspicion of itself.
    pub incarnation: u64,
    /// How busy the node is.
    pub load: Load,
    /// The peers this node currently suspects.
    pub suspects: Vec<Suspicion>,
}

/// The wire form: one variant per layout.
#[derive(Debug, Serialize, Deserialize)]
enum Envelope {
    V1(Heartbeat),
}

impl Heartbeat {
    /// The heartbeat of node `node_id` (libp2p identity `peer_id`) as it
    /// starts: this build's version, no cluster yet, incarnation 0, no load,
    /// no suspicions (the gossip loop fills in the last two).
    pub fn new(node_id: u64, peer_id: &libp2p::PeerId, name: String, site: String, addresses: Addresses) -> Self {
        Self {
            node_id,
            peer_id: peer_id.to_string(),
            name,
            site,
            cluster_id: None,
            addresses,
            version: env!("CARGO_PKG_VERSION").to_string(),
            incarnation: 0,
            load: Load::default(),
            suspects: Vec::new(),
        }
    }

    /// The wire form of this heartbeat.
    pub fn encode(&self) -> Result<Vec<u8>, GossipError> {
        self.check()?;
        let bytes = postcard::to_stdvec(&Envelope::V1(self.clone())).map_err(GossipError::Encode)?;
        if bytes.len() > Limits::MAX_ENCODED_BYTES {
            return Err(GossipError::Invalid(format!(
                "heartbeat of {} bytes, more than {}",
                bytes.len(),
                Limits::MAX_ENCODED_BYTES
            )));
        }
        Ok(bytes)
    }

    /// A heartbeat from its wire form, checked against [`Limits`].
    pub fn decode(bytes: &[u8]) -> Result<Self, GossipError> {
        if bytes.len() > Limits::MAX_ENCODED_BYTES {
            return Err(GossipError::Invalid(format!(
                "heartbeat of {} bytes, more than {}",
                bytes.len(),
                Limits::MAX_ENCODED_BYTES
            )));
        }
        let Envelope::V1(hb) = postcard::from_bytes(bytes).map_err(GossipError::Decode)?;
        hb.check()?;
        Ok(hb)
    }

    /// Checks every bound of [`Limits`].
    fn check(&self) -> Result<(), GossipError> {
        let texts = [
            ("peer_id", &self.peer_id),
            ("name", &self.name),
            ("site", &self.site),
            ("version", &self.version),
            ("addresses.public", &self.addresses.public),
            ("addresses.internal", &self.addresses.internal),
            ("addresses.gossip", &self.addresses.gossip),
        ];
        for (field, text) in texts {
            if text.len() > Limits::MAX_TEXT_BYTES {
                return Err(GossipError::Invalid(format!(
                    "{field} of {} bytes, more than {}",
                    text.len(),
                    Limits::MAX_TEXT_BYTES
                )));
            }
        }
        if self.suspects.len() > Limits::MAX_SUSPECTS {
            return Err(GossipError::Invalid(format!(
                "{} suspects, more than {}",
                self.suspects.len(),
                Limits::MAX_SUSPECTS
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A heartbeat of node `id` with the given incarnation.
    pub(crate) fn heartbeat(id: u64, incarnation: u64) -> Heartbeat {
        Heartbeat {
            node_id: id,
            peer_id: format!("peer-{id}"),
            name: format!("node{id}"),
            site: "default".into(),
            cluster_id: Some(7),
            addresses: Addresses {
                public: format!("127.0.0.1:{}", 7100 + id),
                internal: format!("127.0.0.1:{}", 7101 + id),
                gossip: format!("127.0.0.1:{}", 7102 + id),
            },
            version: "0.1.0".into(),
            incarnation,
            load: Load::default(),
            suspects: Vec::new(),
        }
    }

    #[test]
    fn a_heartbeat_survives_its_wire_form() {
        let mut hb = heartbeat(3, 9);
        hb.suspects.push(Suspicion {
            node_id: 4,
            incarnation: 2,
        });
        assert_eq!(Heartbeat::decode(&hb.encode().unwrap()).unwrap(), hb);
    }

    #[test]
    fn garbage_and_oversized_fields_are_refused() {
        assert!(matches!(Heartbeat::decode(b"\x07garbage"), Err(GossipError::Decode(_))));
        let mut hb = heartbeat(1, 0);
        hb.name = "n".repeat(Limits::MAX_TEXT_BYTES + 1);
        let err = hb.encode().unwrap_err().to_string();
        assert!(err.contains("name"), "{err}");
        // Encoded by hand past the check: the receiver refuses it too.
        let bytes = postcard::to_stdvec(&Envelope::V1(hb)).unwrap();
        assert!(matches!(Heartbeat::decode(&bytes), Err(GossipError::Invalid(_))));
        let mut hb = heartbeat(1, 0);
        hb.suspects = vec![
            Suspicion {
                node_id: 2,
                incarnation: 0
            };
            Limits::MAX_SUSPECTS + 1
        ];
        assert!(hb.encode().is_err());
    }
}
