//! The reward-rescaled diffusion loss of IPR (docs/ipr-reference.md, section 1):
//! `loss = sum_i w_i * mse_i / batch`, with `mse_i` the mean squared error between the UNet's
//! prediction and the target (epsilon, v or x0, per the scheduler's `prediction_type`) for
//! sample `i` noised to its own timestep `t_i` (DDPM, Ho et al. 2020). Optionally each `mse_i` is
//! also weighted by min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
//! Weighting Strategy"), as diffusers' `train_text_to_image*.py` do: `min(snr, gamma) / snr` for
//! epsilon, `/ (snr + 1)` for v-prediction, `min(snr, gamma)` for x0.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::scheduler::{add_noise, Ddpm, PredictionType};
use crate::unet::{AddedCond, UNet2DConditionModel};

/// One batch of the loss.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Clean latents (or pixels) `(B, C, H, W)`.
    pub x0: Tensor,
    /// `(B, C, H, W)` Gaussian noise.
    pub noise: Tensor,
    /// One training timestep per sample.
    pub timesteps: Vec<usize>,
    /// Per-sample loss weights (IPR's rewards).
    pub weights: Vec<f64>,
    /// `(B, S, D)` text embeddings.
    pub context: Tensor,
    /// SDXL's added conditioning.
    pub added: Option<AddedCond>,
}

impl Batch {
    /// The batch cut into at most `n` consecutive shards of near-equal size (never empty).
    pub fn split(&self, n: usize) -> Result<Vec<Batch>> {
        let b = self.x0.dim(0)?;
        let n = n.clamp(1, b.max(1));
        if n == 1 {
            return Ok(vec![self.clone()]);
        }
        let mut out = Vec::with_capacity(n);
        let mut start = 0;
        for k in 0..n {
            let len = b / n + usize::from(k < b % n);
            let added = match &self.added {
                Some(a) => Some(AddedCond {
                    text_embeds: a.text_embeds.narrow(0, start, len)?,
                    time_ids: a.time_ids.narrow(0, start, len)?,
                }),
                None => None,
            };
            out.push(Batch {
                x0: self.x0.narrow(0, start, len)?,
                noise: self.noise.narrow(0, start, len)?,
                timesteps: self.timesteps[start..start + len].to_vec(),
                weights: self.weights[start..start + len].to_vec(),
                context: self.context.narrow(0, start, len)?,
                added,
            });
            start += len;
        }
        Ok(out)
    }
}

/// Per-sample min-SNR-gamma factors.
pub fn min_snr_weights(ddpm: &Ddpm, timesteps: &[usize], gamma: f64) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| {
            let a = ddpm.alphas_cumprod[t];
            let snr = a / (1.0 - a);
            match ddpm.prediction_type {
                PredictionType::Epsilon => snr.min(gamma) / snr,
                PredictionType::VPrediction => snr.min(gamma) / (snr + 1.0),
                PredictionType::Sample => snr.min(gamma),
            }
        })
        .collect()
}

/// The weighted loss (a scalar tensor) and each sample's unweighted MSE.
pub fn weighted_loss(
    unet: &UNet2DConditionModel,
    ddpm: &Ddpm,
    batch: &Batch,
    min_snr_gamma: Option<f64>,
) -> Result<(Tensor, Vec<f64>)> {
    let b = batch.x0.dim(0)?;
    if batch.weights.len() != b || batch.timesteps.len() != b {
        return Err(Error::Input(format!(
            "{} weights and {} timesteps for a batch of {b}",
            batch.weights.len(),
            batch.timesteps.len()
        )));
    }
    let dtype = batch.x0.dtype();
    let noisy = add_noise(&ddpm.alphas_cumprod, &batch.x0, &batch.noise, &batch.timesteps)?;
    let t: Vec<f32> = batch.timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::new(t, batch.x0.device())?;
    let pred = unet.forward(&noisy, &t, &batch.context, batch.added.as_ref())?;
    let target = ddpm.target(&batch.x0, &batch.noise, &batch.timesteps)?;
    // Half precision is upcast for the loss; f32 and f64 (the gradient check) stay as they are.
    let loss_dtype = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
    let mse = (pred.to_dtype(loss_dtype)? - target.to_dtype(loss_dtype)?)?.sqr()?.flatten_from(1)?.mean(1)?;
    let mut w = batch.weights.clone();
    if let Some(gamma) = min_snr_gamma {
        for (wi, s) in w.iter_mut().zip(min_snr_weights(ddpm, &batch.timesteps, gamma)) {
            *wi *= s;
        }
    }
    let w = Tensor::new(w, batch.x0.device())?.to_dtype(loss_dtype)?;
    let loss = (mse.mul(&w)?.sum_all()? / b as f64)?;
    let per_sample: Vec<f64> = mse.to_dtype(DType::F64)?.to_vec1()?;
    Ok((loss, per_sample))
}
