//! Element functions in f32 that the compiler can vectorise: no libm calls, no branches.
//!
//! The CPU kernels call these once per element of every activation; libm's scalar `expf` and
//! `erff` stop a loop from being vectorised and were about 8% of a toy LoRA training step
//! (`perf`, one thread). Accuracy: `exp_f32` within 2 ulp of the exact value on the range used,
//! `erf_f32` within 1.5e-7 absolute (tests below, against f64).

// Polynomial coefficients are written as published, beyond f32's precision.
#![allow(clippy::excessive_precision)]

/// `e^x` by range reduction to `x = n ln2 + r`, |r| <= ln2 / 2, and Cephes' degree-5 minimax
/// polynomial for `e^r`. Inputs are clamped to [-87, 88] (results stay normal floats).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Round-to-nearest by adding and removing 1.5 * 2^23 (no `round` call, which SSE2 lacks).
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    // ln2 split in two so that `n * C1` is exact.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    // 2^n from the integer that `shifted` holds in its low mantissa bits (its bits minus
    // SHIFTER's are n, -126 <= n <= 127): integer lanes only. `n as i32` is the same number, but
    // its saturating, NaN-checked conversion is scalar code per lane, which was most of the
    // cost of the element kernels (`perf annotate`).
    let n_bits = shifted.to_bits().wrapping_sub(SHIFTER.to_bits());
    er * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// `erf(x)`: its Taylor series for |x| < 0.5 (7 terms, truncation < 1e-9), else `1 - erfc` with
/// Numerical Recipes' Chebyshev fit `erfc(z) = t e^{-z^2 + poly(t)}`, `t = 1 / (1 + z/2)`
/// (fractional error < 1.2e-7); odd-extended. Both are computed and one is selected, so the
/// loop stays branch-free.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x2 = x * x;
    let s = 1.205_533_3e-4;
    let s = s * x2 - 8.548_327e-4;
    let s = s * x2 + 5.223_977_6e-3;
    let s = s * x2 - 2.686_617_1e-2;
    let s = s * x2 + 0.112_837_92;
    let s = s * x2 - 0.376_126_39;
    let s = s * x2 + std::f32::consts::FRAC_2_SQRT_PI;
    let series = x * s;
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = 0.170_872_77;
    let p = p * t - 0.822_152_23;
    let p = p * t + 1.488_515_9;
    let p = p * t - 1.135_203_9;
    let p = p * t + 0.278_868_07;
    let p = p * t - 0.186_288_06;
    let p = p * t + 0.096_784_18;
    let p = p * t + 0.374_091_96;
    let p = p * t + 1.000_023_7;
    let p = p * t - 1.265_512_2;
    let tail = (1.0 - t * exp_f32(-x2 + p)).copysign(x);
    if z < 0.5 {
        series
    } else {
        tail
    }
}

/// Sum of `f(v)` over an f32 row in f64, over 8 independent lanes so that the loop vectorises
/// (a single running f64 sum is one dependent add per element).
#[inline(always)]
pub fn lane_sum(row: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += f(c[k]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `sum(a[i] * b[i])` in f64, in 8 lanes as [`lane_sum`] (`a` and `b` of equal length).
#[inline(always)]
pub fn lane_dot(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| x as f64 * y as f64).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] as f64 * y[k] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The widest vectors (f32 lanes) the kernels of [`simd_dispatch`] may use: 4 (the SSE2
/// baseline), 8 (AVX2 + FMA) or 16 (AVX-512F), where the CPU has them.
static LANE_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(16);

/// Limits the kernels of [`simd_dispatch`] to vectors of at most `lanes` f32 (for tests and
/// benchmarks: every version returns the same bits).
pub fn set_lane_limit(lanes: usize) {
    LANE_LIMIT.store(lanes, std::sync::atomic::Ordering::Relaxed);
}

/// Makes the kernels of [`simd_dispatch`] take their portable version ([`set_lane_limit`] 4), or
/// lifts the limit.
pub fn set_portable_only(on: bool) {
    set_lane_limit(if on { 4 } else { 16 });
}

/// Whether the AVX2 + FMA versions may run: the CPU has them and the lane limit allows 8.
pub fn wide_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        LANE_LIMIT.load(std::sync::atomic::Ordering::Relaxed) >= 8
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the AVX-512 versions run: [`wide_kernels`], the CPU has AVX-512F and the lane limit
/// allows 16.
pub fn widest_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    return wide_kernels()
        && LANE_LIMIT.load(std::sync::atomic::Ordering::Relaxed) >= 16
        && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Defines `fn $name(args) -> ret` three times, as built (x86-64's baseline: SSE2, 4 lanes),
/// with AVX2 + FMA enabled (8 lanes) and with AVX-512F (16 lanes), and picks the widest the CPU
/// has at run time. The element loops of the CPU kernels are the bodies; the closures they hand
/// to rayon inherit the enabled features. Rust never contracts `a * b + c` into a fused
/// multiply-add nor reorders float operations, and the f64 sums keep their 8 lanes whatever
/// the vector width, so every version returns the same bits. (AVX-512: the group norm + SiLU
/// forward a third faster than AVX2 on the 2-core AMD EPYC, sampling +4%.)
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if $crate::fastmath::widest_kernels() {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    fn widest($($arg: $ty),*) -> $ret $body
                    // SAFETY: the CPU has the features `widest` was compiled for.
                    return unsafe { widest($($arg),*) };
                }
                if $crate::fastmath::wide_kernels() {
                    #[target_feature(enable = "avx2,fma")]
                    fn wide($($arg: $ty),*) -> $ret $body
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            fn portable($($arg: $ty),*) -> $ret $body
            portable($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f64, hi: f64, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| (lo + (hi - lo) * i as f64 / n as f64) as f32)
    }

    #[test]
    fn exp_is_within_two_ulp() {
        for x in grid(-87.0, 88.0, 200_000) {
            let exact = (x as f64).exp();
            let got = exp_f32(x) as f64;
            let ulp = (exact as f32).abs() as f64 * f32::EPSILON as f64;
            assert!((got - exact).abs() <= 2.0 * ulp, "exp({x}) = {got}, expected {exact}");
        }
        assert_eq!(exp_f32(0.0), 1.0);
        // Clamped, finite and ordered at the ends.
        assert!(exp_f32(-1000.0) > 0.0 && exp_f32(1000.0).is_finite());
    }

    /// The exponent from `n as i32`, as this function computed it before its integer-lane
    /// version: the same bits for every f32 (a 1/61 sample of all of them, NaNs included).
    #[test]
    fn exp_bits_equal_the_saturating_cast_version() {
        fn reference(x: f32) -> f32 {
            const SHIFTER: f32 = 12_582_912.0;
            let x = x.clamp(-87.0, 88.0);
            let n = (x * std::f32::consts::LOG2_E + SHIFTER) - SHIFTER;
            let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
            let p = 1.987_569_1e-4;
            let p = p * r + 1.398_199_9e-3;
            let p = p * r + 8.333_452e-3;
            let p = p * r + 4.166_579_6e-2;
            let p = p * r + 1.666_666_5e-1;
            let p = p * r + 5.000_000_1e-1;
            let er = p * r * r + r + 1.0;
            er * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
        for bits in (0..=u32::MAX).step_by(61) {
            let x = f32::from_bits(bits);
            let (got, want) = (exp_f32(x), reference(x));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "exp({x:e}): {got:e} vs {want:e}"
            );
        }
    }

    #[test]
    fn sigmoid_matches_f64() {
        for x in grid(-40.0, 40.0, 100_000) {
            let exact = 1.0 / (1.0 + (-(x as f64)).exp());
            let got = sigmoid_f32(x) as f64;
            assert!((got - exact).abs() <= 2e-7 * exact.max(1e-30) + 1e-30, "sigmoid({x}) = {got}, expected {exact}");
        }
    }

    #[test]
    fn lane_sums_equal_sequential_sums() {
        let a: Vec<f32> = (0..21).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..21).map(|i| (i as f32 * 0.11).cos()).collect();
        let sum: f64 = a.iter().map(|&v| v as f64 * 2.0).sum();
        let dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((lane_sum(&a, |v| v as f64 * 2.0) - sum).abs() < 1e-14);
        assert!((lane_dot(&a, &b) - dot).abs() < 1e-14);
    }

    #[test]
    fn erf_is_within_1_5e7() {
        for x in grid(-6.0, 6.0, 200_000) {
            let exact = libm::erf(x as f64);
            let got = erf_f32(x) as f64;
            assert!((got - exact).abs() <= 1.5e-7, "erf({x}) = {got}, expected {exact}");
        }
    }
}
