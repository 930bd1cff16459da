//! Text-to-image sampling with classifier-free guidance (Ho & Salimans 2022), as diffusers'
//! `StableDiffusionPipeline` and `StableDiffusionXLPipeline`, plus a pixel-space variant (a folder
//! without `vae/`: the "latents" are the image, as in the toy world).
//!
//! The model family is read from the folder: `text_encoder_2/` means SDXL (penultimate hidden
//! states of both encoders concatenated, pooled projection of the second, `text_time` conditioning
//! with time ids `[H, W, 0, 0, H, W]`); otherwise SD 1.x / 2.x (last hidden state after the final
//! layer norm; SD 2.x's "penultimate layer" is already baked into its 23-layer checkpoint).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::clip_text::ClipTextModel;
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::scheduler::{Sampler, SamplerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{AddedCond, UNet2DConditionModel};
use crate::vae::AutoencoderKL;

/// The text side of a pipeline.
#[allow(clippy::large_enum_variant)] // one per pipeline, never moved in a hot loop
pub enum TextEncoders {
    /// SD 1.x / 2.x and the toy model: one tokenizer and encoder.
    Single { tokenizer: ClipTokenizer, text_encoder: ClipTextModel },
    /// SDXL: two tokenizers and encoders; the second has a projection.
    Dual {
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModel,
        tokenizer_2: ClipTokenizer,
        text_encoder_2: ClipTextModel,
    },
}

/// Encoded prompts: `(B, S, D)` embeddings and, for SDXL, `(B, P)` pooled embeddings.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    pub embeds: Tensor,
    pub pooled: Option<Tensor>,
}

/// Sampling parameters.
#[derive(Debug, Clone)]
pub struct SampleParams {
    pub num_inference_steps: usize,
    /// Classifier-free guidance weight; guidance is off when it is <= 1 (as diffusers).
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
}

impl Default for SampleParams {
    fn default() -> Self {
        Self { num_inference_steps: 50, guidance_scale: 7.5, sampler: SamplerKind::Ddim }
    }
}

/// A loaded text-to-image model.
pub struct Pipeline {
    pub unet: UNet2DConditionModel,
    /// `None` for pixel-space models.
    pub vae: Option<AutoencoderKL>,
    pub text: TextEncoders,
    pub scheduler_config: SchedulerConfig,
    pub scheduler_config_path: PathBuf,
    /// The UNet's and text encoders' dtype.
    pub dtype: DType,
    /// The VAE's dtype (may differ: SDXL's VAE overflows in f16).
    pub vae_dtype: DType,
    pub device: Device,
    /// SDXL: an absent negative prompt means zero embeddings (`model_index.json`, default true).
    pub force_zeros_for_empty_prompt: bool,
}

fn size_factor(vae_scale_factor: usize, unet: &crate::config::UNetConfig) -> usize {
    vae_scale_factor << unet.down_block_types.len().saturating_sub(1)
}

/// [`Pipeline::size_factor`] of a pipeline folder, from its configs alone (no weights read):
/// for checking an image size before any work starts.
pub fn folder_size_factor(folder: &Path) -> Result<usize> {
    let unet = crate::config::UNetConfig::load(&folder.join("unet").join("config.json"))?;
    let vae = folder.join("vae").join("config.json");
    let vae_factor = if vae.is_file() {
        1 << crate::config::VaeConfig::load(&vae)?.block_out_channels.len().saturating_sub(1)
    } else {
        1
    };
    Ok(size_factor(vae_factor, &unet))
}

fn require_dir(path: PathBuf) -> Result<PathBuf> {
    if path.is_dir() {
        Ok(path)
    } else {
        Err(Error::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "missing pipeline component folder"),
        })
    }
}

impl Pipeline {
    /// Loads a diffusers-format folder (`unet/`, `scheduler/`, `tokenizer/`, `text_encoder/`,
    /// optional `vae/`, and for SDXL `tokenizer_2/`, `text_encoder_2/`), every model in `dtype`.
    pub fn load(folder: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_vae_dtype(folder, dtype, dtype, device)
    }

    /// [`Pipeline::load`] with the VAE in its own dtype.
    pub fn load_with_vae_dtype(folder: &Path, dtype: DType, vae_dtype: DType, device: &Device) -> Result<Self> {
        let unet = UNet2DConditionModel::load(&require_dir(folder.join("unet"))?, dtype, device)?;
        let vae = if folder.join("vae").is_dir() {
            Some(AutoencoderKL::load(&folder.join("vae"), vae_dtype, device)?)
        } else {
            None
        };
        let tokenizer = ClipTokenizer::load(&require_dir(folder.join("tokenizer"))?)?;
        let text_encoder = ClipTextModel::load(&require_dir(folder.join("text_encoder"))?, dtype, device)?;
        let text = if folder.join("text_encoder_2").is_dir() {
            TextEncoders::Dual {
                tokenizer,
                text_encoder,
                tokenizer_2: ClipTokenizer::load(&require_dir(folder.join("tokenizer_2"))?)?,
                text_encoder_2: ClipTextModel::load(&folder.join("text_encoder_2"), dtype, device)?,
            }
        } else {
            TextEncoders::Single { tokenizer, text_encoder }
        };
        let scheduler_config_path = folder.join("scheduler").join("scheduler_config.json");
        let mut scheduler_config = SchedulerConfig::load(&scheduler_config_path)?;
        // diffusers' StableDiffusionPipeline rewrites outdated scheduler configs; a pixel-space
        // model (no VAE) is not loaded through that pipeline, so its config is used as written.
        if matches!(text, TextEncoders::Single { .. }) && vae.is_some() {
            scheduler_config.apply_sd_pipeline_fixups();
        }
        let index = folder.join("model_index.json");
        let force_zeros_for_empty_prompt = if index.exists() {
            let v: serde_json::Value = crate::config::read_json(&index)?;
            v.get("force_zeros_for_empty_prompt").and_then(|b| b.as_bool()).unwrap_or(true)
        } else {
            true
        };
        Ok(Self {
            unet,
            vae,
            text,
            scheduler_config,
            scheduler_config_path,
            dtype,
            vae_dtype,
            device: device.clone(),
            force_zeros_for_empty_prompt,
        })
    }

    /// `2^(len(vae.block_out_channels) - 1)`, or 1 without a VAE.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.as_ref().map(|v| 1 << (v.config.block_out_channels.len() - 1)).unwrap_or(1)
    }

    /// Shape of the initial noise for `batch` images at the UNet's `sample_size`.
    pub fn latent_shape(&self, batch: usize) -> (usize, usize, usize, usize) {
        let s = self.unet.config.sample_size.unwrap_or(64);
        (batch, self.unet.config.in_channels, s, s)
    }

    /// The image size the model was trained at, `(height, width)` in pixels: the UNet's
    /// `sample_size` times the VAE's factor (diffusers' default `height` and `width`).
    pub fn native_size(&self) -> (usize, usize) {
        let s = self.unet.config.sample_size.unwrap_or(64) * self.vae_scale_factor();
        (s, s)
    }

    /// What image sides must be multiples of: the VAE's factor times the UNet's downsampling
    /// (`2^(len(down_block_types) - 1)`), so every up block meets its skip connection's size.
    pub fn size_factor(&self) -> usize {
        size_factor(self.vae_scale_factor(), &self.unet.config)
    }

    /// Shape of the initial noise for `batch` images of `height x width` pixels; the error says
    /// which side is not a multiple of [`Self::size_factor`].
    pub fn latent_shape_for(&self, batch: usize, height: usize, width: usize) -> Result<(usize, usize, usize, usize)> {
        let f = self.size_factor();
        for (name, v) in [("height", height), ("width", width)] {
            if v == 0 || v % f != 0 {
                return Err(Error::Input(format!(
                    "{name} {v} is not a multiple of {f}, this model's factor (VAE {} x UNet downsampling {})",
                    self.vae_scale_factor(),
                    f / self.vae_scale_factor()
                )));
            }
        }
        let v = self.vae_scale_factor();
        Ok((batch, self.unet.config.in_channels, height / v, width / v))
    }

    fn ids(&self, tokenizer: &ClipTokenizer, prompts: &[&str]) -> Result<Tensor> {
        let rows = prompts.iter().map(|p| tokenizer.encode(p)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::new(rows, &self.device)?)
    }

    /// Text embeddings of `prompts` as the diffusers pipeline of this family computes them.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<PromptEmbeds> {
        match &self.text {
            TextEncoders::Single { tokenizer, text_encoder } => Ok(PromptEmbeds {
                embeds: text_encoder.forward(&self.ids(tokenizer, prompts)?)?.last_hidden_state,
                pooled: None,
            }),
            TextEncoders::Dual { tokenizer, text_encoder, tokenizer_2, text_encoder_2 } => {
                let o1 = text_encoder.forward(&self.ids(tokenizer, prompts)?)?;
                let o2 = text_encoder_2.forward(&self.ids(tokenizer_2, prompts)?)?;
                Ok(PromptEmbeds {
                    embeds: Tensor::cat(&[&o1.penultimate_hidden_state, &o2.penultimate_hidden_state], 2)?,
                    pooled: Some(o2.pooled),
                })
            }
        }
    }

    /// Unconditional embeddings when no negative prompt is given: SDXL uses zeros (unless its
    /// `model_index.json` sets `force_zeros_for_empty_prompt` false), SD 1.x / 2.x encode "".
    pub fn empty_negative(&self, batch: usize) -> Result<PromptEmbeds> {
        match &self.text {
            TextEncoders::Dual { .. } if self.force_zeros_for_empty_prompt => {
                let p = self.encode_prompts(&[""])?;
                Ok(PromptEmbeds {
                    embeds: p.embeds.zeros_like()?.repeat((batch, 1, 1))?,
                    pooled: p.pooled.map(|t| t.zeros_like()?.repeat((batch, 1))).transpose()?,
                })
            }
            _ => self.encode_prompts(&vec![""; batch]),
        }
    }

    /// Denoises `latents` (the initial noise, unscaled) for the given conditional and
    /// unconditional embeddings; returns the final latents (before the VAE), in f32.
    pub fn denoise(
        &self,
        cond: &PromptEmbeds,
        uncond: &PromptEmbeds,
        latents: &Tensor,
        params: &SampleParams,
    ) -> Result<Tensor> {
        let mut sampler = Sampler::from_config(
            params.sampler,
            &self.scheduler_config,
            &self.scheduler_config_path,
            params.num_inference_steps,
        )?;
        let b = latents.dim(0)?;
        if cond.embeds.dim(0)? != b || uncond.embeds.dim(0)? != b {
            return Err(Error::Input(format!(
                "{} prompts and {} negative prompts for {b} latents",
                cond.embeds.dim(0)?,
                uncond.embeds.dim(0)?
            )));
        }
        let cfg = params.guidance_scale > 1.0;
        let context = if cfg { Tensor::cat(&[&uncond.embeds, &cond.embeds], 0)? } else { cond.embeds.clone() };
        let added = match (&cond.pooled, &uncond.pooled) {
            (Some(pc), Some(pu)) => {
                let (_, _, h, w) = latents.dims4()?;
                let f = self.vae_scale_factor() as f64;
                let (hh, ww) = (h as f64 * f, w as f64 * f);
                let n = if cfg { 2 * b } else { b };
                let ids: Vec<f32> = (0..n).flat_map(|_| [hh, ww, 0.0, 0.0, hh, ww].map(|v| v as f32)).collect();
                Some(AddedCond {
                    text_embeds: if cfg { Tensor::cat(&[pu, pc], 0)? } else { pc.clone() },
                    time_ids: Tensor::from_vec(ids, (n, 6), &self.device)?.to_dtype(self.dtype)?,
                })
            }
            _ => None,
        };
        // Latents, guidance and sampler updates stay in f32 whatever the weights' dtype; only the
        // UNet runs in `self.dtype`.
        let mut x = (latents.to_dtype(DType::F32)? * sampler.init_noise_sigma())?;
        for (i, t) in sampler.timesteps().into_iter().enumerate() {
            let input = if cfg { Tensor::cat(&[&x, &x], 0)? } else { x.clone() };
            let input = sampler.scale_model_input(&input, i)?.to_dtype(self.dtype)?;
            let ts = Tensor::new(&[t as f32], &self.device)?;
            let out = self.unet.forward(&input, &ts, &context, added.as_ref())?.to_dtype(DType::F32)?;
            let pred = if cfg {
                let (u, c) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                (&u + ((c - &u)? * params.guidance_scale)?)?
            } else {
                out
            };
            // Sampling never needs gradients: cut the graph each step, so that weights that carry
            // one (unmerged adapters) cannot keep every step's activations alive.
            x = sampler.step(&pred, i, &x)?.detach();
        }
        Ok(x)
    }

    /// `pipe(prompts, negative_prompt=negatives, latents=latents, output_type="latent")`.
    pub fn generate(
        &self,
        prompts: &[&str],
        negative_prompts: Option<&[&str]>,
        latents: &Tensor,
        params: &SampleParams,
    ) -> Result<Tensor> {
        let cond = self.encode_prompts(prompts)?;
        let uncond = match negative_prompts {
            Some(n) if n.len() == prompts.len() => self.encode_prompts(n)?,
            Some(n) if n.len() == 1 => self.encode_prompts(&vec![n[0]; prompts.len()])?,
            Some(n) => return Err(Error::Input(format!("{} negative prompts for {} prompts", n.len(), prompts.len()))),
            None => self.empty_negative(prompts.len())?,
        };
        self.denoise(&cond, &uncond, latents, params)
    }

    /// Images in [0, 1], `(B, C, H, W)`, f32, from final latents (through the VAE when there is one).
    pub fn to_images(&self, latents: &Tensor) -> Result<Tensor> {
        let x = match &self.vae {
            Some(v) => v.decode_latents(&latents.to_dtype(self.vae_dtype)?)?.to_dtype(DType::F32)?,
            None => latents.to_dtype(DType::F32)?,
        };
        Ok(((x / 2.0)? + 0.5)?.clamp(0.0, 1.0)?)
    }
}
