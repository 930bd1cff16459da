//! CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
//! Captioning"; CLIP of Radford et al. 2021) as torchmetrics computes it, which is what the IPR
//! paper reports: `CLIPProcessor` on the images and prompts, `get_image_features` /
//! `get_text_features`, L2 normalisation, `100 * cos` per (image, prompt) pair, and the metric
//! `max(mean, 0)` (torchmetrics clamps the mean, not each pair).
//!
//! Loads any transformers `CLIPModel` folder (openai/clip-vit-large-patch14 by default in the
//! paper): `config.json`, `model.safetensors`, `vocab.json`, `merges.txt`, and
//! `preprocessor_config.json` or `processor_config.json`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear_no_bias, Linear, VarBuilder};
use image::RgbImage;
use ipr_diffusion::clip_text::ClipTextModel;
use ipr_diffusion::config::ClipTextConfig;
use ipr_diffusion::tokenizer::ClipTokenizer;
use serde_json::Value;

use crate::clip_vision::{l2_normalize, ClipVisionConfig, ClipVisionTransformer};
use crate::model_error::{read_json, ModelError, Result};
use crate::owlvit::config::{check_text, check_vision, sub_config, vision_defaults};
use crate::preprocess::ImageProcessorConfig;

/// A transformers `CLIPModel`: both towers and their projections.
pub struct ClipModel {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
    text_model: ClipTextModel,
    text_projection: Linear,
    vision_model: ClipVisionTransformer,
    visual_projection: Linear,
}

impl ClipModel {
    /// Loads `folder/config.json` and `folder/model.safetensors`.
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        let path = folder.join("config.json");
        let v = read_json(&path)?;
        if v.get("model_type").and_then(Value::as_str) != Some("clip") {
            return Err(ModelError::config(
                &path,
                "model_type",
                format!(
                    "expected \"clip\" (a CLIPModel folder), found {}",
                    v.get("model_type").unwrap_or(&Value::Null)
                ),
            ));
        }
        let text_config: ClipTextConfig = sub_config(&v, &path, "text_config", serde_json::json!({}))?;
        let vision_config: ClipVisionConfig = sub_config(&v, &path, "vision_config", vision_defaults(224))?;
        check_text(&text_config, &path)?;
        check_vision(&vision_config, &path)?;
        let projection_dim = v.get("projection_dim").and_then(Value::as_u64).unwrap_or(512) as usize;
        let weights = folder.join("model.safetensors");
        if !weights.exists() {
            return Err(ModelError::missing(&weights, "CLIP weights"));
        }
        ipr_diffusion::source::check_safetensors(&weights)?;
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(std::slice::from_ref(&weights), DType::F32, device) }
            .map_err(|source| ModelError::Weights { path: weights.clone(), source })?;
        Self::new(vb, text_config, vision_config, projection_dim).map_err(|e| match e {
            ModelError::Candle(source) => ModelError::Weights { path: weights.clone(), source },
            ModelError::Diffusion(ipr_diffusion::Error::Candle(source)) => {
                ModelError::Weights { path: weights, source }
            }
            e => e,
        })
    }

    fn new(
        vb: VarBuilder,
        text_config: ClipTextConfig,
        vision_config: ClipVisionConfig,
        projection_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            text_model: ClipTextModel::new(vb.clone(), text_config.clone())?,
            text_projection: linear_no_bias(text_config.hidden_size, projection_dim, vb.pp("text_projection"))?,
            vision_model: ClipVisionTransformer::load(vb.pp("vision_model"), &vision_config, "pre_layrnorm")?,
            visual_projection: linear_no_bias(vision_config.hidden_size, projection_dim, vb.pp("visual_projection"))?,
            text_config,
            vision_config,
            projection_dim,
        })
    }

    /// `get_image_features`: projected pooled image embeddings `(B, projection_dim)`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let last = self.vision_model.forward(pixel_values)?;
        Ok(self.visual_projection.forward(&self.vision_model.pooled(&last)?)?)
    }

    /// `get_text_features`: projected pooled text embeddings `(N, projection_dim)`.
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        let pooled = self.text_model.forward(input_ids)?.pooled;
        Ok(self.text_projection.forward(&pooled)?)
    }
}

/// CLIP with its tokenizer and image processor, scoring (image, prompt) pairs.
pub struct ClipScorer {
    pub model: ClipModel,
    pub tokenizer: ClipTokenizer,
    pub processor: ImageProcessorConfig,
    device: Device,
}

impl ClipScorer {
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        if !folder.is_dir() {
            return Err(ModelError::missing(folder, "CLIP model folder"));
        }
        let model = ClipModel::load(folder, device)?;
        let mut tokenizer = ClipTokenizer::load(folder)?;
        tokenizer.model_max_length = tokenizer.model_max_length.min(model.text_config.max_position_embeddings);
        let processor =
            ImageProcessorConfig::load(folder, ImageProcessorConfig::clip(model.vision_config.image_size), false)?;
        Ok(Self { model, tokenizer, processor, device: device.clone() })
    }

    /// `(N, L)` token ids, truncated to the model's length (torchmetrics truncates too).
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Tensor> {
        if prompts.is_empty() {
            return Err(ModelError::Input("no prompts".into()));
        }
        let ids = prompts.iter().map(|p| self.tokenizer.encode(p)).collect::<std::result::Result<Vec<_>, _>>()?;
        let l = ids[0].len();
        Ok(Tensor::from_vec(ids.concat(), (prompts.len(), l), &self.device)?)
    }

    /// Unnormalised image embeddings `(B, projection_dim)`.
    pub fn image_embeds(&self, images: &[&RgbImage]) -> Result<Tensor> {
        self.model.image_features(&self.processor.batch(images, &self.device)?)
    }

    /// Unnormalised text embeddings `(N, projection_dim)`.
    pub fn text_embeds(&self, prompts: &[&str]) -> Result<Tensor> {
        self.model.text_features(&self.tokenize(prompts)?)
    }

    /// `100 * cos(image_i, prompt_i)` for each pair (not clamped).
    pub fn pair_scores(&self, images: &[&RgbImage], prompts: &[&str]) -> Result<Vec<f32>> {
        if images.len() != prompts.len() {
            return Err(ModelError::Input(format!("{} images for {} prompts", images.len(), prompts.len())));
        }
        let img = l2_normalize(&self.image_embeds(images)?)?;
        let txt = l2_normalize(&self.text_embeds(prompts)?)?;
        Ok(((img * txt)?.sum(1)? * 100.0)?.to_vec1::<f32>()?)
    }
}

/// torchmetrics' `clip_score` over pair scores: `max(mean, 0)`; 0 for no pairs.
pub fn clip_score(pair_scores: &[f32]) -> f64 {
    if pair_scores.is_empty() {
        return 0.0;
    }
    let mean = pair_scores.iter().map(|&s| f64::from(s)).sum::<f64>() / pair_scores.len() as f64;
    mean.max(0.0)
}
