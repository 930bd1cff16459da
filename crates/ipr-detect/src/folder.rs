//! The evaluation stages over an imagefolder of generated samples (`metadata.jsonl` rows of
//! ipr-core's `SampleRow`): detection as VISOR does it (Gokhale et al. 2022, "Benchmarking
//! Spatial Relationships in Text-to-Image Generation": the prompt's objects are the queries) and
//! CLIP score against each image's own prompt (torchmetrics' definition, as the IPR paper).
//!
//! `ipr detect --detector owlvit --samples DIR --out detections.jsonl` then
//! `ipr eval visor --detections detections.jsonl` is VISOR end to end; `ipr eval clip` is
//! [`clip_score_samples`].

use std::path::Path;

use ipr_core::dataset::{read_imagefolder, DetectionRow, SampleRow};
use ipr_core::sr2d::PromptRow;
use ipr_core::{Prompt, Vocabulary};

use crate::clip_score::{clip_score, ClipScorer};
use crate::detector::Detector;
use crate::model_error::{ModelError, Result};
use crate::preprocess::load_rgb;

/// The class names a detector is asked for on an image of `prompt`: the prompt's objects in
/// order, each once (VISOR's two queries for a spatial prompt, one for a single-object prompt).
pub fn prompt_classes(prompt: &str, vocab: &Vocabulary) -> std::result::Result<Vec<String>, String> {
    let parsed = Prompt::parse(prompt, vocab)?;
    let mut names: Vec<String> = Vec::new();
    for id in parsed.objects() {
        let n = vocab.name(id).to_string();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    Ok(names)
}

/// Runs `detector` on every image of the imagefolder `dir` with its prompt's objects as classes;
/// `progress(done, total)` is called after each image. Rows come back in manifest order.
pub fn detect_samples<D: Detector + ?Sized>(
    detector: &D,
    dir: &Path,
    vocab: &Vocabulary,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<DetectionRow>> {
    let rows: Vec<SampleRow> = read_imagefolder(dir)?;
    detect_rows(detector, dir, &rows, vocab, progress)
}

/// [`detect_samples`] over given rows (from a manifest or from [`samples_named_by_id`]).
pub fn detect_rows<D: Detector + ?Sized>(
    detector: &D,
    dir: &Path,
    rows: &[SampleRow],
    vocab: &Vocabulary,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<DetectionRow>> {
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let classes = prompt_classes(&row.prompt, vocab).map_err(|m| {
            ModelError::Input(format!("{}: image {} (row {}): {m}", dir.display(), row.file_name, i + 1))
        })?;
        let refs: Vec<&str> = classes.iter().map(String::as_str).collect();
        let image = load_rgb(&dir.join(&row.file_name))?;
        let detections = detector.detect(&image, &refs)?;
        out.push(DetectionRow {
            file_name: row.file_name.clone(),
            prompt_id: row.prompt_id,
            prompt: row.prompt.clone(),
            image_index: row.image_index,
            detections,
        });
        progress(i + 1, rows.len());
    }
    Ok(out)
}

/// The images of a folder in VISOR's layout: files named `<unique_id>_<k>.png` (or .jpg),
/// prompts taken from the prompt table by id, sorted by (id, k). Other files are ignored.
pub fn samples_named_by_id(dir: &Path, table: &[PromptRow]) -> Result<Vec<SampleRow>> {
    let entries = std::fs::read_dir(dir).map_err(|e| ipr_core::Error::io(dir, e))?;
    let mut rows = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ipr_core::Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((stem, ext)) = name.rsplit_once('.') else { continue };
        if !["png", "jpg", "jpeg"].contains(&ext.to_ascii_lowercase().as_str()) {
            continue;
        }
        let Ok((id, k)) = ipr_core::visor_format::parse_image_key(stem) else { continue };
        let row = ipr_core::sr2d::find_row(table, id).ok_or_else(|| {
            ModelError::Input(format!(
                "{}: image {name} names prompt {id}, not in the prompt table ({} rows)",
                dir.display(),
                table.len()
            ))
        })?;
        rows.push(SampleRow { file_name: name, prompt_id: id, prompt: row.text.clone(), image_index: k, seed: 0 });
    }
    if rows.is_empty() {
        return Err(ModelError::Input(format!(
            "{}: no metadata.jsonl and no images named <unique_id>_<k>.png",
            dir.display()
        )));
    }
    rows.sort_by_key(|r| (r.prompt_id, r.image_index));
    Ok(rows)
}

/// The samples of `dir`: its `metadata.jsonl` when there is one, else VISOR's layout.
pub fn read_samples(dir: &Path, table: &[PromptRow]) -> Result<Vec<SampleRow>> {
    if dir.join(ipr_core::dataset::METADATA).is_file() {
        Ok(read_imagefolder(dir)?)
    } else {
        samples_named_by_id(dir, table)
    }
}

/// Per-image CLIP scores (`100 * cos`, file name order of the manifest) and the aggregate
/// `max(mean, 0)`, scoring `batch` images at a time against their own prompts.
pub fn clip_score_samples(
    scorer: &ClipScorer,
    dir: &Path,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<(String, f32)>, f64)> {
    let rows: Vec<SampleRow> = read_imagefolder(dir)?;
    clip_score_rows(scorer, dir, &rows, batch, progress)
}

/// [`clip_score_samples`] over given rows (from a manifest or [`samples_named_by_id`]).
pub fn clip_score_rows(
    scorer: &ClipScorer,
    dir: &Path,
    rows: &[SampleRow],
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<(String, f32)>, f64)> {
    if rows.is_empty() {
        return Err(ModelError::Input(format!("{}: no images in the manifest", dir.display())));
    }
    let mut per_image = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let images = chunk.iter().map(|r| load_rgb(&dir.join(&r.file_name))).collect::<Result<Vec<_>>>()?;
        let refs: Vec<_> = images.iter().collect();
        let prompts: Vec<&str> = chunk.iter().map(|r| r.prompt.as_str()).collect();
        let scores = scorer.pair_scores(&refs, &prompts)?;
        per_image.extend(chunk.iter().map(|r| r.file_name.clone()).zip(scores));
        progress(per_image.len(), rows.len());
    }
    let all: Vec<f32> = per_image.iter().map(|(_, s)| *s).collect();
    Ok((per_image, clip_score(&all)))
}
