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

/// The toy model's size and parametrisation: what `ipr toy init` and `ipr toy pretrain` build.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToyModelSpec {
    /// UNet channels per level, top (32x32) first.
    pub channels: Vec<usize>,
    /// How many of the lowest levels have attention (self- and cross-).
    pub attention_levels: usize,
    /// Group-norm groups (must divide every level's channels).
    pub norm_groups: usize,
    /// Width of the CLIP text model (and the UNet's cross-attention width).
    pub text_width: usize,
    pub text_layers: usize,
    /// What the UNet predicts: `epsilon` or `v_prediction`.
    pub prediction_type: String,
}

impl Default for ToyModelSpec {
    /// The shipped base model's: 32x32 RGB, three levels (16, 32, 64 channels), attention (self-
    /// and cross-) only at the lowest, 8x8 level, 1.0 M parameters; a CLIP text model of width
    /// 64 with 2 layers. Measured on 2 cores, a full training step at batch 32 costs about a third
    /// of design.md's 32/64/64 model with attention at 16x16 too (README, "The toy base model").
    /// v-prediction: the epsilon model (same recipe) drew a duplicate of a named object in most
    /// samples and scored held-out VISOR_cond 68; v-prediction 61 with fewer duplicates.
    fn default() -> Self {
        Self {
            channels: vec![16, 32, 64],
            attention_levels: 1,
            norm_groups: 8,
            text_width: 64,
            text_layers: 2,
            prediction_type: "v_prediction".into(),
        }
    }
}

impl ToyModelSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.channels.len() < 2 {
            return Err(format!("channels: need at least 2 levels, got {:?}", self.channels));
        }
        if self.attention_levels == 0 || self.attention_levels >= self.channels.len() {
            return Err(format!(
                "attention_levels {} must be between 1 and {} (the top level has none)",
                self.attention_levels,
                self.channels.len() - 1
            ));
        }
        if let Some(c) = self.channels.iter().find(|&&c| self.norm_groups == 0 || !c.is_multiple_of(self.norm_groups)) {
            return Err(format!("norm_groups {} must divide every level's channels ({c} does not)", self.norm_groups));
        }
        if !self.text_width.is_multiple_of(4) || self.text_width == 0 {
            return Err(format!("text_width {} must be a positive multiple of 4 (4 heads)", self.text_width));
        }
        if self.text_layers == 0 {
            return Err("text_layers must be at least 1".into());
        }
        if !matches!(self.prediction_type.as_str(), "epsilon" | "v_prediction") {
            return Err(format!("prediction_type: expected epsilon or v_prediction, got {:?}", self.prediction_type));
        }
        Ok(())
    }

    /// The UNet's diffusers config.
    pub fn unet_config(&self) -> serde_json::Value {
        let n = self.channels.len();
        let attn = |level: usize| level + self.attention_levels >= n;
        let down: Vec<&str> = (0..n).map(|i| if attn(i) { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
        let up: Vec<&str> = (0..n).rev().map(|i| if attn(i) { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
        json!({
            "sample_size": 32,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": self.channels,
            "layers_per_block": 1,
            "down_block_types": down,
            "up_block_types": up,
            "cross_attention_dim": self.text_width,
            "attention_head_dim": 4,
            "norm_num_groups": self.norm_groups
        })
    }

    /// The text encoder's transformers config: CLIP over the toy tokenizer's ids.
    pub fn text_encoder_config(&self, tokenizer: &WordTokenizer) -> serde_json::Value {
        json!({
            "architectures": ["CLIPTextModel"],
            "vocab_size": tokenizer.vocab_size(),
            "hidden_size": self.text_width,
            "intermediate_size": 4 * self.text_width,
            "projection_dim": self.text_width,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": tokenizer.max_length(),
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": tokenizer.bos_id(),
            "eos_token_id": tokenizer.eos_id(),
            "pad_token_id": tokenizer.pad_id()
        })
    }

    /// DDIM over a cosine schedule; x0 predictions are clipped to the image range. Timesteps are
    /// spaced "leading" (10 steps: 900, 800, ..., 0), not "trailing" (999, ...): the cosine
    /// schedule's last timestep has a signal-to-noise ratio of about 0, where an epsilon
    /// prediction says nothing about the image and the clipped x0 estimate fixes the background
    /// colour at random (measured on the base model at step 2,250, 1 image per prompt, 10 steps:
    /// OA 62 seen / 34 held-out with trailing, 85 / 73 with leading). Sampling only: training
    /// is the same either way.
    pub fn scheduler_config(&self) -> serde_json::Value {
        json!({
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": 1000,
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": self.prediction_type,
            "clip_sample": true,
            "clip_sample_range": 1.0,
            "set_alpha_to_one": true,
            "steps_offset": 0,
            "timestep_spacing": "leading"
        })
    }
}

/// Write a freshly initialised toy model (seeded) to `dir`, built aside and renamed into place.
pub fn init_toy_model(dir: &Path, spec: &ToyModelSpec, seed: u64) -> Result<()> {
    spec.validate().map_err(anyhow::Error::msg)?;
    ipr_core::fs::build_dir(dir, |tmp| write_toy_model(tmp, spec, seed))
}

/// The files of a fresh toy model, into the existing empty folder `tmp`.
fn write_toy_model(tmp: &Path, spec: &ToyModelSpec, seed: u64) -> Result<()> {
    for sub in ["unet", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(tmp.join(sub))?;
    }
    let tokenizer = WordTokenizer::toy();
    tokenizer.save(&tmp.join("tokenizer"))?;

    let te_path = tmp.join("text_encoder/config.json");
    // Written as is (not through ClipTextConfig) to keep the BOS and pad ids transformers reads.
    let te_json = spec.text_encoder_config(&tokenizer);
    let te_config: ClipTextConfig = serde_json::from_value(te_json.clone())?;
    std::fs::write(&te_path, serde_json::to_string_pretty(&te_json)? + "\n")?;
    let te_vars = SeededVarMap::new(seed ^ 0x7465_7874);
    ClipTextModel::new(te_vars.var_builder(DType::F32, &Device::Cpu), te_config.clone())?;
    te_vars.varmap.save(tmp.join("text_encoder/model.safetensors"))?;

    let unet_path = tmp.join("unet/config.json");
    let unet_config: UNetConfig = serde_json::from_value(spec.unet_config())?;
    write_json(&unet_path, &unet_config, Some("UNet2DConditionModel"))?;
    let unet_vars = SeededVarMap::new(seed ^ 0x756e_6574);
    UNet2DConditionModel::new(unet_vars.var_builder(DType::F32, &Device::Cpu), unet_config, &unet_path)?;
    unet_vars.varmap.save(tmp.join("unet/diffusion_pytorch_model.safetensors"))?;

    let sched = serde_json::to_string_pretty(&spec.scheduler_config())?;
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
        init_toy_model(&a, &ToyModelSpec::default(), 5).unwrap();
        init_toy_model(&b, &ToyModelSpec::default(), 5).unwrap();
        for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"] {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap(),
                "{f}: same seed, same bytes"
            );
        }
        assert!(init_toy_model(&a, &ToyModelSpec::default(), 5).is_err(), "never overwrites");
        let pipe = Pipeline::load(&a, DType::F32, &Device::Cpu).unwrap();
        assert!(pipe.vae.is_none());
        assert_eq!(pipe.latent_shape(2), (2, 3, 32, 32));
        let params = SampleParams { num_inference_steps: 2, guidance_scale: 3.0, ..Default::default() };
        let noise = ipr_diffusion::noise::randn_per_sample(&[1, 2], &[3, 32, 32], DType::F32, &Device::Cpu).unwrap();
        let out = pipe.generate(&["an apple to the left of a box", "2 trees"], None, &noise, &params).unwrap();
        assert_eq!(out.dims4().unwrap(), (2, 3, 32, 32));
    }
}
