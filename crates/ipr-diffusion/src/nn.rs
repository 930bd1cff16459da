//! Layers and ops shared by the models, each written so that candle's autograd covers it.
//!
//! candle 0.11's fused `softmax_last_dim`, `layer_norm` and `rms_norm` have no backward (gradients
//! are silently dropped; see `docs/stack-notes.md`), so [`LayerNorm`], [`GroupNorm`] and
//! [`softmax`] are built from primitive ops here. [`Linear`] is this crate's own type: every
//! projection that LoRA may target (attention q/k/v/out of the UNet and the text encoders) is one,
//! so an adapter can be attached in one place.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::error::Result;

/// torch's default initialisation of `nn.Linear` / `nn.Conv2d` weights and biases
/// (`kaiming_uniform_(a=sqrt(5))`): uniform in `+-1/sqrt(fan_in)`. Only used when a model is
/// built from a `VarMap` (training from scratch); loading a checkpoint ignores it. Norms start at
/// weight 1, bias 0, as in torch.
pub fn torch_default_bound(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// `y = x W^T + b` over the last dimension of an input of any rank (torch's `nn.Linear`), plus an
/// optional LoRA adapter ([`crate::lora`]).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `(out_features, in_features)`, as torch stores it.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The module path in the checkpoint (`VarBuilder` prefix, e.g.
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`): what LoRA targets match
    /// and what adapter files are keyed by.
    pub path: String,
    /// A LoRA adapter, when one is attached.
    pub lora: Option<crate::lora::LoraAdapter>,
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias` is true) from `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bound = torch_default_bound(in_dim);
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", bound)?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", bound)?) } else { None };
        Ok(Self { weight, bias, path: vb.prefix(), lora: None })
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timed = crate::op_profile::scope("linear", x.device());
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        // In a graph on the CPU in f32 the ops take `x` of any rank: no reshape nodes, whose
        // gradients candle would zero-fill and add.
        if crate::fused::linear_forward_applies(x, &self.weight, self.bias.as_ref()) {
            let y = match self.lora.as_ref().filter(|l| !l.merged) {
                Some(lora) => crate::lora_linear::lora_linear(x, &self.weight, self.bias.as_ref(), lora)?,
                None => crate::fused::linear_no_frozen_grad(x, &self.weight, self.bias.as_ref())?,
            };
            if let Some(y) = y {
                crate::flops::add_product(2 * rows * in_dim * self.out_features());
                return Ok(y);
            }
        }
        let x2 = x.reshape((rows, in_dim))?;
        // An unmerged adapter's delta is added before the bias (the order of the sums is the
        // same on every path).
        let y = match self.lora.as_ref().filter(|l| !l.merged) {
            None => affine(&x2, &self.weight, self.bias.as_ref())?,
            Some(lora) => add_bias((affine(&x2, &self.weight, None)? + lora.delta(&x2)?)?, self.bias.as_ref())?,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_features();
        Ok(y.reshape(out_dims)?)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// Layer normalisation over the last dimension (Ba et al. 2016), from primitive ops.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?, bias: vb.get(dim, "bias")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timed = crate::op_profile::scope("layer_norm", x.device());
        if let Some(y) = crate::norm::layer_norm(x, &self.weight, &self.bias, self.eps)? {
            return Ok(y);
        }
        let xn = normalize_last_dim(x, self.eps)?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Group normalisation over `(B, C, ...)` inputs (Wu & He 2018), from primitive ops.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        Ok(Self { weight, bias: vb.get(channels, "bias")?, num_groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timed = crate::op_profile::scope("group_norm", x.device());
        if let Some(y) = crate::norm::group_norm(x, &self.weight, &self.bias, self.num_groups, self.eps, false)? {
            return Ok(y);
        }
        self.forward_primitive(x)
    }

    /// `silu(self.forward(x))`, fused on the CPU (the pattern of every resnet).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let _timed = crate::op_profile::scope("group_norm_silu", x.device());
        if let Some(y) = crate::norm::group_norm(x, &self.weight, &self.bias, self.num_groups, self.eps, true)? {
            return Ok(y);
        }
        silu(&self.forward_primitive(x)?)
    }

    fn forward_primitive(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let xg = x.reshape((b, self.num_groups, ()))?;
        let xn = normalize_last_dim(&xg, self.eps)?.reshape(dims.as_slice())?;
        let mut pshape = vec![1usize; dims.len()];
        pshape[1] = c;
        let w = self.weight.reshape(pshape.as_slice())?;
        let bias = self.bias.reshape(pshape.as_slice())?;
        Ok(xn.broadcast_mul(&w)?.broadcast_add(&bias)?)
    }
}

/// A 2-d convolution with torch's parameter layout `(out, in, kh, kw)`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// Loads a square-kernel convolution with bias.
    pub fn load(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(
                (out_c, in_c, kernel, kernel),
                "weight",
                torch_default_bound(in_c * kernel * kernel),
            )?,
            bias: Some(vb.get_with_hints(out_c, "bias", torch_default_bound(in_c * kernel * kernel))?),
            stride,
            padding,
        })
    }

    /// Counts this convolution's FLOPs on an input of `(B, C, H, W)` ([`crate::flops`]).
    pub fn count_flops(&self, (b, _, h, w): (usize, usize, usize, usize)) {
        if let Ok((co, ci, kh, kw)) = self.weight.dims4() {
            let out = |n: usize, k: usize| (n + 2 * self.padding).saturating_sub(k) / self.stride.max(1) + 1;
            crate::flops::add_product(2 * b * co * ci * kh * kw * out(h, kh) * out(w, kw));
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timed = crate::op_profile::scope("conv", x.device());
        if let Ok(dims) = x.dims4() {
            self.count_flops(dims);
        }
        if crate::fused::fast_conv_backward() {
            if let Some(y) = crate::conv::conv2d(x, &self.weight, self.bias.as_ref(), self.padding, self.stride)? {
                return Ok(y);
            }
        }
        if let Some(y) =
            crate::fused::conv2d_fast_backward(x, &self.weight, self.bias.as_ref(), self.padding, self.stride)?
        {
            return Ok(y);
        }
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?),
            None => Ok(y),
        }
    }
}

/// `x W^T (+ b)` for a 2-d `x`: the frozen-weight op where a gradient is needed
/// ([`crate::fused::linear_no_frozen_grad`]), candle's matmul otherwise.
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if let (Ok((m, k)), Ok(n)) = (x.dims2(), w.dim(0)) {
        crate::flops::add_product(2 * m * n * k);
    }
    if let Some(y) = crate::fused::linear_no_frozen_grad(x, w, b)? {
        return Ok(y);
    }
    if let Some(y) = crate::fused::linear_forward_no_grad(x, w, b)? {
        return Ok(y);
    }
    add_bias(x.matmul(&w.t()?)?, b)
}

fn add_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Softmax over the last dimension with a backward: fused on the CPU ([`crate::fused`]); on
/// other devices candle's fused kernel where no gradient is needed (sampling) and primitive ops
/// where one is (candle's `softmax_last_dim` has no backward); in f32 for half inputs.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = crate::fused::softmax_last_dim(x)? {
        return Ok(y);
    }
    let up = upcast(x)?;
    let y =
        if x.track_op() { candle_nn::ops::softmax(&up, D::Minus1)? } else { candle_nn::ops::softmax_last_dim(&up)? };
    Ok(y.to_dtype(x.dtype())?)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension, with a backward: fused on the CPU,
/// from primitive ops (in f32 for half inputs) elsewhere.
pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = crate::fused::normalize_last_dim(x, eps)? {
        return Ok(y);
    }
    let dtype = x.dtype();
    let x = upcast(x)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?)
}

/// Half-precision tensors as f32 (norm statistics and softmax need the range and precision, as
/// torch's kernels accumulate in f32); f32 and f64 pass through.
fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => Ok(x.to_dtype(DType::F32)?),
        _ => Ok(x.clone()),
    }
}

/// `x * sigmoid(1.702 x)` (OpenAI CLIP's activation).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let s = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    Ok((x * s)?)
}

/// The exact (erf) GELU, torch's `F.gelu` default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// `a * gelu(gate)` for `[a, gate]` the halves of `h`'s last dimension (diffusers' `GEGLU`):
/// fused on the CPU ([`crate::geglu`]), tensor ops elsewhere.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let _timed = crate::op_profile::scope("geglu", h.device());
    if let Some(y) = crate::geglu::geglu(h)? {
        return Ok(y);
    }
    let inner = h.dim(D::Minus1)? / 2;
    let (a, gate) = (h.narrow(D::Minus1, 0, inner)?, h.narrow(D::Minus1, inner, inner)?);
    Ok((a * gelu(&gate)?)?)
}

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// Multi-head scaled dot-product attention (Vaswani et al. 2017) over `(B, L, H*D)` projections,
/// with an optional additive mask broadcast to `(B, H, Lq, Lk)`; returns `(B, Lq, H*D)`.
/// Without a mask, attention whose scores exceed [`crate::attention::block_bytes`] runs block by
/// block ([`crate::attention`]): same result, memory bounded in the forward and the backward.
/// Outside a graph on the CPU (sampling, evaluation) without a mask, one op computes it
/// ([`crate::inference_attention`], the same bits).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let _timed = crate::op_profile::scope("attention", q.device());
    let (b, lq, inner) = q.dims3()?;
    crate::flops::add_attention(4 * b * heads * lq * k.dim(1)? * (inner / heads));
    if mask.is_none() {
        if let Some(out) = crate::inference_attention::attention_no_grad(q, k, v, heads)? {
            return Ok(out);
        }
    }
    attention_graph(q, k, v, heads, mask)
}

/// [`attention`] as tensor ops (every device, with gradients).
pub(crate) fn attention_graph(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, lq, inner) = q.dims3()?;
    let lk = k.dim(1)?;
    let d = inner / heads;
    if mask.is_none() && crate::attention::block_rows(b * heads, lq, lk).is_none() {
        if let Some(y) = crate::graph_attention::graph_attention(q, k, v, heads)? {
            return Ok(y);
        }
    }
    let split =
        |t: &Tensor, l: usize| -> Result<Tensor> { Ok(t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?) };
    let (q, k, v) = (split(q, lq)?, split(k, lk)?, split(v, lk)?);
    let scale = 1.0 / (d as f64).sqrt();
    if mask.is_none() {
        // The flash kernel (CUDA, half precision, no gradient), else blocks of query rows when the
        // whole score matrix would exceed the budget; both on `(B*H, L, D)`.
        let flat = |t: &Tensor, l: usize| t.reshape((b * heads, l, d));
        let (fq, fk, fv) = (flat(&q, lq)?, flat(&k, lk)?, flat(&v, lk)?);
        let out = match crate::attention::flash_attention(&fq, &fk, &fv, scale)? {
            Some(out) => Some(out),
            None => crate::attention::block_rows(b * heads, lq, lk)
                .map(|rows| crate::attention::blockwise_attention(&fq, &fk, &fv, scale, rows))
                .transpose()?,
        };
        if let Some(out) = out {
            return Ok(out.reshape((b, heads, lq, d))?.transpose(1, 2)?.reshape((b, lq, inner))?);
        }
    }
    let raw = q.matmul(&k.t()?)?;
    // Without a mask or a gradient (sampling): one kernel on CUDA, the same ops as below elsewhere.
    let probs = if mask.is_none() && !raw.track_op() {
        crate::attention::scaled_softmax(&raw, scale)?
    } else {
        let mut scores = (raw * scale)?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        softmax(&scores)?
    };
    let out = probs.matmul(&v)?;
    Ok(out.transpose(1, 2)?.reshape((b, lq, inner))?)
}

/// Additive causal mask `(L, L)`: 0 on and below the diagonal, a large negative value above.
pub fn causal_mask(len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..len).flat_map(|i| (0..len).map(move |j| if j > i { f32::MIN } else { 0.0 })).collect();
    Ok(Tensor::from_vec(v, (len, len), device)?.to_dtype(dtype)?)
}
