//! The batcher coalesces concurrent requests, keeps each caller's results
//! apart and in order, and enforces the request limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cell0_inference::{
    BackendKind, EmbedBatcher, Embedder, InferenceConfig, InferenceError, ModelInfo, TextEmbedder, cosine,
};

/// A model whose "embedding" of a text is `[first byte, length]`, so results
/// can be traced back to their text.
struct Echo;

impl Embedder for Echo {
    fn model_info(&self) -> ModelInfo {
        ModelInfo {
            name: "echo".into(),
            dim: 2,
            max_tokens: 64,
        }
    }
    fn tokenize(&self, texts: &[&str]) -> cell0_inference::Result<Vec<Vec<u32>>> {
        Ok(texts.iter().map(|t| t.bytes().map(u32::from).collect()).collect())
    }
    fn embed_tokens(&self, batch: &[Vec<u32>]) -> cell0_inference::Result<Vec<Vec<f32>>> {
        Ok(batch
            .iter()
            .map(|t| vec![t.first().copied().unwrap_or(0) as f32, t.len() as f32])
            .collect())
    }
}

/// A batcher over `embedder` whose worker runs as a task of the current runtime.
fn start(
    embedder: Arc<dyn Embedder>,
    config: &InferenceConfig,
    observer: Option<Arc<dyn cell0_inference::BatchObserver>>,
) -> EmbedBatcher {
    let (batcher, worker) = EmbedBatcher::new(embedder, config, observer).expect("new");
    tokio::spawn(worker.run());
    batcher
}

fn config(max_batch: usize, max_wait_ms: u64) -> InferenceConfig {
    InferenceConfig {
        max_batch,
        max_wait_ms,
        max_texts_per_request: 8,
        max_text_bytes: 16,
        ..InferenceConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_batches() {
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = sizes.clone();
    let observer: Arc<dyn cell0_inference::BatchObserver> = Arc::new(move |texts: usize, _tokens: usize| {
        seen.lock().expect("lock").push(texts);
    });
    // The wait bound is far above scheduling noise, so batches close only by filling up.
    let b = Arc::new(start(Arc::new(Echo), &config(4, 10_000), Some(observer)));
    let tasks: Vec<_> = (0..8u8)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move {
                let text = format!("{}{}", (b'a' + i) as char, "x".repeat(i as usize));
                (i, b.embed(&[text]).await)
            })
        })
        .collect();
    for t in tasks {
        let (i, r) = t.await.expect("task");
        let v = r.expect("embed");
        assert_eq!(
            v,
            vec![vec![(b'a' + i) as f32, (i + 1) as f32]],
            "caller {i} got its own vector"
        );
    }
    let stats = b.stats();
    assert_eq!(stats.texts, 8);
    assert_eq!(stats.batches, 2);
    assert_eq!(stats.max_batch, 4);
    assert_eq!(*sizes.lock().expect("lock"), vec![4, 4]);
}

#[tokio::test]
async fn a_lone_request_runs_after_the_wait() {
    let b = start(Arc::new(Echo), &config(32, 1), None);
    let v = b.embed(&["abc", "z", ""]).await.expect("embed");
    assert_eq!(v, vec![vec![97.0, 3.0], vec![122.0, 1.0], vec![0.0, 0.0]], "order kept");
    assert_eq!(b.stats().batches, 1);
    assert!(b.embed::<&str>(&[]).await.expect("empty").is_empty());
}

#[tokio::test]
async fn large_requests_are_split_into_passes() {
    let b = start(Arc::new(Echo), &config(3, 1), None);
    let texts: Vec<String> = (0..8).map(|i| "q".repeat(i + 1)).collect();
    let v = b.embed(&texts).await.expect("embed");
    let lens: Vec<f32> = v.iter().map(|x| x[1]).collect();
    assert_eq!(lens, (1..=8).map(|x| x as f32).collect::<Vec<_>>());
    assert_eq!(b.stats().batches, 3);
}

#[tokio::test]
async fn limits_name_the_field() {
    let b = start(Arc::new(Echo), &config(4, 1), None);
    let too_many = vec!["a"; 9];
    match b.embed(&too_many).await {
        Err(InferenceError::InvalidRequest { field, .. }) => assert_eq!(field, "texts"),
        other => panic!("expected texts error, got {other:?}"),
    }
    let texts = ["ok", "ok", "ok", "this text is longer than sixteen bytes"];
    match b.embed(&texts).await {
        Err(e @ InferenceError::InvalidRequest { .. }) => {
            assert!(e.to_string().contains("texts[3]"), "{e}")
        }
        other => panic!("expected texts[3] error, got {other:?}"),
    }
    assert_eq!(b.stats().batches, 0, "rejected requests never reach the model");
}

#[tokio::test]
async fn backend_errors_reach_every_caller_in_the_batch() {
    struct Failing(AtomicUsize);
    impl Embedder for Failing {
        fn model_info(&self) -> ModelInfo {
            Echo.model_info()
        }
        fn tokenize(&self, texts: &[&str]) -> cell0_inference::Result<Vec<Vec<u32>>> {
            Echo.tokenize(texts)
        }
        fn embed_tokens(&self, _: &[Vec<u32>]) -> cell0_inference::Result<Vec<Vec<f32>>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Err(InferenceError::Backend("device lost".into()))
        }
    }
    let b = start(Arc::new(Failing(AtomicUsize::new(0))), &config(4, 1), None);
    let err = b.embed(&["a"]).await.expect_err("must fail");
    assert!(err.to_string().contains("device lost"), "{err}");
}

#[test]
fn requests_wait_for_the_worker_which_returns_when_the_batcher_is_dropped() {
    // Building the batcher needs no runtime: only its worker runs on one.
    let (b, worker) = EmbedBatcher::new(Arc::new(Echo), &config(4, 1), None).expect("new outside a runtime");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Queued before the worker runs, answered once it does.
        let pending = queue_once(b.embed(&["a"]));
        let run = tokio::spawn(worker.run());
        assert_eq!(pending.await.expect("a"), vec![vec![97.0, 1.0]]);
        assert_eq!(b.stats().batches, 1);
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(10), run)
            .await
            .expect("the worker returns once its batcher is dropped")
            .expect("the worker did not panic");
    });
}

#[tokio::test]
async fn a_batcher_whose_worker_is_dropped_is_closed() {
    let (b, worker) = EmbedBatcher::new(Arc::new(Echo), &config(4, 1), None).expect("new");
    drop(worker);
    match b.embed(&["a"]).await {
        Err(InferenceError::BatcherClosed) => {}
        other => panic!("expected BatcherClosed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_through_the_batcher() {
    let cfg = common::config(BackendKind::Cpu);
    let model = Arc::new(TextEmbedder::load(&common::source(), &cfg).expect("load"));
    let direct = model.embed(&["hello world", "", "   \t "]).expect("direct");
    let b = Arc::new(start(model.clone(), &cfg, None));
    let (x, y) = tokio::join!(b.embed(&["hello world"]), b.embed(&["", "   \t "]));
    let x = x.expect("x");
    let y = y.expect("y");
    assert!(cosine(&x[0], &direct[0]) > 0.99999);
    // Empty and whitespace-only texts both embed as "[CLS][SEP]".
    let cls_sep = model.embed_tokens(&[vec![101, 102]]).expect("cls sep");
    for v in &y {
        assert!(cosine(v, &cls_sep[0]) > 0.99999);
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    assert_eq!(b.model_info().dim, 384);
    // A request large enough to be tokenized off the runtime thread.
    let long = "hello world ".repeat(2000);
    let big = b.embed(&[long.as_str(), "hello world"]).await.expect("big request");
    assert!(cosine(&big[1], &direct[0]) > 0.99999);
}

/// An [`Echo`] whose forward passes report their texts on `seen` and then
/// wait for a permit on `permits`, so a test holds the worker inside a pass.
struct Gated {
    seen: tokio::sync::mpsc::UnboundedSender<Vec<String>>,
    permits: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Embedder for Gated {
    fn model_info(&self) -> ModelInfo {
        Echo.model_info()
    }
    fn tokenize(&self, texts: &[&str]) -> cell0_inference::Result<Vec<Vec<u32>>> {
        Echo.tokenize(texts)
    }
    fn embed_tokens(&self, batch: &[Vec<u32>]) -> cell0_inference::Result<Vec<Vec<f32>>> {
        let texts = batch
            .iter()
            .map(|t| t.iter().map(|&b| char::from(b as u8)).collect())
            .collect();
        let _ = self.seen.send(texts);
        let permits = self
            .permits
            .lock()
            .map_err(|_| InferenceError::Backend("permits lock poisoned".into()))?;
        permits
            .recv()
            .map_err(|_| InferenceError::Backend("the test dropped its permits".into()))?;
        Echo.embed_tokens(batch)
    }
}

type Seen = tokio::sync::mpsc::UnboundedReceiver<Vec<String>>;

fn gated(max_batch: usize) -> (Arc<EmbedBatcher>, Seen, std::sync::mpsc::Sender<()>) {
    let (seen, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let (permit, permits) = std::sync::mpsc::channel();
    let model = Gated {
        seen,
        permits: std::sync::Mutex::new(permits),
    };
    let b = start(Arc::new(model), &config(max_batch, 0), None);
    (Arc::new(b), seen_rx, permit)
}

/// Polls an `embed` future once. Its first poll tokenizes, queues the
/// request (the queue has room) and then waits for the reply, so `Pending`
/// means the request is in the queue. Unconstrained: tokio's cooperative
/// budget cannot make that poll stop early.
fn queue_once<F: std::future::Future>(fut: F) -> std::pin::Pin<Box<tokio::task::Unconstrained<F>>> {
    let mut fut = Box::pin(tokio::task::unconstrained(fut));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(
        fut.as_mut().poll(&mut cx).is_pending(),
        "the request waits for its reply"
    );
    fut
}

/// Counts the `metrics` counters incremented on this thread, by name.
#[derive(Default)]
struct CounterRecorder(std::sync::Mutex<std::collections::HashMap<String, Arc<std::sync::atomic::AtomicU64>>>);

struct CounterCell(Arc<std::sync::atomic::AtomicU64>);

impl metrics::CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl CounterRecorder {
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .expect("lock")
            .get(name)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl metrics::Recorder for CounterRecorder {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let cell = self
            .0
            .lock()
            .expect("lock")
            .entry(key.name().to_string())
            .or_default()
            .clone();
        metrics::Counter::from_arc(Arc::new(CounterCell(cell)))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

// A current-thread runtime: the worker task, and so its metrics, run on
// this thread, where the local recorder is installed.
#[tokio::test(flavor = "current_thread")]
async fn requests_whose_callers_left_before_their_batch_are_not_computed() {
    let recorder = CounterRecorder::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let (b, mut seen, permit) = gated(4);
    // The worker takes "a" and blocks inside its forward pass.
    let first = tokio::spawn({
        let b = b.clone();
        async move { b.embed(&["a"]).await }
    });
    assert_eq!(seen.recv().await.expect("pass"), vec!["a"]);
    // Meanwhile two requests are queued and their callers give up.
    drop(queue_once(b.embed(&["bb"])));
    drop(queue_once(b.embed(&["ccc", "c"])));
    // A caller that stays, queued behind them; then the pass of "a" ends.
    let last = queue_once(b.embed(&["d"]));
    permit.send(()).expect("permit a");
    permit.send(()).expect("permit d");
    // The queue is served in order: once "d" is answered, "bb" and "ccc"
    // have been taken from it.
    assert_eq!(last.await.expect("d"), vec![vec![100.0, 1.0]]);
    assert_eq!(first.await.expect("task").expect("a"), vec![vec![97.0, 1.0]]);
    assert_eq!(seen.recv().await.expect("pass"), vec!["d"], "only the live request ran");
    assert!(seen.try_recv().is_err(), "no pass for the abandoned requests");
    let stats = b.stats();
    assert_eq!(stats.abandoned, 2);
    assert_eq!((stats.batches, stats.texts), (2, 2));
    assert_eq!(recorder.get(cell0_inference::REQUESTS_ABANDONED_METRIC), 2);
    assert_eq!(
        cell0_inference::REQUESTS_ABANDONED_METRIC,
        "cell0_inference_requests_abandoned_total"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_abandoned_between_its_passes_gets_no_more_passes() {
    let (b, mut seen, permit) = gated(1);
    // Two texts, one per pass; the caller leaves during the first pass.
    let request = tokio::spawn({
        let b = b.clone();
        async move { b.embed(&["x1", "x2"]).await }
    });
    assert_eq!(seen.recv().await.expect("pass"), vec!["x1"]);
    request.abort();
    assert!(request.await.expect_err("aborted").is_cancelled());
    permit.send(()).expect("permit x1");
    permit.send(()).expect("permit y");
    assert_eq!(b.embed(&["y"]).await.expect("y"), vec![vec![121.0, 1.0]]);
    assert_eq!(seen.recv().await.expect("pass"), vec!["y"], "x2 was not embedded");
    let stats = b.stats();
    assert_eq!(stats.abandoned, 1);
    assert_eq!((stats.batches, stats.texts), (2, 2));
}
