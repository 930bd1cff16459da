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
    let manifest = dir.join(ipr_core::dataset::METADATA);
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let classes = prompt_classes(&row.prompt, vocab)
            .map_err(|m| ipr_core::Error::line(&manifest, i + 1, format!("field prompt: {m}")))?;
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

/// Per-image CLIP scores (`100 * cos`, file name order of the manifest) and the aggregate
/// `max(mean, 0)`, scoring `batch` images at a time against their own prompts.
pub fn clip_score_samples(
    scorer: &ClipScorer,
    dir: &Path,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<(String, f32)>, f64)> {
    let rows: Vec<SampleRow> = read_imagefolder(dir)?;
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
