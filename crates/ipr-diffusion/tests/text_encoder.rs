//! Text embeddings against diffusers' `encode_prompt` of the tiny pipelines: SD 1.x / 2.x use the
//! last hidden state (after the final layer norm); SDXL concatenates both encoders' penultimate
//! hidden states and takes encoder 2's projected pooled output.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, Reference};
use ipr_diffusion::clip_text::ClipTextModel;
use ipr_diffusion::tokenizer::ClipTokenizer;

const PROMPTS: [&str; 2] = ["a photo of a red cube to the left of a blue sphere", "A Dog   above a cat!"];
const NEGATIVES: [&str; 2] = ["blurry, bad quality", ""];

fn ids(tok: &ClipTokenizer, prompts: &[&str]) -> Tensor {
    let rows: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p).unwrap()).collect();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

fn sd(name: &str) {
    let dir = fixtures().join(name);
    let r = Reference::load(name);
    let tok = ClipTokenizer::load(&dir.join("tokenizer")).unwrap();
    let te = ClipTextModel::load(&dir.join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    for (prompts, key) in [(&PROMPTS, "text/prompt_embeds"), (&NEGATIVES, "text/negative_prompt_embeds")] {
        let out = te.forward(&ids(&tok, prompts)).unwrap();
        assert_close(&format!("{name} {key}"), &out.last_hidden_state, &r.get(key), 1e-4);
    }
}

#[test]
fn sd15_prompt_embeds() {
    sd("tiny-sd15");
}

#[test]
fn pixel_prompt_embeds() {
    sd("tiny-pixel");
}

#[test]
fn sd21_prompt_embeds() {
    sd("tiny-sd21");
}

#[test]
fn sdxl_prompt_embeds_and_pooled() {
    let dir = fixtures().join("tiny-sdxl");
    let r = Reference::load("tiny-sdxl");
    let tok1 = ClipTokenizer::load(&dir.join("tokenizer")).unwrap();
    let tok2 = ClipTokenizer::load(&dir.join("tokenizer_2")).unwrap();
    let te1 = ClipTextModel::load(&dir.join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    let te2 = ClipTextModel::load(&dir.join("text_encoder_2"), DType::F32, &Device::Cpu).unwrap();
    assert!(te2.text_projection.is_some() && te1.text_projection.is_none());
    for (prompts, pre) in [(&PROMPTS, ""), (&NEGATIVES, "negative_")] {
        let o1 = te1.forward(&ids(&tok1, prompts)).unwrap();
        let o2 = te2.forward(&ids(&tok2, prompts)).unwrap();
        let embeds = Tensor::cat(&[&o1.penultimate_hidden_state, &o2.penultimate_hidden_state], 2).unwrap();
        assert_close(pre, &embeds, &r.get(&format!("text/{pre}prompt_embeds")), 1e-4);
        assert_close(pre, &o2.pooled, &r.get(&format!("text/{pre}pooled_prompt_embeds")), 1e-4);
    }
}
