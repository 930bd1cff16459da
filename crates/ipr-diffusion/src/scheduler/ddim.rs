//! DDIM sampling (Song et al. 2021, eq. 12), as diffusers' `DDIMScheduler.step`: predict x0 and
//! the noise from the model output, optionally clip x0, then move to the previous timestep
//! `t - num_train_timesteps / num_inference_steps`: deterministically with eta = 0 ([`Ddim::step`]),
//! or as a Gaussian of standard deviation `eta * sigma_t` ([`Ddim::step_distribution`]), the
//! policy DDPO trains.

use std::path::Path;

use candle_core::Tensor;

use super::{alphas_cumprod, betas, spaced_timesteps, BaseSchedule, PredictionType};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// `DDIMScheduler`'s configuration with its defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimConfig {
    pub base: BaseSchedule,
    /// Clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]` (default true).
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// Use alpha_cumprod = 1 past the last step (default true); SD checkpoints set false.
    pub set_alpha_to_one: bool,
}

impl DdimConfig {
    /// `DDIMScheduler.from_config(c)`: the file's keys, DDIM's defaults for the others.
    pub fn from_config(c: &SchedulerConfig, path: &Path) -> Result<Self> {
        Ok(Self {
            base: BaseSchedule::resolve(c, path, "leading")?,
            clip_sample: c.clip_sample.unwrap_or(true),
            clip_sample_range: c.clip_sample_range.unwrap_or(1.0),
            set_alpha_to_one: c.set_alpha_to_one.unwrap_or(true),
        })
    }
}

/// A DDIM sampler set to a number of inference steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    pub config: DdimConfig,
    pub alphas_cumprod: Vec<f64>,
    pub final_alpha_cumprod: f64,
    /// Integer timesteps, descending.
    pub timesteps: Vec<usize>,
    pub num_inference_steps: usize,
}

impl Ddim {
    /// `DDIMScheduler(**config).set_timesteps(num_inference_steps)`.
    pub fn new(config: DdimConfig, num_inference_steps: usize) -> Result<Self> {
        let n_train = config.base.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n_train {
            return Err(Error::Input(format!(
                "num_inference_steps must be in 1..={n_train}, got {num_inference_steps}"
            )));
        }
        let ac = alphas_cumprod(&betas(&config.base.beta_schedule, n_train));
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { ac[0] };
        let b = &config.base;
        // DDIM rounds linspace timesteps and truncates to int64 like numpy's astype.
        let timesteps = spaced_timesteps(b.timestep_spacing, n_train, num_inference_steps, b.steps_offset)
            .into_iter()
            .map(|t| {
                let t =
                    if b.timestep_spacing == super::TimestepSpacing::Linspace { super::round_half_even(t) } else { t };
                t as usize
            })
            .collect();
        Ok(Self { config, alphas_cumprod: ac, final_alpha_cumprod, timesteps, num_inference_steps })
    }

    /// One DDIM step (eta = 0) from step index `i` to the previous timestep.
    pub fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        Ok(self.step_distribution(model_output, i, sample, 0.0)?.0)
    }

    /// The distribution of the previous sample at step index `i` with noise level `eta`: its mean
    /// and its standard deviation `eta * sigma_t`, `sigma_t^2 = (1 - a_prev) / (1 - a_t) *
    /// (1 - a_t / a_prev)` (diffusers' `_get_variance`); `x_prev = mean + std * z`, z ~ N(0, I).
    /// With eta = 0 the mean is [`Ddim::step`]. The last step of a schedule whose final alpha is 1
    /// has std 0 whatever eta: it is deterministic.
    pub fn step_distribution(
        &self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        eta: f64,
    ) -> Result<(Tensor, f64)> {
        let t = *self
            .timesteps
            .get(i)
            .ok_or_else(|| Error::Input(format!("step index {i} past {} steps", self.timesteps.len())))?;
        let prev_t = t as i64 - (self.config.base.num_train_timesteps / self.num_inference_steps) as i64;
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev_t >= 0 { self.alphas_cumprod[prev_t as usize] } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.config.base.prediction_type {
            PredictionType::Epsilon => {
                let x0 = ((sample - (model_output * b_t.sqrt())?)? / a_t.sqrt())?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = ((sample - (model_output * a_t.sqrt())?)? / b_t.sqrt())?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = ((sample * a_t.sqrt())? - (model_output * b_t.sqrt())?)?;
                let eps = ((model_output * a_t.sqrt())? + (sample * b_t.sqrt())?)?;
                (x0, eps)
            }
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev);
        let std = eta * variance.max(0.0).sqrt();
        let mean = ((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev - std * std).sqrt())?)?;
        Ok((mean, std))
    }
}
