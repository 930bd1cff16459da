//! End to end on the toy world without a model: oracle images of every toy SR2D spatial
//! prompt, detected by the exact toy detector (clean and degraded like a model's samples) and
//! judged by ipr-core's judge, must all be correct; images drawn for the opposite relation
//! must all be location errors. This ties the world, the detector and the judge together.

use ipr_core::judge::{judge, Outcome};
use ipr_core::Prompt;
use ipr_detect::{Detector, ToyDetector};
use ipr_toy::{degrade, oracle_image, vocabulary, PairSplit, Split};

fn outcomes(
    flip: bool,
    degrade_image: impl Fn(&image::RgbImage, u64) -> image::RgbImage,
) -> Vec<(String, Outcome, bool)> {
    let v = vocabulary();
    let det = ToyDetector::default();
    let split = PairSplit::fixed();
    let mut out = Vec::new();
    for s in Split::ALL {
        for row in split.spatial_rows(s) {
            let prompt = row.prompt(&v).unwrap();
            let Prompt::Spatial { a, relation, b } = prompt else { unreachable!("spatial rows") };
            let drawn = if flip { Prompt::Spatial { a, relation: relation.opposite(), b } } else { prompt.clone() };
            for k in 0..4 {
                let (_, img) = oracle_image(&drawn, &v, 7, k).unwrap();
                let img = degrade_image(&img, row.unique_id * 4 + k);
                let dets = det.detect(&img, &[v.name(a), v.name(b)]).unwrap();
                let verdict = judge(&prompt, &dets, &v).unwrap();
                out.push((row.text.clone(), verdict.outcome(), verdict.visor_sra));
            }
        }
    }
    out
}

#[test]
fn oracle_images_are_judged_correct() {
    let all = outcomes(false, |i, _| i.clone());
    assert_eq!(all.len(), 28 * 8 * 4);
    for (text, outcome, sra) in all {
        assert!(outcome == Outcome::Correct && sra, "{text}: {outcome:?}");
    }
}

#[test]
fn degraded_oracle_images_are_judged_correct() {
    let soft = |i: &image::RgbImage, seed| {
        degrade::add_noise(&degrade::gaussian_blur(&degrade::drift_colour(i, 8.0, 0.7, 0.9), 0.7), 8.0, seed)
    };
    for (text, outcome, sra) in outcomes(false, soft) {
        assert!(outcome == Outcome::Correct && sra, "{text}: {outcome:?}");
    }
}

#[test]
fn images_of_the_opposite_relation_are_location_errors() {
    for (text, outcome, sra) in outcomes(true, |i, _| i.clone()) {
        assert!(outcome == Outcome::LocationError && !sra, "{text}: {outcome:?}");
    }
}

/// `ipr_toy::eval` with the real detector: the oracle scores 100 on both splits; the oracle
/// drawing the opposite relation finds every object and no relation.
#[test]
fn toy_eval_of_the_oracle() {
    use ipr_toy::eval::{evaluate, BoxError};
    let v = vocabulary();
    let split = PairSplit::fixed();
    let det = ToyDetector::default();
    let sampler = |flip: bool| {
        let v = v.clone();
        move |row: &ipr_core::sr2d::PromptRow, n: usize| -> Result<Vec<image::RgbImage>, BoxError> {
            let mut p = row.prompt(&v)?;
            if let (true, Prompt::Spatial { a, relation, b }) = (flip, &p) {
                p = Prompt::Spatial { a: *a, relation: relation.opposite(), b: *b };
            }
            (0..n as u64).map(|k| Ok(oracle_image(&p, &v, 1, k)?.1)).collect()
        }
    };
    let detect = |img: &image::RgbImage, classes: &[&str]| det.detect(img, classes).map_err(BoxError::from);
    let m = evaluate(&split, 4, sampler(false), detect).unwrap();
    for side in Split::ALL {
        let s = m.get(side).unwrap();
        assert_eq!([s.oa, s.visor_cond, s.visor_uncond, s.visor_1, s.visor_4], [100.0; 5], "{side:?}");
    }
    assert_eq!(m.get(Split::Train).unwrap().num_images, 14 * 8 * 4);
    assert_eq!(m.get(Split::HeldOut).unwrap().num_prompts, 7 * 8);
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["held_out"]["VISOR_cond"], 100.0);
    let flipped = evaluate(&split, 1, sampler(true), detect).unwrap();
    let s = flipped.get(Split::HeldOut).unwrap();
    assert_eq!((s.oa, s.visor_cond), (100.0, 0.0));
}
