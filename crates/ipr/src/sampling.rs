//! The sample stage: images for a list of prompts, written as an HF imagefolder
//! (`<prompt_id>_<k>.png` + `metadata.jsonl` of [`SampleRow`]s).
//!
//! Image `k` of prompt `id` starts from the noise of [`image_seed`]`(seed, id, k)`, so every
//! image can be regenerated alone and none depends on how prompts were batched. Prompts are
//! batched for speed (`batch_size` images per UNet call). The folder is built under a
//! temporary name and renamed into place: it is either complete or absent.

use crate::shard::Shard;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use ipr_core::dataset::{SampleRow, METADATA};
use ipr_diffusion::pipeline::{Pipeline, SampleParams};
use rayon::prelude::*;
use std::path::Path;

/// One prompt to sample.
#[derive(Debug, Clone)]
pub struct PromptJob {
    pub prompt_id: u64,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct SampleSettings {
    pub images_per_prompt: u32,
    pub params: SampleParams,
    pub seed: u64,
    /// Images per UNet call (classifier-free guidance doubles the UNet batch).
    pub batch_size: usize,
    /// `(height, width)` in pixels; `None`: the model's native size.
    pub size: Option<(usize, usize)>,
    /// The negative prompt of every image; `None`: the pipeline's default.
    pub negative_prompt: Option<String>,
}

impl SampleSettings {
    /// Checks the settings against the model before any image is made (a size that is not a
    /// multiple of the model's factor is an error naming the side).
    pub fn check(&self, pipe: &Pipeline) -> Result<()> {
        if let Some((h, w)) = self.size {
            pipe.latent_shape_for(1, h, w)?;
        }
        Ok(())
    }
}

/// The noise seed of image `k` of prompt `prompt_id` (SplitMix64 finaliser over the three).
pub fn image_seed(seed: u64, prompt_id: u64, k: u32) -> u64 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    mix(mix(mix(seed) ^ prompt_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ u64::from(k))
}

/// `(B, 3, H, W)` images in [0, 1] -> 8-bit RGB images (round to nearest, as diffusers'
/// `numpy_to_pil` does after `* 255`).
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let images = images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (b, c, h, w) = images.dims4()?;
    anyhow::ensure!(c == 3, "the model makes {c}-channel images, expected 3 (RGB)");
    let pixels: Vec<u8> = (images.permute((0, 2, 3, 1))? * 255.0)?
        .round()?
        .clamp(0.0, 255.0)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1()?;
    let n = h * w * 3;
    Ok((0..b)
        .map(|i| RgbImage::from_raw(w as u32, h as u32, pixels[i * n..(i + 1) * n].to_vec()).expect("buffer size"))
        .collect())
}

/// Sample every (prompt, k) in memory, in order; `progress(done)` after each group of batches.
///
/// On the CPU, as many batches as rayon has threads run at once (candle's elementwise kernels are
/// single-threaded, so this is what uses the other cores). Each batch is computed the same way
/// whatever runs beside it, so the images do not depend on the thread count.
pub fn sample_images(
    pipe: &Pipeline,
    jobs: &[PromptJob],
    s: &SampleSettings,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<(SampleRow, RgbImage)>> {
    sample_images_shard(pipe, jobs, s, Shard::ALL, progress)
}

/// [`sample_images`] for the batches `shard` owns: the (prompt, k) items are cut into batches of
/// `batch_size` over the whole list (batch `j` = items `[jB, (j+1)B)`) and batch `j` goes to shard
/// `j % n`, so an image's bytes do not depend on the shard count.
pub fn sample_images_shard(
    pipe: &Pipeline,
    jobs: &[PromptJob],
    s: &SampleSettings,
    shard: Shard,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<(SampleRow, RgbImage)>> {
    let items = items(jobs, s.images_per_prompt);
    s.check(pipe)?;
    let batches: Vec<&[(&PromptJob, u32)]> =
        items.chunks(s.batch_size.max(1)).enumerate().filter(|(j, _)| shard.owns(*j)).map(|(_, b)| b).collect();
    let parallel = if pipe.device.is_cpu() { rayon::current_num_threads().max(1) } else { 1 };
    let mut out = Vec::with_capacity(items.len());
    for group in batches.chunks(parallel) {
        let results: Vec<Result<Vec<(SampleRow, RgbImage)>>> =
            group.par_iter().map(|batch| sample_batch(pipe, batch, s)).collect();
        for r in results {
            out.extend(r?);
        }
        progress(out.len());
    }
    Ok(out)
}

/// Every (prompt, k < `images_per_prompt`) in sampling order.
fn items(jobs: &[PromptJob], images_per_prompt: u32) -> Vec<(&PromptJob, u32)> {
    jobs.iter().flat_map(|j| (0..images_per_prompt).map(move |k| (j, k))).collect()
}

/// The file name of image `k` of `prompt_id` (VISOR's `<unique_id>_<k>.png`).
pub fn file_name(prompt_id: u64, k: u32) -> String {
    format!("{prompt_id}_{k}.png")
}

/// The file names of every (prompt, k) in sampling order: the order of a sample folder's manifest.
pub fn file_names(jobs: &[PromptJob], images_per_prompt: u32) -> Vec<String> {
    items(jobs, images_per_prompt).into_iter().map(|(j, k)| file_name(j.prompt_id, k)).collect()
}

/// One UNet batch of (prompt, k) items.
fn sample_batch(
    pipe: &Pipeline,
    batch: &[(&PromptJob, u32)],
    s: &SampleSettings,
) -> Result<Vec<(SampleRow, RgbImage)>> {
    let seeds: Vec<u64> = batch.iter().map(|(j, k)| image_seed(s.seed, j.prompt_id, *k)).collect();
    let (_, c, h, w) = match s.size {
        Some((height, width)) => pipe.latent_shape_for(batch.len(), height, width)?,
        None => pipe.latent_shape(batch.len()),
    };
    let latents = ipr_diffusion::noise::randn_per_sample(&seeds, &[c, h, w], DType::F32, &pipe.device)?;
    let prompts: Vec<&str> = batch.iter().map(|(j, _)| j.text.as_str()).collect();
    let negative: Option<Vec<&str>> = s.negative_prompt.as_deref().map(|n| vec![n]);
    let final_latents = pipe.generate(&prompts, negative.as_deref(), &latents, &s.params)?;
    let images = to_rgb_images(&pipe.to_images(&final_latents)?)?;
    Ok(batch
        .iter()
        .zip(seeds)
        .zip(images)
        .map(|(((job, k), seed), image)| {
            let row = SampleRow {
                file_name: file_name(job.prompt_id, *k),
                prompt_id: job.prompt_id,
                prompt: job.text.clone(),
                image_index: *k,
                seed,
            };
            (row, image)
        })
        .collect())
}

/// Merges the shards' sample folders (`<out>.shards/<i>-of-<n>/`, complete and disjoint) into the
/// imagefolder `out` that one process sampling every job would write (the same images, the
/// manifest in `expected` order), built aside and renamed into place; the parts are then removed.
pub fn merge_sample_parts(out: &Path, expected: &[String]) -> Result<()> {
    let dir = crate::shard::parts_dir(out);
    let parts = crate::shard::complete_parts(&dir, "")?;
    let parts = parts
        .into_iter()
        .map(|p| Ok((p.clone(), ipr_core::dataset::read_imagefolder::<SampleRow>(&p)?)))
        .collect::<Result<Vec<_>>>()?;
    let from: std::collections::HashMap<String, std::path::PathBuf> = parts
        .iter()
        .flat_map(|(p, rows)| rows.iter().map(move |r| (r.file_name.clone(), p.join(&r.file_name))))
        .collect();
    let rows = crate::shard::merge_rows(parts, |r: &SampleRow| r.file_name.clone(), expected)?;
    ipr_core::fs::build_dir(out, |tmp| -> Result<()> {
        for row in &rows {
            ipr_core::stages::link_or_copy(&from[&row.file_name], &tmp.join(&row.file_name))?;
        }
        Ok(ipr_core::fs::write_jsonl(&tmp.join(METADATA), &rows)?)
    })?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {} (merged into {})", dir.display(), out.display()))
}

/// Write sampled images as an imagefolder at `out` (built aside, renamed into place).
pub fn write_sample_folder(out: &Path, samples: &[(SampleRow, RgbImage)]) -> Result<()> {
    ipr_core::fs::build_dir(out, |tmp| {
        for (row, image) in samples {
            let path = tmp.join(&row.file_name);
            ipr_diffusion::sample::save_png(image, &path).map_err(|e| ipr_core::Error::io(&path, e))?;
        }
        let rows: Vec<&SampleRow> = samples.iter().map(|(r, _)| r).collect();
        Ok(ipr_core::fs::write_jsonl(&tmp.join(METADATA), &rows)?)
    })
}

/// Samples every (prompt, k < `images_per_prompt`) into `out` in VISOR's layout,
/// `<unique_id>_<k>.png` and nothing else, skipping images already there: a stopped call
/// resumes and a repeated one rewrites nothing. Each PNG is written under a temporary name and
/// renamed, so a file that exists is complete. Returns `(made, skipped)` for this shard.
///
/// Batches are cut from the whole list, always the same way (batch `j` = images
/// `[jB, (j+1)B)` in prompt order), and `shard` does the batches it owns (`j % n == i`); a batch
/// with any image missing is computed whole. So which images share a UNet call, and therefore
/// every image's bytes, are the same whatever the shard count and however often a call was
/// stopped and resumed.
pub fn sample_visor_layout(
    pipe: &Pipeline,
    jobs: &[PromptJob],
    s: &SampleSettings,
    shard: crate::shard::Shard,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(usize, usize)> {
    s.check(pipe)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Shards share the folder; two processes doing the same shard are refused.
    let lock = out.join(format!(".lock-{}", shard.part_name()));
    let _lock = ipr_core::lock::Lock::acquire(&lock, &format!("shard {} of {}", shard.describe(), out.display()))?;
    let path = |job: &PromptJob, k: u32| out.join(file_name(job.prompt_id, k));
    let items = items(jobs, s.images_per_prompt);
    let mine: Vec<&[(&PromptJob, u32)]> =
        items.chunks(s.batch_size.max(1)).enumerate().filter(|(j, _)| shard.owns(*j)).map(|(_, b)| b).collect();
    // Only this shard's files: other shards writing into the same folder keep their temporaries.
    let own: std::collections::HashSet<String> =
        mine.iter().flat_map(|b| b.iter().map(|(j, k)| file_name(j.prompt_id, *k))).collect();
    remove_stale_temporaries(out, &own)?;
    let total: usize = mine.iter().map(|b| b.len()).sum();
    let (todo, done): (Vec<_>, Vec<_>) = mine.into_iter().partition(|b| b.iter().any(|(j, k)| !path(j, *k).exists()));
    let mut skipped: usize = done.iter().map(|b| b.len()).sum();
    let mut made = 0;
    let parallel = if pipe.device.is_cpu() { rayon::current_num_threads().max(1) } else { 1 };
    for group in todo.chunks(parallel) {
        let results: Vec<Result<Vec<(SampleRow, RgbImage)>>> =
            group.par_iter().map(|batch| sample_batch(pipe, batch, s)).collect();
        for r in results {
            for (row, image) in r? {
                let target = out.join(&row.file_name);
                if target.exists() {
                    skipped += 1;
                    continue;
                }
                ipr_core::fs::write_atomic_with(&target, |tmp| ipr_diffusion::sample::save_png(&image, tmp))
                    .map_err(|e| ipr_core::Error::io(&target, e))?;
                made += 1;
            }
        }
        progress(made + skipped, total);
    }
    Ok((made, skipped))
}

/// Removes the `.<name>.tmp-<pid>` files a killed call left behind for the images named in `own`.
fn remove_stale_temporaries(dir: &Path, own: &std::collections::HashSet<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let image = name.strip_prefix('.').and_then(|n| n.split_once(".tmp-")).map(|(image, _)| image);
        if image.is_some_and(|image| own.contains(image)) {
            std::fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_seeds_are_distinct_and_stable() {
        let mut seen = std::collections::HashSet::new();
        for id in 0..50 {
            for k in 0..4 {
                assert!(seen.insert(image_seed(7, id, k)));
            }
        }
        assert_eq!(image_seed(7, 3, 1), image_seed(7, 3, 1));
        assert_ne!(image_seed(7, 3, 1), image_seed(8, 3, 1));
    }

    #[test]
    fn converts_tensors_to_rgb() {
        let t = Tensor::from_vec(
            vec![0f32, 1.0, 0.5, 0.2, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            (1, 3, 2, 2),
            &Device::Cpu,
        )
        .unwrap();
        let img = &to_rgb_images(&t).unwrap()[0];
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 1).0, [51, 0, 255]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 0]);
        assert_eq!(img.get_pixel(0, 1).0, [128, 255, 0]);
    }
}
