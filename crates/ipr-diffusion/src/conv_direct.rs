//! The product of [`crate::conv`]'s padded-rows convolution without im2col columns, as an
//! AVX-512 kernel that reads the zero-padded input planes directly: for a block of 8 output
//! channels x 48 output pixels (24 accumulator registers), each term (channel, kh, kw) is three
//! loads at offset `c plane + kh Wp + kw` and 24 fused multiply-adds with the broadcast weights.
//!
//! Why: building the im2col columns copied the input 9 times (for 3x3) before the product read
//! it again; at toy size that copying cost about a third as much as the product (`perf`).
//!
//! The sums are those of the `gemm` crate's AVX-512 kernel on the im2col product, bit for bit
//! (tested): one accumulator per output element, a fused multiply-add per term in the order
//! (channel, kh, kw), the sum cut into blocks of `K` where `gemm` cuts it ([`k_block`]), each
//! block's sum added to the destination (the bias, or nothing for the first block without one).

/// Pixels per block of the input-gradient kernel, and of the forward kernel on wide rows:
/// three 16-lane vectors (x 8 channels: 24 accumulators).
pub(crate) const PIXELS: usize = 48;

/// Pixels per block of the forward kernel where that pads less: five vectors (x 4 channels),
/// the 80 pixels of an 8 x 8 image in rows of 10.
const WIDE_PIXELS: usize = 80;

/// Zeros the input planes need after their last element: a block reads up to [`WIDE_PIXELS`]
/// pixels past the end of the output domain.
pub(crate) const SLACK: usize = WIDE_PIXELS;

/// The forward kernel's pixels per block for `n` output pixels: whichever of 48 and 80 pads
/// `n` less (48 on ties).
pub(crate) fn forward_block(n: usize) -> usize {
    if n.next_multiple_of(WIDE_PIXELS) < n.next_multiple_of(PIXELS) {
        WIDE_PIXELS
    } else {
        PIXELS
    }
}

/// Whether the kernel runs here (the CPU has AVX-512F).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where the `gemm` crate cuts the sum over `k` terms of a product `dst (rows x n) = A x B`
/// with a row-major `dst`, which it computes transposed (`n x rows`) with its 64 x 6 AVX-512
/// f32 kernel: at 512 terms when both sides are at most 64, else where its cache model says.
pub(crate) fn k_block(rows: usize, n: usize, k: usize) -> usize {
    if n <= 64 && rows <= 64 {
        k.min(512)
    } else {
        gemm_common::cache::kernel_params(n, rows, k, 64, 6, std::mem::size_of::<f32>()).kc
    }
}

/// The padded input of one band: `c` planes `plane` elements apart, rows `wp` apart, followed by
/// at least [`SLACK`] zeros.
pub(crate) struct Planes<'a> {
    pub data: &'a [f32],
    pub c: usize,
    pub plane: usize,
    pub wp: usize,
    pub k: usize,
}

/// `acc[o * ld + p] (+)= sum over (channel, kh, kw) of wk[term * c_out + o] x
/// planes[c plane + kh wp + kw + p]` for every output channel `o` and pixel `p < ld` in blocks
/// of `block` ([`forward_block`]; pixels past the output's get values that are ignored), the
/// sum cut every `kc` terms ([`k_block`] of the im2col product this replaces). `acc` starts as
/// the bias (`has_bias`), else its old contents are not read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    x: &Planes,
    wk: &[f32],
    c_out: usize,
    acc: &mut [f32],
    ld: usize,
    block: usize,
    kc: usize,
    has_bias: bool,
) {
    let terms = x.c * x.k * x.k;
    assert!(block == PIXELS || block == WIDE_PIXELS);
    assert!(wk.len() >= terms * c_out && ld.is_multiple_of(block) && acc.len() >= c_out * ld && kc > 0);
    let offsets: Vec<usize> =
        (0..terms).map(|t| (t / (x.k * x.k)) * x.plane + ((t / x.k) % x.k) * x.wp + t % x.k).collect();
    assert!(offsets.last().is_none_or(|&o| o + ld <= x.data.len()), "planes lack their slack");
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available());
        // SAFETY: AVX-512F is present (checked); the reads stay inside `x.data` (the last
        // offset plus `ld` is inside, asserted) and the writes inside `acc` (c_out rows of ld).
        unsafe { avx512::product(x.data, &offsets, wk, c_out, ld, block, acc, kc, has_bias) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, wk, c_out, acc, ld, block, has_bias, kc, offsets);
        unreachable!("conv_direct::product without AVX-512");
    }
}

/// The input gradient of a stride-1 convolution in the padded-width domain of `x.wp` columns:
/// `acc[c * ld + p] += sum over (kh, kw) in order of (sum over co of wt[(kk c_out + co) c_in +
/// c] x g[co plane + (k-1-kh) wp + (k-1-kw) + p])`, `kk = kh k + kw`, where `x` holds the output
/// gradient's `c_out` planes zero-padded by `k - 1 - pad`. These are the sums of the im2col path
/// (`Wᵀ x grad` by `gemm`, its sum over `co` cut at `kc` = [`k_block`] of that product, then
/// col2im adding each (kh, kw) in order) for each element, so its bits (tested). `acc` starts
/// at zero (the caller's).
pub(crate) fn input_grad_product(x: &Planes, wt: &[f32], c_in: usize, acc: &mut [f32], ld: usize, kc: usize) {
    let kk = x.k * x.k;
    assert!(wt.len() >= kk * x.c * c_in && ld.is_multiple_of(PIXELS) && acc.len() >= c_in * ld && kc > 0);
    let shifts: Vec<usize> = (0..kk).map(|t| (x.k - 1 - t / x.k) * x.wp + (x.k - 1 - t % x.k)).collect();
    let last = (x.c.max(1) - 1) * x.plane + shifts.first().copied().unwrap_or(0) + ld;
    assert!(last <= x.data.len(), "planes lack their slack");
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available());
        // SAFETY: AVX-512F is present (checked); every read is below `last`, inside `x.data`
        // (the largest shift is the first), and the writes stay in `acc` (c_in rows of ld).
        unsafe { avx512::input_grad(x.data, x.plane, x.c, &shifts, wt, c_in, ld, acc, kc) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (wt, c_in, acc, kc, shifts);
        unreachable!("conv_direct::input_grad_product without AVX-512");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::PIXELS;
    use std::arch::x86_64::*;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        x: &[f32],
        offsets: &[usize],
        wk: &[f32],
        c_out: usize,
        ld: usize,
        pixels: usize,
        acc: &mut [f32],
        kc: usize,
        has_bias: bool,
    ) {
        let f = Forward { x, offsets, wk, c_out, ld, kc, has_bias };
        let mut o = 0;
        while o < c_out {
            o += match (c_out - o, pixels) {
                (8.., PIXELS) => f.block::<8, 3>(o, acc),
                (4.., PIXELS) => f.block::<4, 3>(o, acc),
                (2..=3, PIXELS) => f.block::<2, 3>(o, acc),
                (_, PIXELS) => f.block::<1, 3>(o, acc),
                (4.., _) => f.block::<4, 5>(o, acc),
                (2..=3, _) => f.block::<2, 5>(o, acc),
                _ => f.block::<1, 5>(o, acc),
            };
        }
    }

    /// The operands of the forward kernel.
    struct Forward<'a> {
        x: &'a [f32],
        offsets: &'a [usize],
        wk: &'a [f32],
        c_out: usize,
        ld: usize,
        kc: usize,
        has_bias: bool,
    }

    impl Forward<'_> {
        /// Output channels `o0 .. o0 + CB`, every block of `16 NV` pixels; returns `CB`.
        #[inline(always)]
        unsafe fn block<const CB: usize, const NV: usize>(&self, o0: usize, acc: &mut [f32]) -> usize {
            let terms = self.offsets.len();
            for p0 in (0..self.ld).step_by(16 * NV) {
                let mut start = 0;
                while start < terms {
                    let end = (start + self.kc).min(terms);
                    let mut a = [[_mm512_setzero_ps(); NV]; CB];
                    for (t, &off) in self.offsets.iter().enumerate().take(end).skip(start) {
                        let src = self.x.as_ptr().add(off + p0);
                        let mut v = [_mm512_setzero_ps(); NV];
                        for (i, v) in v.iter_mut().enumerate() {
                            *v = _mm512_loadu_ps(src.add(16 * i));
                        }
                        let w = self.wk.as_ptr().add(t * self.c_out + o0);
                        for (j, a) in a.iter_mut().enumerate() {
                            let wj = _mm512_set1_ps(*w.add(j));
                            for (a, v) in a.iter_mut().zip(v) {
                                *a = _mm512_fmadd_ps(v, wj, *a);
                            }
                        }
                    }
                    let first_alone = start == 0 && !self.has_bias;
                    for (j, a) in a.iter().enumerate() {
                        let dst = acc.as_mut_ptr().add((o0 + j) * self.ld + p0);
                        for (i, &a) in a.iter().enumerate() {
                            let d = dst.add(16 * i);
                            let r = if first_alone { a } else { _mm512_add_ps(_mm512_loadu_ps(d), a) };
                            _mm512_storeu_ps(d, r);
                        }
                    }
                    start = end;
                }
            }
            CB
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_grad(
        g: &[f32],
        plane: usize,
        c_out: usize,
        shifts: &[usize],
        wt: &[f32],
        c_in: usize,
        ld: usize,
        acc: &mut [f32],
        kc: usize,
    ) {
        let mut c = 0;
        while c < c_in {
            let cb = match c_in - c {
                8.. => 8,
                4..=7 => 4,
                2..=3 => 2,
                _ => 1,
            };
            let a = Grad { g, plane, c_out, wt, c_in, c0: c };
            match cb {
                8 => a.block::<8>(shifts, ld, acc, kc),
                4 => a.block::<4>(shifts, ld, acc, kc),
                2 => a.block::<2>(shifts, ld, acc, kc),
                _ => a.block::<1>(shifts, ld, acc, kc),
            }
            c += cb;
        }
    }

    /// The operands of one block of input channels `c0 ..` of the input gradient.
    struct Grad<'a> {
        g: &'a [f32],
        plane: usize,
        c_out: usize,
        wt: &'a [f32],
        c_in: usize,
        c0: usize,
    }

    impl Grad<'_> {
        /// Sum over output channels `co0 .. co1` for term `kk` at pixel `p0`: FMAs from zero.
        #[inline(always)]
        unsafe fn terms<const CB: usize>(
            &self,
            kk: usize,
            shift: usize,
            p0: usize,
            co0: usize,
            co1: usize,
        ) -> [[__m512; 3]; CB] {
            let mut t = [[_mm512_setzero_ps(); 3]; CB];
            for co in co0..co1 {
                let src = self.g.as_ptr().add(co * self.plane + shift + p0);
                let v = [_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)), _mm512_loadu_ps(src.add(32))];
                let w = self.wt.as_ptr().add((kk * self.c_out + co) * self.c_in + self.c0);
                for (j, t) in t.iter_mut().enumerate() {
                    let wj = _mm512_set1_ps(*w.add(j));
                    for (t, v) in t.iter_mut().zip(v) {
                        *t = _mm512_fmadd_ps(v, wj, *t);
                    }
                }
            }
            t
        }

        #[inline(always)]
        unsafe fn block<const CB: usize>(&self, shifts: &[usize], ld: usize, acc: &mut [f32], kc: usize) {
            for p0 in (0..ld).step_by(PIXELS) {
                for (kk, &shift) in shifts.iter().enumerate() {
                    let t = if self.c_out <= kc {
                        self.terms::<CB>(kk, shift, p0, 0, self.c_out)
                    } else {
                        // gemm's blocks of the sum over co, each added to the ones before.
                        let mut t = self.terms::<CB>(kk, shift, p0, 0, kc);
                        let mut start = kc;
                        while start < self.c_out {
                            let u = self.terms::<CB>(kk, shift, p0, start, (start + kc).min(self.c_out));
                            for (t, u) in t.iter_mut().zip(u) {
                                for (t, u) in t.iter_mut().zip(u) {
                                    *t = _mm512_add_ps(*t, u);
                                }
                            }
                            start += kc;
                        }
                        t
                    };
                    for (j, t) in t.iter().enumerate() {
                        let dst = acc.as_mut_ptr().add((self.c0 + j) * ld + p0);
                        for (i, &t) in t.iter().enumerate() {
                            let d = dst.add(16 * i);
                            _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), t));
                        }
                    }
                }
            }
        }
    }
}
