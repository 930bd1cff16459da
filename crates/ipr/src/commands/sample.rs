//! `ipr sample`: text-to-image with classifier-free guidance, optionally with a LoRA adapter
//! (library: `ipr_diffusion::sample`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;
use ipr_diffusion::pipeline::SampleParams;
use ipr_diffusion::sample::{sample, sampler_from_name, SampleRequest};

#[derive(ClapArgs)]
pub struct Args {
    /// Diffusers-format pipeline folder (or a Hugging Face repo id in the local cache).
    #[arg(long)]
    pub model: String,
    /// Prompt (repeat for several images).
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// One negative prompt for all, or one per prompt.
    #[arg(long)]
    pub negative_prompt: Vec<String>,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// ddim, euler or dpmsolver++ (diffusers' DPMSolverMultistepScheduler, 2nd order).
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Image i starts from the noise of seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial latents (safetensors, tensor "latents"), instead of seeded noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Save the final latents (before the VAE) here.
    #[arg(long)]
    pub output_latents: Option<PathBuf>,
    /// PNG output; with several prompts, -<i> is added before the extension.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations dtype: f32, bf16 or f16 (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long, value_parser = super::parse_dtype)]
    pub dtype: Option<candle_core::DType>,
    /// LoRA adapter folder (pytorch_lora_weights.safetensors: ipr's, diffusers', PEFT's or kohya's).
    #[arg(long)]
    pub lora: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    if a.out.is_none() && a.output_latents.is_none() {
        anyhow::bail!("nothing to write: give --out IMAGE.png and/or --output-latents FILE.safetensors");
    }
    let req = SampleRequest {
        model: a.model,
        prompts: a.prompt,
        negative_prompts: a.negative_prompt,
        params: SampleParams {
            num_inference_steps: a.steps,
            guidance_scale: a.guidance,
            sampler: sampler_from_name(&a.scheduler)?,
        },
        seed: a.seed,
        latents: a.latents,
        output_latents: a.output_latents,
        out: a.out,
        device: a.device,
        dtype: a.dtype,
        lora: a.lora,
    };
    let out = sample(&req)?;
    for p in &out.images {
        println!("{}", p.display());
    }
    Ok(())
}
