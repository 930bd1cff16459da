//! A seeded split of a vocabulary's unordered object pairs into training, validation and
//! held-out pairs, and the SR2D prompts of each side.
//!
//! IPR samples and trains only on prompts over training pairs. Settings are chosen on the
//! validation pairs; the held-out pairs are only reported, so a number on them is not tuned on
//! them. Splitting by *pair* (not by prompt) keeps every ordering and relation of a pair on one
//! side: a held-out pair is one the model never saw named together in training.
//!
//! The rule is fixed and seeded: the pairs are shuffled with a SplitMix64 Fisher-Yates (raw
//! 64-bit draws, no library range sampling whose algorithm could change), the first
//! `round(n * validation)` shuffled pairs go to validation, the next `round(n * heldout)` to
//! held-out, the rest to training. Pairs that must be trained on (the public code's 100
//! prompts, [`IPR_PAPER_PROMPT_IDS`]) are taken out before the shuffle and put in training.
//! Each side lists its pairs in `itertools.combinations` order.

use crate::sr2d::{PromptRow, RelType};
use crate::vocab::{ObjectId, Vocabulary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// An unordered pair of objects, `.0 < .1`.
pub type Pair = (ObjectId, ObjectId);

/// The 100 SR2D `unique_id`s the public IPR code samples and trains on (ipr-reference.md,
/// section 5): all two-object spatial prompts over COCO-80.
pub const IPR_PAPER_PROMPT_IDS: [u64; 100] = [
    19100, 24653, 29131, 8606, 17652, 6603, 26515, 22815, 7904, 6486, 26363, 22495, 18253, 12812, 20714, 29841, 23283,
    29120, 23113, 810, 9942, 22356, 3792, 7257, 29971, 20086, 20727, 10321, 2084, 27141, 30955, 29633, 23544, 13352,
    27244, 19973, 7646, 21186, 7366, 17831, 8001, 12373, 12046, 8966, 7264, 15896, 29727, 5257, 4254, 8754, 17066,
    7170, 26186, 16226, 8341, 10516, 25814, 887, 19792, 24514, 3937, 27667, 19794, 7335, 21865, 5416, 14686, 31510,
    27552, 18714, 14405, 4381, 23780, 22884, 22461, 21636, 14555, 18915, 10811, 19134, 3344, 13642, 21645, 16896,
    22927, 6431, 29065, 1824, 14972, 8963, 13984, 26053, 22416, 11271, 28697, 17604, 18051, 5015, 15407, 6465,
];

/// One side of a pair split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairSide {
    Train,
    Validation,
    Heldout,
}

/// Every unordered pair of `n` objects in `itertools.combinations` order.
pub fn all_pairs(n: usize) -> Vec<Pair> {
    (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).collect()
}

/// The unordered pair of a row's two objects (`None` for single-object rows or unknown names).
pub fn row_pair(row: &PromptRow, vocab: &Vocabulary) -> Option<Pair> {
    let a = vocab.id(row.obj1()?)?;
    let b = vocab.id(row.obj2()?)?;
    Some((a.min(b), a.max(b)))
}

/// How to split: the seed and the fractions of all pairs given to validation and held-out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitRule {
    pub seed: u64,
    pub validation: f64,
    pub heldout: f64,
}

impl SplitRule {
    /// The fractions must each be in [0, 1) and sum to less than 1.
    pub fn check(&self) -> Result<(), String> {
        let frac_ok = |f: f64| f.is_finite() && (0.0..1.0).contains(&f);
        if !frac_ok(self.validation) || !frac_ok(self.heldout) || self.validation + self.heldout >= 1.0 {
            return Err(format!(
                "validation fraction {} and held-out fraction {} must each be in [0, 1) and sum to less than 1",
                self.validation, self.heldout
            ));
        }
        Ok(())
    }
}

/// A split of all pairs of a vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSplit {
    pub train: Vec<Pair>,
    pub validation: Vec<Pair>,
    pub heldout: Vec<Pair>,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl PairSplit {
    /// Splits the pairs of `num_objects` objects by `rule`, with `forced_train` pairs always on
    /// the training side. Errors when the fractions are not in [0, 1) or leave no training pair.
    pub fn new(num_objects: usize, rule: SplitRule, forced_train: &BTreeSet<Pair>) -> Result<Self, String> {
        rule.check()?;
        let all = all_pairs(num_objects);
        let n = all.len();
        let mut free: Vec<Pair> = all.iter().copied().filter(|p| !forced_train.contains(p)).collect();
        let mut state = rule.seed;
        for i in (1..free.len()).rev() {
            let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
            free.swap(i, j);
        }
        let n_val = ((n as f64 * rule.validation).round() as usize).min(free.len());
        let n_held = ((n as f64 * rule.heldout).round() as usize).min(free.len() - n_val);
        let mut validation = free[..n_val].to_vec();
        let mut heldout = free[n_val..n_val + n_held].to_vec();
        validation.sort();
        heldout.sort();
        let train: Vec<Pair> = all
            .into_iter()
            .filter(|p| validation.binary_search(p).is_err() && heldout.binary_search(p).is_err())
            .collect();
        if train.is_empty() {
            return Err("the split leaves no training pair".into());
        }
        Ok(Self { train, validation, heldout })
    }

    pub fn pairs(&self, side: PairSide) -> &[Pair] {
        match side {
            PairSide::Train => &self.train,
            PairSide::Validation => &self.validation,
            PairSide::Heldout => &self.heldout,
        }
    }

    /// The side `pair` is on.
    pub fn side_of(&self, pair: Pair) -> Option<PairSide> {
        let p = (pair.0.min(pair.1), pair.0.max(pair.1));
        [PairSide::Train, PairSide::Validation, PairSide::Heldout]
            .into_iter()
            .find(|&s| self.pairs(s).binary_search(&p).is_ok())
    }

    /// The spatial rows of `rows` whose pair is on `side`, in table order (ids kept).
    pub fn spatial_rows(&self, rows: &[PromptRow], vocab: &Vocabulary, side: PairSide) -> Vec<PromptRow> {
        rows.iter()
            .filter(|r| matches!(r.rel(), Ok(RelType::Spatial(_))))
            .filter(|r| row_pair(r, vocab).is_some_and(|p| self.side_of(p) == Some(side)))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sr2d::sr2d_rows;

    fn rule() -> SplitRule {
        SplitRule { seed: 7, validation: 0.1, heldout: 0.1 }
    }

    #[test]
    fn coco_split_is_disjoint_complete_and_sized() {
        let s = PairSplit::new(80, rule(), &BTreeSet::new()).unwrap();
        assert_eq!((s.train.len(), s.validation.len(), s.heldout.len()), (2528, 316, 316));
        let mut all: Vec<Pair> = s.train.iter().chain(&s.validation).chain(&s.heldout).copied().collect();
        all.sort();
        assert_eq!(all, all_pairs(80), "every pair on exactly one side");
        assert_eq!(PairSplit::new(80, rule(), &BTreeSet::new()).unwrap(), s, "the same seed gives the same split");
        let other = PairSplit::new(80, SplitRule { seed: 8, ..rule() }, &BTreeSet::new()).unwrap();
        assert_ne!(other.heldout, s.heldout);
    }

    /// Pins the rule: a change of the shuffle would silently change every reported number.
    #[test]
    fn split_is_pinned() {
        let s = PairSplit::new(80, SplitRule { seed: 0, validation: 0.1, heldout: 0.1 }, &BTreeSet::new()).unwrap();
        let v = Vocabulary::coco80();
        let names = |p: &[Pair]| {
            p.iter().rev().take(3).map(|&(a, b)| format!("{}/{}", v.name(a), v.name(b))).collect::<Vec<_>>()
        };
        // A fingerprint of the whole split besides its last three pairs.
        let sum = |p: &[Pair]| p.iter().map(|&(a, b)| a * 80 + b).sum::<usize>();
        let got = (names(&s.validation), names(&s.heldout), sum(&s.validation), sum(&s.heldout));
        let want = (
            vec!["scissors/toothbrush".to_string(), "clock/teddy bear".into(), "refrigerator/hair drier".into()],
            vec!["clock/vase".to_string(), "book/hair drier".into(), "book/teddy bear".into()],
            708_060,
            671_727,
        );
        assert_eq!(got, want);
    }

    #[test]
    fn paper_prompts_stay_in_training_and_rows_keep_ids() {
        let v = Vocabulary::coco80();
        let rows = sr2d_rows(&v);
        let forced: BTreeSet<Pair> =
            IPR_PAPER_PROMPT_IDS.iter().map(|&id| row_pair(&rows[id as usize], &v).unwrap()).collect();
        assert!(IPR_PAPER_PROMPT_IDS.iter().all(|&id| matches!(rows[id as usize].rel(), Ok(RelType::Spatial(_)))));
        assert_eq!(rows[19100].text, "a frisbee to the left of a cake");
        assert_eq!(rows[810].text, "a bicycle to the left of an airplane");
        let s = PairSplit::new(80, rule(), &forced).unwrap();
        for p in &forced {
            assert_eq!(s.side_of(*p), Some(PairSide::Train));
        }
        let held = s.spatial_rows(&rows, &v, PairSide::Heldout);
        assert_eq!(held.len(), 316 * 8, "8 spatial prompts per pair");
        for r in &held {
            assert_eq!(rows[r.unique_id as usize], *r, "ids are the full table's");
            assert!(!forced.contains(&row_pair(r, &v).unwrap()));
        }
    }

    #[test]
    fn bad_fractions_are_errors() {
        for (val, held) in [(0.5, 0.5), (-0.1, 0.1), (f64::NAN, 0.1), (0.1, 1.0)] {
            let e = PairSplit::new(80, SplitRule { seed: 0, validation: val, heldout: held }, &BTreeSet::new());
            assert!(e.is_err(), "{val} {held}");
        }
        assert!(PairSplit::new(80, SplitRule { seed: 0, validation: 0.0, heldout: 0.0 }, &BTreeSet::new()).is_ok());
    }
}
