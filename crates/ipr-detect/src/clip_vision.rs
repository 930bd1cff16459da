//! The CLIP vision transformer (Radford et al. 2021, "Learning Transferable Visual Models From
//! Natural Language Supervision"; ViT of Dosovitskiy et al. 2021), as transformers'
//! `CLIPVisionTransformer` and `OwlViTVisionTransformer`: patch embedding without bias, a class
//! token, learned positions, a pre-norm (`pre_layrnorm` in CLIP, `pre_layernorm` in OWL-ViT),
//! pre-norm self-attention layers and `post_layernorm`.
//!
//! Inference only, so candle's fused softmax and layer norm are used (they have no backward,
//! which does not matter here). Parameter names are transformers'.

use candle_core::{Module, Tensor, D};
use candle_nn::{layer_norm, linear, LayerNorm, LayerNormConfig, Linear, VarBuilder};
use serde::Deserialize;

use crate::model_error::Result;

fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_3() -> usize {
    3
}

/// `vision_config` of a CLIP or OWL-ViT checkpoint (keys as transformers writes them).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Side of the square input the position embeddings were trained for.
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "d_3")]
    pub num_channels: usize,
    /// `quick_gelu` (OpenAI CLIP, OWL-ViT) or `gelu`.
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

fn act(x: &Tensor, quick: bool) -> Result<Tensor> {
    Ok(if quick { (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)? } else { x.gelu_erf()? })
}

struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    quick: bool,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        let d = c.hidden_size;
        let a = vb.pp("self_attn");
        let ln = LayerNormConfig { eps: c.layer_norm_eps, ..Default::default() };
        Ok(Self {
            q_proj: linear(d, d, a.pp("q_proj"))?,
            k_proj: linear(d, d, a.pp("k_proj"))?,
            v_proj: linear(d, d, a.pp("v_proj"))?,
            out_proj: linear(d, d, a.pp("out_proj"))?,
            layer_norm1: layer_norm(d, ln, vb.pp("layer_norm1"))?,
            layer_norm2: layer_norm(d, ln, vb.pp("layer_norm2"))?,
            fc1: linear(d, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            heads: c.num_attention_heads,
            quick: c.hidden_act == "quick_gelu",
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.heads;
        let h = self.layer_norm1.forward(x)?;
        let split =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, l, self.heads, hd))?.transpose(1, 2)?.contiguous()?) };
        let q = split((self.q_proj.forward(&h)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&h)?)?;
        let v = split(self.v_proj.forward(&h)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        let x = (x + self.out_proj.forward(&a)?)?;
        let h = act(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?, self.quick)?;
        Ok((&x + self.fc2.forward(&h)?)?)
    }
}

/// The vision tower; `forward` returns the last hidden state `(B, 1 + patches, D)` before
/// `post_layernorm`, which callers apply as their model does (to the class token for CLIP's
/// pooled output, to every token for OWL-ViT's feature map).
pub struct ClipVisionTransformer {
    pub config: ClipVisionConfig,
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layernorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    pub post_layernorm: LayerNorm,
}

impl ClipVisionTransformer {
    /// Loads the tower under `vb` (`vision_model` of a checkpoint); `pre_norm` is the pre-norm's
    /// parameter name, `pre_layrnorm` (CLIP) or `pre_layernorm` (OWL-ViT).
    pub fn load(vb: VarBuilder, config: &ClipVisionConfig, pre_norm: &str) -> Result<Self> {
        let d = config.hidden_size;
        let emb = vb.pp("embeddings");
        let p = config.patch_size;
        let positions = config.grid() * config.grid() + 1;
        let ln = LayerNormConfig { eps: config.layer_norm_eps, ..Default::default() };
        Ok(Self {
            class_embedding: emb.get(d, "class_embedding")?,
            patch_embedding: emb.pp("patch_embedding").get((d, config.num_channels, p, p), "weight")?,
            position_embedding: emb.pp("position_embedding").get((positions, d), "weight")?,
            pre_layernorm: layer_norm(d, ln, vb.pp(pre_norm))?,
            layers: (0..config.num_hidden_layers)
                .map(|i| EncoderLayer::load(vb.pp("encoder").pp("layers").pp(i), config))
                .collect::<Result<_>>()?,
            post_layernorm: layer_norm(d, ln, vb.pp("post_layernorm"))?,
            config: config.clone(),
        })
    }

    /// `(B, 3, image_size, image_size)` pixel values -> last hidden state `(B, 1 + P, D)`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, _, _, _) = pixel_values.dims4()?;
        let d = self.config.hidden_size;
        let p = self.config.patch_size;
        let patches = pixel_values.conv2d(&self.patch_embedding, 0, p, 1, 1)?; // (B, D, gh, gw)
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // (B, P, D)
        let cls = self.class_embedding.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        if x.dim(1)? != self.position_embedding.dim(0)? {
            return Err(crate::model_error::ModelError::Input(format!(
                "pixel values of {:?} give {} tokens, the model has {} positions (image_size {})",
                pixel_values.dims(),
                x.dim(1)?,
                self.position_embedding.dim(0)?,
                self.config.image_size
            )));
        }
        let mut x = self.pre_layernorm.forward(&x.broadcast_add(&self.position_embedding)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(x)
    }

    /// CLIP's pooled output: `post_layernorm` of the class token, `(B, D)`.
    pub fn pooled(&self, last_hidden_state: &Tensor) -> Result<Tensor> {
        let cls = last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.post_layernorm.forward(&cls)?)
    }
}

/// `x / ||x||_2` over the last dimension.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?)
}
