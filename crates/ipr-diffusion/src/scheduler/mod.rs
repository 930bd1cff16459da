//! Noise schedules and samplers, as diffusers implements them (`DDPMScheduler.add_noise`,
//! `DDIMScheduler`, `EulerDiscreteScheduler`, `DPMSolverMultistepScheduler`).
//!
//! - Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (forward noising, linear betas).
//! - Song et al. 2021, "Denoising Diffusion Implicit Models" (DDIM, eta = 0).
//! - Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
//!   (Euler in sigma space, as k-diffusion and diffusers' `EulerDiscreteScheduler`).
//! - Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
//!   Models" (multistep second order, diffusers' `DPMSolverMultistepScheduler`).
//! - Salimans & Ho 2022, "Progressive Distillation" (v-prediction).
//!
//! The schedule math lives in small pure functions over `f64` (betas, timesteps, sigmas); the
//! samplers apply it to tensors. A [`Sampler`] is built from a `scheduler_config.json` the way
//! `XScheduler.from_config(config)` builds it: keys present in the file win, X's defaults fill in.
//!
//! | sampler | file | diffusers class | state |
//! |---|---|---|---|
//! | [`SamplerKind::Ddim`] | `ddim.rs` | `DDIMScheduler` (eta = 0) | none |
//! | [`SamplerKind::Euler`] | `euler.rs` | `EulerDiscreteScheduler` | none |
//! | [`SamplerKind::DpmSolverPlusPlus`] | `dpm_solver.rs` | `DPMSolverMultistepScheduler` | previous x0 |
//!
//! Training uses `ddpm.rs` (forward noising, velocity targets) and `betas.rs` (beta schedules).

mod betas;
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;

use std::path::Path;

use candle_core::Tensor;

pub use betas::{alphas_cumprod, betas, BetaSchedule};
pub use ddim::{Ddim, DdimConfig};
pub use ddpm::{add_noise, velocity, Ddpm};
pub use dpm_solver::{DpmSolverMultistep, DpmSolverMultistepConfig, FinalSigma, SolverType};
pub use euler::{EulerDiscrete, EulerDiscreteConfig};

use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise (`epsilon`).
    Epsilon,
    /// `v = sqrt(a) * noise - sqrt(1 - a) * x0`.
    VPrediction,
    /// The clean sample (`sample`).
    Sample,
}

impl PredictionType {
    /// Parses diffusers' `prediction_type` value.
    pub fn parse(value: &str, path: &Path) -> Result<Self> {
        match value {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            other => Err(Error::config(
                path,
                "prediction_type",
                format!("expected \"epsilon\", \"v_prediction\" or \"sample\", got {other:?}"),
            )),
        }
    }
}

/// How inference timesteps are spread over the training timesteps (diffusers' `timestep_spacing`;
/// table 2 of Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

impl TimestepSpacing {
    /// Parses diffusers' `timestep_spacing` value.
    pub fn parse(value: &str, path: &Path) -> Result<Self> {
        match value {
            "linspace" => Ok(Self::Linspace),
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            other => Err(Error::config(
                path,
                "timestep_spacing",
                format!("expected \"linspace\", \"leading\" or \"trailing\", got {other:?}"),
            )),
        }
    }
}

/// Which sampler to build from a scheduler config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    Ddim,
    Euler,
    /// Multistep DPM-Solver++ ("dpmsolver++").
    DpmSolverPlusPlus,
}

/// A sampler over a fixed list of inference timesteps: `timesteps()`, then for each index `i`
/// `scale_model_input(x, i)`, the model, and `step(model_output, i, x)`. `step` takes `&mut self`:
/// DPM-Solver++ keeps the previous step's data prediction (DDIM and Euler keep nothing).
#[derive(Debug, Clone)]
pub enum Sampler {
    Ddim(Ddim),
    Euler(EulerDiscrete),
    DpmSolver(DpmSolverMultistep),
}

impl Sampler {
    /// Builds `kind` from a parsed config, with `num_inference_steps` steps.
    pub fn from_config(
        kind: SamplerKind,
        config: &SchedulerConfig,
        path: &Path,
        num_inference_steps: usize,
    ) -> Result<Self> {
        Ok(match kind {
            SamplerKind::Ddim => Sampler::Ddim(Ddim::new(DdimConfig::from_config(config, path)?, num_inference_steps)?),
            SamplerKind::Euler => Sampler::Euler(EulerDiscrete::new(
                EulerDiscreteConfig::from_config(config, path)?,
                num_inference_steps,
            )?),
            SamplerKind::DpmSolverPlusPlus => Sampler::DpmSolver(DpmSolverMultistep::new(
                DpmSolverMultistepConfig::from_config(config, path)?,
                num_inference_steps,
            )?),
        })
    }

    /// Reads `scheduler_config.json` and builds `kind` from it.
    pub fn load(kind: SamplerKind, path: &Path, num_inference_steps: usize) -> Result<Self> {
        Self::from_config(kind, &SchedulerConfig::load(path)?, path, num_inference_steps)
    }

    /// The timesteps the model is called at, in order (floats: Euler's may be fractional).
    pub fn timesteps(&self) -> Vec<f64> {
        match self {
            Sampler::Ddim(s) => s.timesteps.iter().map(|&t| t as f64).collect(),
            Sampler::Euler(s) => s.timesteps.clone(),
            Sampler::DpmSolver(s) => s.timesteps.iter().map(|&t| t as f64).collect(),
        }
    }

    /// Factor applied to the initial Gaussian noise.
    pub fn init_noise_sigma(&self) -> f64 {
        match self {
            Sampler::Ddim(_) | Sampler::DpmSolver(_) => 1.0,
            Sampler::Euler(s) => s.init_noise_sigma(),
        }
    }

    /// Model input at step `i` (Euler divides by `sqrt(sigma^2 + 1)`; DDIM and DPM-Solver++ pass
    /// through).
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        match self {
            Sampler::Ddim(_) | Sampler::DpmSolver(_) => Ok(sample.clone()),
            Sampler::Euler(s) => s.scale_model_input(sample, i),
        }
    }

    /// One denoising step from the model output at step index `i`. Steps go in order `0..n`; a
    /// multistep sampler uses what the call for `i - 1` left (see [`DpmSolverMultistep::step`]).
    pub fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        match self {
            Sampler::Ddim(s) => s.step(model_output, i, sample),
            Sampler::Euler(s) => s.step(model_output, i, sample),
            Sampler::DpmSolver(s) => s.step(model_output, i, sample),
        }
    }
}

/// Common keys of the schedulers, resolved with one scheduler's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseSchedule {
    pub num_train_timesteps: usize,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
}

impl BaseSchedule {
    fn resolve(c: &SchedulerConfig, path: &Path, default_spacing: &str) -> Result<Self> {
        if c.thresholding == Some(true) {
            return Err(Error::config(path, "thresholding", "dynamic thresholding is not supported"));
        }
        if c.rescale_betas_zero_snr == Some(true) {
            return Err(Error::config(path, "rescale_betas_zero_snr", "is not supported"));
        }
        let num_train_timesteps = c.num_train_timesteps.unwrap_or(1000);
        if !(1..=1 << 20).contains(&num_train_timesteps) {
            return Err(Error::config(
                path,
                "num_train_timesteps",
                format!("{num_train_timesteps} is outside 1..=1048576"),
            ));
        }
        Ok(Self {
            num_train_timesteps,
            beta_schedule: BetaSchedule::from_config(c, path)?,
            prediction_type: PredictionType::parse(c.prediction_type.as_deref().unwrap_or("epsilon"), path)?,
            timestep_spacing: TimestepSpacing::parse(c.timestep_spacing.as_deref().unwrap_or(default_spacing), path)?,
            steps_offset: c.steps_offset.unwrap_or(0),
        })
    }
}

/// Inference timesteps as diffusers' `set_timesteps` computes them, as floats before any
/// rounding to integers (DDIM truncates them to integers, Euler keeps them).
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let n = num_inference_steps;
    let big_n = num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => {
            let last = (big_n - 1) as f64;
            let mut t: Vec<f64> = (0..n).map(|i| if n == 1 { 0.0 } else { last * i as f64 / (n - 1) as f64 }).collect();
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = big_n / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            // np.round(np.arange(N, 0, -N / n)) - 1, with numpy's float steps.
            let ratio = big_n as f64 / n as f64;
            let mut out = Vec::new();
            let mut i = 0usize;
            loop {
                let v = big_n as f64 - i as f64 * ratio;
                if v <= 0.0 {
                    break;
                }
                out.push(round_half_even(v) - 1.0);
                i += 1;
            }
            out
        }
    }
}

/// numpy's `round` (half to even).
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}
