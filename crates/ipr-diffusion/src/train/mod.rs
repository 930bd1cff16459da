//! Training: LoRA (Hu et al. 2021) or full fine-tuning of a text-to-image model with IPR's
//! reward-rescaled loss (docs/ipr-reference.md, section 1), following diffusers'
//! `train_text_to_image_lora.py` / `train_text_to_image.py`: images to latents (or pixels), one
//! random timestep and one noise draw per sample, DDPM noising, epsilon / v / x0 target per the
//! scheduler config, `loss = sum_i w_i mse_i / batch`, AdamW (torch semantics), gradient
//! clipping, LR schedule, gradient accumulation, optional min-SNR-gamma, EMA for full training.
//! SDXL follows `train_text_to_image_lora_sdxl.py`: both text encoders' penultimate hidden states,
//! the second's pooled projection, and per-sample time ids from each example's original size and
//! crop ([`SizeCond`], [`time_ids`]); `tests/sdxl_training.rs` checks one step's loss and LoRA
//! gradients against that script's.
//!
//! Determinism: every random draw is a pure function of `(seed, step, micro-batch, slot)` (the
//! example, its timestep, its noise, its flip) or of `(seed, epoch)` (the order examples are
//! visited in), so a run is reproducible from its seed, and a resumed run continues exactly as
//! the uninterrupted one would (LoRA dropout, off by default, is the exception: its masks come
//! from a stream).
//!
//! What "weight 0 removes a sample's influence" means here, honestly: (1) zero-weight rows are
//! dropped when the dataset is read ([`data`]), so training with and without them is
//! bit-identical; (2) inside a batch, a sample's contribution to the gradient is `w_i * dmse_i`,
//! exactly zero for `w_i = 0`, and no other sample's draws depend on it, so replacing the image
//! and caption of a zero-weight sample by anything else leaves the adapter bit-identical (tested
//! in `tests/training.rs` through [`loss::weighted_loss`]). It still counts in the divisor
//! `batch`, as in the paper's formula.
//!
//! Modules: [`loss`] (the weighted loss), [`optim`] (AdamW, clipping), [`schedule`] (LR),
//! [`ema`], [`augment`] (caption-aware flip), [`data`] (imagefolder to tensors), [`checkpoint`]
//! (optimizer state for resume, full-model export), [`run`] (the library side of `ipr train`),
//! [`bench`] (the training-step benchmark).

pub mod augment;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod ddpo;
pub mod distributed;
pub mod ema;
pub mod loss;
pub mod optim;
pub mod run;
pub mod schedule;

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use rayon::prelude::*;

use crate::clip_text::ClipTextModel;
use crate::collective::{Collective, SingleProcess};
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraSet};
use crate::noise::SplitMix64;
use crate::pipeline::{Pipeline, TextEncoders};
use crate::scheduler::Ddpm;
use crate::unet::{AddedCond, UNet2DConditionModel};
use data::Example;
use ema::Ema;
use loss::{weighted_loss, Batch};
use optim::{AdamW, AdamWConfig};
use schedule::LrSchedule;

/// Tunes the process for CPU training, once, before the first tensor op (measured on the toy UNet,
/// 2 cores under load: 430 -> 355 ms per LoRA step):
/// - glibc malloc: every step allocates and frees hundreds of tensor buffers above malloc's mmap
///   threshold, each costing fresh page faults and zeroing; raising the mmap and trim thresholds
///   keeps them in the heap for reuse (what torch's caching allocator does for it); for programs
///   on glibc's allocator (the `ipr` binary uses mimalloc, set to keep freed pages);
/// - candle's elementwise "barrier pool" spin-waits on its worker threads; on a busy machine the
///   spinning takes the cores gemm needs, so it is turned off (`CANDLE_NUM_THREADS=1`) unless the
///   user set `CANDLE_NUM_THREADS`. Matrix products and this crate's kernels still use rayon's
///   threads (`RAYON_NUM_THREADS`);
/// - `RAYON_NUM_THREADS`, when unset, is set to candle's own default (physical cores): candle 0.11
///   recomputes that default on every matrix product when the variable is absent, re-reading
///   `/proc/cpuinfo` each time (measured: a toy LoRA step at 2 threads took 66-74 ms instead of
///   45 ms). Set before rayon's global pool starts, so rayon and candle agree on the count.
pub fn cpu_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
        }
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; called once, before training.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}

/// Checks a [`TrainConfig::timestep_range`] against the scheduler: non-empty and inside its
/// training timesteps.
pub fn check_timestep_range((lo, hi): (usize, usize), ddpm: &Ddpm) -> Result<()> {
    let n = ddpm.alphas_cumprod.len();
    if lo >= hi || hi > n {
        return Err(Error::Input(format!(
            "timestep range [{lo}, {hi}) is not inside the scheduler's [0, {n}) or is empty"
        )));
    }
    Ok(())
}

/// Optimisation settings; `Default` follows diffusers' LoRA script where it has one.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub schedule: LrSchedule,
    pub adam: AdamWConfig,
    /// `max_grad_norm` (diffusers: 1.0); `None` = no clipping.
    pub max_grad_norm: Option<f64>,
    pub min_snr_gamma: Option<f64>,
    /// Draw training timesteps uniformly from `[lo, hi)` instead of every timestep of the
    /// scheduler (diffusers' `--timestep_bias_strategy range`); `None` = all.
    pub timestep_range: Option<(usize, usize)>,
    pub seed: u64,
    /// Flip images horizontally (with the caption mirrored) with probability 1/2, for examples
    /// that have a mirrored copy ([`data::load_dataset`] with a vocabulary).
    pub flip: bool,
    /// On the CPU, each micro-batch is split into this many shards whose forward and backward
    /// passes run in parallel (rayon), their gradients summed: candle's elementwise kernels are
    /// single-threaded, so this is what puts a second core to work. Fixed rather than taken from
    /// the core count so that a run's numbers do not depend on the machine; 1 turns it off.
    pub shards: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 1,
            grad_accum: 1,
            learning_rate: 1e-4,
            schedule: LrSchedule::Constant,
            adam: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            min_snr_gamma: None,
            timestep_range: None,
            seed: 0,
            flip: false,
            shards: DEFAULT_SHARDS,
        }
    }
}

/// Default [`TrainConfig::shards`]: two (the 2-core machines this crate is measured on).
pub const DEFAULT_SHARDS: usize = 2;

/// What is trained.
#[derive(Clone)]
pub enum Trainable {
    /// Adapters (already attached to the pipeline's models).
    Lora(LoraSet),
    /// Every weight of the UNet (and of the text encoder when given): the pipeline's models must
    /// have been built from these `VarMap`s ([`make_full_trainable`]); `ema_decay` keeps an EMA.
    Full { unet: VarMap, text_encoder: Option<VarMap>, ema_decay: Option<f64> },
}

/// Attaches fresh LoRA adapters to the UNet (and the text encoder(s) when `text_encoder` is
/// given) of `pipe`.
pub fn attach_lora(
    pipe: &mut Pipeline,
    unet: &LoraConfig,
    text_encoder: Option<&LoraConfig>,
    seed: u64,
) -> Result<LoraSet> {
    let mut set = crate::lora::attach_unet(&mut pipe.unet, unet, seed)?;
    if let Some(tc) = text_encoder {
        match &mut pipe.text {
            TextEncoders::Single { text_encoder, .. } => {
                set.extend(crate::lora::attach_text_encoder(text_encoder, "text_encoder", tc, seed)?)
            }
            TextEncoders::Dual { text_encoder, text_encoder_2, .. } => {
                set.extend(crate::lora::attach_text_encoder(text_encoder, "text_encoder", tc, seed)?);
                set.extend(crate::lora::attach_text_encoder(text_encoder_2, "text_encoder_2", tc, seed)?);
            }
        }
    }
    Ok(set)
}

/// Every linear of every model of the pipeline, by component name.
pub fn pipeline_linears(pipe: &mut Pipeline) -> Vec<(&'static str, Vec<&mut crate::nn::Linear>)> {
    let mut out = vec![("unet", pipe.unet.linears_mut())];
    match &mut pipe.text {
        TextEncoders::Single { text_encoder, .. } => out.push(("text_encoder", text_encoder.linears_mut())),
        TextEncoders::Dual { text_encoder, text_encoder_2, .. } => {
            out.push(("text_encoder", text_encoder.linears_mut()));
            out.push(("text_encoder_2", text_encoder_2.linears_mut()));
        }
    }
    out
}

/// Loads an adapter file onto `pipe` (every component it has); returns the attached set.
pub fn load_lora(pipe: &mut Pipeline, path: &std::path::Path) -> Result<LoraSet> {
    let weights = crate::lora_io::load(path, "unet")?;
    let comps = weights.components();
    let mut set = LoraSet::default();
    for (name, linears) in pipeline_linears(pipe) {
        if comps.iter().any(|c| c == name) {
            set.extend(weights.apply(linears, name)?);
        }
    }
    for c in comps {
        if !set.params.iter().any(|p| p.key.starts_with(&format!("{c}."))) {
            return Err(Error::Input(format!("{}: this pipeline has no component {c}", path.display())));
        }
    }
    Ok(set)
}

/// Rebuilds the pipeline's UNet (and text encoder, with `text_encoder`) from `VarMap`s: from the
/// pipeline folder's weights when `folder` is given, else freshly initialised (torch-like init,
/// for training from scratch, seeded by `seed` through [`crate::init::SeededVarMap`]). SDXL's
/// second text encoder stays frozen.
pub fn make_full_trainable(
    pipe: &mut Pipeline,
    folder: Option<&std::path::Path>,
    text_encoder: bool,
    seed: u64,
) -> Result<(VarMap, Option<VarMap>)> {
    let dtype = pipe.dtype;
    let device = pipe.device.clone();
    let seeded = crate::init::SeededVarMap::new(seed);
    let unet_map = seeded.varmap.clone();
    let config = pipe.unet.config.clone();
    let config_path = folder.map(|f| f.join("unet").join("config.json")).unwrap_or_default();
    let unet = UNet2DConditionModel::new(seeded.var_builder(dtype, &device), config, &config_path)?;
    if let Some(f) = folder {
        load_varmap(&unet_map, &crate::source::weight_files(&f.join("unet"), "diffusion_pytorch_model")?)?;
    }
    pipe.unet = unet;
    let te_map = if text_encoder {
        let seeded = crate::init::SeededVarMap::new(seed ^ 0x7E47);
        let map = seeded.varmap.clone();
        let te = match &mut pipe.text {
            TextEncoders::Single { text_encoder, .. } | TextEncoders::Dual { text_encoder, .. } => text_encoder,
        };
        let new = ClipTextModel::new(seeded.var_builder(dtype, &device), te.config.clone())?;
        if let Some(f) = folder {
            load_varmap(&map, &crate::source::weight_files(&f.join("text_encoder"), "model")?)?;
        }
        *te = new;
        Some(map)
    } else {
        None
    };
    Ok((unet_map, te_map))
}

/// Sets every variable of `map` from safetensors files (names with or without `text_model.`).
fn load_varmap(map: &VarMap, files: &[std::path::PathBuf]) -> Result<()> {
    let mut all = HashMap::new();
    for f in files {
        let t = candle_core::safetensors::load(f, &candle_core::Device::Cpu)
            .map_err(|source| Error::Weights { path: f.clone(), source })?;
        all.extend(t);
    }
    let data = map.data().lock().map_err(|_| Error::Input("VarMap lock poisoned".into()))?;
    for (name, var) in data.iter() {
        let t = all
            .get(name)
            .or_else(|| all.get(&format!("text_model.{name}")))
            .ok_or_else(|| Error::Input(format!("{}: no tensor {name}", files[0].display())))?;
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// SDXL's size conditioning of a training example (Podell et al. 2023, "SDXL: Improving Latent
/// Diffusion Models for High-Resolution Image Synthesis", section 2.2), as diffusers'
/// `train_text_to_image_lora_sdxl.py` records it per image: the image's size before it was
/// resized, and the top-left corner of the crop taken from the resized image.
///
/// Flipping: that script flips the resized image before cropping and keeps the crop's corner as
/// drawn, so a flipped example has the same time ids; [`Trainer::make_batch`] does the same. (The
/// full fine-tuning script, `train_text_to_image_sdxl.py`, flips after cropping and stores
/// `crop_left = resolution - crop_left`; not followed here.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeCond {
    /// `(height, width)` of the image as read, before any resize.
    pub original: (usize, usize),
    /// `(top, left)` of the crop, in pixels of the resized image.
    pub crop_top_left: (usize, usize),
}

/// One sample's SDXL time ids, diffusers' `compute_time_ids`:
/// `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`, `target` being the training
/// resolution `(height, width)`. Without a size condition the image is taken as given at the
/// target size, uncropped: `[H, W, 0, 0, H, W]`, what the pipeline uses when sampling.
pub fn time_ids(cond: Option<SizeCond>, target: (usize, usize)) -> [f32; 6] {
    let c = cond.unwrap_or(SizeCond { original: target, crop_top_left: (0, 0) });
    [c.original.0, c.original.1, c.crop_top_left.0, c.crop_top_left.1, target.0, target.1].map(|v| v as f32)
}

/// Statistics of one optimiser step.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// The weighted loss, averaged over the micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

/// A training run in progress.
pub struct Trainer {
    pub pipe: Pipeline,
    pub config: TrainConfig,
    pub trainable: Trainable,
    pub params: Vec<(String, Var)>,
    pub optimizer: AdamW,
    pub ema: Option<Ema>,
    pub ddpm: Ddpm,
    pub examples: Vec<Example>,
    /// Optimiser steps done.
    pub step: usize,
    text_trained: bool,
    text_cache: HashMap<String, (Tensor, Option<Tensor>)>,
}

fn mix(seed: u64, a: u64, b: u64, c: u64) -> u64 {
    let mut r = SplitMix64::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let x = r.next_u64() ^ b.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut r = SplitMix64::new(x);
    r.next_u64() ^ c.wrapping_mul(0x94D0_49BB_1331_11EB)
}

impl Trainer {
    pub fn new(pipe: Pipeline, trainable: Trainable, examples: Vec<Example>, config: TrainConfig) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::Input("no training examples".into()));
        }
        if config.batch_size == 0 || config.grad_accum == 0 {
            return Err(Error::Input("batch size and gradient accumulation must be at least 1".into()));
        }
        let ddpm = Ddpm::from_config(&pipe.scheduler_config, &pipe.scheduler_config_path)?;
        if let Some(range) = config.timestep_range {
            check_timestep_range(range, &ddpm)?;
        }
        let (params, ema, text_trained) = match &trainable {
            Trainable::Lora(set) => {
                let p = set.named_vars();
                let text = set.params.iter().any(|p| p.key.starts_with("text_encoder"));
                (p, None, text)
            }
            Trainable::Full { unet, text_encoder, ema_decay } => {
                let mut p = named_vars(unet, "unet");
                if let Some(t) = text_encoder {
                    p.extend(named_vars(t, "text_encoder"));
                }
                let ema = ema_decay.map(|d| Ema::new(&p, d)).transpose()?;
                (p, ema, text_encoder.is_some())
            }
        };
        let optimizer = AdamW::new(params.clone(), config.adam)?;
        Ok(Self {
            pipe,
            config,
            trainable,
            params,
            optimizer,
            ema,
            ddpm,
            examples,
            step: 0,
            text_trained,
            text_cache: HashMap::new(),
        })
    }

    /// The example index at position `pos` of the stream of shuffled epochs.
    fn example_index(&self, pos: usize) -> usize {
        let n = self.examples.len();
        let epoch = (pos / n) as u64;
        // Fisher-Yates with a per-epoch generator.
        let mut rng = SplitMix64::new(mix(self.config.seed, 0xE70C, epoch, 0));
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        perm[pos % n]
    }

    fn encode(&mut self, captions: &[String]) -> Result<(Tensor, Option<Tensor>)> {
        if self.text_trained {
            let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
            let e = self.pipe.encode_prompts(&refs)?;
            return Ok((e.embeds, e.pooled));
        }
        let mut embeds = Vec::new();
        let mut pooled = Vec::new();
        for c in captions {
            if !self.text_cache.contains_key(c) {
                let e = self.pipe.encode_prompts(&[c.as_str()])?;
                self.text_cache.insert(c.clone(), (e.embeds.detach(), e.pooled.map(|p| p.detach())));
            }
            let (e, p) = &self.text_cache[c];
            embeds.push(e.clone());
            if let Some(p) = p {
                pooled.push(p.clone());
            }
        }
        let pooled = if pooled.is_empty() { None } else { Some(Tensor::cat(&pooled, 0)?) };
        Ok((Tensor::cat(&embeds, 0)?, pooled))
    }

    /// The batch of micro-batch `micro` of step `step` (pure function of the seed and indices).
    pub fn make_batch(&mut self, step: usize, micro: usize) -> Result<Batch> {
        let b = self.config.batch_size;
        let (t_lo, t_hi) = self.config.timestep_range.unwrap_or((0, self.ddpm.alphas_cumprod.len()));
        let mut x0 = Vec::with_capacity(b);
        let mut captions = Vec::with_capacity(b);
        let mut size_conds = Vec::with_capacity(b);
        let mut timesteps = Vec::with_capacity(b);
        let mut weights = Vec::with_capacity(b);
        let mut noise_seeds = Vec::with_capacity(b);
        for slot in 0..b {
            let pos = (step * self.config.grad_accum + micro) * b + slot;
            let ex = &self.examples[self.example_index(pos)];
            let mut rng = SplitMix64::new(mix(self.config.seed, step as u64, micro as u64, slot as u64));
            timesteps.push(t_lo + (rng.next_u64() % (t_hi - t_lo) as u64) as usize);
            noise_seeds.push(rng.next_u64());
            let flip = rng.next_f64() <= 0.5;
            match (&ex.flipped, self.config.flip && flip) {
                (Some((x, c)), true) => {
                    x0.push(x.clone());
                    captions.push(c.clone());
                }
                _ => {
                    x0.push(ex.x0.clone());
                    captions.push(ex.caption.clone());
                }
            }
            // A flipped example keeps its size conditioning (see [`SizeCond`]).
            size_conds.push(ex.size_cond);
            weights.push(ex.weight);
        }
        let device = self.pipe.device.clone();
        let dtype = self.pipe.dtype;
        let x0 = Tensor::stack(&x0, 0)?.to_device(&device)?.to_dtype(dtype)?;
        let shape: Vec<usize> = x0.dims()[1..].to_vec();
        let noise = crate::noise::randn_per_sample(&noise_seeds, &shape, dtype, &device)?;
        self.batch_from(x0, noise, timesteps, weights, &captions, &size_conds)
    }

    /// The batch of given samples, as [`Trainer::make_batch`] finishes it once it has drawn them:
    /// the captions through the pipeline's text encoder(s) (with their graph when they are
    /// trained, else cached), and for SDXL the added conditioning, the second encoder's pooled
    /// embeddings and each sample's [`time_ids`] for the resolution `x0` stands for. `x0` and
    /// `noise` are `(B, C, H, W)` on the pipeline's device, in its dtype.
    pub fn batch_from(
        &mut self,
        x0: Tensor,
        noise: Tensor,
        timesteps: Vec<usize>,
        weights: Vec<f64>,
        captions: &[String],
        size_conds: &[Option<SizeCond>],
    ) -> Result<Batch> {
        let (b, _, h, w) = x0.dims4()?;
        if captions.len() != b || size_conds.len() != b {
            return Err(Error::Input(format!(
                "{} captions and {} size conditions for a batch of {b}",
                captions.len(),
                size_conds.len()
            )));
        }
        let (context, pooled) = self.encode(captions)?;
        let added = match pooled {
            Some(p) => {
                let f = self.pipe.vae_scale_factor();
                let ids: Vec<f32> = size_conds.iter().flat_map(|c| time_ids(*c, (h * f, w * f))).collect();
                let time_ids = Tensor::from_vec(ids, (b, 6), x0.device())?.to_dtype(x0.dtype())?;
                Some(AddedCond { text_embeds: p, time_ids })
            }
            None => None,
        };
        Ok(Batch { x0, noise, timesteps, weights, context, added })
    }

    /// One optimiser step over `grad_accum` micro-batches, in this process alone.
    pub fn train_step(&mut self) -> Result<StepStats> {
        self.train_step_in(&SingleProcess)
    }

    /// One optimiser step over `grad_accum` micro-batches, data-parallel over the ranks of
    /// `world`: every rank draws the same micro-batch, computes its pieces of it
    /// ([`data_parallel_loss_and_grads`]) and gets every rank's gradients, so every rank takes
    /// the same AdamW step and holds the same adapter bits.
    pub fn train_step_in(&mut self, world: &dyn Collective) -> Result<StepStats> {
        let step = self.step;
        let accum = self.config.grad_accum;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0.0;
        let shards = if self.pipe.device.is_cpu() { self.config.shards.max(1) } else { 1 };
        for micro in 0..accum {
            let batch = self.make_batch(step, micro)?;
            let (loss, g) = data_parallel_loss_and_grads(
                &self.pipe.unet,
                &self.ddpm,
                &batch,
                self.config.min_snr_gamma,
                shards,
                1.0 / accum as f64,
                &self.params,
                world,
            )?;
            loss_sum += loss;
            optim::accumulate(&mut grads, g)?;
        }
        let grad_norm = match self.config.max_grad_norm {
            Some(max) => optim::clip_grad_norm(&mut grads, max)?,
            None => f64::NAN,
        };
        let lr = self.config.learning_rate * self.config.schedule.factor(step);
        self.optimizer.step(&grads, lr)?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.params)?;
        }
        self.step += 1;
        Ok(StepStats { loss: loss_sum, grad_norm, lr })
    }

    /// The LoRA set being trained (`None` in full mode).
    pub fn lora(&self) -> Option<&LoraSet> {
        match &self.trainable {
            Trainable::Lora(s) => Some(s),
            Trainable::Full { .. } => None,
        }
    }
}

/// The weighted loss of `batch` times `scale` and the gradients of `params`, with the batch cut
/// into `shards` whose forward and backward passes run in parallel (rayon). Each shard's loss is
/// rescaled by its share of the batch, so the shards' losses and gradients sum to the batch's
/// (`sum_i w_i mse_i / B`), up to float rounding.
pub fn sharded_loss_and_grads(
    unet: &crate::unet::UNet2DConditionModel,
    ddpm: &Ddpm,
    batch: &Batch,
    min_snr_gamma: Option<f64>,
    shards: usize,
    scale: f64,
    params: &[(String, Var)],
) -> Result<(f64, HashMap<String, Tensor>)> {
    data_parallel_loss_and_grads(unet, ddpm, batch, min_snr_gamma, shards, scale, params, &SingleProcess)
}

/// [`sharded_loss_and_grads`] over the ranks of `world`: the batch is cut into
/// `shards_per_rank * world.size()` pieces (fewer when the batch is smaller), rank `r` computes
/// pieces `[r * shards_per_rank, (r + 1) * shards_per_rank)`, every rank gets every piece's loss
/// and gradients ([`distributed::gather_pieces`]) and sums them in piece order, exactly as one
/// process with `shards_per_rank * world.size()` shards does. So `mpirun -n 2` with one shard
/// per rank gives the bits of one process with two shards, and no number depends on how the
/// pieces were spread over processes (each piece is computed the same way whatever the thread
/// count: tested).
#[allow(clippy::too_many_arguments)]
pub fn data_parallel_loss_and_grads(
    unet: &crate::unet::UNet2DConditionModel,
    ddpm: &Ddpm,
    batch: &Batch,
    min_snr_gamma: Option<f64>,
    shards_per_rank: usize,
    scale: f64,
    params: &[(String, Var)],
    world: &dyn Collective,
) -> Result<(f64, HashMap<String, Tensor>)> {
    let b = batch.x0.dim(0)?;
    let per_rank = shards_per_rank.max(1);
    let pieces = batch.split(per_rank * world.size())?;
    let lo = (world.rank() * per_rank).min(pieces.len());
    let hi = ((world.rank() + 1) * per_rank).min(pieces.len());
    let results: Vec<Result<(f64, candle_core::backprop::GradStore)>> = pieces[lo..hi]
        .par_iter()
        .map(|part| {
            let (loss, _) = weighted_loss(unet, ddpm, part, min_snr_gamma)?;
            let k = scale * part.x0.dim(0)? as f64 / b as f64;
            let loss = if k != 1.0 { (loss * k)? } else { loss };
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok((value, loss.backward()?))
        })
        .collect();
    let mine = results
        .into_iter()
        .map(|r| r.map(|(value, store)| (value, optim::named_grads(params, &store))))
        .collect::<Result<Vec<_>>>()?;
    let alone = world.size() == 1 && !world.on_device();
    let all = if alone { mine } else { distributed::gather_pieces(world, mine, per_rank, params)? };
    let (mut total, mut grads) = (0.0, HashMap::new());
    for (value, g) in all {
        total += value;
        optim::accumulate(&mut grads, g)?;
    }
    Ok((total, grads))
}

/// `(prefix.name, var)` of a `VarMap`, sorted by name.
pub fn named_vars(map: &VarMap, prefix: &str) -> Vec<(String, Var)> {
    let data = map.data().lock().expect("VarMap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (format!("{prefix}.{k}"), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
