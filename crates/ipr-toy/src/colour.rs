//! HSV colour arithmetic shared by the renderer and the toy detector.
//!
//! The toy world tells classes apart by hue. Hue is the right feature because the background is
//! a neutral grey: blurring an object into the background, or scaling its saturation or
//! brightness, mixes its colour with grey, which changes chroma but leaves hue where it was.

/// Hue in degrees `[0, 360)` and chroma (`max - min` of the channels, 0..=255) of a pixel.
/// The hue of a grey pixel (chroma 0) is reported as 0; callers gate on chroma first.
pub fn hue_chroma(rgb: [u8; 3]) -> (f64, f64) {
    let [r, g, b] = rgb.map(f64::from);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let c = max - min;
    if c == 0.0 {
        return (0.0, 0.0);
    }
    let h = if max == r {
        ((g - b) / c).rem_euclid(6.0)
    } else if max == g {
        (b - r) / c + 2.0
    } else {
        (r - g) / c + 4.0
    };
    ((h * 60.0).rem_euclid(360.0), c)
}

/// The shorter way round the hue circle between two hues, in degrees `[0, 180]`.
pub fn hue_distance(a: f64, b: f64) -> f64 {
    let d = (a - b).rem_euclid(360.0);
    d.min(360.0 - d)
}

/// 8-bit RGB to HSV: hue in degrees `[0, 360)`, saturation and value in `[0, 1]`.
pub fn rgb_to_hsv(rgb: [u8; 3]) -> (f64, f64, f64) {
    let (h, c) = hue_chroma(rgb);
    let max = f64::from(rgb[0].max(rgb[1]).max(rgb[2]));
    let s = if max > 0.0 { c / max } else { 0.0 };
    (h, s, max / 255.0)
}

/// HSV (hue in degrees, saturation and value in `[0, 1]`) to 8-bit RGB.
pub fn hsv_to_rgb(hue: f64, saturation: f64, value: f64) -> [u8; 3] {
    let h = hue.rem_euclid(360.0) / 60.0;
    let c = value * saturation;
    let x = c * (1.0 - (h.rem_euclid(2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = value - c;
    [r, g, b].map(|v| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_hue() {
        for i in 0..72 {
            let hue = i as f64 * 5.0;
            let rgb = hsv_to_rgb(hue, 0.8, 0.9);
            let (h, c) = hue_chroma(rgb);
            assert!(hue_distance(h, hue) < 1.0, "hue {hue} came back as {h}");
            assert!((c - 0.72 * 255.0).abs() < 1.5, "chroma {c}");
            let (h2, s, v) = rgb_to_hsv(rgb);
            assert_eq!(h2, h);
            assert!((s - 0.8).abs() < 0.01 && (v - 0.9).abs() < 0.01, "s {s} v {v}");
        }
    }

    #[test]
    fn mixing_with_grey_keeps_hue() {
        let c = hsv_to_rgb(200.0, 0.9, 0.8);
        for alpha in [0.3, 0.5, 0.8] {
            let mixed = c.map(|v| (alpha * f64::from(v) + (1.0 - alpha) * 200.0).round() as u8);
            let (h, _) = hue_chroma(mixed);
            assert!(hue_distance(h, 200.0) < 3.0, "alpha {alpha}: hue {h}");
        }
        assert_eq!(hue_chroma([7, 7, 7]), (0.0, 0.0));
        assert_eq!(hue_distance(350.0, 10.0), 20.0);
    }
}
