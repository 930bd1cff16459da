//! Beta schedules: `linear` (Ho et al. 2020), `scaled_linear` (linear in sqrt(beta), latent
//! diffusion / Stable Diffusion), `squaredcos_cap_v2` (Nichol & Dhariwal 2021, cosine), or
//! `trained_betas` given in the config.

use std::path::Path;

use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// A beta schedule over `num_train_timesteps` steps.
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    Linear { beta_start: f64, beta_end: f64 },
    ScaledLinear { beta_start: f64, beta_end: f64 },
    SquaredCosCapV2,
    Trained(Vec<f64>),
}

impl BetaSchedule {
    /// Resolves `beta_schedule`, `beta_start`, `beta_end`, `trained_betas` with diffusers' defaults.
    pub fn from_config(c: &SchedulerConfig, path: &Path) -> Result<Self> {
        if let Some(b) = &c.trained_betas {
            return Ok(Self::Trained(b.clone()));
        }
        let beta_start = c.beta_start.unwrap_or(0.0001);
        let beta_end = c.beta_end.unwrap_or(0.02);
        match c.beta_schedule.as_deref().unwrap_or("linear") {
            "linear" => Ok(Self::Linear { beta_start, beta_end }),
            "scaled_linear" => Ok(Self::ScaledLinear { beta_start, beta_end }),
            "squaredcos_cap_v2" => Ok(Self::SquaredCosCapV2),
            other => Err(Error::config(
                path,
                "beta_schedule",
                format!("expected \"linear\", \"scaled_linear\" or \"squaredcos_cap_v2\", got {other:?}"),
            )),
        }
    }
}

fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
}

/// The betas of a schedule.
pub fn betas(schedule: &BetaSchedule, num_train_timesteps: usize) -> Vec<f64> {
    match schedule {
        BetaSchedule::Linear { beta_start, beta_end } => linspace(*beta_start, *beta_end, num_train_timesteps),
        BetaSchedule::ScaledLinear { beta_start, beta_end } => {
            linspace(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps).into_iter().map(|b| b * b).collect()
        }
        BetaSchedule::SquaredCosCapV2 => {
            let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
            let n = num_train_timesteps as f64;
            (0..num_train_timesteps)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                })
                .collect()
        }
        BetaSchedule::Trained(b) => b.clone(),
    }
}

/// `cumprod(1 - betas)`.
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}
