//! Token ids of the CLIP tokenizer against transformers' CLIPTokenizer for the probe prompts of
//! the fixture script (case, punctuation, digits, unknown words, truncation, non-ASCII).

mod common;

use common::{fixtures, Reference};
use ipr_diffusion::tokenizer::ClipTokenizer;

fn check(pipeline: &str, sub: &str) {
    let r = Reference::load(pipeline);
    let tok = ClipTokenizer::load(&fixtures().join(pipeline).join(sub)).unwrap();
    let probes = [
        "a photo of a red cube to the left of a blue sphere",
        "A Dog   above a cat!",
        "blurry, bad quality",
        "",
        "zebra's 42 cubes, (sphere) -- LEFT\tof\n\nthe cat's  tail",
        &"the ".repeat(60),
        "héllo wörld ☃ it'll we've",
    ];
    for (i, p) in probes.iter().enumerate() {
        let want: Vec<u32> = r.i64s(&format!("{sub}/ids.{i}")).into_iter().map(|v| v as u32).collect();
        assert_eq!(tok.encode(p).unwrap(), want, "{pipeline}/{sub}: {p:?}");
    }
}

#[test]
fn sd15_tokenizer_pads_with_eos() {
    check("tiny-sd15", "tokenizer");
}

#[test]
fn sd21_tokenizer_pads_with_bang() {
    check("tiny-sd21", "tokenizer");
}

#[test]
fn sdxl_tokenizers() {
    check("tiny-sdxl", "tokenizer");
    check("tiny-sdxl", "tokenizer_2");
}

#[test]
fn missing_files_are_named() {
    let msg = ClipTokenizer::load(&fixtures().join("nowhere")).err().unwrap().to_string();
    assert!(msg.contains("vocab.json"), "{msg}");
}
