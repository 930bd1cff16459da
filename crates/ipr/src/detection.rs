//! The detect stage: every image of a folder, with its prompt's objects as the queries; or one
//! shard's part of them, and the merge of the parts.

use crate::shard::Shard;
use anyhow::Result;
use ipr_core::dataset::{DetectionRow, SampleRow};
use std::path::{Path, PathBuf};

/// Images per batch when detection is cut into shards (batch `j` goes to shard `j % n`). Each
/// image is detected alone, so the rows do not depend on it; it only sets the grain of the cut.
pub const SHARD_BATCH: usize = 16;

/// Detect every sample of `dir` (manifest or VISOR's layout) with a progress bar.
pub fn detect_folder(
    detector: &dyn ipr_detect::Detector,
    dir: &std::path::Path,
    prompts: Option<&PathBuf>,
    vocab: &ipr_core::Vocabulary,
    quiet: bool,
) -> Result<Vec<ipr_core::dataset::DetectionRow>> {
    let table = prompt_table(prompts)?;
    let rows = ipr_detect::folder::read_samples(dir, &table)?;
    let pb = crate::progress::bar(rows.len() as u64, "detect", quiet);
    let out = ipr_detect::folder::detect_rows(detector, dir, &rows, vocab, &mut |i, _| pb.set_position(i as u64))?;
    pb.finish_and_clear();
    Ok(out)
}

/// Detects the images of `rows` (from `dir`) that `shard` owns into its part of `out`
/// (`<out>.shards/<i>-of-<n>.jsonl`, written atomically). A part already there is kept: returns
/// `(images detected, part path, whether it was there already)`.
pub fn detect_shard(
    detector: &dyn ipr_detect::Detector,
    dir: &Path,
    rows: &[SampleRow],
    vocab: &ipr_core::Vocabulary,
    shard: Shard,
    out: &Path,
    quiet: bool,
) -> Result<(usize, PathBuf, bool)> {
    let part = crate::shard::part_path(out, shard, ".jsonl");
    let mine: Vec<SampleRow> = shard.items(rows.len(), SHARD_BATCH).into_iter().map(|i| rows[i].clone()).collect();
    let lock = crate::shard::parts_dir(out).join(format!(".lock-{}", shard.part_name()));
    let _lock = ipr_core::lock::Lock::acquire(&lock, &format!("shard {} of {}", shard.describe(), out.display()))?;
    if part.exists() {
        return Ok((mine.len(), part, true));
    }
    let pb = crate::progress::bar(mine.len() as u64, "detect", quiet);
    let found = ipr_detect::folder::detect_rows(detector, dir, &mine, vocab, &mut |i, _| pb.set_position(i as u64))?;
    pb.finish_and_clear();
    ipr_core::fs::write_jsonl(&part, &found)?;
    Ok((mine.len(), part, false))
}

/// The detections of every image of `rows`, merged from the complete, disjoint parts of `out`
/// in `rows`' order: the rows one process detecting the whole folder would write.
pub fn merge_detection_parts(rows: &[SampleRow], out: &Path) -> Result<Vec<DetectionRow>> {
    let parts = crate::shard::complete_parts(&crate::shard::parts_dir(out), ".jsonl")?;
    let parts = parts
        .into_iter()
        .map(|p| Ok((p.clone(), ipr_core::dataset::read_detections(&p)?)))
        .collect::<Result<Vec<_>>>()?;
    let expected: Vec<String> = rows.iter().map(|r| r.file_name.clone()).collect();
    crate::shard::merge_rows(parts, |r: &DetectionRow| r.file_name.clone(), &expected)
}

/// The prompt table: a VISOR-format JSON file, or SR2D over COCO-80 generated in memory.
pub fn prompt_table(path: Option<&PathBuf>) -> Result<Vec<ipr_core::sr2d::PromptRow>> {
    Ok(match path {
        Some(p) => ipr_core::sr2d::read_rows(p)?,
        None => ipr_core::sr2d::sr2d_rows(&ipr_core::Vocabulary::coco80()),
    })
}

/// The detector a `[detector]` / `[eval.detector]` table describes, loaded on `device`. A
/// learned detector's folder must hold the kind the table names (`model_type` in its
/// `config.json`): the error names the folder and what it holds instead, before any weight is read.
pub fn load_detector(
    c: &crate::config::DetectorConfig,
    device: &candle_core::Device,
) -> Result<Box<dyn ipr_detect::Detector>> {
    if c.kind == "toy" {
        return Ok(Box::new(ipr_detect::ToyDetector::default()));
    }
    let spec = c.model.as_ref().ok_or_else(|| anyhow::anyhow!("detector.kind = {:?} needs detector.model", c.kind))?;
    let folder = ipr_diffusion::source::resolve_model(&spec.to_string_lossy())?;
    let config = folder.join("config.json");
    let text = ipr_core::fs::read_to_string(&config)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", config.display()))?;
    let found = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("(no model_type)");
    if found != c.kind {
        anyhow::bail!(
            "{}: model_type is {found:?}, but the detector kind is {:?}: point detector.model at an {} folder \
             (or set the kind to match)",
            config.display(),
            c.kind,
            if c.kind == "owlv2" { "Owlv2ForObjectDetection" } else { "OwlViTForObjectDetection" }
        );
    }
    let mut d = ipr_detect::OwlVitDetector::load(&folder, device)?;
    d.threshold = c.threshold;
    d.query_template = c.query.clone();
    Ok(Box::new(d))
}
