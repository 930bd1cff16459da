//! `ipr train`: LoRA training with IPR's reward-weighted loss (library: `ipr_diffusion::train::run`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;
use ipr_diffusion::lora::LoraConfig;
use ipr_diffusion::train::run::{train_in, TrainRequest};
use ipr_diffusion::train::schedule::LrSchedule;
use ipr_diffusion::train::TrainConfig;

#[derive(ClapArgs)]
pub struct Args {
    /// Diffusers-format pipeline folder (or a Hugging Face repo id in the local cache).
    #[arg(long)]
    pub model: String,
    /// HF imagefolder: metadata.jsonl rows with file_name, prompt and an optional weight (default 1).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: pytorch_lora_weights.safetensors (diffusers' load_lora_weights reads it),
    /// adapter_config.json, training_state.safetensors.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub lora_rank: usize,
    /// lora_alpha (scale alpha / rank); default: the rank.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Module-path patterns the UNet adapters attach to (PEFT's target_modules rule).
    #[arg(long, value_delimiter = ',', default_value = "to_q,to_k,to_v,to_out.0")]
    pub targets: Vec<String>,
    /// Also train adapters on the text encoder(s) (q/k/v/out projections).
    #[arg(long)]
    pub text_encoder_lora: bool,
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// constant, constant_with_warmup or cosine (diffusers' names).
    #[arg(long, default_value = "constant")]
    pub lr_schedule: String,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Gradient clipping (global L2 norm); 0 turns it off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// min-SNR-gamma loss weighting (diffusers' --snr_gamma; 5 is the usual value).
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// Train only on timesteps in [LO, HI) (diffusers' --timestep_bias_strategy range), as LO,HI.
    #[arg(long, value_name = "LO,HI", value_parser = parse_range)]
    pub timestep_range: Option<(usize, usize)>,
    /// Random horizontal flips with "left"/"right" swapped in the caption; captions that do not
    /// parse in --vocab are never flipped.
    #[arg(long)]
    pub flip: bool,
    /// CPU: split each micro-batch into this many shards computed in parallel (1: off). Fixed,
    /// not the core count, so that results do not depend on the machine. Under `mpirun -n N`
    /// (the `mpi` feature) these are shards per rank: the micro-batch is cut into N x shards
    /// pieces, rank r computes its own, and the adapter equals one process's with N x shards.
    #[arg(long, default_value_t = ipr_diffusion::train::DEFAULT_SHARDS)]
    pub shards: usize,
    /// Vocabulary for --flip: coco80, toy, or a JSON file of class names.
    #[arg(long, default_value = "coco80")]
    pub vocab: String,
    /// Continue the run saved in --out.
    #[arg(long)]
    pub resume: bool,
    /// Save every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Frozen weights' dtype: f32, bf16 or f16 (default: f32 on the CPU, bf16 on CUDA); the
    /// adapters and optimiser state stay f32.
    #[arg(long, value_parser = super::parse_dtype)]
    pub dtype: Option<candle_core::DType>,
    /// The VAE's dtype (default: --dtype).
    #[arg(long, value_parser = super::parse_dtype)]
    pub vae_dtype: Option<candle_core::DType>,
    /// Training image height and width in pixels (default: the model's native size).
    #[arg(long, requires = "width")]
    pub height: Option<usize>,
    #[arg(long, requires = "height")]
    pub width: Option<usize>,
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    ipr::world::World::init()?.run(|w| train(a, w))
}

fn train(a: Args, world: &mut ipr::world::World) -> Result<()> {
    // One process writes --out (rank 0 under mpirun): a second `ipr train` on it is refused.
    let _lock = if world.is_root() {
        let what = format!("the training output {}", a.out.display());
        Some(ipr_core::lock::Lock::acquire(&a.out.join(".lock"), &what)?)
    } else {
        None
    };
    let device_name = world.device_name(&a.device);
    world.attach_device(&ipr_diffusion::sample::device_from_name(&device_name)?)?;
    let lora = LoraConfig {
        rank: a.lora_rank,
        alpha: a.lora_alpha.unwrap_or(a.lora_rank as f64),
        dropout: a.lora_dropout,
        targets: a.targets.clone(),
    };
    let text_encoder_lora = a.text_encoder_lora.then(|| lora.for_text_encoder());
    let config = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        learning_rate: a.lr,
        schedule: LrSchedule::parse(&a.lr_schedule, a.warmup_steps, a.steps)?,
        adam: ipr_diffusion::train::optim::AdamWConfig { weight_decay: a.weight_decay, ..Default::default() },
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        min_snr_gamma: a.snr_gamma,
        timestep_range: a.timestep_range,
        seed: a.seed,
        flip: a.flip,
        shards: a.shards,
    };
    let flip_vocab = if a.flip { Some(super::load_vocab(&a.vocab)?) } else { None };
    let req = TrainRequest {
        model: a.model,
        data: a.data,
        out: a.out.clone(),
        lora,
        text_encoder_lora,
        config,
        resume: a.resume,
        init_adapter: None,
        flip_vocab,
        checkpoint_every: a.checkpoint_every,
        device: device_name,
        dtype: a.dtype,
        vae_dtype: a.vae_dtype,
        resolution: a.height.zip(a.width),
    };
    // Rank 0 reports for all: every rank takes the same steps.
    let quiet = a.quiet || !world.is_root();
    let pb = ipr::progress::bar(a.steps as u64, "train", quiet);
    let mut first = true;
    let summary = train_in(&req, world.collective(), &mut |step, stats| {
        if first {
            pb.set_position(step.saturating_sub(1) as u64);
            pb.reset_eta();
            first = false;
        }
        pb.set_position(step as u64);
        pb.set_message(format!("loss {:.4} lr {:.2e}", stats.loss, stats.lr));
    })
    .map_err(anyhow::Error::from)
    .map_err(|e| ipr::oom::explain(e, &format!("training {}", a.out.display()), a.batch_size, "--batch-size"))?;
    pb.finish_and_clear();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let k = summary.losses.len().min(10);
    if !quiet {
        let ranks = match world.size() {
            1 => String::new(),
            n => format!(" ({n} ranks, {})", world.collective().describe()),
        };
        eprintln!(
            "trained {} LoRA parameters on {} examples ({} rows of weight 0 dropped), steps {}..{}{ranks}; \
             loss first {k} {:.4}, last {k} {:.4}; saved {}",
            summary.trainable_parameters,
            summary.examples,
            summary.dropped_zero_weight,
            summary.start_step,
            summary.steps,
            mean(&summary.losses[..k]),
            mean(&summary.losses[summary.losses.len() - k..]),
            a.out.display()
        );
    }
    Ok(())
}

/// `LO,HI` with `LO < HI`.
fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let parsed = s.split_once(',').and_then(|(lo, hi)| Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?)));
    match parsed {
        Some((lo, hi)) if lo < hi => Ok((lo, hi)),
        _ => Err(format!("{s:?}: expected LO,HI with integers LO < HI, e.g. 300,1000")),
    }
}
