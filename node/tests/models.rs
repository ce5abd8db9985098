//! End-to-end tests of the model registry and the Inference API: real
//! processes on loopback, the model files moving only between the nodes.
//!
//! They need the model fetched by `scripts/fetch-model.sh` (scripts/test.sh
//! runs it first).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cell0_proto::v1;
use cell0_proto::v1::inference_client::InferenceClient;
use cell0_proto::v1::models_client::ModelsClient;
use common::*;
use sha2::{Digest, Sha256};
use tonic_types::StatusExt;

/// This crate's directory. The runner's `CARGO_MANIFEST_DIR` comes first: a
/// test binary reused from a build in another checkout (one target dir for
/// several clones) still looks in the checkout it runs in.
fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn model_dir() -> PathBuf {
    crate_dir().join("../models/all-minilm-l6-v2")
}

struct Reference {
    text: String,
    embedding: Vec<f32>,
}

/// The sentence-transformers reference embeddings of the inference crate's tests.
fn references() -> Vec<Reference> {
    let path = crate_dir().join("inference/tests/data/reference.json");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Reference {
            text: c["text"].as_str().unwrap().to_string(),
            embedding: c["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let dot: f32 = got.iter().zip(want).map(|(a, b)| a * b).sum();
    let max_diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(
        dot >= 0.99999 && max_diff <= 1e-4,
        "{what}: cosine {dot}, max diff {max_diff}"
    );
}

async fn embed(endpoint: &str, texts: &[&str]) -> Result<v1::EmbedResponse, tonic::Status> {
    InferenceClient::new(channel(endpoint).await)
        .embed(v1::EmbedRequest {
            texts: texts.iter().map(|t| t.to_string()).collect(),
            model: String::new(),
            version: 0,
        })
        .await
        .map(|r| r.into_inner())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The stable reason of a status from a node (its `ErrorInfo`, domain `cell0`).
fn reason(s: &tonic::Status) -> String {
    let info = s
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {s:?}"));
    assert_eq!(info.domain, "cell0", "{s:?}");
    info.reason
}

/// The field an INVALID_ARGUMENT_FIELD status names.
fn field(s: &tonic::Status) -> String {
    assert_eq!(reason(s), "INVALID_ARGUMENT_FIELD", "{s:?}");
    s.get_details_error_info()
        .and_then(|i| i.metadata.get("field").cloned())
        .unwrap_or_else(|| panic!("no field in {s:?}"))
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "CLI failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", stdout(o)))
}

/// Polls `cond` every 100 ms until it holds, failing with `what` at the deadline.
async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, deadline: Duration, mut cond: F) {
    let end = Instant::now() + deadline;
    while !cond().await {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `cell0 model add DIR --name minilm --version V` through `endpoint`, JSON output.
fn add_minilm(dir: &std::path::Path, version: u32, endpoint: &str) -> std::process::Output {
    cli(&[
        "model",
        "add",
        dir.to_str().unwrap(),
        "--name",
        "minilm",
        "--version",
        &version.to_string(),
        "--output",
        "json",
        "--endpoint",
        endpoint,
    ])
}

fn holders(endpoint: &str) -> usize {
    let ls = json(&cli(&["model", "ls", "--output", "json", "--endpoint", endpoint]));
    ls.as_array()
        .and_then(|a| a.first())
        .map_or(0, |m| m["holders"].as_array().unwrap().len())
}

/// The count of forward passes from /metrics.
fn batch_count(node: &Node) -> u64 {
    let (_, body) = node.http_get("/metrics").expect("metrics");
    body.lines()
        .find(|l| l.starts_with("cell0_inference_batch_size_count"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_added_on_one_node_reaches_every_node_and_serves_batched_embeddings() {
    let dir = model_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "run scripts/fetch-model.sh first"
    );
    let refs = references();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(root.path(), 3);

    let err = embed(&nodes[0].endpoint(), &["hello"]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(reason(&err), "NO_MODELS", "{err:?}");
    // The message tells people what to do.
    assert!(err.message().contains("cell0 model add"), "{}", err.message());

    // Register through the second node; the others get it from it.
    let added = json(&add_minilm(&dir, 1, &nodes[1].endpoint()));
    assert_eq!(added["created"], true, "{added}");
    assert_eq!(added["files"], 10);
    let endpoint0 = nodes[0].endpoint();
    wait_until("every node holds the model", DEADLINE, async || {
        holders(&endpoint0) == 3
    })
    .await;

    // The same vectors through every node, matching the reference library.
    let texts: Vec<&str> = refs.iter().take(4).map(|r| r.text.as_str()).collect();
    let mut first: Option<v1::EmbedResponse> = None;
    for node in &nodes {
        let r = embed(&node.endpoint(), &texts).await.unwrap();
        assert_eq!((r.model.as_str(), r.version, r.dim), ("minilm", 1, 384));
        for (e, want) in r.embeddings.iter().zip(&refs) {
            assert_close(&e.values, &want.embedding, &format!("{} on {}", want.text, node.name));
        }
        if let Some(f) = &first {
            for (a, b) in f.embeddings.iter().zip(&r.embeddings) {
                assert_close(&a.values, &b.values, &format!("{} vs node1", node.name));
            }
        }
        first.get_or_insert(r);
    }

    // Over the limits: the field is named.
    let many = vec!["x"; 257];
    let err = embed(&endpoint0, &many).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(field(&err), "texts", "{err:?}");
    assert!(err.message().starts_with("texts "), "{}", err.message());
    let long = "y".repeat(64 * 1024 + 1);
    let err = embed(&endpoint0, &["ok", &long]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(field(&err), "texts[1]", "{err:?}");
    assert!(err.message().starts_with("texts[1] "), "{}", err.message());

    // Adding the same version again changes nothing; other files under the
    // same version are refused.
    let again = json(&add_minilm(&dir, 1, &nodes[2].endpoint()));
    assert_eq!(again["created"], false, "{again}");
    let other = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::hard_link(dir.join(f), other.path().join(f)).unwrap();
    }
    std::fs::write(other.path().join("README"), "tuned").unwrap();
    let out = add_minilm(other.path(), 1, &nodes[0].endpoint());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already exists (MODEL_VERSION_CONFLICT)"),
        "{}",
        stderr(&out)
    );

    // A node restarted with a corrupted file re-fetches it before serving.
    let weights_sha: String = Sha256::digest(std::fs::read(dir.join("model.safetensors")).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let blob = nodes[2].dir.join("models/blobs").join(&weights_sha);
    assert!(nodes[2].sigterm().success());
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    nodes[2].restart();
    nodes[2].wait_ready();
    let endpoint2 = nodes[2].endpoint();
    wait_until("the restarted node serves again", DEADLINE, async || {
        embed(&endpoint2, &["x"]).await.is_ok()
    })
    .await;
    let r = embed(&endpoint2, &[refs[0].text.as_str()]).await.unwrap();
    assert_close(&r.embeddings[0].values, &refs[0].embedding, "after re-fetch");
    let healed: String = Sha256::digest(std::fs::read(&blob).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(healed, weights_sha, "the corrupted blob was replaced");
    assert!(
        nodes[2].log().contains("failed verification"),
        "the node reported the corruption"
    );

    // 64 concurrent clients: every answer right.
    let total_before = batch_count(&nodes[0]);
    let mut tasks = Vec::new();
    for c in 0..64usize {
        let endpoint = nodes[0].endpoint();
        let refs: Vec<(String, Vec<f32>)> = refs.iter().map(|r| (r.text.clone(), r.embedding.clone())).collect();
        tasks.push(tokio::spawn(async move {
            let mut client = InferenceClient::new(channel(&endpoint).await);
            for i in 0..4 {
                let (text, want) = &refs[(c + i) % refs.len()];
                let r = client
                    .embed(v1::EmbedRequest {
                        texts: vec![text.clone()],
                        model: "minilm".into(),
                        version: 1,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_close(&r.embeddings[0].values, want, &format!("client {c} text {text:?}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // How many passes the 256 requests share depends on scheduling; that
    // grouping happens at all is shown deterministically by the batcher's
    // own tests (node/inference/tests/batcher.rs). Here: every request ran
    // in some pass and the metric counts them.
    let batches = batch_count(&nodes[0]) - total_before;
    assert!((1..=256).contains(&batches), "256 requests ran in {batches} batches");

    // A second version takes over once ready; removing the first keeps the
    // files the second shares and leaves it serving.
    let v2 = json(&add_minilm(&dir, 2, &nodes[0].endpoint()));
    assert_eq!(v2["created"], true, "{v2}");
    wait_until("every node serves version 2", DEADLINE, async || {
        let mut all = true;
        for endpoint in [&endpoint0, &nodes[1].endpoint(), &endpoint2] {
            all &= embed(endpoint, &["x"]).await.is_ok_and(|r| r.version == 2);
        }
        all
    })
    .await;
    let out = cli(&["model", "rm", "minilm", "--version", "1", "--endpoint", &endpoint2]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("version 1 is gone", DEADLINE, async || {
        let ls = json(&cli(&["model", "ls", "--output", "json", "--endpoint", &endpoint0]));
        ls.as_array().unwrap().len() == 1 && ls[0]["version"] == 2
    })
    .await;
    let r = embed(&endpoint2, &[refs[0].text.as_str()]).await.unwrap();
    assert_eq!(r.version, 2);
    assert_close(&r.embeddings[0].values, &refs[0].embedding, "version 2");
    assert!(blob.is_file(), "files shared with version 2 stay");

    // A node that joins later gets every registered version from the others.
    let mut fourth = Node::start(
        "node4",
        &root.path().join("node4"),
        Ports::new(),
        Some(nodes[0].endpoint()),
    );
    fourth.wait_ready();
    let endpoint4 = fourth.endpoint();
    // While it replays the log it may briefly serve version 1, which was
    // still registered at that point of the log; it converges on version 2.
    wait_until("the new node serves version 2", DEADLINE, async || {
        embed(&endpoint4, &["x"]).await.is_ok_and(|r| r.version == 2)
    })
    .await;
    let r = embed(&endpoint4, &[refs[1].text.as_str()]).await.unwrap();
    assert_eq!(r.version, 2);
    assert_close(&r.embeddings[0].values, &refs[1].embedding, "on the late joiner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_model_requests_get_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let nodes = start_cluster(root.path(), 1);
    let endpoint = nodes[0].endpoint();

    // A directory without the files the architecture needs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    for (name, extra, want) in [
        ("m", None, "manifest.files"),
        ("Bad Name", None, "manifest.name"),
        ("m", Some("gpt-9"), "manifest.architecture"),
    ] {
        let mut args = vec![
            "model",
            "add",
            dir_arg,
            "--name",
            name,
            "--version",
            "1",
            "--endpoint",
            &endpoint,
        ];
        if let Some(arch) = extra {
            args.extend(["--architecture", arch]);
        }
        let out = cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }

    // Manifests no directory can produce, sent through the API with every
    // file uploaded: refused before they are proposed, naming the field.
    let mut models = ModelsClient::new(channel(&endpoint).await);
    let mut uploaded = Vec::new();
    for (path, body) in [
        ("a", "a file"),
        ("a/b", "a file in a directory of the same name"),
        ("config.json", "{}"),
        ("model.safetensors", "weights"),
        ("tokenizer.json", "tokens"),
    ] {
        let sha256 = hex(&Sha256::digest(body));
        let parts = vec![
            v1::UploadRequest {
                part: Some(v1::upload_request::Part::Header(v1::BlobHeader {
                    sha256: sha256.clone(),
                    size: body.len() as u64,
                })),
            },
            v1::UploadRequest {
                part: Some(v1::upload_request::Part::Data(body.as_bytes().to_vec().into())),
            },
        ];
        models.upload(tokio_stream::iter(parts)).await.unwrap();
        uploaded.push(v1::ModelFile {
            path: path.into(),
            sha256,
            size: body.len() as u64,
        });
    }
    let required = uploaded[2..].to_vec();
    let mut wrong_size = required.clone();
    wrong_size[0].size += 1;
    for (what, files, want) in [
        ("a file and a directory named a", uploaded.clone(), "manifest.files"),
        ("a size other than the upload's", wrong_size, "manifest.files[0].size"),
    ] {
        let err = models
            .add(v1::AddModelRequest {
                manifest: Some(v1::ModelManifest {
                    name: "m".into(),
                    version: 1,
                    architecture: "all-minilm-l6-v2".into(),
                    files,
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        assert_eq!(field(&err), want, "{what}: {err:?}");
        assert!(err.message().starts_with(want), "{what}: {}", err.message());
    }
    let ls = json(&cli(&["model", "ls", "--output", "json", "--endpoint", &endpoint]));
    assert_eq!(ls.as_array().map(Vec::len), Some(0), "nothing was registered: {ls}");

    let out = cli(&["model", "rm", "nope", "--version", "3", "--endpoint", &endpoint]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not found (MODEL_VERSION_NOT_FOUND)"),
        "{}",
        stderr(&out)
    );

    let out = cli(&["infer", "embed", "hello", "--model", "nope", "--endpoint", &endpoint]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("failed precondition (NO_MODELS)"),
        "{}",
        stderr(&out)
    );

    let info = json(&cli(&["infer", "info", "--output", "json", "--endpoint", &endpoint]));
    assert!(
        info["backend"] == "cpu" || info["backend"] == "wgpu",
        "auto picks the CPU engine or a hardware GPU: {info}"
    );
    assert!(!info["adapter"].as_str().unwrap().is_empty(), "{info}");
    assert_eq!(info["max_texts_per_request"], 256);
}
