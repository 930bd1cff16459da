//! Saving and resuming training. A LoRA run's output folder holds what diffusers loads
//! (`pytorch_lora_weights.safetensors`, [`crate::lora_io`]) plus `training_state.safetensors`:
//! AdamW's moments (torch's names `exp_avg`, `exp_avg_sq` per parameter), the EMA shadow weights
//! (`ema.<name>`) and the step count in the metadata. A full fine-tuning run writes a diffusers
//! pipeline folder (the EMA weights when there is an EMA, as diffusers' script saves them) with the
//! same state file. Every file is written to a temporary name and renamed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::{Trainable, Trainer};
use crate::error::{Error, Result};

/// The state file's name.
pub const TRAINING_STATE: &str = "training_state.safetensors";

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// Writes `tensors` with string metadata atomically.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>, meta: HashMap<String, String>) -> Result<()> {
    let mut sorted: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    ipr_core::fs::write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(sorted.iter().map(|(k, v)| (k.clone(), v)), Some(meta), tmp)
            .map_err(crate::lora_io::safetensors_io_error)
    })
    .map_err(|e| io_err(path, e))
}

fn state_tensors(t: &Trainer) -> HashMap<String, Tensor> {
    let mut out = t.optimizer.state_tensors();
    if let Some(ema) = &t.ema {
        for (n, s) in &ema.shadow {
            out.insert(format!("ema.{n}"), s.clone());
        }
    }
    out
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| io_err(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| io_err(src, e))? {
        let entry = entry.map_err(|e| io_err(src, e))?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        if from.is_dir() {
            copy_dir(&from, &to)?;
        } else {
            std::fs::copy(&from, &to).map_err(|e| io_err(&to, e))?;
        }
    }
    Ok(())
}

/// Saves the run into `dir`. For full fine-tuning, `source` is the pipeline folder whose other
/// components (scheduler, tokenizer, VAE, ...) are copied next to the trained weights.
pub fn save(t: &Trainer, dir: &Path, source: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    match &t.trainable {
        Trainable::Lora(set) => crate::lora_io::save(dir, set)?,
        Trainable::Full { text_encoder, .. } => {
            if let Some(src) = source {
                for entry in std::fs::read_dir(src).map_err(|e| io_err(src, e))? {
                    let entry = entry.map_err(|e| io_err(src, e))?;
                    let name = entry.file_name();
                    let to = dir.join(&name);
                    let trained = name == "unet" || (name == "text_encoder" && text_encoder.is_some());
                    if trained || to.exists() {
                        continue;
                    }
                    if entry.path().is_dir() {
                        copy_dir(&entry.path(), &to)?;
                    } else {
                        std::fs::copy(entry.path(), &to).map_err(|e| io_err(&to, e))?;
                    }
                }
            }
            let weights: HashMap<String, Tensor> = match &t.ema {
                Some(ema) => ema.shadow.iter().map(|(n, s)| (n.clone(), s.clone())).collect(),
                None => t.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect(),
            };
            let pick = |prefix: &str| -> HashMap<String, Tensor> {
                weights.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone()))).collect()
            };
            let fmt = HashMap::from([("format".to_string(), "pt".to_string())]);
            let unet_dir = dir.join("unet");
            std::fs::create_dir_all(&unet_dir).map_err(|e| io_err(&unet_dir, e))?;
            crate::config::write_json(
                &unet_dir.join("config.json"),
                &t.pipe.unet.config,
                Some("UNet2DConditionModel"),
            )?;
            write_safetensors(&unet_dir.join("diffusion_pytorch_model.safetensors"), &pick("unet."), fmt.clone())?;
            if text_encoder.is_some() {
                let te_dir = dir.join("text_encoder");
                std::fs::create_dir_all(&te_dir).map_err(|e| io_err(&te_dir, e))?;
                let config = match &t.pipe.text {
                    crate::pipeline::TextEncoders::Single { text_encoder, .. }
                    | crate::pipeline::TextEncoders::Dual { text_encoder, .. } => text_encoder.config.clone(),
                };
                crate::config::write_json(&te_dir.join("config.json"), &config, None)?;
                write_safetensors(&te_dir.join("model.safetensors"), &pick("text_encoder."), fmt)?;
            }
        }
    }
    // One metadata key (see lora_io::save: more would make the bytes depend on HashMap order).
    let meta = HashMap::from([("step".to_string(), t.step.to_string())]);
    write_safetensors(&dir.join(TRAINING_STATE), &state_tensors(t), meta)
}

/// Restores the optimiser (and EMA) state and the step from `dir/training_state.safetensors`.
/// The trained weights themselves must already be in the trainer (load the adapter with
/// [`super::load_lora`], or the saved pipeline folder, before building it).
pub fn resume(t: &mut Trainer, dir: &Path) -> Result<()> {
    let path = dir.join(TRAINING_STATE);
    let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| io_err(&path, std::io::Error::other(e.to_string())))?;
    let step: usize = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Input(format!("{}: no step in the metadata", path.display())))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|source| Error::Weights { path: path.clone(), source })?;
    t.optimizer.load_state(&tensors, step)?;
    if let Some(ema) = &mut t.ema {
        for (n, s) in &mut ema.shadow {
            let k = format!("ema.{n}");
            *s = tensors
                .get(&k)
                .ok_or_else(|| Error::Input(format!("{}: no tensor {k}", path.display())))?
                .to_device(s.device())?;
        }
        ema.optimization_step = step;
    }
    t.step = step;
    Ok(())
}
