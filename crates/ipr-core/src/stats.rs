//! Intervals for VISOR metrics measured under several seeds.
//!
//! The unit of resampling is the prompt: a cluster bootstrap (Efron & Tibshirani 1993, ch. 6)
//! draws prompts with replacement, each drawn prompt bringing its images of every seed, and
//! computes the metric on the pooled images; the 95% interval is the 2.5th to 97.5th
//! percentile of the resampled metric. So the interval covers the variation between prompts
//! (what generalising to other prompts of the same pairs depends on) and, inside each prompt,
//! the seeds' variation; with 3 seeds it does not pretend to know the variation between seeds
//! better than 3 draws can. Two models evaluated on the same prompts and seeds are compared by
//! the same resampling applied to both at once (paired), which removes the variation they share.
//!
//! A prompt under seed `s` counts as its own VISOR prompt (VISOR_n is over (seed, prompt)
//! units), so pooling seeds leaves every metric's definition as [`crate::metrics`] gives it.

use crate::metrics::{visor_metrics, ImageScore, VisorMetrics};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A point estimate and its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    /// Half the interval's width (the "±" of a table).
    pub fn half_width(&self) -> f64 {
        (self.hi - self.lo) / 2.0
    }

    /// Whether the interval lies entirely above zero.
    pub fn above_zero(&self) -> bool {
        self.lo > 0.0
    }
}

/// A metric read off a [`VisorMetrics`].
pub type Metric = fn(&VisorMetrics) -> f64;

/// The metrics [`visor_intervals`] gives intervals for, by VISOR's names.
pub const METRICS: [(&str, Metric); 7] = [
    ("OA", |m| m.oa),
    ("VISOR_uncond", |m| m.visor_uncond),
    ("VISOR_cond", |m| m.visor_cond),
    ("VISOR_1", |m| m.visor_1),
    ("VISOR_2", |m| m.visor_2),
    ("VISOR_3", |m| m.visor_3),
    ("VISOR_4", |m| m.visor_4),
];

/// The images of each seed grouped by prompt, and the prompts (the same in every seed).
struct Clusters {
    prompts: Vec<u64>,
    /// `by_seed[s][prompt]`
    by_seed: Vec<BTreeMap<u64, Vec<ImageScore>>>,
}

impl Clusters {
    fn new(per_seed: &[Vec<ImageScore>]) -> Result<Self, String> {
        if per_seed.is_empty() {
            return Err("no seeds to pool".into());
        }
        let by_seed: Vec<BTreeMap<u64, Vec<ImageScore>>> = per_seed
            .iter()
            .map(|images| {
                let mut m: BTreeMap<u64, Vec<ImageScore>> = BTreeMap::new();
                for i in images {
                    m.entry(i.prompt_id).or_default().push(*i);
                }
                m
            })
            .collect();
        let prompts: Vec<u64> = by_seed[0].keys().copied().collect();
        for (s, m) in by_seed.iter().enumerate() {
            if m.keys().copied().collect::<Vec<_>>() != prompts {
                return Err(format!("seed {s} was evaluated on other prompts than seed 0: they cannot be pooled"));
            }
        }
        if prompts.is_empty() {
            return Err("no images of spatial prompts to score".into());
        }
        Ok(Self { prompts, by_seed })
    }

    /// The pooled images of a draw of prompts (indices into `prompts`), each (draw, seed) its own
    /// VISOR prompt.
    fn pooled(&self, draw: &[usize]) -> Vec<ImageScore> {
        let seeds = self.by_seed.len() as u64;
        let mut out = Vec::new();
        for (k, &p) in draw.iter().enumerate() {
            for (s, m) in self.by_seed.iter().enumerate() {
                let id = k as u64 * seeds + s as u64;
                out.extend(m[&self.prompts[p]].iter().map(|i| ImageScore { prompt_id: id, ..*i }));
            }
        }
        out
    }
}

/// SplitMix64: the same resamples on every machine.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// The 2.5th and 97.5th percentiles (linear interpolation between order statistics).
fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        let x = q * (v.len() - 1) as f64;
        let (i, f) = (x.floor() as usize, x - x.floor());
        if i + 1 < v.len() {
            v[i] * (1.0 - f) + v[i + 1] * f
        } else {
            v[i]
        }
    };
    (at(0.025), at(0.975))
}

/// Every metric of [`METRICS`] for the images of all seeds pooled, with its 95% interval from
/// `resamples` prompt resamples drawn from `seed`. `per_seed[s]` holds the images of seed `s`;
/// every seed must cover the same prompts.
pub fn visor_intervals(
    per_seed: &[Vec<ImageScore>],
    resamples: usize,
    seed: u64,
) -> Result<BTreeMap<&'static str, Interval>, String> {
    let c = Clusters::new(per_seed)?;
    let all: Vec<usize> = (0..c.prompts.len()).collect();
    let point = visor_metrics(&c.pooled(&all))?;
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(resamples); METRICS.len()];
    let mut rng = Rng(seed);
    for _ in 0..resamples {
        let draw: Vec<usize> = (0..all.len()).map(|_| rng.below(all.len())).collect();
        let m = visor_metrics(&c.pooled(&draw))?;
        for (k, (_, f)) in METRICS.iter().enumerate() {
            samples[k].push(f(&m));
        }
    }
    Ok(METRICS
        .iter()
        .zip(samples)
        .map(|((name, f), s)| {
            let (lo, hi) = percentiles(s);
            (*name, Interval { mean: f(&point), lo, hi })
        })
        .collect())
}

/// `metric(a) - metric(b)` for two models evaluated on the same prompts and seeds, with the 95%
/// interval of a paired bootstrap (the same prompt draws for both).
pub fn paired_difference(
    a: &[Vec<ImageScore>],
    b: &[Vec<ImageScore>],
    metric: Metric,
    resamples: usize,
    seed: u64,
) -> Result<Interval, String> {
    let (ca, cb) = (Clusters::new(a)?, Clusters::new(b)?);
    if ca.prompts != cb.prompts || ca.by_seed.len() != cb.by_seed.len() {
        return Err("the two models were evaluated on other prompts or seeds: no paired comparison".into());
    }
    let all: Vec<usize> = (0..ca.prompts.len()).collect();
    let diff = |draw: &[usize]| -> Result<f64, String> {
        Ok(metric(&visor_metrics(&ca.pooled(draw))?) - metric(&visor_metrics(&cb.pooled(draw))?))
    };
    let mean = diff(&all)?;
    let mut rng = Rng(seed);
    let mut samples = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let draw: Vec<usize> = (0..all.len()).map(|_| rng.below(all.len())).collect();
        samples.push(diff(&draw)?);
    }
    let (lo, hi) = percentiles(samples);
    Ok(Interval { mean, lo, hi })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relation::Relation;

    /// `n` prompts x 4 images, image `k` of prompt `p` correct when `correct(p, k)`.
    fn scores(n: u64, correct: impl Fn(u64, u64) -> bool) -> Vec<ImageScore> {
        (0..n)
            .flat_map(|p| {
                let c = &correct;
                (0..4).map(move |k| ImageScore {
                    prompt_id: 100 + p,
                    relation: Relation::LeftOf,
                    found_a: true,
                    found_b: true,
                    sra: c(p, k),
                })
            })
            .collect()
    }

    #[test]
    fn pooled_means_and_intervals() {
        // Seed 0: half the images right; seed 1: all right. Pooled: 75%.
        let s0 = scores(40, |_, k| k < 2);
        let s1 = scores(40, |_, _| true);
        let iv = visor_intervals(&[s0.clone(), s1.clone()], 500, 1).unwrap();
        assert_eq!(iv["VISOR_uncond"].mean, 75.0);
        assert_eq!(iv["OA"].mean, 100.0);
        // Every prompt looks alike, so resampling prompts changes nothing: a zero-width interval.
        assert_eq!((iv["VISOR_uncond"].lo, iv["VISOR_uncond"].hi), (75.0, 75.0));
        // VISOR_3 counts (seed, prompt) units: half of them (seed 1's) have >= 3 right.
        assert_eq!(iv["VISOR_3"].mean, 50.0);
        // Prompts that differ widen the interval around the mean.
        let mixed = scores(40, |p, _| p % 2 == 0);
        let iv = visor_intervals(std::slice::from_ref(&mixed), 2000, 7).unwrap();
        let u = iv["VISOR_uncond"];
        assert_eq!(u.mean, 50.0);
        assert!(u.lo < 45.0 && u.hi > 55.0 && u.lo > 25.0 && u.hi < 75.0, "{u:?}");
        assert_eq!(visor_intervals(std::slice::from_ref(&mixed), 2000, 7).unwrap()["VISOR_uncond"], u, "seeded");
        // Different prompts in two seeds cannot be pooled.
        assert!(visor_intervals(&[mixed, scores(39, |_, _| true)], 10, 0).is_err());
    }

    #[test]
    fn paired_differences_remove_what_both_models_share() {
        // Prompt difficulty varies a lot; model a gets exactly one more image right per prompt.
        let base = |p: u64, k: u64| k < p % 4;
        let a = scores(40, |p, k| k < p % 4 + 1);
        let b = scores(40, base);
        let d =
            paired_difference(std::slice::from_ref(&a), std::slice::from_ref(&b), |m| m.visor_uncond, 1000, 3).unwrap();
        assert_eq!(d.mean, 25.0);
        assert_eq!((d.lo, d.hi), (25.0, 25.0), "paired: the shared prompt effect cancels");
        assert!(d.above_zero());
        // Unpaired, each model's own interval is wide.
        let ia = visor_intervals(&[a], 1000, 3).unwrap()["VISOR_uncond"];
        assert!(ia.half_width() > 5.0, "{ia:?}");
    }
}
