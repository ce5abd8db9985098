//! Cell0's federation of sites: each site is its own Raft group; sites
//! link over QUIC with mutual TLS and publish their summaries to each
//! other, so every node can show the catalog of sites.
//!
//! - [`link`]: the federation port (UDP, ALPN `cell0-wan/1`), links to
//!   other sites with reconnect and backoff, the hello exchange and its
//!   checks, the summary exchange, and calls forwarded to another site
//!   ([`Federation::forward`], served by a [`ForwardHandler`]).
//! - [`catalog`]: pure logic over an injected clock: which summary of a
//!   site wins, when a site is unreachable.
//!
//! An engine crate: it knows nothing of Raft and never depends on
//! `cell0-consensus`. The node builds its site's summary from its own
//! state, hands it to [`Federation::publish`], and serves the catalog
//! ([`Federation::sites`]) as `cell0.v1.Sites/List`.
//!
//! Invariants: every message between sites is protobuf
//! (`cell0.federation.v1`), because sites upgrade independently; both ends
//! of a link are authenticated against the cluster CA and the site their
//! certificate names.

pub mod catalog;
pub mod link;

use std::net::SocketAddr;

pub use catalog::{Catalog, SiteStatus, SiteView};
pub use link::{DialStatus, Federation, ForwardError, ForwardHandler, LinkConfig, Refusal};

/// What can go wrong starting site links.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The federation port cannot be bound.
    #[error("cannot listen for site links on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS configuration cannot carry QUIC.
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Crypto(String),
}
