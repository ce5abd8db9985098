//! Calls to a peer over long-lived `Exchange` streams.
//!
//! A unary gRPC call opens an HTTP/2 stream for one request: headers, data
//! and an end-of-stream frame each way, and a task on each side to run it.
//! Measured on loopback with one caller, that took twice the round trip
//! and two to three times the CPU of a request and its reply on a stream
//! already open (docs/benchmarks.md). So AppendEntries (every
//! replicated entry and heartbeat) and forwarded requests travel over
//! `Exchange` streams, which the pool keeps open between calls.
//!
//! Invariants:
//! - A stream carries one call at a time: the caller that took it sends one
//!   request and reads its one reply before anyone else may use it. It goes
//!   back to the pool only after a whole exchange; a stream whose call
//!   failed, timed out or was cancelled is dropped (a late reply could
//!   still come), so no caller ever reads another call's reply.
//! - An idle stream with anything to read (an unasked-for message, its end,
//!   an error: the peer or the connection went away) is dropped, not used.
//! - A peer that answers UNIMPLEMENTED (an older build) processed nothing:
//!   the caller sends the same request as a unary call, and for
//!   [`UNARY_RECHECK`] the pool sends that address unary calls only.
//! - A failed call fails as its unary call would: with the peer's status,
//!   or the connection's, so callers map errors one way for both.
//! - At most [`MAX_IDLE_STREAMS`] idle streams are kept per address;
//!   `Streams::close` drops them all (the member shutting down), which
//!   ends them on the peers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cell0_proto::internal::raft_client::RaftClient;
use cell0_proto::internal::{Call, RaftMessage};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Idle streams kept per peer address (one per concurrent caller is
/// opened; more than this many idle ones are closed).
pub const MAX_IDLE_STREAMS: usize = 8;

/// How long an address that answered UNIMPLEMENTED gets unary calls only
/// before streams are tried again (the peer may have been upgraded).
pub const UNARY_RECHECK: Duration = Duration::from_secs(60);

/// One open Exchange stream.
struct CallStream {
    requests: mpsc::Sender<RaftMessage>,
    replies: Streaming<RaftMessage>,
}

impl CallStream {
    /// Whether the stream may carry a call: nothing to read, and its
    /// request side still open.
    fn usable(&mut self) -> bool {
        !self.requests.is_closed() && self.replies.message().now_or_never().is_none()
    }
}

/// The Exchange streams of one member to its peers, by address.
#[derive(Default)]
pub struct Streams {
    idle: Mutex<HashMap<String, Vec<CallStream>>>,
    /// Addresses that answered UNIMPLEMENTED, and when.
    unary_only: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let idle: usize = idle.values().map(Vec::len).sum();
        f.debug_struct("Streams").field("idle", &idle).finish_non_exhaustive()
    }
}

impl Streams {
    /// Sends `request` as `call` to the peer at `addr` through `client`
    /// and waits up to `timeout` for its reply. `None`: the peer has no
    /// Exchange (nothing was processed), send a unary call instead.
    pub(crate) async fn call(
        &self,
        client: RaftClient<Channel>,
        addr: &str,
        call: Call,
        request: &RaftMessage,
        timeout: Duration,
    ) -> Option<Result<RaftMessage, Status>> {
        if self.is_unary_only(addr) {
            return None;
        }
        let deadline = Instant::now() + timeout;
        let mut request = request.clone();
        request.call = call.into();
        // An idle stream takes the request, or a new one opens with it.
        let sent = match self.take_idle(addr) {
            Some(stream) => stream
                .requests
                .try_send(request)
                .map(|()| stream)
                .map_err(|e| e.into_inner()),
            None => Err(request),
        };
        let mut stream = match sent {
            Ok(stream) => stream,
            Err(first) => match self.open(client, addr, first, deadline).await? {
                Ok(stream) => stream,
                Err(status) => return Some(Err(status)),
            },
        };
        let reply = match tokio::time::timeout_at(deadline, stream.replies.message()).await {
            Ok(Ok(Some(reply))) => reply,
            Ok(Ok(None)) => return Some(Err(Status::unavailable("the peer closed the stream before answering"))),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                self.mark_unary_only(addr);
                return None;
            }
            Ok(Err(status)) => return Some(Err(status)),
            Err(_) => {
                return Some(Err(Status::deadline_exceeded(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                ))));
            }
        };
        self.put_idle(addr, stream);
        Some(Ok(reply))
    }

    /// Drops every idle stream.
    pub(crate) fn close(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Opens a stream whose first request is `first`; `None` when the
    /// peer has no Exchange.
    async fn open(
        &self,
        mut client: RaftClient<Channel>,
        addr: &str,
        first: RaftMessage,
        deadline: Instant,
    ) -> Option<Result<CallStream, Status>> {
        let (requests, rx) = mpsc::channel(1);
        if requests.try_send(first).is_err() {
            return Some(Err(Status::internal("a new stream's request queue is full")));
        }
        metrics::counter!("cell0_internal_streams_opened_total").increment(1);
        match tokio::time::timeout_at(deadline, client.exchange(ReceiverStream::new(rx))).await {
            Ok(Ok(replies)) => Some(Ok(CallStream {
                requests,
                replies: replies.into_inner(),
            })),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                self.mark_unary_only(addr);
                None
            }
            Ok(Err(status)) => Some(Err(status)),
            Err(_) => Some(Err(Status::deadline_exceeded("opening a stream timed out"))),
        }
    }

    fn take_idle(&self, addr: &str) -> Option<CallStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let streams = idle.get_mut(addr)?;
        while let Some(mut stream) = streams.pop() {
            if stream.usable() {
                return Some(stream);
            }
        }
        None
    }

    fn put_idle(&self, addr: &str, stream: CallStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let streams = idle.entry(addr.to_string()).or_default();
        if streams.len() < MAX_IDLE_STREAMS {
            streams.push(stream);
        }
    }

    fn is_unary_only(&self, addr: &str) -> bool {
        let mut unary = self.unary_only.lock().unwrap_or_else(|p| p.into_inner());
        match unary.get(addr) {
            Some(since) if since.elapsed() < UNARY_RECHECK => true,
            Some(_) => {
                unary.remove(addr);
                false
            }
            None => false,
        }
    }

    fn mark_unary_only(&self, addr: &str) {
        tracing::info!(peer = addr, "the peer lacks Exchange streams: sending it unary calls");
        metrics::counter!("cell0_internal_unary_fallbacks_total").increment(1);
        let mut unary = self.unary_only.lock().unwrap_or_else(|p| p.into_inner());
        unary.insert(addr.to_string(), Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use cell0_proto::internal::raft_server::{Raft, RaftServer};
    use cell0_proto::internal::{IdentifyRequest, IdentifyResponse};
    use futures::StreamExt;
    use futures::stream::BoxStream;
    use tonic::{Request, Response};

    use super::*;
    use crate::network::{ChannelPool, TcpTransport, plain_incoming};

    /// A peer that echoes payloads: `from_node` 1 on unary calls, 2 over
    /// Exchange. Over Exchange it refuses `to_node` 99 and answers `slow`
    /// after a second; without `streams` it lacks Exchange.
    struct Echo {
        streams: bool,
        opened: Arc<AtomicUsize>,
    }

    fn echo(request: &RaftMessage, from_node: u64) -> RaftMessage {
        RaftMessage {
            payload: request.payload.clone(),
            from_node,
            ..RaftMessage::default()
        }
    }

    #[tonic::async_trait]
    impl Raft for Echo {
        async fn append_entries(&self, r: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Ok(Response::new(echo(r.get_ref(), 1)))
        }
        async fn vote(&self, r: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Ok(Response::new(echo(r.get_ref(), 1)))
        }
        async fn install_snapshot(&self, r: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Ok(Response::new(echo(r.get_ref(), 1)))
        }
        async fn stream_snapshot(&self, _r: Request<Streaming<RaftMessage>>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not in this stub"))
        }
        async fn forward(&self, r: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Ok(Response::new(echo(r.get_ref(), 1)))
        }
        async fn identify(&self, _r: Request<IdentifyRequest>) -> Result<Response<IdentifyResponse>, Status> {
            Err(Status::unimplemented("not in this stub"))
        }
        type ExchangeStream = BoxStream<'static, Result<RaftMessage, Status>>;
        async fn exchange(&self, r: Request<Streaming<RaftMessage>>) -> Result<Response<Self::ExchangeStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("an older peer"));
            }
            self.opened.fetch_add(1, Ordering::SeqCst);
            let replies = r.into_inner().then(|request| async move {
                let request = request?;
                if request.to_node == 99 {
                    return Err(Status::failed_precondition("not node 99"));
                }
                if request.payload.as_ref() == b"slow" {
                    // A peer slow to answer, not a wait for a condition: the
                    // caller gives up after 50 ms, long before this ends.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok(echo(&request, 2))
            });
            Ok(Response::new(replies.boxed()))
        }
    }

    /// A pool and the address of an echo peer, and how many streams it
    /// opened.
    async fn peer(streams: bool) -> (ChannelPool, String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let opened = Arc::new(AtomicUsize::new(0));
        let service = RaftServer::new(Echo {
            streams,
            opened: opened.clone(),
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(plain_incoming(listener)),
        );
        let pool = ChannelPool::new(Arc::new(TcpTransport {
            connect_timeout: Duration::from_secs(5),
            source: None,
        }));
        (pool, addr, opened)
    }

    fn request(payload: &[u8], to_node: u64) -> RaftMessage {
        RaftMessage {
            payload: payload.to_vec().into(),
            to_node,
            ..RaftMessage::default()
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// The payload of the echo to a Forward of `payload` to node 1.
    async fn echoed(pool: &ChannelPool, addr: &str, payload: &[u8]) -> Vec<u8> {
        let reply = pool.exchange(addr, Call::Forward, &request(payload, 1), TIMEOUT).await;
        reply.expect("the peer has Exchange").unwrap().payload.to_vec()
    }

    #[tokio::test]
    async fn calls_share_one_stream_and_a_refusal_ends_it() {
        let (pool, addr, opened) = peer(true).await;
        for i in 0..5u8 {
            let reply = pool.exchange(&addr, Call::Forward, &request(&[i], 1), TIMEOUT).await;
            let reply = reply.expect("the peer has Exchange").unwrap();
            assert_eq!((reply.payload.as_ref(), reply.from_node), (&[i][..], 2));
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1, "five calls, one stream");

        let refused = pool
            .exchange(&addr, Call::AppendEntries, &request(b"x", 99), TIMEOUT)
            .await;
        let status = refused.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
        assert_eq!(echoed(&pool, &addr, b"y").await, b"y");
        assert_eq!(opened.load(Ordering::SeqCst), 2, "the refusal ended the first stream");
    }

    #[tokio::test]
    async fn concurrent_calls_each_get_their_own_reply() {
        let (pool, addr, opened) = peer(true).await;
        let pool = Arc::new(pool);
        let calls = (0..32u8).map(|i| {
            let (pool, addr) = (pool.clone(), addr.clone());
            async move {
                let reply = pool.exchange(&addr, Call::Forward, &request(&[i; 3], 1), TIMEOUT).await;
                (i, reply.unwrap().unwrap())
            }
        });
        for (i, reply) in futures::future::join_all(calls).await {
            assert_eq!(reply.payload.as_ref(), &[i; 3]);
        }
        let idle = pool.streams.idle.lock().unwrap().get(&addr).map_or(0, Vec::len);
        assert!(idle <= MAX_IDLE_STREAMS, "{idle} idle streams kept");
        assert!(opened.load(Ordering::SeqCst) <= 32);
    }

    #[tokio::test]
    async fn a_call_that_timed_out_never_hands_its_late_reply_to_the_next() {
        let (pool, addr, opened) = peer(true).await;
        let late = pool
            .exchange(&addr, Call::Forward, &request(b"slow", 1), Duration::from_millis(50))
            .await;
        assert_eq!(late.unwrap().unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert_eq!(echoed(&pool, &addr, b"next").await, b"next");
        assert_eq!(opened.load(Ordering::SeqCst), 2, "the timed-out stream was dropped");
    }

    #[tokio::test]
    async fn a_peer_without_exchange_is_sent_unary_calls() {
        let (pool, addr, opened) = peer(false).await;
        assert!(
            pool.exchange(&addr, Call::Forward, &request(b"a", 1), TIMEOUT)
                .await
                .is_none()
        );
        assert!(pool.streams.is_unary_only(&addr));
        assert!(
            pool.exchange(&addr, Call::Forward, &request(b"b", 1), TIMEOUT)
                .await
                .is_none()
        );
        assert_eq!(opened.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn closing_drops_the_idle_streams() {
        let (pool, addr, opened) = peer(true).await;
        assert_eq!(echoed(&pool, &addr, b"a").await, b"a");
        pool.close_streams();
        assert_eq!(echoed(&pool, &addr, b"b").await, b"b");
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }
}
