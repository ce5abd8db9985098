//! The public port's last layer before the services: a call for the Kv
//! service goes straight to it; every other call goes through tonic's
//! router.
//!
//! The router matches each call's path against every service's route,
//! records the match in the request's extensions and boxes the answer's
//! body once more: about 3 % of the instructions a follower spends serving
//! a put (docs/benchmarks.md). Kv calls are most of what a node serves, so
//! they skip it: the unary ones are answered by [`unary::serve`] with the
//! Kv handlers ([`KvApi`]), the rest (watches, and an unknown method, which
//! gets `UNIMPLEMENTED` as through the router) by the Kv service itself.
//!
//! Invariant: the router's Kv service and this layer's wrap the same
//! [`KvApi`], so a call is answered by the same handler whichever way it
//! takes. The layers above (rate limit, site routing, access) see every
//! call before either way.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use cell0_proto::v1::kv_server::KvServer;
use futures::future::{BoxFuture, Either, TryFutureExt};
use tonic::codegen::http;
use tonic::server::NamedService;

use super::kv::KvApi;
use super::unary;

/// The method of a Kv call's path (`/cell0.v1.Kv/<method>`).
fn kv_method(path: &str) -> Option<&str> {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(KvServer::<KvApi>::NAME))
        .and_then(|rest| rest.strip_prefix('/'))
}

/// Layer that sends Kv calls to the Kv handlers ahead of the router it
/// wraps.
#[derive(Clone)]
pub struct KvFirstLayer {
    api: Arc<KvApi>,
}

impl KvFirstLayer {
    /// `api` must be the handlers the router's Kv service holds too
    /// ([`KvServer::from_arc`]).
    pub fn new(api: Arc<KvApi>) -> Self {
        Self { api }
    }
}

impl<S> tower::Layer<S> for KvFirstLayer {
    type Service = KvFirst<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KvFirst {
            kv: KvServer::from_arc(self.api.clone()),
            api: self.api.clone(),
            inner,
        }
    }
}

/// A router behind [`KvFirstLayer`].
#[derive(Clone)]
pub struct KvFirst<S> {
    api: Arc<KvApi>,
    kv: KvServer<KvApi>,
    inner: S,
}

type Call = http::Request<tonic::body::Body>;
type Answer = http::Response<tonic::body::Body>;

impl<S> tower::Service<Call> for KvFirst<S>
where
    S: tower::Service<Call, Response = Answer>,
    S::Error: From<Infallible> + Send + 'static,
{
    type Response = Answer;
    type Error = S::Error;
    type Future = Either<BoxFuture<'static, Result<Answer, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The Kv service is always ready; the router says for itself.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Call) -> Self::Future {
        let Some(method) = kv_method(req.uri().path()) else {
            return Either::Right(self.inner.call(req));
        };
        let api = self.api.clone();
        Either::Left(match method {
            "Put" => Box::pin(async move { Ok(unary::serve(req, |r| api.handle_put(r)).await) }),
            "Get" => Box::pin(async move { Ok(unary::serve(req, |r| api.handle_get(r)).await) }),
            "Delete" => Box::pin(async move { Ok(unary::serve(req, |r| api.handle_delete(r)).await) }),
            "Range" => Box::pin(async move { Ok(unary::serve(req, |r| api.handle_range(r)).await) }),
            "Cas" => Box::pin(async move { Ok(unary::serve(req, |r| api.handle_cas(r)).await) }),
            _ => Box::pin(tower::Service::call(&mut self.kv, req).map_err(S::Error::from)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_kv_services_paths_take_the_shortcut() {
        assert_eq!(kv_method("/cell0.v1.Kv/Put"), Some("Put"));
        assert_eq!(kv_method("/cell0.v1.Kv/NoSuchMethod"), Some("NoSuchMethod"));
        for path in [
            "/cell0.v1.Kvx/Put",
            "/cell0.v1.Cluster/Status",
            "/cell0.v1.Kv",
            "cell0.v1.Kv/Put",
            "/grpc.health.v1.Health/Check",
            "",
        ] {
            assert_eq!(kv_method(path), None, "{path}");
        }
    }
}
