//! Request coalescing for embeddings.
//!
//! [`EmbedBatcher`] sits between the node's request handlers and an
//! [`Embedder`]. Concurrent `embed` calls are queued; a single worker task
//! takes the first waiting request, adds every request already queued and
//! keeps collecting until it has `max_batch` texts or `max_wait_ms` has
//! passed (with the default of 0 it does not wait: requests that arrive
//! during a forward pass make up the next batch, like group commit, so a
//! batch grows with load without adding latency at low load), sorts the collected texts
//! by token length (so each forward pass pads little), runs passes of at most
//! `max_batch` texts on the blocking pool, and hands every caller its own
//! vectors in its own order. Limits are checked before queueing, so a bad
//! request fails alone and fast. Each pass's size is recorded in the
//! `cell0_inference_batch_size` histogram (via the `metrics` facade), in
//! [`EmbedBatcher::stats`], and passed to an optional [`BatchObserver`].
//!
//! The worker is not started here: [`EmbedBatcher::new`] returns it as a
//! [`BatchWorker`], and the caller runs [`BatchWorker::run`] on its tokio
//! runtime (the node spawns it into its supervisor). It returns once its
//! [`EmbedBatcher`] has been dropped and the queue is drained.
//!
//! A caller that drops its `embed` future before its texts are embedded
//! has its request skipped: the worker checks each request's reply channel
//! as it takes it from the queue and again before every forward pass, and
//! computes nothing for one whose caller has gone. Skipped requests are
//! counted in `cell0_inference_requests_abandoned_total` and
//! [`BatchStats::abandoned`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::InferenceConfig;
use crate::embedder::{Embedder, ModelInfo, RequestLimits};
use crate::error::{InferenceError, Result};

/// Requests with more text than this are tokenized on the blocking pool.
const INLINE_TOKENIZE_BYTES: usize = 16 * 1024;

/// Name of the histogram of texts per forward pass.
pub const BATCH_SIZE_METRIC: &str = "cell0_inference_batch_size";

/// Name of the counter of requests skipped because their caller had gone.
pub const REQUESTS_ABANDONED_METRIC: &str = "cell0_inference_requests_abandoned_total";

/// Called after every forward pass with its number of texts and padded tokens.
pub trait BatchObserver: Send + Sync {
    /// One forward pass of `texts` texts, the longest `max_tokens` tokens long, has run.
    fn batch_ran(&self, texts: usize, max_tokens: usize);
}

impl<F: Fn(usize, usize) + Send + Sync> BatchObserver for F {
    fn batch_ran(&self, texts: usize, max_tokens: usize) {
        self(texts, max_tokens)
    }
}

/// Running totals of the batcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Forward passes run.
    pub batches: u64,
    /// Texts embedded.
    pub texts: u64,
    /// Size of the largest pass so far.
    pub max_batch: u64,
    /// Requests skipped (not, or not fully, embedded) because their caller
    /// dropped its future first.
    pub abandoned: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    texts: AtomicU64,
    max_batch: AtomicU64,
    abandoned: AtomicU64,
}

struct Request {
    tokens: Vec<Vec<u32>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

/// Coalesces concurrent embed requests into batched forward passes.
pub struct EmbedBatcher {
    tx: mpsc::Sender<Request>,
    embedder: Arc<dyn Embedder>,
    limits: RequestLimits,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for EmbedBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbedBatcher")
            .field("limits", &self.limits)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl EmbedBatcher {
    /// A batcher and the worker that serves it. Nothing runs until the
    /// caller runs [`BatchWorker::run`] (on a tokio runtime); until then,
    /// requests queue up (up to `queue_capacity`). Fails with
    /// [`InferenceError::InvalidConfig`] when `config` is invalid.
    pub fn new(
        embedder: Arc<dyn Embedder>,
        config: &InferenceConfig,
        observer: Option<Arc<dyn BatchObserver>>,
    ) -> Result<(Self, BatchWorker)> {
        config.validate()?;
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let counters = Arc::new(Counters::default());
        let worker = BatchWorker {
            rx,
            embedder: embedder.clone(),
            max_batch: config.max_batch,
            max_wait: Duration::from_millis(config.max_wait_ms),
            counters: counters.clone(),
            observer,
        };
        let batcher = Self {
            tx,
            embedder,
            limits: RequestLimits::from_config(config),
            counters,
        };
        Ok((batcher, worker))
    }

    /// The model behind the batcher.
    pub fn model_info(&self) -> ModelInfo {
        self.embedder.model_info()
    }

    /// Embeds `texts`, sharing forward passes with concurrent callers. Fails
    /// with an error naming `texts` or `texts[i]` when over the limits.
    pub async fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        self.limits.check(texts)?;
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let bytes: usize = texts.iter().map(|t| t.as_ref().len()).sum();
        let tokens = if bytes <= INLINE_TOKENIZE_BYTES {
            let refs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
            self.embedder.tokenize(&refs)?
        } else {
            // Large requests would stall this runtime worker; tokenize on the blocking pool.
            let owned: Vec<String> = texts.iter().map(|t| t.as_ref().to_owned()).collect();
            let embedder = self.embedder.clone();
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
                embedder.tokenize(&refs)
            })
            .await
            .map_err(|e| InferenceError::Tokenizer(format!("tokenizer task failed: {e}")))??
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { tokens, reply })
            .await
            .map_err(|_| InferenceError::BatcherClosed)?;
        rx.await.map_err(|_| InferenceError::BatcherClosed)?
    }

    /// Totals so far.
    pub fn stats(&self) -> BatchStats {
        BatchStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            texts: self.counters.texts.load(Ordering::Relaxed),
            max_batch: self.counters.max_batch.load(Ordering::Relaxed),
            abandoned: self.counters.abandoned.load(Ordering::Relaxed),
        }
    }
}

/// The background task of an [`EmbedBatcher`], returned by
/// [`EmbedBatcher::new`]: it forms the batches and runs the forward passes.
/// Requests are answered only while [`BatchWorker::run`] runs; dropping the
/// worker unrun fails every queued and later request with
/// [`InferenceError::BatcherClosed`].
#[must_use = "the batcher answers nothing until its worker runs"]
pub struct BatchWorker {
    rx: mpsc::Receiver<Request>,
    embedder: Arc<dyn Embedder>,
    max_batch: usize,
    max_wait: Duration,
    counters: Arc<Counters>,
    observer: Option<Arc<dyn BatchObserver>>,
}

impl std::fmt::Debug for BatchWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchWorker")
            .field("max_batch", &self.max_batch)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl BatchWorker {
    /// Serves the batcher's queue: takes the first waiting request and
    /// every one queued behind it, collects more until `max_batch` texts or
    /// `max_wait_ms`, runs the forward passes on the blocking pool and
    /// answers each caller. Returns once its [`EmbedBatcher`] has been
    /// dropped and the queue is empty.
    pub async fn run(mut self) {
        while let Some(first) = self.rx.recv().await {
            // A request whose caller has gone takes no place in a batch.
            if self.abandoned(&first) {
                continue;
            }
            let mut pending = vec![first];
            let mut texts = pending[0].tokens.len();
            let deadline = tokio::time::Instant::now() + self.max_wait;
            while texts < self.max_batch {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(r)) if self.abandoned(&r) => {}
                    Ok(Some(r)) => {
                        texts += r.tokens.len();
                        pending.push(r);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            self.serve(pending).await;
        }
    }

    /// Whether `r`'s caller has dropped its future (so its reply channel is
    /// closed); such a request is counted as abandoned.
    fn abandoned(&self, r: &Request) -> bool {
        if !r.reply.is_closed() {
            return false;
        }
        metrics::counter!(REQUESTS_ABANDONED_METRIC).increment(1);
        self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
        true
    }

    async fn serve(&self, pending: Vec<Request>) {
        // (request, position in request, token count), sorted by length so
        // each pass holds texts of similar length.
        let mut order: Vec<(usize, usize, usize)> = pending
            .iter()
            .enumerate()
            .flat_map(|(r, req)| req.tokens.iter().enumerate().map(move |(i, t)| (r, i, t.len())))
            .collect();
        order.sort_by_key(|&(_, _, len)| len);
        let mut results: Vec<Vec<Option<Vec<f32>>>> = pending.iter().map(|r| vec![None; r.tokens.len()]).collect();
        let mut failed: Vec<Option<String>> = vec![None; pending.len()];
        // Requests whose caller left while the batch waited or ran; their
        // remaining texts are not embedded.
        let mut gone = vec![false; pending.len()];
        for chunk in order.chunks(self.max_batch) {
            for &(r, _, _) in chunk {
                if !gone[r] && self.abandoned(&pending[r]) {
                    gone[r] = true;
                }
            }
            let chunk: Vec<(usize, usize, usize)> = chunk.iter().copied().filter(|&(r, _, _)| !gone[r]).collect();
            if chunk.is_empty() {
                continue;
            }
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&(r, i, _)| pending[r].tokens[i].clone()).collect();
            let longest = chunk.last().map_or(0, |c| c.2);
            let embedder = self.embedder.clone();
            let outcome = tokio::task::spawn_blocking(move || embedder.embed_tokens(&batch))
                .await
                .unwrap_or_else(|e| Err(InferenceError::Backend(format!("forward pass aborted: {e}"))));
            self.record(chunk.len(), longest);
            match outcome {
                Ok(vectors) if vectors.len() == chunk.len() => {
                    for (&(r, i, _), v) in chunk.iter().zip(vectors) {
                        results[r][i] = Some(v);
                    }
                }
                Ok(vectors) => {
                    let msg = format!("backend returned {} vectors for {} texts", vectors.len(), chunk.len());
                    chunk.iter().for_each(|&(r, _, _)| failed[r] = Some(msg.clone()));
                }
                Err(e) => {
                    let msg = e.to_string();
                    chunk.iter().for_each(|&(r, _, _)| failed[r] = Some(msg.clone()));
                }
            }
        }
        for (((req, res), fail), gone) in pending.into_iter().zip(results).zip(failed).zip(gone) {
            if gone {
                continue;
            }
            let reply = match fail {
                Some(msg) => Err(InferenceError::Backend(msg)),
                None => res
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| InferenceError::Backend("a text was not embedded".into())),
            };
            // A caller that gave up (dropped its future) no longer wants the answer.
            let _ = req.reply.send(reply);
        }
    }

    fn record(&self, texts: usize, longest: usize) {
        metrics::histogram!(BATCH_SIZE_METRIC).record(texts as f64);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters.texts.fetch_add(texts as u64, Ordering::Relaxed);
        self.counters.max_batch.fetch_max(texts as u64, Ordering::Relaxed);
        if let Some(o) = &self.observer {
            o.batch_ran(texts, longest);
        }
    }
}
