//! Relabel policies and loss weights: a judged (image, prompt) pair -> a training example.
//!
//! - `paper`: the public IPR code's rules exactly (`metrics/glip_spacial_correctness.py` with
//!   `--change_prompt`), for reproduction. Its captions are ungrammatical ("2 dog and 1 cat",
//!   "a apple", "0 dog") and its location fix is a guess: the opposite of the prompt's relation,
//!   false when the objects stand on the other axis.
//! - `measured` (default): a location error is relabeled with the relation actually observed
//!   (dominant axis of the centre offset), or "a A and a B" when the centres coincide; a count
//!   error gets a grammatical count caption of what was found; an image where neither object
//!   was found says nothing usable about the prompt and is dropped.
//!
//! Weights follow the paper's reward-rescaled loss: 1.0 for a correct pair, 0.5 for a
//! relabeled one, configurable per outcome.

use crate::judge::{Outcome, Verdict};
use crate::prompt::Prompt;
use crate::vocab::Vocabulary;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelabelPolicy {
    /// The public IPR code's rules, verbatim.
    Paper,
    /// Relabel from what was measured, with grammatical captions.
    #[default]
    Measured,
}

impl FromStr for RelabelPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "paper" => Ok(Self::Paper),
            "measured" => Ok(Self::Measured),
            _ => Err(format!("unknown relabel policy {s:?}: expected \"paper\" or \"measured\"")),
        }
    }
}

impl fmt::Display for RelabelPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Paper => "paper",
            Self::Measured => "measured",
        })
    }
}

/// Per-sample loss weights by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    pub correct: f64,
    pub relabeled_location: f64,
    pub relabeled_count: f64,
}

impl Default for Weights {
    /// The paper's: 1.0 correct, 0.5 relabeled.
    fn default() -> Self {
        Self { correct: 1.0, relabeled_location: 0.5, relabeled_count: 0.5 }
    }
}

impl Weights {
    pub fn validate(&self) -> Result<(), String> {
        for (key, w) in [
            ("correct", self.correct),
            ("relabeled_location", self.relabeled_location),
            ("relabeled_count", self.relabeled_count),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(format!("weights.{key} is {w}, expected a finite number >= 0"));
            }
        }
        Ok(())
    }
}

/// Why a pair got its label (the `reason` column of a labelled set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    Correct,
    Location,
    Count,
}

/// A judged pair ready for training: the caption to train on and its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Relabeled {
    pub prompt: String,
    pub correct: bool,
    pub reason: Reason,
    pub weight: f64,
}

/// Relabel one judged pair. `None`: the pair is dropped (measured policy, nothing found).
pub fn relabel(
    policy: RelabelPolicy,
    weights: &Weights,
    prompt: &Prompt,
    verdict: &Verdict,
    vocab: &Vocabulary,
) -> Option<Relabeled> {
    let outcome = verdict.outcome();
    let (text, reason, weight) = match outcome {
        Outcome::Correct => (prompt.render(vocab), Reason::Correct, weights.correct),
        Outcome::CountError => {
            let text = match policy {
                RelabelPolicy::Paper => paper_count_caption(prompt, verdict, vocab),
                RelabelPolicy::Measured => measured_count_caption(prompt, verdict)?.render(vocab),
            };
            (text, Reason::Count, weights.relabeled_count)
        }
        Outcome::LocationError => {
            let Prompt::Spatial { a, relation, b } = *prompt else {
                unreachable!("only spatial prompts have location errors")
            };
            let text = match policy {
                RelabelPolicy::Paper => {
                    format!("a {} {} a {}", vocab.name(a), relation.opposite().phrase(), vocab.name(b))
                }
                RelabelPolicy::Measured => match verdict.observed {
                    Some(observed) => Prompt::Spatial { a, relation: observed, b }.render(vocab),
                    None => Prompt::And { a, b }.render(vocab),
                },
            };
            (text, Reason::Location, weights.relabeled_location)
        }
    };
    Some(Relabeled { prompt: text, correct: outcome == Outcome::Correct, reason, weight })
}

/// The paper's count caption, byte for byte: "{n1} {A} and {n2} {B}" when both are present,
/// else "{n2} {B}" when A is missing (even when B is missing too: "0 {B}"), else "{n1} {A}".
fn paper_count_caption(prompt: &Prompt, verdict: &Verdict, vocab: &Vocabulary) -> String {
    let objects = prompt.objects();
    let (c1, name1) = (verdict.count_a, vocab.name(objects[0]));
    let Some(c2) = verdict.count_b else {
        return format!("{c1} {name1}");
    };
    let name2 = vocab.name(objects[1]);
    if c1 != 0 && c2 != 0 {
        format!("{c1} {name1} and {c2} {name2}")
    } else if c1 == 0 {
        format!("{c2} {name2}")
    } else {
        format!("{c1} {name1}")
    }
}

/// What was found, as a grammatical count caption ("2 dogs and a cat", "a cat"); objects found
/// zero times are left out. `None` when nothing was found.
fn measured_count_caption(prompt: &Prompt, verdict: &Verdict) -> Option<Prompt> {
    let objects = prompt.objects();
    let counts: Vec<_> = [Some(verdict.count_a), verdict.count_b]
        .into_iter()
        .zip(objects)
        .filter_map(|(n, id)| n.filter(|&n| n > 0).map(|n| (id, n)))
        .collect();
    (!counts.is_empty()).then(|| Prompt::Count { counts }.canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detection::{BBox, Detection};
    use crate::judge::judge;

    fn det(label: &str, cx: f64, cy: f64) -> Detection {
        Detection::new(label, 0.9, BBox::new(cx - 1.0, cy - 1.0, cx + 1.0, cy + 1.0).unwrap()).unwrap()
    }

    /// Relabel `text` given boxes (label, cx, cy) under both policies.
    fn both(text: &str, boxes: &[(&str, f64, f64)]) -> (Option<Relabeled>, Option<Relabeled>) {
        let v = Vocabulary::coco80();
        let p = Prompt::parse(text, &v).unwrap();
        let d: Vec<_> = boxes.iter().map(|&(l, x, y)| det(l, x, y)).collect();
        let verdict = judge(&p, &d, &v).unwrap();
        let w = Weights::default();
        (relabel(RelabelPolicy::Paper, &w, &p, &verdict, &v), relabel(RelabelPolicy::Measured, &w, &p, &verdict, &v))
    }

    fn text(r: &Option<Relabeled>) -> &str {
        &r.as_ref().unwrap().prompt
    }

    #[test]
    fn correct_pairs_keep_their_prompt() {
        let (p, m) = both("an apple to the left of a dog", &[("apple", 1.0, 5.0), ("dog", 9.0, 5.0)]);
        for r in [p, m] {
            let r = r.unwrap();
            assert_eq!(
                (r.prompt.as_str(), r.correct, r.reason, r.weight),
                ("an apple to the left of a dog", true, Reason::Correct, 1.0)
            );
        }
    }

    #[test]
    fn location_errors() {
        // Horizontal mistake: both policies agree on the relation, only the paper drops grammar.
        let (p, m) = both("an apple to the left of a dog", &[("apple", 9.0, 5.0), ("dog", 1.0, 5.0)]);
        assert_eq!(text(&p), "a apple to the right of a dog");
        assert_eq!(text(&m), "an apple to the right of a dog");
        assert_eq!((m.as_ref().unwrap().reason, m.as_ref().unwrap().weight), (Reason::Location, 0.5));
        // Vertical arrangement for a left/right prompt: the paper's guess is false.
        let (p, m) = both("a cat to the left of a dog", &[("cat", 5.0, 1.0), ("dog", 5.0, 30.0)]);
        assert_eq!(text(&p), "a cat to the right of a dog");
        assert_eq!(text(&m), "a cat above a dog");
        let (p, m) = both("a cat above a dog", &[("cat", 30.0, 6.0), ("dog", 1.0, 5.0)]);
        assert_eq!(text(&p), "a cat below a dog");
        assert_eq!(text(&m), "a cat to the right of a dog");
        // A tie: no relation observable.
        let (p, m) = both("a cat below a dog", &[("cat", 5.0, 5.0), ("dog", 5.0, 5.0)]);
        assert_eq!(text(&p), "a cat above a dog");
        assert_eq!(text(&m), "a cat and a dog");
    }

    #[test]
    fn count_errors() {
        let (p, m) = both("a bench above a dog", &[("bench", 1.0, 1.0), ("bench", 9.0, 1.0), ("dog", 5.0, 9.0)]);
        assert_eq!(text(&p), "2 bench and 1 dog");
        assert_eq!(text(&m), "2 benches and a dog");
        assert_eq!(
            (m.as_ref().unwrap().reason, m.as_ref().unwrap().weight, m.as_ref().unwrap().correct),
            (Reason::Count, 0.5, false)
        );
        // B missing.
        let (p, m) = both("an apple above a dog", &[("apple", 1.0, 1.0)]);
        assert_eq!((text(&p), text(&m)), ("1 apple", "an apple"));
        // A missing, B twice.
        let (p, m) = both("an apple above a mouse", &[("mouse", 1.0, 1.0), ("mouse", 5.0, 1.0)]);
        assert_eq!((text(&p), text(&m)), ("2 mouse", "2 mice"));
        // Both missing: the paper writes "0 {B}", measured drops the pair.
        let (p, m) = both("an apple above a dog", &[]);
        assert_eq!(text(&p), "0 dog");
        assert!(m.is_none());
    }

    #[test]
    fn and_and_single_prompts() {
        let (p, m) = both("a cat and a dog", &[("cat", 1.0, 1.0), ("dog", 1.0, 1.0)]);
        assert_eq!((text(&p), text(&m)), ("a cat and a dog", "a cat and a dog"));
        let (p, m) = both("a cat", &[("cat", 1.0, 1.0), ("cat", 9.0, 1.0)]);
        assert_eq!((text(&p), text(&m)), ("2 cat", "2 cats"));
    }

    #[test]
    fn weights_are_configurable_and_validated() {
        let v = Vocabulary::coco80();
        let p = Prompt::parse("a cat above a dog", &v).unwrap();
        let verdict = judge(&p, &[det("cat", 1.0, 9.0), det("dog", 1.0, 1.0)], &v).unwrap();
        let w = Weights { correct: 1.0, relabeled_location: 0.25, relabeled_count: 0.0 };
        assert_eq!(relabel(RelabelPolicy::Measured, &w, &p, &verdict, &v).unwrap().weight, 0.25);
        assert!(Weights { relabeled_count: -1.0, ..w }.validate().unwrap_err().contains("weights.relabeled_count"));
        assert!(Weights { correct: f64::NAN, ..w }.validate().is_err());
        assert_eq!("paper".parse::<RelabelPolicy>(), Ok(RelabelPolicy::Paper));
        assert!("best".parse::<RelabelPolicy>().unwrap_err().contains("best"));
    }

    #[test]
    fn measured_captions_are_in_the_grammar() {
        // Every measured caption parses back; over all count pairs up to 3.
        let v = Vocabulary::coco80();
        let p = Prompt::parse("a knife below a sheep", &v).unwrap();
        for ca in 0..4 {
            for cb in 0..4 {
                let mut d = Vec::new();
                d.extend((0..ca).map(|i| det("knife", f64::from(i), 1.0)));
                d.extend((0..cb).map(|i| det("sheep", f64::from(i), 9.0)));
                let verdict = judge(&p, &d, &v).unwrap();
                if let Some(r) = relabel(RelabelPolicy::Measured, &Weights::default(), &p, &verdict, &v) {
                    assert!(Prompt::parse(&r.prompt, &v).is_ok(), "{}", r.prompt);
                }
            }
        }
    }
}
