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
