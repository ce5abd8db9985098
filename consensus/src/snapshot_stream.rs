//! Snapshot transfer in one streaming call (`StreamSnapshot`).
//!
//! openraft's default transfer sends a snapshot as a sequence of
//! InstallSnapshot calls, one chunk each, waiting for every reply (and
//! sleeping a millisecond) before reading the next chunk: the sender's disk,
//! the link and the receiver's disk take turns. Here the leader opens one
//! client-streaming call whose first message offers the snapshot
//! ([`SnapshotOffer::Streamed`]: leader vote, snapshot meta), whose next
//! messages carry its bytes in order as they are read or built (a live
//! snapshot, see `cell0_storage::live`), and whose last message
//! ([`SnapshotEnd`]) gives the size. HTTP/2 flow control keeps up to a
//! stream window in flight, so building, sending and writing overlap. The
//! receiver writes the bytes into a file from `begin_receiving_snapshot`
//! (the store loads its rows into staging as they arrive, see
//! `cell0_storage`'s preload), checks that the end message came and matches
//! what arrived, and hands the file to `install_full_snapshot`, which checks
//! the vote and installs it (the file's own checksum is verified while it
//! loads); the reply carries the receiver's vote once the snapshot is
//! installed.
//!
//! Invariants:
//! - A transfer that breaks off (sender gone, no end message, a size that
//!   differs from the end or the offer, a read error) installs nothing, and
//!   its partial file is removed.
//! - A sender that makes no progress for the RPC timeout (the receiver stopped
//!   reading) gives up with a timeout; openraft retries later.
//! - Peers of older builds get stored snapshot files only: as a
//!   [`SnapshotOffer::Whole`] when they refuse the streamed offer as
//!   malformed, or in InstallSnapshot chunks when they answer UNIMPLEMENTED.
//!   A live snapshot cannot go either way, so meeting such a peer turns live
//!   snapshots off and fails the send; openraft retries with the stored one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use tonic::Status;

use crate::network::{AnyErr, PeerNetwork, decode, encode};
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// The first message of a `StreamSnapshot` call. Frozen-variant rule: the
/// variant index is its version; a change adds a variant.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum SnapshotOffer {
    /// A whole snapshot file of `bytes` bytes follows (what builds before
    /// [`SnapshotOffer::Streamed`] send and read).
    Whole {
        /// The sending leader's vote.
        vote: Vote<NodeId>,
        /// What the snapshot holds.
        meta: SnapshotMeta<NodeId, NodeInfo>,
        /// Size of the file, in bytes.
        bytes: u64,
    },
    /// A snapshot file follows whose size is known only at its end (a live
    /// snapshot still being written); a [`SnapshotEnd`] message closes it.
    Streamed {
        /// The sending leader's vote.
        vote: Vote<NodeId>,
        /// What the snapshot holds.
        meta: SnapshotMeta<NodeId, NodeInfo>,
    },
}

/// The last message of a [`SnapshotOffer::Streamed`] transfer, in the
/// message payload (file bytes travel in `data`). Frozen-variant rule.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum SnapshotEnd {
    /// The file is complete at `bytes` bytes.
    Complete {
        /// Size of the file, in bytes.
        bytes: u64,
    },
}

/// The answer of a `StreamSnapshot` call, as openraft's
/// `install_full_snapshot` gives it.
type InstallResult = Result<SnapshotResponse<NodeId>, Fatal<NodeId>>;

type SendResult = Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>>;

/// How the bytes of one transfer are framed.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// [`SnapshotOffer::Streamed`], closed by [`SnapshotEnd`].
    Streamed,
    /// [`SnapshotOffer::Whole`] of a complete file of `bytes` bytes.
    Whole { bytes: u64 },
}

/// Why a streaming send did not deliver the snapshot.
pub(crate) enum SendFailure {
    /// The receiver lacks the call: send it in chunks instead.
    Unsupported,
    /// The receiver reads only [`SnapshotOffer::Whole`] (a build before
    /// [`SnapshotOffer::Streamed`], which answers that the offer is
    /// malformed): send the complete file that way.
    WholeOnly,
    /// Any other failure, as openraft's replication takes it.
    Failed(Box<StreamingError<TypeConfig, Fatal<NodeId>>>),
}

impl<E: Into<StreamingError<TypeConfig, Fatal<NodeId>>>> From<E> for SendFailure {
    fn from(e: E) -> Self {
        SendFailure::Failed(Box::new(e.into()))
    }
}

/// How a receiver refuses an offer it cannot decode (the start of the
/// message is what builds before [`SnapshotOffer::Streamed`] answer too).
const MALFORMED_OFFER: &str = "malformed snapshot offer";

fn read_error(meta: &SnapshotMeta<NodeId, NodeInfo>, e: &dyn std::error::Error) -> StorageError<NodeId> {
    StorageError::from(StorageIOError::read_snapshot(
        Some(meta.signature()),
        &AnyErr(e.to_string()),
    ))
}

/// Sends `snapshot` to the peer of `net` in one streaming call, as it is
/// built if it is live. A peer of an older build gets a stored snapshot
/// file as a whole offer, or in chunks; a live snapshot cannot be sent that
/// way (its size is known only at its end, and it is read once), so the
/// send fails and live snapshots are turned off: openraft's retry gets the
/// stored file.
pub(crate) async fn send(
    net: &mut PeerNetwork,
    vote: Vote<NodeId>,
    snapshot: Snapshot<TypeConfig>,
    cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
    option: RPCOption,
) -> SendResult {
    let mut cancel = Box::pin(cancel);
    let Snapshot { meta, snapshot: file } = snapshot;
    let file: Arc<SnapshotFile> = Arc::from(file);
    let storage_err = |e: &std::io::Error| StreamingError::StorageError(read_error(&meta, e));
    let mut framing = Framing::Streamed;
    loop {
        let failure = match stream(net, vote, &meta, file.clone(), framing, cancel.as_mut(), &option).await {
            Ok(response) => return Ok(response),
            Err(SendFailure::Failed(e)) => return Err(*e),
            Err(old_peer) if file.is_live() => {
                tracing::warn!(
                    target_node = net.target(),
                    "peer runs an older build that cannot take a live snapshot; sending stored snapshots from now on"
                );
                net.live_snapshots().disable();
                return Err(StreamingError::Network(NetworkError::new(&AnyErr(format!(
                    "node {} cannot take a live snapshot ({})",
                    net.target(),
                    old_peer.describe()
                )))));
            }
            Err(old_peer) => old_peer,
        };
        match failure {
            SendFailure::WholeOnly if matches!(framing, Framing::Streamed) => {
                tracing::info!(
                    target_node = net.target(),
                    "peer reads only whole snapshot offers; sending the file that way"
                );
                let bytes = file.size().await.map_err(|e| storage_err(&e))?;
                framing = Framing::Whole { bytes };
            }
            SendFailure::Unsupported => {
                use openraft::network::snapshot_transport::{Chunked, SnapshotTransport};
                tracing::info!(
                    target_node = net.target(),
                    "peer lacks StreamSnapshot; sending snapshot chunks"
                );
                let chunked = SnapshotFile::open(file.path())
                    .await
                    .map_err(|e| StreamingError::StorageError(read_error(&meta, &e)))?;
                let snapshot = Snapshot {
                    meta,
                    snapshot: Box::new(chunked),
                };
                return Chunked::send_snapshot(net, vote, snapshot, cancel, option).await;
            }
            other => {
                return Err(StreamingError::Network(NetworkError::new(&AnyErr(format!(
                    "node {} refused the snapshot offer ({})",
                    net.target(),
                    other.describe()
                )))));
            }
        }
    }
}

impl SendFailure {
    fn describe(&self) -> &'static str {
        match self {
            SendFailure::Unsupported => "it lacks StreamSnapshot",
            SendFailure::WholeOnly => "it reads only whole offers",
            SendFailure::Failed(_) => "the transfer failed",
        }
    }
}

async fn stream(
    net: &mut PeerNetwork,
    vote: Vote<NodeId>,
    meta: &SnapshotMeta<NodeId, NodeInfo>,
    file: Arc<SnapshotFile>,
    framing: Framing,
    cancel: std::pin::Pin<&mut (impl std::future::Future<Output = ReplicationClosed> + Send)>,
    option: &RPCOption,
) -> Result<SnapshotResponse<NodeId>, SendFailure> {
    let net_err = |e: &dyn std::error::Error| SendFailure::from(NetworkError::new(&AnyErr(e.to_string())));
    let offer = match framing {
        Framing::Streamed => SnapshotOffer::Streamed {
            vote,
            meta: meta.clone(),
        },
        Framing::Whole { bytes } => SnapshotOffer::Whole {
            vote,
            meta: meta.clone(),
            bytes,
        },
    };
    let first = net
        .identity()
        .stamp(encode(&offer).map_err(|e| net_err(&e))?, net.target());
    let chunk = option.snapshot_chunk_size().unwrap_or(DEFAULT_CHUNK_BYTES).max(1);
    let progress = Arc::new(Progress::default());
    let body = FileChunks {
        file,
        framing,
        chunk,
        progress: progress.clone(),
        failed: Arc::default(),
    };
    let failed = body.failed.clone();
    let body = futures::stream::once(async move { first }).chain(futures::stream::unfold(body, FileChunks::next));

    let mut client = net.client().map_err(|e| net_err(&e))?;
    let ttl = option.hard_ttl();
    let started = std::time::Instant::now();
    let reply = tokio::select! {
        reply = client.stream_snapshot(tonic::Request::new(body)) => reply,
        closed = cancel => return Err(StreamingError::Closed(closed).into()),
        () = stalled(&progress, ttl) => {
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
        return Err(StreamingError::StorageError(read_error(meta, &e)).into());
    }
    let reply = match reply {
        Ok(r) => r.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => return Err(SendFailure::Unsupported),
        Err(status)
            if status.code() == tonic::Code::InvalidArgument && status.message().starts_with(MALFORMED_OFFER) =>
        {
            return Err(SendFailure::WholeOnly);
        }
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
        bytes = progress.sent.load(Ordering::Acquire),
        elapsed_ms = elapsed.as_millis() as u64,
        "sent snapshot"
    );
    Ok(response)
}

/// Chunk size when openraft names none (it always does for snapshots).
const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

/// How far a streaming send got.
#[derive(Debug, Default)]
struct Progress {
    /// File bytes handed to the transport so far.
    sent: AtomicU64,
    /// Every message was handed to the transport.
    done: AtomicBool,
}

/// Completes once no byte was handed to the transport for `ttl` while the
/// body was not done; never once it is (the receiver then installs, which
/// takes as long as it takes).
async fn stalled(progress: &Progress, ttl: Duration) {
    let mut last = progress.sent.load(Ordering::Acquire);
    loop {
        tokio::time::sleep(ttl).await;
        if progress.done.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
        let now = progress.sent.load(Ordering::Acquire);
        if now == last {
            return;
        }
        last = now;
    }
}

/// The body of a streaming send: the snapshot file in chunks, read as it
/// grows when it is live, then the end message if the framing has one.
struct FileChunks {
    file: Arc<SnapshotFile>,
    framing: Framing,
    chunk: usize,
    progress: Arc<Progress>,
    /// A read error that ended the stream early.
    failed: Arc<Mutex<Option<std::io::Error>>>,
}

impl FileChunks {
    async fn next(self) -> Option<(RaftMessage, Self)> {
        if self.progress.done.load(Ordering::Acquire) {
            return None;
        }
        let offset = self.progress.sent.load(Ordering::Acquire);
        match self.file.read_chunk(offset, self.chunk).await {
            Ok(Some(data)) => {
                self.progress.sent.fetch_add(data.len() as u64, Ordering::AcqRel);
                let message = RaftMessage {
                    data: data.into(),
                    ..Default::default()
                };
                Some((message, self))
            }
            Ok(None) => {
                self.progress.done.store(true, Ordering::Release);
                match self.framing {
                    Framing::Whole { .. } => None,
                    Framing::Streamed => match encode(&SnapshotEnd::Complete { bytes: offset }) {
                        Ok(end) => Some((end, self)),
                        Err(e) => {
                            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::io::Error::other(e));
                            None
                        }
                    },
                }
            }
            Err(e) => {
                // Ending the stream without its end (or short of the whole
                // offer) makes the receiver refuse it.
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
    let offer = decode(&first).map_err(|e| Status::invalid_argument(format!("{MALFORMED_OFFER}: {e}")))?;
    let (vote, meta, offered) = match offer {
        SnapshotOffer::Whole { vote, meta, bytes } => (vote, meta, Some(bytes)),
        SnapshotOffer::Streamed { vote, meta } => (vote, meta, None),
    };
    let mut file = raft
        .begin_receiving_snapshot()
        .await
        .map_err(|e| Status::internal(format!("cannot receive a snapshot: {e}")))?;
    let incoming = IncomingFile(file.path().to_path_buf());
    let mut received = 0u64;
    let mut ended = None;
    while let Some(message) = stream.message().await? {
        if ended.is_some() {
            return Err(Status::invalid_argument("snapshot stream: a message after its end"));
        }
        if !message.payload.is_empty() {
            let SnapshotEnd::Complete { bytes } = decode(&message)
                .map_err(|e| Status::invalid_argument(format!("malformed snapshot stream end: {e}")))?;
            ended = Some(bytes);
            continue;
        }
        received += message.data.len() as u64;
        if let Some(bytes) = offered
            && received > bytes
        {
            return Err(Status::invalid_argument(format!(
                "snapshot stream: more than the offered {bytes} bytes"
            )));
        }
        file.append(message.data)
            .await
            .map_err(|e| Status::internal(format!("writing {}: {e}", incoming.0.display())))?;
    }
    match (offered, ended) {
        (Some(bytes), _) if received != bytes => {
            return Err(Status::invalid_argument(format!(
                "snapshot stream: ended after {received} of the offered {bytes} bytes"
            )));
        }
        (None, None) => {
            return Err(Status::invalid_argument(format!(
                "snapshot stream: ended without its end message after {received} bytes"
            )));
        }
        (None, Some(bytes)) if received != bytes => {
            return Err(Status::invalid_argument(format!(
                "snapshot stream: carried {received} bytes but its end message says {bytes}"
            )));
        }
        _ => {}
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
        call(node, &offer, sent, None).await
    }

    /// A streamed `StreamSnapshot` call to `node` sending `sent`, then an
    /// end message saying `end` bytes if there is one.
    async fn stream_of(node: &LocalNode, sent: Vec<Vec<u8>>, end: Option<u64>) -> Status {
        let offer = SnapshotOffer::Streamed {
            vote: Vote::new_committed(9, 9),
            meta: SnapshotMeta::default(),
        };
        call(node, &offer, sent, end).await
    }

    async fn call(node: &LocalNode, offer: &SnapshotOffer, sent: Vec<Vec<u8>>, end: Option<u64>) -> Status {
        let mut first = encode(offer).unwrap();
        first.to_node = node.id();
        let end = end.map(|bytes| encode(&SnapshotEnd::Complete { bytes }).unwrap());
        let messages = std::iter::once(first)
            .chain(sent.into_iter().map(|data| RaftMessage {
                data: data.into(),
                ..Default::default()
            }))
            .chain(end);
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
    async fn a_short_long_or_endless_transfer_installs_nothing_and_leaves_no_file() {
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

        let endless = stream_of(&node, vec![vec![1; 4]], None).await;
        assert_eq!(endless.code(), tonic::Code::InvalidArgument, "{endless}");
        assert!(
            endless
                .message()
                .contains("ended without its end message after 4 bytes"),
            "{endless}"
        );

        let mismatched = stream_of(&node, vec![vec![1; 4]], Some(5)).await;
        assert_eq!(mismatched.code(), tonic::Code::InvalidArgument, "{mismatched}");
        assert!(
            mismatched
                .message()
                .contains("carried 4 bytes but its end message says 5"),
            "{mismatched}"
        );

        assert_eq!(snapshot_files(&node), Vec::<String>::new());
        assert_eq!(node.consensus.status().applied_index, 0, "nothing was installed");
        node.stop().await;
    }
}
