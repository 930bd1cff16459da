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
