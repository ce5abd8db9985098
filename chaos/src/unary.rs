//! Unary gRPC calls over one HTTP/2 connection per [`Channel`], each call
//! written whole.
//!
//! A call is one HEADERS frame and one DATA frame that ends the stream,
//! queued together on h2's connection (the data without waiting for flow
//! control capacity, which the connection assigns as it writes), so it
//! leaves in one write and a server reads one TCP segment per call, as
//! from grpc-go clients (etcd's own tools). tonic's channel sent three
//! (headers, message, an empty end of stream), and hyper's client two (it
//! waits for capacity before the data), which made every server of either
//! target send a pure ACK per call (docs/benchmarks.md).
//!
//! Invariants:
//! - A channel holds at most one connection; a call that finds none, or a
//!   closed one, connects first (within [`CONNECT_TIMEOUT`]), and a call
//!   that fails in transport (anything but a reset of its own stream)
//!   drops it, so the next call reconnects (a restarted node is reached
//!   again, as with tonic's lazy channels).
//! - Every call ends within the channel's timeout, as DEADLINE_EXCEEDED if
//!   not otherwise.
//! - A call's status is the answer's `grpc-status` (in its trailers, or its
//!   headers for an answer without a message), read as tonic reads it.
//! - A call holds at most [`MAX_ANSWER_BYTES`] of its answer; one
//!   uncompressed message is the only answer it decodes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use tonic::codegen::http;
use tonic::{Code, Status};

use crate::kv::error_chain;

/// How long connecting to a node may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Bytes before a gRPC message: the compression flag and the length.
const PREFIX_BYTES: usize = 5;

/// Largest answer a call reads, prefix included: tonic's default limit on
/// a decoded message (4 MiB), which the load generator's channels had.
/// A longer one fails the call with OUT_OF_RANGE, as in tonic, without
/// being held in memory.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Unary calls to one endpoint. Clones share the connection.
#[derive(Debug, Clone)]
pub struct Channel {
    /// `scheme://host:port`, before each call's path.
    base: Arc<str>,
    /// `host:port`, to connect to.
    authority: Arc<str>,
    /// Longest a call may take.
    timeout: Duration,
    /// The open connection, if any.
    connection: Arc<Mutex<Option<Arc<Connection>>>>,
}

/// One HTTP/2 connection and the task driving it, stopped when dropped.
#[derive(Debug)]
struct Connection {
    send: SendRequest<Bytes>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Channel {
    /// A channel to `endpoint` (`http://host:port`) that connects at its
    /// first call; fails only on an endpoint that is not such a URI.
    pub fn lazy(endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let uri: http::Uri = endpoint.parse().map_err(|e| format!("not a URI: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err("not an http:// endpoint".to_string());
        }
        let authority = uri
            .authority()
            .ok_or_else(|| "the endpoint names no host and port".to_string())?
            .as_str();
        Ok(Self {
            base: format!("http://{authority}").into(),
            authority: authority.into(),
            timeout,
            connection: Arc::default(),
        })
    }

    /// A channel to `endpoint`, connected now.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let channel = Self::lazy(endpoint, timeout)?;
        channel.connection().await?;
        Ok(channel)
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<Arc<Connection>, String> {
        let open = self.slot().clone();
        if let Some(c) = open.filter(|c| !c.driver.is_finished()) {
            return Ok(c);
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&*self.authority))
            .await
            .map_err(|_| format!("tcp connect error: no connection within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("tcp connect error: {e}"))?;
        stream.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let (send, conn) = h2::client::handshake(stream).await.map_err(|e| error_chain(&e))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "a load connection ended");
            }
        });
        let connection = Arc::new(Connection { send, driver });
        *self.slot() = Some(connection.clone());
        Ok(connection)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Connection>>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `path` (`/package.Service/Method`) with `request`.
    pub async fn call<Req, Resp>(&self, path: &str, request: &Req) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let request = self.request(path, request)?;
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(answer) => answer,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// A call to `path` and its one DATA frame, `message`.
    fn request<Req: prost::Message>(&self, path: &str, message: &Req) -> Result<(http::Request<()>, Bytes), Status> {
        let len = message.encoded_len();
        let prefix_len = u32::try_from(len).map_err(|_| Status::invalid_argument("the request exceeds 4 GiB"))?;
        let mut body = BytesMut::with_capacity(PREFIX_BYTES + len);
        body.put_u8(0);
        body.put_u32(prefix_len);
        message.encode(&mut body).map_err(|e| Status::internal(e.to_string()))?;
        let request = http::Request::post(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok((request, body.freeze()))
    }

    /// Sends `request` with its `data` and reads the answer; a transport
    /// failure drops the connection.
    async fn exchange<Resp: prost::Message + Default>(
        &self,
        (request, data): (http::Request<()>, Bytes),
    ) -> Result<Resp, Status> {
        let connection = self
            .connection()
            .await
            .map_err(|e| Status::unavailable(format!("cannot connect to {}: {e}", self.authority)))?;
        let answer = async {
            let mut send = connection.send.clone().ready().await?;
            let (response, mut stream) = send.send_request(request, false)?;
            stream.send_data(data, true)?;
            let (parts, mut body) = response.await?.into_parts();
            let mut message = BytesMut::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                body.flow_control().release_capacity(chunk.len())?;
                if message.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Ok(Err(Status::out_of_range(format!(
                        "the answer exceeds {MAX_ANSWER_BYTES} bytes"
                    ))));
                }
                message.extend_from_slice(&chunk);
            }
            let trailers = body.trailers().await?;
            Ok::<_, h2::Error>(Ok((parts, message.freeze(), trailers)))
        }
        .await;
        let (parts, body, trailers) = match answer {
            Ok(answer) => answer?,
            // A reset ends the call only (its reason becomes the code, as
            // tonic maps it); anything else ends the connection.
            Err(e) if e.is_reset() => return Err(Status::from_error(Box::new(e))),
            Err(e) => {
                let mut slot = self.slot();
                if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, &connection)) {
                    *slot = None;
                }
                return Err(Status::unavailable(error_chain(&e)));
            }
        };
        for headers in [Some(&parts.headers), trailers.as_ref()].into_iter().flatten() {
            if let Some(status) = Status::from_header_map(headers)
                && status.code() != Code::Ok
            {
                return Err(status);
            }
        }
        if parts.status != http::StatusCode::OK {
            return Err(Status::unknown(format!("HTTP status {}", parts.status)));
        }
        let Some((prefix, message)) = body.split_at_checked(PREFIX_BYTES) else {
            return Err(Status::internal("an answer without a message"));
        };
        if prefix[0] != 0 {
            return Err(Status::internal("a compressed answer, which no call asks for"));
        }
        if u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize != message.len() {
            return Err(Status::internal("an answer whose length prefix does not match it"));
        }
        Resp::decode(message).map_err(|e| Status::internal(format!("an answer that does not decode: {e}")))
    }
}
