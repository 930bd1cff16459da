//! Captioned toy scenes as an HF `imagefolder`: PNG images plus `metadata.jsonl`.
//!
//! Pretraining draws its pairs straight from [`CaptionedScenes`]; this writes a slice of the
//! same stream to disk so it can be looked at, cached, or trained on by anything that reads
//! imagefolders: ipr-core's `TrainingRow` reads `file_name`/`prompt` (weight 1 when absent),
//! and `datasets.load_dataset("imagefolder", ...)` with diffusers' scripts takes `prompt` as
//! the caption column. The folder is built under a temporary name and renamed into place.

use crate::captions::{CaptionKind, CaptionedScenes};
use image::ImageFormat;
use ipr_core::dataset::{HasFileName, METADATA};
use ipr_core::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A row of an exported folder's `metadata.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionedRow {
    pub file_name: String,
    /// The caption (`prompt`, the column name ipr's training rows read).
    pub prompt: String,
    pub kind: CaptionKind,
    /// Index of the pair in its generator: regenerate it with `CaptionedScenes::sample`.
    pub sample_index: u64,
}

impl HasFileName for CaptionedRow {
    fn file_name(&self) -> &str {
        &self.file_name
    }
}

/// Write samples `start..start + n` of `scenes` as an imagefolder at `out`, which must not
/// exist. Returns the rows written.
pub fn write_captioned_folder(scenes: &CaptionedScenes, start: u64, n: usize, out: &Path) -> Result<Vec<CaptionedRow>> {
    if out.exists() {
        return Err(Error::file(out, "already exists: remove it or choose another output folder"));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut rows = Vec::with_capacity(n);
        for i in start..start + n as u64 {
            let pair = scenes.sample(i);
            let file_name = format!("{i:08}.png");
            let path = tmp.join(&file_name);
            pair.image.save_with_format(&path, ImageFormat::Png).map_err(|e| Error::file(&path, e.to_string()))?;
            rows.push(CaptionedRow { file_name, prompt: pair.text, kind: pair.kind, sample_index: i });
        }
        ipr_core::fs::write_jsonl(&tmp.join(METADATA), &rows)?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        Ok(rows)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::captions::CaptionNoise;
    use ipr_core::dataset::{read_imagefolder, TrainingRow};

    #[test]
    fn writes_a_folder_training_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pretrain");
        let scenes = CaptionedScenes::new(CaptionNoise::default(), 4).unwrap();
        let rows = write_captioned_folder(&scenes, 10, 6, &out).unwrap();
        assert_eq!(rows.len(), 6);
        let back: Vec<CaptionedRow> = read_imagefolder(&out).unwrap();
        assert_eq!(back, rows);
        let training: Vec<TrainingRow> = read_imagefolder(&out).unwrap();
        assert_eq!(training[2].prompt, scenes.sample(12).text);
        assert_eq!(training[2].weight, 1.0);
        let img = image::open(out.join(&rows[2].file_name)).unwrap().to_rgb8();
        assert_eq!(img, scenes.sample(12).image, "PNG is lossless");
        let e = write_captioned_folder(&scenes, 0, 1, &out).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary folder left");
    }
}
