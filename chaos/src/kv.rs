//! One KV client of either target over its own gRPC connection.
//!
//! [`KvClient::connect`] opens a dedicated HTTP/2 connection to one node
//! ([`unary::Channel`]); [`KvClient::put`] and [`KvClient::get`] issue the
//! same logical operation to Cell0 (`cell0.v1.Kv/Put`, `Get`) or etcd
//! (`etcdserverpb.KV/Put`, `Range` of a single key), in the same framing.

use std::time::Duration;

use cell0_proto::v1 as cell0;
use prost::bytes::Bytes;

use crate::config::{Consistency, Target};
use crate::etcd::etcdserverpb as etcd;
use crate::unary;

/// A connection failure.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {target} endpoint {endpoint}: {reason}")]
pub struct ConnectError {
    /// The target's name.
    pub target: &'static str,
    /// The endpoint URI.
    pub endpoint: String,
    /// Why: the transport error and its causes on one line.
    pub reason: String,
}

impl ConnectError {
    fn new(target: Target, endpoint: &str, reason: String) -> Self {
        Self {
            target: target.name(),
            endpoint: endpoint.to_string(),
            reason,
        }
    }
}

/// An error and its causes on one line, `a: b: c`, without a cause that
/// repeats the message before it (transport errors nest such layers).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(e) = cause {
        let msg = e.to_string();
        if parts.last() != Some(&msg) {
            parts.push(msg);
        }
        cause = e.source();
    }
    parts.join(": ")
}

/// A KV client of one target on one connection. Clones share it.
#[derive(Debug, Clone)]
pub struct KvClient {
    target: Target,
    channel: unary::Channel,
}

impl KvClient {
    /// Opens a new connection to `endpoint` (an `http://host:port` URI);
    /// every request on it fails after `timeout`.
    pub async fn connect(target: Target, endpoint: &str, timeout: Duration) -> Result<Self, ConnectError> {
        let channel = unary::Channel::connect(endpoint, timeout)
            .await
            .map_err(|reason| ConnectError::new(target, endpoint, reason))?;
        Ok(Self { target, channel })
    }

    /// A client of `endpoint` that connects at its first request, and
    /// again after a request fails in transport (a restarted node).
    pub fn lazy(target: Target, endpoint: &str, timeout: Duration) -> Result<Self, ConnectError> {
        let channel =
            unary::Channel::lazy(endpoint, timeout).map_err(|reason| ConnectError::new(target, endpoint, reason))?;
        Ok(Self { target, channel })
    }

    /// Sets `key` to `value`.
    pub async fn put(&self, key: Bytes, value: Bytes) -> Result<(), tonic::Status> {
        match self.target {
            Target::Cell0 => self
                .channel
                .call::<_, cell0::PutResponse>(
                    "/cell0.v1.Kv/Put",
                    &cell0::PutRequest {
                        key,
                        value,
                        prev_kv: false,
                    },
                )
                .await
                .map(drop),
            Target::Etcd => self
                .channel
                .call::<_, etcd::PutResponse>(
                    "/etcdserverpb.KV/Put",
                    &etcd::PutRequest {
                        key,
                        value,
                        ..Default::default()
                    },
                )
                .await
                .map(drop),
        }
    }

    /// Reads `key`; `Ok(true)` when it exists.
    pub async fn get(&self, key: Bytes, consistency: Consistency) -> Result<bool, tonic::Status> {
        match self.target {
            Target::Cell0 => {
                let consistency = match consistency {
                    Consistency::Linearizable => cell0::Consistency::Linearizable,
                    Consistency::Serializable => cell0::Consistency::Serializable,
                };
                let r: cell0::GetResponse = self
                    .channel
                    .call(
                        "/cell0.v1.Kv/Get",
                        &cell0::GetRequest {
                            key,
                            consistency: consistency as i32,
                        },
                    )
                    .await?;
                Ok(r.kv.is_some())
            }
            Target::Etcd => {
                let r: etcd::RangeResponse = self
                    .channel
                    .call(
                        "/etcdserverpb.KV/Range",
                        &etcd::RangeRequest {
                            key,
                            serializable: consistency == Consistency::Serializable,
                            ..Default::default()
                        },
                    )
                    .await?;
                Ok(!r.kvs.is_empty())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn chains_skip_repeated_layers() {
        let e = Layer(
            "transport error",
            Some(Box::new(Layer(
                "tcp connect error",
                Some(Box::new(Layer(
                    "tcp connect error",
                    Some(Box::new(Layer("Connection refused", None))),
                ))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "transport error: tcp connect error: Connection refused"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
