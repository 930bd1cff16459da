//! Pillow's bicubic resize of 8-bit images, bit for bit (Pillow `libImaging/Resample.c`, the
//! convolution resampler of Pillow >= 2.7 by A. Karpinsky; Keys 1981 cubic with a = -0.5).
//!
//! transformers' PIL image backend resizes uint8 images with `PIL.Image.resize(..., BICUBIC)`,
//! and VISOR's OWL-ViT ran on that. A pixel off by one moves OWL-ViT scores by ~0.006
//! (`docs/stack-notes.md`), enough to flip detections near VISOR's 0.1 threshold, so this is a
//! transcription of Pillow's arithmetic rather than a generic bicubic: antialiasing support scaled
//! by the downscale factor, coefficients rounded to 22-bit fixed point, a horizontal pass whose
//! result is clipped to uint8, then a vertical pass.

/// Fixed-point precision of the 8-bit resampler (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Support of the bicubic filter at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, number of taps, and `ksize` fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[0, in_size)`.
fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let n = xmax.max(0) as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, &kx) in k.iter().enumerate().take(n) {
            let kx = if ww != 0.0 { kx / ww } else { kx };
            let fixed = kx * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if kx < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((xmin as usize, n));
    }
    Coeffs { ksize, bounds, weights }
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Horizontal pass over rows `first..last` of `src` (`width` pixels wide); returns those rows
/// resampled to the coefficients' output width.
fn horizontal_pass(src: &[u8], width: usize, channels: usize, rows: std::ops::Range<usize>, k: &Coeffs) -> Vec<u8> {
    let new_width = k.bounds.len();
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; rows.len() * new_width * channels];
    for (oy, y) in rows.enumerate() {
        let row = &src[y * width * channels..(y + 1) * width * channels];
        for (xx, &(xmin, n)) in k.bounds.iter().enumerate() {
            let w = &k.weights[xx * k.ksize..xx * k.ksize + n];
            for c in 0..channels {
                let mut ss = half;
                for (x, &kx) in w.iter().enumerate() {
                    ss += row[(xmin + x) * channels + c] as i32 * kx;
                }
                out[(oy * new_width + xx) * channels + c] = clip8(ss);
            }
        }
    }
    out
}

/// Vertical pass: output row `yy` reads `src` rows `bounds[yy].0 - row0 ..` (`src` holds the
/// input rows from `row0` on, `width` pixels wide).
fn vertical_pass(src: &[u8], width: usize, channels: usize, row0: usize, k: &Coeffs) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let stride = width * channels;
    let mut out = vec![0u8; k.bounds.len() * stride];
    for (yy, &(ymin, n)) in k.bounds.iter().enumerate() {
        let ymin = ymin - row0;
        let w = &k.weights[yy * k.ksize..yy * k.ksize + n];
        for i in 0..stride {
            let mut ss = half;
            for (y, &ky) in w.iter().enumerate() {
                ss += src[(ymin + y) * stride + i] as i32 * ky;
            }
            out[yy * stride + i] = clip8(ss);
        }
    }
    out
}

/// Which pass runs first when both are needed. Pillow <= 12 always ran the horizontal pass
/// first; Pillow 13 (python-pillow/Pillow#9549, "if height is scaled down significantly more than
/// width, resize vertically first") runs the vertical pass first when the height shrinks by more
/// than twice as many pixels as the width does. The rule is inferred from Pillow 13.0's output
/// (1474 of 1474 random shapes where the two orders differ, all kinds of size change); the order
/// matters because the intermediate image is rounded to uint8.
fn vertical_first(width: usize, height: usize, new_width: usize, new_height: usize) -> bool {
    new_height < height && (height - new_height) as i64 > 2 * (width as i64 - new_width as i64)
}

/// Resizes an interleaved 8-bit image of `channels` channels (`width * height * channels` bytes,
/// rows top to bottom) to `new_width x new_height` as `PIL.Image.resize(size, BICUBIC)` of
/// Pillow 13 does.
pub fn resize_bicubic(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    new_width: usize,
    new_height: usize,
) -> Vec<u8> {
    assert_eq!(pixels.len(), width * height * channels, "pixel buffer does not match its size");
    assert!(new_width > 0 && new_height > 0 && width > 0 && height > 0, "empty image");
    let (need_h, need_v) = (new_width != width, new_height != height);
    match (need_h, need_v) {
        (false, false) => pixels.to_vec(),
        (true, false) => horizontal_pass(pixels, width, channels, 0..height, &coeffs(width, new_width)),
        (false, true) => vertical_pass(pixels, width, channels, 0, &coeffs(height, new_height)),
        (true, true) => {
            let (hk, vk) = (coeffs(width, new_width), coeffs(height, new_height));
            if vertical_first(width, height, new_width, new_height) {
                let tmp = vertical_pass(pixels, width, channels, 0, &vk);
                horizontal_pass(&tmp, width, channels, 0..new_height, &hk)
            } else {
                // Only the rows the vertical pass reads (Pillow's ybox_first..ybox_last).
                let first = vk.bounds[0].0;
                let last = vk.bounds.iter().map(|&(s, n)| s + n).max().unwrap_or(height);
                let tmp = horizontal_pass(pixels, width, channels, first..last, &hk);
                vertical_pass(&tmp, new_width, channels, first, &vk)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_constant_images() {
        let px: Vec<u8> = (0..5 * 3 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_bicubic(&px, 5, 3, 3, 5, 3), px);
        // Weights sum to one in fixed point, so a flat image stays flat at any scale.
        let flat = vec![200u8; 7 * 4];
        for (w, h) in [(3, 2), (16, 9), (7, 1)] {
            assert!(resize_bicubic(&flat, 7, 4, 1, w, h).iter().all(|&v| v == 200), "{w}x{h}");
        }
    }

    #[test]
    fn bicubic_kernel_is_keys_a_minus_half() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        assert!((bicubic(0.5) - 0.5625).abs() < 1e-12);
        assert!((bicubic(1.5) + 0.0625).abs() < 1e-12);
    }
}
