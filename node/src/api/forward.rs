//! Calls for another site: a request with `cell0-site` metadata naming
//! another site than this node's is not served here but forwarded over a
//! site link ([`SiteRouteLayer`]); a call another site forwarded here is
//! replayed against this node's own public port ([`LocalReplay`]), so it
//! passes the same rate limit, ACL, audit log and handlers as any call.
//!
//! Only unary methods are forwarded (streams are refused with a clear
//! error). The caller's token goes with the call: the target site's ACL
//! decides. Nothing is retried across sites: a failure after sending
//! leaves the call's outcome unknown, as a timeout does within a site.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use cell0_federation::{Federation, ForwardError, ForwardHandler};
use cell0_proto::federation::v1::{ForwardRequest, ForwardResponse};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::transport::Channel;

use super::ApiError;
use super::auth::TRACE_ID_HEADER;
use super::unary;

/// gRPC metadata naming the site that should serve a call (absent, empty
/// or this node's site: served here).
pub const SITE_METADATA: &str = "cell0-site";
/// [`SITE_METADATA`] as a header name, checked once at build time rather
/// than parsed on every call.
const SITE_NAME: http::HeaderName = http::HeaderName::from_static(SITE_METADATA);

/// How long a forwarded call may take when the caller set no deadline.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest deadline a forwarded call gets.
pub const MAX_FORWARD_TIMEOUT: Duration = Duration::from_secs(300);

/// Every unary method of the public API (`/cell0.v1.Service/Method`), from
/// the descriptor set: the ones that can be forwarded.
fn unary_methods() -> BTreeSet<String> {
    let Ok(set) = prost_types::FileDescriptorSet::decode(cell0_proto::FILE_DESCRIPTOR_SET) else {
        return BTreeSet::new();
    };
    let mut out = BTreeSet::new();
    for file in set.file.iter().filter(|f| f.package() == "cell0.v1") {
        for service in &file.service {
            for method in &service.method {
                if !method.client_streaming() && !method.server_streaming() {
                    out.insert(format!("/cell0.v1.{}/{}", service.name(), method.name()));
                }
            }
        }
    }
    out
}

/// A gRPC `grpc-timeout` value (`100m`, `10S`, ...).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (amount, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The most sites a call may pass through following moved agents'
/// forwarding pointers.
pub const MAX_HOPS: u32 = 8;

/// gRPC metadata a replayed call carries: how many sites forwarded it.
pub const HOPS_METADATA: &str = "cell0-hops";

struct RouterInner {
    own_site: String,
    node_id: u64,
    federation: Option<Federation>,
    unary: BTreeSet<String>,
    seq: AtomicU64,
}

/// Sends calls to other sites over the site links: the calls clients
/// address to another site (`cell0-site`, [`SiteRouteLayer`]), calls about
/// agents that moved there, and the steps of agent handoffs.
#[derive(Clone)]
pub struct SiteRouter {
    inner: Arc<RouterInner>,
}

/// Who asked, as a forwarded call carries it on.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The `authorization` metadata, if any.
    pub authorization: String,
    /// The trace id, if any.
    pub trace_id: String,
    /// How long the call may take.
    pub timeout: Option<Duration>,
    /// Sites that forwarded it so far.
    pub hops: u32,
}

impl Caller {
    /// The caller of a request with `metadata`.
    pub fn of(metadata: &tonic::metadata::MetadataMap) -> Self {
        let text = |name: &str| {
            metadata
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        Caller {
            authorization: text("authorization"),
            trace_id: text(TRACE_ID_HEADER),
            timeout: grpc_timeout(&text("grpc-timeout")),
            hops: text(HOPS_METADATA).parse().unwrap_or(0),
        }
    }
}

impl SiteRouter {
    /// The router of node `node_id` of `own_site`, forwarding through
    /// `federation` (none: calls for other sites fail with UNAVAILABLE).
    pub fn new(own_site: String, node_id: u64, federation: Option<Federation>) -> Self {
        Self {
            inner: Arc::new(RouterInner {
                own_site,
                node_id,
                federation,
                unary: unary_methods(),
                seq: AtomicU64::new(0),
            }),
        }
    }

    /// This node's site.
    pub fn own_site(&self) -> &str {
        &self.inner.own_site
    }

    /// The site links, if this node runs them.
    pub fn federation(&self) -> Option<&Federation> {
        self.inner.federation.as_ref()
    }

    /// Sends `method` with the encoded `body` to `site` for `caller`, and
    /// returns the answer as the site gave it (an error status included).
    pub async fn send(
        &self,
        site: &str,
        method: &str,
        body: Bytes,
        caller: &Caller,
    ) -> Result<ForwardResponse, ApiError> {
        let Some(federation) = &self.inner.federation else {
            return Err(ApiError::SiteUnreachable {
                site: site.to_string(),
                why: "this node runs no site links (federation.enabled)".into(),
            });
        };
        let timeout = caller
            .timeout
            .unwrap_or(DEFAULT_FORWARD_TIMEOUT)
            .min(MAX_FORWARD_TIMEOUT);
        let request_id = format!(
            "{:016x}-{}",
            self.inner.node_id,
            self.inner.seq.fetch_add(1, Ordering::Relaxed)
        );
        tracing::debug!(%site, %method, %request_id, "forwarding a call to another site");
        federation
            .forward(
                ForwardRequest {
                    target_site: site.to_string(),
                    origin_site: self.inner.own_site.clone(),
                    request_id,
                    deadline_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    authorization: caller.authorization.clone(),
                    trace_id: caller.trace_id.clone(),
                    method: method.to_string(),
                    body,
                    hops: caller.hops,
                },
                timeout,
            )
            .await
            .map_err(|e| match e {
                ForwardError::Timeout(site) => ApiError::SiteTimeout { site },
                ForwardError::Unreachable { site, why } => ApiError::SiteUnreachable { site, why },
                ForwardError::Failed { site, reason } => ApiError::SiteUnreachable {
                    site,
                    why: format!("the site link failed: {reason}"),
                },
            })
    }

    /// Calls `method` of the public API at `site` with `request`, on behalf
    /// of `caller`, one hop further: how a call about an agent that moved
    /// follows its forwarding pointer. The site's error passes through
    /// unchanged ([`ApiError::Remote`]).
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        site: &str,
        method: &str,
        request: &Req,
        caller: &Caller,
    ) -> Result<Resp, ApiError> {
        let hops = caller.hops.saturating_add(1);
        if hops > MAX_HOPS {
            return Err(ApiError::TooManyHops { hops, limit: MAX_HOPS });
        }
        let caller = Caller { hops, ..caller.clone() };
        let response = self
            .send(site, method, Bytes::from(request.encode_to_vec()), &caller)
            .await?;
        if response.code != 0 {
            return Err(ApiError::Remote(Box::new(super::error::remote_status(
                response.code,
                response.message,
                response.details,
            ))));
        }
        Resp::decode(response.body).map_err(|e| {
            ApiError::Internal(format!(
                "site {site:?} answered {method} with a message that does not decode: {e}"
            ))
        })
    }
}

/// Forwards calls with `cell0-site` naming another site.
#[derive(Clone)]
pub struct SiteRouteLayer {
    router: SiteRouter,
}

impl SiteRouteLayer {
    /// The layer forwarding through `router`.
    pub fn new(router: SiteRouter) -> Self {
        Self { router }
    }
}

impl<S> tower::Layer<S> for SiteRouteLayer {
    type Service = SiteRouted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SiteRouted {
            inner,
            router: self.router.clone(),
        }
    }
}

/// A service behind [`SiteRouteLayer`].
#[derive(Clone)]
pub struct SiteRouted<S> {
    inner: S,
    router: SiteRouter,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for SiteRouted<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let target = req
            .headers()
            .get(SITE_NAME)
            .and_then(|v| v.to_str().ok())
            .filter(|site| !site.is_empty() && *site != self.router.own_site())
            .map(str::to_string);
        match target {
            None => {
                // The ready service goes with this call; the clone waits for the next.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(req).await })
            }
            Some(site) => {
                let router = self.router.clone();
                Box::pin(async move {
                    Ok(match forward(&router, site, req).await {
                        Ok(response) => response,
                        Err(e) => Status::from(e).into_http(),
                    })
                })
            }
        }
    }
}

/// Forwards `req` to `site` and turns the answer into this call's answer.
async fn forward(
    router: &SiteRouter,
    site: String,
    req: http::Request<tonic::body::Body>,
) -> Result<http::Response<tonic::body::Body>, ApiError> {
    let method = req.uri().path().to_string();
    if !router.inner.unary.contains(&method) {
        return Err(ApiError::NotForwardable { method, site });
    }
    let (parts, body) = req.into_parts();
    let caller = Caller::of(&tonic::metadata::MetadataMap::from_headers(parts.headers));
    let bytes = unary::read_body(body).await?;
    let body = bytes.slice_ref(unary::message_of(&bytes)?);
    let response = router.send(&site, &method, body, &caller).await?;
    if response.code != 0 {
        return Ok(super::error::remote_status(response.code, response.message, response.details).into_http());
    }
    Ok(unary::answer_raw(&response.body))
}

/// Passes a message through as its encoded bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Serves calls forwarded from other sites by calling this node's own
/// public port.
pub struct LocalReplay {
    channel: Channel,
}

impl LocalReplay {
    /// Replays through `channel`, a (lazy) connection to this node's public
    /// port.
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    async fn replay(channel: Channel, from_site: String, request: ForwardRequest) -> ForwardResponse {
        let answer = |code: u32, message: String, body: Bytes, details: Bytes| ForwardResponse {
            request_id: request.request_id.clone(),
            code,
            message,
            body,
            details,
        };
        let Ok(path) = http::uri::PathAndQuery::try_from(request.method.as_str()) else {
            return answer(
                tonic::Code::InvalidArgument as u32,
                format!("{:?} is not a method path", request.method),
                Bytes::new(),
                Bytes::new(),
            );
        };
        let mut grpc = tonic::client::Grpc::new(channel);
        if let Err(e) = grpc.ready().await {
            return answer(
                tonic::Code::Unavailable as u32,
                format!("this node's public port is not ready: {e}"),
                Bytes::new(),
                Bytes::new(),
            );
        }
        let mut call = tonic::Request::new(request.body.clone());
        call.set_timeout(Duration::from_millis(request.deadline_ms).min(MAX_FORWARD_TIMEOUT));
        let hops = request.hops.to_string();
        for (name, value) in [
            ("authorization", &request.authorization),
            (TRACE_ID_HEADER, &request.trace_id),
            (HOPS_METADATA, &hops),
        ] {
            if let Ok(v) = value.parse()
                && !value.is_empty()
            {
                call.metadata_mut().insert(name, v);
            }
        }
        tracing::debug!(site = %from_site, method = %request.method, request_id = %request.request_id, "serving a call forwarded from another site");
        match grpc.unary(call, path, RawCodec).await {
            Ok(response) => answer(0, String::new(), response.into_inner(), Bytes::new()),
            Err(status) => answer(
                status.code() as u32,
                status.message().to_string(),
                Bytes::new(),
                Bytes::copy_from_slice(status.details()),
            ),
        }
    }
}

impl ForwardHandler for LocalReplay {
    fn serve(&self, from_site: &str, request: ForwardRequest) -> Pin<Box<dyn Future<Output = ForwardResponse> + Send>> {
        Box::pin(Self::replay(self.channel.clone(), from_site.to_string(), request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_nonsense_does_not() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(""), None);
        assert_eq!(grpc_timeout("10"), None);
        assert_eq!(grpc_timeout("xS"), None);
    }

    #[test]
    fn only_unary_methods_are_forwarded() {
        let unary = unary_methods();
        assert!(unary.contains("/cell0.v1.Kv/Put"), "{unary:?}");
        assert!(unary.contains("/cell0.v1.Sites/List"));
        assert!(!unary.contains("/cell0.v1.Kv/Watch"));
        assert!(!unary.contains("/cell0.v1.Models/Upload"));
    }
}
