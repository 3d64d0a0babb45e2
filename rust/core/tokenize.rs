//! Batch encoding of texts into flat token columns with a Hugging Face `tokenizers` tokenizer.
//!
//! Texts are encoded in parallel (rayon) and their ids written straight into one flat int32
//! column plus int64 offsets, so no per-token object is ever created on the Python side.

use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::errors::{Result, RloxError};

/// A tokenizer loaded from its JSON serialisation, with truncation and padding switched off.
pub struct Encoder {
    tokenizer: Tokenizer,
}

impl Encoder {
    /// Parse `json` (the output of `tokenizers.Tokenizer.to_str()`).
    pub fn from_json(json: &str) -> Result<Self> {
        let mut tokenizer: Tokenizer = json
            .parse()
            .map_err(|e| RloxError::value("tokenizer", format!("cannot load its JSON: {e}")))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| RloxError::value("tokenizer", e.to_string()))?;
        tokenizer.with_padding(None);
        Ok(Self { tokenizer })
    }

    /// Ids of `texts` without special tokens: values int32 `[T]` and offsets int64 `[n + 1]`.
    pub fn encode<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<(Vec<i32>, Vec<i64>)> {
        let ids: Vec<Vec<u32>> = texts
            .par_iter()
            .enumerate()
            .map(|(i, text)| {
                self.tokenizer
                    .encode_fast(text.as_ref(), false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| RloxError::at("texts", i, format!("tokenizer failed: {e}")))
            })
            .collect::<Result<_>>()?;
        let mut offsets = Vec::with_capacity(ids.len() + 1);
        offsets.push(0i64);
        let mut total = 0i64;
        for row in &ids {
            total += row.len() as i64;
            offsets.push(total);
        }
        let mut values = vec![0i32; total as usize];
        let mut rest = values.as_mut_slice();
        let mut parts = Vec::with_capacity(ids.len());
        for row in &ids {
            let (head, tail) = rest.split_at_mut(row.len());
            parts.push((head, row.as_slice()));
            rest = tail;
        }
        let bad = parts
            .into_par_iter()
            .enumerate()
            .filter_map(|(i, (out, row))| {
                let mut ok = true;
                for (o, &id) in out.iter_mut().zip(row) {
                    ok &= id <= i32::MAX as u32;
                    *o = id as i32;
                }
                (!ok).then_some(i)
            })
            .min();
        if let Some(i) = bad {
            return Err(RloxError::value(
                "tokenizer",
                format!("a token id of text {i} does not fit int32"),
            ));
        }
        Ok((values, offsets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer over a three-word vocabulary, whitespace pre-tokenizer.
    const JSON: &str = r#"{
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1, "b": 2, "c": 3},
                  "unk_token": "[UNK]"}
    }"#;

    #[test]
    fn encodes_into_flat_columns() {
        let enc = Encoder::from_json(JSON).unwrap();
        let (values, offsets) = enc.encode(&["a b", "", "c c x a"]).unwrap();
        assert_eq!(values, vec![1, 2, 3, 3, 0, 1]);
        assert_eq!(offsets, vec![0, 2, 2, 6]);
    }

    #[test]
    fn bad_json_names_the_tokenizer() {
        let e = Encoder::from_json("{").err().unwrap();
        assert!(e.to_string().starts_with("tokenizer: cannot load"), "{e}");
    }
}
