//! The tensor-free stages: detections -> labelled training set, detections -> VISOR scores.
//!
//! Each is a pure function of its inputs; the writers build their artifact under a temporary
//! name and rename it into place, so a killed run never leaves half a folder behind.

use crate::dataset::{DetectionRow, LabelledRow, METADATA};
use crate::error::{Error, Result};
use crate::judge::{judge, Outcome};
use crate::metrics::ImageScore;
use crate::prompt::Prompt;
use crate::relabel::{relabel, RelabelPolicy, Weights};
use crate::visor_format::{image_key, ResultEntries, VisorResult};
use crate::vocab::Vocabulary;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the images of a round were judged (IPR's strict rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JudgeSummary {
    pub images: usize,
    pub correct: usize,
    pub location_errors: usize,
    pub count_errors: usize,
    /// Pairs the policy dropped (measured: nothing found).
    pub dropped: usize,
}

impl JudgeSummary {
    /// Tally one image's strict outcome.
    pub fn count(&mut self, outcome: Outcome) {
        self.images += 1;
        match outcome {
            Outcome::Correct => self.correct += 1,
            Outcome::LocationError => self.location_errors += 1,
            Outcome::CountError => self.count_errors += 1,
        }
    }

    /// Percentage of images that are right by the strict rule.
    pub fn strict_accuracy(&self) -> f64 {
        if self.images == 0 {
            0.0
        } else {
            100.0 * self.correct as f64 / self.images as f64
        }
    }
}

fn parse_prompt(row: &DetectionRow, line: usize, vocab: &Vocabulary) -> std::result::Result<Prompt, String> {
    Prompt::parse(&row.prompt, vocab).map_err(|m| format!("record {line}: field prompt: {m}"))
}

/// Judge and relabel every detected image.
pub fn relabel_detections(
    rows: &[DetectionRow],
    vocab: &Vocabulary,
    policy: RelabelPolicy,
    weights: &Weights,
    round: u32,
) -> std::result::Result<(Vec<LabelledRow>, JudgeSummary), String> {
    weights.validate()?;
    let mut out = Vec::with_capacity(rows.len());
    let mut s = JudgeSummary::default();
    for (i, row) in rows.iter().enumerate() {
        let prompt = parse_prompt(row, i + 1, vocab)?;
        let verdict = judge(&prompt, &row.detections, vocab).map_err(|m| format!("record {}: {m}", i + 1))?;
        s.count(verdict.outcome());
        match relabel(policy, weights, &prompt, &verdict, vocab) {
            Some(r) => out.push(LabelledRow {
                file_name: row.file_name.clone(),
                prompt: r.prompt,
                original_prompt: row.prompt.clone(),
                correct: r.correct,
                reason: r.reason,
                weight: r.weight,
                round,
                visor_correct: verdict.all_found() && verdict.visor_sra,
            }),
            None => s.dropped += 1,
        }
    }
    Ok((out, s))
}

/// Every image judged once, seen both ways: VISOR's scores (images of spatial prompts), its
/// results-file entries (every image; metrics skip non-spatial ones), and the strict IPR tally.
#[derive(Debug, Clone)]
pub struct Scored {
    pub scores: Vec<ImageScore>,
    pub entries: ResultEntries,
    /// IPR's strict outcomes (`dropped` stays 0: nothing is relabeled here).
    pub strict: JudgeSummary,
}

/// Judge every detected image against its prompt.
pub fn score_detections(rows: &[DetectionRow], vocab: &Vocabulary) -> std::result::Result<Scored, String> {
    let mut out = Scored { scores: Vec::new(), entries: Vec::new(), strict: JudgeSummary::default() };
    for (i, row) in rows.iter().enumerate() {
        let prompt = parse_prompt(row, i + 1, vocab)?;
        if let Prompt::Count { .. } = prompt {
            return Err(format!("record {}: count captions are not VISOR prompts", i + 1));
        }
        let verdict = judge(&prompt, &row.detections, vocab).map_err(|m| format!("record {}: {m}", i + 1))?;
        out.strict.count(verdict.outcome());
        if let Some(relation) = prompt.relation() {
            out.scores.push(ImageScore {
                prompt_id: row.prompt_id,
                relation,
                found_a: verdict.count_a > 0,
                found_b: verdict.count_b.is_some_and(|n| n > 0),
                sra: verdict.visor_sra,
            });
        }
        out.entries.push((image_key(row.prompt_id, row.image_index), VisorResult::from_verdict(&verdict, &row.prompt)));
    }
    Ok(out)
}

/// Write a labelled imagefolder at `out`: the images (hard links where possible, else copies)
/// from `images`, and `metadata.jsonl`. Built beside `out` and renamed into place.
pub fn write_labelled_folder(out: &Path, rows: &[LabelledRow], images: Option<&Path>) -> Result<()> {
    crate::fs::build_dir(out, |tmp| {
        if let Some(images) = images {
            for row in rows {
                let (src, dst) = (images.join(&row.file_name), tmp.join(&row.file_name));
                if let Some(d) = dst.parent() {
                    std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
                }
                link_or_copy(&src, &dst)?;
            }
        }
        crate::fs::write_jsonl(&tmp.join(METADATA), rows)
    })
}

/// A hard link to `src` at `dst` (artifacts are never modified in place), or a copy where the
/// file system has no links. An existing `dst` is an error, never overwritten: it may be a link
/// to `src` itself, and copying a file onto itself truncates it under both names.
pub fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::io(dst, e)),
        Err(_) => {
            let mut from = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
            let mut to =
                std::fs::OpenOptions::new().write(true).create_new(true).open(dst).map_err(|e| Error::io(dst, e))?;
            std::io::copy(&mut from, &mut to).map_err(|e| Error::io(dst, e))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detection::{BBox, Detection};
    use crate::metrics::visor_metrics;
    use crate::relabel::Reason;

    fn row(id: u64, k: u32, prompt: &str, boxes: &[(&str, f64)]) -> DetectionRow {
        DetectionRow {
            file_name: format!("{id}_{k}.png"),
            prompt_id: id,
            prompt: prompt.into(),
            image_index: k,
            detections: boxes
                .iter()
                .map(|&(l, x)| Detection::new(l, 0.9, BBox::new(x, 0.0, x + 2.0, 2.0).unwrap()).unwrap())
                .collect(),
        }
    }

    fn rows() -> Vec<DetectionRow> {
        vec![
            row(0, 0, "a dog to the left of a cat", &[("dog", 0.0), ("cat", 10.0)]),
            row(0, 1, "a dog to the left of a cat", &[("dog", 20.0), ("cat", 10.0)]),
            row(0, 2, "a dog to the left of a cat", &[("dog", 20.0)]),
            row(0, 3, "a dog to the left of a cat", &[]),
            row(1, 0, "a dog and a cat", &[("dog", 20.0), ("cat", 10.0)]),
        ]
    }

    #[test]
    fn relabels_and_summarises() {
        let v = Vocabulary::coco80();
        let (labelled, s) = relabel_detections(&rows(), &v, RelabelPolicy::Measured, &Weights::default(), 2).unwrap();
        assert_eq!(s, JudgeSummary { images: 5, correct: 2, location_errors: 1, count_errors: 2, dropped: 1 });
        assert_eq!(s.strict_accuracy(), 40.0);
        let got: Vec<_> = labelled.iter().map(|r| (r.prompt.as_str(), r.reason, r.weight, r.round)).collect();
        assert_eq!(
            got,
            [
                ("a dog to the left of a cat", Reason::Correct, 1.0, 2),
                ("a dog to the right of a cat", Reason::Location, 0.5, 2),
                ("a dog", Reason::Count, 0.5, 2),
                ("a dog and a cat", Reason::Correct, 1.0, 2),
            ]
        );
        let (paper, _) = relabel_detections(&rows(), &v, RelabelPolicy::Paper, &Weights::default(), 0).unwrap();
        assert_eq!(paper.len(), 5, "the paper policy keeps every pair");
        assert_eq!(paper[3].prompt, "0 cat");
    }

    #[test]
    fn scores_like_visor() {
        let v = Vocabulary::coco80();
        let Scored { scores, entries, strict } = score_detections(&rows(), &v).unwrap();
        let (_, relabeled) = relabel_detections(&rows(), &v, RelabelPolicy::Measured, &Weights::default(), 0).unwrap();
        assert_eq!(strict, JudgeSummary { dropped: 0, ..relabeled }, "the same judge, without relabeling");
        assert_eq!((scores.len(), entries.len()), (4, 5), "the 'and' image is written but not scored");
        let m = visor_metrics(&scores).unwrap();
        assert_eq!((m.oa, m.visor_cond, m.visor_uncond, m.visor_1), (50.0, 50.0, 25.0, 100.0));
        assert_eq!(entries[1].0, "0_1");
        assert_eq!((entries[2].1.recall, entries[2].1.classes.clone()), (1, vec!["dog".to_string()]));
        let mut bad = rows();
        bad[2].prompt = "a dog beside a cat".into();
        assert!(score_detections(&bad, &v).unwrap_err().starts_with("record 3: field prompt"));
    }

    #[test]
    fn labelled_folder_is_complete_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("samples");
        std::fs::create_dir(&images).unwrap();
        let v = Vocabulary::coco80();
        let (labelled, _) = relabel_detections(&rows(), &v, RelabelPolicy::Measured, &Weights::default(), 0).unwrap();
        for r in &labelled[..3] {
            std::fs::write(images.join(&r.file_name), b"img").unwrap();
        }
        let out = dir.path().join("labelled");
        // One image is missing: nothing is left behind.
        assert!(write_labelled_folder(&out, &labelled, Some(&images)).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only samples/ remains");
        std::fs::write(images.join(&labelled[3].file_name), b"img").unwrap();
        write_labelled_folder(&out, &labelled, Some(&images)).unwrap();
        let back: Vec<LabelledRow> = crate::dataset::read_imagefolder(&out).unwrap();
        assert_eq!(back, labelled);
        assert!(write_labelled_folder(&out, &labelled, Some(&images))
            .unwrap_err()
            .to_string()
            .contains("already exists"));
    }

    #[test]
    fn link_or_copy_never_writes_over_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
        std::fs::write(&src, b"image bytes").unwrap();
        link_or_copy(&src, &dst).unwrap();
        // A second link to the same name (the same image named by two training rows) is refused
        // and both names keep their bytes: a copy onto the link would have truncated the image.
        let err = link_or_copy(&src, &dst).unwrap_err().to_string();
        assert!(err.contains("b.png"), "{err}");
        assert_eq!(std::fs::read(&src).unwrap(), b"image bytes");
        assert_eq!(std::fs::read(&dst).unwrap(), b"image bytes");
    }
}
