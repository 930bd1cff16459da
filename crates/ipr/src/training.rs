//! The train stage of the loop: a LoRA adapter on the base model, trained on one imagefolder
//! with the feedback weights, continuing from the previous round's adapter when there is one.

use crate::config::RunConfig;
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use ipr_diffusion::lora::LoraConfig;
use ipr_diffusion::pipeline::Pipeline;
use ipr_diffusion::train::data::load_dataset;
use ipr_diffusion::train::optim::AdamWConfig;
use ipr_diffusion::train::schedule::LrSchedule;
use ipr_diffusion::train::{attach_lora, checkpoint, load_lora, TrainConfig, Trainable, Trainer};
use std::path::Path;

/// The settings of one round's training, from the run config.
#[derive(Debug, Clone)]
pub struct LoraTraining {
    pub lora: LoraConfig,
    pub train: TrainConfig,
    /// Captions that parse in it get a mirrored copy (left/right swapped) for flips.
    pub vocab: ipr_core::Vocabulary,
}

impl LoraTraining {
    pub fn from_config(c: &RunConfig, round: u32, vocab: &ipr_core::Vocabulary) -> Self {
        let t = &c.train;
        let mut lora = LoraConfig::unet(t.lora_rank as usize);
        lora.alpha = t.lora_alpha;
        let train = TrainConfig {
            steps: t.steps as usize,
            batch_size: t.batch_size as usize,
            grad_accum: 1,
            learning_rate: t.learning_rate,
            schedule: LrSchedule::ConstantWithWarmup { warmup: t.warmup_steps as usize },
            adam: AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() },
            max_grad_norm: Some(t.max_grad_norm),
            min_snr_gamma: None,
            seed: crate::sampling::image_seed(c.seed, 0x7261_696e, round),
            // Mirrored copies with left/right swapped in the caption: never the public code's
            // silent flip.
            flip: true,
        };
        Self { lora, train, vocab: vocab.clone() }
    }
}

/// Train an adapter on `data` and write it to `out` (built aside, renamed into place);
/// `progress(step, loss)` after every optimiser step.
pub fn train_lora(
    model: &Path,
    previous: Option<&Path>,
    data: &Path,
    s: &LoraTraining,
    device: &Device,
    out: &Path,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<()> {
    if device.is_cpu() {
        ipr_diffusion::train::cpu_runtime();
    }
    let mut pipe = Pipeline::load(model, DType::F32, device).with_context(|| format!("loading {}", model.display()))?;
    let set = match previous {
        Some(p) => load_lora(&mut pipe, p).with_context(|| format!("loading {}", p.display()))?,
        None => attach_lora(&mut pipe, &s.lora, None, s.train.seed)?,
    };
    let resolution = pipe.unet.config.sample_size.unwrap_or(64) * pipe.vae_scale_factor();
    // Captions that parse in the vocabulary get a mirrored copy (left/right swapped).
    let ds = load_dataset(data, resolution, pipe.vae.as_ref(), Some(&s.vocab), DType::F32, device)?;
    let mut trainer = Trainer::new(pipe, Trainable::Lora(set), ds.examples, s.train.clone())?;
    for step in 0..s.train.steps {
        let stats = trainer.train_step()?;
        progress(step + 1, stats.loss);
    }
    ipr_core::fs::build_dir(out, |tmp| -> Result<()> { Ok(checkpoint::save(&trainer, tmp, None)?) })?;
    Ok(())
}
