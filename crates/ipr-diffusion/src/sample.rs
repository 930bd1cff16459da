//! The library side of `ipr sample`: resolve the model, make or read the initial latents, run the
//! pipeline, write the final latents and the images. The CLI only parses arguments into a
//! [`SampleRequest`].
//!
//! Latents files are safetensors with one tensor named `latents` (diffusers' `latents=` argument
//! and `output_type="latent"` result), so runs can start from, and be compared with, diffusers.
//! Every file is written to a temporary name in the same folder and renamed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::pipeline::{Pipeline, SampleParams};
use crate::scheduler::SamplerKind;

/// Everything `ipr sample` needs.
#[derive(Debug, Clone)]
pub struct SampleRequest {
    /// A diffusers folder or a Hugging Face repo id in the local cache (see [`crate::source`]).
    pub model: String,
    pub prompts: Vec<String>,
    /// None, one for all prompts, or one per prompt.
    pub negative_prompts: Vec<String>,
    pub params: SampleParams,
    /// Seed of the initial noise when `latents` is not given: image `i` starts from
    /// `noise::randn(seed + i, ...)`, so each image can be regenerated alone.
    pub seed: u64,
    /// Initial latents (tensor `latents`, shape `(B, C, H, W)` with B = number of prompts).
    pub latents: Option<PathBuf>,
    /// Where to save the final latents (tensor `latents`, before the VAE).
    pub output_latents: Option<PathBuf>,
    /// Where to save the images (PNG); with several prompts, `-<i>` is added before the extension.
    pub out: Option<PathBuf>,
    /// `cpu` or `cuda` (or `cuda:N`).
    pub device: String,
    /// Weights dtype; `None`: f32 on CPU, bf16 on CUDA.
    pub dtype: Option<DType>,
    /// A LoRA adapter (folder with `pytorch_lora_weights.safetensors`, or the file) to apply,
    /// merged into the weights ([`crate::lora_io`] lists the layouts read).
    pub lora: Option<PathBuf>,
    /// `(height, width)` in pixels when not given by `latents`; `None`: the model's native size.
    pub size: Option<(usize, usize)>,
}

impl Default for SampleRequest {
    fn default() -> Self {
        Self {
            model: String::new(),
            prompts: Vec::new(),
            negative_prompts: Vec::new(),
            params: SampleParams::default(),
            seed: 0,
            latents: None,
            output_latents: None,
            out: None,
            device: "cpu".into(),
            dtype: None,
            lora: None,
            size: None,
        }
    }
}

/// What [`sample`] produced.
#[derive(Debug, Clone)]
pub struct SampleOutput {
    /// Final latents, f32 on the CPU.
    pub latents: Tensor,
    /// Image files written.
    pub images: Vec<PathBuf>,
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn device_from_name(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(Device::new_cuda(n)?),
            None => Err(Error::Input(format!("unknown device {other:?}: expected cpu, cuda or cuda:N"))),
        },
    }
}

/// Parses `ddim`, `euler` or `dpmsolver++`.
pub fn sampler_from_name(name: &str) -> Result<SamplerKind> {
    match name {
        "ddim" => Ok(SamplerKind::Ddim),
        "euler" => Ok(SamplerKind::Euler),
        "dpmsolver++" => Ok(SamplerKind::DpmSolverPlusPlus),
        other => Err(Error::Input(format!("unknown scheduler {other:?}: expected ddim, euler or dpmsolver++"))),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// Reads the tensor `latents` of a safetensors file as f32 on the CPU.
pub fn load_latents(path: &Path) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|source| Error::Weights { path: path.to_path_buf(), source })?;
    let t = tensors.get("latents").ok_or_else(|| Error::Weights {
        path: path.to_path_buf(),
        source: candle_core::Error::Msg("no tensor named \"latents\"".into()),
    })?;
    Ok(t.to_dtype(DType::F32)?)
}

/// Writes `latents` (as f32, tensor `latents`) atomically.
pub fn save_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let t = latents.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    let map = HashMap::from([("latents".to_string(), t)]);
    ipr_core::fs::write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(map.iter().map(|(k, v)| (k.clone(), v)), None, tmp)
            .map_err(crate::lora_io::safetensors_io_error)
    })
    .map_err(|e| io_err(path, e))
}

/// Writes `img` as a PNG at `path`, keeping the kind of an I/O error (a full disk stays one).
pub fn save_png(img: &image::RgbImage, path: &Path) -> std::io::Result<()> {
    img.save_with_format(path, image::ImageFormat::Png).map_err(|e| match e {
        image::ImageError::IoError(io) => io,
        other => std::io::Error::other(other.to_string()),
    })
}

/// Writes images `(B, 3, H, W)` in [0, 1] as PNGs; returns the paths.
pub fn save_pngs(path: &Path, images: &Tensor) -> Result<Vec<PathBuf>> {
    let images = images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::Input(format!("PNG output needs 3 channels, the model made {c}")));
    }
    let mut written = Vec::with_capacity(b);
    for i in 0..b {
        let target = if b == 1 {
            path.to_path_buf()
        } else {
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let ext = path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or("png".into());
            path.with_file_name(format!("{stem}-{i}.{ext}"))
        };
        let pixels: Vec<u8> = (images.get(i)?.permute((1, 2, 0))? * 255.0)?
            .round()?
            .clamp(0.0, 255.0)?
            .to_dtype(DType::U8)?
            .flatten_all()?
            .to_vec1()?;
        let img = image::RgbImage::from_raw(w as u32, h as u32, pixels)
            .ok_or_else(|| Error::Input("image buffer has the wrong size".into()))?;
        ipr_core::fs::write_atomic_with(&target, |tmp| save_png(&img, tmp)).map_err(|e| io_err(&target, e))?;
        written.push(target);
    }
    Ok(written)
}

/// Runs one `ipr sample` request.
pub fn sample(req: &SampleRequest) -> Result<SampleOutput> {
    if req.prompts.is_empty() {
        return Err(Error::Input("no prompt given".into()));
    }
    let device = device_from_name(&req.device)?;
    let dtype = req.dtype.unwrap_or(if device.is_cpu() { DType::F32 } else { DType::BF16 });
    let folder = crate::source::resolve_model(&req.model)?;
    let mut pipe = Pipeline::load(&folder, dtype, &device)?;
    if let Some(lora) = &req.lora {
        crate::train::load_lora(&mut pipe, lora)?;
        for (_, linears) in crate::train::pipeline_linears(&mut pipe) {
            crate::lora::merge(linears)?;
        }
    }
    let b = req.prompts.len();
    let latents = match &req.latents {
        Some(path) => {
            let l = load_latents(path)?;
            if l.dim(0)? != b {
                return Err(Error::Input(format!("{}: {} latents for {b} prompts", path.display(), l.dim(0)?)));
            }
            l.to_device(&device)?
        }
        None => {
            let (_, c, h, w) = match req.size {
                Some((height, width)) => pipe.latent_shape_for(b, height, width)?,
                None => pipe.latent_shape(b),
            };
            let seeds: Vec<u64> = (0..b as u64).map(|i| req.seed.wrapping_add(i)).collect();
            crate::noise::randn_per_sample(&seeds, &[c, h, w], DType::F32, &device)?
        }
    };
    let prompts: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
    let negatives: Vec<&str> = req.negative_prompts.iter().map(String::as_str).collect();
    let negatives = (!negatives.is_empty()).then_some(negatives.as_slice());
    let out = pipe.generate(&prompts, negatives, &latents, &req.params)?;
    if let Some(path) = &req.output_latents {
        save_latents(path, &out)?;
    }
    let images = match &req.out {
        Some(path) => save_pngs(path, &pipe.to_images(&out)?)?,
        None => Vec::new(),
    };
    Ok(SampleOutput { latents: out.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, images })
}
