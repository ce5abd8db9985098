//! The public request target: one real node in this process (its own
//! runtime, data dir and loopback ports, ACLs and the audit log on, a
//! management token bootstrapped), and each input sent to it as one gRPC
//! call.
//!
//! Input: byte 0 picks the method (of [`METHODS`]), byte 1 the credentials
//! (none, the management token, a malformed header, an unknown token), the
//! rest is the request message as sent on the wire. A panic anywhere in the
//! node aborts the process (the AFL build sets `panic = "abort"`), which
//! AFL reports as a crash; a call that takes longer than [`CALL_TIMEOUT`]
//! is cut off by the client (a watch that was let in keeps streaming).
//!
//! Left out, because an arbitrary request would damage the machine or the
//! target rather than find a bug: `Agents/Run` (it starts an OS process
//! named by the request), `Cluster/Join` and `Cluster/Remove` (they change
//! the node's own membership), `Cluster/SaveSnapshot` (a stream of the
//! whole state per call).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The methods the target calls, by the first input byte (modulo).
pub const METHODS: [&str; 33] = [
    "/cell0.v1.Kv/Put",
    "/cell0.v1.Kv/Get",
    "/cell0.v1.Kv/Delete",
    "/cell0.v1.Kv/Range",
    "/cell0.v1.Kv/Cas",
    "/cell0.v1.Kv/Watch",
    "/cell0.v1.Cluster/Status",
    "/cell0.v1.Cluster/Members",
    "/cell0.v1.Agents/Get",
    "/cell0.v1.Agents/List",
    "/cell0.v1.Agents/Stop",
    "/cell0.v1.Agents/Migrate",
    "/cell0.v1.Agents/Watch",
    "/cell0.v1.Nodes/List",
    "/cell0.v1.Nodes/Drain",
    "/cell0.v1.Nodes/SetEligibility",
    "/cell0.v1.Tasks/Submit",
    "/cell0.v1.Tasks/Get",
    "/cell0.v1.Tasks/Wait",
    "/cell0.v1.Tasks/List",
    "/cell0.v1.Tasks/ListMemory",
    "/cell0.v1.Inference/Embed",
    "/cell0.v1.Inference/Info",
    "/cell0.v1.Models/Upload",
    "/cell0.v1.Models/Add",
    "/cell0.v1.Models/List",
    "/cell0.v1.Models/Remove",
    "/cell0.v1.Acl/SetPolicy",
    "/cell0.v1.Acl/DeletePolicy",
    "/cell0.v1.Acl/ListPolicies",
    "/cell0.v1.Acl/CreateToken",
    "/cell0.v1.Acl/DeleteToken",
    "/cell0.v1.Acl/WhoAmI",
];

/// How long one call may take before the client gives up on it.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// Bytes sent as they are: the request message of a call.
#[derive(Clone, Default, PartialEq)]
struct Raw(Vec<u8>);

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raw({} bytes)", self.0.len())
    }
}

impl prost::Message for Raw {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A node in this process and a connection to it.
pub struct RequestTarget {
    runtime: Runtime,
    channel: Channel,
    management: String,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl RequestTarget {
    /// Starts the node and waits until it serves (panics if it cannot: the
    /// target is broken, not the input).
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::Builder::new()
            .prefix("cell0-fuzz-")
            .tempdir()
            .expect("a data dir");
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        };
        let public: SocketAddr = free();
        let mut config = cell0::config::NodeConfig {
            data_dir: dir.path().join("node"),
            name: Some("fuzz".into()),
            bootstrap: true,
            ..cell0::config::NodeConfig::default()
        };
        config.listen.public = public;
        config.listen.internal = free();
        config.listen.http = free();
        config.tls.insecure = true;
        config.acl.enabled = true;
        config.audit.enabled = true;
        config.inference.backend = cell0_inference::BackendKind::Cpu;
        let (stop, stopped) = oneshot::channel::<()>();
        runtime.spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = cell0::server::run(config, shutdown).await {
                eprintln!("the fuzz node stopped: {e:#}");
                std::process::abort();
            }
        });
        let channel = runtime.block_on(async {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{public}")).expect("an endpoint");
            // Polls (100 ms, at most a minute): the node's listener has no
            // readiness signal this process can wait on.
            for _ in 0..600 {
                if let Ok(c) = endpoint.connect().await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("the fuzz node does not listen on {public}");
        });
        let management = runtime.block_on(async {
            let mut client = cell0_proto::v1::acl_client::AclClient::new(channel.clone());
            // Polls until the node has elected itself and can commit.
            for _ in 0..600 {
                if let Ok(r) = client.bootstrap(cell0_proto::v1::AclBootstrapRequest {}).await {
                    return r.into_inner().secret;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("the fuzz node never bootstrapped its ACLs");
        });
        Self {
            runtime,
            channel,
            management,
            stop: Some(stop),
            _dir: dir,
        }
    }

    /// Sends one input as a call; the code it was answered with (`None`:
    /// no answer within [`CALL_TIMEOUT`], or too short an input).
    pub fn run(&self, data: &[u8]) -> Option<tonic::Code> {
        let [method, credentials, message @ ..] = data else {
            return None;
        };
        let path = METHODS[usize::from(*method) % METHODS.len()];
        let authorization = match credentials % 4 {
            0 => None,
            1 => Some(format!("Bearer {}", self.management)),
            2 => Some("Bearer c0.not-a-token".to_string()),
            _ => Some(format!("Bearer c0.{}.{}", "0".repeat(32), "0".repeat(64))),
        };
        let channel = self.channel.clone();
        let body = Raw(message.to_vec());
        self.runtime.block_on(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            let mut request = tonic::Request::new(body);
            if let Some(value) = authorization.and_then(|a| a.parse().ok()) {
                request.metadata_mut().insert("authorization", value);
            }
            let codec = tonic_prost::ProstCodec::<Raw, ()>::default();
            let call = async {
                grpc.ready().await.ok()?;
                Some(match grpc.unary(request, path.parse().ok()?, codec).await {
                    Ok(_) => tonic::Code::Ok,
                    Err(status) => status.code(),
                })
            };
            tokio::time::timeout(CALL_TIMEOUT, call).await.ok().flatten()
        })
    }
}

impl Drop for RequestTarget {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Inputs for a few methods, with the management token: a put, a range, a
/// policy, an embedding request.
pub(crate) fn seeds() -> Vec<Vec<u8>> {
    use cell0_proto::v1;
    use prost::Message;
    let index = |path: &str| METHODS.iter().position(|m| *m == path).expect("a listed method") as u8;
    let with = |path: &str, message: Vec<u8>| {
        let mut out = vec![index(path), 1];
        out.extend(message);
        out
    };
    vec![
        with(
            "/cell0.v1.Kv/Put",
            v1::PutRequest {
                key: "app/x".into(),
                value: "v".into(),
                prev_kv: true,
            }
            .encode_to_vec(),
        ),
        with(
            "/cell0.v1.Kv/Range",
            v1::RangeRequest {
                prefix: "app/".into(),
                limit: 10,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        with(
            "/cell0.v1.Acl/SetPolicy",
            v1::SetPolicyRequest {
                policy: Some(v1::AclPolicy {
                    name: "p".into(),
                    description: String::new(),
                    rules: vec![v1::AclRule {
                        resource: v1::AclResource::Kv as i32,
                        prefix: "app/".into(),
                        access: v1::AclAccess::Write as i32,
                    }],
                }),
            }
            .encode_to_vec(),
        ),
        with(
            "/cell0.v1.Inference/Embed",
            v1::EmbedRequest {
                texts: vec!["a".into()],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        vec![index("/cell0.v1.Kv/Get"), 0, 10, 1, b'k'],
    ]
}
