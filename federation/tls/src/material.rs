//! A node's TLS material: the cluster CA, its certificate and its key,
//! loaded into the rustls configurations of both ends of a connection and
//! reloaded when the files change ([`TlsMaterial::watch`]).
//!
//! Invariants:
//! - TLS 1.3 only, ALPN `h2` (gRPC between nodes of a site) or
//!   [`WAN_ALPN`] (site links); the server requires a client certificate
//!   chained to the CA, the client requires the server's to chain to the CA
//!   and to name [`INTERNAL_SERVER_NAME`].
//! - A reload that fails (a half-written file, a key that does not match)
//!   keeps the configurations in use and says why; the next change is
//!   tried again. New connections use the newest configurations; open ones
//!   keep theirs.
//! - A certificate that is expired or not yet valid is loaded with a
//!   warning (other nodes will refuse it until it is replaced, which a
//!   reload picks up); one that does not chain to the CA is an error.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};

use crate::{INTERNAL_SERVER_NAME, TlsError};

/// The three files of a node's TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM), signed by the CA.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// The ALPN protocol of site links (QUIC on the federation port).
pub const WAN_ALPN: &[u8] = b"cell0-wan/1";

/// Which port a server configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The internal port: the client must present a certificate of the CA.
    Internal,
    /// The public port: server authentication only (clients prove who they
    /// are with tokens, not certificates).
    Public,
    /// The federation port: as [`Listener::Internal`], with ALPN
    /// [`WAN_ALPN`].
    Wan,
}

impl Listener {
    /// `internal` or `public` (a metric label and log field).
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Internal => "internal",
            Listener::Public => "public",
            Listener::Wan => "wan",
        }
    }
}

/// A client configuration that trusts the CA in `ca` and presents no
/// certificate: what a client of the public port (the CLI) uses.
pub fn public_client(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(client))
}

/// The configurations built from one version of the files.
struct Loaded {
    server: Arc<ServerConfig>,
    public: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    wan_server: Arc<ServerConfig>,
    wan_client: Arc<ClientConfig>,
    /// Modification time and length of each file, to notice changes.
    stamps: Vec<Option<(SystemTime, u64)>>,
}

/// A node's TLS configurations, shared by every connection; cheap to
/// clone.
#[derive(Clone)]
pub struct TlsMaterial {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<Arc<Loaded>>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").field("files", &self.files).finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| m.modified().ok().map(|t| (t, m.len())))
        })
        .collect()
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_err(path: &Path, detail: impl Into<String>) -> TlsError {
    TlsError::Parse {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read_bytes(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(parse_err(path, "holds no certificate"));
    }
    Ok(certs)
}

/// The CA certificates in `ca`, as trust roots.
fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| parse_err(ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Builds the configurations of both ends from the files.
fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let stamps = stamps(files);
    let provider = provider();
    let roots = Arc::new(roots(&files.ca)?);
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read_bytes(&files.key)?)
        .map_err(|e| parse_err(&files.key, format!("not a PEM private key: {e}")))?;
    check_own(files, &roots, &provider, &chain)?;

    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| parse_err(&files.ca, e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| parse_err(&files.key, format!("does not match the certificate: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut public = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| parse_err(&files.key, format!("does not match the certificate: {e}")))?;
    public.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| parse_err(&files.key, format!("does not match the certificate: {e}")))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    let mut wan_server = server.clone();
    wan_server.alpn_protocols = vec![WAN_ALPN.to_vec()];
    let mut wan_client = client.clone();
    wan_client.alpn_protocols = vec![WAN_ALPN.to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        public: Arc::new(public),
        client: Arc::new(client),
        wan_server: Arc::new(wan_server),
        wan_client: Arc::new(wan_client),
        stamps,
    })
}

/// Checks this node's certificate as another node will: an error unless
/// it chains to the CA and names [`INTERNAL_SERVER_NAME`]; a warning when
/// only its validity period is wrong.
fn check_own(
    files: &TlsFiles,
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    chain: &[CertificateDer<'static>],
) -> Result<(), TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| parse_err(&files.ca, e.to_string()))?;
    let name = ServerName::try_from(INTERNAL_SERVER_NAME).map_err(|e| parse_err(&files.cert, e.to_string()))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(parse_err(&files.cert, "holds no certificate"));
    };
    match verifier.verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(
            e @ (CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. }),
        )) => {
            tracing::warn!(cert = %files.cert.display(), error = ?e, "this node's certificate is outside its validity period: other nodes refuse it until it is replaced");
            Ok(())
        }
        Err(e) => Err(parse_err(
            &files.cert,
            format!(
                "is not a node certificate of this cluster's CA ({}): {e}",
                files.ca.display()
            ),
        )),
    }
}

impl TlsMaterial {
    /// Loads the files; errors name the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let loaded = load(&files)?;
        Ok(Self {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(Arc::new(loaded))),
        })
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The server configuration for new connections on `listener`.
    pub fn server(&self, listener: Listener) -> Arc<ServerConfig> {
        match listener {
            Listener::Internal => self.loaded().server.clone(),
            Listener::Public => self.loaded().public.clone(),
            Listener::Wan => self.loaded().wan_server.clone(),
        }
    }

    /// The client configuration for new connections to other nodes of the
    /// site (gRPC, ALPN `h2`).
    pub fn client(&self) -> Arc<ClientConfig> {
        self.loaded().client.clone()
    }

    /// The client configuration for new site links (ALPN [`WAN_ALPN`]).
    pub fn wan_client(&self) -> Arc<ClientConfig> {
        self.loaded().wan_client.clone()
    }

    /// The site this node's certificate names.
    pub fn own_site(&self) -> Result<String, TlsError> {
        let chain = certs(&self.files.cert)?;
        let leaf = chain
            .first()
            .ok_or_else(|| parse_err(&self.files.cert, "holds no certificate"))?;
        crate::certs::site_of(leaf).map_err(|detail| parse_err(&self.files.cert, detail))
    }

    /// Loads the files again if any changed since the last load; true when
    /// new configurations are in use. On an error the old ones stay.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        if stamps(&self.files) == self.loaded().stamps {
            return Ok(false);
        }
        let loaded = load(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(true)
    }

    /// Checks the files every `every` until `stop`, reloading on change
    /// (the node's `tls-reload` task).
    pub async fn watch(self, every: Duration, stop: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        let mut failing = false;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    failing = false;
                    metrics::counter!("cell0_tls_reloads_total", "result" => "ok").increment(1);
                    tracing::info!(cert = %self.files.cert.display(), "reloaded the TLS certificate and key");
                }
                Ok(false) => {}
                Err(e) => {
                    // Once per bad version of the files, not every tick.
                    if !failing {
                        metrics::counter!("cell0_tls_reloads_total", "result" => "error").increment(1);
                        tracing::warn!(error = %e.describe(), "cannot reload the TLS files; keeping the ones in use");
                    }
                    failing = true;
                }
            }
        }
    }
}
