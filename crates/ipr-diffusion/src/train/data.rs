//! The training set: an HF imagefolder (`metadata.jsonl` rows with `file_name`, `prompt` and an
//! optional `weight`, read by [`ipr_core::dataset::read_imagefolder`]) turned into model inputs:
//! images resized to the model's resolution, scaled to [-1, 1], and through the VAE when the
//! model has one (`scaling_factor * mean`: the posterior mean, where diffusers' scripts draw a
//! sample from the posterior each step; the difference is the VAE's tiny posterior std).
//!
//! Rows with weight 0 are dropped here. The loss is `sum_i w_i mse_i / batch`: a zero-weight row
//! adds nothing to the sum but would still take a batch slot (changing the divisor and which rows
//! share a batch), so "weight 0" means "not in the data" only if such rows are removed before
//! batching. Training with and without them is then bit-identical by construction.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ipr_core::dataset::{check_weights, read_imagefolder, TrainingRow};
use ipr_core::Vocabulary;

use super::augment::{flip_horizontal, mirror_caption};
use super::SizeCond;
use crate::error::{Error, Result};
use crate::vae::AutoencoderKL;

/// One training example, ready for the UNet.
#[derive(Debug, Clone)]
pub struct Example {
    /// `(C, H, W)` latents (or pixels), f32 on the CPU.
    pub x0: Tensor,
    pub caption: String,
    /// The mirrored example when flipping is allowed for it (the caption parsed).
    pub flipped: Option<(Tensor, String)>,
    pub weight: f64,
    /// SDXL's size conditioning (the image's size as read, crop `(0, 0)`: the image is resized,
    /// not cropped); `None`: the image was made at the training resolution. Other models ignore it.
    pub size_cond: Option<SizeCond>,
}

/// A training image size in pixels; a single number is a square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    pub height: usize,
    pub width: usize,
}

impl From<usize> for ImageSize {
    fn from(size: usize) -> Self {
        Self { height: size, width: size }
    }
}

impl From<(usize, usize)> for ImageSize {
    /// `(height, width)`.
    fn from((height, width): (usize, usize)) -> Self {
        Self { height, width }
    }
}

/// Pixels in [-1, 1], `(3, height, width)`, from an image file (resized with a triangle filter
/// when its size differs).
pub fn load_image(path: &Path, size: impl Into<ImageSize>) -> Result<Tensor> {
    let ImageSize { height, width } = size.into();
    let img = crate::image_file::open_rgb(path)?;
    let img = if img.width() as usize != width || img.height() as usize != height {
        image::imageops::resize(&img, width as u32, height as u32, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let data: Vec<f32> = img.into_raw().into_iter().map(|v| v as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(data, (height, width, 3), &Device::Cpu)?.permute((2, 0, 1))?.contiguous()?)
}

/// Encodes `(3, H, W)` pixels to UNet inputs (through the VAE when there is one).
fn to_x0(pixels: &Tensor, vae: Option<&AutoencoderKL>, dtype: DType, device: &Device) -> Result<Tensor> {
    match vae {
        None => Ok(pixels.clone()),
        Some(v) => {
            let z = v.encode_to_latents(&pixels.unsqueeze(0)?.to_device(device)?.to_dtype(dtype)?)?;
            Ok(z.squeeze(0)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
        }
    }
}

/// What [`load_dataset`] read.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Rows dropped because their weight is 0.
    pub dropped_zero_weight: usize,
}

/// Reads `dir` for a model of image `resolution`; with `flip_vocab`, examples whose caption parses
/// in that vocabulary also get a mirrored copy (image and caption). Each image (and its mirror)
/// goes through the VAE once here, in `dtype` (the VAE's), not at every step.
pub fn load_dataset(
    dir: &Path,
    resolution: impl Into<ImageSize>,
    vae: Option<&AutoencoderKL>,
    flip_vocab: Option<&Vocabulary>,
    dtype: DType,
    device: &Device,
) -> Result<Dataset> {
    let rows: Vec<TrainingRow> = read_imagefolder(dir).map_err(|e| Error::Input(e.to_string()))?;
    check_weights(&dir.join("metadata.jsonl"), &rows).map_err(|e| Error::Input(e.to_string()))?;
    let resolution = resolution.into();
    let mut examples = Vec::new();
    let mut dropped = 0;
    for row in rows {
        if row.weight == 0.0 {
            dropped += 1;
            continue;
        }
        let path = dir.join(&row.file_name);
        let (width, height) = crate::image_file::dimensions(&path)?;
        let pixels = load_image(&path, resolution)?;
        let flipped = match flip_vocab.and_then(|v| mirror_caption(&row.prompt, v)) {
            Some(caption) => Some((to_x0(&flip_horizontal(&pixels)?, vae, dtype, device)?, caption)),
            None => None,
        };
        examples.push(Example {
            x0: to_x0(&pixels, vae, dtype, device)?,
            caption: row.prompt,
            flipped,
            weight: row.weight,
            size_cond: Some(SizeCond { original: (height as usize, width as usize), crop_top_left: (0, 0) }),
        });
    }
    if examples.is_empty() {
        return Err(Error::Input(format!("{}: no training row with a weight above 0", dir.display())));
    }
    Ok(Dataset { examples, dropped_zero_weight: dropped })
}
