//! The KL autoencoder of latent diffusion (Rombach et al. 2022, sec. 3; the VAE of Kingma &
//! Welling 2014 with a KL-regularised latent), as diffusers' `AutoencoderKL`: encoder to the mean
//! of the latent distribution, decoder from latents to images in [-1, 1]. Frozen in ipr: it is only
//! run forward. Latents seen by the UNet are `scaling_factor * (z - shift_factor)`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::VaeConfig;
use crate::error::Result;
use crate::nn::{attention, silu, Conv2d, GroupNorm, Linear};
use crate::unet::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};

const EPS: f64 = 1e-6;

/// The single-head spatial self-attention of the VAE's mid block (group norm, q/k/v with bias,
/// residual).
#[derive(Debug, Clone)]
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl VaeAttention {
    fn load(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::load(vb.pp("group_norm"), groups, channels, EPS)?,
            to_q: Linear::load(vb.pp("to_q"), channels, channels, true)?,
            to_k: Linear::load(vb.pp("to_k"), channels, channels, true)?,
            to_v: Linear::load(vb.pp("to_v"), channels, channels, true)?,
            to_out: Linear::load(vb.pp("to_out").pp("0"), channels, channels, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.group_norm.forward(x)?;
        let t = n.reshape((b, c, h * w))?.transpose(1, 2)?;
        let (q, k, v) = (self.to_q.forward(&t)?, self.to_k.forward(&t)?, self.to_v.forward(&t)?);
        let a = self.to_out.forward(&attention(&q, &k, &v, 1, None)?)?;
        let a = a.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((a + x)?)
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<VaeAttention>,
}

fn resnet(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<ResnetBlock2D> {
    ResnetBlock2D::load(
        vb,
        ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups,
            eps: EPS,
            output_scale_factor: 1.0,
        },
    )
}

impl VaeMidBlock {
    fn load(vb: VarBuilder, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        Ok(Self {
            resnets: (0..2)
                .map(|i| resnet(vb.pp("resnets").pp(i), channels, channels, groups))
                .collect::<Result<Vec<_>>>()?,
            attention: if add_attention {
                Some(VaeAttention::load(vb.pp("attentions").pp("0"), channels, groups)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

/// One resolution level of the encoder or decoder.
#[derive(Debug, Clone)]
pub struct VaeLevel {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
    pub upsampler: Option<Upsample2D>,
}

/// The encoder: image to the parameters of the latent Gaussian.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<VaeLevel>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// The decoder: latents to an image.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<VaeLevel>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Loads `folder/config.json` and `folder/diffusion_pytorch_model.safetensors`.
    pub fn load(folder: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = VaeConfig::load(&folder.join("config.json"))?;
        let files = crate::source::weight_files(folder, "diffusion_pytorch_model")?;
        let vb = crate::source::mmap_weights(&files, dtype, device)?;
        Self::new(vb, config).map_err(|e| crate::source::in_weights(e, &files))
    }

    /// Builds the model from a `VarBuilder` at the checkpoint's root.
    pub fn new(vb: VarBuilder, config: VaeConfig) -> Result<Self> {
        let boc = &config.block_out_channels;
        let n = boc.len();
        let g = config.norm_num_groups;
        let lat = config.latent_channels;
        let ev = vb.pp("encoder");
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let b = ev.pp("down_blocks").pp(i);
            down_blocks.push(VaeLevel {
                resnets: (0..config.layers_per_block)
                    .map(|j| resnet(b.pp("resnets").pp(j), if j == 0 { in_c } else { out_c }, out_c, g))
                    .collect::<Result<Vec<_>>>()?,
                downsampler: if i < n - 1 {
                    Some(Downsample2D::load(b.pp("downsamplers").pp("0"), out_c, 0)?)
                } else {
                    None
                },
                upsampler: None,
            });
        }
        let encoder = Encoder {
            conv_in: Conv2d::load(ev.pp("conv_in"), config.in_channels, boc[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::load(ev.pp("mid_block"), boc[n - 1], g, config.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(ev.pp("conv_norm_out"), g, boc[n - 1], EPS)?,
            conv_out: Conv2d::load(ev.pp("conv_out"), boc[n - 1], 2 * lat, 3, 1, 1)?,
        };

        let dv = vb.pp("decoder");
        let rev: Vec<usize> = boc.iter().rev().cloned().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let b = dv.pp("up_blocks").pp(i);
            up_blocks.push(VaeLevel {
                resnets: (0..config.layers_per_block + 1)
                    .map(|j| resnet(b.pp("resnets").pp(j), if j == 0 { prev } else { out_c }, out_c, g))
                    .collect::<Result<Vec<_>>>()?,
                downsampler: None,
                upsampler: if i < n - 1 { Some(Upsample2D::load(b.pp("upsamplers").pp("0"), out_c)?) } else { None },
            });
        }
        let decoder = Decoder {
            conv_in: Conv2d::load(dv.pp("conv_in"), lat, boc[n - 1], 3, 1, 1)?,
            mid_block: VaeMidBlock::load(dv.pp("mid_block"), boc[n - 1], g, config.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(dv.pp("conv_norm_out"), g, boc[0], EPS)?,
            conv_out: Conv2d::load(dv.pp("conv_out"), boc[0], config.out_channels, 3, 1, 1)?,
        };
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::load(vb.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::load(vb.pp("post_quant_conv"), lat, lat, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self { config, encoder, decoder, quant_conv, post_quant_conv })
    }

    /// Mean of the latent distribution for images `(B, 3, H, W)` in [-1, 1] (unscaled latents).
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x)?;
        for level in &e.down_blocks {
            for r in &level.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = &level.downsampler {
                h = d.forward(&h)?;
            }
        }
        h = e.mid_block.forward(&h)?;
        h = e.conv_out.forward(&silu(&e.conv_norm_out.forward(&h)?)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        Ok(h.narrow(1, 0, self.config.latent_channels)?)
    }

    /// Images in about [-1, 1] from unscaled latents `z`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let d = &self.decoder;
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        h = d.conv_in.forward(&h)?;
        h = d.mid_block.forward(&h)?;
        for level in &d.up_blocks {
            for r in &level.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = &level.upsampler {
                h = u.forward(&h, None)?;
            }
        }
        d.conv_out.forward(&silu(&d.conv_norm_out.forward(&h)?)?)
    }

    /// UNet latents from images: `scaling_factor * (mean - shift_factor)`.
    pub fn encode_to_latents(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.encode_mean(x)?;
        let z = (z - self.config.shift_factor.unwrap_or(0.0))?;
        Ok((z * self.config.scaling_factor)?)
    }

    /// Images from UNet latents: `decode(latents / scaling_factor + shift_factor)`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents / self.config.scaling_factor)? + self.config.shift_factor.unwrap_or(0.0))?;
        self.decode(&z)
    }
}
