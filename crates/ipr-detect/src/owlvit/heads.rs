//! OWL-ViT's detection heads (Minderer et al. 2022, "Simple Open-Vocabulary Object Detection with
//! Vision Transformers", section 3.1), as transformers' `OwlViTClassPredictionHead`,
//! `OwlViTBoxPredictionHead` and `compute_box_bias`.
//!
//! Every output token of the image encoder is one box. The class head compares a projection of
//! the token with each text query by cosine similarity, then shifts and scales the logit per token;
//! the box head is a 3-layer MLP whose `(cx, cy, w, h)` output is biased toward the token's grid
//! position (the *corner* `(i + 1) / n` of its cell, transformers' quirk that we keep) and size.

use candle_core::{Device, Module, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};

use crate::model_error::Result;

/// `class_head`: image tokens and query embeddings -> logits `(B, P, Q)`.
pub struct ClassHead {
    dense0: Linear,
    logit_shift: Linear,
    logit_scale: Linear,
}

fn normalize_eps(x: &Tensor) -> Result<Tensor> {
    // transformers: x / (||x|| + 1e-6).
    Ok(x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-6)?)?)
}

impl ClassHead {
    pub fn load(vb: VarBuilder, vision_width: usize, text_width: usize) -> Result<Self> {
        Ok(Self {
            dense0: linear(vision_width, text_width, vb.pp("dense0"))?,
            logit_shift: linear(vision_width, 1, vb.pp("logit_shift"))?,
            logit_scale: linear(vision_width, 1, vb.pp("logit_scale"))?,
        })
    }

    /// `image_feats (B, P, Dv)`, `query_embeds (B, Q, Dt)`, `query_mask (B, Q)` (1 = real query).
    pub fn forward(&self, image_feats: &Tensor, query_embeds: &Tensor, query_mask: &Tensor) -> Result<Tensor> {
        let image_class = normalize_eps(&self.dense0.forward(image_feats)?)?;
        let queries = normalize_eps(query_embeds)?;
        let logits = image_class.matmul(&queries.transpose(1, 2)?.contiguous()?)?; // (B, P, Q)
        let shift = self.logit_shift.forward(image_feats)?; // (B, P, 1)
        let scale = (self.logit_scale.forward(image_feats)?.elu(1.0)? + 1.0)?;
        let logits = logits.broadcast_add(&shift)?.broadcast_mul(&scale)?;
        // Padding queries get the most negative float (torch.finfo(float32).min).
        let (b, p, q) = logits.dims3()?;
        let mask = query_mask.unsqueeze(1)?.broadcast_as((b, p, q))?;
        let floor = Tensor::full(f32::MIN, (b, p, q), logits.device())?;
        Ok(mask.where_cond(&logits, &floor)?)
    }
}

/// `box_head`: image tokens -> raw box offsets `(B, P, 4)`; with one output, OWLv2's
/// `objectness_head` (same MLP).
pub struct BoxHead {
    dense0: Linear,
    dense1: Linear,
    dense2: Linear,
}

impl BoxHead {
    pub fn load(vb: VarBuilder, width: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            dense0: linear(width, width, vb.pp("dense0"))?,
            dense1: linear(width, width, vb.pp("dense1"))?,
            dense2: linear(width, out_dim, vb.pp("dense2"))?,
        })
    }

    pub fn forward(&self, image_feats: &Tensor) -> Result<Tensor> {
        let h = self.dense0.forward(image_feats)?.gelu_erf()?;
        let h = self.dense1.forward(&h)?.gelu_erf()?;
        Ok(self.dense2.forward(&h)?)
    }
}

/// `compute_box_bias(h, w)`: `(h * w, 4)` logits of the cell corner `(x, y)` and of the cell size,
/// in row-major token order. Computed in f32 as torch does.
pub fn box_bias(grid_h: usize, grid_w: usize, device: &Device) -> Result<Tensor> {
    let inv_sigmoid = |v: f32| (v + 1e-4).ln() - (-v + 1e-4f32).ln_1p();
    let (size_w, size_h) = (inv_sigmoid(1.0 / grid_w as f32), inv_sigmoid(1.0 / grid_h as f32));
    let mut out = Vec::with_capacity(grid_h * grid_w * 4);
    for i in 0..grid_h {
        for j in 0..grid_w {
            let x = ((j + 1) as f32 / grid_w as f32).clamp(0.0, 1.0);
            let y = ((i + 1) as f32 / grid_h as f32).clamp(0.0, 1.0);
            out.extend([inv_sigmoid(x), inv_sigmoid(y), size_w, size_h]);
        }
    }
    Ok(Tensor::from_vec(out, (grid_h * grid_w, 4), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_bias_centres_cells_and_sizes() {
        let b = box_bias(2, 4, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        // Token 1 is row 0, column 1: corner (2/4, 1/2), size (1/4, 1/2).
        assert!((sig(b[1][0]) - 0.5).abs() < 1e-3 && (sig(b[1][1]) - 0.5).abs() < 1e-3);
        assert!((sig(b[1][2]) - 0.25).abs() < 1e-3 && (sig(b[1][3]) - 0.5).abs() < 1e-3);
        assert_eq!(b.len(), 8);
    }
}
