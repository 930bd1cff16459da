//! The CLIP tokenizer (Radford et al. 2021): byte-level BPE with an end-of-word suffix `</w>`,
//! NFC + whitespace-collapsing + lower-casing normalisation, CLIP's split regex, BOS/EOS, padding to
//! `model_max_length` with the folder's pad token.
//!
//! Built from a diffusers folder's `tokenizer*/vocab.json` and `merges.txt` with the same pipeline
//! as transformers 5's `CLIPTokenizer` (it runs on the same `tokenizers` engine), so ids match it.
//! The pad token and maximum length come from `tokenizer_config.json` (then `special_tokens_map.json`):
//! SD 1.x and SDXL's first tokenizer pad with `<|endoftext|>`, SD 2.x and SDXL's second with `!`.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer loaded from a folder.
pub struct ClipTokenizer {
    tokenizer: tokenizers::Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    /// Sequence length the text encoder takes (77 for every SD checkpoint).
    pub model_max_length: usize,
    folder: PathBuf,
}

fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    crate::config::read_json(path).map(Some)
}

impl ClipTokenizer {
    /// Loads `folder/vocab.json`, `folder/merges.txt` and the special tokens of `folder`.
    pub fn load(folder: &Path) -> Result<Self> {
        let err = |path: &Path, message: String| Error::Tokenizer { path: path.to_path_buf(), message };
        let vocab = folder.join("vocab.json");
        let merges = folder.join("merges.txt");
        let fast = folder.join("tokenizer.json");
        // A folder without merges.txt may carry its tokenizer as tokenizer.json only (the toy
        // model's word-level tokenizer): load that, as transformers' fast tokenizers do.
        let use_fast = !merges.exists() && fast.exists();
        for f in if use_fast { vec![&fast] } else { vec![&vocab, &merges] } {
            if !f.exists() {
                return Err(Error::Io {
                    path: f.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "missing tokenizer file"),
                });
            }
        }
        let config = read_optional_json(&folder.join("tokenizer_config.json"))?;
        let special = read_optional_json(&folder.join("special_tokens_map.json"))?;
        let lookup = |key: &str| -> Option<String> {
            [&config, &special].into_iter().flatten().find_map(|c| c.get(key).and_then(token_string))
        };
        let pad = lookup("pad_token").unwrap_or_else(|| EOS.to_string());
        let model_max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(|v| v.as_f64())
            .filter(|&v| v > 0.0 && v < 1e6)
            .map(|v| v as usize)
            .unwrap_or(77);

        let mut tokenizer = if use_fast {
            let mut t = tokenizers::Tokenizer::from_file(&fast).map_err(|e| err(&fast, e.to_string()))?;
            // Padding and truncation are applied in `encode`, as for the BPE tokenizer.
            t.with_padding(None);
            let _ = t.with_truncation(None);
            t
        } else {
            Self::clip_bpe(folder, &vocab, &merges)?
        };
        // transformers registers BOS, EOS and the pad token as special added tokens: they are matched
        // in the raw text before BPE, so with pad "!" a "!" in a prompt becomes id 0, not "!</w>".
        let mut specials = vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)];
        if pad != BOS && pad != EOS {
            specials.push(AddedToken::from(pad.clone(), true));
        }
        let _ = tokenizer.add_special_tokens(specials);
        let vocab_file = if use_fast { &fast } else { &vocab };
        let id = |t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| err(vocab_file, format!("token {t:?} is not in the vocabulary")))
        };
        Ok(Self {
            bos_id: id(BOS)?,
            eos_id: id(EOS)?,
            pad_id: id(&pad)?,
            model_max_length,
            tokenizer,
            folder: folder.to_path_buf(),
        })
    }

    /// CLIP's byte-level BPE pipeline from `vocab.json` and `merges.txt`.
    fn clip_bpe(folder: &Path, vocab: &Path, merges: &Path) -> Result<tokenizers::Tokenizer> {
        let err = |path: &Path, message: String| Error::Tokenizer { path: path.to_path_buf(), message };
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .fuse_unk(false)
            .build()
            .map_err(|e| err(vocab, e.to_string()))?;
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        let ws = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| err(folder, e.to_string()))?;
        tokenizer
            .with_normalizer(Some(NormSeq::new(vec![NFC.into(), ws.into(), Lowercase.into()])))
            .map_err(|e| err(folder, e.to_string()))?;
        let split = Split::new(SplitPattern::Regex(CLIP_SPLIT.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| err(folder, e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(PreSeq::new(vec![split.into(), ByteLevel::new(false, true, true).into()])));
        Ok(tokenizer)
    }

    /// `tokenizer(text, padding="max_length", max_length=model_max_length, truncation=True)`:
    /// BOS, at most `model_max_length - 2` tokens, EOS, then padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.folder.clone(), message: e.to_string() })?;
        let body = enc.get_ids();
        let keep = body.len().min(self.model_max_length.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.model_max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.model_max_length, self.pad_id);
        Ok(ids)
    }
}
