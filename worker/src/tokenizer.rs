//! CLIP's byte-level BPE, built with the `tokenizers` crate from `vocab.json` + `merges.txt` as
//! transformers' `CLIPTokenizer` builds it: NFC, whitespace runs collapsed, lower-cased; CLIP's
//! split regex then byte-level mapping; `</w>` end-of-word suffix; `<|startoftext|>` ...
//! `<|endoftext|>` around at most 75 tokens (77 in all).

use std::path::{Path, PathBuf};

use tch::Tensor;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior, Tokenizer, TruncationParams};

const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";
const SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Why the tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer {path}: {msg}")]
pub struct TokenizerError {
    path: PathBuf,
    msg: String,
}

/// A batch of token ids ready for the text tower.
pub struct TokenBatch {
    /// `[batch, longest]` int64, padded with the end-of-text id.
    pub ids: Tensor,
    /// `[batch]` int64: index of each row's end-of-text token.
    pub eot: Tensor,
}

/// The CLIP tokenizer.
pub struct ClipTokenizer {
    inner: Tokenizer,
    end_id: i64,
    context: usize,
}

impl ClipTokenizer {
    /// Builds the tokenizer from `dir/vocab.json` and `dir/merges.txt`, with `context` tokens
    /// (the text tower's `max_position_embeddings`, 77 for CLIP).
    pub fn from_dir(dir: &Path, context: usize) -> Result<Self, TokenizerError> {
        let err = |msg: String| TokenizerError {
            path: dir.into(),
            msg,
        };
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(err(format!("{} is missing", f.display())));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(END.into())
            .fuse_unk(false)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let token_id = |t: &str| {
            bpe.token_to_id(t)
                .ok_or_else(|| err(format!("vocab.json has no {t} token")))
        };
        let (start_id, end_id) = (token_id(START)?, token_id(END)?);

        let mut tok = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| err(e.to_string()))?;
        tok.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| err(e.to_string()))?;
        let split = Split::new(
            SplitPattern::Regex(SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| err(e.to_string()))?;
        tok.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tok.with_post_processor(Some(
            RobertaProcessing::new((END.into(), end_id), (START.into(), start_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        tok.add_special_tokens([AddedToken::from(START, true), AddedToken::from(END, true)])
            .map_err(|e| err(e.to_string()))?;
        tok.with_truncation(Some(TruncationParams {
            max_length: context,
            ..Default::default()
        }))
        .map_err(|e| err(e.to_string()))?;
        Ok(ClipTokenizer {
            inner: tok,
            end_id: i64::from(end_id),
            context,
        })
    }

    /// Token ids of `text` with start and end tokens, truncated to the context length.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, String> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| format!("cannot tokenize {text:?}: {e}"))?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        // Truncation already accounts for the two special tokens; keep the end token last even if
        // a future tokenizer version changes that.
        if ids.len() > self.context {
            ids.truncate(self.context);
            if let Some(last) = ids.last_mut() {
                *last = self.end_id;
            }
        }
        Ok(ids)
    }

    /// Encodes `texts` and pads them with the end-of-text id to the longest one (the text tower's
    /// causal attention makes padding beyond the end token irrelevant, so 77 is not needed).
    pub fn batch(&self, texts: &[impl AsRef<str>]) -> Result<TokenBatch, String> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let longest = rows.iter().map(Vec::len).max().unwrap_or(2);
        let mut flat = Vec::with_capacity(rows.len() * longest);
        let mut eot = Vec::with_capacity(rows.len());
        for row in &rows {
            eot.push(
                row.iter()
                    .position(|&t| t == self.end_id)
                    .unwrap_or(row.len() - 1) as i64,
            );
            flat.extend_from_slice(row);
            flat.resize(flat.len() + longest - row.len(), self.end_id);
        }
        Ok(TokenBatch {
            ids: Tensor::from_slice(&flat).view([rows.len() as i64, longest as i64]),
            eot: Tensor::from_slice(&eot),
        })
    }

    /// The end-of-text token id.
    pub fn end_id(&self) -> i64 {
        self.end_id
    }
}
