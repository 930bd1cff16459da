//! The spatial transformer of latent diffusion (Rombach et al. 2022, "High-Resolution Image
//! Synthesis with Latent Diffusion Models", sec. 3.3): diffusers' `Transformer2DModel` with
//! `BasicTransformerBlock`s (self-attention `attn1`, cross-attention `attn2` on the text
//! embeddings, GEGLU feed-forward of Shazeer 2020), and the `Attention` module they share with the
//! VAE's mid block.
//!
//! `to_q`, `to_k`, `to_v` and `to_out.0` are [`Linear`]s: the projections LoRA targets.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::nn::{attention, Conv2d, GroupNorm, LayerNorm, Linear};

/// diffusers' `Attention` with the default processor: multi-head scaled dot-product attention.
#[derive(Debug, Clone)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// `to_out.0` (`to_out.1` is dropout).
    pub to_out: Linear,
    pub heads: usize,
}

impl Attention {
    /// `query_dim` channels in and out, `context_dim` for keys and values (cross-attention), `heads`
    /// heads of `dim_head` channels, `bias` on q/k/v (the UNet has none, the VAE has).
    pub fn load(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        bias: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::load(vb.pp("to_q"), query_dim, inner, bias)?,
            to_k: Linear::load(vb.pp("to_k"), ctx, inner, bias)?,
            to_v: Linear::load(vb.pp("to_v"), ctx, inner, bias)?,
            to_out: Linear::load(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.to_q, &mut self.to_k, &mut self.to_v, &mut self.to_out]
    }

    /// `x` is `(B, L, C)`; `context` `(B, S, D)` for cross-attention, `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        self.to_out.forward(&attention(&q, &k, &v, self.heads, None)?)
    }
}

/// `FeedForward` with `activation_fn="geglu"`: `net.2(h * gelu(gate))` where `[h, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    pub fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::load(vb.pp("net").pp("0").pp("proj"), dim, 2 * inner, true)?,
            out: Linear::load(vb.pp("net").pp("2"), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        self.out.forward(&crate::nn::geglu(&h)?)
    }
}

/// `BasicTransformerBlock` with layer norms: self-attention, cross-attention, feed-forward, each
/// pre-normed and residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(vb: VarBuilder, dim: usize, heads: usize, dim_head: usize, context_dim: usize) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(vb.pp("attn1"), dim, None, heads, dim_head, false)?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(vb.pp("attn2"), dim, Some(context_dim), heads, dim_head, false)?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = self.attn1.linears_mut();
        out.extend(self.attn2.linears_mut());
        out.extend([&mut self.ff.proj, &mut self.ff.out]);
        out
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + &x)?)
    }
}

/// `proj_in` / `proj_out`: 1x1 convolutions (SD 1.x) or linears (`use_linear_projection`, SD 2.x, SDXL).
#[derive(Debug, Clone)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::load(vb, in_dim, out_dim, true)?)
        } else {
            Projection::Conv(Conv2d::load(vb, in_dim, out_dim, 1, 1, 0)?)
        })
    }
}

/// `Transformer2DModel` on continuous inputs: group norm, `proj_in`, transformer blocks over the
/// `H*W` positions, `proj_out`, plus the input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

/// Shape parameters of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub in_channels: usize,
    pub heads: usize,
    pub num_layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn load(vb: VarBuilder, c: TransformerConfig) -> Result<Self> {
        let dim_head = c.in_channels / c.heads;
        let inner = c.heads * dim_head;
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), c.groups, c.in_channels, 1e-6)?,
            proj_in: Projection::load(vb.pp("proj_in"), c.in_channels, inner, c.use_linear_projection)?,
            transformer_blocks: (0..c.num_layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        vb.pp("transformer_blocks").pp(i),
                        inner,
                        c.heads,
                        dim_head,
                        c.context_dim,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            proj_out: Projection::load(vb.pp("proj_out"), inner, c.in_channels, c.use_linear_projection)?,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        if let Projection::Linear(l) = &mut self.proj_in {
            out.push(l);
        }
        out.extend(self.transformer_blocks.iter_mut().flat_map(|b| b.linears_mut()));
        if let Projection::Linear(l) = &mut self.proj_out {
            out.push(l);
        }
        out
    }

    /// `x` is `(B, C, H, W)`, `context` `(B, S, D)`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))?)
        };
        let mut t = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&n)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(n)?)?,
        };
        for block in &self.transformer_blocks {
            t = block.forward(&t, context)?;
        }
        let to_map = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            Ok(t.reshape((b, h, w, ch))?.permute((0, 3, 1, 2))?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(t)?.contiguous()?)?,
            Projection::Linear(lin) => to_map(lin.forward(&t)?)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        Ok((out + x)?)
    }
}
