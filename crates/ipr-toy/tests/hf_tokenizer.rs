//! The saved toy tokenizer is a real Hugging Face tokenizer: ipr-diffusion's loader (the one the
//! pipelines use) reads the folder and gives the word tokenizer's ids, and transformers'
//! `AutoTokenizer` gave the same ids for the prompts recorded by
//! `scripts/fixtures/toy/tokenizer_ids.py`.

use ipr_toy::split::sr2d_rows;
use ipr_toy::{CaptionNoise, CaptionedScenes, WordTokenizer};
use std::path::Path;

#[test]
fn diffusion_loader_reads_the_saved_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let t = WordTokenizer::toy();
    t.save(dir.path()).unwrap();
    let clip = ipr_diffusion::tokenizer::ClipTokenizer::load(dir.path()).unwrap();
    assert_eq!(
        (clip.bos_id, clip.eos_id, clip.pad_id, clip.model_max_length),
        (t.bos_id(), t.eos_id(), t.pad_id(), t.max_length())
    );
    let gen = CaptionedScenes::new(CaptionNoise::default(), 5).unwrap();
    let texts = sr2d_rows().into_iter().map(|r| r.text).chain((0..300).map(|i| gen.sample(i).text));
    for text in texts {
        assert_eq!(clip.encode(&text).unwrap(), t.encode(&text).unwrap(), "{text}");
    }
}

#[test]
fn transformers_gave_the_same_ids() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformers_token_ids.json");
    let recorded: Vec<(String, Vec<u32>)> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(recorded.len() >= 10);
    let t = WordTokenizer::toy();
    for (text, ids) in recorded {
        assert_eq!(t.encode(&text).unwrap(), ids, "{text}");
    }
}
