//! A word-level tokenizer for the toy grammar, saved the way diffusers folders carry one.
//!
//! The toy text encoder needs no BPE: every prompt and caption is built from a closed set of
//! words (articles, the numbers 0-9, the relation words, "and", the class names and their
//! plurals). One id per word keeps the embedding table tiny and makes an unknown word an
//! error that names the word, instead of a silent split into sub-words.
//!
//! Layout of an encoding, like CLIP's: BOS, the words, EOS, then PAD up to `model_max_length`.
//! Ids: PAD = 0, BOS = 1, the words, and EOS last, so EOS is the largest id: CLIP text models
//! with the legacy `eos_token_id` read the pooled output at `argmax(input_ids)`, which is then
//! the first EOS, as in every Stable Diffusion checkpoint.
//!
//! On disk (a folder such as `tokenizer/`): `tokenizer.json`, the Hugging Face `tokenizers`
//! serialisation of the same thing (a WordLevel model, whitespace split, `BOS $A EOS`), which
//! transformers' `AutoTokenizer` and ipr-diffusion's tokenizer load as they are; `vocab.json`,
//! the word -> id map; and `tokenizer_config.json` with `tokenizer_class` [`TOKENIZER_CLASS`]
//! (so transformers reads `tokenizer.json`), the special tokens and `model_max_length`.

use ipr_core::Vocabulary;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `tokenizer_class` written to `tokenizer_config.json`: transformers' generic fast
/// tokenizer, which is built from `tokenizer.json`.
pub const TOKENIZER_CLASS: &str = "PreTrainedTokenizerFast";
/// Sequence length of the toy text encoder: the longest toy caption ("an apple to the right
/// of a carrot", or a three-object count caption) has 8 words, plus BOS and EOS, with room.
pub const DEFAULT_MAX_LENGTH: usize = 16;
pub const PAD_TOKEN: &str = "<|pad|>";
pub const BOS_TOKEN: &str = "<|startoftext|>";
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// The grammar's own words, in the order they get ids.
const GRAMMAR_WORDS: [&str; 10] = ["a", "an", "and", "to", "the", "left", "right", "of", "above", "below"];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("unknown word {word:?} in {text:?}: the toy tokenizer knows only the toy grammar's words")]
    UnknownWord { word: String, text: String },
    #[error("{text:?} has {words} words; at most {max} fit in {max_length} tokens with BOS and EOS")]
    TooLong { text: String, words: usize, max: usize, max_length: usize },
    #[error("token id {id} is not in the vocabulary ({len} ids)")]
    UnknownId { id: u32, len: usize },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// `tokenizer_config.json` of a saved word-level tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizerConfig {
    tokenizer_class: String,
    model_max_length: usize,
    pad_token: String,
    bos_token: String,
    eos_token: String,
}

/// A word-level tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordTokenizer {
    words: Vec<String>,
    ids: BTreeMap<String, u32>,
    max_length: usize,
}

impl WordTokenizer {
    /// The tokenizer of the toy grammar over `vocab`: grammar words, numbers 0-9, then every
    /// word of the class names and their plurals in vocabulary order.
    pub fn for_vocabulary(vocab: &Vocabulary, max_length: usize) -> WordTokenizer {
        let mut words: Vec<String> = vec![PAD_TOKEN.into(), BOS_TOKEN.into()];
        let mut push = |w: &str| {
            if !words.iter().any(|x| x == w) {
                words.push(w.to_string());
            }
        };
        GRAMMAR_WORDS.iter().for_each(|w| push(w));
        (0..10).for_each(|n| push(&n.to_string()));
        for o in vocab.objects() {
            o.name.split(' ').chain(o.plural.split(' ')).for_each(&mut push);
        }
        words.push(EOS_TOKEN.into());
        Self::from_words(words, max_length).expect("the toy words are unique")
    }

    /// The toy world's tokenizer at [`DEFAULT_MAX_LENGTH`].
    pub fn toy() -> WordTokenizer {
        Self::for_vocabulary(&crate::classes::vocabulary(), DEFAULT_MAX_LENGTH)
    }

    fn from_words(words: Vec<String>, max_length: usize) -> Result<WordTokenizer, String> {
        if max_length < 3 {
            return Err(format!("model_max_length is {max_length}, expected at least 3 (BOS, a word, EOS)"));
        }
        let mut ids = BTreeMap::new();
        for (id, w) in words.iter().enumerate() {
            if w.is_empty() || w.contains(char::is_whitespace) {
                return Err(format!("token {w:?} (id {id}) is empty or contains whitespace"));
            }
            if ids.insert(w.clone(), id as u32).is_some() {
                return Err(format!("token {w:?} appears twice"));
            }
        }
        let expect = [(PAD_TOKEN, 0), (BOS_TOKEN, 1), (EOS_TOKEN, words.len() as u32 - 1)];
        for (token, id) in expect {
            if ids.get(token) != Some(&id) {
                return Err(format!("token {token:?} must have id {id}, found {:?}", ids.get(token)));
            }
        }
        Ok(WordTokenizer { words, ids, max_length })
    }

    /// Number of ids (the text encoder's `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.words.len()
    }

    /// Length of every encoding (the text encoder's `max_position_embeddings`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        0
    }

    pub fn bos_id(&self) -> u32 {
        1
    }

    pub fn eos_id(&self) -> u32 {
        self.words.len() as u32 - 1
    }

    /// The id of one word.
    pub fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    /// BOS, the words of `text` (split on single spaces), EOS, PAD to [`Self::max_length`].
    /// Special tokens in the text are refused like unknown words.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let words: Vec<&str> = text.split(' ').collect();
        let max = self.max_length - 2;
        if words.len() > max {
            return Err(TokenizerError::TooLong {
                text: text.into(),
                words: words.len(),
                max,
                max_length: self.max_length,
            });
        }
        let mut out = Vec::with_capacity(self.max_length);
        out.push(self.bos_id());
        for w in words {
            match self.id(w) {
                Some(id) if id > self.bos_id() && id < self.eos_id() => out.push(id),
                _ => return Err(TokenizerError::UnknownWord { word: w.into(), text: text.into() }),
            }
        }
        out.push(self.eos_id());
        out.resize(self.max_length, self.pad_id());
        Ok(out)
    }

    /// The text of an encoding: the words between BOS and the first EOS, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut words = Vec::new();
        for &id in ids {
            let w = self.words.get(id as usize).ok_or(TokenizerError::UnknownId { id, len: self.words.len() })?;
            if id == self.eos_id() {
                break;
            }
            if id > self.bos_id() {
                words.push(w.as_str());
            }
        }
        Ok(words.join(" "))
    }

    /// The tokenizer as a Hugging Face `tokenizers` pipeline: WordLevel over the same ids
    /// (unknown words map to EOS, CLIP's unk), whitespace split, `BOS $A EOS` added, padded
    /// with PAD to `max_length`.
    pub fn hf_tokenizer(&self) -> tokenizers::Tokenizer {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
        use tokenizers::processors::template::TemplateProcessing;
        use tokenizers::{AddedToken, PaddingDirection, PaddingParams, PaddingStrategy};
        let vocab = self.ids.iter().map(|(w, &id)| (w.clone(), id)).collect();
        let model =
            WordLevel::builder().vocab(vocab).unk_token(EOS_TOKEN.into()).build().expect("valid word-level model");
        let mut t = tokenizers::Tokenizer::new(model);
        t.with_pre_tokenizer(Some(WhitespaceSplit));
        let template = TemplateProcessing::builder()
            .try_single(format!("{BOS_TOKEN} $A {EOS_TOKEN}"))
            .expect("valid template")
            .special_tokens(vec![(BOS_TOKEN, self.bos_id()), (EOS_TOKEN, self.eos_id())])
            .build()
            .expect("valid post-processor");
        t.with_post_processor(Some(template));
        t.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(self.max_length),
            direction: PaddingDirection::Right,
            pad_id: self.pad_id(),
            pad_token: PAD_TOKEN.into(),
            ..Default::default()
        }));
        let specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN].map(|s| AddedToken::from(s, true));
        t.add_special_tokens(specials).expect("special tokens are in the vocabulary");
        t
    }

    /// Write `tokenizer.json`, `vocab.json` and `tokenizer_config.json` into `dir` (created if
    /// missing), each under a temporary name first.
    pub fn save(&self, dir: &Path) -> Result<(), TokenizerError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TokenizerError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let config = TokenizerConfig {
            tokenizer_class: TOKENIZER_CLASS.into(),
            model_max_length: self.max_length,
            pad_token: PAD_TOKEN.into(),
            bos_token: BOS_TOKEN.into(),
            eos_token: EOS_TOKEN.into(),
        };
        let files = [
            ("tokenizer.json", self.hf_tokenizer().to_string(true).expect("the tokenizer serialises")),
            ("vocab.json", serde_json::to_string_pretty(&self.ids).expect("a map serialises")),
            ("tokenizer_config.json", serde_json::to_string_pretty(&config).expect("a struct serialises")),
        ];
        for (name, text) in files {
            let path = dir.join(name);
            ipr_core::fs::write_atomic_with(&path, |tmp| std::fs::write(tmp, text + "\n")).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Read a tokenizer written by [`Self::save`]; errors name the file and what is wrong.
    pub fn load(dir: &Path) -> Result<WordTokenizer, TokenizerError> {
        let read = |name: &str| -> Result<(PathBuf, String), TokenizerError> {
            let path = dir.join(name);
            let text =
                std::fs::read_to_string(&path).map_err(|source| TokenizerError::Io { path: path.clone(), source })?;
            Ok((path, text))
        };
        let invalid = |path: &Path, message: String| TokenizerError::Invalid { path: path.to_path_buf(), message };
        let (cpath, ctext) = read("tokenizer_config.json")?;
        let config: TokenizerConfig = serde_json::from_str(&ctext).map_err(|e| invalid(&cpath, e.to_string()))?;
        if config.tokenizer_class != TOKENIZER_CLASS {
            let msg = format!("tokenizer_class is {:?}, expected {TOKENIZER_CLASS:?}", config.tokenizer_class);
            return Err(invalid(&cpath, msg));
        }
        let specials = [(&config.pad_token, PAD_TOKEN), (&config.bos_token, BOS_TOKEN), (&config.eos_token, EOS_TOKEN)];
        for (got, want) in specials {
            if got != want {
                return Err(invalid(&cpath, format!("special token {got:?}, expected {want:?}")));
            }
        }
        let (vpath, vtext) = read("vocab.json")?;
        let map: BTreeMap<String, u32> = serde_json::from_str(&vtext).map_err(|e| invalid(&vpath, e.to_string()))?;
        let mut words = vec![String::new(); map.len()];
        for (w, &id) in &map {
            let slot = words.get_mut(id as usize).ok_or_else(|| {
                invalid(&vpath, format!("id {id} of {w:?} is out of range: ids must be 0..{}", map.len()))
            })?;
            if !slot.is_empty() {
                return Err(invalid(&vpath, format!("id {id} is given to both {slot:?} and {w:?}")));
            }
            *slot = w.clone();
        }
        Self::from_words(words, config.model_max_length).map_err(|m| invalid(&vpath, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::sr2d_rows;
    use crate::{CaptionNoise, CaptionedScenes};

    #[test]
    fn round_trips_every_prompt_and_caption() {
        let t = WordTokenizer::toy();
        let gen = CaptionedScenes::new(CaptionNoise::default(), 3).unwrap();
        let texts = sr2d_rows().into_iter().map(|r| r.text).chain((0..500).map(|i| gen.sample(i).text));
        for text in texts {
            let ids = t.encode(&text).unwrap();
            assert_eq!(ids.len(), DEFAULT_MAX_LENGTH);
            assert_eq!(ids[0], t.bos_id());
            assert_eq!(t.decode(&ids).unwrap(), text);
            let eos = ids.iter().position(|&i| i == t.eos_id()).unwrap();
            assert_eq!(ids.iter().enumerate().max_by_key(|(i, &v)| (v, std::cmp::Reverse(*i))).unwrap().0, eos);
            assert!(ids[eos + 1..].iter().all(|&i| i == t.pad_id()));
        }
        assert_eq!(
            t.encode("2 leaves and a box").unwrap()[..3],
            [t.bos_id(), t.id("2").unwrap(), t.id("leaves").unwrap()]
        );
    }

    #[test]
    fn errors_name_the_word() {
        let t = WordTokenizer::toy();
        let e = t.encode("a unicorn above a box").unwrap_err().to_string();
        assert!(e.contains("\"unicorn\""), "{e}");
        let e = t.encode("a  box").unwrap_err().to_string();
        assert!(e.contains("unknown word \"\""), "{e}");
        assert!(t.encode("10 boxes").unwrap_err().to_string().contains("\"10\""));
        assert!(t.encode("<|endoftext|>").is_err());
        let long = vec!["a"; 15].join(" ");
        assert!(t.encode(&long).unwrap_err().to_string().contains("15 words"));
        assert!(t.decode(&[1, 999]).unwrap_err().to_string().contains("999"));
    }

    #[test]
    fn saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let t = WordTokenizer::toy();
        t.save(dir.path()).unwrap();
        assert_eq!(WordTokenizer::load(dir.path()).unwrap(), t);
        assert_eq!(t.vocab_size(), 2 + 10 + 10 + 16 + 1);
        let vocab: BTreeMap<String, u32> =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("vocab.json")).unwrap()).unwrap();
        assert_eq!(vocab["<|endoftext|>"], t.vocab_size() as u32 - 1);
        assert_eq!(vocab["apple"], 22);
        // Corrupt files are named in the error.
        std::fs::write(dir.path().join("vocab.json"), r#"{"<|pad|>": 0, "<|startoftext|>": 1, "a": 5}"#).unwrap();
        let e = WordTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("vocab.json") && e.contains("id 5 of \"a\" is out of range"), "{e}");
        let cfg = dir.path().join("tokenizer_config.json");
        std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace(TOKENIZER_CLASS, "CLIPTokenizer")).unwrap();
        let e = WordTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json") && e.contains("CLIPTokenizer"), "{e}");
        let e = WordTokenizer::load(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope/tokenizer_config.json"), "{e}");
    }
}
