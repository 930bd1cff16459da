//! DDPO on the tiny pixel-space pipeline: the recorded log-probabilities of DDIM steps equal the
//! Gaussian density computed directly from the model and the schedule, and a reward that the
//! policy can reach (brighter images) visibly climbs over a few rounds of sampling and training.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use ipr_diffusion::lora::LoraConfig;
use ipr_diffusion::pipeline::Pipeline;
use ipr_diffusion::train::attach_lora;
use ipr_diffusion::train::ddpo::{ddim, ddpo_step, per_prompt_advantages, sample_trajectories, DdpoConfig};
use ipr_diffusion::train::optim::{AdamW, AdamWConfig};

fn pipe() -> Pipeline {
    Pipeline::load(&fixtures().join("tiny-pixel"), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn recorded_log_probs_equal_the_density_of_the_step_taken() {
    let pipe = pipe();
    let prompts = ["a dog", "a cat to the left of a dog"];
    let (steps, guidance, eta) = (4, 3.0, 0.8);
    let t = sample_trajectories(&pipe, &prompts, &[11, 12], (3, 16, 16), steps, guidance, eta).unwrap();
    assert_eq!((t.latents.len(), t.log_probs.len()), (steps + 1, steps));
    let sampler = ddim(&pipe, steps).unwrap();
    let a = &sampler.alphas_cumprod;
    let n_train = sampler.config.base.num_train_timesteps;
    let cond = pipe.encode_prompts(&prompts).unwrap();
    let uncond = pipe.empty_negative(2).unwrap();
    let context = Tensor::cat(&[&uncond.embeds, &cond.embeds], 0).unwrap();
    for k in 0..steps {
        let tk = sampler.timesteps[k];
        // The model output with guidance, as the sampler saw it.
        let x = &t.latents[k];
        let ts = Tensor::new(&[tk as f32; 4], &Device::Cpu).unwrap();
        let out = pipe.unet.forward(&Tensor::cat(&[x, x], 0).unwrap(), &ts, &context, None).unwrap();
        let (u, c) = (out.narrow(0, 0, 2).unwrap(), out.narrow(0, 2, 2).unwrap());
        let v = (&u + ((c - &u).unwrap() * guidance).unwrap()).unwrap();
        // diffusers' DDIM with eta, written out in f64 (v-prediction, no clipping here).
        let prev = tk as i64 - (n_train / steps) as i64;
        let (at, ap) = (a[tk], if prev >= 0 { a[prev as usize] } else { sampler.final_alpha_cumprod });
        let var = (1.0 - ap) / (1.0 - at) * (1.0 - at / ap);
        let std = eta * var.sqrt();
        let xs: Vec<f64> = x.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        let vs: Vec<f64> = v.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        let next: Vec<f64> = t.latents[k + 1].flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        let per = xs.len() / 2;
        let recorded: Vec<f32> = t.log_probs[k].as_ref().expect("every step is stochastic here").to_vec1().unwrap();
        for (i, rec) in recorded.iter().enumerate() {
            let mut sum = 0.0;
            for j in i * per..(i + 1) * per {
                let x0 = at.sqrt() * xs[j] - (1.0 - at).sqrt() * vs[j];
                let eps = at.sqrt() * vs[j] + (1.0 - at).sqrt() * xs[j];
                let mean = ap.sqrt() * x0 + (1.0 - ap - std * std).sqrt() * eps;
                let z = (next[j] - mean) / std;
                sum += -0.5 * z * z - std.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln();
            }
            let direct = sum / per as f64;
            assert!(
                (f64::from(*rec) - direct).abs() < 1e-4 * direct.abs().max(1.0),
                "step {k} image {i}: {rec} vs {direct}"
            );
        }
    }
    // eta = 0 is the deterministic sampler: no step has a probability to learn from.
    let t0 = sample_trajectories(&pipe, &prompts, &[11, 12], (3, 16, 16), steps, guidance, 0.0).unwrap();
    assert!(t0.log_probs.iter().all(Option::is_none));
}

/// Mean brightness of each final image (pixels in [-1, 1]).
fn brightness(final_x: &Tensor) -> Vec<f64> {
    final_x.flatten_from(1).unwrap().mean(1).unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

#[test]
fn the_policy_climbs_a_reachable_reward() {
    let mut pipe = pipe();
    // Adapters on the resnets' time projections too: they move whole channels, so brightness
    // is within a few steps' reach.
    let mut lora = LoraConfig::unet(4);
    lora.targets.extend(["time_emb_proj".to_string(), "ff.net.0.proj".into(), "ff.net.2".into()]);
    let set = attach_lora(&mut pipe, &lora, None, 5).unwrap();
    let params = set.named_vars();
    // One optimiser step per round on all 16 trajectories; the same starting noise every round
    // (common random numbers), so the climb is the policy's, not the noise's. Two sampling steps:
    // with more, the last step's tiny variance makes the gradient noisy enough to need far more
    // samples than a test can afford (the chain's log-probabilities are checked above at 4).
    let cfg = DdpoConfig { clip_range: 0.2, learning_rate: 1e-2, batch_size: 16, shards: 2, ..Default::default() };
    let mut opt = AdamW::new(params.clone(), AdamWConfig { weight_decay: 0.0, ..Default::default() }).unwrap();
    let steps = 2;
    let sampler = ddim(&pipe, steps).unwrap();
    let prompts: Vec<&str> = ["a dog", "a cat", "a car", "a bird"].iter().flat_map(|p| [*p; 4]).collect();
    let seeds: Vec<u64> = (0..prompts.len() as u64).collect();
    let mut embeds = HashMap::new();
    let mut means = Vec::new();
    for _ in 0..8 {
        let t = sample_trajectories(&pipe, &prompts, &seeds, (3, 16, 16), steps, 3.0, cfg.eta).unwrap();
        let rewards = brightness(t.latents.last().unwrap());
        means.push(rewards.iter().sum::<f64>() / rewards.len() as f64);
        let adv = per_prompt_advantages(&prompts, &rewards);
        let samples = t.samples(&prompts, &adv).unwrap();
        for batch in samples.chunks(cfg.batch_size) {
            ddpo_step(&pipe, &sampler, batch, &params, &mut opt, &cfg, 3.0, &mut embeds).unwrap();
        }
    }
    eprintln!("mean brightness per round: {means:?}");
    let (first, last) = (means[0], (means[6] + means[7]) / 2.0);
    assert!(last > first + 0.05, "the reward did not climb: {means:?}");
}
