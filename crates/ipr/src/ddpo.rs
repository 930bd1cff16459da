//! The `ddpo` method's stages in the loop (Black et al. 2023; library:
//! [`ipr_diffusion::train::ddpo`]): the same prompts and number of images per round as the other
//! methods, sampled with DDIM at `ddpo.eta` and their chains kept
//! (`round-<r>/samples/trajectories.safetensors`), detected by the same judge, rewarded 1 or 0
//! ([`ipr_core::method::rewards`]), and a policy-gradient update of the adapter of model `r` into
//! model `r + 1`, on that round's chains alone (on-policy).

use crate::run_loop::Run;
use crate::sampling::{image_seed, to_rgb_images};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use ipr_core::dataset::{read_detections, read_imagefolder, SampleRow, METADATA};
use ipr_core::sr2d::PromptRow;
use ipr_diffusion::pipeline::Pipeline;
use ipr_diffusion::train::ddpo::{self, DdpoConfig, Sample};
use ipr_diffusion::train::optim::{AdamW, AdamWConfig};
use std::collections::HashMap;
use std::path::Path;

/// The chains of a round's samples, beside the images (so both are written, or neither).
pub const TRAJECTORIES: &str = "trajectories.safetensors";

impl Run<'_> {
    /// Samples `rows` with model `i` into the imagefolder `out`, like the other methods' sample
    /// stage (same prompts, images per prompt, noise seeds, batches), with DDIM at `ddpo.eta`,
    /// and keeps every image's chain and step log-probabilities in `out/trajectories.safetensors`.
    pub(crate) fn ddpo_sample_stage(&self, i: u32, rows: &[PromptRow], seed: u64, out: &Path) -> Result<()> {
        if self.exists(out)? {
            return Ok(());
        }
        if self.world.size() > 1 {
            bail!("the ddpo method runs in one process (its chains are not split over ranks)");
        }
        let c = &self.config;
        let pipe = self.pipeline(i)?;
        let items: Vec<(&PromptRow, u32)> =
            rows.iter().flat_map(|r| (0..c.sampling.images_per_prompt).map(move |k| (r, k))).collect();
        let (_, ch, h, w) = match c.image_size() {
            Some((height, width)) => pipe.latent_shape_for(1, height, width)?,
            None => pipe.latent_shape(1),
        };
        let pb = crate::progress::bar(items.len() as u64, "sample", self.quiet());
        let (mut samples, mut latents, mut log_probs) = (Vec::new(), Vec::new(), Vec::new());
        for batch in items.chunks(c.sampling.batch_size.max(1) as usize) {
            let prompts: Vec<&str> = batch.iter().map(|(r, _)| r.text.as_str()).collect();
            let seeds: Vec<u64> = batch.iter().map(|(r, k)| image_seed(seed, r.unique_id, *k)).collect();
            let t = ddpo::sample_trajectories(
                &pipe,
                &prompts,
                &seeds,
                (ch, h, w),
                c.sampling.steps as usize,
                c.sampling.guidance_scale,
                c.ddpo.eta,
            )
            .map_err(anyhow::Error::from)
            .map_err(|e| {
                crate::oom::explain(
                    e,
                    &format!("sampling {}", out.display()),
                    batch.len(),
                    "sampling.batch_size in run.toml",
                )
            })?;
            let images = to_rgb_images(&pipe.to_images(t.latents.last().expect("a chain"))?)?;
            for (((r, k), seed), image) in batch.iter().zip(&seeds).zip(images) {
                let row = SampleRow {
                    file_name: crate::sampling::file_name(r.unique_id, *k),
                    prompt_id: r.unique_id,
                    prompt: r.text.clone(),
                    image_index: *k,
                    seed: *seed,
                };
                samples.push((row, image));
            }
            // (steps + 1, B, C, H, W) -> (B, steps + 1, C, H, W); deterministic steps as NaN.
            latents.push(Tensor::stack(&t.latents, 0)?.transpose(0, 1)?.contiguous()?);
            let n = batch.len();
            let lp: Vec<Tensor> = t
                .log_probs
                .iter()
                .map(|l| l.clone().map(Ok).unwrap_or_else(|| Tensor::full(f32::NAN, n, &Device::Cpu)))
                .collect::<candle_core::Result<_>>()?;
            log_probs.push(Tensor::stack(&lp, 1)?);
            pb.set_position(samples.len() as u64);
        }
        pb.finish_and_clear();
        let chains = HashMap::from([
            ("latents".to_string(), Tensor::cat(&latents, 0)?),
            ("log_probs".to_string(), Tensor::cat(&log_probs, 0)?),
        ]);
        ipr_core::fs::build_dir(out, |tmp| -> Result<()> {
            for (row, image) in &samples {
                let path = tmp.join(&row.file_name);
                ipr_diffusion::sample::save_png(image, &path).map_err(|e| ipr_core::Error::io(&path, e))?;
            }
            let rows: Vec<&SampleRow> = samples.iter().map(|(r, _)| r).collect();
            ipr_core::fs::write_jsonl(&tmp.join(METADATA), &rows)?;
            let path = tmp.join(TRAJECTORIES);
            candle_core::safetensors::save(&chains, &path).with_context(|| format!("writing {}", path.display()))?;
            Ok(())
        })
    }

    /// Trains the adapter of model `r + 1` from model `r`'s by DDPO on round `r`'s chains and
    /// their rewards (skipped when it exists); written atomically, with `ddpo_stats.json`.
    pub(crate) fn ddpo_train_stage(&self, r: u32) -> Result<()> {
        let out = self.layout.lora(r + 1);
        if self.exists(&out)? {
            return Ok(());
        }
        let c = &self.config;
        let samples_dir = self.layout.samples(r);
        let rows: Vec<SampleRow> = read_imagefolder(&samples_dir)?;
        let found = read_detections(&self.layout.detections(r))?;
        if found.iter().map(|d| &d.file_name).ne(rows.iter().map(|s| &s.file_name)) {
            bail!(
                "{}: its rows are not the samples of {} in order",
                self.layout.detections(r).display(),
                samples_dir.display()
            );
        }
        let rewards =
            ipr_core::method::rewards(&found, &self.prompts.vocab, c.ddpo.reward).map_err(anyhow::Error::msg)?;
        let prompts: Vec<&str> = rows.iter().map(|s| s.prompt.as_str()).collect();
        let advantages = ddpo::per_prompt_advantages(&prompts, &rewards);
        let path = samples_dir.join(TRAJECTORIES);
        let chains = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        let (latents, log_probs) = match (chains.get("latents"), chains.get("log_probs")) {
            (Some(l), Some(p)) => (l, p.to_dtype(DType::F64)?.to_vec2::<f64>()?),
            _ => bail!("{}: expected tensors latents and log_probs", path.display()),
        };
        let n = rows.len();
        if latents.dim(0)? != n || log_probs.len() != n {
            bail!("{}: {} chains for {n} samples", path.display(), latents.dim(0)?);
        }
        let steps = latents.dim(1)? - 1;
        let samples: Vec<Sample> = (0..n)
            .map(|i| {
                Ok(Sample {
                    latents: (0..=steps).map(|k| latents.get(i)?.get(k)).collect::<candle_core::Result<_>>()?,
                    log_probs: log_probs[i].iter().map(|&l| (!l.is_nan()).then_some(l)).collect(),
                    prompt: rows[i].prompt.clone(),
                    advantage: advantages[i],
                })
            })
            .collect::<Result<_>>()?;
        let mut pipe = Pipeline::load_with_vae_dtype(&self.model, c.dtype(), c.vae_dtype(), &self.device)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let (lora, _) = crate::training::lora_configs(c);
        let mut set = if r > 0 {
            let prev = self.layout.lora(r);
            ipr_diffusion::train::load_lora(&mut pipe, &prev).with_context(|| format!("loading {}", prev.display()))?
        } else {
            ipr_diffusion::train::attach_lora(&mut pipe, &lora, None, image_seed(c.seed, 0xDD90, r))?
        };
        set.configs = vec![("unet".to_string(), lora)];
        let params = set.named_vars();
        let cfg = DdpoConfig {
            eta: c.ddpo.eta,
            clip_range: c.ddpo.clip_range,
            adv_clip_max: c.ddpo.adv_clip_max,
            batch_size: c.ddpo.batch_size as usize,
            epochs: c.ddpo.epochs as usize,
            learning_rate: c.ddpo.learning_rate,
            max_grad_norm: Some(c.train.max_grad_norm),
            shards: (c.train.shards as usize).max(1),
            seed: image_seed(c.seed, 0xDD90_0001, r),
        };
        let mut optimizer =
            AdamW::new(params.clone(), AdamWConfig { weight_decay: c.train.weight_decay, ..AdamWConfig::default() })?;
        let sampler = ddpo::ddim(&pipe, steps)?;
        let mut embeds = HashMap::new();
        let per_epoch = n.div_ceil(cfg.batch_size);
        let pb = crate::progress::bar((per_epoch * cfg.epochs) as u64, "ddpo", self.quiet());
        let mut log = Vec::new();
        for epoch in 0..cfg.epochs {
            let order = ddpo::epoch_order(n, cfg.seed, epoch);
            for idx in order.chunks(cfg.batch_size) {
                let batch: Vec<Sample> = idx.iter().map(|&i| samples[i].clone()).collect();
                let s = ddpo::ddpo_step(
                    &pipe,
                    &sampler,
                    &batch,
                    &params,
                    &mut optimizer,
                    &cfg,
                    c.sampling.guidance_scale,
                    &mut embeds,
                )
                .map_err(anyhow::Error::from)
                .map_err(|e| {
                    crate::oom::explain(
                        e,
                        &format!("round {r}: DDPO training"),
                        batch.len(),
                        "ddpo.batch_size in run.toml",
                    )
                })?;
                log.push(serde_json::json!({"loss": s.loss, "mean_abs_ratio_change": s.mean_abs_ratio_change, "clip_fraction": s.clip_fraction, "grad_norm": s.grad_norm}));
                pb.inc(1);
                pb.set_message(format!("clip {:.2}", s.clip_fraction));
            }
        }
        pb.finish_and_clear();
        let mean_reward = rewards.iter().sum::<f64>() / n.max(1) as f64;
        self.log(format!("round {r}: DDPO on {n} chains, mean reward {mean_reward:.3} ({:?} reward)", c.ddpo.reward));
        ipr_core::fs::build_dir(&out, |tmp| -> Result<()> {
            ipr_diffusion::lora_io::save(tmp, &set)?;
            let stats =
                serde_json::json!({"chains": n, "mean_reward": mean_reward, "reward": c.ddpo.reward, "steps": log});
            Ok(ipr_core::fs::write_json(&tmp.join("ddpo_stats.json"), &stats)?)
        })
    }
}
