//! Blockwise (memory-efficient) attention inside the real models: with a block budget so small
//! that every attention of the tiny pipelines runs a few query rows at a time, the whole pipeline
//! still matches diffusers' latents, and every UNet parameter's gradient equals the one through
//! plain attention. One test in this binary: the block budget is process-wide.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::{assert_close, fixtures, Reference};
use ipr_diffusion::attention::{set_block_bytes, DEFAULT_BLOCK_BYTES};
use ipr_diffusion::config::UNetConfig;
use ipr_diffusion::pipeline::{Pipeline, SampleParams};
use ipr_diffusion::scheduler::SamplerKind;
use ipr_diffusion::unet::{AddedCond, UNet2DConditionModel};

/// Small enough that the tiny models' self-attention (and the VAE's) splits into blocks of a
/// few rows; checked below through `block_rows`.
const TINY_BUDGET: usize = 3000;

fn pipeline_matches_diffusers(name: &str) {
    let r = Reference::load(name);
    let pipe = Pipeline::load(&fixtures().join(name), DType::F32, &Device::Cpu).unwrap();
    let params = SampleParams { num_inference_steps: 4, guidance_scale: 5.0, sampler: SamplerKind::Ddim };
    let prompts = ["a photo of a red cube to the left of a blue sphere", "A Dog   above a cat!"];
    let negatives = ["blurry, bad quality", ""];
    let out = pipe.generate(&prompts, Some(&negatives), &r.get("pipeline/latents"), &params).unwrap();
    assert_close(&format!("{name} blockwise pipeline/ddim_out"), &out, &r.get("pipeline/ddim_out"), 1e-4);
}

/// Gradients of `sum(unet(x) * cos(x))` with respect to every UNet parameter, in f64.
fn unet_gradients(name: &str) -> Vec<(String, Tensor)> {
    let dir = fixtures().join(name).join("unet");
    let config = UNetConfig::load(&dir.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let mut vars: Vec<(String, Var)> =
        tensors.into_iter().map(|(k, t)| (k, Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let map: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let unet =
        UNet2DConditionModel::new(VarBuilder::from_tensors(map, DType::F64, &Device::Cpu), config, &dir).unwrap();
    let r = Reference::load(name);
    let f64_of = |k: &str| r.get(k).to_dtype(DType::F64).unwrap();
    let sample = f64_of("unet/sample");
    let ehs = f64_of("unet/encoder_hidden_states");
    let t = Tensor::new(&[731f64], &Device::Cpu).unwrap();
    let added = r
        .has("unet/text_embeds")
        .then(|| AddedCond { text_embeds: f64_of("unet/text_embeds"), time_ids: f64_of("unet/time_ids") });
    let loss = unet.forward(&sample, &t, &ehs, added.as_ref()).unwrap().mul(&sample.cos().unwrap()).unwrap();
    let grads = loss.sum_all().unwrap().backward().unwrap();
    vars.iter().map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).unwrap().clone())).collect()
}

#[test]
fn blockwise_attention_in_the_tiny_pipelines() {
    let r = Reference::load("tiny-sd15");
    let (_, _, h, w) = r.get("pipeline/latents").dims4().unwrap();
    set_block_bytes(TINY_BUDGET);
    // The tiny SD 1.5 UNet's full-resolution self-attention (2 prompts x CFG) is blocked.
    let rows = ipr_diffusion::attention::block_rows(4, h * w, h * w).expect("blocked");
    assert!(rows < h * w / 2, "{rows} rows per block of {}", h * w);

    for name in ["tiny-sd15", "tiny-sd21", "tiny-sdxl"] {
        pipeline_matches_diffusers(name);
    }

    for name in ["tiny-sd15", "tiny-sdxl"] {
        set_block_bytes(usize::MAX);
        let plain = unet_gradients(name);
        set_block_bytes(TINY_BUDGET);
        let blocked = unet_gradients(name);
        for ((key, a), (_, b)) in plain.iter().zip(&blocked) {
            let diff =
                (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            assert!(diff <= 1e-10 * scale.max(1.0), "{name} {key}: blocked gradient differs by {diff:e}");
        }
    }
    set_block_bytes(DEFAULT_BLOCK_BYTES);
}
