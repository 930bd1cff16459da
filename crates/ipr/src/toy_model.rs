//! The toy base model as a diffusers-format folder: a tiny pixel-space UNet2DConditionModel and
//! CLIP text model with the toy word tokenizer, built from a seed.
//!
//! Layout: `model_index.json`, `unet/` (config.json + diffusion_pytorch_model.safetensors),
//! `text_encoder/` (config.json + model.safetensors), `tokenizer/` (tokenizer.json, vocab.json,
//! tokenizer_config.json), `scheduler/scheduler_config.json`. No `vae/`: images are the
//! "latents" (3 x 32 x 32 in [-1, 1]). diffusers loads each component with `from_pretrained(dir,
//! subfolder=...)`; ipr's pipeline loads the folder as it is.

use anyhow::Result;
use candle_core::{DType, Device};
use ipr_diffusion::clip_text::ClipTextModel;
use ipr_diffusion::config::{write_json, ClipTextConfig, UNetConfig};
use ipr_diffusion::init::SeededVarMap;
use ipr_diffusion::unet::UNet2DConditionModel;
use ipr_toy::WordTokenizer;
use serde_json::json;
use std::path::Path;

/// The toy UNet: 32x32 RGB, three levels (32, 64, 64 channels), cross-attention at the two
/// lower levels, 1.7 M parameters (the size design.md budgets for 2 CPU cores).
pub fn unet_config(cross_attention_dim: usize) -> serde_json::Value {
    json!({
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 4,
        "norm_num_groups": 32
    })
}

/// The toy text encoder: CLIP, width 64, 2 layers, over the toy tokenizer's ids.
pub fn text_encoder_config(tokenizer: &WordTokenizer) -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "vocab_size": tokenizer.vocab_size(),
        "hidden_size": 64,
        "intermediate_size": 256,
        "projection_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": tokenizer.max_length(),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": tokenizer.bos_id(),
        "eos_token_id": tokenizer.eos_id(),
        "pad_token_id": tokenizer.pad_id()
    })
}

/// DDIM over a cosine schedule, predicting noise; x0 predictions are clipped to the image range.
pub fn scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": true,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": true,
        "steps_offset": 0,
        "timestep_spacing": "trailing"
    })
}

/// Write a freshly initialised toy model (seeded) to `dir`, built aside and renamed into place.
pub fn init_toy_model(dir: &Path, seed: u64) -> Result<()> {
    ipr_core::fs::build_dir(dir, |tmp| write_toy_model(tmp, seed))
}

/// The files of a fresh toy model, into the existing empty folder `tmp`.
fn write_toy_model(tmp: &Path, seed: u64) -> Result<()> {
    for sub in ["unet", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(tmp.join(sub))?;
    }
    let tokenizer = WordTokenizer::toy();
    tokenizer.save(&tmp.join("tokenizer"))?;

    let te_path = tmp.join("text_encoder/config.json");
    // Written as is (not through ClipTextConfig) to keep the BOS and pad ids transformers reads.
    let te_json = text_encoder_config(&tokenizer);
    let te_config: ClipTextConfig = serde_json::from_value(te_json.clone())?;
    std::fs::write(&te_path, serde_json::to_string_pretty(&te_json)? + "\n")?;
    let te_vars = SeededVarMap::new(seed ^ 0x7465_7874);
    ClipTextModel::new(te_vars.var_builder(DType::F32, &Device::Cpu), te_config.clone())?;
    te_vars.varmap.save(tmp.join("text_encoder/model.safetensors"))?;

    let unet_path = tmp.join("unet/config.json");
    let unet_config: UNetConfig = serde_json::from_value(unet_config(te_config.hidden_size))?;
    write_json(&unet_path, &unet_config, Some("UNet2DConditionModel"))?;
    let unet_vars = SeededVarMap::new(seed ^ 0x756e_6574);
    UNet2DConditionModel::new(unet_vars.var_builder(DType::F32, &Device::Cpu), unet_config, &unet_path)?;
    unet_vars.varmap.save(tmp.join("unet/diffusion_pytorch_model.safetensors"))?;

    let sched = serde_json::to_string_pretty(&scheduler_config())?;
    std::fs::write(tmp.join("scheduler/scheduler_config.json"), sched + "\n")?;
    let index = json!({
        "_class_name": "IprToyPixelPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DDIMScheduler"]
    });
    std::fs::write(tmp.join("model_index.json"), serde_json::to_string_pretty(&index)? + "\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipr_diffusion::pipeline::{Pipeline, SampleParams};

    #[test]
    fn a_seeded_toy_model_loads_and_samples() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        init_toy_model(&a, 5).unwrap();
        init_toy_model(&b, 5).unwrap();
        for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"] {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap(),
                "{f}: same seed, same bytes"
            );
        }
        assert!(init_toy_model(&a, 5).is_err(), "never overwrites");
        let pipe = Pipeline::load(&a, DType::F32, &Device::Cpu).unwrap();
        assert!(pipe.vae.is_none());
        assert_eq!(pipe.latent_shape(2), (2, 3, 32, 32));
        let params = SampleParams { num_inference_steps: 2, guidance_scale: 3.0, ..Default::default() };
        let noise = ipr_diffusion::noise::randn_per_sample(&[1, 2], &[3, 32, 32], DType::F32, &Device::Cpu).unwrap();
        let out = pipe.generate(&["an apple to the left of a box", "2 trees"], None, &noise, &params).unwrap();
        assert_eq!(out.dims4().unwrap(), (2, 3, 32, 32));
    }
}
