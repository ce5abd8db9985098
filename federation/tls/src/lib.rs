//! Cell0's certificates and mutual TLS between nodes.
//!
//! - [`certs`]: a cluster CA and node certificates (`cell0 tls ...`).
//! - [`material`]: a node's CA, certificate and key loaded into rustls
//!   configurations (TLS 1.3, ALPN `h2`, both ends authenticated against
//!   the cluster CA), reloaded when the files change.
//! - [`wire`]: the TLS ends of gRPC connections: a stream of accepted,
//!   handshaken connections for a tonic server and a connector for tonic
//!   channels.
//!
//! An engine crate: it knows nothing of Raft; the node plugs it into the
//! consensus transport seam and its internal server.
//!
//! Invariants:
//! - One crypto provider (ring), passed explicitly to every configuration,
//!   so the process never depends on a global default.
//! - Both ends always present and verify a certificate chained to the
//!   cluster CA; there is no way to build a configuration without one.

pub mod certs;
pub mod material;
pub mod wire;

use std::path::{Path, PathBuf};

pub use rustls;

pub use certs::{CaFiles, INTERNAL_SERVER_NAME, NodeCertRequest, NodeFiles, Validity, site_of};
pub use material::{Listener, TlsFiles, TlsMaterial, WAN_ALPN};

/// What can go wrong with certificates and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// An argument is out of range; `field` names it.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The argument.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file to make exists already.
    #[error("{} exists already; remove it first or choose another directory", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A file cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file cannot be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{}: {detail}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Making a key or certificate failed.
    #[error("cannot make a certificate")]
    Generate(#[source] rcgen::Error),
    /// rustls refused the configuration.
    #[error("the TLS configuration is refused")]
    Config(#[source] rustls::Error),
}

impl TlsError {
    /// The error and its sources, for a log line.
    pub fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// The contents of a text file.
fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}
