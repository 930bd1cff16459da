//! The judge: one image's detections against its prompt -> a verdict.
//!
//! Two rules are computed side by side:
//! - VISOR's (Gokhale et al.): an object is found when at least one box carries its label;
//!   the relation holds (`sra`) when both are found and **at least one** (A box, B box) pair
//!   satisfies it by centres. Extra instances are allowed.
//! - IPR's strict rule (the paper's `glip_spacial_correctness.py`): exactly one box of A and one
//!   of B, and that pair satisfies the relation.
//!
//! Only boxes labelled with one of the prompt's objects count: the detector is asked for those
//! two names (GLIP's forced entities, VISOR's two queries), so any other label is ignored.

use crate::detection::Detection;
use crate::prompt::Prompt;
use crate::relation::Relation;
use crate::vocab::Vocabulary;

/// What the detections say about a prompt with one or two objects.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Boxes labelled with the first object.
    pub count_a: u32,
    /// Boxes labelled with the second object (`None` for single-object prompts).
    pub count_b: Option<u32>,
    /// The prompt's relation (`None` for "and" and single prompts).
    pub relation: Option<Relation>,
    /// VISOR: both found and at least one box pair satisfies the relation.
    pub visor_sra: bool,
    /// The relation between the highest-scoring A box and the highest-scoring B box, when both
    /// are found (with exactly one of each, the relation of the only pair).
    pub observed: Option<Relation>,
    /// Centres of the found boxes, labels in `labels` order (VISOR's "classes"/"centroid").
    pub labels: Vec<String>,
    pub centers: Vec<(f64, f64)>,
}

/// The strict (IPR) outcome for an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Counts right and, for spatial prompts, the relation holds.
    Correct,
    /// Not exactly one box of each named object.
    CountError,
    /// Counts right, relation wrong.
    LocationError,
}

impl Verdict {
    /// VISOR's `recall`: how many of the prompt's objects were found (0, 1 or 2).
    pub fn recall(&self) -> u32 {
        u32::from(self.count_a > 0) + u32::from(self.count_b.is_some_and(|n| n > 0))
    }

    /// Every named object found (VISOR's "both detected" for two-object prompts).
    pub fn all_found(&self) -> bool {
        self.count_a > 0 && self.count_b.is_none_or(|n| n > 0)
    }

    /// IPR's strict count check: exactly one box of each named object.
    pub fn count_ok(&self) -> bool {
        self.count_a == 1 && self.count_b.is_none_or(|n| n == 1)
    }

    /// IPR's strict judgement.
    pub fn outcome(&self) -> Outcome {
        if !self.count_ok() {
            Outcome::CountError
        } else if self.relation.is_some() && !self.visor_sra {
            // With one box of each, VISOR's "any pair" is the only pair.
            Outcome::LocationError
        } else {
            Outcome::Correct
        }
    }
}

fn best<'a>(boxes: &[&'a Detection]) -> Option<&'a Detection> {
    boxes.iter().copied().max_by(|x, y| x.score.total_cmp(&y.score))
}

/// Judge `detections` against `prompt` (spatial, "and" or single; count captions are outputs
/// of relabeling, never inputs to the judge).
pub fn judge(prompt: &Prompt, detections: &[Detection], vocab: &Vocabulary) -> Result<Verdict, String> {
    let (a, b, relation) = match prompt {
        Prompt::Spatial { a, relation, b } => (*a, Some(*b), Some(*relation)),
        Prompt::And { a, b } => (*a, Some(*b), None),
        Prompt::Single { a } => (*a, None, None),
        Prompt::Count { .. } => return Err("count captions cannot be judged: judge the original prompt".into()),
    };
    if b == Some(a) {
        return Err(format!("prompt names {:?} twice: the judge needs two different objects", vocab.name(a)));
    }
    let (name_a, name_b) = (vocab.name(a), b.map(|b| vocab.name(b)));
    let boxes_a: Vec<&Detection> = detections.iter().filter(|d| d.label == name_a).collect();
    let boxes_b: Vec<&Detection> = detections.iter().filter(|d| Some(d.label.as_str()) == name_b).collect();
    let kept: Vec<&Detection> =
        detections.iter().filter(|d| d.label == name_a || Some(d.label.as_str()) == name_b).collect();

    let visor_sra = relation
        .is_some_and(|r| boxes_a.iter().any(|da| boxes_b.iter().any(|db| r.holds(da.bbox.center(), db.bbox.center()))));
    let observed = match (best(&boxes_a), best(&boxes_b)) {
        (Some(da), Some(db)) => Relation::observed(da.bbox.center(), db.bbox.center()),
        _ => None,
    };
    Ok(Verdict {
        count_a: boxes_a.len() as u32,
        count_b: b.map(|_| boxes_b.len() as u32),
        relation,
        visor_sra,
        observed,
        labels: kept.iter().map(|d| d.label.clone()).collect(),
        centers: kept.iter().map(|d| d.bbox.center()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detection::BBox;
    use proptest::prelude::*;

    fn det(label: &str, score: f64, cx: f64, cy: f64) -> Detection {
        Detection::new(label, score, BBox::new(cx - 1.0, cy - 1.0, cx + 1.0, cy + 1.0).unwrap()).unwrap()
    }

    fn setup() -> (Vocabulary, Prompt) {
        let v = Vocabulary::coco80();
        let p = Prompt::parse("a dog to the left of a cat", &v).unwrap();
        (v, p)
    }

    #[test]
    fn correct_location_and_count_errors() {
        let (v, p) = setup();
        let ok = judge(&p, &[det("dog", 0.9, 5.0, 5.0), det("cat", 0.8, 20.0, 5.0)], &v).unwrap();
        assert_eq!((ok.outcome(), ok.visor_sra, ok.recall()), (Outcome::Correct, true, 2));
        let wrong = judge(&p, &[det("dog", 0.9, 25.0, 5.0), det("cat", 0.8, 20.0, 5.0)], &v).unwrap();
        assert_eq!((wrong.outcome(), wrong.observed), (Outcome::LocationError, Some(Relation::RightOf)));
        let missing = judge(&p, &[det("dog", 0.9, 5.0, 5.0)], &v).unwrap();
        assert_eq!((missing.outcome(), missing.recall(), missing.count_b), (Outcome::CountError, 1, Some(0)));
        let none = judge(&p, &[], &v).unwrap();
        assert_eq!((none.outcome(), none.recall(), none.all_found()), (Outcome::CountError, 0, false));
    }

    #[test]
    fn tie_is_a_location_error_with_no_observed_relation() {
        let (v, p) = setup();
        let tie = judge(&p, &[det("dog", 0.9, 5.0, 5.0), det("cat", 0.8, 5.0, 5.0)], &v).unwrap();
        assert_eq!((tie.outcome(), tie.visor_sra, tie.observed), (Outcome::LocationError, false, None));
        // Same x, different y: left/right fails, and the observed relation is vertical.
        let vertical = judge(&p, &[det("dog", 0.9, 5.0, 2.0), det("cat", 0.8, 5.0, 30.0)], &v).unwrap();
        assert_eq!((vertical.outcome(), vertical.observed), (Outcome::LocationError, Some(Relation::Above)));
    }

    #[test]
    fn visor_allows_extra_instances_strict_does_not() {
        let (v, p) = setup();
        // Two dogs, one left and one right of the cat: VISOR satisfied, IPR count error.
        let d = [det("dog", 0.9, 30.0, 5.0), det("dog", 0.5, 1.0, 5.0), det("cat", 0.8, 20.0, 5.0)];
        let verdict = judge(&p, &d, &v).unwrap();
        assert!(verdict.visor_sra && verdict.all_found());
        assert_eq!((verdict.outcome(), verdict.count_a), (Outcome::CountError, 2));
        assert_eq!(verdict.observed, Some(Relation::RightOf), "observed from the best-scoring boxes");
    }

    #[test]
    fn other_labels_are_ignored() {
        let (v, p) = setup();
        let d = [det("dog", 0.9, 5.0, 5.0), det("zebra", 0.9, 1.0, 1.0), det("cat", 0.8, 20.0, 5.0)];
        let verdict = judge(&p, &d, &v).unwrap();
        assert_eq!(
            (verdict.outcome(), verdict.labels.clone()),
            (Outcome::Correct, vec!["dog".to_string(), "cat".to_string()])
        );
    }

    #[test]
    fn and_single_and_count_prompts() {
        let v = Vocabulary::coco80();
        let and = Prompt::parse("a dog and a cat", &v).unwrap();
        let d = [det("dog", 0.9, 25.0, 5.0), det("cat", 0.8, 20.0, 5.0)];
        assert_eq!(judge(&and, &d, &v).unwrap().outcome(), Outcome::Correct);
        assert!(!judge(&and, &d, &v).unwrap().visor_sra, "no relation to satisfy");
        let single = Prompt::parse("a dog", &v).unwrap();
        assert_eq!(judge(&single, &d, &v).unwrap().outcome(), Outcome::Correct);
        assert_eq!(judge(&single, &d[..0], &v).unwrap().outcome(), Outcome::CountError);
        let count = Prompt::parse("2 dogs", &v).unwrap();
        assert!(judge(&count, &d, &v).is_err());
    }

    proptest! {
        /// On random boxes: the strict rule implies VISOR's, VISOR's sra matches a brute-force
        /// reading of its definition, and recall counts found objects.
        #[test]
        fn judge_rules_agree(boxes in prop::collection::vec((0usize..3, 0.0f64..1.0, 0u8..32, 0u8..32), 0..7), r in 0usize..4) {
            let v = Vocabulary::new(["dog", "cat", "zebra"]).unwrap();
            let p = Prompt::Spatial { a: 0, relation: Relation::ALL[r], b: 1 };
            let d: Vec<Detection> = boxes.iter().map(|&(l, s, x, y)| det(v.name(l), s, f64::from(x), f64::from(y))).collect();
            let verdict = judge(&p, &d, &v).unwrap();
            let a: Vec<_> = d.iter().filter(|x| x.label == "dog").collect();
            let b: Vec<_> = d.iter().filter(|x| x.label == "cat").collect();
            let mut brute = false;
            for x in &a { for y in &b { brute |= Relation::ALL[r].holds(x.bbox.center(), y.bbox.center()); } }
            prop_assert_eq!(verdict.visor_sra, brute);
            prop_assert_eq!(verdict.recall(), u32::from(!a.is_empty()) + u32::from(!b.is_empty()));
            if verdict.outcome() == Outcome::Correct {
                prop_assert!(verdict.visor_sra && verdict.count_ok());
            }
            if let Some(obs) = verdict.observed {
                // The observed relation is always true of the pair it was read from.
                let best = |v: &[&Detection]| v.iter().copied().max_by(|p, q| p.score.total_cmp(&q.score)).unwrap().bbox.center();
                prop_assert!(obs.holds(best(&a), best(&b)));
            }
        }
    }
}
