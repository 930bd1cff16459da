//! `ipr toy pretrain`: the toy base model, trained from scratch (seeded) on rendered scenes
//! whose captions name the objects right but state the relation only part of the time and
//! sometimes wrongly ([`ipr_toy::CaptionNoise`]), imitating web captions.
//!
//! Every weight of the UNet and of the text encoder is trained (full training, EMA of the
//! weights with diffusers' decay warm-up); the result is a diffusers-format folder with the
//! command, seed and time written next to it (`PRETRAIN.json`).

use crate::toy_model::init_toy_model;
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
}

impl Default for PretrainSettings {
    fn default() -> Self {
        Self {
            seed: 0,
            steps: 4000,
            batch_size: 64,
            learning_rate: 5e-4,
            warmup_steps: 100,
            ema_decay: Some(0.999),
            num_scenes: 20_000,
            noise: CaptionNoise::default(),
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
            let flipped = match mirror_caption(&pair.text, &vocab) {
                Some(c) => Some((flip_horizontal(&x0)?, c)),
                None => None,
            };
            Ok(Example { x0, caption: pair.text, flipped, weight: 1.0 })
        })
        .collect()
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
    init_toy_model(&init, s.seed)?;
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
        min_snr_gamma: None,
        seed: s.seed,
        flip: true,
    };
    let trainable = Trainable::Full { unet, text_encoder, ema_decay: s.ema_decay };
    let mut trainer = Trainer::new(pipe, trainable, training_examples(s)?, config)?;
    let mut loss = f64::NAN;
    for step in 0..s.steps {
        loss = trainer.train_step()?.loss;
        progress(step + 1, loss);
    }
    let record = PretrainRecord {
        command: command.to_string(),
        settings: s.clone(),
        seconds: start.elapsed().as_secs_f64(),
        final_loss: loss,
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    ipr_core::fs::build_dir(out, |tmp| -> Result<()> {
        checkpoint::save(&trainer, tmp, Some(&init))?;
        // The optimiser state is for resuming training, not part of the shipped model.
        let _ = std::fs::remove_file(tmp.join(checkpoint::TRAINING_STATE));
        std::fs::write(tmp.join("PRETRAIN.json"), serde_json::to_string_pretty(&record)? + "\n")?;
        Ok(())
    })?;
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
}
