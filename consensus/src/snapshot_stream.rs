//! Snapshot transfer in one streaming call (`StreamSnapshot`).
//!
//! openraft's default transfer sends a snapshot as a sequence of
//! InstallSnapshot calls, one chunk each, waiting for every reply (and
//! sleeping a millisecond) before reading the next chunk: the sender's disk,
//! the link and the receiver's disk take turns. Here the leader opens one
//! client-streaming call whose first message offers the snapshot
//! ([`SnapshotOffer`]: leader vote, snapshot meta, size) and whose later
//! messages carry the file's bytes in order; HTTP/2 flow control keeps up to
//! a stream window in flight, so reading, sending and writing overlap. The
//! receiver writes the bytes into a file from `begin_receiving_snapshot`
//! (the store loads its rows into staging as they arrive, see
//! `cell0_storage`'s preload), checks that exactly the offered size arrived,
//! and hands the file to `install_full_snapshot`, which checks the vote and
//! installs it (the file's own checksum is verified while it loads); the
//! reply carries the receiver's vote once the snapshot is installed.
//!
//! Invariants:
//! - A transfer that breaks off (sender gone, short or long stream, read
//!   error) installs nothing, and its partial file is removed.
//! - A sender that makes no progress for the RPC timeout (the receiver stopped
//!   reading) gives up with a timeout; openraft retries later.
//! - A receiver without the call (an older build answers UNIMPLEMENTED) is
//!   sent the same snapshot in InstallSnapshot chunks instead.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_proto::internal::RaftMessage;
use cell0_storage::SnapshotFile;
use futures::StreamExt;
use openraft::error::{Fatal, NetworkError, RemoteError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::SnapshotResponse;
use openraft::{RPCTypes, Snapshot, SnapshotMeta, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncSeekExt;
use tonic::Status;

use crate::network::{AnyErr, PeerNetwork, decode, encode};
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// The first message of a `StreamSnapshot` call. Frozen-variant rule: the
/// variant index is its version; a change adds a variant.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum SnapshotOffer {
    /// A whole snapshot file of `bytes` bytes follows.
    Whole {
        /// The sending leader's vote.
        vote: Vote<NodeId>,
        /// What the snapshot holds.
        meta: SnapshotMeta<NodeId, NodeInfo>,
        /// Size of the file, in bytes.
        bytes: u64,
    },
}

/// The answer of a `StreamSnapshot` call, as openraft's
/// `install_full_snapshot` gives it.
type InstallResult = Result<SnapshotResponse<NodeId>, Fatal<NodeId>>;

type SendResult = Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>>;

/// Why a streaming send did not deliver the snapshot.
pub(crate) enum SendFailure {
    /// The receiver lacks the call: send it in chunks instead.
    Unsupported,
    /// Any other failure, as openraft's replication takes it.
    Failed(Box<StreamingError<TypeConfig, Fatal<NodeId>>>),
}

impl<E: Into<StreamingError<TypeConfig, Fatal<NodeId>>>> From<E> for SendFailure {
    fn from(e: E) -> Self {
        SendFailure::Failed(Box::new(e.into()))
    }
}

fn read_error(meta: &SnapshotMeta<NodeId, NodeInfo>, e: &dyn std::error::Error) -> StorageError<NodeId> {
    StorageError::from(StorageIOError::read_snapshot(
        Some(meta.signature()),
        &AnyErr(e.to_string()),
    ))
}

/// Sends `snapshot` to the peer of `net` in one streaming call; the snapshot
/// file is reopened from its path when the peer needs chunks instead.
pub(crate) async fn send(
    net: &mut PeerNetwork,
    vote: Vote<NodeId>,
    snapshot: Snapshot<TypeConfig>,
    cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
    option: RPCOption,
) -> SendResult {
    let mut cancel = Box::pin(cancel);
    let meta = snapshot.meta.clone();
    let path = snapshot.snapshot.path().to_path_buf();
    match stream(net, vote, snapshot, cancel.as_mut(), &option).await {
        Ok(response) => Ok(response),
        Err(SendFailure::Failed(e)) => Err(*e),
        Err(SendFailure::Unsupported) => {
            use openraft::network::snapshot_transport::{Chunked, SnapshotTransport};
            tracing::info!(
                target_node = net.target(),
                "peer lacks StreamSnapshot; sending snapshot chunks"
            );
            let file = SnapshotFile::open(&path)
                .await
                .map_err(|e| StreamingError::StorageError(read_error(&meta, &e)))?;
            let snapshot = Snapshot {
                meta,
                snapshot: Box::new(file),
            };
            Chunked::send_snapshot(net, vote, snapshot, cancel, option).await
        }
    }
}

async fn stream(
    net: &mut PeerNetwork,
    vote: Vote<NodeId>,
    snapshot: Snapshot<TypeConfig>,
    cancel: std::pin::Pin<&mut (impl std::future::Future<Output = ReplicationClosed> + Send)>,
    option: &RPCOption,
) -> Result<SnapshotResponse<NodeId>, SendFailure> {
    let Snapshot {
        meta,
        snapshot: mut file,
    } = snapshot;
    let net_err = |e: &dyn std::error::Error| SendFailure::from(NetworkError::new(&AnyErr(e.to_string())));
    let bytes = file.seek(SeekFrom::End(0)).await.map_err(|e| read_error(&meta, &e))?;
    let offer = encode(&SnapshotOffer::Whole {
        vote,
        meta: meta.clone(),
        bytes,
    })
    .map_err(|e| net_err(&e))?;
    let first = net.identity().stamp(offer, net.target());
    let chunk = option.snapshot_chunk_size().unwrap_or(DEFAULT_CHUNK_BYTES).max(1) as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    let body = FileChunks {
        file,
        remaining: bytes,
        chunk,
        sent: sent.clone(),
        failed: failed.clone(),
    };
    let body = futures::stream::once(async move { first }).chain(futures::stream::unfold(body, FileChunks::next));

    let mut client = net.client().map_err(|e| net_err(&e))?;
    let ttl = option.hard_ttl();
    let started = std::time::Instant::now();
    let reply = tokio::select! {
        reply = client.stream_snapshot(tonic::Request::new(body)) => reply,
        closed = cancel => return Err(StreamingError::Closed(closed).into()),
        () = stalled(&sent, bytes, ttl) => {
            return Err(StreamingError::Timeout(Timeout {
                action: RPCTypes::InstallSnapshot,
                id: net.identity().node,
                target: net.target(),
                timeout: ttl,
            })
            .into());
        }
    };
    if let Some(e) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(StreamingError::StorageError(read_error(&meta, &e)).into());
    }
    let reply = match reply {
        Ok(r) => r.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => return Err(SendFailure::Unsupported),
        Err(status) if status.code() == tonic::Code::Unavailable => {
            return Err(StreamingError::Unreachable(Unreachable::new(&AnyErr(status.to_string()))).into());
        }
        Err(status) => return Err(net_err(&status)),
    };
    let result: InstallResult = decode(&reply).map_err(|e| net_err(&e))?;
    net.record_reply();
    let response = result.map_err(|fatal| StreamingError::RemoteError(RemoteError::new(net.target(), fatal)))?;
    let elapsed = started.elapsed();
    tracing::info!(
        snapshot = %meta.snapshot_id,
        target_node = net.target(),
        bytes,
        elapsed_ms = elapsed.as_millis() as u64,
        "sent snapshot"
    );
    Ok(response)
}

/// Chunk size when openraft names none (it always does for snapshots).
const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

/// Completes once no byte was handed to the transport for `ttl` while bytes
/// remained to send; never once all `total` bytes went (the receiver then
/// installs, which takes as long as it takes).
async fn stalled(sent: &AtomicU64, total: u64, ttl: Duration) {
    let mut last = sent.load(Ordering::Acquire);
    loop {
        tokio::time::sleep(ttl).await;
        let now = sent.load(Ordering::Acquire);
        if now >= total {
            std::future::pending::<()>().await;
        }
        if now == last {
            return;
        }
        last = now;
    }
}

/// The body of a streaming send: the snapshot file in chunks.
struct FileChunks {
    file: Box<SnapshotFile>,
    remaining: u64,
    chunk: u64,
    /// Bytes handed to the transport so far.
    sent: Arc<AtomicU64>,
    /// A read error that ended the stream early.
    failed: Arc<Mutex<Option<std::io::Error>>>,
}

impl FileChunks {
    async fn next(mut self) -> Option<(RaftMessage, Self)> {
        if self.remaining == 0 {
            return None;
        }
        let want = self.remaining.min(self.chunk);
        let offset = self.sent.load(Ordering::Acquire);
        match self.file.read_at(offset, want as usize).await {
            Ok(data) => {
                self.remaining -= want;
                self.sent.fetch_add(want, Ordering::AcqRel);
                let message = RaftMessage {
                    data: data.into(),
                    ..Default::default()
                };
                Some((message, self))
            }
            Err(e) => {
                // Ending the stream short makes the receiver refuse it.
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                None
            }
        }
    }
}

/// Receives a `StreamSnapshot` call into a file and installs it through
/// `raft`; the partial file of a failed transfer is removed.
pub(crate) async fn receive(
    raft: &openraft::Raft<TypeConfig>,
    identity: &crate::network::WireIdentity,
    mut stream: tonic::Streaming<RaftMessage>,
) -> Result<InstallResult, Status> {
    let Some(first) = stream.message().await? else {
        return Err(Status::invalid_argument("snapshot stream: no offer"));
    };
    identity.check(&first)?;
    let SnapshotOffer::Whole { vote, meta, bytes } =
        decode(&first).map_err(|e| Status::invalid_argument(format!("malformed snapshot offer: {e}")))?;
    let mut file = raft
        .begin_receiving_snapshot()
        .await
        .map_err(|e| Status::internal(format!("cannot receive a snapshot: {e}")))?;
    let incoming = IncomingFile(file.path().to_path_buf());
    let mut received = 0u64;
    while let Some(message) = stream.message().await? {
        received += message.data.len() as u64;
        if received > bytes {
            return Err(Status::invalid_argument(format!(
                "snapshot stream: more than the offered {bytes} bytes"
            )));
        }
        file.append(message.data)
            .await
            .map_err(|e| Status::internal(format!("writing {}: {e}", incoming.0.display())))?;
    }
    if received != bytes {
        return Err(Status::invalid_argument(format!(
            "snapshot stream: ended after {received} of the offered {bytes} bytes"
        )));
    }
    // A preload reading behind the transfer finishes with what is there.
    file.finish_writing();
    let snapshot = Snapshot { meta, snapshot: file };
    // Installing moves the file into place; `incoming` removes it otherwise
    // (a stale vote, a snapshot not newer than this node's state).
    Ok(raft.install_full_snapshot(vote, snapshot).await)
}

/// A received file, removed when dropped unless an install moved it away.
struct IncomingFile(PathBuf);

impl Drop for IncomingFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => tracing::info!(file = %self.0.display(), "removed a snapshot file that was not installed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %self.0.display(), error = %e, "cannot remove a snapshot file"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use cell0_proto::internal::raft_client::RaftClient;

    use super::*;
    use crate::testkit::LocalNode;

    /// A `StreamSnapshot` call to `node` offering `offered` bytes and sending
    /// `sent`.
    async fn offer(node: &LocalNode, offered: u64, sent: Vec<Vec<u8>>) -> Status {
        let offer = SnapshotOffer::Whole {
            vote: Vote::new_committed(9, 9),
            meta: SnapshotMeta::default(),
            bytes: offered,
        };
        let mut first = encode(&offer).unwrap();
        first.to_node = node.id();
        let messages = std::iter::once(first).chain(sent.into_iter().map(|data| RaftMessage {
            data: data.into(),
            ..Default::default()
        }));
        let mut client = RaftClient::connect(format!("http://{}", node.addr)).await.unwrap();
        client
            .stream_snapshot(tonic::Request::new(futures::stream::iter(messages)))
            .await
            .expect_err("the transfer is refused")
    }

    fn snapshot_files(node: &LocalNode) -> Vec<String> {
        std::fs::read_dir(node.dir.join(cell0_storage::SNAPSHOT_DIR))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_or_long_transfer_installs_nothing_and_leaves_no_file() {
        let root = tempfile::tempdir().unwrap();
        let node = LocalNode::start(1, root.path().join("n1"), None, crate::ConsensusConfig::default())
            .await
            .unwrap();

        let short = offer(&node, 10, vec![vec![1; 4]]).await;
        assert_eq!(short.code(), tonic::Code::InvalidArgument, "{short}");
        assert!(
            short.message().contains("ended after 4 of the offered 10 bytes"),
            "{short}"
        );

        let long = offer(&node, 3, vec![vec![1; 2], vec![2; 2]]).await;
        assert_eq!(long.code(), tonic::Code::InvalidArgument, "{long}");
        assert!(long.message().contains("more than the offered 3 bytes"), "{long}");

        assert_eq!(snapshot_files(&node), Vec::<String>::new());
        assert_eq!(node.consensus.status().applied_index, 0, "nothing was installed");
        node.stop().await;
    }
}
