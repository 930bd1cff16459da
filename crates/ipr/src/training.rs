//! The train stage of the loop: a LoRA adapter on the base model, trained on one imagefolder
//! with the feedback weights, continuing from the previous round's adapter when there is one.
//! It is `ipr train`'s library entry point ([`ipr_diffusion::train::run::train`]) with the run
//! config's settings, writing its adapter folder atomically.

use crate::config::RunConfig;
use anyhow::{anyhow, Result};
use candle_core::{DType, Device};
use ipr_diffusion::collective::Collective;
use ipr_diffusion::config::SchedulerConfig;
use ipr_diffusion::lora::{attach_unet, LoraConfig};
use ipr_diffusion::scheduler::Ddpm;
use ipr_diffusion::train::check_timestep_range;
use ipr_diffusion::train::optim::AdamWConfig;
use ipr_diffusion::train::run::{train_in, TrainRequest};
use ipr_diffusion::train::schedule::LrSchedule;
use ipr_diffusion::train::TrainConfig;
use ipr_diffusion::unet::UNet2DConditionModel;
use std::path::{Path, PathBuf};

/// The training request of round `round`: train on `data`, starting from `previous` (the last
/// round's adapter) when given, into `out`, on a world of `ranks` processes (each computes
/// `train.shards / ranks` pieces of every micro-batch). Captions that parse in `vocab` get a
/// mirrored copy with left/right swapped: never the public code's silent flip.
#[allow(clippy::too_many_arguments)]
pub fn request(
    c: &RunConfig,
    round: u32,
    vocab: &ipr_core::Vocabulary,
    model: &Path,
    previous: Option<&Path>,
    data: &Path,
    out: PathBuf,
    ranks: usize,
) -> TrainRequest {
    let t = &c.train;
    let (lora, text_encoder_lora) = lora_configs(c);
    let config = TrainConfig {
        steps: t.steps as usize,
        batch_size: t.batch_size as usize,
        grad_accum: 1,
        learning_rate: t.learning_rate,
        schedule: LrSchedule::ConstantWithWarmup { warmup: t.warmup_steps as usize },
        adam: AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() },
        max_grad_norm: Some(t.max_grad_norm),
        min_snr_gamma: (t.min_snr_gamma > 0.0).then_some(t.min_snr_gamma),
        timestep_range: t.timestep_range.map(|[lo, hi]| (lo as usize, hi as usize)),
        seed: crate::sampling::image_seed(c.seed, 0x7261_696e, round),
        flip: true,
        shards: (t.shards as usize / ranks.max(1)).max(1),
    };
    TrainRequest {
        model: model.to_string_lossy().into_owned(),
        data: data.to_path_buf(),
        out,
        lora,
        text_encoder_lora,
        config,
        resume: false,
        init_adapter: previous.map(Path::to_path_buf),
        flip_vocab: Some(vocab.clone()),
        checkpoint_every: 0,
        device: c.model.device.clone(),
        dtype: Some(c.dtype()),
        vae_dtype: Some(c.vae_dtype()),
        // Trained at the size it samples at: the images are that size already.
        resolution: c.image_size(),
    }
}

/// The adapters the config asks for: the UNet's, and the text encoder's when enabled.
pub fn lora_configs(c: &RunConfig) -> (LoraConfig, Option<LoraConfig>) {
    let t = &c.train;
    let mut lora = LoraConfig::unet(t.lora_rank as usize);
    lora.alpha = t.lora_alpha;
    lora.targets = t.lora_targets.clone();
    let text_encoder_lora = t.text_encoder_lora.then(|| lora.for_text_encoder());
    (lora, text_encoder_lora)
}

/// Checks what `run.toml` alone cannot: that the UNet LoRA targets match layers of `model` and that
/// `train.timestep_range` lies inside its scheduler's timesteps. Run before any work starts; loads
/// only the UNet, in half precision (the text-encoder targets are fixed and match every CLIP).
pub fn preflight(c: &RunConfig, model: &Path) -> Result<()> {
    if let Some((h, w)) = c.image_size() {
        let f = ipr_diffusion::pipeline::folder_size_factor(model)?;
        for (key, v) in [("sampling.height", h), ("sampling.width", w)] {
            if v % f != 0 {
                anyhow::bail!(
                    "{key} is {v}, not a multiple of {f}: {} needs image sides divisible by {f} \
                     (its VAE's factor times its UNet's downsampling)",
                    model.display()
                );
            }
        }
    }
    let mut unet = UNet2DConditionModel::load(&model.join("unet"), DType::F16, &Device::Cpu)?;
    let (lora, _) = lora_configs(c);
    attach_unet(&mut unet, &lora, 0).map_err(|e| anyhow!("train.lora_targets: {e}"))?;
    if let Some([lo, hi]) = c.train.timestep_range {
        let path = model.join("scheduler").join("scheduler_config.json");
        let ddpm = Ddpm::from_config(&SchedulerConfig::load(&path)?, &path)?;
        check_timestep_range((lo as usize, hi as usize), &ddpm)
            .map_err(|e| anyhow!("train.timestep_range is [{lo}, {hi}] for {}: {e}", model.display()))?;
    }
    Ok(())
}

/// Checks `train.shards` against a world of `ranks` processes on the CPU: the pieces must spread
/// evenly, or the numbers would depend on how many processes computed them.
pub fn check_shards(c: &RunConfig, ranks: usize) -> Result<()> {
    let shards = c.train.shards as usize;
    if c.model.device == "cpu" && !shards.is_multiple_of(ranks) {
        anyhow::bail!(
            "train.shards is {shards}, which {ranks} ranks cannot share evenly: set train.shards to a multiple of \
             {ranks} (the same value on one process gives the same numbers)"
        );
    }
    Ok(())
}

/// Run `req` data-parallel over `world` into a folder that rank 0 builds aside and renames to
/// `req.out` (the other ranks train beside it and write nothing); `progress(step, loss)` after
/// every optimiser step. Every rank returns once the folder is in place.
pub fn train_atomically(
    req: &TrainRequest,
    world: &dyn Collective,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<()> {
    if world.rank() == 0 {
        ipr_core::fs::build_dir(&req.out, |tmp| -> Result<()> {
            let aside = TrainRequest { out: tmp.to_path_buf(), ..req.clone() };
            train_in(&aside, world, &mut |step, stats| progress(step, stats.loss))?;
            Ok(())
        })?;
    } else {
        train_in(req, world, &mut |step, stats| progress(step, stats.loss))?;
    }
    world.barrier()?;
    Ok(())
}
