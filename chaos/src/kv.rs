//! One KV client of either target over its own gRPC connection.
//!
//! [`KvClient::connect`] opens a dedicated HTTP/2 connection (a tonic
//! channel) to one node; [`KvClient::put`] and [`KvClient::get`] issue the
//! same logical operation to Cell0 (`cell0.v1.Kv/Put`, `Get`) or etcd
//! (`etcdserverpb.KV/Put`, `Range` of a single key).

use std::time::Duration;

use cell0_proto::v1 as cell0;
use prost::bytes::Bytes;
use tonic::transport::{Channel, Endpoint};

use crate::config::{Consistency, Target};
use crate::etcd::etcdserverpb as etcd;

/// How long connecting to a node may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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

/// A KV client of one target on one connection.
#[derive(Debug, Clone)]
pub enum KvClient {
    /// Cell0's `cell0.v1.Kv`.
    Cell0(cell0::kv_client::KvClient<Channel>),
    /// etcd's `etcdserverpb.KV`.
    Etcd(etcd::kv_client::KvClient<Channel>),
}

impl KvClient {
    /// Opens a new connection to `endpoint` (an `http://host:port` URI);
    /// every request on it fails after `timeout`.
    pub async fn connect(target: Target, endpoint: &str, timeout: Duration) -> Result<Self, ConnectError> {
        let err = |e: tonic::transport::Error| ConnectError {
            target: target.name(),
            endpoint: endpoint.to_string(),
            reason: error_chain(&e),
        };
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(err)?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(err)?;
        Ok(match target {
            Target::Cell0 => KvClient::Cell0(cell0::kv_client::KvClient::new(channel)),
            Target::Etcd => KvClient::Etcd(etcd::kv_client::KvClient::new(channel)),
        })
    }

    /// Sets `key` to `value`.
    pub async fn put(&mut self, key: Bytes, value: Bytes) -> Result<(), tonic::Status> {
        match self {
            KvClient::Cell0(c) => c
                .put(cell0::PutRequest {
                    key,
                    value,
                    prev_kv: false,
                })
                .await
                .map(drop),
            KvClient::Etcd(c) => c
                .put(etcd::PutRequest {
                    key,
                    value,
                    ..Default::default()
                })
                .await
                .map(drop),
        }
    }

    /// Reads `key`; `Ok(true)` when it exists.
    pub async fn get(&mut self, key: Bytes, consistency: Consistency) -> Result<bool, tonic::Status> {
        match self {
            KvClient::Cell0(c) => {
                let consistency = match consistency {
                    Consistency::Linearizable => cell0::Consistency::Linearizable,
                    Consistency::Serializable => cell0::Consistency::Serializable,
                };
                let r = c
                    .get(cell0::GetRequest {
                        key,
                        consistency: consistency as i32,
                    })
                    .await?;
                Ok(r.into_inner().kv.is_some())
            }
            KvClient::Etcd(c) => {
                let r = c
                    .range(etcd::RangeRequest {
                        key,
                        serializable: consistency == Consistency::Serializable,
                        ..Default::default()
                    })
                    .await?;
                Ok(!r.into_inner().kvs.is_empty())
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
