//! The caption noise model for pretraining: (image, caption) pairs like web data.
//!
//! Web captions name what is in a picture but rarely say where things are, and when they do
//! they are sometimes wrong. Pretraining on such captions gives a base model that draws the
//! right objects but follows spatial words weakly, which is where Stable Diffusion stands and
//! what IPR is meant to fix. Here every caption names the objects of its scene correctly:
//!
//! - one object: "a {A}";
//! - two objects, placed in a random unambiguous relation (see [`Scene::spatial`]): with
//!   probability `p_correct_relation` the true relation, with `p_wrong_relation` a relation
//!   that does not hold, otherwise "a {A} and a {B}"; the order of mention is random;
//! - three objects (two classes with one repeated, or three classes): the count caption
//!   ("2 apples and a leaf", "an apple and a leaf and a box"), so a model learns to count
//!   and IPR's count check has something to catch.
//!
//! Sample `i` of a generator is a pure function of `(seed, i)` (ChaCha8 stream `i`), so a data
//! set can be regenerated, resumed or sharded without replaying earlier samples.

use crate::classes::{vocabulary, NUM_CLASSES};
use crate::render::render;
use crate::world::Scene;
use image::RgbImage;
use ipr_core::{ObjectId, Prompt, Relation, Vocabulary};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The rates of the caption noise model and of the scene mix.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionNoise {
    /// Probability that a two-object caption states the true relation.
    pub p_correct_relation: f64,
    /// Probability that a two-object caption states a relation that does not hold.
    pub p_wrong_relation: f64,
    /// Probability that a scene has one object.
    pub p_single: f64,
    /// Probability that a scene has three objects (with a count caption).
    pub p_three: f64,
}

impl Default for CaptionNoise {
    /// 12% correct, 15% wrong, the rest "and"; one scene in six has one object, one in ten three.
    /// A wrong caption never holds by VISOR's centre test, and (averaged over the relations) says
    /// a given relation as often as a true one would, so a model that learned these captions
    /// perfectly would satisfy a stated relation 0.12 / (0.12 + 0.15) = 44% of the time. Measured
    /// VISOR_cond comes out higher (extra objects give VISOR's any-pair test more chances): with
    /// 20%/15% (57% in theory) the base model measured 63 (seen) and 71 (held-out), above the
    /// 45-65 target, hence these rates. design.md's probe used 30%/15% (67%).
    fn default() -> Self {
        Self { p_correct_relation: 0.12, p_wrong_relation: 0.15, p_single: 1.0 / 6.0, p_three: 0.10 }
    }
}

impl CaptionNoise {
    /// Every rate in `[0, 1]`, and each group's rates sum to at most 1.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("p_correct_relation", self.p_correct_relation),
            ("p_wrong_relation", self.p_wrong_relation),
            ("p_single", self.p_single),
            ("p_three", self.p_three),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} is {p}, expected a probability in [0, 1]"));
            }
        }
        let rel = self.p_correct_relation + self.p_wrong_relation;
        if rel > 1.0 + 1e-12 {
            return Err(format!("p_correct_relation + p_wrong_relation is {rel}, expected at most 1"));
        }
        let mix = self.p_single + self.p_three;
        if mix > 1.0 + 1e-12 {
            return Err(format!("p_single + p_three is {mix}, expected at most 1"));
        }
        Ok(())
    }
}

/// What kind of caption a sample got (for statistics; the caption itself is the data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionKind {
    Single,
    CorrectRelation,
    WrongRelation,
    And,
    Count,
}

/// One pretraining example.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingPair {
    pub scene: Scene,
    pub image: RgbImage,
    pub caption: Prompt,
    /// The caption's text over the toy vocabulary.
    pub text: String,
    pub kind: CaptionKind,
}

/// A seeded source of pretraining pairs.
#[derive(Debug, Clone)]
pub struct CaptionedScenes {
    noise: CaptionNoise,
    seed: u64,
    vocab: Vocabulary,
}

impl CaptionedScenes {
    pub fn new(noise: CaptionNoise, seed: u64) -> Result<Self, String> {
        noise.validate()?;
        Ok(Self { noise, seed, vocab: vocabulary() })
    }

    pub fn noise(&self) -> &CaptionNoise {
        &self.noise
    }

    /// Sample number `index`: the same `(seed, index)` always gives the same pair.
    pub fn sample(&self, index: u64) -> TrainingPair {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        let (scene, caption, kind) = self.scene_and_caption(&mut rng);
        let text = caption.render(&self.vocab);
        TrainingPair { image: render(&scene), scene, caption, text, kind }
    }

    /// Samples `start..start + n`.
    pub fn batch(&self, start: u64, n: usize) -> Vec<TrainingPair> {
        (start..start + n as u64).map(|i| self.sample(i)).collect()
    }

    fn scene_and_caption<R: Rng + ?Sized>(&self, rng: &mut R) -> (Scene, Prompt, CaptionKind) {
        let u: f64 = rng.random();
        if u < self.noise.p_single {
            let a = rng.random_range(0..NUM_CLASSES);
            return (Scene::single(a, rng), Prompt::Single { a }, CaptionKind::Single);
        }
        if u < self.noise.p_single + self.noise.p_three {
            return three_objects(rng);
        }
        let (a, b) = distinct_pair(rng);
        let relation = Relation::ALL[rng.random_range(0..4)];
        let scene = Scene::spatial(a, relation, b, rng);
        // Mention the objects in either order; the true relation follows the order.
        let (a, relation, b) = if rng.random_bool(0.5) { (a, relation, b) } else { (b, relation.opposite(), a) };
        let v: f64 = rng.random();
        if v < self.noise.p_correct_relation {
            (scene, Prompt::Spatial { a, relation, b }, CaptionKind::CorrectRelation)
        } else if v < self.noise.p_correct_relation + self.noise.p_wrong_relation {
            let (ca, cb) = (center_of(&scene, a), center_of(&scene, b));
            // A wrong caption says something false by VISOR's centre test: the opposite relation,
            // or the cross-axis relation whose (small) offset points the other way.
            let wrong: Vec<Relation> = Relation::ALL.into_iter().filter(|r| !r.holds(ca, cb)).collect();
            let relation = wrong[rng.random_range(0..wrong.len())];
            (scene, Prompt::Spatial { a, relation, b }, CaptionKind::WrongRelation)
        } else {
            (scene, Prompt::And { a, b }, CaptionKind::And)
        }
    }
}

fn distinct_pair<R: Rng + ?Sized>(rng: &mut R) -> (ObjectId, ObjectId) {
    let a = rng.random_range(0..NUM_CLASSES);
    let b = (a + rng.random_range(1..NUM_CLASSES)) % NUM_CLASSES;
    (a, b)
}

fn three_objects<R: Rng + ?Sized>(rng: &mut R) -> (Scene, Prompt, CaptionKind) {
    let (a, b) = distinct_pair(rng);
    let (classes, counts) = if rng.random_bool(0.5) {
        (vec![a, a, b], vec![(a, 2), (b, 1)])
    } else {
        let c = (0..NUM_CLASSES)
            .filter(|c| *c != a && *c != b)
            .nth(rng.random_range(0..NUM_CLASSES - 2))
            .expect("a third class");
        (vec![a, b, c], vec![(a, 1), (b, 1), (c, 1)])
    };
    let scene = Scene::with_classes(&classes, rng);
    (scene, Prompt::Count { counts }.canonical(), CaptionKind::Count)
}

fn center_of(scene: &Scene, class: ObjectId) -> (f64, f64) {
    scene.objects.iter().find(|o| o.class == class).expect("the caption's object is in the scene").center()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Measure the rates from the scenes themselves (geometry and counts), not from `kind`.
    #[test]
    fn measured_rates_match_the_parameters() {
        let noise = CaptionNoise { p_correct_relation: 0.4, p_wrong_relation: 0.2, p_single: 0.1, p_three: 0.2 };
        let gen = CaptionedScenes::new(noise, 5).unwrap();
        let n = 6000;
        let (mut single, mut three, mut two, mut correct, mut wrong, mut and) = (0, 0, 0, 0, 0, 0);
        for i in 0..n {
            let s = gen.sample(i);
            // Every caption names exactly the scene's objects with the right counts.
            let mut named: Vec<(ObjectId, usize)> = match &s.caption {
                Prompt::Count { counts } => counts.iter().map(|&(c, k)| (c, k as usize)).collect(),
                p => p.objects().into_iter().map(|c| (c, 1)).collect(),
            };
            named.sort();
            let mut present: Vec<(ObjectId, usize)> =
                (0..NUM_CLASSES).map(|c| (c, s.scene.count(c))).filter(|x| x.1 > 0).collect();
            present.sort();
            assert_eq!(named, present, "sample {i}: {}", s.text);
            assert_eq!(Prompt::parse(&s.text, &vocabulary()).unwrap(), s.caption);
            match s.scene.objects.len() {
                1 => single += 1,
                3 => three += 1,
                _ => {
                    two += 1;
                    match s.caption {
                        Prompt::Spatial { a, relation, b } => {
                            if relation.holds(center_of(&s.scene, a), center_of(&s.scene, b)) {
                                correct += 1;
                                assert_eq!(s.kind, CaptionKind::CorrectRelation);
                            } else {
                                wrong += 1;
                                assert_eq!(s.kind, CaptionKind::WrongRelation);
                            }
                        }
                        _ => and += 1,
                    }
                }
            }
        }
        let rate = |k: i32, of: i32| f64::from(k) / f64::from(of);
        // Binomial standard errors are below 0.007 here; allow about four of them.
        let close = |got: f64, want: f64, what: &str| assert!((got - want).abs() < 0.025, "{what}: {got} vs {want}");
        close(rate(single, n as i32), 0.1, "single");
        close(rate(three, n as i32), 0.2, "three");
        close(rate(correct, two), 0.4, "correct relation");
        close(rate(wrong, two), 0.2, "wrong relation");
        close(rate(and, two), 0.4, "and");
    }

    #[test]
    fn samples_are_a_function_of_seed_and_index() {
        let gen = CaptionedScenes::new(CaptionNoise::default(), 9).unwrap();
        assert_eq!(gen.sample(17), gen.sample(17));
        assert_eq!(gen.batch(16, 3)[1], gen.sample(17));
        assert_ne!(gen.sample(17).image, gen.sample(18).image);
        let other = CaptionedScenes::new(CaptionNoise::default(), 10).unwrap();
        assert_ne!(gen.sample(17).scene, other.sample(17).scene);
    }

    #[test]
    fn rejects_bad_rates() {
        let bad = CaptionNoise { p_correct_relation: 0.8, p_wrong_relation: 0.3, ..Default::default() };
        assert!(CaptionedScenes::new(bad, 0).unwrap_err().contains("at most 1"));
        let bad = CaptionNoise { p_single: -0.1, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("p_single is -0.1"));
        let e = serde_json::from_str::<CaptionNoise>(r#"{"p_wrong": 0.1}"#).unwrap_err().to_string();
        assert!(e.contains("p_wrong"), "{e}");
    }
}
