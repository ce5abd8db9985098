//! `cell0.v1.Kv`: puts, reads, ranges, compare-and-swap and watches.
//!
//! Bounds: a range page holds at most `MAX_RANGE_LIMIT` pairs and about 2
//! MiB; a watch message at most [`WATCH_BATCH`] events and about 2 MiB (a
//! history page is cut by bytes, a live notification carries at most 64 KiB
//! or is replaced by a re-read of the history), so every message fits a
//! client's default 4 MiB receive limit.
//!
//! Each watch stream is fed by a pump running as a transient task `watch` of
//! the node's [`Supervisor`]: when the node stops, every pump ends its
//! stream with UNAVAILABLE ("the node is shutting down") at once, so open
//! watches do not hold the drain of the public port.

use std::pin::Pin;

use cell0_consensus::command::{MAX_KEY_BYTES, check_key};
use cell0_consensus::state::MAX_RANGE_LIMIT;
use cell0_consensus::{Applied, Command, Consensus, ConsensusError, Consistency, EventKind, Response, StateEvent};
use cell0_proto::v1::kv_server::Kv;
use cell0_proto::v1::{self, event::EventType};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use super::{ApiError, RequestGate, kv_to_proto};
use crate::supervisor::{Supervisor, stopped};

/// Most concurrent watch streams one node serves.
pub const MAX_WATCHES: usize = 1024;
/// Events sent in one watch message at most.
pub const WATCH_BATCH: usize = 1000;

/// The Kv service of one node.
pub struct KvApi {
    consensus: Consensus,
    watches: std::sync::Arc<tokio::sync::Semaphore>,
    tasks: Supervisor,
    gate: RequestGate,
}

impl KvApi {
    /// A service answering through `consensus`, running its watch pumps in
    /// `tasks`, within the node's request budget `gate`.
    pub fn new(consensus: Consensus, tasks: Supervisor, gate: RequestGate) -> Self {
        Self {
            consensus,
            watches: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_WATCHES)),
            tasks,
            gate,
        }
    }

    fn header(&self, revision: u64) -> Option<v1::ResponseHeader> {
        header(&self.consensus, revision)
    }
}

/// The header every Kv response carries.
fn header(consensus: &Consensus, revision: u64) -> Option<v1::ResponseHeader> {
    Some(v1::ResponseHeader {
        revision,
        node_id: consensus.id(),
        raft_term: consensus.term(),
    })
}

/// Refuses a prefix-like field longer than any key can be.
fn check_bound(field: &str, bytes: &[u8]) -> Result<(), ApiError> {
    if bytes.len() > MAX_KEY_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("is longer than {MAX_KEY_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn consistency(raw: i32) -> Result<Consistency, ApiError> {
    match v1::Consistency::try_from(raw) {
        Ok(v1::Consistency::Linearizable) => Ok(Consistency::Linearizable),
        Ok(v1::Consistency::Serializable) => Ok(Consistency::Serializable),
        Err(_) => Err(ApiError::invalid("consistency", format!("{raw} is not a known value"))),
    }
}

fn unexpected(r: Response) -> ApiError {
    ApiError::Internal(format!("unexpected response {r:?}"))
}

fn event_to_proto(ev: StateEvent) -> v1::Event {
    v1::Event {
        r#type: match ev.kind {
            EventKind::Put => EventType::Put as i32,
            EventKind::Delete => EventType::Delete as i32,
        },
        kv: Some(kv_to_proto(ev.kv)),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchResponse, Status>> + Send>>;

impl KvApi {
    /// `Kv/Put`.
    pub async fn handle_put(&self, r: v1::PutRequest) -> Result<v1::PutResponse, Status> {
        self.gate
            .observe("Kv/Put", async {
                let (key, value) = (r.key.to_vec(), r.value.to_vec());
                let cmd = if r.prev_kv {
                    Command::Put { key, value }
                } else {
                    Command::PutWithoutPrev { key, value }
                };
                match self.consensus.propose(cmd).await? {
                    // The answer carries the written pair's revisions; its
                    // key and value are the request's. A leader of an older
                    // build answers with the previous pair regardless.
                    Response::Put { kv, prev } => Ok(v1::PutResponse {
                        header: self.header(kv.mod_revision),
                        kv: Some(v1::KeyValue {
                            key: r.key,
                            value: r.value,
                            create_revision: kv.create_revision,
                            mod_revision: kv.mod_revision,
                            version: kv.version,
                        }),
                        prev_kv: prev.filter(|_| r.prev_kv).map(kv_to_proto),
                    }),
                    other => Err(unexpected(other)),
                }
            })
            .await
    }

    /// `Kv/Get`.
    pub async fn handle_get(&self, r: v1::GetRequest) -> Result<v1::GetResponse, Status> {
        self.gate
            .observe("Kv/Get", async {
                check_key("key", &r.key).map_err(ConsensusError::from)?;
                let (kv, revision) = self.consensus.get(&r.key, consistency(r.consistency)?).await?;
                Ok(v1::GetResponse {
                    header: self.header(revision),
                    kv: kv.map(kv_to_proto),
                })
            })
            .await
    }

    /// `Kv/Delete`.
    pub async fn handle_delete(&self, r: v1::DeleteRequest) -> Result<v1::DeleteResponse, Status> {
        self.gate
            .observe("Kv/Delete", async {
                let cmd = Command::Delete { key: r.key.to_vec() };
                match self.consensus.propose(cmd).await? {
                    Response::Delete { revision, prev } => Ok(v1::DeleteResponse {
                        header: self.header(revision),
                        prev_kv: prev.map(kv_to_proto),
                    }),
                    other => Err(unexpected(other)),
                }
            })
            .await
    }

    /// `Kv/Range`.
    pub async fn handle_range(&self, r: v1::RangeRequest) -> Result<v1::RangeResponse, Status> {
        self.gate
            .observe("Kv/Range", async {
                check_bound("prefix", &r.prefix)?;
                check_bound("start_after", &r.start_after)?;
                if r.limit as usize > MAX_RANGE_LIMIT {
                    return Err(ApiError::invalid(
                        "limit",
                        format!("is {}; the maximum is {MAX_RANGE_LIMIT}", r.limit),
                    ));
                }
                let (kvs, more, revision) = self
                    .consensus
                    .range(&r.prefix, &r.start_after, r.limit as usize, consistency(r.consistency)?)
                    .await?;
                Ok(v1::RangeResponse {
                    header: self.header(revision),
                    kvs: kvs.into_iter().map(kv_to_proto).collect(),
                    more,
                })
            })
            .await
    }

    /// `Kv/Cas`.
    pub async fn handle_cas(&self, r: v1::CasRequest) -> Result<v1::CasResponse, Status> {
        self.gate
            .observe("Kv/Cas", async {
                let cmd = Command::Cas {
                    key: r.key.to_vec(),
                    expected_revision: r.expected_revision,
                    value: r.value.to_vec(),
                };
                match self.consensus.propose(cmd).await? {
                    Response::Cas {
                        revision,
                        succeeded,
                        kv,
                    } => Ok(v1::CasResponse {
                        header: self.header(revision),
                        succeeded,
                        kv: kv.map(kv_to_proto),
                    }),
                    other => Err(unexpected(other)),
                }
            })
            .await
    }
}

#[tonic::async_trait]
impl Kv for KvApi {
    async fn put(&self, request: Request<v1::PutRequest>) -> Result<tonic::Response<v1::PutResponse>, Status> {
        self.handle_put(request.into_inner()).await.map(tonic::Response::new)
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<tonic::Response<v1::GetResponse>, Status> {
        self.handle_get(request.into_inner()).await.map(tonic::Response::new)
    }

    async fn delete(&self, request: Request<v1::DeleteRequest>) -> Result<tonic::Response<v1::DeleteResponse>, Status> {
        self.handle_delete(request.into_inner()).await.map(tonic::Response::new)
    }

    async fn range(&self, request: Request<v1::RangeRequest>) -> Result<tonic::Response<v1::RangeResponse>, Status> {
        self.handle_range(request.into_inner()).await.map(tonic::Response::new)
    }

    async fn cas(&self, request: Request<v1::CasRequest>) -> Result<tonic::Response<v1::CasResponse>, Status> {
        self.handle_cas(request.into_inner()).await.map(tonic::Response::new)
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<v1::WatchRequest>) -> Result<tonic::Response<WatchStream>, Status> {
        self.gate
            .observe("Kv/Watch", async {
                let r = request.into_inner();
                check_bound("prefix", &r.prefix)?;
                let permit = self
                    .watches
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| ApiError::TooManyWatches)?;
                // Subscribe before reading history so no change falls between.
                let updates = self.consensus.subscribe();
                let current = self.consensus.revision()?;
                let next = if r.start_revision == 0 {
                    current + 1
                } else {
                    r.start_revision
                };
                // Fail fast on a compacted start instead of inside the stream.
                self.consensus.history(&r.prefix, next, 1)?;
                if r.require_leader && self.consensus.leader().is_none() {
                    return Err(ApiError::WatchWithoutLeader);
                }
                let (tx, rx) = mpsc::channel(16);
                let consensus = self.consensus.clone();
                let require_leader = r.require_leader;
                let mut stop = self.tasks.stop_signal();
                let started = self.tasks.spawn_transient("watch", async move {
                    let _permit = permit;
                    let pumped = tokio::select! {
                        pumped = pump(consensus, r.prefix.to_vec(), next, updates, require_leader, &tx) => pumped,
                        () = stopped(&mut stop) => Err(ApiError::ShuttingDown),
                    };
                    if let Err(e) = pumped {
                        let _ = tx.send(Err(Status::from(e))).await;
                    }
                });
                if !started {
                    return Err(ApiError::ShuttingDown);
                }
                Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx)) as WatchStream))
            })
            .await
    }
}

/// Feeds a watch stream until the client goes away (or, in the task that
/// runs it, the node stops): history first, then live changes; after a lag, a large apply or a snapshot install it re-reads the
/// history from the next revision it owes the client. With `require_leader`
/// it ends with UNAVAILABLE as soon as the node knows no leader.
async fn pump(
    consensus: Consensus,
    prefix: Vec<u8>,
    mut next: u64,
    mut updates: broadcast::Receiver<Applied>,
    require_leader: bool,
    tx: &mpsc::Sender<Result<v1::WatchResponse, Status>>,
) -> Result<(), ApiError> {
    let header = |revision| header(&consensus, revision);
    let mut raft_metrics = consensus.raft().metrics();
    let mut catch_up = true;
    loop {
        if catch_up {
            loop {
                let evs = consensus.history(&prefix, next, WATCH_BATCH)?;
                let Some(last) = evs.last().map(StateEvent::revision) else {
                    break;
                };
                next = last + 1;
                let msg = v1::WatchResponse {
                    header: header(last),
                    events: evs.into_iter().map(event_to_proto).collect(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
            }
            catch_up = false;
        }
        if require_leader && consensus.leader().is_none() {
            return Err(ApiError::WatchWithoutLeader);
        }
        let update = tokio::select! {
            u = updates.recv() => u,
            () = tx.closed() => return Ok(()),
            changed = raft_metrics.changed(), if require_leader => {
                if changed.is_err() {
                    return Err(ApiError::ShuttingDown);
                }
                continue;
            }
        };
        match update {
            Ok(Applied::Events(evs)) => {
                let last = evs.last().map(StateEvent::revision);
                let matching: Vec<v1::Event> = evs
                    .iter()
                    .filter(|e| e.revision() >= next && e.kv.key.starts_with(&prefix))
                    .cloned()
                    .map(event_to_proto)
                    .collect();
                if let Some(last) = last {
                    next = next.max(last + 1);
                }
                if !matching.is_empty() {
                    let msg = v1::WatchResponse {
                        header: header(last.unwrap_or(0)),
                        events: matching,
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(Applied::Reset { .. } | Applied::Resync { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => {
                catch_up = true
            }
            Err(broadcast::error::RecvError::Closed) => {
                return Err(ApiError::ShuttingDown);
            }
        }
    }
}
