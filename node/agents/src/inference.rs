//! The `inference` driver: tasks answered with the node's embedding engine
//! and the agent's memory. A task's input is one JSON object:
//!
//! - `{"op":"embed","text":T}` -> `{"embedding":[...]}`
//! - `{"op":"remember","key":K,"text":T}` -> `{"remembered":K}`, storing T
//!   and its embedding under K in the agent's memory;
//! - `{"op":"recall","text":T,"k":N}` -> `{"matches":[{"key","text","score"}]}`,
//!   the N (default 5, at most [`MAX_K`]) entries closest to T by cosine
//!   similarity, best first, ties by key;
//! - `{"op":"forget","key":K}` -> `{"forgot":K}`.
//!
//! The driver computes; the node commits the memory changes with the task's
//! result, fenced by the incarnation. Recall reads the memory the node's
//! replica holds when the task starts, which after a move holds every
//! change of the earlier incarnations (they were committed before the move).

use serde::{Deserialize, Serialize};

/// Most matches a recall returns.
pub const MAX_K: usize = 100;

/// A task's input.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Embeds a text.
    Embed {
        /// The text.
        text: String,
    },
    /// Stores a text and its embedding.
    Remember {
        /// The memory key.
        key: String,
        /// The text.
        text: String,
    },
    /// The entries closest to a text.
    Recall {
        /// The text.
        text: String,
        /// How many (default 5).
        #[serde(default = "default_k")]
        k: usize,
    },
    /// Removes an entry.
    Forget {
        /// The memory key.
        key: String,
    },
}

fn default_k() -> usize {
    5
}

/// One memory entry as recall sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its key.
    pub key: String,
    /// Its text.
    pub text: String,
    /// Its embedding.
    pub embedding: Vec<f32>,
}

/// A memory change a task makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Store `text` with `embedding` under `key`.
    Put {
        /// The key.
        key: String,
        /// The text.
        text: String,
        /// Its embedding.
        embedding: Vec<f32>,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: String,
    },
}

/// What a task produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The JSON output.
    pub output: Vec<u8>,
    /// Memory changes to commit with it.
    pub changes: Vec<Change>,
}

#[derive(Serialize)]
struct Match<'a> {
    key: &'a str,
    text: &'a str,
    score: f32,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}

/// The `k` entries of `memory` closest to `query`, best first (ties by key).
pub fn nearest<'a>(memory: &'a [Entry], query: &[f32], k: usize) -> Vec<(&'a Entry, f32)> {
    let mut scored: Vec<(&Entry, f32)> = memory.iter().map(|e| (e, cosine(&e.embedding, query))).collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.key.cmp(&b.0.key)));
    scored.truncate(k);
    scored
}

fn json(value: serde_json::Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// Answers the task `input`, embedding with `embed` and recalling from
/// `memory` (read only for recall); the error says what is wrong.
pub async fn answer<M, E>(input: &[u8], memory: M, embed: E) -> Result<Answer, String>
where
    M: AsyncFnOnce() -> Result<Vec<Entry>, String>,
    E: AsyncFnOnce(String) -> Result<Vec<f32>, String>,
{
    let request: Request =
        serde_json::from_slice(input).map_err(|e| format!("input is not an inference request: {e}"))?;
    match request {
        Request::Embed { text } => {
            let embedding = embed(text).await?;
            Ok(Answer {
                output: json(serde_json::json!({ "embedding": embedding })),
                changes: Vec::new(),
            })
        }
        Request::Remember { key, text } => {
            let embedding = embed(text.clone()).await?;
            Ok(Answer {
                output: json(serde_json::json!({ "remembered": key })),
                changes: vec![Change::Put { key, text, embedding }],
            })
        }
        Request::Recall { text, k } => {
            if k == 0 || k > MAX_K {
                return Err(format!("k is {k}; it must be between 1 and {MAX_K}"));
            }
            let query = embed(text).await?;
            let memory = memory().await?;
            let matches: Vec<Match> = nearest(&memory, &query, k)
                .into_iter()
                .map(|(e, score)| Match {
                    key: &e.key,
                    text: &e.text,
                    score,
                })
                .collect();
            Ok(Answer {
                output: json(serde_json::json!({ "matches": matches })),
                changes: Vec::new(),
            })
        }
        Request::Forget { key } => Ok(Answer {
            output: json(serde_json::json!({ "forgot": key })),
            changes: vec![Change::Delete { key }],
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn entry(key: &str, embedding: Vec<f32>) -> Entry {
        Entry {
            key: key.into(),
            text: key.to_uppercase(),
            embedding,
        }
    }

    #[tokio::test]
    async fn recall_ranks_by_cosine_and_remember_stores_the_embedding() {
        let memory = vec![
            entry("b", vec![0.0, 1.0]),
            entry("a", vec![1.0, 0.1]),
            entry("c", vec![-1.0, 0.0]),
        ];
        let embed = async |_: String| Ok(vec![1.0, 0.0]);
        let out = answer(
            br#"{"op":"recall","text":"x","k":2}"#,
            async || Ok(memory.clone()),
            embed,
        )
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.output).unwrap();
        let keys: Vec<&str> = v["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["a", "b"]);
        let out = answer(br#"{"op":"remember","key":"k","text":"t"}"#, async || Ok(vec![]), embed)
            .await
            .unwrap();
        assert_eq!(
            out.changes,
            vec![Change::Put {
                key: "k".into(),
                text: "t".into(),
                embedding: vec![1.0, 0.0]
            }]
        );
    }

    #[tokio::test]
    async fn bad_requests_say_what_is_wrong() {
        let embed = async |_: String| Ok(vec![1.0]);
        let err = answer(b"{\"op\":\"dance\"}", async || Ok(vec![]), embed)
            .await
            .unwrap_err();
        assert!(err.contains("not an inference request"), "{err}");
        let err = answer(br#"{"op":"recall","text":"x","k":0}"#, async || Ok(vec![]), embed)
            .await
            .unwrap_err();
        assert!(err.contains("k is 0"), "{err}");
    }
}
