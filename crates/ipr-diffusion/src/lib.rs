//! Diffusion engine of ipr, on candle: a trainable UNet2DConditionModel driven by diffusers'
//! `config.json`, CLIP text encoders and the CLIP BPE tokenizer, the VAE, noise schedules and
//! samplers (DDPM noising, DDIM, Euler), classifier-free guidance and text-to-image pipelines for
//! diffusers-format folders (SD 1.x, SD 2.x, SDXL) and for pixel-space models (the toy world).
//!
//! Parameter names equal diffusers' and transformers', so their safetensors load as they are.
//! Every op on a path that training differentiates has a correct backward: candle's fused softmax
//! and layer norm have none, so [`fused`] provides CPU kernels with their own backward and [`nn`]
//! falls back to primitive ops on other devices (see `docs/stack-notes.md`).
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use ipr_diffusion::{noise, pipeline::{Pipeline, SampleParams}, scheduler::SamplerKind};
//!
//! let pipe = Pipeline::load("path/to/stable-diffusion-v1-5".as_ref(), DType::F32, &Device::Cpu)?;
//! let (_, c, h, w) = pipe.latent_shape(1);
//! let latents = noise::randn_per_sample(&[42], &[c, h, w], DType::F32, &Device::Cpu)?;
//! let params = SampleParams { num_inference_steps: 30, guidance_scale: 7.5, sampler: SamplerKind::Ddim };
//! let out = pipe.generate(&["a cat to the left of a dog"], Some(&["blurry"]), &latents, &params)?;
//! let images = pipe.to_images(&out)?; // (1, 3, 512, 512) in [0, 1]
//! # Ok::<(), ipr_diffusion::Error>(())
//! ```
//!
//! Modules, one concern each: [`config`] (the `config.json` files), [`tokenizer`], [`clip_text`],
//! [`unet`] (embeddings, resnet, attention, blocks), [`vae`], [`scheduler`] (betas, DDIM, Euler,
//! DDPM noising), [`pipeline`] (CFG text-to-image), [`sample`] (the library side of `ipr sample`),
//! [`source`] (local folders, the Hugging Face cache, weight files), [`noise`] (seeded noise),
//! [`nn`] and [`fused`] (layers and kernels).
//!
//! Parity: `tests/` loads tiny random pipelines saved by diffusers (`tests/fixtures/tiny-*`, each
//! under 1 MB) and compares with outputs diffusers recorded for them
//! (`scripts/fixtures/diffusion/make_tiny_pipelines.py`, which also records references for a real
//! checkpoint: see `tests/real_models.rs`). `tests/gradients.rs` checks every parameter's gradient
//! by finite differences. `examples/bench_unet.rs` measures CPU denoising steps per second next to
//! `examples/bench_unet.py` (diffusers, same configs).

pub mod attention;
pub mod clip_text;
pub mod collective;
pub mod config;
pub mod conv;
mod conv_direct;
pub mod cuda_kernels;
pub mod error;
pub mod fastmath;
pub mod flops;
pub mod fused;
pub mod geglu;
pub mod graph_attention;
pub mod image_file;
pub mod inference_attention;
pub mod init;
pub mod lora;
pub mod lora_io;
pub mod lora_linear;
pub mod nn;
pub mod noise;
pub mod norm;
pub mod op_profile;
pub mod pipeline;
pub mod resnet_branch;
pub mod sample;
pub mod sample_bench;
pub mod scheduler;
pub mod selftest;
pub mod source;
pub mod tokenizer;
pub mod train;
pub mod unet;
pub mod upsample;
pub mod vae;

pub use error::{Error, Result};
