//! The CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From
//! Natural Language Supervision"), as transformers' `CLIPTextModel` and
//! `CLIPTextModelWithProjection`: token + position embeddings, pre-norm causal self-attention
//! layers, a final layer norm, and the pooled output at the EOS position.
//!
//! Parameter names are transformers' (`embeddings.token_embedding`, `encoder.layers.N.self_attn.
//! q_proj`, ...), with or without the `text_model.` prefix (transformers 5 may drop it on save,
//! real repositories have it). q/k/v/out projections are [`Linear`]s so LoRA can target them.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;

use crate::config::ClipTextConfig;
use crate::error::{Error, Result};
use crate::nn::{attention, causal_mask, gelu, quick_gelu, LayerNorm, Linear};

/// One pre-norm transformer layer.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm1: LayerNorm,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    heads: usize,
    quick: bool,
}

impl ClipEncoderLayer {
    fn load(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        let a = vb.pp("self_attn");
        Ok(Self {
            q_proj: Linear::load(a.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(a.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(a.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(a.pp("out_proj"), d, d, true)?,
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), d, c.layer_norm_eps)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::load(vb.pp("mlp").pp("fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::load(vb.pp("mlp").pp("fc2"), c.intermediate_size, d, true)?,
            heads: c.num_attention_heads,
            quick: c.hidden_act == "quick_gelu",
        })
    }

    /// Every linear layer (q, k, v, out, fc1, fc2).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.q_proj, &mut self.k_proj, &mut self.v_proj, &mut self.out_proj, &mut self.fc1, &mut self.fc2]
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let (q, k, v) = (self.q_proj.forward(&h)?, self.k_proj.forward(&h)?, self.v_proj.forward(&h)?);
        let a = attention(&q, &k, &v, self.heads, Some(mask))?;
        let x = (x + self.out_proj.forward(&a)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = if self.quick { quick_gelu(&h)? } else { gelu(&h)? };
        Ok((&x + self.fc2.forward(&h)?)?)
    }
}

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// Output of the final layer norm, `(B, L, D)`.
    pub last_hidden_state: Tensor,
    /// Input of the last layer (transformers' `hidden_states[-2]`), `(B, L, D)`; SDXL's embedding.
    pub penultimate_hidden_state: Tensor,
    /// `last_hidden_state` at the EOS position, projected by `text_projection` when the model has
    /// one (`text_embeds`), `(B, D or projection_dim)`.
    pub pooled: Tensor,
}

/// A CLIP text encoder loaded from a `text_encoder*/` folder.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub token_embedding: Tensor,
    pub position_embedding: Tensor,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    /// `(projection_dim, hidden_size)`, only in `CLIPTextModelWithProjection` checkpoints.
    pub text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Loads `folder/config.json` and `folder/model.safetensors`.
    pub fn load(folder: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = ClipTextConfig::load(&folder.join("config.json"))?;
        let files = crate::source::weight_files(folder, "model")?;
        let vb = crate::source::mmap_weights(&files, dtype, device)?;
        Self::new(vb, config).map_err(|e| crate::source::in_weights(e, &files))
    }

    /// Builds the model from a `VarBuilder` at the checkpoint's root.
    pub fn new(vb: VarBuilder, config: ClipTextConfig) -> Result<Self> {
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let d = config.hidden_size;
        let emb = tm.pp("embeddings");
        // transformers' CLIP init (used only when building from a VarMap): normal, std 0.02.
        let normal = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let token_embedding = emb.pp("token_embedding").get_with_hints((config.vocab_size, d), "weight", normal)?;
        let position_embedding =
            emb.pp("position_embedding").get_with_hints((config.max_position_embeddings, d), "weight", normal)?;
        let mut layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(tm.pp("encoder").pp("layers").pp(i), &config))
            .collect::<Result<Vec<_>>>()?;
        // Module paths (LoRA keys) are transformers' module names, which always have `text_model.`.
        for layer in &mut layers {
            for lin in layer.linears_mut() {
                if !lin.path.starts_with("text_model.") {
                    lin.path = format!("text_model.{}", lin.path);
                }
            }
        }
        let final_layer_norm = LayerNorm::load(tm.pp("final_layer_norm"), d, config.layer_norm_eps)?;
        let text_projection = if config.with_projection() {
            Some(Linear::load(vb.pp("text_projection"), d, config.projection_dim, false)?)
        } else {
            None
        };
        Ok(Self { config, token_embedding, position_embedding, layers, final_layer_norm, text_projection })
    }

    /// Every linear layer, with its module path in [`Linear::path`] (LoRA attaches through this).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out: Vec<&mut Linear> = self.layers.iter_mut().flat_map(|l| l.linears_mut()).collect();
        out.extend(self.text_projection.as_mut());
        out
    }

    /// Runs the encoder on `(B, L)` token ids (u32).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, l) = input_ids.dims2()?;
        if l > self.config.max_position_embeddings {
            return Err(Error::Input(format!("{l} tokens for {} positions", self.config.max_position_embeddings)));
        }
        let tok = self.token_embedding.index_select(&input_ids.flatten_all()?, 0)?.reshape((
            b,
            l,
            self.config.hidden_size,
        ))?;
        let mut x = tok.broadcast_add(&self.position_embedding.i(..l)?)?;
        let mask = causal_mask(l, x.dtype(), x.device())?;
        let mut penultimate = x.clone();
        for layer in &self.layers {
            penultimate = x.clone();
            x = layer.forward(&x, &mask)?;
        }
        let last = self.final_layer_norm.forward(&x)?;
        // transformers: with the legacy eos_token_id 2 the EOS is found as argmax(input_ids) (the
        // EOS has the largest id in CLIP's vocabulary); otherwise the first eos_token_id.
        let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(b_i, row)| {
                let pos = if self.config.eos_token_id == 2 {
                    row.iter().enumerate().max_by_key(|(i, &v)| (v, std::cmp::Reverse(*i))).map(|(i, _)| i)
                } else {
                    row.iter().position(|&v| v as i64 == self.config.eos_token_id)
                };
                (b_i * l + pos.unwrap_or(l - 1)) as u32
            })
            .collect();
        let idx = Tensor::new(rows, last.device())?;
        let flat = last.reshape((b * l, self.config.hidden_size))?;
        let mut pooled = flat.index_select(&idx, 0)?;
        if let Some(p) = &self.text_projection {
            pooled = p.forward(&pooled)?;
        }
        Ok(ClipTextOutput { last_hidden_state: last, penultimate_hidden_state: penultimate, pooled })
    }
}
