//! DDPM forward noising for training (Ho et al. 2020, eq. 4): `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e`,
//! with one timestep per sample, and the v-prediction target (Salimans & Ho 2022):
//! `v = sqrt(a_t) e - sqrt(1 - a_t) x0`. Matches diffusers' `DDPMScheduler.add_noise` and
//! `get_velocity`.

use std::path::Path;

use candle_core::{DType, Tensor};

use super::{alphas_cumprod, betas, BaseSchedule, PredictionType};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// The training-time view of a schedule: `alphas_cumprod` and what the model predicts.
#[derive(Debug, Clone)]
pub struct Ddpm {
    pub alphas_cumprod: Vec<f64>,
    pub prediction_type: PredictionType,
}

impl Ddpm {
    /// From a scheduler config with `DDPMScheduler`'s defaults for missing keys.
    pub fn from_config(c: &SchedulerConfig, path: &Path) -> Result<Self> {
        let base = BaseSchedule::resolve(c, path, "leading")?;
        Ok(Self {
            alphas_cumprod: alphas_cumprod(&betas(&base.beta_schedule, base.num_train_timesteps)),
            prediction_type: base.prediction_type,
        })
    }

    /// The training target for the model at these timesteps.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::Sample => Ok(x0.clone()),
            PredictionType::VPrediction => velocity(&self.alphas_cumprod, x0, noise, timesteps),
        }
    }
}

/// Per-sample coefficient column of shape `(B, 1, 1, ...)` matching `like`'s rank.
fn per_sample(values: Vec<f64>, like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![values.len()];
    shape.resize(like.rank(), 1);
    let t = Tensor::new(values, like.device())?.to_dtype(DType::F32)?;
    Ok(t.reshape(shape)?.to_dtype(like.dtype())?)
}

fn coefficients(ac: &[f64], timesteps: &[usize], x0: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    if x0.dim(0)? != timesteps.len() {
        return Err(Error::Input(format!("{} timesteps for a batch of {}", timesteps.len(), x0.dim(0)?)));
    }
    let mut a = Vec::with_capacity(timesteps.len());
    let mut s = Vec::with_capacity(timesteps.len());
    for &t in timesteps {
        let ac_t = *ac.get(t).ok_or_else(|| Error::Input(format!("timestep {t} out of range 0..{}", ac.len())))?;
        a.push(ac_t.sqrt());
        s.push((1.0 - ac_t).sqrt());
    }
    Ok((a, s))
}

/// `sqrt(a_t) x0 + sqrt(1 - a_t) noise`, one timestep per sample.
pub fn add_noise(alphas_cumprod: &[f64], x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
    let (a, s) = coefficients(alphas_cumprod, timesteps, x0)?;
    let a = per_sample(a, x0)?;
    let s = per_sample(s, x0)?;
    Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
}

/// `sqrt(a_t) noise - sqrt(1 - a_t) x0`, one timestep per sample.
pub fn velocity(alphas_cumprod: &[f64], x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
    let (a, s) = coefficients(alphas_cumprod, timesteps, x0)?;
    let a = per_sample(a, x0)?;
    let s = per_sample(s, x0)?;
    Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
}
