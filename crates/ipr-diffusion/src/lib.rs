//! Diffusion engine of ipr, on candle: a trainable UNet2DConditionModel driven by diffusers'
//! `config.json`, CLIP text encoders and the CLIP BPE tokenizer, the VAE, noise schedules and
//! samplers (DDPM noising, DDIM, Euler), classifier-free guidance and text-to-image pipelines for
//! diffusers-format folders (SD 1.x, SD 2.x, SDXL) and for pixel-space models (the toy world).
//!
//! Parameter names equal diffusers' and transformers', so their safetensors load as they are.
//! Every op on a path that training differentiates has a backward in candle: softmax and layer norm
//! are written from primitive ops because candle's fused kernels have none (see
//! `docs/stack-notes.md`). Each module's parity with diffusers is checked by the tests in `tests/`
//! against outputs recorded by `scripts/fixtures/diffusion/make_tiny_pipelines.py`.

pub mod clip_text;
pub mod config;
pub mod error;
pub mod fused;
pub mod nn;
pub mod noise;
pub mod pipeline;
pub mod sample;
pub mod scheduler;
pub mod source;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use error::{Error, Result};
