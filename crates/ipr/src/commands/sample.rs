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
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Vec<String>,
    /// A VISOR-format prompt table (`ipr prompts sr2d`, a run's `prompts/*.json`, or any subset):
    /// sample every prompt into --out as VISOR names images, `<unique_id>_<k>.png` for
    /// k < --images-per-prompt, skipping images already there (a stopped call resumes).
    #[arg(long, requires = "out", conflicts_with_all = ["latents", "output_latents"])]
    pub prompts: Option<PathBuf>,
    /// With --prompts: images per prompt (VISOR uses 4).
    #[arg(long, default_value_t = 4, requires = "prompts")]
    pub images_per_prompt: u32,
    /// With --prompts: the vocabulary the table's classes must belong to ("coco80" or a JSON
    /// array of class names).
    #[arg(long, default_value = "coco80", requires = "prompts")]
    pub vocab: String,
    /// Image height and width in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long)]
    pub width: Option<usize>,
    /// Images per UNet call (with --prompts). Part of what the images' bytes depend on: keep it
    /// the same across the shards of one benchmark.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// With --prompts: do shard I of N (batch j of the whole table goes to shard j % N), into
    /// the same --out as the other shards. Without it, Slurm's SLURM_ARRAY_TASK_ID /
    /// SLURM_ARRAY_TASK_COUNT, or Kubernetes' JOB_COMPLETION_INDEX with --shards, say it.
    #[arg(long, value_parser = ipr::shard::Shard::parse, requires = "prompts")]
    pub shard: Option<ipr::shard::Shard>,
    /// With --prompts under a Kubernetes Indexed Job: the Job's completions (JOB_COMPLETION_INDEX
    /// gives only the index).
    #[arg(long, requires = "prompts")]
    pub shards: Option<usize>,
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
    /// Image i starts from the noise of seed + i (with --prompts: image k of prompt id starts
    /// from the noise of a hash of (seed, id, k), as `ipr run` samples).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial latents (safetensors, tensor "latents"), instead of seeded noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Save the final latents (before the VAE) here.
    #[arg(long)]
    pub output_latents: Option<PathBuf>,
    /// PNG output; with several prompts, -<i> is added before the extension. With --prompts: the
    /// output folder.
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
    if a.prompts.is_some() {
        return sample_table(a);
    }
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
        size: a.height.zip(a.width).or(a.height.map(|h| (h, h))).or(a.width.map(|w| (w, w))),
    };
    let out = sample(&req)?;
    for p in &out.images {
        println!("{}", p.display());
    }
    Ok(())
}

/// `ipr sample --prompts TABLE --images-per-prompt K --out DIR`: VISOR's benchmark images.
fn sample_table(a: Args) -> Result<()> {
    let table = a.prompts.as_ref().expect("checked by the caller");
    let out = a.out.as_ref().expect("clap requires --out with --prompts");
    anyhow::ensure!(a.images_per_prompt > 0, "--images-per-prompt is 0, expected at least 1");
    let rows = ipr_core::sr2d::read_rows(table)?;
    let vocab = super::load_vocab(&a.vocab)?;
    ipr_core::sr2d::check_rows(table, &rows, &vocab)?;
    let shard = ipr::shard::Shard::resolve(a.shard, a.shards, &|k| std::env::var(k).ok())?;
    let device = ipr_diffusion::sample::device_from_name(&a.device)?;
    let dtype = a.dtype.unwrap_or(if device.is_cpu() { candle_core::DType::F32 } else { candle_core::DType::BF16 });
    let folder = ipr_diffusion::source::resolve_model(&a.model)?;
    let mut pipe = ipr_diffusion::pipeline::Pipeline::load(&folder, dtype, &device)?;
    if let Some(lora) = &a.lora {
        ipr_diffusion::train::load_lora(&mut pipe, lora)?;
        for (_, linears) in ipr_diffusion::train::pipeline_linears(&mut pipe) {
            ipr_diffusion::lora::merge(linears)?;
        }
    }
    let settings = ipr::sampling::SampleSettings {
        images_per_prompt: a.images_per_prompt,
        params: SampleParams {
            num_inference_steps: a.steps,
            guidance_scale: a.guidance,
            sampler: sampler_from_name(&a.scheduler)?,
        },
        seed: a.seed,
        batch_size: a.batch_size,
        size: a.height.zip(a.width).or(a.height.map(|h| (h, h))).or(a.width.map(|w| (w, w))),
        negative_prompt: match a.negative_prompt.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            _ => anyhow::bail!("with --prompts give at most one --negative-prompt (it applies to every image)"),
        },
    };
    let jobs: Vec<ipr::sampling::PromptJob> =
        rows.iter().map(|r| ipr::sampling::PromptJob { prompt_id: r.unique_id, text: r.text.clone() }).collect();
    let pb = ipr::progress::bar(jobs.len() as u64 * u64::from(a.images_per_prompt), "sample", false);
    let (made, skipped) = ipr::sampling::sample_visor_layout(&pipe, &jobs, &settings, shard, out, &mut |n, total| {
        pb.set_length(total as u64);
        pb.set_position(n as u64)
    })
    .map_err(|e| ipr::oom::explain(e, &format!("sampling into {}", out.display()), a.batch_size, "--batch-size"))?;
    pb.finish_and_clear();
    let of = if shard.count > 1 { format!(" (shard {}/{})", shard.index, shard.count) } else { String::new() };
    eprintln!("{}{of}: {made} images made, {skipped} already there", out.display());
    Ok(())
}
