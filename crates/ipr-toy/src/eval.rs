//! VISOR evaluation of a toy sampler, in memory, per split of the object pairs.
//!
//! The library side of `ipr toy eval` and a quality probe for pretraining: every spatial prompt
//! of the training pairs and of the held-out pairs gets `images_per_prompt` images from the
//! sampler, a detector finds the two named objects, ipr-core's judge decides VISOR's
//! `sra`, and ipr-core's metrics give OA, VISOR_cond/uncond and VISOR_1..4 for each split.
//! The sampler and the detector are closures, so any model and any detector plug in (ipr-toy
//! does not depend on ipr-detect; pass `|img, classes| detector.detect(img, classes)`).

use crate::classes::vocabulary;
use crate::split::{PairSplit, Split};
use image::RgbImage;
use ipr_core::judge::judge;
use ipr_core::metrics::{visor_metrics, ImageScore, VisorMetrics};
use ipr_core::sr2d::PromptRow;
use ipr_core::Detection;
use serde::Serialize;
use std::collections::BTreeMap;

/// An error from a sampler or detector closure.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("sampling prompt {id} ({text:?}): {source}")]
    Sample { id: u64, text: String, source: BoxError },
    #[error("sampling prompt {id} ({text:?}): got {got} images, expected {expected}")]
    ImageCount { id: u64, text: String, got: usize, expected: usize },
    #[error("detecting in image {index} of prompt {id} ({text:?}): {source}")]
    Detect { id: u64, text: String, index: usize, source: BoxError },
    #[error("{0}")]
    Invalid(String),
}

/// VISOR metrics of each split, serialised as `{"train": {...}, "held_out": {...}}` with
/// VISOR's metric names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitMetrics(pub BTreeMap<&'static str, VisorMetrics>);

impl SplitMetrics {
    pub fn get(&self, split: Split) -> Option<&VisorMetrics> {
        self.0.get(split.name())
    }
}

/// Evaluate `sample` on the spatial prompts of both sides of `split`.
///
/// `sample(row, n)` returns the `n` images of one prompt (a batch, as a model samples them);
/// `detect(image, [name_a, name_b])` returns the detections of the two named objects.
pub fn evaluate<S, D>(
    split: &PairSplit,
    images_per_prompt: usize,
    mut sample: S,
    mut detect: D,
) -> Result<SplitMetrics, EvalError>
where
    S: FnMut(&PromptRow, usize) -> Result<Vec<RgbImage>, BoxError>,
    D: FnMut(&RgbImage, &[&str]) -> Result<Vec<Detection>, BoxError>,
{
    if images_per_prompt == 0 {
        return Err(EvalError::Invalid("images_per_prompt is 0, expected at least 1".into()));
    }
    let vocab = vocabulary();
    let mut out = BTreeMap::new();
    for side in Split::ALL {
        let mut scores = Vec::new();
        for row in split.spatial_rows(side) {
            let (id, text) = (row.unique_id, row.text.clone());
            let prompt = row.prompt(&vocab).map_err(EvalError::Invalid)?;
            let relation = prompt.relation().expect("spatial rows have a relation");
            let names: Vec<&str> = prompt.objects().into_iter().map(|o| vocab.name(o)).collect();
            let images = sample(&row, images_per_prompt).map_err(|source| EvalError::Sample {
                id,
                text: text.clone(),
                source,
            })?;
            if images.len() != images_per_prompt {
                let got = images.len();
                return Err(EvalError::ImageCount { id, text, got, expected: images_per_prompt });
            }
            for (index, image) in images.iter().enumerate() {
                let dets = detect(image, &names).map_err(|source| EvalError::Detect {
                    id,
                    text: text.clone(),
                    index,
                    source,
                })?;
                let verdict = judge(&prompt, &dets, &vocab).map_err(EvalError::Invalid)?;
                scores.push(ImageScore {
                    prompt_id: id,
                    relation,
                    found_a: verdict.count_a > 0,
                    found_b: verdict.count_b.is_some_and(|n| n > 0),
                    sra: verdict.visor_sra,
                });
            }
        }
        out.insert(side.name(), visor_metrics(&scores).map_err(EvalError::Invalid)?);
    }
    Ok(SplitMetrics(out))
}

#[cfg(test)]
mod tests {
    // The metrics of real samples through the real toy detector are tested in ipr-detect
    // (tests/toy_judge.rs), which can depend on both crates; here, the error paths.
    use super::*;

    #[test]
    fn errors_name_the_prompt() {
        let split = PairSplit::fixed();
        let first = &split.spatial_rows(Split::Train)[0];
        assert_eq!(first.unique_id, 20, "apple+carrot and apple+leaf are held out");
        let nothing = |_: &RgbImage, _: &[&str]| -> Result<Vec<Detection>, BoxError> { Ok(vec![]) };
        let e = evaluate(&split, 1, |_, _| Err("out of memory".into()), nothing).unwrap_err().to_string();
        assert!(e.contains("prompt 20 (\"an apple to the left of a tree\")") && e.contains("out of memory"), "{e}");
        let e = evaluate(&split, 2, |_, _| Ok(vec![]), nothing).unwrap_err().to_string();
        assert!(e.contains("got 0 images, expected 2"), "{e}");
        let blank = |_: &PromptRow, n| Ok(vec![RgbImage::new(32, 32); n]);
        let e = evaluate(&split, 1, blank, |_, _| Err("broken".into())).unwrap_err().to_string();
        assert!(e.contains("image 0 of prompt 20") && e.contains("broken"), "{e}");
        assert!(evaluate(&split, 0, blank, nothing).unwrap_err().to_string().contains("at least 1"));
        // A sampler of blank images finds nothing: OA 0 on both sides.
        let m = evaluate(&split, 1, blank, nothing).unwrap();
        assert_eq!((m.get(Split::Train).unwrap().oa, m.get(Split::HeldOut).unwrap().oa), (0.0, 0.0));
    }
}
