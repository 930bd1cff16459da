//! `ipr toy pretrain`: the toy base model, trained from scratch (seeded) on rendered scenes
//! whose captions name the objects right but state the relation only part of the time and
//! sometimes wrongly ([`ipr_toy::CaptionNoise`]), imitating web captions.
//!
//! Every weight of the UNet and of the text encoder is trained (full training, EMA of the
//! weights with diffusers' decay warm-up); the result is a diffusers-format folder with the
//! command, seed and time written next to it (`PRETRAIN.json`).

use crate::toy_model::{init_toy_model, ToyModelSpec};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use ipr_diffusion::pipeline::Pipeline;
use ipr_diffusion::train::augment::{flip_horizontal, mirror_caption};
use ipr_diffusion::train::data::Example;
use ipr_diffusion::train::optim::AdamWConfig;
use ipr_diffusion::train::schedule::LrSchedule;
use ipr_diffusion::train::{checkpoint, make_full_trainable, TrainConfig, Trainable, Trainer};
use ipr_toy::{CaptionNoise, CaptionedScenes};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct PretrainSettings {
    pub seed: u64,
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// EMA of the weights (`None`: save the raw weights).
    pub ema_decay: Option<f64>,
    /// Rendered (scene, caption) pairs in the training set.
    pub num_scenes: usize,
    pub noise: CaptionNoise,
    /// Fraction of scenes whose caption is replaced by "" (so the model learns the unconditional
    /// prediction that classifier-free guidance subtracts).
    pub p_uncond: f64,
    /// Min-SNR loss weighting (Hang et al. 2023), `None` for plain MSE.
    pub min_snr_gamma: Option<f64>,
    /// The model's size and parametrisation.
    pub model: ToyModelSpec,
    /// Also save the model every this many steps, to `<out>.snapshots/step-<N>` (for choosing
    /// the step count by evaluation).
    pub snapshot_every: Option<usize>,
    /// CPU shards per batch ([`ipr_diffusion::train::TrainConfig::shards`]).
    pub shards: usize,
}

impl Default for PretrainSettings {
    fn default() -> Self {
        Self {
            seed: 0,
            steps: 3000,
            batch_size: 32,
            learning_rate: 1e-3,
            warmup_steps: 100,
            ema_decay: Some(0.999),
            num_scenes: 20_000,
            noise: CaptionNoise::default(),
            p_uncond: 0.1,
            min_snr_gamma: Some(5.0),
            model: ToyModelSpec::default(),
            snapshot_every: None,
            shards: ipr_diffusion::train::DEFAULT_SHARDS,
        }
    }
}

/// What `PRETRAIN.json` records.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainRecord {
    pub command: String,
    pub settings: PretrainSettings,
    pub seconds: f64,
    pub final_loss: f64,
    pub threads: usize,
    /// For a snapshot: the run's total steps (`settings.steps` is the snapshot's step, so the
    /// same command with `--steps` set to it and no snapshots makes the same weights).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_of_steps: Option<usize>,
}

impl PretrainRecord {
    fn json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }
}

/// Pixels in [-1, 1], `(3, H, W)`.
pub fn image_to_x0(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&v| f32::from(v) / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?.permute((2, 0, 1))?.contiguous()?)
}

/// The rendered training set: scene `i` of the caption model, with its mirrored copy (left and
/// right swapped in the caption).
pub fn training_examples(s: &PretrainSettings) -> Result<Vec<Example>> {
    let gen = CaptionedScenes::new(s.noise, s.seed).map_err(anyhow::Error::msg)?;
    let vocab = ipr_toy::vocabulary();
    (0..s.num_scenes as u64)
        .map(|i| {
            let pair = gen.sample(i);
            let x0 = image_to_x0(&pair.image)?;
            let caption = if unconditional(s.seed, i, s.p_uncond) { String::new() } else { pair.text };
            let flipped = match mirror_caption(&caption, &vocab) {
                Some(c) => Some((flip_horizontal(&x0)?, c)),
                None => None,
            };
            Ok(Example { x0, caption, flipped, weight: 1.0, size_cond: None })
        })
        .collect()
}

/// Whether scene `index` is trained unconditionally: a seeded coin per scene (SplitMix64 of the
/// seed and the index), so the choice is fixed for the run whatever the batch order.
fn unconditional(seed: u64, index: u64, p: f64) -> bool {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x6A09_E667_F3BC_C909);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < p
}

/// The trained weights (EMA when kept) as a model folder with its `PRETRAIN.json`, built aside.
fn save_model(trainer: &Trainer, init: &Path, record: &PretrainRecord, out: &Path) -> Result<()> {
    ipr_core::fs::build_dir(out, |tmp| -> Result<()> {
        checkpoint::save(trainer, tmp, Some(init))?;
        // The optimiser state is for resuming training, not part of the model.
        let _ = std::fs::remove_file(tmp.join(checkpoint::TRAINING_STATE));
        std::fs::write(tmp.join("PRETRAIN.json"), record.json()?)?;
        Ok(())
    })
}

/// Train the toy base model into `out` (built aside, renamed into place).
pub fn pretrain(
    out: &Path,
    s: &PretrainSettings,
    command: &str,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<PretrainRecord> {
    anyhow::ensure!(!out.exists(), "{} already exists", out.display());
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let init = parent.join(format!(".pretrain-init.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&init);
    init_toy_model(&init, &s.model, s.seed)?;
    ipr_diffusion::train::cpu_runtime();
    let start = Instant::now();
    let mut pipe = Pipeline::load(&init, DType::F32, &Device::Cpu)?;
    let (unet, text_encoder) = make_full_trainable(&mut pipe, Some(&init), true, s.seed)?;
    let config = TrainConfig {
        steps: s.steps,
        batch_size: s.batch_size,
        grad_accum: 1,
        learning_rate: s.learning_rate,
        schedule: LrSchedule::ConstantWithWarmup { warmup: s.warmup_steps },
        adam: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        min_snr_gamma: s.min_snr_gamma,
        timestep_range: None,
        seed: s.seed,
        flip: true,
        shards: s.shards,
    };
    let trainable = Trainable::Full { unet, text_encoder, ema_decay: s.ema_decay };
    let mut trainer = Trainer::new(pipe, trainable, training_examples(s)?, config)?;
    let mut loss = f64::NAN;
    let snapshots = out.with_file_name(format!(
        "{}.snapshots",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    for step in 0..s.steps {
        loss = trainer.train_step()?.loss;
        progress(step + 1, loss);
        if s.snapshot_every.is_some_and(|k| k > 0 && (step + 1) % k == 0 && step + 1 < s.steps) {
            std::fs::create_dir_all(&snapshots)?;
            let dir = snapshots.join(format!("step-{}", step + 1));
            let _ = std::fs::remove_dir_all(&dir);
            let record = PretrainRecord {
                command: command.to_string(),
                settings: PretrainSettings { steps: step + 1, snapshot_every: None, ..s.clone() },
                seconds: start.elapsed().as_secs_f64(),
                final_loss: loss,
                threads: rayon::current_num_threads(),
                snapshot_of_steps: Some(s.steps),
            };
            save_model(&trainer, &init, &record, &dir)?;
        }
    }
    let record = PretrainRecord {
        command: command.to_string(),
        settings: s.clone(),
        seconds: start.elapsed().as_secs_f64(),
        final_loss: loss,
        threads: rayon::current_num_threads(),
        snapshot_of_steps: None,
    };
    save_model(&trainer, &init, &record, out)?;
    let _ = std::fs::remove_dir_all(&init);
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_round_trip_the_range() {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgb([0, 255, 51]));
        let x = image_to_x0(&img).unwrap();
        assert_eq!(x.dims(), [3, 1, 2]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((v[0], v[2]), (-1.0, 1.0));
        assert!((v[4] + 0.6).abs() < 1e-6);
    }

    #[test]
    fn about_the_asked_fraction_of_scenes_is_unconditional() {
        let n = (0..20_000).filter(|&i| unconditional(3, i, 0.1)).count();
        assert!((1_800..2_200).contains(&n), "{n} of 20000");
        assert_eq!(
            (0..100).map(|i| unconditional(3, i, 0.1)).collect::<Vec<_>>(),
            (0..100).map(|i| unconditional(3, i, 0.1)).collect::<Vec<_>>()
        );
        assert!(!(0..1000).any(|i| unconditional(3, i, 0.0)));
        assert!((0..1000).all(|i| unconditional(3, i, 1.0)));
    }
}
