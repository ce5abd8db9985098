//! The node's libp2p key and the cluster secret.
//!
//! Invariants:
//! - The node key is an ed25519 key kept in one file of the data dir, mode
//!   0600, written whole (temporary file, fsync, rename) on first start and
//!   only read afterwards: the node's peer id never changes.
//! - The cluster secret is 32 bytes, written as 64 hex digits; anything else
//!   is refused with a message that says what was expected.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use libp2p::identity::Keypair;
use rand::RngCore;

use crate::error::GossipError;

/// The cluster secret: the libp2p private-network key shared by every node
/// of a cluster. Nodes without it cannot open a connection to any member.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClusterSecret([u8; 32]);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A new random secret.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, GossipError> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(GossipError::Secret(format!(
                "expected 64 hex digits (as `cell0 keygen` prints), got {} characters",
                text.len()
            )));
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let pair = text.get(2 * i..2 * i + 2).unwrap_or("");
            *byte = u8::from_str_radix(pair, 16).map_err(|_| {
                GossipError::Secret(format!(
                    "expected 64 hex digits (as `cell0 keygen` prints), found '{pair}' at position {}",
                    2 * i
                ))
            })?;
        }
        Ok(Self(bytes))
    }

    /// The 64 hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The raw key, for libp2p's private network.
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }
}

/// A new ed25519 key (for nodes that keep none, like benchmarks).
pub fn generate_keypair() -> Keypair {
    Keypair::generate_ed25519()
}

/// The node's key from `path`, created there on first use.
pub fn load_or_create_keypair(path: &Path) -> Result<Keypair, GossipError> {
    let io = |source| GossipError::KeyFile {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| GossipError::BadKey {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_keypair();
            let bytes = key.to_protobuf_encoding().map_err(|e| GossipError::BadKey {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
            let tmp = path.with_extension("tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, path).map_err(io)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_secret_round_trips_through_hex_and_bad_text_is_explained() {
        let s = ClusterSecret::generate();
        assert_eq!(ClusterSecret::parse(&format!("  {}\n", s.to_hex())).unwrap(), s);
        let short = ClusterSecret::parse("abcd").unwrap_err().to_string();
        assert!(short.contains("64 hex digits") && short.contains("got 4"), "{short}");
        let bad = ClusterSecret::parse(&"zz".repeat(32)).unwrap_err().to_string();
        assert!(bad.contains("'zz' at position 0"), "{bad}");
        assert_eq!(format!("{s:?}"), "ClusterSecret(..)", "never printed");
    }

    #[test]
    fn the_node_key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let first = load_or_create_keypair(&path).unwrap();
        let again = load_or_create_keypair(&path).unwrap();
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, b"not a key").unwrap();
        assert!(matches!(load_or_create_keypair(&path), Err(GossipError::BadKey { .. })));
    }
}
