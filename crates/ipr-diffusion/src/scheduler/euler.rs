//! Euler sampling in sigma space (Karras et al. 2022, algorithm 2 with s_churn = 0), as diffusers'
//! `EulerDiscreteScheduler`: sigmas `sqrt((1 - a) / a)` interpolated linearly at the inference
//! timesteps, a final sigma of 0, model inputs scaled by `1 / sqrt(sigma^2 + 1)`.

use std::path::Path;

use candle_core::Tensor;

use super::{alphas_cumprod, betas, spaced_timesteps, BaseSchedule, PredictionType, TimestepSpacing};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// `EulerDiscreteScheduler`'s configuration with its defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerDiscreteConfig {
    pub base: BaseSchedule,
}

impl EulerDiscreteConfig {
    /// `EulerDiscreteScheduler.from_config(c)`: the file's keys, Euler's defaults for the others
    /// (`timestep_spacing` "linspace"). Options this crate does not implement are errors.
    pub fn from_config(c: &SchedulerConfig, path: &Path) -> Result<Self> {
        let unsupported = [
            ("use_karras_sigmas", c.use_karras_sigmas == Some(true)),
            ("use_exponential_sigmas", c.use_exponential_sigmas == Some(true)),
            ("use_beta_sigmas", c.use_beta_sigmas == Some(true)),
            ("interpolation_type", c.interpolation_type.as_deref().is_some_and(|v| v != "linear")),
            ("final_sigmas_type", c.final_sigmas_type.as_deref().is_some_and(|v| v != "zero")),
            ("timestep_type", c.timestep_type.as_deref().is_some_and(|v| v != "discrete")),
        ];
        for (key, set) in unsupported {
            if set {
                return Err(Error::config(path, key, "only diffusers' default is supported by the Euler sampler"));
            }
        }
        Ok(Self { base: BaseSchedule::resolve(c, path, "linspace")? })
    }
}

/// An Euler sampler set to a number of inference steps.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    pub config: EulerDiscreteConfig,
    /// Float timesteps, descending.
    pub timesteps: Vec<f64>,
    /// One sigma per timestep, then 0.
    pub sigmas: Vec<f64>,
}

/// numpy's `interp(x, arange(len(ys)), ys)`.
fn interp(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let f = x - i as f64;
    ys[i] + f * (ys[i + 1] - ys[i])
}

impl EulerDiscrete {
    /// `EulerDiscreteScheduler(**config).set_timesteps(num_inference_steps)`.
    pub fn new(config: EulerDiscreteConfig, num_inference_steps: usize) -> Result<Self> {
        let b = &config.base;
        if num_inference_steps == 0 || num_inference_steps > b.num_train_timesteps {
            return Err(Error::Input(format!(
                "num_inference_steps must be in 1..={}, got {num_inference_steps}",
                b.num_train_timesteps
            )));
        }
        let ac = alphas_cumprod(&betas(&b.beta_schedule, b.num_train_timesteps));
        let train_sigmas: Vec<f64> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        // diffusers keeps these timesteps as float32.
        let timesteps: Vec<f64> =
            spaced_timesteps(b.timestep_spacing, b.num_train_timesteps, num_inference_steps, b.steps_offset)
                .into_iter()
                .map(|t| t as f32 as f64)
                .collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train_sigmas)).collect();
        sigmas.push(0.0);
        Ok(Self { config, timesteps, sigmas })
    }

    /// `sigma_max` for linspace/trailing spacing, `sqrt(sigma_max^2 + 1)` for leading.
    pub fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
        match self.config.base.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    fn sigma(&self, i: usize) -> Result<f64> {
        if i + 1 >= self.sigmas.len() {
            return Err(Error::Input(format!("step index {i} past {} steps", self.timesteps.len())));
        }
        Ok(self.sigmas[i])
    }

    /// `sample / sqrt(sigma_i^2 + 1)`.
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigma(i)?;
        Ok((sample / (s * s + 1.0).sqrt())?)
    }

    /// One Euler step from sigma_i to sigma_{i+1}.
    pub fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let sigma = self.sigma(i)?;
        let x0 = match self.config.base.prediction_type {
            PredictionType::Epsilon => (sample - (model_output * sigma)?)?,
            PredictionType::VPrediction => {
                let c = -sigma / (sigma * sigma + 1.0).sqrt();
                ((model_output * c)? + (sample / (sigma * sigma + 1.0))?)?
            }
            PredictionType::Sample => model_output.clone(),
        };
        let derivative = ((sample - x0)? / sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        Ok((sample + (derivative * dt)?)?)
    }
}
