//! `UNet2DConditionModel` of diffusers, driven by its `config.json`: the denoiser of latent
//! diffusion (Rombach et al. 2022) for SD 1.x / 2.x, with SDXL's `text_time` added conditioning
//! (Podell et al. 2023), and the pixel-space toy model, which is a small configuration of the same.
//!
//! Differences from candle-transformers' SD UNet, on purpose: timesteps are per sample (training
//! draws one per example), every op has a backward (layer norm and softmax from primitive ops), and
//! the config is read, not selected by SD version. Parameter names are diffusers', so
//! `diffusion_pytorch_model.safetensors` loads as it is.

pub mod attention;
pub mod blocks;
pub mod embeddings;
pub mod resnet;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::UNetConfig;
use crate::error::{Error, Result};
use crate::nn::{Conv2d, GroupNorm};
use blocks::{BlockAttention, BlockCommon, DownBlock, MidBlock, UpBlock};
use embeddings::{timestep_sinusoid, TimestepEmbedding};

/// SDXL's added conditioning: the pooled text embedding and the six size/crop numbers.
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// `(B, pooled_dim)`: `text_embeds` of the second text encoder.
    pub text_embeds: Tensor,
    /// `(B, 6)`: original size, crop top-left, target size.
    pub time_ids: Tensor,
}

/// The UNet.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding` (with `addition_embed_type: "text_time"`).
    pub add_embedding: Option<TimestepEmbedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Loads `folder/config.json` and `folder/diffusion_pytorch_model.safetensors`.
    pub fn load(folder: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config_path = folder.join("config.json");
        let config = UNetConfig::load(&config_path)?;
        let files = crate::source::weight_files(folder, "diffusion_pytorch_model")?;
        let vb = crate::source::mmap_weights(&files, dtype, device)?;
        Self::new(vb, config, &config_path).map_err(|e| crate::source::in_weights(e, &files))
    }

    /// Builds the model from a `VarBuilder` at the checkpoint's root; `config_path` names the
    /// config in errors.
    pub fn new(vb: VarBuilder, config: UNetConfig, config_path: &Path) -> Result<Self> {
        config.validate(config_path)?;
        let layout = config.layout(config_path)?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let temb = config.time_embed_dim();
        let common = BlockCommon {
            temb_channels: temb,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            context_dim: config.cross_attention_dim,
            use_linear_projection: config.use_linear_projection,
        };
        let kin = config.conv_in_kernel;
        let conv_in = Conv2d::load(vb.pp("conv_in"), config.in_channels, boc[0], kin, 1, (kin - 1) / 2)?;
        let time_embedding = TimestepEmbedding::load(vb.pp("time_embedding"), boc[0], temb)?;
        let add_embedding = match config.addition_embed_type.as_deref() {
            Some("text_time") => Some(TimestepEmbedding::load(
                vb.pp("add_embedding"),
                config.projection_class_embeddings_input_dim.unwrap_or(0),
                temb,
            )?),
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = boc[i];
            let attn = (kind == "CrossAttnDownBlock2D").then(|| BlockAttention {
                heads: layout.num_attention_heads[i],
                transformer_layers: layout.transformer_layers_per_block[i],
            });
            down_blocks.push(DownBlock::load(
                vb.pp("down_blocks").pp(i),
                &common,
                in_c,
                out_c,
                layout.layers_per_block[i],
                attn,
                i < n - 1,
                config.downsample_padding,
            )?);
        }

        let mid_block = MidBlock::load(
            vb.pp("mid_block"),
            &common,
            boc[n - 1],
            BlockAttention {
                heads: layout.num_attention_heads[n - 1],
                transformer_layers: layout.transformer_layers_per_block[n - 1],
            },
            config.mid_block_scale_factor,
        )?;

        let rev_boc: Vec<usize> = boc.iter().rev().cloned().collect();
        let rev_heads: Vec<usize> = layout.num_attention_heads.iter().rev().cloned().collect();
        let rev_layers: Vec<usize> = layout.layers_per_block.iter().rev().cloned().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = rev_boc[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let prev = out_c;
            out_c = rev_boc[i];
            let in_c = rev_boc[(i + 1).min(n - 1)];
            let attn = (kind == "CrossAttnUpBlock2D").then(|| BlockAttention {
                heads: rev_heads[i],
                transformer_layers: layout.reverse_transformer_layers_per_block[i],
            });
            up_blocks.push(UpBlock::load(
                vb.pp("up_blocks").pp(i),
                &common,
                in_c,
                out_c,
                prev,
                rev_layers[i] + 1,
                attn,
                i < n - 1,
            )?);
        }
        let conv_norm_out = GroupNorm::load(vb.pp("conv_norm_out"), config.norm_num_groups, boc[0], config.norm_eps)?;
        let kout = config.conv_out_kernel;
        let conv_out = Conv2d::load(vb.pp("conv_out"), boc[0], config.out_channels, kout, 1, (kout - 1) / 2)?;
        Ok(Self {
            config,
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Every linear layer, with its diffusers module path in [`crate::nn::Linear::path`]
    /// (LoRA attaches through this).
    pub fn linears_mut(&mut self) -> Vec<&mut crate::nn::Linear> {
        let mut out = vec![&mut self.time_embedding.linear_1, &mut self.time_embedding.linear_2];
        if let Some(a) = &mut self.add_embedding {
            out.extend([&mut a.linear_1, &mut a.linear_2]);
        }
        out.extend(self.down_blocks.iter_mut().flat_map(|b| b.linears_mut()));
        out.extend(self.mid_block.linears_mut());
        out.extend(self.up_blocks.iter_mut().flat_map(|b| b.linears_mut()));
        out
    }

    /// Predicts the noise (or v, or x0, per the scheduler) for `sample` `(B, C, H, W)` at
    /// `timesteps` (`(B,)`, or one value for the whole batch; any float or int dtype) with text
    /// embeddings `encoder_hidden_states` `(B, S, D)`. `added` is required for SDXL.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        let dtype = sample.dtype();
        let mut t = timesteps.flatten_all()?.to_dtype(DType::F32)?;
        if t.dim(0)? == 1 && b > 1 {
            t = t.broadcast_as(b)?.contiguous()?;
        }
        if t.dim(0)? != b {
            return Err(Error::Input(format!("{} timesteps for a batch of {b}", t.dim(0)?)));
        }
        let c = &self.config;
        let t_emb = timestep_sinusoid(&t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift as f64)?;
        let mut emb = self.time_embedding.forward(&t_emb.to_dtype(dtype)?)?;
        if let Some(add) = &self.add_embedding {
            let added = added.ok_or_else(|| {
                Error::Input("this UNet (addition_embed_type \"text_time\") needs text_embeds and time_ids".into())
            })?;
            let dim = c.addition_time_embed_dim.unwrap_or(0);
            let time_embeds = timestep_sinusoid(&added.time_ids, dim, c.flip_sin_to_cos, c.freq_shift as f64)?
                .reshape((b, ()))?
                .to_dtype(dtype)?;
            let add_embeds = Tensor::cat(&[&added.text_embeds.to_dtype(dtype)?, &time_embeds], 1)?;
            emb = (emb + add.forward(&add_embeds)?)?;
        }

        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(&h, &emb, encoder_hidden_states)?;
            h = out;
            skips.extend(s);
        }
        h = self.mid_block.forward(&h, &emb, encoder_hidden_states)?;
        for block in &self.up_blocks {
            let n = block.resnets.len();
            let mut own = skips.split_off(skips.len() - n);
            let size = match skips.last() {
                Some(s) if block.upsampler.is_some() => Some((s.dim(2)?, s.dim(3)?)),
                _ => None,
            };
            h = block.forward(&h, &mut own, &emb, encoder_hidden_states, size)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}
