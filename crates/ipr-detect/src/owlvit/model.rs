//! `OwlViTForObjectDetection` (Minderer et al. 2022, "Simple Open-Vocabulary Object Detection with
//! Vision Transformers") forward pass, as transformers 5.24 computes it:
//!
//! 1. the CLIP vision tower; `post_layernorm` on every token; patch tokens multiplied by the class
//!    token; the detector's own `layer_norm` -> one feature per patch (= per box);
//! 2. the CLIP text tower (ipr-diffusion's, pooled at argmax(input_ids)), `text_projection`,
//!    L2-normalised -> one embedding per query;
//! 3. class head -> logits `(B, P, Q)`; box head + grid bias, sigmoid -> `(cx, cy, w, h)` in [0, 1];
//!    for OWLv2 (Minderer et al. 2023) also the objectness head -> `(B, P)`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder};
use ipr_diffusion::clip_text::ClipTextModel;

use super::config::{OwlVersion, OwlVitConfig};
use super::heads::{box_bias, BoxHead, ClassHead};
use crate::clip_vision::{l2_normalize, ClipVisionTransformer};
use crate::model_error::{ModelError, Result};

/// What one forward pass returns (transformers' `OwlViTObjectDetectionOutput`, the parts used).
#[derive(Debug, Clone)]
pub struct OwlVitOutput {
    /// `(B, P, Q)` class logits; padding queries hold `f32::MIN`.
    pub logits: Tensor,
    /// `(B, P, 4)` boxes `(cx, cy, w, h)` relative to the (resized) image.
    pub pred_boxes: Tensor,
    /// `(B, Q, projection_dim)` L2-normalised query embeddings.
    pub text_embeds: Tensor,
    /// `(B, grid, grid, D)` feature map (transformers' `image_embeds`).
    pub image_embeds: Tensor,
    /// OWLv2 only: `(B, P)` objectness logits.
    pub objectness_logits: Option<Tensor>,
}

/// An OWL-ViT detector's network.
pub struct OwlVit {
    pub config: OwlVitConfig,
    text_model: ClipTextModel,
    text_projection: candle_nn::Linear,
    vision_model: ClipVisionTransformer,
    layer_norm: LayerNorm,
    class_head: ClassHead,
    box_head: BoxHead,
    objectness_head: Option<BoxHead>,
    box_bias: Tensor,
}

impl OwlVit {
    /// Loads `folder/config.json` and `folder/model.safetensors`.
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        let config = OwlVitConfig::load(&folder.join("config.json"))?;
        let weights = folder.join("model.safetensors");
        if !weights.exists() {
            return Err(ModelError::missing(&weights, "OWL-ViT/OWLv2 weights"));
        }
        ipr_diffusion::source::check_safetensors(&weights)?;
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(std::slice::from_ref(&weights), DType::F32, device) }
            .map_err(|source| ModelError::Weights { path: weights.clone(), source })?;
        Self::new(vb, config).map_err(|e| match e {
            ModelError::Candle(source) => ModelError::Weights { path: weights.clone(), source },
            ModelError::Diffusion(ipr_diffusion::Error::Candle(source)) => {
                ModelError::Weights { path: weights, source }
            }
            e => e,
        })
    }

    /// Builds the model from a `VarBuilder` at the checkpoint's root.
    pub fn new(vb: VarBuilder, config: OwlVitConfig) -> Result<Self> {
        let owl = vb.pp(config.version.prefix());
        let (dt, dv) = (config.text_config.hidden_size, config.vision_config.hidden_size);
        let text_model = ClipTextModel::new(owl.clone(), config.text_config.clone())?;
        let text_projection = candle_nn::linear_no_bias(dt, config.projection_dim, owl.pp("text_projection"))?;
        let vision_model = ClipVisionTransformer::load(owl.pp("vision_model"), &config.vision_config, "pre_layernorm")?;
        let ln = LayerNormConfig { eps: config.vision_config.layer_norm_eps, ..Default::default() };
        let grid = config.vision_config.grid();
        Ok(Self {
            text_model,
            text_projection,
            vision_model,
            layer_norm: layer_norm(dv, ln, vb.pp("layer_norm"))?,
            class_head: ClassHead::load(vb.pp("class_head"), dv, dt)?,
            box_head: BoxHead::load(vb.pp("box_head"), dv, 4)?,
            objectness_head: match config.version {
                OwlVersion::V1 => None,
                OwlVersion::V2 => Some(BoxHead::load(vb.pp("objectness_head"), dv, 1)?),
            },
            box_bias: box_bias(grid, grid, vb.device())?,
            config,
        })
    }

    /// Query embeddings `(N, projection_dim)`, L2-normalised, for `(N, L)` token ids.
    pub fn text_embeds(&self, input_ids: &Tensor) -> Result<Tensor> {
        let pooled = self.text_model.forward(input_ids)?.pooled;
        l2_normalize(&self.text_projection.forward(&pooled)?)
    }

    /// Per-patch features `(B, P, D)` for `(B, 3, S, S)` pixel values.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let last = self.vision_model.forward(pixel_values)?;
        let embeds = self.vision_model.post_layernorm.forward(&last)?;
        let tokens = embeds.dim(1)?;
        let cls = embeds.narrow(1, 0, 1)?;
        let patches = embeds.narrow(1, 1, tokens - 1)?.broadcast_mul(&cls)?;
        Ok(self.layer_norm.forward(&patches)?)
    }

    /// Detection from image features and query embeddings (`(B, Q, D)`, mask `(B, Q)` u8).
    pub fn heads(&self, image_feats: &Tensor, query_embeds: &Tensor, query_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.class_head.forward(image_feats, query_embeds, query_mask)?;
        let boxes = self.box_head.forward(image_feats)?.broadcast_add(&self.box_bias)?;
        Ok((logits, candle_nn::ops::sigmoid(&boxes)?))
    }

    /// transformers' `model(input_ids, pixel_values)`: `pixel_values (B, 3, S, S)` and
    /// `input_ids (B * Q, L)` (queries of image 0, then image 1, ...).
    pub fn forward(&self, pixel_values: &Tensor, input_ids: &Tensor) -> Result<OwlVitOutput> {
        let b = pixel_values.dim(0)?;
        let (n, _) = input_ids.dims2()?;
        if b == 0 || n == 0 || n % b != 0 {
            return Err(ModelError::Input(format!("{n} text queries for {b} images: need the same number per image")));
        }
        let q = n / b;
        let text_embeds = self.text_embeds(input_ids)?;
        let query_embeds = text_embeds.reshape((b, q, self.config.projection_dim))?;
        // transformers: a query is real iff its first token id is > 0.
        let first: Vec<u8> = input_ids
            .to_dtype(DType::U32)?
            .narrow(1, 0, 1)?
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .map(|&t| u8::from(t > 0))
            .collect();
        let query_mask = Tensor::from_vec(first, (b, q), input_ids.device())?;
        let feats = self.image_features(pixel_values)?;
        let (logits, pred_boxes) = self.heads(&feats, &query_embeds, &query_mask)?;
        let grid = self.config.vision_config.grid();
        let objectness_logits = match &self.objectness_head {
            Some(h) => Some(h.forward(&feats)?.squeeze(2)?),
            None => None,
        };
        let image_embeds = feats.reshape((b, grid, grid, self.config.vision_config.hidden_size))?;
        Ok(OwlVitOutput { logits, pred_boxes, text_embeds: query_embeds, image_embeds, objectness_logits })
    }
}
