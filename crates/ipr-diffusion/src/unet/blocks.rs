//! The UNet's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` / `UpBlock2D`): resnets, optional spatial
//! transformers after each resnet, and a resampler between resolutions. The U-Net layout is
//! Ronneberger et al. 2015; this is the latent diffusion variant (Rombach et al. 2022).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::{Transformer2DModel, TransformerConfig};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::error::Result;
use crate::nn::Linear;

/// What every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub context_dim: usize,
    pub use_linear_projection: bool,
}

impl BlockCommon {
    fn resnet(&self, in_channels: usize, out_channels: usize, output_scale_factor: f64) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor,
        }
    }

    fn transformer(&self, channels: usize, heads: usize, num_layers: usize) -> TransformerConfig {
        TransformerConfig {
            in_channels: channels,
            heads,
            num_layers,
            context_dim: self.context_dim,
            groups: self.groups,
            use_linear_projection: self.use_linear_projection,
        }
    }
}

/// The linear layers of a block's resnets (time projections) and transformers, in module order.
fn block_linears<'a>(
    resnets: &'a mut [ResnetBlock2D],
    attentions: &'a mut [Transformer2DModel],
) -> Vec<&'a mut Linear> {
    let mut out: Vec<&mut Linear> = resnets.iter_mut().filter_map(|r| r.time_emb_proj.as_mut()).collect();
    out.extend(attentions.iter_mut().flat_map(|a| a.linears_mut()));
    out
}

/// Cross-attention parameters of a block, `None` for a block without attention.
#[derive(Debug, Clone, Copy)]
pub struct BlockAttention {
    pub heads: usize,
    pub transformer_layers: usize,
}

/// `CrossAttnDownBlock2D` (with attention) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        block_linears(&mut self.resnets, &mut self.attentions)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: VarBuilder,
        common: &BlockCommon,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        attn: Option<BlockAttention>,
        add_downsample: bool,
        downsample_padding: usize,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let cin = if i == 0 { in_channels } else { out_channels };
            resnets.push(ResnetBlock2D::load(vb.pp("resnets").pp(i), common.resnet(cin, out_channels, 1.0))?);
            if let Some(a) = attn {
                attentions.push(Transformer2DModel::load(
                    vb.pp("attentions").pp(i),
                    common.transformer(out_channels, a.heads, a.transformer_layers),
                )?);
            }
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::load(vb.pp("downsamplers").pp("0"), out_channels, downsample_padding)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and the skip connections it produced (one per resnet, plus the
    /// downsampled output).
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::new();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        block_linears(&mut self.resnets, &mut self.attentions)
    }

    pub fn load(
        vb: VarBuilder,
        common: &BlockCommon,
        channels: usize,
        attn: BlockAttention,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| {
                ResnetBlock2D::load(vb.pp("resnets").pp(i), common.resnet(channels, channels, output_scale_factor))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = vec![Transformer2DModel::load(
            vb.pp("attentions").pp("0"),
            common.transformer(channels, attn.heads, attn.transformer_layers),
        )?];
        Ok(Self { resnets, attentions })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// `CrossAttnUpBlock2D` (with attention) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        block_linears(&mut self.resnets, &mut self.attentions)
    }

    /// `in_channels`: channels of the deepest skip this block takes; `prev_output_channels`: of
    /// the previous up block's output.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: VarBuilder,
        common: &BlockCommon,
        in_channels: usize,
        out_channels: usize,
        prev_output_channels: usize,
        num_layers: usize,
        attn: Option<BlockAttention>,
        add_upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let skip = if i == num_layers - 1 { in_channels } else { out_channels };
            let cin = if i == 0 { prev_output_channels } else { out_channels };
            resnets.push(ResnetBlock2D::load(vb.pp("resnets").pp(i), common.resnet(cin + skip, out_channels, 1.0))?);
            if let Some(a) = attn {
                attentions.push(Transformer2DModel::load(
                    vb.pp("attentions").pp(i),
                    common.transformer(out_channels, a.heads, a.transformer_layers),
                )?);
            }
        }
        let upsampler =
            if add_upsample { Some(Upsample2D::load(vb.pp("upsamplers").pp("0"), out_channels)?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Consumes skips from the end of `skips`; `upsample_size` is the spatial size of the skip the
    /// next block will meet.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| crate::Error::Input("UNet ran out of skip connections".into()))?;
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, upsample_size)?;
        }
        Ok(h)
    }
}
