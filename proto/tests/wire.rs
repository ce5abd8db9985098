//! `SmallFrameIo` under a real tonic server: a unary response with a
//! message over 256 bytes leaves in one write, where the bare connection
//! takes two (the trailers after HEADERS and DATA).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use cell0_proto::v1::sites_client::SitesClient;
use cell0_proto::v1::sites_server::{Sites, SitesServer};
use cell0_proto::v1::{ListSitesRequest, ListSitesResponse};
use cell0_proto::wire::SmallFrameIo;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A served connection that counts its write calls.
struct Counted {
    tcp: TcpStream,
    writes: Arc<AtomicUsize>,
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Answers every listing with a 400-byte site name.
struct BigAnswer;

#[tonic::async_trait]
impl Sites for BigAnswer {
    async fn list(
        &self,
        _: tonic::Request<ListSitesRequest>,
    ) -> Result<tonic::Response<ListSitesResponse>, tonic::Status> {
        Ok(tonic::Response::new(ListSitesResponse {
            local_site: "s".repeat(400),
            sites: Vec::new(),
        }))
    }
}

/// Serves `BigAnswer` on a loopback port, every connection counted (and in
/// `SmallFrameIo` when `small_frames`); returns the port and the count.
async fn serve(small_frames: bool) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let writes = Arc::new(AtomicUsize::new(0));
    let counter = writes.clone();
    let incoming = TcpListenerStream::new(listener).map(move |tcp| {
        tcp.map(|tcp| {
            tcp.set_nodelay(true).unwrap();
            Counted {
                tcp,
                writes: counter.clone(),
            }
        })
    });
    let server = tonic::transport::Server::builder().add_service(SitesServer::new(BigAnswer));
    if small_frames {
        let incoming = incoming.map(|c| c.map(SmallFrameIo));
        tokio::spawn(server.serve_with_incoming(incoming));
    } else {
        tokio::spawn(server.serve_with_incoming(incoming));
    }
    (port, writes)
}

/// Writes the server made for one answer, after a first call that set the
/// connection up.
async fn writes_per_answer(small_frames: bool) -> usize {
    let (port, writes) = serve(small_frames).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let mut client = SitesClient::new(channel);
    client.list(ListSitesRequest {}).await.unwrap();
    let before = writes.load(Ordering::SeqCst);
    let answer = client.list(ListSitesRequest {}).await.unwrap().into_inner();
    assert_eq!(answer.local_site.len(), 400);
    writes.load(Ordering::SeqCst) - before
}

#[tokio::test]
async fn a_response_leaves_in_one_write() {
    assert_eq!(writes_per_answer(true).await, 1);
}

#[tokio::test]
async fn without_the_wrapper_the_trailers_leave_in_a_write_of_their_own() {
    // What the wrapper is for: if this fails after an h2 upgrade, h2 no
    // longer splits such responses and `SmallFrameIo` can go.
    assert_eq!(writes_per_answer(false).await, 2);
}
