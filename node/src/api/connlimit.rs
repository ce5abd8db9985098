//! Caps on the public port's connections: at most
//! [`MAX_PUBLIC_CONNECTIONS`] open at once (more wait in the kernel's
//! backlog until one closes) and [`MAX_STREAMS_PER_CONNECTION`] concurrent
//! streams on each (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`, set where the
//! server is built).
//!
//! Invariants:
//! - A connection holds one permit from accept until it is dropped; the
//!   accept stream waits for a permit before it yields the next
//!   connection, so the cap also bounds handshakes' and buffers' memory.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// Most client connections one node keeps open on its public port.
pub const MAX_PUBLIC_CONNECTIONS: usize = 4_096;

/// Most concurrent streams (calls) on one client connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;

/// A connection holding its permit.
pub struct Limited<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: Connected> Connected for Limited<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// `incoming`'s connections, at most `max` open at once.
pub fn limit<S, T>(incoming: S, max: usize) -> impl Stream<Item = io::Result<Limited<T>>> + Send + 'static
where
    S: Stream<Item = io::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max));
    incoming.then(move |conn| {
        let permits = permits.clone();
        async move {
            let io = conn?;
            let permit = permits
                .acquire_owned()
                .await
                .map_err(|_| io::Error::other("the connection limit was closed"))?;
            Ok(Limited { io, _permit: permit })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_beyond_the_cap_waits_until_one_closes() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<io::Result<u32>>();
        let mut limited = Box::pin(limit(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), 2));
        for i in 0..3 {
            tx.send(Ok(i)).unwrap();
        }
        let first = limited.next().await.unwrap().unwrap();
        let _second = limited.next().await.unwrap().unwrap();
        // The third waits for a permit: not ready while two are open.
        assert!(futures::poll!(limited.next()).is_pending());
        drop(first);
        assert_eq!(limited.next().await.unwrap().unwrap().io, 2);
    }
}
