//! The residual block and the resampling layers of the UNet and the VAE, as diffusers'
//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (the DDPM UNet of Ho et al. 2020, after
//! the Wide ResNet blocks of Zagoruyko & Komodakis 2016, with group norm and a time embedding
//! added between the two convolutions).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::nn::{silu, Conv2d, GroupNorm, Linear};
use crate::resnet_branch::{resnet_branch, ResnetBranch};

/// `ResnetBlock2D` with `time_embedding_norm="default"`: norm, SiLU, conv, + projected time
/// embedding, norm, SiLU, conv, plus a 1x1 shortcut when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    /// Absent in the VAE (no time embedding).
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f64,
}

/// Shape parameters of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `None` for blocks without a time embedding (the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(vb: VarBuilder, c: ResnetConfig) -> Result<Self> {
        let (i, o) = (c.in_channels, c.out_channels);
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), c.groups, i, c.eps)?,
            conv1: Conv2d::load(vb.pp("conv1"), i, o, 3, 1, 1)?,
            time_emb_proj: match c.temb_channels {
                Some(t) => Some(Linear::load(vb.pp("time_emb_proj"), t, o, true)?),
                None => None,
            },
            norm2: GroupNorm::load(vb.pp("norm2"), c.groups, o, c.eps)?,
            conv2: Conv2d::load(vb.pp("conv2"), o, o, 3, 1, 1)?,
            conv_shortcut: if i != o { Some(Conv2d::load(vb.pp("conv_shortcut"), i, o, 1, 1, 0)?) } else { None },
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `x` is `(B, C, H, W)`; `temb` is `(B, T)` (already the UNet's time embedding).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(&silu(t)?)?.unsqueeze(2)?.unsqueeze(3)?),
            _ => None,
        };
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let layers = ResnetBranch {
            norm1: &self.norm1,
            conv1: &self.conv1,
            temb: t.as_ref(),
            norm2: &self.norm2,
            conv2: &self.conv2,
            skip: &skip,
        };
        let out = match resnet_branch(x, &layers)? {
            Some(out) => out,
            None => {
                let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
                if let Some(t) = &t {
                    h = h.broadcast_add(t)?;
                }
                (skip + self.conv2.forward(&self.norm2.forward_silu(&h)?)?)?
            }
        };
        if self.output_scale_factor != 1.0 {
            return Ok((out / self.output_scale_factor)?);
        }
        Ok(out)
    }
}

/// `Downsample2D` with a convolution: stride 2, `padding` on all sides; padding 0 means diffusers'
/// asymmetric `(0, 1, 0, 1)` zero padding first (the VAE encoder).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pub padding: usize,
}

impl Downsample2D {
    pub fn load(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::load(vb.pp("conv"), channels, channels, 3, 2, padding)?, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            return self.conv.forward(&x);
        }
        self.conv.forward(x)
    }
}

/// `Upsample2D` with a convolution: nearest-neighbour resize (to 2x, or to the size of the skip
/// connection it will meet), then a 3x3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::load(vb.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let up = {
            let _timed = crate::op_profile::scope("upsample", x.device());
            match crate::upsample::upsample_nearest(x, (th, tw))? {
                Some(up) => up,
                None => x.upsample_nearest2d(th, tw)?,
            }
        };
        self.conv.forward(&up)
    }
}
