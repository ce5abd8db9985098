//! The load generator end to end against in-process fake servers of both
//! APIs (an in-memory map behind `etcdserverpb.KV` and `cell0.v1.Kv`): the
//! requests reach every endpoint, prefill writes the whole key space, the
//! read consistency reaches the server, and the report adds up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cell0_chaos::config::{Consistency, LoadConfig, Op, Target};
use cell0_chaos::etcd::{etcdserverpb as etcd, mvccpb};
use cell0_chaos::load;
use cell0_proto::v1 as cell0;
use prost::bytes::Bytes;
use tonic::codegen::tokio_stream;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Store {
    map: Mutex<HashMap<Bytes, Bytes>>,
    puts: AtomicU64,
    gets: AtomicU64,
    serializable_gets: AtomicU64,
}

impl Store {
    fn put(&self, key: Bytes, value: Bytes) {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.map.lock().unwrap().insert(key, value);
    }

    fn get(&self, key: &Bytes, serializable: bool) -> Option<Bytes> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        if serializable {
            self.serializable_gets.fetch_add(1, Ordering::Relaxed);
        }
        self.map.lock().unwrap().get(key).cloned()
    }
}

/// Each fake node counts its own requests but shares the map, like replicas.
struct Node {
    store: Arc<Store>,
    requests: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl etcd::kv_server::Kv for Node {
    async fn range(&self, request: Request<etcd::RangeRequest>) -> Result<Response<etcd::RangeResponse>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let r = request.into_inner();
        let kvs = self
            .store
            .get(&r.key, r.serializable)
            .map(|value| mvccpb::KeyValue {
                key: r.key.clone(),
                value,
                ..Default::default()
            })
            .into_iter()
            .collect();
        Ok(Response::new(etcd::RangeResponse {
            kvs,
            ..Default::default()
        }))
    }

    async fn put(&self, request: Request<etcd::PutRequest>) -> Result<Response<etcd::PutResponse>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let r = request.into_inner();
        self.store.put(r.key, r.value);
        Ok(Response::new(etcd::PutResponse::default()))
    }
}

#[tonic::async_trait]
impl cell0::kv_server::Kv for Node {
    async fn put(&self, request: Request<cell0::PutRequest>) -> Result<Response<cell0::PutResponse>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let r = request.into_inner();
        self.store.put(r.key, r.value);
        Ok(Response::new(cell0::PutResponse::default()))
    }

    async fn get(&self, request: Request<cell0::GetRequest>) -> Result<Response<cell0::GetResponse>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let r = request.into_inner();
        let serializable = r.consistency == cell0::Consistency::Serializable as i32;
        let kv = self.store.get(&r.key, serializable).map(|value| cell0::KeyValue {
            key: r.key.clone(),
            value,
            ..Default::default()
        });
        Ok(Response::new(cell0::GetResponse { header: None, kv }))
    }

    async fn delete(&self, _: Request<cell0::DeleteRequest>) -> Result<Response<cell0::DeleteResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn range(&self, _: Request<cell0::RangeRequest>) -> Result<Response<cell0::RangeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn cas(&self, _: Request<cell0::CasRequest>) -> Result<Response<cell0::CasResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type WatchStream = tokio_stream::Empty<Result<cell0::WatchResponse, Status>>;

    async fn watch(&self, _: Request<cell0::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Starts `n` fake nodes of `target` on loopback sharing one store.
async fn cluster(target: Target, n: usize) -> (Arc<Store>, Vec<String>, Vec<Arc<AtomicU64>>) {
    let store = Arc::new(Store::default());
    let mut endpoints = Vec::new();
    let mut counters = Vec::new();
    for _ in 0..n {
        let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = incoming.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let node = Node {
            store: store.clone(),
            requests: requests.clone(),
        };
        let router = match target {
            Target::Etcd => Server::builder().add_service(etcd::kv_server::KvServer::new(node)),
            Target::Cell0 => Server::builder().add_service(cell0::kv_server::KvServer::new(node)),
        };
        tokio::spawn(router.serve_with_incoming(incoming));
        endpoints.push(format!("http://{addr}"));
        counters.push(requests);
    }
    (store, endpoints, counters)
}

fn config(target: Target, endpoints: Vec<String>, op: Op) -> LoadConfig {
    LoadConfig {
        target,
        endpoints,
        op,
        consistency: (op == Op::Get).then_some(Consistency::Linearizable),
        clients: 6,
        duration: Duration::from_secs(1),
        value_size: 100,
        keys: 200,
        pids: vec![std::process::id()],
        prefill: false,
        timeout: Duration::from_secs(5),
        progress: false,
    }
}

async fn puts_reach_every_endpoint(target: Target) {
    let (store, endpoints, counters) = cluster(target, 3).await;
    let report = load::run(&config(target, endpoints.clone(), Op::Put)).await.unwrap();
    assert_eq!(report.target, target);
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert!(report.ops > 10, "{report:?}");
    assert_eq!(report.ops, store.puts.load(Ordering::Relaxed));
    for (e, c) in endpoints.iter().zip(&counters) {
        assert!(c.load(Ordering::Relaxed) > 0, "no request reached {e}");
    }
    assert!(report.seconds >= 1.0 && report.seconds < 3.0, "{}", report.seconds);
    assert!((report.ops_per_second - report.ops as f64 / report.seconds).abs() < 1e-6);
    assert!(report.p50_ms > 0.0 && report.p50_ms <= report.p99_ms && report.p99_ms <= report.max_ms);
    // This process is both the load generator and the measured "server".
    assert_eq!(report.server_cpu.len(), 1);
    assert_eq!(report.server_cpu[0].pid, std::process::id());
    let cpu = report.server_cpu_seconds.unwrap();
    assert_eq!(report.cpu_us_per_op.unwrap(), cpu * 1e6 / report.ops as f64);
    assert!(report.client_cpu_seconds.is_some());
    // serde_json parses floats to within an ulp, not always exactly.
    let back = cell0_chaos::report::parse_runs(&report.to_json_line().unwrap()).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!((back[0].target, back[0].ops, back[0].errors), (target, report.ops, 0));
    assert!((back[0].ops_per_second - report.ops_per_second).abs() < 1e-6);
}

async fn prefilled_gets_find_their_keys(target: Target, consistency: Consistency) {
    let (store, endpoints, _) = cluster(target, 2).await;
    let mut c = config(target, endpoints, Op::Get);
    c.prefill = true;
    c.consistency = Some(consistency);
    let report = load::run(&c).await.unwrap();
    assert_eq!(store.map.lock().unwrap().len(), 200);
    assert_eq!(store.puts.load(Ordering::Relaxed), 200);
    assert!(report.prefill_seconds.is_some());
    assert!(report.ops > 10);
    assert_eq!(report.errors, 0);
    assert_eq!(report.not_found, 0);
    let serializable = store.serializable_gets.load(Ordering::Relaxed);
    match consistency {
        Consistency::Linearizable => assert_eq!(serializable, 0),
        Consistency::Serializable => assert_eq!(serializable, store.gets.load(Ordering::Relaxed)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_puts() {
    puts_reach_every_endpoint(Target::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell0_puts() {
    puts_reach_every_endpoint(Target::Cell0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_gets() {
    prefilled_gets_find_their_keys(Target::Etcd, Consistency::Linearizable).await;
    prefilled_gets_find_their_keys(Target::Etcd, Consistency::Serializable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell0_gets() {
    prefilled_gets_find_their_keys(Target::Cell0, Consistency::Linearizable).await;
    prefilled_gets_find_their_keys(Target::Cell0, Consistency::Serializable).await;
}

#[tokio::test]
async fn unreachable_endpoint_and_missing_pid() {
    let mut c = config(Target::Etcd, vec!["http://127.0.0.1:1".into()], Op::Put);
    c.pids = vec![];
    let err = load::run(&c).await.unwrap_err().to_string();
    assert!(
        err.starts_with("cannot connect to etcd endpoint http://127.0.0.1:1"),
        "{err}"
    );
    c.pids = vec![u32::MAX];
    let err = load::run(&c).await.unwrap_err().to_string();
    assert!(err.starts_with("--pids: cannot read /proc/4294967295/stat"), "{err}");
}

#[tokio::test]
async fn failed_requests_are_counted() {
    // A Cell0 client against an etcd server: every call is UNIMPLEMENTED.
    let (_, endpoints, _) = cluster(Target::Etcd, 1).await;
    let mut c = config(Target::Cell0, endpoints, Op::Put);
    c.clients = 2;
    let report = load::run(&c).await.unwrap();
    assert_eq!(report.ops, 0);
    assert!(report.errors > 0);
    assert!(report.first_error.unwrap().starts_with("Unimplemented"));
    assert_eq!(report.cpu_us_per_op, None);
}

/// A listener on `addr` that another may take over at once.
fn rebindable(addr: SocketAddr) -> TcpIncoming {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    TcpIncoming::from(socket.listen(64).unwrap())
}

#[tokio::test]
async fn a_lazy_client_reconnects_after_its_node_restarts() {
    let store = Arc::new(Store::default());
    let serve = |incoming: TcpIncoming, stop: tokio::sync::oneshot::Receiver<()>| {
        let node = Node {
            store: store.clone(),
            requests: Arc::default(),
        };
        tokio::spawn(
            Server::builder()
                .add_service(cell0::kv_server::KvServer::new(node))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                }),
        )
    };
    let first = rebindable(SocketAddr::from(([127, 0, 0, 1], 0)));
    let addr = first.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let server = serve(first, stopped);
    let client =
        cell0_chaos::kv::KvClient::lazy(Target::Cell0, &format!("http://{addr}"), Duration::from_secs(5)).unwrap();
    client.put(Bytes::from("a"), Bytes::from("1")).await.unwrap();

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    let down = client.put(Bytes::from("b"), Bytes::from("2")).await.unwrap_err();
    assert_eq!(down.code(), tonic::Code::Unavailable, "{down}");

    let (_stop, stopped) = tokio::sync::oneshot::channel();
    let _server = serve(rebindable(addr), stopped);
    client.put(Bytes::from("c"), Bytes::from("3")).await.unwrap();
    let map = store.map.lock().unwrap();
    assert_eq!(map.get(&Bytes::from("c")), Some(&Bytes::from("3")));
    assert_eq!(map.get(&Bytes::from("b")), None);
}

#[tokio::test]
async fn a_call_without_an_answer_ends_at_the_timeout() {
    // Accepts connections and never answers, not even HTTP/2's settings.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let timeout = Duration::from_millis(200);
    let client = cell0_chaos::kv::KvClient::connect(Target::Etcd, &format!("http://{addr}"), timeout)
        .await
        .unwrap();
    let err = client
        .get(Bytes::from("k"), Consistency::Linearizable)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    silent.abort();
}

#[tokio::test]
async fn an_answer_over_the_limit_fails_the_call() {
    let (store, endpoints, _) = cluster(Target::Cell0, 1).await;
    let big = Bytes::from(vec![b'v'; cell0_chaos::unary::MAX_ANSWER_BYTES]);
    store.put(Bytes::from("big"), big);
    store.put(Bytes::from("small"), Bytes::from("v"));
    let client = cell0_chaos::kv::KvClient::connect(Target::Cell0, &endpoints[0], Duration::from_secs(5))
        .await
        .unwrap();
    let err = client
        .get(Bytes::from("big"), Consistency::Linearizable)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    // The connection still serves the next call.
    assert!(
        client
            .get(Bytes::from("small"), Consistency::Linearizable)
            .await
            .unwrap()
    );
}
