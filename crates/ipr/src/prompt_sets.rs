//! The prompts a run receives: the vocabulary, the training prompts IPR samples, and the
//! evaluation splits. The loop does not know which world it is in; two sets exist:
//!
//! - `toy`: the shapes world's fixed split of pairs (training / validation / held-out);
//! - `sr2d`: VISOR's SR2D over COCO-80, its 3,160 unordered pairs split by a seeded rule
//!   ([`ipr_core::pair_split`]) into training, validation and held-out pairs. Training prompts
//!   are the spatial prompts of the training pairs, or exactly the public code's 100 prompts
//!   (`prompts.train = "ipr-paper"`, whose pairs are then kept out of validation and held-out).
//!
//! Evaluation splits: `seen` (spatial prompts of the pairs sampled in training), `validation` and
//! `heldout` (pairs never sampled in training). Rows keep their SR2D `unique_id`s, so every
//! image is named as VISOR names it (`<unique_id>_<k>.png`).

use crate::config::{PromptSetName, RunConfig, TrainPrompts};
use crate::metrics_file::EvalSplit;
use anyhow::Result;
use ipr_core::pair_split::{row_pair, PairSide, PairSplit, IPR_PAPER_PROMPT_IDS};
use ipr_core::sr2d::{sr2d_rows, to_visor_json, PromptRow};
use ipr_core::Vocabulary;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The prompts of a run.
pub struct PromptSets {
    pub name: PromptSetName,
    pub vocab: Vocabulary,
    /// What IPR samples, judges and trains on.
    pub train: Vec<PromptRow>,
    /// The evaluation splits in report order; a split without prompts is left out.
    pub eval: Vec<(EvalSplit, Vec<PromptRow>)>,
}

impl PromptSets {
    /// The toy world's fixed split: spatial prompts over training pairs (seen), validation
    /// pairs and held-out pairs.
    pub fn toy() -> Self {
        let split = ipr_toy::PairSplit::fixed();
        let seen = split.spatial_rows(ipr_toy::Split::Train);
        Self {
            name: PromptSetName::Toy,
            vocab: ipr_toy::vocabulary(),
            train: seen.clone(),
            eval: vec![
                (EvalSplit::Seen, seen),
                (EvalSplit::Validation, split.spatial_rows(ipr_toy::Split::Validation)),
                (EvalSplit::Heldout, split.spatial_rows(ipr_toy::Split::HeldOut)),
            ],
        }
    }

    /// SR2D over COCO-80 with the config's pair split and training prompts.
    pub fn sr2d(c: &crate::config::PromptsConfig) -> Result<Self> {
        let vocab = Vocabulary::coco80();
        let rows = sr2d_rows(&vocab);
        let paper: Vec<PromptRow> = IPR_PAPER_PROMPT_IDS.iter().map(|&id| rows[id as usize].clone()).collect();
        let forced: BTreeSet<_> = match c.train {
            TrainPrompts::Pairs => BTreeSet::new(),
            TrainPrompts::IprPaper => paper.iter().filter_map(|r| row_pair(r, &vocab)).collect(),
        };
        let split = PairSplit::new(vocab.len(), c.split_rule(), &forced).map_err(anyhow::Error::msg)?;
        let training_pairs = split.spatial_rows(&rows, &vocab, PairSide::Train);
        // `seen` is the pairs actually sampled in training: with the paper's 100 prompts, the
        // spatial prompts of their pairs (not every pair left out of validation and held-out).
        let (train, seen) = match c.train {
            TrainPrompts::Pairs => (training_pairs.clone(), training_pairs),
            TrainPrompts::IprPaper => {
                let mut p = paper;
                p.sort_by_key(|r| r.unique_id);
                let seen = training_pairs
                    .into_iter()
                    .filter(|r| row_pair(r, &vocab).is_some_and(|q| forced.contains(&q)))
                    .collect();
                (p, seen)
            }
        };
        let eval = vec![
            (EvalSplit::Seen, seen),
            (EvalSplit::Validation, split.spatial_rows(&rows, &vocab, PairSide::Validation)),
            (EvalSplit::Heldout, split.spatial_rows(&rows, &vocab, PairSide::Heldout)),
        ];
        Ok(Self {
            name: PromptSetName::Sr2d,
            vocab,
            train,
            eval: eval.into_iter().filter(|(_, r)| !r.is_empty()).collect(),
        })
    }

    /// The set a run config asks for, cut to `prompts.max_train` / `prompts.max_eval`.
    pub fn from_config(c: &RunConfig) -> Result<Self> {
        let sets = match c.prompt_set() {
            PromptSetName::Toy => Self::toy(),
            PromptSetName::Sr2d => Self::sr2d(&c.prompts)?,
        };
        Ok(sets.truncated(c.prompts.max_train, c.prompts.max_eval))
    }

    /// Keep at most `max_train` training and `max_eval` evaluation prompts per split (0: all),
    /// evenly spaced through each list (prompt `i * len / n` for `i < n`) so that every part of
    /// it (pairs, relations, word orders) stays represented.
    pub fn truncated(mut self, max_train: u32, max_eval: u32) -> Self {
        let cut = |rows: &mut Vec<PromptRow>, n: u32| {
            let (n, len) = (n as usize, rows.len());
            if n > 0 && n < len {
                *rows = (0..n).map(|i| rows[i * len / n].clone()).collect();
            }
        };
        cut(&mut self.train, max_train);
        for (_, rows) in &mut self.eval {
            cut(rows, max_eval);
        }
        self
    }

    /// The evaluation splits, in order.
    pub fn splits(&self) -> Vec<EvalSplit> {
        self.eval.iter().map(|(s, _)| *s).collect()
    }

    /// The prompts of one evaluation split (empty when the set has no such split).
    pub fn eval_rows(&self, split: EvalSplit) -> &[PromptRow] {
        self.eval.iter().find(|(s, _)| *s == split).map(|(_, r)| r.as_slice()).unwrap_or(&[])
    }

    /// Writes `train.json` and one `<split>.json` per evaluation split into `dir`, in VISOR's
    /// row format (ids of the full SR2D table), so `ipr sample --prompts` and `ipr eval visor
    /// --prompts` can reuse them and a reader can see exactly what was sampled. Returns the paths.
    pub fn write_tables(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| ipr_core::Error::io(dir, e))?;
        let mut written = Vec::new();
        let tables = std::iter::once(("train", &self.train)).chain(self.eval.iter().map(|(s, r)| (s.name(), r)));
        for (name, rows) in tables {
            let path = dir.join(format!("{name}.json"));
            ipr_core::fs::write_atomic(&path, to_visor_json(rows).as_bytes())?;
            written.push(path);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PromptsConfig;

    #[test]
    fn sr2d_sets_keep_heldout_pairs_out_of_training() {
        let sets = PromptSets::sr2d(&PromptsConfig::default()).unwrap();
        assert_eq!(sets.splits(), [EvalSplit::Seen, EvalSplit::Validation, EvalSplit::Heldout]);
        assert_eq!(sets.train.len(), 2528 * 8);
        let pairs =
            |rows: &[PromptRow]| -> BTreeSet<_> { rows.iter().map(|r| row_pair(r, &sets.vocab).unwrap()).collect() };
        let train = pairs(&sets.train);
        for split in [EvalSplit::Validation, EvalSplit::Heldout] {
            assert!(pairs(sets.eval_rows(split)).is_disjoint(&train), "{split:?} pairs are never trained on");
        }
        assert!(pairs(sets.eval_rows(EvalSplit::Validation)).is_disjoint(&pairs(sets.eval_rows(EvalSplit::Heldout))));
        let full = sr2d_rows(&sets.vocab);
        for r in sets.train.iter().chain(sets.eval_rows(EvalSplit::Heldout)) {
            assert_eq!(full[r.unique_id as usize], *r, "SR2D unique_ids are kept");
        }
    }

    #[test]
    fn paper_prompts_are_exactly_the_public_codes() {
        let c = PromptsConfig { train: TrainPrompts::IprPaper, ..PromptsConfig::default() };
        let sets = PromptSets::sr2d(&c).unwrap();
        let mut ids: Vec<u64> = IPR_PAPER_PROMPT_IDS.to_vec();
        ids.sort();
        assert_eq!(sets.train.iter().map(|r| r.unique_id).collect::<Vec<_>>(), ids);
        let paper_pairs: BTreeSet<_> = sets.train.iter().map(|r| row_pair(r, &sets.vocab).unwrap()).collect();
        for split in [EvalSplit::Validation, EvalSplit::Heldout] {
            assert!(sets.eval_rows(split).iter().all(|r| !paper_pairs.contains(&row_pair(r, &sets.vocab).unwrap())));
        }
        let seen: BTreeSet<u64> = sets.eval_rows(EvalSplit::Seen).iter().map(|r| r.unique_id).collect();
        assert!(ids.iter().all(|id| seen.contains(id)), "the training prompts are among the seen prompts");
        let seen_pairs: BTreeSet<_> =
            sets.eval_rows(EvalSplit::Seen).iter().map(|r| row_pair(r, &sets.vocab).unwrap()).collect();
        assert_eq!(seen_pairs, paper_pairs, "seen = the spatial prompts of the pairs sampled in training");
        assert_eq!(seen.len(), paper_pairs.len() * 8);
    }

    #[test]
    fn truncation_and_tables() {
        let sets = PromptSets::sr2d(&PromptsConfig::default()).unwrap().truncated(10, 4);
        assert_eq!(sets.train.len(), 10);
        assert!(sets.eval.iter().all(|(_, r)| r.len() == 4));
        let dir = tempfile::tempdir().unwrap();
        let paths = sets.write_tables(dir.path()).unwrap();
        let names: Vec<_> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["train.json", "seen.json", "validation.json", "heldout.json"]);
        assert_eq!(ipr_core::sr2d::read_rows(&paths[3]).unwrap(), sets.eval_rows(EvalSplit::Heldout));
        let toy = PromptSets::toy();
        assert_eq!(toy.splits(), [EvalSplit::Seen, EvalSplit::Validation, EvalSplit::Heldout]);
        assert_eq!(
            (toy.train.len(), toy.eval_rows(EvalSplit::Validation).len(), toy.eval_rows(EvalSplit::Heldout).len()),
            (112, 56, 56)
        );
    }
}
