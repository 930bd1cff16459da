//! The products of [`crate::conv`]'s stride-1 convolutions without im2col columns, as AVX-512
//! kernels that read the input planes directly.
//!
//! The forward ([`product`]) reads the input planes as they are: for a block of output channels
//! x pixels, each term (channel, kh, kw) is a few 16-lane loads at offset `c plane + (kh - pad)
//! W + kw - pad` from the pixel, the lanes whose input pixel falls outside the image (the zero
//! padding) masked to zero, and a fused multiply-add per accumulator with the broadcast weight.
//! No padded copy of the input, no padding columns computed (rows `W + pad` apart cost a ninth
//! more at 8x8), and the output planes written in place.
//! The input gradient ([`input_grad`]) reads the output gradient's planes the same way.
//!
//! Why: building the im2col columns copied the input 9 times (for 3x3) before the product read
//! it again; at toy size that copying cost about a third as much as the product (`perf`).
//!
//! The sums are those of the `gemm` crate's AVX-512 kernel on the im2col product, bit for bit
//! (tested): one accumulator per output element, a fused multiply-add per term in the order
//! (channel, kh, kw) (a masked lane adds `0 x w`, as the padding's zero did), the sum cut into
//! blocks of `K` where `gemm` cuts it ([`k_block`]), each block's sum added to the destination
//! (the bias, or nothing for the first block without one).

/// The forward kernel's blocks of pixels: 48 (8 channels x 3 vectors), 64 (6 x 4) or 80 (4 x 5).
const FORWARD_BLOCKS: [usize; 3] = [64, 48, 80];

/// The widest kernel the forward takes (its column masks are kept per `kw`).
pub(crate) const FORWARD_MAX_K: usize = 7;

/// The forward kernel's pixels per block for `n` output pixels: the one of [`FORWARD_BLOCKS`]
/// that pads `n` least (64 first on ties, then 48).
pub(crate) fn forward_block(n: usize) -> usize {
    FORWARD_BLOCKS.into_iter().min_by_key(|&b| n.next_multiple_of(b)).expect("blocks")
}

/// Whether the kernels run here (the CPU has AVX-512F).
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

/// A convolution the forward kernel computes: `c` input planes of `h x w`, a `k x k` kernel with
/// padding `(k - 1) / 2`, stride 1 ("same": `k` odd, at most [`FORWARD_MAX_K`]) or 2 (`k` = 3,
/// `h` and `w` even: the downsamplers). The kernel reads the input as `stride²` phase planes per
/// channel, phase `(a, b)` holding the pixels `(stride y + a, stride x + b)` ([`phases`]; at
/// stride 1 the image as it is), so that every term reads the output's pixels at one offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
}

impl Shape {
    /// Whether the kernel computes this shape.
    pub(crate) fn applies(&self) -> bool {
        let sized = self.c > 0 && self.h > 0 && self.w > 0;
        let same = self.stride == 1 && self.k % 2 == 1 && self.k <= FORWARD_MAX_K;
        let down = self.stride == 2 && self.k == 3 && self.h.is_multiple_of(2) && self.w.is_multiple_of(2);
        sized && (same || down)
    }

    /// Output rows and columns.
    pub(crate) fn out(&self) -> (usize, usize) {
        (self.h / self.stride, self.w / self.stride)
    }

    /// Kernel row (or column) `kh` reads input row `stride (y + d) + a` for output row `y`:
    /// `(a, d)`.
    fn tap(&self, kh: usize) -> (usize, isize) {
        let r = kh as isize - ((self.k - 1) / 2) as isize;
        let s = self.stride as isize;
        (r.rem_euclid(s) as usize, r.div_euclid(s))
    }
}

/// One band of output pixels `p0 .. p0 + n` of an image, computed in blocks of `block`
/// ([`forward_block`]); `masks[(v k + kh) k + kw]` holds the lanes of its `v`-th 16 pixels whose
/// input pixel for `(kh, kw)` lies inside the image (the others are the zero padding).
pub(crate) struct Band {
    pub p0: usize,
    pub n: usize,
    pub block: usize,
    masks: Vec<u16>,
}

/// What the forward kernel needs for one [`Shape`], the same for every image and channel, so
/// computed once: each term's offset from the output pixel in the phase planes, and the bands.
pub(crate) struct Plan {
    shape: Shape,
    offsets: Vec<isize>,
    bands: Vec<Band>,
}

impl Plan {
    /// The plan for `shape` (which must [`Shape::applies`]) in bands of `band_rows` output rows.
    pub(crate) fn new(shape: Shape, band_rows: usize) -> Self {
        assert!(shape.applies() && band_rows > 0, "conv_direct: {shape:?} is not a direct convolution");
        let (k, s) = (shape.k, shape.stride);
        let (ho, wo) = shape.out();
        // Term (c, kh, kw) reads phase (a, b) of channel c at the output pixel shifted by (dy, dx).
        let offsets = (0..shape.c * k * k)
            .map(|t| {
                let ((a, dy), (b, dx)) = (shape.tap((t / k) % k), shape.tap(t % k));
                ((t / (k * k)) * s * s * ho * wo + (a * s + b) * ho * wo) as isize + dy * wo as isize + dx
            })
            .collect();
        let bands = bands(shape, band_rows, |kh| shape.tap(kh).1);
        Self { shape, offsets, bands }
    }

    pub(crate) fn bands(&self) -> &[Band] {
        &self.bands
    }
}

/// The shape's output rows in bands of `band_rows`, each with the masks of its pixels for the
/// taps `tap(kh)` (the row and column shift of kernel row or column `kh`).
fn bands(shape: Shape, band_rows: usize, tap: impl Fn(usize) -> isize) -> Vec<Band> {
    let (ho, wo) = shape.out();
    (0..ho.div_ceil(band_rows))
        .map(|j| {
            let (oy0, oy1) = (j * band_rows, ((j + 1) * band_rows).min(ho));
            let (p0, n) = (oy0 * wo, (oy1 - oy0) * wo);
            let block = forward_block(n);
            Band { p0, n, block, masks: masks(shape, p0, n.next_multiple_of(block), &tap) }
        })
        .collect()
}

/// The lanes of every 16 output pixels from `p0` on (`len` of them) whose pixel read for `(kh,
/// kw)` (shifted by `tap(kh)` rows and `tap(kw)` columns) lies inside the planes: that of its
/// row times that of its column.
fn masks(shape: Shape, p0: usize, len: usize, tap: &impl Fn(usize) -> isize) -> Vec<u16> {
    let k = shape.k;
    let (ho, wo) = shape.out();
    let inside = |v: usize, d: isize, size: usize| (0..size as isize).contains(&(v as isize + d));
    let mut out = vec![0u16; len / 16 * k * k];
    let (mut y, mut x) = (p0 / wo, p0 % wo);
    for m in out.chunks_mut(k * k) {
        let (mut rows, mut cols) = ([0u16; FORWARD_MAX_K], [0u16; FORWARD_MAX_K]);
        for lane in 0..16 {
            for kk in 0..k {
                rows[kk] |= u16::from(inside(y, tap(kk), ho)) << lane;
                cols[kk] |= u16::from(inside(x, tap(kk), wo)) << lane;
            }
            x += 1;
            if x == wo {
                (y, x) = (y + 1, 0);
            }
        }
        for (t, m) in m.iter_mut().enumerate() {
            *m = rows[t / k] & cols[t % k];
        }
    }
    out
}

/// One image (`c x h x w`) as the kernel reads it at stride 2: each channel's four phase planes
/// into `out` (at stride 1 the kernel reads the image itself).
pub(crate) fn phases(x: &[f32], shape: Shape, out: &mut Vec<f32>) {
    let (s, (ho, wo)) = (shape.stride, shape.out());
    assert!(x.len() == shape.c * shape.h * shape.w && ho * s == shape.h && wo * s == shape.w);
    out.clear();
    for plane in x.chunks(shape.h * shape.w) {
        for (a, b) in (0..s).flat_map(|a| (0..s).map(move |b| (a, b))) {
            for y in 0..ho {
                // Whole pairs (`w` is a multiple of the stride): a loop LLVM vectorises.
                out.extend(plane[(s * y + a) * shape.w..][..shape.w].chunks_exact(s).map(|p| p[b]));
            }
        }
    }
}

/// `dst[o ld + p] (+)= sum over (channel, kh, kw) of wk[term c_out + o] x x[channel, stride y +
/// kh - pad, stride x + kw - pad]` (zero outside the image) for output pixel `p0 + p = (y, x)` of
/// band `band` of the plan, every output channel `o` and `p < n` rounded up to the band's block
/// (pixels past `n` get values that are ignored), the sum cut every `kc` terms ([`k_block`] of
/// the im2col product this replaces). `dst` starts as the bias when there is one (added to the
/// first block's sum), else is written. `x` is the image as [`phases`] lays it out (at stride 1,
/// as it is).
///
/// # Safety
/// `dst` must address `c_out` rows of the band's `n.next_multiple_of(block)` elements `ld` apart
/// that no other thread reads or writes meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    plan: &Plan,
    band: usize,
    x: &[f32],
    wk: &[f32],
    c_out: usize,
    bias: Option<&[f32]>,
    (dst, ld): (*mut f32, usize),
    kc: usize,
) {
    let (shape, band) = (plan.shape, &plan.bands[band]);
    assert!(x.len() == shape.c * shape.h * shape.w, "conv_direct: an image of another shape");
    assert!(wk.len() >= plan.offsets.len() * c_out && bias.is_none_or(|b| b.len() >= c_out) && kc > 0);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available());
        // SAFETY: AVX-512F is present (checked); the loads read only the lanes the plan's masks
        // enable, whose input pixels lie in the phase planes of `x` (its size checked); the
        // writes stay inside the caller's rows.
        unsafe { avx512::product(x, &plan.offsets, band, shape.k * shape.k, wk, c_out, bias, (dst, ld), kc) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, wk, c_out, bias, dst, ld, kc, band);
        unreachable!("conv_direct::product without AVX-512");
    }
}

/// The input gradient of a "same" stride-1 convolution, reading the output gradient's `shape.c`
/// planes of `shape.h x shape.w` as they are: `dst[c ld + p] = sum over (kh, kw) in order of (sum
/// over co of wt[(kk c_out + co) c_in + c] x g[co, y + pad - kh, x + pad - kw])` (zero outside
/// the planes), `kk = kh k + kw`, for input pixel `p0 + p = (y, x)` of band `band` and every
/// input channel `c`, each term's sum over `co` cut at `kc` ([`k_block`] of the `Wᵀ x grad`
/// product this replaces) and the terms added in order from zero, as col2im added them: the
/// bits of the im2col path (tested; a zero may differ in sign where col2im skips the padding).
///
/// # Safety
/// `dst` must address `c_in` rows of the band's `n.next_multiple_of(block)` elements `ld` apart
/// that no other thread reads or writes meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn input_grad(
    plan: &GradPlan,
    band: usize,
    g: &[f32],
    wt: &[f32],
    c_in: usize,
    (dst, ld): (*mut f32, usize),
    kc: usize,
) {
    let (shape, band) = (plan.shape, &plan.bands[band]);
    let kk = shape.k * shape.k;
    assert!(g.len() == shape.c * shape.h * shape.w, "conv_direct: an output gradient of another shape");
    assert!(wt.len() >= kk * shape.c * c_in && kc > 0);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available());
        // SAFETY: AVX-512F is present (checked); the loads read only the lanes the plan's masks
        // enable, pixels of the planes of `g` (its size checked); the writes stay inside the
        // caller's rows.
        unsafe { avx512::input_grad(g, shape.h * shape.w, shape.c, &plan.offsets, band, wt, c_in, (dst, ld), kc) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (g, wt, c_in, dst, ld, kc, band, kk);
        unreachable!("conv_direct::input_grad without AVX-512");
    }
}

/// What [`input_grad`] needs for the output gradient's planes of one [`Shape`] (stride 1, `c`
/// its channels): each `(kh, kw)`'s offset `(pad - kh) w + pad - kw` from the input pixel, and
/// the bands of input pixels with their masks.
pub(crate) struct GradPlan {
    shape: Shape,
    offsets: Vec<isize>,
    bands: Vec<Band>,
}

impl GradPlan {
    pub(crate) fn new(shape: Shape, band_rows: usize) -> Self {
        assert!(
            shape.applies() && shape.stride == 1 && band_rows > 0,
            "conv_direct: {shape:?} has no direct input gradient"
        );
        let k = shape.k;
        let pad = ((k - 1) / 2) as isize;
        let tap = |kh: usize| pad - kh as isize;
        let offsets = (0..k * k).map(|t| tap(t / k) * shape.w as isize + tap(t % k)).collect();
        let bands = bands(shape, band_rows, tap);
        Self { shape, offsets, bands }
    }

    pub(crate) fn bands(&self) -> &[Band] {
        &self.bands
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Band;
    use std::arch::x86_64::*;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        x: &[f32],
        offsets: &[isize],
        band: &Band,
        kk: usize,
        wk: &[f32],
        c_out: usize,
        bias: Option<&[f32]>,
        (dst, ld): (*mut f32, usize),
        kc: usize,
    ) {
        channel_blocks(&Forward { x, offsets, band, kk, wk, c_out, bias, dst, ld, kc }, c_out, band.block);
    }

    /// A kernel computing `CB` channels x blocks of `16 NV` pixels from channel `first` on.
    trait Blocks {
        unsafe fn block<const CB: usize, const NV: usize>(&self, first: usize) -> usize;
    }

    /// `k`'s blocks over `channels` channels, as many at once as fit 24 accumulators next to
    /// the pixel block's vectors (8 x 3, 6 x 4, 4 x 5), then 4, 2, 1 for the remainder.
    #[inline(always)]
    unsafe fn channel_blocks(k: &impl Blocks, channels: usize, pixels: usize) {
        let mut c = 0;
        while c < channels {
            c += match (channels - c, pixels) {
                (8.., 48) => k.block::<8, 3>(c),
                (4..=7, 48) => k.block::<4, 3>(c),
                (6.., 64) => k.block::<6, 4>(c),
                (4..=5, 64) => k.block::<4, 4>(c),
                (4.., _) => k.block::<4, 5>(c),
                (2..=3, 48) => k.block::<2, 3>(c),
                (2..=3, 64) => k.block::<2, 4>(c),
                (2..=3, _) => k.block::<2, 5>(c),
                (_, 48) => k.block::<1, 3>(c),
                (_, 64) => k.block::<1, 4>(c),
                _ => k.block::<1, 5>(c),
            };
        }
    }

    /// The operands of the forward kernel.
    struct Forward<'a> {
        x: &'a [f32],
        offsets: &'a [isize],
        band: &'a Band,
        kk: usize,
        wk: &'a [f32],
        c_out: usize,
        bias: Option<&'a [f32]>,
        dst: *mut f32,
        ld: usize,
        kc: usize,
    }

    impl Blocks for Forward<'_> {
        /// Output channels `o0 .. o0 + CB`, every block of `16 NV` pixels; returns `CB`.
        #[inline(always)]
        unsafe fn block<const CB: usize, const NV: usize>(&self, o0: usize) -> usize {
            let terms = self.offsets.len();
            for p in (0..self.band.n).step_by(16 * NV) {
                // The pixel's address; a term's lanes outside the image are masked off, never read.
                let base = self.x.as_ptr().wrapping_add(self.band.p0 + p);
                let masks = self.band.masks.as_ptr().add(p / 16 * self.kk);
                let mut start = 0;
                while start < terms {
                    let end = (start + self.kc).min(terms);
                    let mut a = [[_mm512_setzero_ps(); NV]; CB];
                    let mut kk = start % self.kk;
                    for (t, &off) in self.offsets.iter().enumerate().take(end).skip(start) {
                        let src = base.wrapping_offset(off);
                        let mut v = [_mm512_setzero_ps(); NV];
                        for (i, v) in v.iter_mut().enumerate() {
                            let m = *masks.add(i * self.kk + kk);
                            *v = _mm512_maskz_loadu_ps(m, src.wrapping_add(16 * i));
                        }
                        kk = if kk + 1 == self.kk { 0 } else { kk + 1 };
                        let w = self.wk.as_ptr().add(t * self.c_out + o0);
                        for (j, a) in a.iter_mut().enumerate() {
                            let wj = _mm512_set1_ps(*w.add(j));
                            for (a, v) in a.iter_mut().zip(v) {
                                *a = _mm512_fmadd_ps(v, wj, *a);
                            }
                        }
                    }
                    for (j, a) in a.iter().enumerate() {
                        let d = self.dst.add((o0 + j) * self.ld + p);
                        let bias = self.bias.map(|b| _mm512_set1_ps(b[o0 + j]));
                        for (i, &a) in a.iter().enumerate() {
                            let d = d.add(16 * i);
                            let r = match (start, bias) {
                                (0, None) => a,
                                (0, Some(b)) => _mm512_add_ps(b, a),
                                _ => _mm512_add_ps(_mm512_loadu_ps(d), a),
                            };
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
        offsets: &[isize],
        band: &Band,
        wt: &[f32],
        c_in: usize,
        (dst, ld): (*mut f32, usize),
        kc: usize,
    ) {
        channel_blocks(&Grad { g, plane, c_out, offsets, band, wt, c_in, dst, ld, kc }, c_in, band.block);
    }

    /// The operands of the input-gradient kernel.
    struct Grad<'a> {
        g: &'a [f32],
        plane: usize,
        c_out: usize,
        offsets: &'a [isize],
        band: &'a Band,
        wt: &'a [f32],
        c_in: usize,
        dst: *mut f32,
        ld: usize,
        kc: usize,
    }

    impl Grad<'_> {
        /// Sum over output channels `co0 .. co1` of term `kk` at the pixel block `base` (masks
        /// `masks`): FMAs from zero.
        #[inline(always)]
        unsafe fn terms<const CB: usize, const NV: usize>(
            &self,
            kk: usize,
            (base, masks): (*const f32, *const u16),
            c0: usize,
            (co0, co1): (usize, usize),
        ) -> [[__m512; NV]; CB] {
            let kks = self.offsets.len();
            let mut t = [[_mm512_setzero_ps(); NV]; CB];
            let src = base.wrapping_offset(self.offsets[kk]);
            for co in co0..co1 {
                let src = src.wrapping_add(co * self.plane);
                let mut v = [_mm512_setzero_ps(); NV];
                for (i, v) in v.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(*masks.add(i * kks + kk), src.wrapping_add(16 * i));
                }
                let w = self.wt.as_ptr().add((kk * self.c_out + co) * self.c_in + c0);
                for (j, t) in t.iter_mut().enumerate() {
                    let wj = _mm512_set1_ps(*w.add(j));
                    for (t, v) in t.iter_mut().zip(v) {
                        *t = _mm512_fmadd_ps(v, wj, *t);
                    }
                }
            }
            t
        }
    }

    impl Blocks for Grad<'_> {
        /// Input channels `c0 .. c0 + CB`, every block of `16 NV` pixels; returns `CB`.
        #[inline(always)]
        unsafe fn block<const CB: usize, const NV: usize>(&self, c0: usize) -> usize {
            let kks = self.offsets.len();
            for p in (0..self.band.n).step_by(16 * NV) {
                // The pixel's address; a term's lanes outside the planes are masked off, never read.
                let at = (self.g.as_ptr().wrapping_add(self.band.p0 + p), self.band.masks.as_ptr().add(p / 16 * kks));
                for kk in 0..kks {
                    let mut t = self.terms::<CB, NV>(kk, at, c0, (0, self.c_out.min(self.kc)));
                    // gemm's blocks of the sum over co, each added to the ones before.
                    let mut start = self.kc;
                    while start < self.c_out {
                        let u = self.terms::<CB, NV>(kk, at, c0, (start, (start + self.kc).min(self.c_out)));
                        for (t, u) in t.iter_mut().zip(u) {
                            for (t, u) in t.iter_mut().zip(u) {
                                *t = _mm512_add_ps(*t, u);
                            }
                        }
                        start += self.kc;
                    }
                    // col2im's sum over (kh, kw) in order, from zero.
                    for (j, t) in t.iter().enumerate() {
                        let d = self.dst.add((c0 + j) * self.ld + p);
                        for (i, &t) in t.iter().enumerate() {
                            let d = d.add(16 * i);
                            let before = if kk == 0 { _mm512_setzero_ps() } else { _mm512_loadu_ps(d) };
                            _mm512_storeu_ps(d, _mm512_add_ps(before, t));
                        }
                    }
                }
            }
            CB
        }
    }
}
