//! The fixed split of object pairs into training, validation and held-out pairs, and the toy SR2D
//! prompt lists of each split.
//!
//! IPR trains only on prompts over training pairs; validation pairs are for choosing settings,
//! held-out pairs only for reporting, to show whether what IPR teaches carries over to object
//! pairs it never trained on, without the choice of settings having seen them. The split is
//! drawn once from [`SPLIT_SEED`] and is part of the project's definition: changing it changes
//! every reported number, so a regression test pins it.
//!
//! Prompts are VISOR's SR2D rows over the toy vocabulary ([`ipr_core::sr2d`]: ten consecutive
//! ids per pair in `itertools.combinations` order, then one single-object row per class). A row
//! keeps its `unique_id` from the full list when a split's list is taken from it, so ids mean
//! the same thing in every split and file.

use crate::classes::{vocabulary, NUM_CLASSES};
use ipr_core::sr2d::{PromptRow, RelType};
use ipr_core::ObjectId;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The seed of the project's pair split.
pub const SPLIT_SEED: u64 = 20_231_227;
/// Number of held-out pairs: a quarter of the 28 unordered pairs.
pub const NUM_HELD_OUT: usize = 7;
/// No class is in more than this many held-out pairs (nor validation pairs), so every class
/// keeps at least three of its seven pairs for training: held-out and validation prompts then
/// test new combinations of trained objects, not objects IPR hardly saw.
pub const MAX_HELD_OUT_PER_CLASS: usize = 2;
/// Number of validation pairs: as many as held-out, drawn after them from the same shuffle, so
/// the held-out pairs are those of the earlier two-way split.
pub const NUM_VALIDATION: usize = 7;

/// Prompts per pair in the SR2D layout: 4 relations x 2 orders + 2 "and" prompts.
pub const PROMPTS_PER_PAIR: usize = 10;

/// Which side of the split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Validation,
    HeldOut,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::HeldOut];

    /// "train", "validation" or "held_out", the names used in metrics files.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::HeldOut => "held_out",
        }
    }
}

/// An unordered pair of classes, `.0 < .1`.
pub type Pair = (ObjectId, ObjectId);

/// Every unordered pair of classes in `itertools.combinations` order.
pub fn all_pairs() -> Vec<Pair> {
    (0..NUM_CLASSES).flat_map(|i| (i + 1..NUM_CLASSES).map(move |j| (i, j))).collect()
}

/// A split of [`all_pairs`] into training, validation and held-out pairs, each in combinations
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSplit {
    train: Vec<Pair>,
    validation: Vec<Pair>,
    held_out: Vec<Pair>,
}

impl PairSplit {
    /// The project's split (seed [`SPLIT_SEED`]).
    pub fn fixed() -> PairSplit {
        PairSplit::with_seed(SPLIT_SEED)
    }

    /// A split drawn from `seed`: the pairs are shuffled, then taken in shuffled order into the
    /// held-out set while they respect [`MAX_HELD_OUT_PER_CLASS`], until it has
    /// [`NUM_HELD_OUT`]; then, from the pairs left, in the same order and under the same cap,
    /// into the validation set until it has [`NUM_VALIDATION`]. The shuffle uses raw ChaCha8
    /// output (not `rand`'s range sampling, whose algorithm may change between versions) so the
    /// split is the same everywhere.
    pub fn with_seed(seed: u64) -> PairSplit {
        let mut pairs = all_pairs();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for i in (1..pairs.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            pairs.swap(i, j);
        }
        let mut held_out = draw(&pairs, NUM_HELD_OUT);
        assert_eq!(held_out.len(), NUM_HELD_OUT, "the greedy draw always fills the held-out set");
        let mut left: Vec<Pair> = pairs.iter().filter(|p| !held_out.contains(p)).copied().collect();
        let validation = loop {
            let validation = draw(&left, NUM_VALIDATION);
            if validation.len() == NUM_VALIDATION {
                break validation;
            }
            // The greedy draw got stuck under the cap (a few seeds): draw again from a reshuffle.
            for i in (1..left.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                left.swap(i, j);
            }
        };
        let mut validation = validation;
        held_out.sort();
        validation.sort();
        let train = all_pairs().into_iter().filter(|p| !held_out.contains(p) && !validation.contains(p)).collect();
        PairSplit { train, validation, held_out }
    }

    /// The pairs of one side, in combinations order.
    pub fn pairs(&self, split: Split) -> &[Pair] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::HeldOut => &self.held_out,
        }
    }

    /// The side of the split a pair of classes (in either order) is on; `None` for a class
    /// paired with itself.
    pub fn split_of(&self, a: ObjectId, b: ObjectId) -> Option<Split> {
        let p = (a.min(b), a.max(b));
        if self.held_out.contains(&p) {
            Some(Split::HeldOut)
        } else if self.validation.contains(&p) {
            Some(Split::Validation)
        } else if self.train.contains(&p) {
            Some(Split::Train)
        } else {
            None
        }
    }

    /// The SR2D rows (spatial and "and") of one side's pairs, with their ids in [`sr2d_rows`].
    pub fn rows(&self, split: Split) -> Vec<PromptRow> {
        let vocab = vocabulary();
        sr2d_rows()
            .into_iter()
            .filter(|row| {
                let (a, b) = (row.obj1().and_then(|n| vocab.id(n)), row.obj2().and_then(|n| vocab.id(n)));
                matches!((a, b), (Some(a), Some(b)) if self.split_of(a, b) == Some(split))
            })
            .collect()
    }

    /// The spatial rows (4 relations x both orders) of one side's pairs: what VISOR scores.
    pub fn spatial_rows(&self, split: Split) -> Vec<PromptRow> {
        self.rows(split).into_iter().filter(|r| matches!(r.rel(), Ok(RelType::Spatial(_)))).collect()
    }
}

/// Up to `n` of `pairs`, taken in order while no class is in more than
/// [`MAX_HELD_OUT_PER_CLASS`] of the ones taken.
fn draw(pairs: &[Pair], n: usize) -> Vec<Pair> {
    let mut per_class = [0usize; NUM_CLASSES];
    let mut out = Vec::new();
    for &(a, b) in pairs {
        if out.len() < n && per_class[a] < MAX_HELD_OUT_PER_CLASS && per_class[b] < MAX_HELD_OUT_PER_CLASS {
            per_class[a] += 1;
            per_class[b] += 1;
            out.push((a, b));
        }
    }
    out
}

/// The full toy SR2D list ([`ipr_core::sr2d`] over the toy vocabulary): 28 pairs x 10
/// prompts, then 8 single-object prompts; 288 rows, 224 of them spatial.
pub fn sr2d_rows() -> Vec<PromptRow> {
    ipr_core::sr2d::sr2d_rows(&vocabulary())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classes::vocabulary;

    #[test]
    fn the_split_is_fixed() {
        let s = PairSplit::fixed();
        assert_eq!(s.pairs(Split::Train).len(), 14);
        assert_eq!(s.pairs(Split::Validation).len(), 7);
        assert_eq!(s.pairs(Split::HeldOut).len(), 7);
        let v = vocabulary();
        let names = |split| {
            s.pairs(split).iter().map(|&(a, b)| format!("{}+{}", v.name(a), v.name(b))).collect::<Vec<_>>().join(" ")
        };
        // The held-out pairs, spelled out: a change here changes every held-out number.
        assert_eq!(
            names(Split::HeldOut),
            "apple+carrot apple+leaf carrot+flower leaf+tree tree+candle bubble+box candle+flower"
        );
        assert_eq!(
            names(Split::Validation),
            "apple+box carrot+tree carrot+box leaf+candle leaf+flower tree+bubble bubble+candle"
        );
        let checksum = names(Split::Train)
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        assert_eq!(checksum, 15_974_529_186_351_382_567, "FNV-1a of the training pair list");
        assert_eq!(PairSplit::with_seed(SPLIT_SEED), s);
        assert_ne!(PairSplit::with_seed(1), s);
    }

    #[test]
    fn sides_are_disjoint_and_cover_all_pairs() {
        for seed in 0..200 {
            let s = PairSplit::with_seed(seed);
            let (train, val, held) = (s.pairs(Split::Train), s.pairs(Split::Validation), s.pairs(Split::HeldOut));
            assert_eq!((val.len(), held.len()), (NUM_VALIDATION, NUM_HELD_OUT), "seed {seed}");
            assert!(train.iter().all(|p| !held.contains(p) && !val.contains(p)));
            assert!(val.iter().all(|p| !held.contains(p)));
            let mut all: Vec<Pair> = train.iter().chain(val).chain(held).copied().collect();
            all.sort();
            assert_eq!(all, all_pairs());
            for c in 0..NUM_CLASSES {
                let n = |side: &[Pair]| side.iter().filter(|p| p.0 == c || p.1 == c).count();
                assert!(n(held) <= MAX_HELD_OUT_PER_CLASS && n(val) <= MAX_HELD_OUT_PER_CLASS);
                assert!(n(train) >= 3, "seed {seed}: class {c} keeps {} training pairs", n(train));
            }
            assert_eq!(s.split_of(held[0].1, held[0].0), Some(Split::HeldOut));
            assert_eq!(s.split_of(2, 2), None);
        }
    }

    #[test]
    fn prompt_lists_follow_visor_order() {
        let v = vocabulary();
        let all = sr2d_rows();
        assert_eq!(all.len(), 28 * PROMPTS_PER_PAIR + 8);
        let text = |i: usize| all[i].text.as_str();
        assert_eq!(text(0), "an apple to the left of a carrot");
        assert_eq!(text(1), "a carrot to the left of an apple");
        assert_eq!(text(7), "a carrot below an apple");
        assert_eq!(text(8), "an apple and a carrot");
        assert_eq!(text(10), "an apple to the left of a leaf");
        assert_eq!(text(287), "a flower");
        let s = PairSplit::fixed();
        let (train, held) = (s.spatial_rows(Split::Train), s.spatial_rows(Split::HeldOut));
        assert_eq!((train.len(), s.spatial_rows(Split::Validation).len(), held.len()), (14 * 8, 7 * 8, 7 * 8));
        assert_eq!((s.rows(Split::Train).len(), s.rows(Split::HeldOut).len()), (14 * 10, 7 * 10));
        for row in train.iter().chain(&held) {
            assert_eq!(all[row.unique_id as usize], *row, "ids are those of the full list");
            assert!(matches!(row.prompt(&v), Ok(ipr_core::Prompt::Spatial { .. })));
        }
        assert!(train.iter().all(|p| !held.iter().any(|q| q.text == p.text)));
        assert_eq!(held[0].text, "an apple to the left of a carrot");
    }
}
