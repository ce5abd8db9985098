//! The byte stream under every gRPC connection of Cell0, as HTTP/2 sees it.
//!
//! h2, the HTTP/2 codec under tonic, writes a DATA frame of 256 bytes or
//! more on a connection that has vectored writes as a buffer chained to its
//! write buffer, and takes no further frame until that write went out. So a
//! unary response whose message is 256 bytes or more (a KV value of 256
//! bytes) left in two system calls, HEADERS and DATA first and then the
//! trailers with `grpc-status`, and the peer woke up for each; on an
//! Exchange stream every such message was a write of its own. Told the
//! connection has no vectored writes, h2 copies payloads under 1 KiB into
//! its write buffer, so a response and the messages queued with it leave in
//! one write. Larger payloads are still sent from their own buffer, header
//! and payload in two writes (docs/benchmarks.md, "One write per response").
//!
//! Invariants:
//! - Every connection a node serves (public and internal ports) and every
//!   channel between nodes, plain or TLS, is wrapped in [`SmallFrameIo`],
//!   right over the TCP or TLS stream (`cell0_consensus::network`,
//!   `cell0_tls::wire`).
//! - The wrapper changes nothing but `is_write_vectored`: reads, writes,
//!   flushes, shutdown and connect info are the inner stream's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A connection that HTTP/2 writes without vectored I/O (see the module
/// docs).
#[derive(Debug)]
pub struct SmallFrameIo<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for SmallFrameIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SmallFrameIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<T: Connected> Connected for SmallFrameIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_pass_through_and_writes_are_not_vectored() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(64);
        let (mut a, mut b) = (SmallFrameIo(a), SmallFrameIo(b));
        assert!(!a.is_write_vectored());
        a.write_all(b"hello").await.unwrap();
        a.flush().await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
