//! A seeded noise wrapper that makes any detector imperfect the way GLIP is.
//!
//! The IPR paper's feedback comes from GLIP, which misses objects, finds objects that are not
//! there and confuses one named object for the other. With the exact toy detector underneath,
//! these errors can be added at known rates to measure how much of IPR's gain survives
//! imperfect feedback:
//!
//! - `miss_rate`: each detection is dropped with this probability;
//! - `label_swap_rate`: each kept detection is relabelled, with this probability, to another of
//!   the queried classes (only possible when two or more classes were queried);
//! - `false_box_rate`: with this probability an image gets one spurious box of a random queried
//!   class at a random place (side 6 to 12 px, clipped to the image).
//!
//! The noise of an image is a function of `(seed, image pixels, queried classes)`, not of call
//! order, so detection can run in any order, in parallel or resumed, and give the same result.

use crate::detector::{DetectError, Detector};
use image::RgbImage;
use ipr_core::{BBox, Detection};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Error rates of a [`NoisyDetector`] and the seed of its noise.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DetectorNoise {
    pub miss_rate: f64,
    pub false_box_rate: f64,
    pub label_swap_rate: f64,
    pub seed: u64,
}

impl DetectorNoise {
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("miss_rate", self.miss_rate),
            ("false_box_rate", self.false_box_rate),
            ("label_swap_rate", self.label_swap_rate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} is {p}, expected a probability in [0, 1]"));
            }
        }
        Ok(())
    }
}

/// `inner` with seeded misses, false boxes and label swaps.
#[derive(Debug, Clone)]
pub struct NoisyDetector<D> {
    inner: D,
    noise: DetectorNoise,
}

impl<D: Detector> NoisyDetector<D> {
    pub fn new(inner: D, noise: DetectorNoise) -> Result<Self, String> {
        noise.validate()?;
        Ok(Self { inner, noise })
    }

    pub fn noise(&self) -> &DetectorNoise {
        &self.noise
    }

    fn rng_for(&self, image: &RgbImage, classes: &[&str]) -> ChaCha8Rng {
        // FNV-1a over the seed, the image size and pixels, and the queried names.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
        };
        eat(&self.noise.seed.to_le_bytes());
        eat(&image.width().to_le_bytes());
        eat(&image.height().to_le_bytes());
        eat(image.as_raw());
        for c in classes {
            eat(c.as_bytes());
            eat(&[0]);
        }
        ChaCha8Rng::seed_from_u64(h)
    }
}

impl<D: Detector> Detector for NoisyDetector<D> {
    fn name(&self) -> String {
        format!("{}+noise", self.inner.name())
    }

    fn detect(&self, image: &RgbImage, classes: &[&str]) -> Result<Vec<Detection>, DetectError> {
        let found = self.inner.detect(image, classes)?;
        let mut rng = self.rng_for(image, classes);
        let n = &self.noise;
        let mut out = Vec::with_capacity(found.len() + 1);
        for mut d in found {
            // Draw both numbers for every detection so one rate does not shift the other's draws.
            let (miss, swap, pick): (f64, f64, usize) = (rng.random(), rng.random(), rng.random::<u32>() as usize);
            if miss < n.miss_rate {
                continue;
            }
            let others: Vec<&str> = classes.iter().copied().filter(|c| *c != d.label).collect();
            if swap < n.label_swap_rate && !others.is_empty() {
                d.label = others[pick % others.len()].to_string();
            }
            out.push(d);
        }
        let (fp, pick): (f64, usize) = (rng.random(), rng.random::<u32>() as usize);
        if fp < n.false_box_rate && !classes.is_empty() {
            let (w, h) = (f64::from(image.width()), f64::from(image.height()));
            let side = |rng: &mut ChaCha8Rng, max: f64| f64::from(rng.random_range(6u32..=12)).min(max);
            let (bw, bh) = (side(&mut rng, w), side(&mut rng, h));
            let x1 = (rng.random::<f64>() * (w - bw)).floor();
            let y1 = (rng.random::<f64>() * (h - bh)).floor();
            let bbox = BBox::new(x1, y1, x1 + bw, y1 + bh).expect("ordered box");
            let score = rng.random_range(0.5..1.0);
            out.push(Detection::new(classes[pick % classes.len()], score, bbox).expect("finite score"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy::ToyDetector;
    use ipr_core::Relation;
    use ipr_toy::{render, Scene, CLASSES};
    use rand_chacha::ChaCha8Rng;

    fn noisy(miss_rate: f64, false_box_rate: f64, label_swap_rate: f64, seed: u64) -> NoisyDetector<ToyDetector> {
        NoisyDetector::new(ToyDetector::default(), DetectorNoise { miss_rate, false_box_rate, label_swap_rate, seed })
            .unwrap()
    }

    /// Two-object scenes queried with their two class names, as in IPR's judge.
    fn cases(n: u64) -> impl Iterator<Item = (RgbImage, [&'static str; 2])> {
        (0..n).map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(i);
            let (a, b) = (i as usize % 8, (i as usize + 1 + i as usize / 8 % 7) % 8);
            let scene = Scene::spatial(a, Relation::ALL[i as usize % 4], b, &mut rng);
            (render(&scene), [CLASSES[a].name, CLASSES[b].name])
        })
    }

    #[test]
    fn measured_rates_match_the_parameters() {
        let exact = ToyDetector::default();
        let det = noisy(0.2, 0.15, 0.1, 11);
        let (mut truth, mut kept, mut swapped, mut spurious, mut images) = (0, 0, 0, 0, 0);
        for (img, classes) in cases(3000) {
            let want = exact.detect(&img, &classes).unwrap();
            let got = det.detect(&img, &classes).unwrap();
            images += 1;
            truth += want.len();
            for d in &got {
                match want.iter().find(|w| w.bbox == d.bbox) {
                    Some(w) => {
                        kept += 1;
                        if w.label != d.label {
                            swapped += 1;
                        }
                    }
                    None => spurious += 1,
                }
            }
        }
        let rate = |k: usize, n: usize| k as f64 / n as f64;
        // Standard errors: miss 0.005, swap 0.004, false box 0.007; allow about four.
        let close = |got: f64, want: f64, what: &str| assert!((got - want).abs() < 0.025, "{what}: {got} vs {want}");
        close(1.0 - rate(kept, truth), 0.2, "miss rate");
        close(rate(swapped, kept), 0.1, "label swap rate");
        close(rate(spurious, images), 0.15, "false boxes per image");
    }

    #[test]
    fn noise_is_a_function_of_seed_and_image() {
        let det = noisy(0.3, 0.3, 0.3, 1);
        let other = noisy(0.3, 0.3, 0.3, 2);
        let mut differs = false;
        for (img, classes) in cases(50) {
            let once = det.detect(&img, &classes).unwrap();
            assert_eq!(det.detect(&img, &classes).unwrap(), once);
            differs |= other.detect(&img, &classes).unwrap() != once;
            for d in &once {
                assert!(classes.contains(&d.label.as_str()));
                let [x1, y1, x2, y2] = d.bbox.corners();
                assert!(x1 >= 0.0 && y1 >= 0.0 && x2 <= 32.0 && y2 <= 32.0, "{d:?}");
            }
        }
        assert!(differs, "another seed gives other noise");
        assert_eq!(det.name(), "toy+noise");
    }

    #[test]
    fn zero_rates_change_nothing_and_bad_rates_are_refused() {
        let det = noisy(0.0, 0.0, 0.0, 5);
        for (img, classes) in cases(30) {
            assert_eq!(det.detect(&img, &classes).unwrap(), ToyDetector::default().detect(&img, &classes).unwrap());
        }
        let e = NoisyDetector::new(ToyDetector::default(), DetectorNoise { miss_rate: 1.5, ..Default::default() })
            .unwrap_err();
        assert!(e.contains("miss_rate is 1.5"), "{e}");
        let e = det.detect(&RgbImage::new(4, 4), &["dragon"]).unwrap_err().to_string();
        assert!(e.contains("dragon"), "{e}");
    }
}
