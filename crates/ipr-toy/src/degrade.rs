//! Image degradations that imitate a generative model's imperfections: blur, colour drift
//! (hue shift, saturation and brightness scaling) and pixel noise.
//!
//! Rendered scenes are crisp and exact; samples from a diffusion model are soft, slightly off
//! in colour and noisy. These seeded, deterministic functions turn renders into such images so
//! the detector's tolerances can be stated and tested (see `ipr-detect`).

use crate::colour::{hsv_to_rgb, rgb_to_hsv};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Gaussian blur with standard deviation `sigma` pixels (separable, kernel radius
/// `ceil(3 sigma)`, edges clamped). `sigma <= 0` returns the image unchanged.
pub fn gaussian_blur(img: &RgbImage, sigma: f64) -> RgbImage {
    if sigma <= 0.0 {
        return img.clone();
    }
    let radius = (3.0 * sigma).ceil() as i64;
    let kernel: Vec<f64> = (-radius..=radius).map(|d| (-((d * d) as f64) / (2.0 * sigma * sigma)).exp()).collect();
    let norm: f64 = kernel.iter().sum();
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let pass = |src: &[f64], horizontal: bool| -> Vec<f64> {
        let mut out = vec![0.0; src.len()];
        for y in 0..h {
            for x in 0..w {
                for ch in 0..3 {
                    let mut acc = 0.0;
                    for (k, weight) in kernel.iter().enumerate() {
                        let d = k as i64 - radius;
                        let (sx, sy) =
                            if horizontal { ((x + d).clamp(0, w - 1), y) } else { (x, (y + d).clamp(0, h - 1)) };
                        acc += weight * src[((sy * w + sx) * 3 + ch) as usize];
                    }
                    out[((y * w + x) * 3 + ch) as usize] = acc / norm;
                }
            }
        }
        out
    };
    let src: Vec<f64> = img.as_raw().iter().map(|&v| f64::from(v)).collect();
    let blurred = pass(&pass(&src, true), false);
    let raw = blurred.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect();
    RgbImage::from_raw(img.width(), img.height(), raw).expect("same size")
}

/// Shift every pixel's hue by `hue_shift` degrees and scale its saturation and value.
/// Grey pixels (the background) keep their hue-less grey, scaled by `value_scale`.
pub fn drift_colour(img: &RgbImage, hue_shift: f64, saturation_scale: f64, value_scale: f64) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let (h, s, v) = rgb_to_hsv(p.0);
        p.0 = hsv_to_rgb(h + hue_shift, (s * saturation_scale).clamp(0.0, 1.0), (v * value_scale).clamp(0.0, 1.0));
    }
    out
}

/// Add independent uniform noise in `[-amplitude, amplitude]` to every channel of every pixel.
pub fn add_noise(img: &RgbImage, amplitude: f64, seed: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = img.clone();
    for p in out.pixels_mut() {
        *p =
            Rgb(p.0.map(|v| (f64::from(v) + rng.random_range(-amplitude..=amplitude)).round().clamp(0.0, 255.0) as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colour::{hue_chroma, hue_distance};

    #[test]
    fn blur_spreads_and_preserves_mean() {
        let mut img = RgbImage::from_pixel(9, 9, Rgb([0, 0, 0]));
        img.put_pixel(4, 4, Rgb([255, 255, 255]));
        let b = gaussian_blur(&img, 1.0);
        assert!(b.get_pixel(4, 4).0[0] < 255 && b.get_pixel(5, 4).0[0] > 0);
        assert_eq!(b.get_pixel(5, 4), b.get_pixel(3, 4));
        let sum: u32 = b.pixels().map(|p| u32::from(p.0[0])).sum();
        assert!((i64::from(sum) - 255).abs() <= 10, "sum {sum}");
        assert_eq!(gaussian_blur(&img, 0.0), img);
    }

    #[test]
    fn drift_and_noise() {
        let img = RgbImage::from_pixel(2, 1, Rgb(hsv_to_rgb(100.0, 0.8, 0.8)));
        let d = drift_colour(&img, 15.0, 0.5, 1.1);
        let (h, s, v) = rgb_to_hsv(d.get_pixel(0, 0).0);
        assert!(hue_distance(h, 115.0) < 1.0 && (s - 0.4).abs() < 0.01 && (v - 0.88).abs() < 0.01);
        let grey = RgbImage::from_pixel(2, 1, Rgb([100, 100, 100]));
        assert_eq!(hue_chroma(drift_colour(&grey, 40.0, 2.0, 1.0).get_pixel(0, 0).0).1, 0.0);
        assert_eq!(add_noise(&grey, 5.0, 3), add_noise(&grey, 5.0, 3));
        assert!(add_noise(&grey, 5.0, 3).pixels().all(|p| p.0.iter().all(|&v| (95..=105).contains(&v))));
    }
}
