//! Mutual TLS between nodes, plugged into the consensus transport seam:
//! every channel to another node (Raft, forwarding, joins, leases, blob
//! transfer) dials through [`MtlsTransport`]; the internal server accepts
//! through `cell0_tls::wire::accept` (wired in `server`).
//!
//! Invariants:
//! - Only node wires TLS in: `cell0-consensus` sees a [`Transport`],
//!   `cell0-tls` knows nothing of Raft.
//! - Each new connection uses the newest configuration the `tls-reload`
//!   task loaded.

use std::net::IpAddr;
use std::time::Duration;

use cell0_consensus::ConsensusError;
use cell0_consensus::network::{self, Transport};
use cell0_tls::TlsMaterial;
use tonic::transport::Channel;

/// Channels to other nodes over mutual TLS.
#[derive(Debug)]
pub struct MtlsTransport {
    material: TlsMaterial,
    connect_timeout: Duration,
    source: Option<IpAddr>,
}

impl MtlsTransport {
    /// A transport presenting `material`'s certificate and checking the
    /// peer's against its CA, connecting from `source` when given.
    pub fn new(material: TlsMaterial, connect_timeout: Duration, source: Option<IpAddr>) -> Self {
        Self {
            material,
            connect_timeout,
            source,
        }
    }
}

impl Transport for MtlsTransport {
    fn connect(&self, addr: &str) -> Result<Channel, ConsensusError> {
        Ok(network::endpoint(addr, self.connect_timeout)?
            .connect_with_connector_lazy(cell0_tls::wire::connector(self.material.clone(), self.source)))
    }
}
