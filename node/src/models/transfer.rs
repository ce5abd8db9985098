//! Moving blobs between nodes over the internal port.
//!
//! [`BlobService`] serves complete blobs from `offset` on, in
//! [`CHUNK_BYTES`] chunks read on the blocking pool. [`fetch_blob`] pulls one
//! from a peer into the store's resumable partial file and commits it only
//! after its sha256 matches; a peer that stalls, sends too much, or sends
//! bad bytes costs a retry from another holder, never a bad blob.

use std::io::{Read, Seek, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cell0_consensus::is_sha256_hex;
use cell0_consensus::network::ChannelPool;
use cell0_proto::internal::blobs_client::BlobsClient;
use cell0_proto::internal::blobs_server::Blobs;
use cell0_proto::internal::{BlobChunk, FetchBlobRequest};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ModelError;
use super::store::BlobStore;

/// Bytes per streamed chunk, well below the gRPC message limit.
pub const CHUNK_BYTES: usize = 1 << 20;
/// A fetch gives up on a peer that sends nothing for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The internal `Blobs` service.
#[derive(Debug, Clone)]
pub struct BlobService {
    store: Arc<BlobStore>,
}

impl BlobService {
    /// Serves the blobs of `store`.
    pub fn new(store: Arc<BlobStore>) -> Self {
        Self { store }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Blobs for BlobService {
    type FetchStream = ChunkStream;

    async fn fetch(&self, request: Request<FetchBlobRequest>) -> Result<Response<Self::FetchStream>, Status> {
        let req = request.into_inner();
        if !is_sha256_hex(&req.sha256) {
            return Err(Status::invalid_argument("sha256 must be 64 lowercase hex digits"));
        }
        let path = self.store.blob_path(&req.sha256);
        let mut file = std::fs::File::open(&path)
            .map_err(|_| Status::not_found(format!("blob {} is not held by this node", req.sha256)))?;
        file.seek(SeekFrom::Start(req.offset))
            .map_err(|e| Status::internal(format!("seek: {e}")))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                let chunk = match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => Ok(BlobChunk {
                        data: buf[..n].to_vec().into(),
                    }),
                    Err(e) => Err(Status::internal(format!("read: {e}"))),
                };
                let failed = chunk.is_err();
                // A closed channel means the fetcher went away.
                if tx.blocking_send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Fetches blob `sha256` of `size` bytes from the peer at `addr` (its
/// internal port), resuming a partial fetch, and commits it once verified.
/// `progress` sees the bytes held so far after each chunk.
pub async fn fetch_blob(
    store: &Arc<BlobStore>,
    channels: &ChannelPool,
    addr: &str,
    sha256: &str,
    size: u64,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), ModelError> {
    let peer_err = |e: String| ModelError::Peer {
        addr: addr.to_string(),
        detail: e,
    };
    let channel = channels.channel(addr).map_err(|e| peer_err(e.to_string()))?;
    let mut partial = {
        let store = store.clone();
        let sha = sha256.to_string();
        tokio::task::spawn_blocking(move || store.resume_fetch(&sha, size))
            .await
            .map_err(|e| ModelError::Io(e.to_string()))??
    };
    if partial.len() < size {
        let mut stream = BlobsClient::new(channel)
            .fetch(FetchBlobRequest {
                sha256: sha256.to_string(),
                offset: partial.len(),
            })
            .await
            .map_err(|s| peer_err(s.message().to_string()))?
            .into_inner();
        if partial.len() > 0 {
            tracing::info!(sha256, offset = partial.len(), %addr, "resuming a partial fetch");
        }
        loop {
            let next = tokio::time::timeout(STALL_TIMEOUT, stream.next())
                .await
                .map_err(|_| peer_err(format!("sent nothing for {STALL_TIMEOUT:?}")))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|s| peer_err(s.message().to_string()))?;
            if partial.len() + chunk.data.len() as u64 > size {
                // Cannot be the blob: drop what we have so it is not resumed.
                drop(partial);
                store.discard_fetch(sha256)?;
                return Err(peer_err(format!("sent more than the {size} bytes of {sha256}")));
            }
            // Chunks are 1 MiB: writing them inline is cheaper than a hop to
            // the blocking pool, and page-cache writes do not block for long.
            partial.write(&chunk.data)?;
            metrics::counter!("cell0_model_fetch_bytes_total").increment(chunk.data.len() as u64);
            progress(partial.len());
        }
    }
    let store = store.clone();
    let sha = sha256.to_string();
    tokio::task::spawn_blocking(move || store.commit(partial, &sha, size))
        .await
        .map_err(|e| ModelError::Io(e.to_string()))?
}
