//! The training methods compared in the same harness, as transformations of a judged round.
//!
//! All four see the same samples, detections and verdicts; they differ only in what is trained
//! on (the `labelled/` rows of each round):
//! - `ipr`: relabeled captions with the feedback weights, accumulated over every round
//!   (Iterative Prompt Relabeling, Chen et al. 2023);
//! - `pr`: the same for a single round (Prompt Relabeling, the paper's ablation);
//! - `filter`: only the correct pairs, original prompts, weight 1 (rejection-sampling
//!   fine-tuning);
//! - `weighted`: every pair with its original prompt and its feedback weight, no relabeling
//!   (reward-weighted regression);
//! - `ddpo`: no supervised set at all: the judge's verdict is the reward of a policy-gradient
//!   update of the sampling chain (Black et al. 2023), from the same samples ([`Reward`]).

use crate::dataset::LabelledRow;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Ipr,
    Pr,
    Filter,
    Weighted,
    Ddpo,
}

impl Method {
    pub const ALL: [Method; 5] = [Method::Ipr, Method::Pr, Method::Filter, Method::Weighted, Method::Ddpo];

    pub fn name(self) -> &'static str {
        match self {
            Method::Ipr => "ipr",
            Method::Pr => "pr",
            Method::Filter => "filter",
            Method::Weighted => "weighted",
            Method::Ddpo => "ddpo",
        }
    }

    /// Whether the method learns by policy gradient from rewards (not from a labelled set).
    pub fn is_reinforcement(self) -> bool {
        self == Method::Ddpo
    }

    /// Rounds of sampling and training the method runs when `rounds` are asked for.
    pub fn rounds(self, rounds: u32) -> u32 {
        match self {
            Method::Pr => rounds.min(1),
            _ => rounds,
        }
    }

    /// The rows trained on, from a round's labelled rows (`ddpo` trains on none: see [`Reward`]);
    /// `ipr` and `pr` treat each kind of error as `treatments` says (the paper: both relabeled).
    pub fn training_rows(self, rows: &[LabelledRow], treatments: &Treatments) -> Vec<LabelledRow> {
        match self {
            Method::Ipr | Method::Pr => rows.iter().flat_map(|r| treatments.apply(r)).collect(),
            Method::Ddpo => Vec::new(),
            Method::Filter => {
                rows.iter().filter(|r| r.correct).map(|r| LabelledRow { weight: 1.0, ..r.clone() }).collect()
            }
            Method::Weighted => {
                rows.iter().map(|r| LabelledRow { prompt: r.original_prompt.clone(), ..r.clone() }).collect()
            }
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown method {s:?}: expected one of ipr, pr, filter, weighted, ddpo"))
    }
}

/// What `ipr` trains on for a pair the judge found wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Treatment {
    /// The relabeled caption (what the image shows), with the feedback weight: the paper's.
    #[default]
    Relabel,
    /// The original prompt with the feedback weight (as `weighted` trains every pair).
    Original,
    /// The original prompt when VISOR counts the image right (the right pair in the right
    /// relation, beside an extra object), else the relabeled caption. Count errors only.
    OriginalIfVisor,
    /// Not trained on.
    Drop,
    /// Both the relabeled caption and the original prompt, each with the feedback weight:
    /// IPR's rows and `weighted`'s rows of the same image.
    Both,
}

/// `ipr`'s treatment of location errors and of count errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Treatments {
    pub location: Treatment,
    pub count: Treatment,
}

impl Treatments {
    /// The rows trained on for one judged image: none when it is dropped, two for `both`.
    /// Correct pairs are kept as they are.
    pub fn apply(&self, r: &LabelledRow) -> Vec<LabelledRow> {
        let t = match r.reason {
            crate::relabel::Reason::Correct => return vec![r.clone()],
            crate::relabel::Reason::Location => self.location,
            crate::relabel::Reason::Count => self.count,
        };
        let original = LabelledRow { prompt: r.original_prompt.clone(), ..r.clone() };
        match t {
            Treatment::Relabel => vec![r.clone()],
            Treatment::Original => vec![original],
            Treatment::OriginalIfVisor if r.visor_correct => vec![original],
            Treatment::OriginalIfVisor => vec![r.clone()],
            Treatment::Drop => vec![],
            Treatment::Both => vec![r.clone(), original],
        }
    }

    /// Checks the combination (`original-if-visor` concerns count errors: a location error is
    /// never right by VISOR's test).
    pub fn validate(&self) -> Result<(), String> {
        if self.location == Treatment::OriginalIfVisor {
            return Err(
                "relabel.location cannot be \"original-if-visor\": a location error is never right by VISOR's test"
                    .into(),
            );
        }
        Ok(())
    }
}

/// DDPO's reward of an image, from the judge's verdict on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reward {
    /// VISOR's test: both objects found and the relation holds for some pair of boxes (what the
    /// evaluation measures).
    #[default]
    Visor,
    /// IPR's strict judge: exactly one box of each object, and the relation holds.
    Strict,
}

/// The reward (1 or 0) of each detected image of a spatial prompt, in order.
pub fn rewards(
    rows: &[crate::dataset::DetectionRow],
    vocab: &crate::Vocabulary,
    kind: Reward,
) -> Result<Vec<f64>, String> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let prompt = crate::Prompt::parse(&row.prompt, vocab).map_err(|m| format!("record {}: {m}", i + 1))?;
            let v =
                crate::judge::judge(&prompt, &row.detections, vocab).map_err(|m| format!("record {}: {m}", i + 1))?;
            let right = match kind {
                Reward::Visor => v.all_found() && v.visor_sra,
                Reward::Strict => v.outcome() == crate::judge::Outcome::Correct,
            };
            Ok(f64::from(u8::from(right)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relabel::Reason;

    fn row(prompt: &str, original: &str, correct: bool, reason: Reason, weight: f64) -> LabelledRow {
        LabelledRow {
            file_name: format!("{original}.png"),
            prompt: prompt.into(),
            original_prompt: original.into(),
            correct,
            reason,
            weight,
            round: 0,
            visor_correct: false,
        }
    }

    #[test]
    fn each_method_trains_on_what_it_says() {
        let rows = [
            row("a cat above a dog", "a cat above a dog", true, Reason::Correct, 1.0),
            row("a cat below a dog", "a cat above a dog", false, Reason::Location, 0.5),
            row("2 cats", "a cat to the left of a dog", false, Reason::Count, 0.5),
        ];
        assert_eq!(Method::Ipr.training_rows(&rows, &Treatments::default()), rows.to_vec());
        assert_eq!(Method::Pr.training_rows(&rows, &Treatments::default()), rows.to_vec());
        let f = Method::Filter.training_rows(&rows, &Treatments::default());
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].prompt.as_str(), f[0].weight), ("a cat above a dog", 1.0));
        let w = Method::Weighted.training_rows(&rows, &Treatments::default());
        let got: Vec<_> = w.iter().map(|r| (r.prompt.as_str(), r.weight)).collect();
        assert_eq!(got, [("a cat above a dog", 1.0), ("a cat above a dog", 0.5), ("a cat to the left of a dog", 0.5)]);
        assert_eq!((Method::Pr.rounds(3), Method::Ipr.rounds(3)), (1, 3));
        assert_eq!("filter".parse::<Method>(), Ok(Method::Filter));
        assert!("dpo".parse::<Method>().unwrap_err().contains("dpo"));
        assert_eq!("ddpo".parse::<Method>(), Ok(Method::Ddpo));
        assert!(
            Method::Ddpo.training_rows(&rows, &Treatments::default()).is_empty() && Method::Ddpo.is_reinforcement()
        );
    }

    #[test]
    fn treatments_choose_what_ipr_trains_on_for_each_error() {
        let mut extra = row("an apple and 2 dogs", "an apple to the left of a dog", false, Reason::Count, 0.5);
        extra.visor_correct = true;
        let rows = [
            row("a cat above a dog", "a cat above a dog", true, Reason::Correct, 1.0),
            row("a cat below a dog", "a cat above a dog", false, Reason::Location, 0.5),
            row("2 cats", "a cat to the left of a dog", false, Reason::Count, 0.5),
            extra,
        ];
        let t = |location, count| Method::Ipr.training_rows(&rows, &Treatments { location, count });
        let prompts = |v: Vec<LabelledRow>| v.into_iter().map(|r| r.prompt).collect::<Vec<_>>();
        assert_eq!(prompts(t(Treatment::Relabel, Treatment::Relabel)).len(), 4);
        assert_eq!(
            prompts(t(Treatment::Relabel, Treatment::Original)),
            ["a cat above a dog", "a cat below a dog", "a cat to the left of a dog", "an apple to the left of a dog"]
        );
        assert_eq!(
            prompts(t(Treatment::Relabel, Treatment::OriginalIfVisor)),
            ["a cat above a dog", "a cat below a dog", "2 cats", "an apple to the left of a dog"]
        );
        assert_eq!(prompts(t(Treatment::Drop, Treatment::Drop)), ["a cat above a dog"]);
        assert_eq!(
            prompts(t(Treatment::Both, Treatment::Drop)),
            ["a cat above a dog", "a cat below a dog", "a cat above a dog"]
        );
        let both = t(Treatment::Both, Treatment::Both);
        assert_eq!(both.len(), 7, "each wrong image twice, the correct one once");
        assert!(both.iter().skip(1).all(|r| r.weight == 0.5), "both rows keep the feedback weight");
        assert!(t(Treatment::Original, Treatment::Drop).iter().all(|r| r.weight == 1.0 || r.weight == 0.5));
        assert!(Treatments { location: Treatment::OriginalIfVisor, count: Treatment::Relabel }.validate().is_err());
    }

    #[test]
    fn rewards_follow_the_judge() {
        use crate::dataset::DetectionRow;
        use crate::detection::{BBox, Detection};
        let det = |l: &str, x: f64| Detection::new(l, 0.9, BBox::new(x, 0.0, x + 2.0, 2.0).unwrap()).unwrap();
        let row = |d: Vec<Detection>| DetectionRow {
            file_name: "x.png".into(),
            prompt_id: 0,
            prompt: "a cat to the left of a dog".into(),
            image_index: 0,
            detections: d,
        };
        let rows = [
            row(vec![det("cat", 0.0), det("dog", 10.0)]),                   // right
            row(vec![det("cat", 0.0), det("dog", 10.0), det("dog", 20.0)]), // right by VISOR, an extra dog
            row(vec![det("cat", 10.0), det("dog", 0.0)]),                   // relation wrong
            row(vec![det("cat", 0.0)]),                                     // dog missing
        ];
        let v = crate::Vocabulary::coco80();
        assert_eq!(rewards(&rows, &v, Reward::Visor).unwrap(), [1.0, 1.0, 0.0, 0.0]);
        assert_eq!(rewards(&rows, &v, Reward::Strict).unwrap(), [1.0, 0.0, 0.0, 0.0]);
    }
}
