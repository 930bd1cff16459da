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

    /// The rows trained on, from a round's labelled rows (`ddpo` trains on none: see [`Reward`]).
    pub fn training_rows(self, rows: &[LabelledRow]) -> Vec<LabelledRow> {
        match self {
            Method::Ipr | Method::Pr => rows.to_vec(),
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
        }
    }

    #[test]
    fn each_method_trains_on_what_it_says() {
        let rows = [
            row("a cat above a dog", "a cat above a dog", true, Reason::Correct, 1.0),
            row("a cat below a dog", "a cat above a dog", false, Reason::Location, 0.5),
            row("2 cats", "a cat to the left of a dog", false, Reason::Count, 0.5),
        ];
        assert_eq!(Method::Ipr.training_rows(&rows), rows.to_vec());
        assert_eq!(Method::Pr.training_rows(&rows), rows.to_vec());
        let f = Method::Filter.training_rows(&rows);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].prompt.as_str(), f[0].weight), ("a cat above a dog", 1.0));
        let w = Method::Weighted.training_rows(&rows);
        let got: Vec<_> = w.iter().map(|r| (r.prompt.as_str(), r.weight)).collect();
        assert_eq!(got, [("a cat above a dog", 1.0), ("a cat above a dog", 0.5), ("a cat to the left of a dog", 0.5)]);
        assert_eq!((Method::Pr.rounds(3), Method::Ipr.rounds(3)), (1, 3));
        assert_eq!("filter".parse::<Method>(), Ok(Method::Filter));
        assert!("dpo".parse::<Method>().unwrap_err().contains("dpo"));
        assert_eq!("ddpo".parse::<Method>(), Ok(Method::Ddpo));
        assert!(Method::Ddpo.training_rows(&rows).is_empty() && Method::Ddpo.is_reinforcement());
    }
}
