//! VISOR metrics, exactly as microsoft/VISOR's `visor.py` computes them.
//!
//! Over the images of spatial prompts (rel_type not "and", two objects); "and" and single
//! prompts are skipped by the callers that build [`ImageScore`]s, as visor.py skips them:
//! - OA = 100 * #(both objects detected) / #images
//! - VISOR_cond = 100 * #(both detected and sra) / #(both detected)
//! - VISOR_uncond = VISOR_cond * OA / 100 (= 100 * #(both and sra) / #images)
//! - VISOR_n = 100 * #(prompts with at least n correct images) / #(prompts with any image)
//!
//! A prompt with fewer than 4 images still counts in the VISOR_n denominator (it simply cannot
//! reach VISOR_4). Where no image has both objects visor.py divides by zero; here VISOR_cond is
//! then 0.

use crate::relation::Relation;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One image of a spatial prompt, as the metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageScore {
    pub prompt_id: u64,
    pub relation: Relation,
    pub found_a: bool,
    pub found_b: bool,
    /// VISOR's spatial-relationship accuracy flag for this image.
    pub sra: bool,
}

impl ImageScore {
    fn both(&self) -> bool {
        self.found_a && self.found_b
    }

    fn correct(&self) -> bool {
        self.both() && self.sra
    }
}

/// The VISOR table row (percent), plus the counts it was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VisorMetrics {
    #[serde(rename = "OA")]
    pub oa: f64,
    #[serde(rename = "VISOR_uncond")]
    pub visor_uncond: f64,
    #[serde(rename = "VISOR_cond")]
    pub visor_cond: f64,
    #[serde(rename = "VISOR_1")]
    pub visor_1: f64,
    #[serde(rename = "VISOR_2")]
    pub visor_2: f64,
    #[serde(rename = "VISOR_3")]
    pub visor_3: f64,
    #[serde(rename = "VISOR_4")]
    pub visor_4: f64,
    /// Object accuracy of the first and second object alone (visor.py computes them too).
    pub obj_acc_a: f64,
    pub obj_acc_b: f64,
    pub num_images: usize,
    pub num_prompts: usize,
}

impl VisorMetrics {
    /// The seven headline numbers, as a JSON object with VISOR's names.
    pub fn headline(&self) -> serde_json::Value {
        serde_json::json!({
            "OA": self.oa,
            "VISOR_uncond": self.visor_uncond,
            "VISOR_cond": self.visor_cond,
            "VISOR_1": self.visor_1,
            "VISOR_2": self.visor_2,
            "VISOR_3": self.visor_3,
            "VISOR_4": self.visor_4,
        })
    }
}

/// VISOR metrics over spatial images. Errors when there are none (visor.py divides by zero).
pub fn visor_metrics(images: &[ImageScore]) -> Result<VisorMetrics, String> {
    if images.is_empty() {
        return Err("no images of spatial prompts to score".into());
    }
    let count = images.len() as f64;
    let pct = |n: usize, of: f64| 100.0 * n as f64 / of;
    let both = images.iter().filter(|i| i.both()).count();
    let correct = images.iter().filter(|i| i.correct()).count();
    let oa = pct(both, count);
    let visor_cond = if both == 0 { 0.0 } else { pct(correct, both as f64) };
    let mut per_prompt: BTreeMap<u64, usize> = BTreeMap::new();
    for i in images {
        *per_prompt.entry(i.prompt_id).or_default() += usize::from(i.correct());
    }
    let prompts = per_prompt.len() as f64;
    let at_least = |n: usize| pct(per_prompt.values().filter(|&&c| c >= n).count(), prompts);
    Ok(VisorMetrics {
        oa,
        visor_uncond: visor_cond * oa / 100.0,
        visor_cond,
        visor_1: at_least(1),
        visor_2: at_least(2),
        visor_3: at_least(3),
        visor_4: at_least(4),
        obj_acc_a: pct(images.iter().filter(|i| i.found_a).count(), count),
        obj_acc_b: pct(images.iter().filter(|i| i.found_b).count(), count),
        num_images: images.len(),
        num_prompts: per_prompt.len(),
    })
}

/// The same metrics per relation ("left", "right", "above", "below"), for relations present.
pub fn visor_metrics_by_relation(images: &[ImageScore]) -> BTreeMap<&'static str, VisorMetrics> {
    Relation::ALL
        .into_iter()
        .filter_map(|r| {
            let subset: Vec<_> = images.iter().copied().filter(|i| i.relation == r).collect();
            visor_metrics(&subset).ok().map(|m| (r.short(), m))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(prompt_id: u64, relation: Relation, a: bool, b: bool, sra: bool) -> ImageScore {
        ImageScore { prompt_id, relation, found_a: a, found_b: b, sra }
    }

    #[test]
    fn hand_computed_case() {
        use Relation::*;
        // Prompt 10 (left): 4 images, 3 with both, 2 of them correct.
        // Prompt 11 (above): 2 images, both found and correct.
        // Prompt 12 (below): 1 image, only A found (sra flag set, but it must not count).
        let images = [
            img(10, LeftOf, true, true, true),
            img(10, LeftOf, true, true, true),
            img(10, LeftOf, true, true, false),
            img(10, LeftOf, false, true, false),
            img(11, Above, true, true, true),
            img(11, Above, true, true, true),
            img(12, Below, true, false, true),
        ];
        let m = visor_metrics(&images).unwrap();
        // both: 5 of 7; correct: 4 of 5; per prompt correct counts: 2, 2, 0.
        assert!((m.oa - 500.0 / 7.0).abs() < 1e-12);
        assert!((m.visor_cond - 80.0).abs() < 1e-12);
        assert!((m.visor_uncond - 400.0 / 7.0).abs() < 1e-12);
        assert!((m.visor_1 - 200.0 / 3.0).abs() < 1e-12);
        assert!((m.visor_2 - 200.0 / 3.0).abs() < 1e-12);
        assert_eq!((m.visor_3, m.visor_4), (0.0, 0.0));
        assert!((m.obj_acc_a - 600.0 / 7.0).abs() < 1e-12);
        assert!((m.obj_acc_b - 600.0 / 7.0).abs() < 1e-12);
        assert_eq!((m.num_images, m.num_prompts), (7, 3));
        let by = visor_metrics_by_relation(&images);
        assert_eq!(by.keys().copied().collect::<Vec<_>>(), ["above", "below", "left"]);
        assert_eq!(by["above"].visor_uncond, 100.0);
        assert_eq!(by["below"].oa, 0.0);
        assert_eq!(by["below"].visor_cond, 0.0, "no image with both objects: 0, not a division by zero");
        let headline = m.headline();
        let keys: Vec<_> = headline.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["OA", "VISOR_uncond", "VISOR_cond", "VISOR_1", "VISOR_2", "VISOR_3", "VISOR_4"]);
    }

    #[test]
    fn all_correct_and_empty() {
        let images: Vec<_> = (0..4).map(|_| img(3, Relation::RightOf, true, true, true)).collect();
        let m = visor_metrics(&images).unwrap();
        assert_eq!([m.oa, m.visor_cond, m.visor_uncond, m.visor_1, m.visor_4], [100.0; 5]);
        assert!(visor_metrics(&[]).is_err());
    }
}
