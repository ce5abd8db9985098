//! Tokenization with Hugging Face `tokenizers`.
//!
//! The shipped `tokenizer.json` has truncation at 128 and fixed padding to 128
//! built in; sentence-transformers instead truncates at `max_seq_length`
//! (256) and pads per batch. [`TextTokenizer::load`] overrides both so token ids
//! match the reference library exactly; padding is the backends' business.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{InferenceError, Result};

/// A loaded tokenizer that returns unpadded id sequences of at most `max_tokens`.
pub struct TextTokenizer {
    inner: Tokenizer,
    max_tokens: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, truncating to `max_tokens` (special tokens included) and never padding.
    pub fn load(path: &Path, max_tokens: usize) -> Result<Self> {
        if !path.is_file() {
            return Err(InferenceError::MissingFile {
                path: path.to_path_buf(),
            });
        }
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| InferenceError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| InferenceError::Tokenizer(format!("cannot set truncation: {e}")))?;
        inner.with_padding(None);
        Ok(Self { inner, max_tokens })
    }

    /// Most tokens a text is cut to.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids of one text, `[CLS]` and `[SEP]` included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of each text.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }
}
