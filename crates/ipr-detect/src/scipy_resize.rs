//! The float resize of transformers' `Owlv2ImageProcessor` (Minderer et al. 2023, "Scaling
//! Open-Vocabulary Object Detection", OWLv2), which follows scikit-image's `resize` with
//! anti-aliasing: `scipy.ndimage.gaussian_filter` with `sigma = max(0, (in/out - 1) / 2)` per axis
//! (truncate 4, mode "mirror"), then `scipy.ndimage.zoom(order=1, mode="mirror", grid_mode=True)`,
//! then clipping to the input's value range.
//!
//! Arithmetic follows scipy: float64 accumulation, float32 storage after each pass (the image is
//! float32), so results agree with transformers to float32 rounding.

/// An `height x width x channels` float32 image (HWC, as scipy sees it).
#[derive(Debug, Clone, PartialEq)]
pub struct HwcImage {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl HwcImage {
    fn at(&self, y: usize, x: usize, c: usize) -> f32 {
        self.data[(y * self.width + x) * self.channels + c]
    }
}

/// scipy's "mirror" extension (reflect about the edge samples: d c b | a b c d | c b a).
fn mirror(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let mut i = i.rem_euclid(period);
    if i >= n as isize {
        i = period - i;
    }
    i as usize
}

/// `scipy.ndimage._filters._gaussian_kernel1d(sigma, 0, radius)` with radius `int(4 sigma + 0.5)`.
fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let s2 = sigma * sigma;
    let phi: Vec<f64> = (-radius..=radius).map(|x| (-0.5 / s2 * (x * x) as f64).exp()).collect();
    let sum: f64 = phi.iter().sum();
    phi.iter().map(|p| p / sum).collect()
}

/// `correlate1d` of one axis (0 = rows, 1 = columns) with a symmetric kernel, mode "mirror".
fn correlate_axis(img: &HwcImage, kernel: &[f64], axis: usize) -> HwcImage {
    let r = (kernel.len() / 2) as isize;
    let n = if axis == 0 { img.height } else { img.width };
    let mut out = img.clone();
    for y in 0..img.height {
        for x in 0..img.width {
            for c in 0..img.channels {
                let pos = if axis == 0 { y } else { x } as isize;
                let get = |d: isize| {
                    let j = mirror(pos + d, n);
                    f64::from(if axis == 0 { img.at(j, x, c) } else { img.at(y, j, c) })
                };
                // scipy's symmetric-kernel loop: centre, then pairs outward.
                let mut acc = get(0) * kernel[r as usize];
                for d in 1..=r {
                    acc += (get(d) + get(-d)) * kernel[(r + d) as usize];
                }
                out.data[(y * img.width + x) * img.channels + c] = acc as f32;
            }
        }
    }
    out
}

/// `gaussian_filter(image, sigma=(sy, sx, 0), mode="mirror")`: axes with sigma <= 1e-15 are skipped.
pub fn gaussian_filter(img: &HwcImage, sigma_y: f64, sigma_x: f64) -> HwcImage {
    let mut out = img.clone();
    if sigma_y > 1e-15 {
        out = correlate_axis(&out, &gaussian_kernel(sigma_y), 0);
    }
    if sigma_x > 1e-15 {
        out = correlate_axis(&out, &gaussian_kernel(sigma_x), 1);
    }
    out
}

/// Linear taps of `zoom(grid_mode=True)` along one axis: input coordinate `(k + 0.5) * in/out - 0.5`,
/// mirrored at the edges.
fn linear_taps(n_in: usize, n_out: usize) -> Vec<[(usize, f64); 2]> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|k| {
            let cc = (k as f64 + 0.5) * scale - 0.5;
            let start = cc.floor();
            let t = cc - start;
            let s = start as isize;
            [(mirror(s, n_in), 1.0 - t), (mirror(s + 1, n_in), t)]
        })
        .collect()
}

/// `zoom(image, (H/h, W/w, 1), order=1, mode="mirror", grid_mode=True)`.
pub fn zoom_linear(img: &HwcImage, new_height: usize, new_width: usize) -> HwcImage {
    let ty = linear_taps(img.height, new_height);
    let tx = linear_taps(img.width, new_width);
    let mut data = Vec::with_capacity(new_height * new_width * img.channels);
    for wy in &ty {
        for wx in &tx {
            for c in 0..img.channels {
                let mut acc = 0.0f64;
                for &(y, fy) in wy {
                    for &(x, fx) in wx {
                        acc += fy * fx * f64::from(img.at(y, x, c));
                    }
                }
                data.push(acc as f32);
            }
        }
    }
    HwcImage { height: new_height, width: new_width, channels: img.channels, data }
}

/// transformers' `Owlv2ImageProcessor.resize`: anti-aliasing Gaussian, linear zoom, and clipping
/// to the input's `[min, max]`.
pub fn resize_antialiased(img: &HwcImage, new_height: usize, new_width: usize) -> HwcImage {
    let sy = ((img.height as f64 / new_height as f64 - 1.0) / 2.0).max(0.0);
    let sx = ((img.width as f64 / new_width as f64 - 1.0) / 2.0).max(0.0);
    let filtered = gaussian_filter(img, sy, sx);
    let mut out = zoom_linear(&filtered, new_height, new_width);
    let (lo, hi) = img.data.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    for v in &mut out.data {
        *v = v.clamp(lo, hi);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_reflects_about_edge_samples() {
        let got: Vec<usize> = (-3..7).map(|i| mirror(i, 4)).collect();
        assert_eq!(got, [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
    }

    #[test]
    fn kernel_is_normalised_and_sized_like_scipy() {
        let k = gaussian_kernel(0.9);
        assert_eq!(k.len(), 9); // radius int(3.6 + 0.5) = 4
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn constant_images_stay_constant() {
        let img = HwcImage { height: 7, width: 5, channels: 2, data: vec![0.25; 70] };
        let out = resize_antialiased(&img, 3, 11);
        assert!(out.data.iter().all(|&v| (v - 0.25).abs() < 1e-7));
        assert_eq!((out.height, out.width), (3, 11));
    }
}
