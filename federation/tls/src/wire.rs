//! The TLS ends of gRPC connections between nodes.
//!
//! - [`accept`]: turns a stream of accepted TCP connections into a stream
//!   of handshaken TLS connections for `tonic`'s `serve_with_incoming`.
//!   Handshakes run concurrently (at most [`MAX_PENDING_HANDSHAKES`], each
//!   bounded by [`HANDSHAKE_TIMEOUT`]), so a slow or silent peer never
//!   holds up the next connection; a failed one is logged with the peer's
//!   address and why, counted, and dropped.
//! - [`connector`]: what a `tonic` channel to another node dials through:
//!   TCP with `TCP_NODELAY`, then TLS with the newest client configuration,
//!   expecting [`INTERNAL_SERVER_NAME`]; [`public_connector`] the same for a
//!   client of the public port, expecting the name it dialled.
//!
//! Both ends hand the TLS stream to HTTP/2 in
//! [`cell0_proto::wire::SmallFrameIo`], as plaintext connections are, so a
//! response's frames leave in one TLS write.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cell0_proto::wire::SmallFrameIo;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tonic::codegen::http::Uri;
use tonic::transport::server::Connected;

use crate::material::Listener;
use crate::{INTERNAL_SERVER_NAME, TlsMaterial};

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes under way at once on one listener; more connections wait
/// in the kernel's backlog.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// An accepted connection after its handshake.
pub struct TlsConn {
    inner: SmallFrameIo<tokio_rustls::server::TlsStream<TcpStream>>,
    remote: Option<SocketAddr>,
}

/// What a server learns of a TLS connection (tonic's connect info).
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
}

impl Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        TlsConnectInfo {
            remote_addr: self.remote,
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A connection whose handshake failed.
struct Refused {
    remote: Option<SocketAddr>,
    why: String,
}

/// A server-side handshake under way.
type Handshake = Pin<Box<dyn Future<Output = Result<TlsConn, Refused>> + Send>>;

/// One server-side handshake.
async fn handshake(tcp: TcpStream, material: TlsMaterial, listener: Listener) -> Result<TlsConn, Refused> {
    let remote = tcp.peer_addr().ok();
    let acceptor = tokio_rustls::TlsAcceptor::from(material.server(listener));
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(inner)) => Ok(TlsConn {
            inner: SmallFrameIo(inner),
            remote,
        }),
        Ok(Err(e)) => Err(Refused {
            remote,
            why: e.to_string(),
        }),
        Err(_) => Err(Refused {
            remote,
            why: format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
        }),
    }
}

/// The TLS connections of `tcp`'s accepted ones on `listener` (see the
/// module docs).
pub fn accept<S>(
    tcp: S,
    material: TlsMaterial,
    listener: Listener,
) -> impl Stream<Item = io::Result<TlsConn>> + Send + 'static
where
    S: Stream<Item = io::Result<TcpStream>> + Send + 'static,
{
    struct State<S> {
        tcp: Pin<Box<S>>,
        pending: FuturesUnordered<Handshake>,
        material: TlsMaterial,
        open: bool,
    }
    let state = State {
        tcp: Box::pin(tcp),
        pending: FuturesUnordered::new(),
        material,
        open: true,
    };
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            if !st.open && st.pending.is_empty() {
                return None;
            }
            let room = st.open && st.pending.len() < MAX_PENDING_HANDSHAKES;
            tokio::select! {
                Some(done) = st.pending.next(), if !st.pending.is_empty() => match done {
                    Ok(conn) => return Some((Ok(conn), st)),
                    Err(Refused { remote, why }) => {
                        metrics::counter!("cell0_tls_handshake_failures_total", "side" => "server", "port" => listener.as_str()).increment(1);
                        tracing::warn!(peer = ?remote, error = %why, port = listener.as_str(), "refused a connection: TLS handshake failed");
                    }
                },
                next = st.tcp.next(), if room => match next {
                    Some(Ok(tcp)) => {
                        st.pending.push(Box::pin(handshake(tcp, st.material.clone(), listener)));
                    }
                    Some(Err(e)) => return Some((Err(e), st)),
                    None => st.open = false,
                },
            }
        }
    })
}

/// A connection a channel dialled (in [`SmallFrameIo`]).
pub type ClientConn = TokioIo<SmallFrameIo<tokio_rustls::client::TlsStream<TcpStream>>>;

/// TCP to the URI's host and port (from `source` when given), then TLS
/// with `config`, expecting the server's certificate to name `server_name`
/// (the dialled host when `None`).
async fn connect(
    uri: Uri,
    config: Arc<ClientConfig>,
    server_name: Option<&'static str>,
    source: Option<IpAddr>,
) -> io::Result<ClientConn> {
    let host = uri
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host")))?;
    let port = uri
        .port_u16()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no port")))?;
    let name = ServerName::try_from(server_name.map_or(host.clone(), str::to_string))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tcp = dial(&host, port, source).await?;
    tcp.set_nodelay(true)?;
    match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
        Ok(tls) => Ok(TokioIo::new(SmallFrameIo(tls))),
        Err(e) => {
            let port = if server_name.is_some() { "internal" } else { "public" };
            metrics::counter!("cell0_tls_handshake_failures_total", "side" => "client", "port" => port).increment(1);
            tracing::warn!(peer = %uri, error = %e, "TLS handshake failed");
            Err(e)
        }
    }
}

/// TCP to `host:port`, from the address `source` when given (a node's own
/// address, so that the peer and anything between them see which node
/// connects).
async fn dial(host: &str, port: u16, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect((host, port)).await;
    };
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        if addr.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("{host}:{port} has no address of the family of the source {source}"),
        )
    }))
}

/// What a tonic channel dials through (`Endpoint::connect_with_connector`).
pub trait Connector:
    tower::Service<Uri, Response = ClientConn, Error = io::Error, Future: Send> + Clone + Send + 'static
{
}

impl<T> Connector for T where
    T: tower::Service<Uri, Response = ClientConn, Error = io::Error, Future: Send> + Clone + Send + 'static
{
}

/// The connector of a channel to another node: `material`'s newest client
/// configuration, expecting [`INTERNAL_SERVER_NAME`], from the address
/// `source` when given.
pub fn connector(material: TlsMaterial, source: Option<IpAddr>) -> impl Connector {
    tower::service_fn(move |uri: Uri| connect(uri, material.client(), Some(INTERNAL_SERVER_NAME), source))
}

/// The connector of a client of the public port: `config` (from
/// [`crate::material::public_client`]), expecting the certificate to name
/// the dialled host.
pub fn public_connector(config: Arc<ClientConfig>) -> impl Connector {
    tower::service_fn(move |uri: Uri| connect(uri, config.clone(), None, None))
}
