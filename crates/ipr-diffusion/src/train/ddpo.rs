//! DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"): the
//! denoising chain as a policy, fine-tuned by policy gradient on a reward of the final image.
//!
//! Sampling with DDIM at `eta > 0` makes every step a Gaussian,
//! `x_{t-1} ~ N(mean(x_t, model(x_t)), (eta sigma_t)^2 I)` ([`crate::scheduler::Ddim::step_distribution`]),
//! whose log-probability of the step actually taken is recorded ([`sample_trajectories`]). Training
//! ([`ddpo_step`]) recomputes each step's log-probability under the current adapter and minimises
//! the importance-clipped surrogate of PPO, `max(-A r, -A clip(r, 1 - e, 1 + e))` with
//! `r = exp(log p_new - log p_old)`, averaged over the batch and summed over the chain's
//! stochastic steps (one optimiser step per batch of trajectories), as ddpo-pytorch does. The
//! advantage `A` of an image is its reward normalised among the images of its prompt in the same
//! round ([`per_prompt_advantages`]), clipped to `[-adv_clip_max, adv_clip_max]`.
//!
//! Deterministic steps (std 0, e.g. the last step when the final alpha is 1) carry no policy and
//! are left out of the sum. Log-probabilities are means over pixels, as in ddpo-pytorch, so their
//! scale does not depend on the image size.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::pipeline::{Pipeline, PromptEmbeds};
use crate::scheduler::{Ddim, DdimConfig};
use crate::unet::AddedCond;

use super::optim::{self, AdamW};

/// DDPO's settings; `Default` is ddpo-pytorch's `base.py` where it applies.
#[derive(Debug, Clone, PartialEq)]
pub struct DdpoConfig {
    /// DDIM noise level of sampling (1.0: DDPM-like variance).
    pub eta: f64,
    /// PPO's ratio clip `e` (ddpo-pytorch: 1e-4).
    pub clip_range: f64,
    /// Advantages are clipped to `[-adv_clip_max, adv_clip_max]` (ddpo-pytorch: 5).
    pub adv_clip_max: f64,
    /// Trajectories per optimiser step.
    pub batch_size: usize,
    /// Passes over a round's trajectories (ddpo-pytorch: 1).
    pub epochs: usize,
    pub learning_rate: f64,
    pub max_grad_norm: Option<f64>,
    /// CPU: pieces each batch is cut into, computed in parallel (see `TrainConfig::shards`).
    pub shards: usize,
    /// Seed of the order trajectories are visited in.
    pub seed: u64,
}

impl Default for DdpoConfig {
    fn default() -> Self {
        Self {
            eta: 1.0,
            clip_range: 1e-4,
            adv_clip_max: 5.0,
            batch_size: 8,
            epochs: 1,
            learning_rate: 3e-4,
            max_grad_norm: Some(1.0),
            shards: super::DEFAULT_SHARDS,
            seed: 0,
        }
    }
}

/// `log N(x; mean, std^2 I)` of each sample of a batch, averaged over its elements: `(B,)`.
pub fn gaussian_log_prob(x: &Tensor, mean: &Tensor, std: f64) -> Result<Tensor> {
    if std <= 0.0 {
        return Err(Error::Input(format!("a Gaussian log-probability needs std > 0, got {std}")));
    }
    let z2 = ((x - mean)? / std)?.sqr()?;
    let per = ((z2 * -0.5)? - (std.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln()))?;
    Ok(per.flatten_from(1)?.mean(1)?)
}

/// The sampled chains of a batch of prompts.
#[derive(Debug, Clone)]
pub struct Trajectories {
    /// `x_T, ..., x_0`: one `(B, C, H, W)` f32 tensor per step and the final latents.
    pub latents: Vec<Tensor>,
    /// `log p(x_{k+1} | x_k)` of the step taken, `(B,)` per step; `None` for deterministic steps.
    pub log_probs: Vec<Option<Tensor>>,
    /// The model timestep of each step.
    pub timesteps: Vec<usize>,
}

/// Conditioning for a batch under classifier-free guidance: `[uncond; cond]` context and the
/// SDXL added conditions (`None` for other families).
struct Guided {
    context: Tensor,
    added: Option<AddedCond>,
    guidance: f64,
    batch: usize,
}

impl Guided {
    fn new(
        pipe: &Pipeline,
        cond: &PromptEmbeds,
        uncond: &PromptEmbeds,
        guidance: f64,
        hw: (usize, usize),
    ) -> Result<Self> {
        let b = cond.embeds.dim(0)?;
        let cfg = guidance > 1.0;
        let context = if cfg { Tensor::cat(&[&uncond.embeds, &cond.embeds], 0)? } else { cond.embeds.clone() };
        let added = match (&cond.pooled, &uncond.pooled) {
            (Some(pc), Some(pu)) => {
                let f = pipe.vae_scale_factor() as f32;
                let (h, w) = (hw.0 as f32 * f, hw.1 as f32 * f);
                let n = if cfg { 2 * b } else { b };
                let ids: Vec<f32> = (0..n).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
                Some(AddedCond {
                    text_embeds: if cfg { Tensor::cat(&[pu, pc], 0)? } else { pc.clone() },
                    time_ids: Tensor::from_vec(ids, (n, 6), &pipe.device)?.to_dtype(pipe.dtype)?,
                })
            }
            _ => None,
        };
        Ok(Self { context, added, guidance, batch: b })
    }

    /// The guided model output at timestep `t` for `x` `(B, ...)` (f32), with the graph when the
    /// adapters are trained.
    fn predict(&self, pipe: &Pipeline, x: &Tensor, t: usize) -> Result<Tensor> {
        let cfg = self.guidance > 1.0;
        let input = if cfg { Tensor::cat(&[x, x], 0)? } else { x.clone() };
        let n = input.dim(0)?;
        let ts = Tensor::new(vec![t as f32; n], &pipe.device)?;
        let out = pipe
            .unet
            .forward(&input.to_dtype(pipe.dtype)?, &ts, &self.context, self.added.as_ref())?
            .to_dtype(DType::F32)?;
        if !cfg {
            return Ok(out);
        }
        let b = self.batch;
        let (u, c) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
        Ok((&u + ((c - &u)? * self.guidance)?)?)
    }
}

/// The DDIM sampler of `pipe` with `steps` steps.
pub fn ddim(pipe: &Pipeline, steps: usize) -> Result<Ddim> {
    Ddim::new(DdimConfig::from_config(&pipe.scheduler_config, &pipe.scheduler_config_path)?, steps)
}

/// The seed of the noise added at step `k` of the chain that starts from `seed`.
fn step_seed(seed: u64, k: usize) -> u64 {
    let mut z = seed ^ (k as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z ^ (z >> 29)
}

/// Samples `prompts` (image `i` from the noise of `seeds[i]`, its steps' noise derived from it)
/// with DDIM at `eta`, classifier-free guidance `guidance` and negative prompt "" (the pipeline's
/// default), recording the chain and each step's log-probability.
pub fn sample_trajectories(
    pipe: &Pipeline,
    prompts: &[&str],
    seeds: &[u64],
    shape: (usize, usize, usize),
    steps: usize,
    guidance: f64,
    eta: f64,
) -> Result<Trajectories> {
    if prompts.len() != seeds.len() {
        return Err(Error::Input(format!("{} prompts and {} seeds", prompts.len(), seeds.len())));
    }
    let sampler = ddim(pipe, steps)?;
    let (c, h, w) = shape;
    let cond = pipe.encode_prompts(prompts)?;
    let uncond = pipe.empty_negative(prompts.len())?;
    let guided = Guided::new(pipe, &cond, &uncond, guidance, (h, w))?;
    let mut x = crate::noise::randn_per_sample(seeds, &[c, h, w], DType::F32, &pipe.device)?;
    let mut latents = vec![x.to_device(&candle_core::Device::Cpu)?];
    let mut log_probs = Vec::new();
    for (k, &t) in sampler.timesteps.iter().enumerate() {
        let pred = guided.predict(pipe, &x, t)?.detach();
        let (mean, std) = sampler.step_distribution(&pred, k, &x, eta)?;
        if std > 0.0 {
            let step_seeds: Vec<u64> = seeds.iter().map(|&s| step_seed(s, k)).collect();
            let z = crate::noise::randn_per_sample(&step_seeds, &[c, h, w], DType::F32, &pipe.device)?;
            x = (&mean + (z * std)?)?.detach();
            log_probs.push(Some(gaussian_log_prob(&x, &mean, std)?.to_device(&candle_core::Device::Cpu)?));
        } else {
            x = mean.detach();
            log_probs.push(None);
        }
        latents.push(x.to_device(&candle_core::Device::Cpu)?);
    }
    Ok(Trajectories { latents, log_probs, timesteps: sampler.timesteps.clone() })
}

/// One trajectory to learn from: its chain, the recorded log-probabilities, its prompt and its
/// advantage.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `x_T, ..., x_0`, each `(C, H, W)` f32 on the CPU.
    pub latents: Vec<Tensor>,
    /// The recorded `log p` of each step (`None`: deterministic).
    pub log_probs: Vec<Option<f64>>,
    pub prompt: String,
    pub advantage: f64,
}

impl Trajectories {
    /// The batch's trajectories one by one, with `advantages[i]` for image `i`.
    pub fn samples(&self, prompts: &[&str], advantages: &[f64]) -> Result<Vec<Sample>> {
        let b = self.latents[0].dim(0)?;
        if prompts.len() != b || advantages.len() != b {
            return Err(Error::Input(format!(
                "{} prompts and {} advantages for {b} trajectories",
                prompts.len(),
                advantages.len()
            )));
        }
        let lp: Vec<Option<Vec<f32>>> = self
            .log_probs
            .iter()
            .map(|l| l.as_ref().map(|t| t.to_vec1::<f32>()).transpose())
            .collect::<candle_core::Result<_>>()?;
        (0..b)
            .map(|i| {
                Ok(Sample {
                    latents: self.latents.iter().map(|x| x.get(i)).collect::<candle_core::Result<_>>()?,
                    log_probs: lp.iter().map(|l| l.as_ref().map(|v| f64::from(v[i]))).collect(),
                    prompt: prompts[i].to_string(),
                    advantage: advantages[i],
                })
            })
            .collect()
    }
}

/// Rewards normalised within each prompt: `(r - mean) / (std + 1e-6)` over the rewards of the
/// same prompt (population std), so every prompt contributes as much as the others and a prompt
/// whose images all scored alike contributes nothing.
pub fn per_prompt_advantages(prompts: &[&str], rewards: &[f64]) -> Vec<f64> {
    let mut groups: HashMap<&str, Vec<f64>> = HashMap::new();
    for (p, r) in prompts.iter().zip(rewards) {
        groups.entry(p).or_default().push(*r);
    }
    let stats: HashMap<&str, (f64, f64)> = groups
        .into_iter()
        .map(|(p, v)| {
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
            (p, (mean, var.sqrt()))
        })
        .collect();
    prompts.iter().zip(rewards).map(|(p, r)| (r - stats[p].0) / (stats[p].1 + 1e-6)).collect()
}

/// What one optimiser step saw.
#[derive(Debug, Clone, Copy)]
pub struct DdpoStats {
    /// The surrogate loss, summed over the stochastic steps.
    pub loss: f64,
    /// Mean of `|r - 1|` over samples and steps: how far the policy moved from the sampler.
    pub mean_abs_ratio_change: f64,
    /// Fraction of (sample, step) ratios outside the clip range.
    pub clip_fraction: f64,
    pub grad_norm: f64,
}

/// One optimiser step on `batch`: for every stochastic step of the chain, the clipped surrogate
/// averaged over the batch, its gradients accumulated over the steps; then clipping and AdamW.
/// The pipeline's adapters (`params`) must be attached and unmerged.
#[allow(clippy::too_many_arguments)]
pub fn ddpo_step(
    pipe: &Pipeline,
    sampler: &Ddim,
    batch: &[Sample],
    params: &[(String, Var)],
    optimizer: &mut AdamW,
    cfg: &DdpoConfig,
    guidance: f64,
    embeds: &mut HashMap<String, PromptEmbeds>,
) -> Result<DdpoStats> {
    let b = batch.len();
    if b == 0 {
        return Err(Error::Input("an empty DDPO batch".into()));
    }
    for s in batch {
        if !embeds.contains_key(&s.prompt) {
            let e = pipe.encode_prompts(&[s.prompt.as_str()])?;
            embeds.insert(
                s.prompt.clone(),
                PromptEmbeds { embeds: e.embeds.detach(), pooled: e.pooled.map(|p| p.detach()) },
            );
        }
    }
    if !embeds.contains_key("") {
        let e = pipe.empty_negative(1)?;
        embeds.insert(String::new(), PromptEmbeds { embeds: e.embeds.detach(), pooled: e.pooled.map(|p| p.detach()) });
    }
    let embeds: &HashMap<String, PromptEmbeds> = embeds;
    let stochastic: Vec<usize> = (0..sampler.timesteps.len()).filter(|&k| batch[0].log_probs[k].is_some()).collect();
    if stochastic.is_empty() {
        return Err(Error::Input("no stochastic step in the chain (eta = 0?): DDPO has no policy to train".into()));
    }
    let shards = if pipe.device.is_cpu() { cfg.shards.max(1) } else { 1 };
    let pieces: Vec<&[Sample]> = batch.chunks(b.div_ceil(shards.min(b))).collect();
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let (mut loss_sum, mut ratio_change, mut clipped, mut count) = (0.0, 0.0, 0.0, 0.0);
    for &k in &stochastic {
        let results: Vec<Result<(f64, Vec<f64>, candle_core::backprop::GradStore)>> = pieces
            .par_iter()
            .map(|piece| {
                let n = piece.len();
                let stack = |ix: usize| -> Result<Tensor> {
                    let xs: Vec<&Tensor> = piece.iter().map(|s| &s.latents[ix]).collect();
                    Ok(Tensor::stack(&xs, 0)?.to_device(&pipe.device)?)
                };
                let (x, x_prev) = (stack(k)?, stack(k + 1)?);
                let cat = |f: &dyn Fn(&PromptEmbeds) -> Option<Tensor>| -> Result<Option<Tensor>> {
                    let parts: Option<Vec<Tensor>> = piece.iter().map(|s| f(&embeds[&s.prompt])).collect();
                    parts.map(|p| Tensor::cat(&p, 0)).transpose().map_err(Error::from)
                };
                let cond = PromptEmbeds {
                    embeds: cat(&|e| Some(e.embeds.clone()))?.expect("every prompt has embeddings"),
                    pooled: cat(&|e| e.pooled.clone())?,
                };
                let u = &embeds[""];
                let uncond = PromptEmbeds {
                    embeds: u.embeds.repeat((n, 1, 1))?,
                    pooled: u.pooled.as_ref().map(|p| p.repeat((n, 1))).transpose()?,
                };
                let (_, _, h, w) = x.dims4()?;
                let guided = Guided::new(pipe, &cond, &uncond, guidance, (h, w))?;
                let pred = guided.predict(pipe, &x, sampler.timesteps[k])?;
                let (mean, std) = sampler.step_distribution(&pred, k, &x, cfg.eta)?;
                let log_p = gaussian_log_prob(&x_prev, &mean, std)?;
                let old: Vec<f32> = piece.iter().map(|s| s.log_probs[k].unwrap_or(f64::NAN) as f32).collect();
                let old = Tensor::new(old, &pipe.device)?;
                let ratio = (log_p - old)?.exp()?;
                let adv: Vec<f32> =
                    piece.iter().map(|s| s.advantage.clamp(-cfg.adv_clip_max, cfg.adv_clip_max) as f32).collect();
                let adv = Tensor::new(adv, &pipe.device)?;
                let unclipped = (adv.neg()? * &ratio)?;
                let clipped_ratio = ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range)?;
                let clipped = (adv.neg()? * clipped_ratio)?;
                // Sum over the piece / batch size: the pieces' losses add up to the batch mean;
                // divided by the stochastic steps: gradients accumulate to their mean (one step).
                let loss = (unclipped.maximum(&clipped)?.sum_all()? / (b * stochastic.len()) as f64)?;
                let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let ratios: Vec<f64> = ratio.detach().to_dtype(DType::F64)?.to_vec1()?;
                Ok((value, ratios, loss.backward()?))
            })
            .collect();
        for r in results {
            let (value, ratios, store) = r?;
            loss_sum += value;
            for q in ratios {
                ratio_change += (q - 1.0).abs();
                clipped += f64::from((q - 1.0).abs() > cfg.clip_range);
                count += 1.0;
            }
            optim::accumulate(&mut grads, optim::named_grads(params, &store))?;
        }
    }
    let grad_norm = match cfg.max_grad_norm {
        Some(max) => optim::clip_grad_norm(&mut grads, max)?,
        None => f64::NAN,
    };
    optimizer.step(&grads, cfg.learning_rate)?;
    Ok(DdpoStats {
        loss: loss_sum,
        mean_abs_ratio_change: ratio_change / count,
        clip_fraction: clipped / count,
        grad_norm,
    })
}

/// The order trajectories are visited in during epoch `epoch` (a seeded Fisher-Yates shuffle).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = crate::noise::SplitMix64::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn log_probs_equal_the_gaussian_density_computed_directly() {
        let x = Tensor::new(&[[0.3f32, -1.2, 2.0], [0.0, 0.5, -0.5]], &Device::Cpu).unwrap();
        let m = Tensor::new(&[[0.1f32, -1.0, 1.5], [0.2, 0.2, 0.2]], &Device::Cpu).unwrap();
        let std = 0.37;
        let got: Vec<f32> = gaussian_log_prob(&x, &m, std).unwrap().to_vec1().unwrap();
        let xs = [[0.3f64, -1.2, 2.0], [0.0, 0.5, -0.5]];
        let ms = [[0.1f64, -1.0, 1.5], [0.2, 0.2, 0.2]];
        for i in 0..2 {
            // The density of each element, its log, averaged: written out from the formula.
            let mut sum = 0.0;
            for j in 0..3 {
                let d = (-(xs[i][j] - ms[i][j]).powi(2) / (2.0 * std * std)).exp()
                    / (std * (2.0 * std::f64::consts::PI).sqrt());
                sum += d.ln();
            }
            assert!((f64::from(got[i]) - sum / 3.0).abs() < 1e-5, "{} vs {}", got[i], sum / 3.0);
        }
        assert!(gaussian_log_prob(&x, &m, 0.0).is_err());
    }

    #[test]
    fn advantages_are_normalised_within_each_prompt() {
        let prompts = ["a", "a", "a", "a", "b", "b"];
        let rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let a = per_prompt_advantages(&prompts, &rewards);
        let (mean, std) = (0.25f64, (0.75f64 * 0.25).sqrt());
        assert!((a[0] - (1.0 - mean) / (std + 1e-6)).abs() < 1e-9);
        assert!((a[1] - (0.0 - mean) / (std + 1e-6)).abs() < 1e-9);
        assert!(a[..4].iter().sum::<f64>().abs() < 1e-9, "a prompt's advantages sum to 0");
        assert_eq!((a[4], a[5]), (0.0, 0.0), "all alike: no signal");
        let o = epoch_order(10, 3, 0);
        let mut s = o.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_eq!(o, epoch_order(10, 3, 0));
        assert_ne!(o, epoch_order(10, 3, 1));
    }
}
