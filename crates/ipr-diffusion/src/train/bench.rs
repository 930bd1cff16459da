//! Timing of one LoRA training step on the CPU (the library side of `ipr bench train-step`; its
//! PyTorch twin is `scripts/bench/train_step.py`, the same step with torch + diffusers + PEFT):
//! a UNet from `unet_dir/config.json` or a config file (its weights when the folder has them, else
//! seeded random ones; speed does not depend on them), rank-4 adapters on the default targets, random inputs of
//! the UNet's sample size, 8 text tokens of the cross-attention width, per-sample timesteps and
//! weights, the weighted loss, backward, gradient clipping at 1.0 and an AdamW step; fp32.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::loss::{weighted_loss, Batch};
use super::optim::{clip_grad_norm, named_grads, AdamW, AdamWConfig};
use crate::config::UNetConfig;
use crate::error::Result;
use crate::lora::{attach_unet, LoraConfig};
use crate::scheduler::{Ddpm, PredictionType};
use crate::unet::UNet2DConditionModel;

/// What the benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainStepReport {
    /// Median over the timed steps.
    pub ms_per_step: f64,
    /// Every timed step.
    pub ms_steps: Vec<f64>,
    /// Median of the forward part (noising, UNet, loss) of each step (null when sharded: the
    /// shards' passes overlap).
    pub ms_forward: Option<f64>,
    /// Median of backward + clipping + AdamW (null when sharded).
    pub ms_backward_and_update: Option<f64>,
    pub batch: usize,
    pub lora_parameters: usize,
    pub threads: usize,
    /// Threads candle's own matrix products use (its `get_num_threads`).
    pub candle_threads: usize,
    /// "cpu" or "cuda:N", and the frozen weights' dtype.
    pub device: String,
    pub dtype: String,
    /// Shards of the batch computed in parallel ([`super::TrainConfig::shards`]).
    pub shards: usize,
    /// FLOPs of one step's matrix products (forward counted by [`crate::flops`], backward
    /// derived: [`crate::flops::Counted::train_step`]), the rate reached at the median step and
    /// the machine's measured matrix-product peak.
    pub gflop_per_step: f64,
    pub gflop_per_s: f64,
    pub peak_gflop_per_s: f64,
    /// With `profile_steps > 0`: the milliseconds of one profiled step (unsharded, every op
    /// synchronised: a little slower than `ms_per_step`) and where they went, op by op
    /// ([`crate::op_profile`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms_profiled_step: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<Vec<crate::op_profile::OpTime>>,
}

/// Builds the UNet (frozen weights) for the benchmark from a UNet folder, or from a config file
/// alone (seeded random weights).
pub fn bench_unet(unet: &Path, dtype: DType, device: &Device) -> Result<UNet2DConditionModel> {
    let config_path = if unet.is_file() { unet.to_path_buf() } else { unet.join("config.json") };
    if unet.is_dir() && crate::source::weight_files(unet, "diffusion_pytorch_model").is_ok() {
        return UNet2DConditionModel::load(unet, dtype, device);
    }
    let config = UNetConfig::load(&config_path)?;
    let seeded = crate::init::SeededVarMap::new(0);
    UNet2DConditionModel::new(seeded.var_builder(DType::F32, device), config.clone(), &config_path)?;
    // Frozen: plain tensors, not variables.
    let tensors = seeded
        .varmap
        .data()
        .lock()
        .expect("var map")
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    UNet2DConditionModel::new(VarBuilder::from_tensors(tensors, dtype, device), config, &config_path)
}

/// Runs one warm-up step and `iters` timed steps. The frozen UNet and the inputs are in `dtype`
/// (f32 on the CPU; bf16 is the GPU's usual setting); LoRA weights, optimizer and loss stay f32.
/// `shards` applies on the CPU only (a GPU computes the whole batch at once). With
/// `profile_steps > 0`, that many more steps run unsharded with op timing on.
pub fn bench_train_step(
    unet_dir: &Path,
    batch: usize,
    iters: usize,
    shards: usize,
    device: &Device,
    dtype: DType,
    profile_steps: usize,
) -> Result<TrainStepReport> {
    super::cpu_runtime();
    let device = device.clone();
    let shards = if device.is_cpu() { shards } else { 1 };
    let mut unet = bench_unet(unet_dir, dtype, &device)?;
    let set = attach_unet(&mut unet, &LoraConfig::unet(4), 0)?;
    let params = set.named_vars();
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
    let ac = crate::scheduler::alphas_cumprod(&crate::scheduler::betas(
        &crate::scheduler::BetaSchedule::Linear { beta_start: 0.0001, beta_end: 0.02 },
        1000,
    ));
    let ddpm = Ddpm { alphas_cumprod: ac, prediction_type: PredictionType::Epsilon };
    let c = &unet.config;
    let s = c.sample_size.unwrap_or(32);
    let shape = (batch, c.in_channels, s, s);
    let (mut times, mut fwd_times, mut bwd_times) = (Vec::new(), Vec::new(), Vec::new());
    // One step: (total ms, forward ms: NaN when sharded).
    let mut step = |i: usize, shards: usize| -> Result<(f64, f64)> {
        let seed = i as u64 * 1000;
        let b = Batch {
            x0: crate::noise::randn(seed, shape, dtype, &device)?,
            noise: crate::noise::randn(seed + 1, shape, dtype, &device)?,
            timesteps: (0..batch).map(|j| (j * 997 + i * 131) % 1000).collect(),
            weights: (0..batch).map(|j| if j % 2 == 0 { 1.0 } else { 0.5 }).collect(),
            context: crate::noise::randn(seed + 2, (batch, 8, c.cross_attention_dim), dtype, &device)?,
            added: added_cond(c, batch, seed + 3, dtype, &device)?,
        };
        let start = Instant::now();
        let (mut grads, fwd) = if shards <= 1 {
            let (loss, _) = weighted_loss(&unet, &ddpm, &b, None)?;
            device.synchronize()?;
            let fwd = start.elapsed().as_secs_f64() * 1e3;
            (named_grads(&params, &loss.backward()?), fwd)
        } else {
            (super::sharded_loss_and_grads(&unet, &ddpm, &b, None, shards, 1.0, &params)?.1, f64::NAN)
        };
        clip_grad_norm(&mut grads, 1.0)?;
        opt.step(&grads, 1e-4)?;
        // CUDA kernels run asynchronously: wait for the step before reading the clock.
        device.synchronize()?;
        Ok((start.elapsed().as_secs_f64() * 1e3, fwd))
    };
    let before = crate::flops::Counted::now();
    for i in 0..=iters {
        let (ms, fwd) = step(i, shards)?;
        if i > 0 {
            times.push(ms);
            fwd_times.push(fwd);
            bwd_times.push(ms - fwd);
        }
    }
    let flops = crate::flops::Counted::now().since(before).train_step() as f64 / (iters + 1) as f64;
    let profiled = crate::op_profile::profile(profile_steps, || {
        (0..profile_steps).try_for_each(|i| step(iters + 1 + i, 1).map(|_| ()))
    })?;
    let ms_per_step = median(&times);
    Ok(TrainStepReport {
        ms_per_step,
        gflop_per_step: flops / 1e9,
        gflop_per_s: flops / ms_per_step / 1e6,
        peak_gflop_per_s: crate::flops::peak_gflops(&device)?,
        ms_forward: (shards <= 1).then(|| median(&fwd_times)),
        ms_backward_and_update: (shards <= 1).then(|| median(&bwd_times)),
        ms_steps: times,
        batch,
        lora_parameters: set.num_parameters(),
        threads: rayon::current_num_threads(),
        candle_threads: candle_core::utils::get_num_threads(),
        shards: shards.max(1),
        device: format!("{:?}", device.location()),
        dtype: dtype.as_str().to_string(),
        ms_profiled_step: profiled.as_ref().map(|p| p.0),
        ops: profiled.map(|p| p.1),
    })
}

/// SDXL's added conditioning for a UNet that takes it (`addition_embed_type: "text_time"`):
/// a random pooled text embedding and the time ids of a square image of the UNet's size, as the
/// diffusers twin passes them; `None` for other UNets.
fn added_cond(
    c: &UNetConfig,
    batch: usize,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Option<crate::unet::AddedCond>> {
    if c.addition_embed_type.as_deref() != Some("text_time") {
        return Ok(None);
    }
    let (Some(proj), Some(time)) = (c.projection_class_embeddings_input_dim, c.addition_time_embed_dim) else {
        return Ok(None);
    };
    let pooled = proj.saturating_sub(6 * time);
    let px = (c.sample_size.unwrap_or(128) * 8) as f32;
    let ids: Vec<f32> = (0..batch).flat_map(|_| [px, px, 0.0, 0.0, px, px]).collect();
    Ok(Some(crate::unet::AddedCond {
        text_embeds: crate::noise::randn(seed, (batch, pooled), dtype, device)?,
        time_ids: Tensor::from_vec(ids, (batch, 6), device)?.to_dtype(dtype)?,
    }))
}

/// The median of timings (the mean of the middle two for an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}
