//! The renderer: a scene to a 32x32 RGB image.
//!
//! Deterministic and exact: each pixel whose centre lies in an object's shape takes the
//! object's colour, every other pixel is the background. No anti-aliasing, so an object's box
//! in the scene is exactly the tight box of its pixels in the image; a model's softness is
//! simulated separately (see [`crate::degrade`]) where the detector's tolerance is tested.

use crate::world::{Scene, BACKGROUND, IMAGE_SIZE};
use image::{Rgb, RgbImage};

/// Draw `scene` on the plain background.
pub fn render(scene: &Scene) -> RgbImage {
    let mut img = RgbImage::from_pixel(IMAGE_SIZE, IMAGE_SIZE, Rgb(BACKGROUND));
    for o in &scene.objects {
        let r = o.rect;
        for py in r.y..(r.y + r.h).min(IMAGE_SIZE) {
            for px in r.x..(r.x + r.w).min(IMAGE_SIZE) {
                if o.covers(px, py) {
                    img.put_pixel(px, py, Rgb(o.colour));
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::Scene;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn scene(seed: u64) -> Scene {
        Scene::random(&mut ChaCha8Rng::seed_from_u64(seed))
    }

    #[test]
    fn deterministic_per_seed() {
        for seed in 0..50 {
            assert_eq!(render(&scene(seed)), render(&scene(seed)));
        }
        assert_ne!(render(&scene(1)), render(&scene(2)));
        // Regression: the pixels of one seed's image, so a change of RNG, placement or
        // rasterisation is noticed (FNV-1a over the raw RGB bytes).
        let hash = render(&scene(42))
            .as_raw()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        assert_eq!(hash, 17_605_458_036_520_510_023, "pixel hash of seed 42");
    }

    #[test]
    fn boxes_are_the_tight_boxes_of_the_drawn_pixels() {
        for seed in 0..300 {
            let s = scene(seed);
            let img = render(&s);
            for (k, o) in s.objects.iter().enumerate() {
                // Objects never overlap and their colours differ from the grey background, so the
                // pixels of object k are those it covers; check both directions.
                let (mut x1, mut y1, mut x2, mut y2) = (u32::MAX, u32::MAX, 0, 0);
                for (px, py, p) in img.enumerate_pixels() {
                    let mine = o.covers(px, py);
                    if mine {
                        assert_eq!(p.0, o.colour, "seed {seed} object {k} pixel ({px},{py})");
                        x1 = x1.min(px);
                        y1 = y1.min(py);
                        x2 = x2.max(px + 1);
                        y2 = y2.max(py + 1);
                    } else if s.objects.iter().all(|q| !q.covers(px, py)) {
                        assert_eq!(p.0, BACKGROUND);
                    }
                }
                let drawn = [x1, y1, x2, y2].map(f64::from);
                assert_eq!(o.bbox.corners(), drawn, "seed {seed} object {k}");
            }
        }
    }
}
