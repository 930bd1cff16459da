//! Dataset manifests: HF `imagefolder` folders (`metadata.jsonl` + images) and the
//! detections file, the artifacts that couple the stages on disk.
//!
//! Our own manifests are parsed strictly (unknown fields are errors, each error names the
//! file, the line and the field). Training reads any imagefolder a user brings, so
//! [`TrainingRow`] takes only the columns it needs and ignores the rest, as `datasets` does.

use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::relabel::Reason;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Component, Path};

/// The manifest file name of an HF imagefolder.
pub const METADATA: &str = "metadata.jsonl";

/// A row of `round-N/samples/metadata.jsonl`: one generated image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRow {
    pub file_name: String,
    pub prompt_id: u64,
    pub prompt: String,
    /// Which of the prompt's images this is (the `k` of VISOR's "<id>_<k>" keys).
    pub image_index: u32,
    pub seed: u64,
}

/// A row of `detections.jsonl`: what the detector found in one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionRow {
    /// The image, relative to the samples folder.
    pub file_name: String,
    pub prompt_id: u64,
    pub prompt: String,
    pub image_index: u32,
    pub detections: Vec<Detection>,
}

/// A row of `round-N/labelled/metadata.jsonl`: one training example after judging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelledRow {
    pub file_name: String,
    /// The caption to train on (relabeled where the image was wrong).
    pub prompt: String,
    pub original_prompt: String,
    pub correct: bool,
    pub reason: Reason,
    pub weight: f64,
    pub round: u32,
    /// Whether VISOR's test counts the image right (both objects found, the relation holds for
    /// some pair of boxes): true for some count errors (an extra object beside the right pair).
    #[serde(default)]
    pub visor_correct: bool,
}

/// What training needs of any imagefolder: the image, its caption and its loss weight
/// (1 when the column is absent). Other columns are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRow {
    pub file_name: String,
    #[serde(alias = "text", alias = "caption")]
    pub prompt: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// Rows that name an image file.
pub trait HasFileName {
    fn file_name(&self) -> &str;
}

macro_rules! has_file_name {
    ($($t:ty),*) => {$(impl HasFileName for $t { fn file_name(&self) -> &str { &self.file_name } })*};
}
has_file_name!(SampleRow, DetectionRow, LabelledRow, TrainingRow);

/// A file name inside the folder: relative, no `..`, not empty.
pub fn check_file_name(name: &str) -> std::result::Result<(), String> {
    let p = Path::new(name);
    if name.is_empty() || p.is_absolute() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!(
            "field file_name: {name:?} must be a relative path inside the folder (no \"..\", not absolute)"
        ));
    }
    Ok(())
}

/// Read `dir/metadata.jsonl`, checking every row's image exists in `dir` (and is not a symbolic
/// link leading out of it).
pub fn read_imagefolder<R: DeserializeOwned + HasFileName>(dir: &Path) -> Result<Vec<R>> {
    let path = dir.join(METADATA);
    let text = crate::fs::read_to_string(&path)?;
    let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: R = crate::fs::from_json_str(line).map_err(|m| Error::line(&path, i + 1, m))?;
        check_file_name(row.file_name()).map_err(|m| Error::line(&path, i + 1, m))?;
        if !dir.join(row.file_name()).is_file() {
            return Err(Error::line(
                &path,
                i + 1,
                format!("field file_name: image {:?} does not exist in {}", row.file_name(), dir.display()),
            ));
        }
        let real = dir.join(row.file_name()).canonicalize().map_err(|e| Error::io(&dir.join(row.file_name()), e))?;
        if !real.starts_with(&root) {
            return Err(Error::line(
                &path,
                i + 1,
                format!(
                    "field file_name: {:?} is a symbolic link to {}, outside {}: a folder's images must be inside it",
                    row.file_name(),
                    real.display(),
                    dir.display()
                ),
            ));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Validate weights of rows (finite, >= 0): training multiplies the loss by them.
pub fn check_weights(path: &Path, rows: &[TrainingRow]) -> Result<()> {
    for (i, r) in rows.iter().enumerate() {
        if !(r.weight.is_finite() && r.weight >= 0.0) {
            return Err(Error::line(path, i + 1, format!("field weight: {} is not a finite number >= 0", r.weight)));
        }
    }
    Ok(())
}

/// Read `detections.jsonl`.
pub fn read_detections(path: &Path) -> Result<Vec<DetectionRow>> {
    let rows: Vec<DetectionRow> = crate::fs::read_jsonl(path)?;
    for (i, r) in rows.iter().enumerate() {
        check_file_name(&r.file_name).map_err(|m| Error::line(path, i + 1, m))?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagefolder_checks_files_and_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"png").unwrap();
        let rows = vec![LabelledRow {
            file_name: "a.png".into(),
            prompt: "a cat above a dog".into(),
            original_prompt: "a cat below a dog".into(),
            correct: false,
            reason: Reason::Location,
            weight: 0.5,
            round: 1,
            visor_correct: false,
        }];
        crate::fs::write_jsonl(&dir.path().join(METADATA), &rows).unwrap();
        assert_eq!(read_imagefolder::<LabelledRow>(dir.path()).unwrap(), rows);
        // Training reads the same folder, ignoring the extra columns.
        let t = read_imagefolder::<TrainingRow>(dir.path()).unwrap();
        assert_eq!((t[0].prompt.as_str(), t[0].weight), ("a cat above a dog", 0.5));

        let meta = dir.path().join(METADATA);
        std::fs::write(
            &meta,
            "{\"file_name\":\"a.png\",\"text\":\"a cat\"}\n{\"file_name\":\"b.png\",\"prompt\":\"a dog\"}\n",
        )
        .unwrap();
        let e = read_imagefolder::<TrainingRow>(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metadata.jsonl:2: field file_name: image \"b.png\" does not exist"), "{e}");
        std::fs::write(&meta, "{\"file_name\":\"../a.png\",\"prompt\":\"a dog\"}\n").unwrap();
        let e = read_imagefolder::<TrainingRow>(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metadata.jsonl:1: field file_name"), "{e}");
        std::fs::write(&meta, "{\"file_name\":\"a.png\",\"prompt\":\"a dog\",\"weight\":\"x\"}\n").unwrap();
        let e = read_imagefolder::<TrainingRow>(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metadata.jsonl:1: field weight"), "{e}");
        std::fs::write(&meta, "{\"file_name\":\"a.png\",\"prompt\":\"a dog\",\"reason\":\"vibes\",\"original_prompt\":\"a dog\",\"correct\":true,\"weight\":1,\"round\":0}\n").unwrap();
        let e = read_imagefolder::<LabelledRow>(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metadata.jsonl:1: field reason: unknown variant `vibes`"), "{e}");
        let bad = vec![TrainingRow { file_name: "a.png".into(), prompt: "x".into(), weight: f64::INFINITY }];
        assert!(check_weights(&meta, &bad).unwrap_err().to_string().contains("field weight"));
    }

    #[test]
    fn detections_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("detections.jsonl");
        let good = r#"{"file_name":"0_0.png","prompt_id":0,"prompt":"a dog","image_index":0,"detections":[{"label":"dog","score":0.9,"box":[1,2,3,4]}]}"#;
        std::fs::write(&p, format!("{good}\n")).unwrap();
        assert_eq!(read_detections(&p).unwrap()[0].detections[0].bbox.center(), (2.0, 3.0));
        for (line, want) in [
            (
                r#"{"file_name":"0_0.png","prompt_id":0,"prompt":"a dog","image_index":0,"detections":[{"label":"dog","score":0.9,"box":[5,2,3,4]}]}"#,
                "detections[0].box: box has x2 (3) < x1 (5)",
            ),
            (
                r#"{"file_name":"0_0.png","prompt_id":0,"prompt":"a dog","image_index":0,"detections":[{"label":"dog","score":null,"box":[1,2,3,4]}]}"#,
                "detections[0].score",
            ),
            (
                r#"{"file_name":"0_0.png","prompt":"a dog","image_index":0,"detections":[]}"#,
                "missing field `prompt_id`",
            ),
            (r#"{"file_name":"0_0.png","prompt_id":0,"prompt":"a dog","image_index":0,"detections":[]"#, "EOF"),
        ] {
            std::fs::write(&p, format!("{good}\n{line}\n")).unwrap();
            let e = read_detections(&p).unwrap_err().to_string();
            assert!(e.contains("detections.jsonl:2:") && e.contains(want), "{e} (wanted {want})");
        }
    }
}
