//! The detect stage: every image of a folder, with its prompt's objects as the queries.

use anyhow::Result;
use std::path::PathBuf;

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
