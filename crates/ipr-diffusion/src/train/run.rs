//! The library side of `ipr train`: load the pipeline and the imagefolder, attach (or, with
//! `resume`, reload) the adapters, run the steps, save checkpoints. The CLI only parses
//! arguments into a [`TrainRequest`].

use std::path::PathBuf;

use candle_core::DType;
use ipr_core::Vocabulary;

use super::{checkpoint, data, StepStats, TrainConfig, Trainable, Trainer};
use crate::collective::{Collective, SingleProcess};
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::pipeline::Pipeline;

/// Everything `ipr train` needs.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// A diffusers folder or a Hugging Face repo id in the local cache.
    pub model: String,
    /// HF imagefolder with `metadata.jsonl` (`file_name`, `prompt`, optional `weight`).
    pub data: PathBuf,
    /// Output folder (adapter + training state).
    pub out: PathBuf,
    /// UNet adapters.
    pub lora: LoraConfig,
    /// Also adapters on the text encoder(s) (the paper does this for SDXL).
    pub text_encoder_lora: Option<LoraConfig>,
    pub config: TrainConfig,
    /// Continue from `out/training_state.safetensors` and `out/pytorch_lora_weights.safetensors`.
    pub resume: bool,
    /// Start from this adapter (a folder or file) instead of fresh adapters, with a fresh
    /// optimiser: how the IPR loop continues the previous round's LoRA. Ignored when resuming.
    pub init_adapter: Option<PathBuf>,
    /// The vocabulary captions are parsed in for caption-aware flips (with `config.flip`).
    pub flip_vocab: Option<Vocabulary>,
    /// Save every this many steps (and at the end); 0 = only at the end.
    pub checkpoint_every: usize,
    pub device: String,
    /// The frozen models' dtype; `None`: f32 on the CPU, bf16 on CUDA. Adapters, gradients and
    /// optimiser state are f32 whatever it is.
    pub dtype: Option<DType>,
    /// The VAE's dtype (`None`: `dtype`).
    pub vae_dtype: Option<DType>,
    /// Training image size `(height, width)`; `None`: the model's native size. Images of another
    /// size are resized to it.
    pub resolution: Option<(usize, usize)>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub examples: usize,
    pub dropped_zero_weight: usize,
    pub start_step: usize,
    pub steps: usize,
    pub trainable_parameters: usize,
    /// Loss of each step run now.
    pub losses: Vec<f64>,
}

/// Runs a LoRA training request; `on_step` sees every step's statistics (for a progress bar).
pub fn train(req: &TrainRequest, on_step: &mut dyn FnMut(usize, &StepStats)) -> Result<TrainSummary> {
    train_in(req, &SingleProcess, on_step)
}

/// [`train`], data-parallel over the ranks of `world` (every rank runs the same request):
/// each micro-batch is cut into `config.shards` pieces per rank ([`Trainer::train_step_in`]),
/// every rank takes the same steps, and rank 0 alone writes checkpoints and the adapter. Every
/// rank returns once the last save is on disk.
pub fn train_in(
    req: &TrainRequest,
    world: &dyn Collective,
    on_step: &mut dyn FnMut(usize, &StepStats),
) -> Result<TrainSummary> {
    if req.device == "cpu" {
        super::cpu_runtime();
    }
    let device = crate::sample::device_from_name(&req.device)?;
    let dtype = req.dtype.unwrap_or(if device.is_cpu() { DType::F32 } else { DType::BF16 });
    let vae_dtype = req.vae_dtype.unwrap_or(dtype);
    let folder = crate::source::resolve_model(&req.model)?;
    let mut pipe = Pipeline::load_with_vae_dtype(&folder, dtype, vae_dtype, &device)?;
    if let Some((h, w)) = req.resolution {
        pipe.latent_shape_for(1, h, w)?;
    }
    let (height, width) = req.resolution.unwrap_or_else(|| pipe.native_size());
    let vocab = if req.config.flip { req.flip_vocab.as_ref() } else { None };
    if req.config.flip && vocab.is_none() {
        return Err(Error::Input("flipping needs a vocabulary to mirror captions in".into()));
    }
    let ds = data::load_dataset(&req.data, (height, width), pipe.vae.as_ref(), vocab, vae_dtype, &device)?;
    let state = req.out.join(checkpoint::TRAINING_STATE);
    let resuming = req.resume && state.is_file();
    let loaded_from = if resuming { Some(req.out.clone()) } else { req.init_adapter.clone() };
    let set = match &loaded_from {
        Some(path) => super::load_lora(&mut pipe, path)?,
        None => super::attach_lora(&mut pipe, &req.lora, req.text_encoder_lora.as_ref(), req.config.seed)?,
    };
    // Adapters loaded from a file carry no dropout; training ones get the requested one.
    if loaded_from.is_some() {
        for (_, linears) in super::pipeline_linears(&mut pipe) {
            for l in linears {
                if let Some(a) = &mut l.lora {
                    a.dropout = req.lora.dropout;
                }
            }
        }
    }
    let mut set = set;
    if loaded_from.is_some() {
        // The saved file's configs are rebuilt from the request (targets as given, not as matched).
        set.configs = std::iter::once(("unet".to_string(), req.lora.clone()))
            .chain(req.text_encoder_lora.iter().map(|c| ("text_encoder".to_string(), c.clone())))
            .filter(|(c, _)| set.params.iter().any(|p| p.key.starts_with(&format!("{c}."))))
            .collect();
    }
    let trainable_parameters = set.num_parameters();
    let mut trainer = Trainer::new(pipe, Trainable::Lora(set), ds.examples.clone(), req.config.clone())?;
    if resuming {
        checkpoint::resume(&mut trainer, &req.out)?;
    }
    let start_step = trainer.step;
    let mut losses = Vec::new();
    let root = world.rank() == 0;
    while trainer.step < req.config.steps {
        let stats = trainer.train_step_in(world)?;
        if !stats.loss.is_finite() {
            return Err(Error::Input(format!("loss is {} at step {}", stats.loss, trainer.step)));
        }
        losses.push(stats.loss);
        on_step(trainer.step, &stats);
        if root
            && req.checkpoint_every > 0
            && trainer.step % req.checkpoint_every == 0
            && trainer.step < req.config.steps
        {
            checkpoint::save(&trainer, &req.out, None)?;
        }
    }
    if root {
        checkpoint::save(&trainer, &req.out, None)?;
    }
    world.barrier()?;
    Ok(TrainSummary {
        examples: ds.examples.len(),
        dropped_zero_weight: ds.dropped_zero_weight,
        start_step,
        steps: trainer.step,
        trainable_parameters,
        losses,
    })
}
