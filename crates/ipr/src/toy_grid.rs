//! `ipr toy grid`: a PNG of samples to judge a toy model by eye. One row per prompt (spatial
//! prompts over seen and held-out pairs, one relation after another), `columns` images per row
//! from fixed seeds, each pixel drawn as a `scale` x `scale` block, rows and columns separated by
//! white gutters. The row prompts are returned (and written next to the PNG by the CLI).

use crate::metrics_file::EvalSplit;
use crate::prompt_sets::PromptSets;
use crate::sampling::{sample_images, PromptJob, SampleSettings};
use anyhow::Result;
use candle_core::{DType, Device};
use image::RgbImage;
use ipr_diffusion::pipeline::{Pipeline, SampleParams};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct GridSettings {
    /// Rows taken from the seen prompts and from the held-out prompts.
    pub rows_per_split: usize,
    pub columns: u32,
    pub params: SampleParams,
    pub seed: u64,
    pub scale: u32,
}

impl Default for GridSettings {
    fn default() -> Self {
        Self {
            rows_per_split: 4,
            columns: 8,
            params: SampleParams { num_inference_steps: 10, guidance_scale: 4.0, ..Default::default() },
            seed: 1_000_003,
            scale: 3,
        }
    }
}

/// `n` prompts spread over `rows` (every `len / n`-th), so that the four relations and several
/// pairs appear.
fn spread<T: Clone>(rows: &[T], n: usize) -> Vec<T> {
    if rows.is_empty() || n == 0 {
        return Vec::new();
    }
    let n = n.min(rows.len());
    (0..n).map(|i| rows[i * rows.len() / n + (i % 4).min(rows.len() / n - 1)].clone()).collect()
}

/// Sample the grid of the toy model at `model` and write it to `out` (PNG); returns the row
/// prompts, top to bottom, each with its split.
pub fn write_grid(model: &Path, out: &Path, s: &GridSettings) -> Result<Vec<(String, &'static str)>> {
    let prompts = PromptSets::toy();
    let mut rows: Vec<(String, &'static str)> = Vec::new();
    for split in [EvalSplit::Seen, EvalSplit::Heldout] {
        rows.extend(spread(prompts.eval_rows(split), s.rows_per_split).into_iter().map(|r| (r.text, split.name())));
    }
    let pipe = Pipeline::load(model, DType::F32, &Device::Cpu)?;
    let jobs: Vec<PromptJob> =
        rows.iter().enumerate().map(|(i, (text, _))| PromptJob { prompt_id: i as u64, text: text.clone() }).collect();
    let settings = SampleSettings {
        images_per_prompt: s.columns,
        params: s.params.clone(),
        seed: s.seed,
        batch_size: 32,
        size: None,
        negative_prompt: None,
    };
    let samples = sample_images(&pipe, &jobs, &settings, &mut |_| {})?;
    // Samples come prompt by prompt, `columns` images each: one grid row per prompt.
    let images: Vec<RgbImage> = samples.into_iter().map(|(_, image)| image).collect();
    let opts = ipr_toy::grid::GridOptions { gap: 2 * s.scale, scale: s.scale, ..Default::default() };
    ipr_toy::grid::write_grid_with(&images, s.columns as usize, out, &opts)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_evenly_spaced_rows_with_varying_offsets() {
        let rows: Vec<usize> = (0..16).collect();
        assert_eq!(spread(&rows, 4), vec![0, 5, 10, 15]);
        assert_eq!(spread(&rows, 0), Vec::<usize>::new());
        assert_eq!(spread(&rows[..3], 8), vec![0, 1, 2]);
    }

    #[test]
    fn the_grid_has_one_cell_per_prompt_and_image() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        crate::toy_model::init_toy_model(&model, &crate::toy_model::ToyModelSpec::default(), 1).unwrap();
        let s = GridSettings {
            rows_per_split: 1,
            columns: 2,
            params: SampleParams { num_inference_steps: 1, guidance_scale: 2.0, ..Default::default() },
            scale: 2,
            ..Default::default()
        };
        let out = dir.path().join("grid.png");
        let rows = write_grid(&model, &out, &s).unwrap();
        assert_eq!(rows.iter().map(|r| r.1).collect::<Vec<_>>(), ["seen", "heldout"]);
        let img = image::open(&out).unwrap().to_rgb8();
        // 2 columns and 2 rows of 64-pixel cells with 4-pixel gutters.
        assert_eq!(img.dimensions(), (2 * 68 + 4, 2 * 68 + 4));
        assert_eq!(*img.get_pixel(1, 1), image::Rgb([255, 255, 255]), "gutter");
        let again = dir.path().join("again.png");
        write_grid(&model, &again, &s).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap(), "same seed, same grid");
    }
}
