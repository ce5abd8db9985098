//! The public port's last layer before the services: a call for the Kv
//! service goes straight to it; every other call goes through tonic's
//! router.
//!
//! The router matches each call's path against every service's route,
//! records the match in the request's extensions and boxes the answer's
//! body once more: about 3 % of the instructions a follower spends serving
//! a put (docs/benchmarks.md). Kv calls are most of what a node serves, and
//! the Kv service answers any path under its name itself (an unknown
//! method gets `UNIMPLEMENTED`, as through the router), so they skip it.
//!
//! Invariant: the router holds the same Kv service, so a call is answered
//! alike whichever way it takes; only the way changes, never the answer.
//! The layers above (rate limit, site routing, access) see every call
//! before either way.

use std::convert::Infallible;
use std::task::{Context, Poll};

use cell0_proto::v1::kv_server::KvServer;
use futures::future::{Either, MapErr, TryFutureExt};
use tonic::codegen::http;
use tonic::server::NamedService;

use super::kv::KvApi;

/// Path prefix of the Kv service's calls: `/cell0.v1.Kv/`.
fn is_kv_call(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(KvServer::<KvApi>::NAME))
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Layer that sends Kv calls to `kv` ahead of the router it wraps.
#[derive(Clone)]
pub struct KvFirstLayer {
    kv: KvServer<KvApi>,
}

impl KvFirstLayer {
    /// `kv` must be the Kv service the router below holds too.
    pub fn new(kv: KvServer<KvApi>) -> Self {
        Self { kv }
    }
}

impl<S> tower::Layer<S> for KvFirstLayer {
    type Service = KvFirst<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KvFirst {
            kv: self.kv.clone(),
            inner,
        }
    }
}

/// A router behind [`KvFirstLayer`].
#[derive(Clone)]
pub struct KvFirst<S> {
    kv: KvServer<KvApi>,
    inner: S,
}

type KvFuture = <KvServer<KvApi> as tower::Service<http::Request<tonic::body::Body>>>::Future;

impl<S> tower::Service<http::Request<tonic::body::Body>> for KvFirst<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Error: From<Infallible>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<MapErr<KvFuture, fn(Infallible) -> S::Error>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The Kv service is always ready; the router says for itself.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if is_kv_call(req.uri().path()) {
            let never: fn(Infallible) -> S::Error = S::Error::from;
            Either::Left(tower::Service::call(&mut self.kv, req).map_err(never))
        } else {
            Either::Right(self.inner.call(req))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_kv_services_paths_take_the_shortcut() {
        assert!(is_kv_call("/cell0.v1.Kv/Put"));
        assert!(is_kv_call("/cell0.v1.Kv/NoSuchMethod"));
        for path in [
            "/cell0.v1.Kvx/Put",
            "/cell0.v1.Cluster/Status",
            "/cell0.v1.Kv",
            "cell0.v1.Kv/Put",
            "/grpc.health.v1.Health/Check",
            "",
        ] {
            assert!(!is_kv_call(path), "{path}");
        }
    }
}
