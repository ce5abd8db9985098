//! Request rate limits on the public port: token buckets per client address
//! (`limits.client_rate`, `limits.client_burst`), checked in one tower
//! layer before any handler runs, so every method is covered, today's and
//! tomorrow's (health checks and reflection are exempt); and per ACL token
//! (`limits.token_rate`), checked by the ACL layer once it knows the token
//! ([`super::auth`]). Off when the rate is 0.
//!
//! Invariants:
//! - A bucket holds at most `burst` tokens and refills at `rate` per
//!   second; a request takes one or is refused with `RATE_LIMITED`
//!   (`RESOURCE_EXHAUSTED`, a `RetryInfo` detail and the wait in words).
//! - At most [`MAX_TRACKED_CLIENTS`] keys are tracked; when full, the
//!   buckets that refilled completely (idle clients) are dropped, and if
//!   none did, the new key is let through untracked rather than evicting
//!   an active one.
//! - The decision is pure over an injected `now` ([`RateLimits::take`]).

use std::collections::HashMap;
use std::future::Ready;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::Either;
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::TcpConnectInfo;

use super::ApiError;

/// Most client addresses (or tokens) tracked at once.
pub const MAX_TRACKED_CLIENTS: usize = 65_536;

/// Paths that are never limited: health checks and reflection.
const EXEMPT_PREFIXES: [&str; 2] = ["/grpc.health.v1.Health/", "/grpc.reflection."];

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of one node, one per key (a client address or a token).
#[derive(Debug)]
pub struct RateLimits<K = IpAddr> {
    rate: u32,
    burst: u32,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Copy> RateLimits<K> {
    /// `rate` requests per second per key, bursts of up to `burst`.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate,
            burst: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Takes a token for `client` at `now`, or says how long until one is
    /// there.
    pub fn take(&self, client: K, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(self.rate);
        let burst = f64::from(self.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let refilled = |b: &Bucket| (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        if !buckets.contains_key(&client) && buckets.len() >= MAX_TRACKED_CLIENTS {
            buckets.retain(|_, b| refilled(b) < burst);
            if buckets.len() >= MAX_TRACKED_CLIENTS {
                return Ok(());
            }
        }
        let bucket = buckets.entry(client).or_insert(Bucket { tokens: burst, at: now });
        let tokens = refilled(bucket);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) / rate))
        }
    }
}

/// The tower layer of the public server.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limits: Option<Arc<RateLimits>>,
}

impl RateLimitLayer {
    /// Limits of `rate` per second and `burst` per address; none when
    /// `rate` is 0.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            limits: (rate > 0).then(|| Arc::new(RateLimits::new(rate, burst))),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// A service behind [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimited<S> {
    inner: S,
    limits: Option<Arc<RateLimits>>,
}

/// The client address of a request, as the server's listener recorded it.
pub(super) fn client_of<B>(req: &http::Request<B>) -> Option<IpAddr> {
    req.extensions()
        .get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr)
        .or_else(|| {
            req.extensions()
                .get::<cell0_tls::wire::TlsConnectInfo>()
                .and_then(|i| i.remote_addr)
        })
        .map(|a| a.ip())
}

impl<S, B, R> tower::Service<http::Request<B>> for RateLimited<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    /// The refusal, ready at once, or the inner service's call, unboxed.
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(limits) = &self.limits
            && !EXEMPT_PREFIXES.iter().any(|p| req.uri().path().starts_with(p))
            && let Some(client) = client_of(&req)
            && let Err(retry_after) = limits.take(client, Instant::now())
        {
            metrics::counter!("cell0_rate_limited_total").increment(1);
            let status = Status::from(ApiError::RateLimited {
                rate: limits.rate,
                per: "client address",
                retry_after,
            });
            return Either::Left(std::future::ready(Ok(status.into_http())));
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_bucket_that_refills_at_the_rate() {
        let limits = RateLimits::<IpAddr>::new(10, 3);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            limits.take(a, t0).unwrap();
        }
        let wait = limits.take(a, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100), "one token per 100 ms at 10/s");
        // Another address is not affected.
        limits.take(b, t0).unwrap();
        // 100 ms later one more request from a passes, the next does not.
        let t1 = t0 + Duration::from_millis(100);
        limits.take(a, t1).unwrap();
        assert!(limits.take(a, t1).is_err());
        // After a long pause the bucket holds the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            limits.take(a, t2).unwrap();
        }
        assert!(limits.take(a, t2).is_err());
    }
}
