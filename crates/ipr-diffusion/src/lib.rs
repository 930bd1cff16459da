//! Diffusion engine (UNet, text encoders, VAE, schedulers, pipelines). See ARCHITECTURE.md.
