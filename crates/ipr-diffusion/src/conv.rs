//! 2-d convolution on the CPU as im2col + one matrix product (Chellapilla et al. 2006, "High
//! Performance Convolutional Neural Networks for Document Processing"), with an exact backward
//! that computes only what is needed: the input gradient as `W^T x grad` followed by col2im (for
//! every stride, no `conv_transpose2d`), the kernel and bias gradients only when they are trained.
//!
//! Why: candle 0.11's CPU conv2d builds its im2col tiles with strided scattered writes (profiled:
//! about 40% of a LoRA training step of the toy UNet went there), its input gradient goes through
//! a direct-loop `conv_transpose2d`, and its backward always computes the kernel gradient and a
//! full-size gradient for a frozen broadcast bias. Here the columns are written row by row
//! (contiguous copies for stride 1), the product is one gemm over the whole batch, and the bias is
//! part of the op. Tested against candle's conv and by finite differences (`tests/gradients.rs`).

use crate::fused::{gemm_threads, threads_per_product, SharedMut};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Geometry of a square-kernel convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    pub(crate) b: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    pub(crate) pad: usize,
}

impl Geom {
    pub(crate) fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub(crate) fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Columns of the im2col matrix: `B * Ho * Wo`.
    fn cols(&self) -> usize {
        self.b * self.out_h() * self.out_w()
    }
    /// Rows: `C * k * k`.
    fn rows(&self) -> usize {
        self.c * self.k * self.k
    }
}

fn contiguous<'a, T>(data: &'a [T], l: &Layout) -> Result<&'a [T]> {
    crate::fused::contiguous(data, l, "conv op")
}

/// `(B, C, H, W)` -> `(C k k, B Ho Wo)`: the whole batch's columns (only the kernel gradient of
/// full training needs them), row by row in parallel.
fn im2col<T: WithDType>(x: &[T], g: Geom) -> Vec<T> {
    let l = g.out_h() * g.out_w();
    let segments = row_segments(g, 0, l);
    let image_len = g.c * g.h * g.w;
    let mut out = vec![T::zero(); g.rows() * g.cols()];
    out.par_chunks_mut(g.cols()).enumerate().for_each(|(r, row)| {
        for (b, dst) in row.chunks_mut(l).enumerate() {
            im2col_row(&x[b * image_len..][..image_len], g, r, &segments, dst);
        }
    });
    out
}

/// Output pixels per band: a band's im2col columns (`rows x band`) take at most about 2 MiB. A
/// toy-size image is one band (measured against 192 KiB bands: sampling 8% faster, the LoRA step
/// the same); at Stable Diffusion size a band is a few output rows.
fn band_len<T>(g: Geom) -> usize {
    let l = g.out_h() * g.out_w();
    let per_pixel = g.rows() * std::mem::size_of::<T>();
    ((2 << 20) / per_pixel.max(1)).max(64).min(l).max(1)
}

/// Whether the convolution reads its input as it is (1x1, stride 1, no padding): no columns.
fn is_pointwise(g: Geom) -> bool {
    g.k == 1 && g.stride == 1 && g.pad == 0
}

/// The im2col columns of output pixels `[p0, p1)` of one image's planes `x` (`C x H x W`):
/// `cols[r * ld + p - p0]`, each element written once (zeros where the kernel reads padding).
fn im2col_band<T: WithDType>(x: &[T], g: Geom, p0: usize, p1: usize, cols: &mut [T], ld: usize) {
    let n = p1 - p0;
    let segments = row_segments(g, p0, p1);
    for r in 0..g.rows() {
        im2col_row(x, g, r, &segments, &mut cols[r * ld..][..n]);
    }
}

/// Row `r` = (channel, kh, kw) of the im2col columns of one image's planes `x`, over the output
/// pixels that `segments` ([`row_segments`]) describe, into `dst`.
fn im2col_row<T: WithDType>(x: &[T], g: Geom, r: usize, segments: &[(usize, usize, usize, usize)], dst: &mut [T]) {
    let (c, kh, kw) = (r / (g.k * g.k), (r / g.k) % g.k, r % g.k);
    let plane = &x[c * g.h * g.w..][..g.h * g.w];
    // Stride 1: ix = ox + kw - pad, valid for ox in [lo, hi) on every output row.
    let (lo, hi) = ((g.pad.saturating_sub(kw)), (g.w + g.pad).saturating_sub(kw));
    for &(oy, ox0, ox1, at) in segments {
        let dst = &mut dst[at..][..ox1 - ox0];
        let iy = (oy * g.stride + kh) as isize - g.pad as isize;
        if iy < 0 || iy >= g.h as isize {
            dst.fill(T::zero());
            continue;
        }
        let src = &plane[iy as usize * g.w..][..g.w];
        if g.stride == 1 {
            let lo = lo.clamp(ox0, ox1);
            let hi = hi.clamp(lo, ox1);
            dst[..lo - ox0].fill(T::zero());
            dst[lo - ox0..hi - ox0].copy_from_slice(&src[lo + kw - g.pad..hi + kw - g.pad]);
            dst[hi - ox0..].fill(T::zero());
        } else {
            for (d, ox) in dst.iter_mut().zip(ox0..ox1) {
                let ix = (ox * g.stride + kw) as isize - g.pad as isize;
                *d = if ix >= 0 && ix < g.w as isize { src[ix as usize] } else { T::zero() };
            }
        }
    }
}

/// The output-row pieces of output pixels `[p0, p1)`: `(oy, ox0, ox1, offset in the band)`,
/// computed once per band rather than per kernel row (integer divisions per piece cost as much
/// as copying a toy-size row).
fn row_segments(g: Geom, p0: usize, p1: usize) -> Vec<(usize, usize, usize, usize)> {
    let wo = g.out_w();
    let mut out = Vec::with_capacity((p1 - p0) / wo.max(1) + 2);
    let mut p = p0;
    while p < p1 {
        let (oy, ox0) = (p / wo, p % wo);
        let ox1 = wo.min(ox0 + (p1 - p));
        out.push((oy, ox0, ox1, p - p0));
        p += ox1 - ox0;
    }
    out
}

/// The adjoint of [`im2col_band`] for one channel `c`: adds the columns `cols[r * ld + p - p0]`
/// of its rows `r` (`(c, kh, kw)`, in that order) over the output pixels of `segments`
/// ([`row_segments`] of the band) into the channel's input-gradient plane (`H x W`).
fn col2im_band_channel<T: WithDType>(
    cols: &[T],
    g: Geom,
    segments: &[(usize, usize, usize, usize)],
    c: usize,
    plane: &mut [T],
    ld: usize,
) {
    let kk = g.k * g.k;
    for r in c * kk..(c + 1) * kk {
        let row = &cols[r * ld..];
        let (kh, kw) = ((r / g.k) % g.k, r % g.k);
        let (lo, hi) = ((g.pad.saturating_sub(kw)), (g.w + g.pad).saturating_sub(kw));
        for &(oy, ox0, ox1, at) in segments {
            let src = &row[at..][..ox1 - ox0];
            let iy = (oy * g.stride + kh) as isize - g.pad as isize;
            if iy < 0 || iy >= g.h as isize {
                continue;
            }
            let drow = &mut plane[iy as usize * g.w..][..g.w];
            if g.stride == 1 {
                let lo = lo.clamp(ox0, ox1);
                let hi = hi.clamp(lo, ox1);
                for (a, &b) in drow[lo + kw - g.pad..hi + kw - g.pad].iter_mut().zip(&src[lo - ox0..hi - ox0]) {
                    *a += b;
                }
            } else {
                for (&v, ox) in src.iter().zip(ox0..ox1) {
                    let ix = (ox * g.stride + kw) as isize - g.pad as isize;
                    if ix >= 0 && ix < g.w as isize {
                        drow[ix as usize] += v;
                    }
                }
            }
        }
    }
}

/// `conv2d(x, w) + bias` straight into `(B, Co, Ho, Wo)`: for each (image, band of output
/// pixels) in parallel, the band's columns in a buffer and one product into the output, whose
/// rows start as the bias. No batch-wide column matrix, no transposed copy of the output, no
/// separate bias pass; the tasks depend on the geometry alone, so the result does not depend on
/// the thread count. (Products over groups of small images, packing the kernel once per group,
/// measured 2-5% slower at toy size than one image per task.)
pub(crate) fn conv_forward<T: WithDType>(x: &[T], w: &[T], bias: Option<&[T]>, g: Geom, c_out: usize) -> Vec<T> {
    if let Some(direct) = as_f32(w).and_then(|w| DirectForward::new(w, g, c_out)) {
        let y = direct.run(as_f32(x).expect("f32 like w"), bias.and_then(as_f32));
        // SAFETY: T is f32 (as_f32 returned Some): the vector is reinterpreted as itself.
        let mut y = std::mem::ManuallyDrop::new(y);
        unsafe { Vec::from_raw_parts(y.as_mut_ptr().cast::<T>(), y.len(), y.capacity()) }
    } else if padded_rows(g) {
        conv_forward_padded_rows(x, w, bias, g, c_out)
    } else {
        conv_forward_bands(x, w, bias, g, c_out)
    }
}

/// Whether [`DirectForward`] computes the forward (and, at stride 1, [`conv_input_grad_direct`]
/// the input gradient): f32 (the caller's), a shape the kernels take (`conv_direct::Shape::applies`:
/// "same" stride-1 convolutions up to 7x7 and the 3x3 stride-2 downsamplers on even sizes; not
/// 1x1 ones, which run as fast through `gemm`, measured), 3 to [`DIRECT_MAX_CHANNELS`] output
/// channels and at most that many input channels, two output pixels or more, an AVX-512 CPU.
/// Rows of any width: the kernels sum where the banded path's `gemm` would, so narrow rows keep
/// their bits too. (Fewer than 3 output channels or a single output pixel would send that
/// path's products through `gemm`'s vector routines, which sum in another order.)
fn direct_forward(g: Geom, c_out: usize) -> bool {
    let shape = crate::conv_direct::Shape { c: g.c, h: g.h, w: g.w, k: g.k, stride: g.stride };
    g.k > 1
        && 2 * g.pad + 1 == g.k
        && shape.applies()
        && (3..=DIRECT_MAX_CHANNELS).contains(&c_out)
        && g.c <= DIRECT_MAX_CHANNELS
        && g.out_h() * g.out_w() >= 2
        && crate::conv_direct::available()
}

/// The most channels the direct kernels take: they read the weights and the planes again for
/// every 8 channels, which `gemm`'s packed blocks do not; at Stable Diffusion's 320-1280
/// channels one LoRA step of SD 2.1's UNet took 18.2 s with them against 14.3 s without
/// (`scripts/bench/compare_sd_train_memory.sh`, 2-core AMD EPYC), at the toy's 16-128 they are
/// faster (README, Speed).
const DIRECT_MAX_CHANNELS: usize = 128;

/// Whether [`conv_forward_padded_rows`] computes this convolution with im2col columns (where
/// [`direct_forward`] does not apply): stride 1 with a kernel wider than one pixel, on rows of
/// at least 16 output pixels. On narrower rows its `k - 1` extra columns per row cost more of
/// the product (25% at 8 pixels), and the toy's 8x8 products, at most 64 x 64, would change
/// size class in the `gemm` crate, which blocks the sum over `K` differently below that size:
/// their sums would round differently.
fn padded_rows(g: Geom) -> bool {
    g.stride == 1 && !is_pointwise(g) && g.out_w() >= 16
}

/// A band of zero-padded rows: rows `row0 .. row0 + rows` of `h x w` planes (zeros outside
/// `0..h`), each placed `left` elements into a row of `wp`, the planes `plane = rows wp + k - 1`
/// apart (`k - 1` elements of slack for the reads of the extra columns of the last row).
#[derive(Clone, Copy)]
struct PaddedBand {
    row0: isize,
    rows: usize,
    wp: usize,
    left: usize,
    plane: usize,
}

impl PaddedBand {
    fn new(row0: isize, rows: usize, wp: usize, left: usize, k: usize) -> Self {
        Self { row0, rows, wp, left, plane: rows * wp + k - 1 }
    }

    /// The band of the `planes` planes (`h x w`) of `src` into `slab`.
    fn fill<T: WithDType>(&self, src: &[T], planes: usize, (h, w): (usize, usize), slab: &mut Vec<T>) {
        slab.clear();
        slab.resize(planes * self.plane, T::zero());
        for c in 0..planes {
            for t in 0..self.rows {
                let y = self.row0 + t as isize;
                if (0..h as isize).contains(&y) {
                    let row = &src[c * h * w + y as usize * w..][..w];
                    slab[c * self.plane + t * self.wp + self.left..][..w].copy_from_slice(row);
                }
            }
        }
    }
}

/// Copies `rows` rows of `planes` accumulator planes (`ld` apart, rows `wp` apart) without their
/// columns past `w` into the `h x w` planes at `dst`, from their row `row0` on.
///
/// # Safety
/// `dst` must address `planes` planes of `h x w` elements that no other thread writes in these
/// rows; `acc` must hold them (`ld >= rows wp`).
#[allow(clippy::too_many_arguments)]
unsafe fn copy_out_rows<T: Copy>(
    acc: &[T],
    planes: usize,
    ld: usize,
    wp: usize,
    rows: usize,
    (h, w): (usize, usize),
    row0: usize,
    dst: *mut T,
) {
    for c in 0..planes {
        for t in 0..rows {
            let src = &acc[c * ld + t * wp..][..w];
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(c * h * w + (row0 + t) * w), w);
        }
    }
}

/// Stride-1 convolution over zero-padded input rows: with the input padded to `Wp = W + 2 pad`
/// columns, the im2col row of (channel, kh, kw) for a band of whole output rows is one
/// contiguous slice of the padded planes (offset `kh Wp + kw`) if the output is computed `Wp`
/// pixels wide; the `k - 1` extra columns of each output row are dropped when the band is
/// copied out. One `memcpy` per im2col row instead of a fill / copy / fill per output row,
/// which cost about as much as the copying itself at toy size (`perf`: im2col was a third of
/// the convolution). The product and the bias are those of [`conv_forward_bands`], so are the
/// results, bit for bit (tested).
fn conv_forward_padded_rows<T: WithDType>(x: &[T], w: &[T], bias: Option<&[T]>, g: Geom, c_out: usize) -> Vec<T> {
    let (ho, wo) = (g.out_h(), g.out_w());
    let l = ho * wo;
    let wp = g.w + 2 * g.pad;
    let rows = g.rows();
    let image_len = g.c * g.h * g.w;
    let total = g.b * c_out * l;
    let mut out: Vec<T> = Vec::with_capacity(total);
    let band_rows = (band_len::<T>(g) / wo).clamp(1, ho);
    let bands = ho.div_ceil(band_rows);
    let dst = SharedMut(out.as_mut_ptr());
    let inner = threads_per_product(g.b * bands);
    let buffers = || (Vec::new(), Vec::new(), Vec::new());
    (0..g.b * bands).into_par_iter().for_each_init(buffers, |(slab, cols, acc), task| {
        let (b, j) = (task / bands, task % bands);
        let (oy0, oy1) = (j * band_rows, ((j + 1) * band_rows).min(ho));
        let n = (oy1 - oy0) * wp;
        let image = &x[b * image_len..][..image_len];
        // The band's input rows oy0 - pad .. oy1 - 1 - pad + k - 1, zero-padded.
        let band = PaddedBand::new(oy0 as isize - g.pad as isize, oy1 - oy0 + g.k - 1, wp, g.pad, g.k);
        band.fill(image, g.c, (g.h, g.w), slab);
        let plane = band.plane;
        acc.clear();
        match bias {
            Some(bias) => bias.iter().for_each(|&v| acc.extend(std::iter::repeat_n(v, n))),
            None => acc.resize(c_out * n, T::zero()),
        }
        cols.resize(rows * n, T::zero());
        for r in 0..rows {
            let (c, kh, kw) = (r / (g.k * g.k), (r / g.k) % g.k, r % g.k);
            cols[r * n..][..n].copy_from_slice(&slab[c * plane + kh * wp + kw..][..n]);
        }
        // SAFETY: w is c_out x rows, cols rows x n, acc c_out x n (row strides rows, n, n).
        unsafe {
            gemm_threads(
                inner,
                (c_out, n, rows),
                acc.as_mut_ptr(),
                n,
                bias.is_some(),
                (w.as_ptr(), rows, 1),
                (cols.as_ptr(), n, 1),
            )
        };
        // SAFETY: task (b, j) alone writes output rows [oy0, oy1) of image b, inside the
        // allocation of `total` elements; writes only.
        unsafe { copy_out_rows(acc, c_out, n, wp, oy1 - oy0, (ho, wo), oy0, dst.ptr().add(b * c_out * l)) };
    });
    // SAFETY: the tasks (every image, bands covering every output row) wrote all elements.
    unsafe { out.set_len(total) };
    out
}

/// A convolution by [`crate::conv_direct::product`] (f32, AVX-512; see [`direct_forward`]: the
/// "same" stride-1 ones and the stride-2 downsamplers) per (image, band of output rows), reading
/// the image as it is (stride 2: its phase planes, one copy), the padding being the kernel's
/// masked lanes, the output written in place when the band's pixels are whole blocks of the
/// kernel (the toy's images), else into a buffer copied out plane by plane. The sums are those
/// of the im2col + gemm paths, so are the results, bit for bit (tested).
///
/// Prepared once per weight and image size (the weights packed term-major, the kernel's
/// [`crate::conv_direct::Plan`]), so that callers running one image at a time do not repeat
/// that work per image.
pub(crate) struct DirectForward {
    shape: crate::conv_direct::Shape,
    c_out: usize,
    wk: Vec<f32>,
    kc: usize,
    plan: crate::conv_direct::Plan,
}

impl DirectForward {
    /// `None` where [`direct_forward`] does not apply.
    pub(crate) fn new(w: &[f32], g: Geom, c_out: usize) -> Option<Self> {
        let g = Geom { b: 1, ..g };
        if !direct_forward(g, c_out) || w.len() != c_out * g.rows() {
            return None;
        }
        let rows = g.rows();
        let mut wk = vec![0f32; rows * c_out];
        for (o, row) in w.chunks(rows).enumerate() {
            for (t, &v) in row.iter().enumerate() {
                wk[t * c_out + o] = v;
            }
        }
        let (ho, wo) = (g.out_h(), g.out_w());
        // The sum cut where gemm cuts that of the banded path's product, bands of as many rows.
        let kc = crate::conv_direct::k_block(c_out, band_len::<f32>(g).min(ho * wo), rows);
        let band_rows = (band_len::<f32>(g) / wo).clamp(1, ho);
        let shape = crate::conv_direct::Shape { c: g.c, h: g.h, w: g.w, k: g.k, stride: g.stride };
        Some(Self { shape, c_out, wk, kc, plan: crate::conv_direct::Plan::new(shape, band_rows) })
    }

    /// The convolution of the images of `x` (`B x C x H x W`).
    pub(crate) fn run(&self, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (shape, c_out) = (self.shape, self.c_out);
        let image_len = shape.c * shape.h * shape.w;
        let l = shape.out().0 * shape.out().1;
        let b = x.len() / image_len;
        assert!(x.len() == b * image_len && bias.is_none_or(|v| v.len() == c_out), "direct conv: operand sizes");
        let kernel = |i: usize, j: usize, phases: &mut Vec<f32>, dst: (*mut f32, usize)| {
            let mut image = &x[i * image_len..][..image_len];
            if shape.stride > 1 {
                crate::conv_direct::phases(image, shape, phases);
                image = phases;
            }
            // SAFETY: `direct_tasks` hands each task its own rows of band j (`dst`).
            unsafe { crate::conv_direct::product(&self.plan, j, image, &self.wk, c_out, bias, dst, self.kc) };
        };
        direct_tasks(b, self.plan.bands(), c_out, l, kernel)
    }
}

/// A direct kernel over every (image, band) in parallel, into a new `images x planes x l` tensor:
/// `kernel(image, band, scratch, (dst, ld))` writes the band's pixels of the image's `planes`
/// planes as rows `ld` apart from `dst`. They are the output's own rows where the band's pixels
/// are whole blocks of the kernel (the toy's images), else a buffer copied out plane by plane.
/// Every element is written once: no zero fill.
fn direct_tasks(
    images: usize,
    bands: &[crate::conv_direct::Band],
    planes: usize,
    l: usize,
    kernel: impl Fn(usize, usize, &mut Vec<f32>, (*mut f32, usize)) + Sync,
) -> Vec<f32> {
    let total = images * planes * l;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let dst = SharedMut(out.as_mut_ptr());
    let buffers = || (Vec::new(), Vec::new());
    (0..images * bands.len()).into_par_iter().for_each_init(buffers, |(acc, scratch), task| {
        let (i, j) = (task / bands.len(), task % bands.len());
        let (p0, n, block) = (bands[j].p0, bands[j].n, bands[j].block);
        // SAFETY: task (i, j) alone writes pixels [p0, p0 + n) of image i's planes, inside the
        // allocation of `total` elements.
        let out_band = unsafe { dst.ptr().add(i * planes * l + p0) };
        if n % block == 0 {
            kernel(i, j, scratch, (out_band, l));
        } else {
            let ld = n.next_multiple_of(block);
            acc.resize(planes * ld, 0.0);
            kernel(i, j, scratch, (acc.as_mut_ptr(), ld));
            for c in 0..planes {
                // SAFETY: as above, pixels [p0, p0 + n) of plane c of image i; writes only.
                unsafe { std::ptr::copy_nonoverlapping(acc[c * ld..].as_ptr(), out_band.add(c * l), n) };
            }
        }
    });
    // SAFETY: the tasks (every image, bands covering every output row) wrote all elements.
    unsafe { out.set_len(total) };
    out
}

/// The slice as f32 when `T` is f32.
fn as_f32<T: WithDType>(s: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 (same type id), so the slice is reinterpreted as itself.
    (T::DTYPE == DType::F32).then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) })
}

/// The general case: bands of output pixels, each band's im2col columns built piece by piece
/// from the unpadded input.
fn conv_forward_bands<T: WithDType>(x: &[T], w: &[T], bias: Option<&[T]>, g: Geom, c_out: usize) -> Vec<T> {
    let l = g.out_h() * g.out_w();
    let rows = g.rows();
    let image_len = g.c * g.h * g.w;
    let total = g.b * c_out * l;
    // Not zero-filled: every element is written below before it is read (the bias, or the
    // product with `read_dst` false), so the memset of the whole output is saved.
    let mut out: Vec<T> = Vec::with_capacity(total);
    let band = band_len::<T>(g);
    let bands = l.div_ceil(band);
    let dst = SharedMut(out.as_mut_ptr());
    let inner = threads_per_product(g.b * bands);
    (0..g.b * bands).into_par_iter().for_each_init(Vec::new, |cols, task| {
        let (b, j) = (task / bands, task % bands);
        let (p0, p1) = (j * band, ((j + 1) * band).min(l));
        let n = p1 - p0;
        let image = &x[b * image_len..][..image_len];
        // SAFETY: task (b, j) alone writes columns [p0, p1) of image b's c_out output rows, all
        // inside the allocation of `total` elements.
        let d = unsafe { dst.ptr().add(b * c_out * l + p0) };
        if let Some(bias) = bias {
            for (co, &v) in bias.iter().enumerate() {
                for i in 0..n {
                    // SAFETY: as above; a write, never a read, of possibly uninitialised memory.
                    unsafe { d.add(co * l + i).write(v) };
                }
            }
        }
        let (rhs, rhs_rs) = if is_pointwise(g) {
            (image[p0..].as_ptr(), l)
        } else {
            cols.resize(rows * n, T::zero());
            im2col_band(image, g, p0, p1, &mut cols[..rows * n], n);
            (cols.as_ptr(), n)
        };
        // SAFETY: w is c_out x rows, rhs rows x n with row stride rhs_rs, d c_out x n with row
        // stride l; without a bias the product does not read d (`read_dst` false), it writes it.
        unsafe { gemm_threads(inner, (c_out, n, rows), d, l, bias.is_some(), (w.as_ptr(), rows, 1), (rhs, rhs_rs, 1)) };
    });
    // SAFETY: the tasks (every image, bands covering [0, l)) wrote all `total` elements.
    unsafe { out.set_len(total) };
    out
}

/// The input gradient of [`conv_forward`], cut the same way: `W^T x grad` per band of an image
/// into a buffer, added into the image's planes by [`col2im_band_channel`] (1x1 stride 1: written
/// directly).
pub(crate) fn conv_input_grad<T: WithDType>(grad: &[T], w: &[T], g: Geom, c_out: usize) -> Vec<T> {
    if let (Some(grad), Some(w)) = (as_f32(grad), as_f32(w)) {
        if direct_forward(g, c_out) && g.stride == 1 {
            let dx = conv_input_grad_direct(grad, w, g, c_out);
            // SAFETY: T is f32 (as_f32 returned Some): the vector is reinterpreted as itself.
            let mut dx = std::mem::ManuallyDrop::new(dx);
            return unsafe { Vec::from_raw_parts(dx.as_mut_ptr().cast::<T>(), dx.len(), dx.capacity()) };
        }
    }
    conv_input_grad_bands(grad, w, g, c_out)
}

/// The input gradient of a "same" stride-1 convolution by [`crate::conv_direct::input_grad`]
/// (see [`direct_forward`]) per (image, band of input rows), reading the output gradient's
/// planes as they are (the padding is the kernel's masked lanes) and writing the input
/// gradient's planes in place (through a buffer where a band is not whole blocks of pixels). No
/// `Wᵀ x grad` columns, no col2im, no padded copy; each element's sum is that of
/// [`conv_input_grad_bands`] when the latter's output pixels fit one band (the toy's images;
/// larger images add the bands' parts in another order).
fn conv_input_grad_direct(grad: &[f32], w: &[f32], g: Geom, c_out: usize) -> Vec<f32> {
    assert!(direct_forward(g, c_out) && g.stride == 1, "conv: {g:?} has no direct input gradient");
    let l = g.h * g.w;
    let rows = g.rows();
    let kk = g.k * g.k;
    // W packed as [(kh k + kw) c_out + co] x c_in.
    let mut wt = vec![0f32; kk * c_out * g.c];
    for co in 0..c_out {
        for c in 0..g.c {
            for t in 0..kk {
                wt[(t * c_out + co) * g.c + c] = w[co * rows + c * kk + t];
            }
        }
    }
    // The sum over co is cut where gemm cuts that of the banded path's product.
    let kc = crate::conv_direct::k_block(rows, band_len::<f32>(g).min(l), c_out);
    let band_rows = (band_len::<f32>(g) / g.w).clamp(1, g.h);
    let shape = crate::conv_direct::Shape { c: c_out, h: g.h, w: g.w, k: g.k, stride: 1 };
    let plan = crate::conv_direct::GradPlan::new(shape, band_rows);
    let kernel = |b: usize, j: usize, _: &mut Vec<f32>, dst: (*mut f32, usize)| {
        let gb = &grad[b * c_out * l..][..c_out * l];
        // SAFETY: `direct_tasks` hands each task its own rows of band j (`dst`).
        unsafe { crate::conv_direct::input_grad(&plan, j, gb, &wt, g.c, dst, kc) };
    };
    direct_tasks(g.b, plan.bands(), g.c, l, kernel)
}

/// The input gradient by im2col's adjoint: `Wᵀ x grad` per (image, band of output pixels) into a
/// buffer, then col2im. The products of as many tasks as there are threads run at once, then
/// their col2im in parallel over the (image, channel) planes, each plane taking the tasks in
/// order: every element is summed in the order one thread would sum it, whatever the thread
/// count, and a batch of one image (Stable Diffusion's LoRA step) uses every core (one thread
/// per image ran the products at half the machine's speed there).
fn conv_input_grad_bands<T: WithDType>(grad: &[T], w: &[T], g: Geom, c_out: usize) -> Vec<T> {
    let l = g.out_h() * g.out_w();
    let rows = g.rows();
    let hw = g.h * g.w;
    let plane = g.c * hw;
    let mut dx = vec![T::zero(); g.b * plane];
    // lhs = W^T: element (r, co) at w[co * rows + r].
    let lhs = |w: &[T]| (w.as_ptr(), 1, rows);
    let band = band_len::<T>(g);
    let bands = l.div_ceil(band);
    let tasks = g.b * bands;
    // Task t: image t / bands, output pixels [p0, p0 + n).
    let span = |t: usize| {
        let (b, p0) = (t / bands, (t % bands) * band);
        (b, p0, band.min(l - p0))
    };
    let inner = threads_per_product(tasks);
    if is_pointwise(g) {
        let dst = SharedMut(dx.as_mut_ptr());
        (0..tasks).into_par_iter().for_each(|t| {
            let (b, p0, n) = span(t);
            let gb = &grad[b * c_out * l..][..c_out * l];
            // SAFETY: image b's gradient is rows x l; this task alone writes its columns
            // [p0, p0 + n).
            unsafe {
                gemm_threads(
                    inner,
                    (rows, n, c_out),
                    dst.ptr().add(b * plane + p0),
                    l,
                    false,
                    lhs(w),
                    (gb[p0..].as_ptr(), l, 1),
                )
            };
        });
        return dx;
    }
    let window = rayon::current_num_threads().max(1);
    let mut cols: Vec<Vec<T>> = (0..window).map(|_| Vec::new()).collect();
    for first in (0..tasks).step_by(window) {
        let group = first..(first + window).min(tasks);
        cols.par_iter_mut().zip(group.clone()).for_each(|(cols, t)| {
            let (b, p0, n) = span(t);
            let gb = &grad[b * c_out * l..][..c_out * l];
            cols.resize(rows * n, T::zero());
            // SAFETY: cols is rows x n (row stride n), gb's band c_out x n with row stride l.
            unsafe {
                gemm_threads(inner, (rows, n, c_out), cols.as_mut_ptr(), n, false, lhs(w), (gb[p0..].as_ptr(), l, 1))
            };
        });
        let segments: Vec<_> = group.clone().map(|t| row_segments(g, span(t).1, span(t).1 + span(t).2)).collect();
        let (b0, b1) = (span(group.start).0, span(group.end - 1).0 + 1);
        dx[b0 * plane..b1 * plane].par_chunks_mut(hw).enumerate().for_each(|(i, dplane)| {
            let (b, c) = (b0 + i / g.c, i % g.c);
            for ((t, cols), segments) in group.clone().zip(&cols).zip(&segments) {
                let (tb, _, n) = span(t);
                if tb == b {
                    col2im_band_channel(cols, g, segments, c, dplane, n);
                }
            }
        });
    }
    dx
}

/// The convolution op on `(x, w, bias)` (`bias` ignored when `has_bias` is false): its forward
/// computed on the operands' storages, applied with a backward where a gradient is needed and
/// without one otherwise (sampling); the graph holds the output once.
#[derive(Clone, Copy)]
struct Conv2dOp {
    g: Geom,
    has_bias: bool,
}

/// The input gradient as a no-backward op on `(grad, w)`.
struct ConvInputGrad(Geom);

impl candle_core::CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "ipr-conv2d-input-grad"
    }
    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let c_out = wl.shape().dims()[0];
        let shape = Shape::from((g.b, g.c, g.h, g.w));
        Ok(match (gs, w) {
            (CpuStorage::F32(d), CpuStorage::F32(w)) => {
                (CpuStorage::F32(conv_input_grad(contiguous(d, gl)?, contiguous(w, wl)?, g, c_out)), shape)
            }
            (CpuStorage::F64(d), CpuStorage::F64(w)) => {
                (CpuStorage::F64(conv_input_grad(contiguous(d, gl)?, contiguous(w, wl)?, g, c_out)), shape)
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(gs.dtype(), "conv2d input gradient")),
        })
    }
}

struct Im2Col(Geom);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "ipr-im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let shape = Shape::from((g.rows(), g.cols()));
        Ok(match s {
            CpuStorage::F32(d) => (CpuStorage::F32(im2col(contiguous(d, l)?, g)), shape),
            CpuStorage::F64(d) => (CpuStorage::F64(im2col(contiguous(d, l)?, g)), shape),
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), "im2col")),
        })
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ipr-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let c_out = wl.shape().dims()[0];
        let shape = Shape::from((g.b, c_out, g.out_h(), g.out_w()));
        Ok(match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let bias = if self.has_bias { Some(contiguous(b, bl)?) } else { None };
                (CpuStorage::F32(conv_forward(contiguous(x, xl)?, contiguous(w, wl)?, bias, g, c_out)), shape)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let bias = if self.has_bias { Some(contiguous(b, bl)?) } else { None };
                (CpuStorage::F64(conv_forward(contiguous(x, xl)?, contiguous(w, wl)?, bias, g, c_out)), shape)
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), "conv2d")),
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::op_profile::scope("conv.backward", grad.device());
        let g = self.g;
        let c_out = w.dim(0)?;
        let dx = if x.track_op() {
            Some(grad.contiguous()?.apply_op2_no_bwd(&w.detach().contiguous()?, &ConvInputGrad(g))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            // (B, Co, Ho, Wo) -> (Co, B Ho Wo) against the whole batch's columns: only full
            // training (the toy's pretraining) trains convolution kernels.
            let g2 = grad.transpose(0, 1)?.contiguous()?.reshape((c_out, g.cols()))?;
            let cols = x.contiguous()?.apply_op1_no_bwd(&Im2Col(g))?;
            Some(g2.matmul(&cols.t()?)?.reshape(w.shape())?)
        } else {
            None
        };
        let db = if b.track_op() { Some(crate::fused::sum_f32(grad, (0, 2, 3))?) } else { None };
        Ok((dx, dw, db))
    }
}

/// `conv2d(x, w, padding, stride) + bias` (square kernel, no dilation or groups) on the CPU for
/// f32 / f64; `None` elsewhere (the caller uses candle's conv).
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Option<Tensor>> {
    let (b, c, h, wd) = x.dims4()?;
    let (c_out, c_in, kh, kw) = w.dims4()?;
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) || kh != kw || c_in != c {
        return Ok(None);
    }
    if h + 2 * padding < kh || wd + 2 * padding < kw {
        return Ok(None);
    }
    let g = Geom { b, c, h, w: wd, k: kh, stride, pad: padding };
    let zeros;
    let bias_or_zeros = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(c_out, x.dtype(), x.device())?;
            &zeros
        }
    };
    let has_bias = bias.is_some();
    if !(x.track_op() || w.track_op() || bias.is_some_and(|b| b.track_op())) {
        return Ok(Some(x.apply_op3_no_bwd(w, bias_or_zeros, &Conv2dOp { g, has_bias })?));
    }
    Ok(Some(x.apply_op3(w, bias_or_zeros, Conv2dOp { g, has_bias })?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    /// The forward's fast paths give the bits of the banded im2col + gemm one: the direct AVX-512
    /// kernel (on "same" convolutions and 3x3 stride-2 downsamplers, through the input's phase
    /// planes, where the CPU has it) and the padded-rows im2col + gemm. On the toy UNet's shapes
    /// (f32; sums over `K` of up to 1152, which gemm cuts in blocks, also as it does for products
    /// of at most 64 x 64 at 8x8; output channels in blocks of 8, 6, 4, 2 and 1 with pixels in
    /// blocks of 48, 64 and 80; several bands at 40 channels x 64 pixels, written in place, and
    /// at 100 x 37, through the buffer; 5x5 and 7x7 kernels; the toy's two downsamplers, 64
    /// channels at 8x8, a 6x6 image whose 9 output pixels go through the buffer, a rectangle).
    #[test]
    fn forward_paths_have_the_banded_forwards_bits() {
        let d = Device::Cpu;
        let mut direct = 0;
        for (c, c_out, (h, w), b, bias, k, stride, pad) in [
            (16, 16, (32, 32), 2, true, 3, 1, 1),
            (48, 16, (32, 32), 1, true, 3, 1, 1),
            (96, 32, (16, 16), 2, true, 3, 1, 1),
            (128, 64, (16, 16), 1, false, 3, 1, 1),
            (40, 8, (64, 64), 1, true, 3, 1, 1),
            (16, 3, (32, 32), 1, true, 3, 1, 1),
            (24, 15, (16, 16), 2, false, 3, 1, 1),
            (72, 2, (17, 17), 1, true, 3, 1, 1),
            (64, 64, (8, 8), 2, true, 3, 1, 1),
            (128, 64, (8, 8), 1, true, 3, 1, 1),
            (96, 64, (8, 8), 1, false, 3, 1, 1),
            (32, 6, (8, 8), 1, true, 3, 1, 1),
            (7, 11, (5, 5), 2, true, 3, 1, 1),
            (100, 5, (37, 37), 1, true, 3, 1, 1),
            (8, 8, (12, 12), 1, true, 3, 1, 0),
            (6, 9, (20, 20), 1, true, 5, 1, 2),
            (4, 5, (13, 13), 1, true, 7, 1, 3),
            (12, 10, (9, 9), 2, false, 3, 1, 2),
            (16, 16, (32, 32), 2, true, 3, 2, 1),
            (32, 32, (16, 16), 1, true, 3, 2, 1),
            (64, 64, (8, 8), 2, false, 3, 2, 1),
            (8, 5, (6, 6), 1, true, 3, 2, 1),
            (12, 7, (10, 14), 2, true, 3, 2, 1),
        ] {
            let g = Geom { b, c, h, w, k, stride, pad };
            let x = Tensor::randn(0f32, 1., b * c * h * w, &d).unwrap().to_vec1::<f32>().unwrap();
            let wt = Tensor::randn(0f32, 0.1, c_out * c * k * k, &d).unwrap().to_vec1::<f32>().unwrap();
            let bv: Vec<f32> = (0..c_out).map(|i| i as f32 * 0.37 - 1.0).collect();
            let bias = bias.then_some(&bv[..]);
            let plain = conv_forward_bands(&x, &wt, bias, g, c_out);
            let same =
                |y: &[f32]| y.len() == plain.len() && y.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits());
            let at = format!("{c}->{c_out} at {h}x{w}, k{k} stride {stride}");
            if direct_forward(g, c_out) {
                let direct_conv = DirectForward::new(&wt, g, c_out).expect("applies");
                assert!(same(&direct_conv.run(&x, bias)), "direct: {at}");
                direct += 1;
            }
            if padded_rows(g) {
                assert!(same(&conv_forward_padded_rows(&x, &wt, bias, g, c_out)), "padded rows: {at}");
            }
            assert!(same(&conv_forward(&x, &wt, bias, g, c_out)), "{at}");
        }
        assert!(
            direct == 0 || direct == 20,
            "the direct kernel took {direct} of the 20 same or downsampling convolutions of 3 or more channels"
        );
        assert_eq!(direct > 0, crate::conv_direct::available());
        // Odd sizes at stride 2 stay on the banded path.
        assert!(DirectForward::new(&[0.0; 9 * 4 * 4], Geom { b: 1, c: 4, h: 9, w: 8, k: 3, stride: 2, pad: 1 }, 4)
            .is_none());
    }

    /// The direct input gradient (on AVX-512 CPUs) gives the bits of the im2col + col2im one on
    /// "same" stride-1 shapes whose output fits one band: the toy's, sums over 64 output
    /// channels, input channels in blocks of 8, 6, 4, 2, 1; 5x5 and 7x7 kernels; a 5x5 image
    /// whose 25 pixels go through the buffer. (Other paddings take the banded path.)
    #[test]
    fn direct_input_grad_has_the_banded_bits() {
        if !crate::conv_direct::available() {
            return;
        }
        let d = Device::Cpu;
        for (c, c_out, hw, b, k, pad) in [
            (16, 16, 32, 2, 3, 1),
            (48, 16, 32, 1, 3, 1),
            (96, 32, 16, 2, 3, 1),
            (64, 64, 16, 1, 3, 1),
            (15, 7, 16, 1, 3, 1),
            (6, 9, 20, 1, 5, 2),
            (5, 4, 11, 1, 7, 3),
            (128, 64, 8, 2, 3, 1),
            (64, 64, 8, 1, 3, 1),
            (32, 16, 5, 2, 3, 1),
        ] {
            let g = Geom { b, c, h: hw, w: hw, k, stride: 1, pad };
            assert!(direct_forward(g, c_out) && band_len::<f32>(g) >= g.out_h() * g.out_w(), "one band");
            let l = g.out_h() * g.out_w();
            let grad = Tensor::randn(0f32, 1., b * c_out * l, &d).unwrap().to_vec1::<f32>().unwrap();
            let w = Tensor::randn(0f32, 0.1, c_out * c * k * k, &d).unwrap().to_vec1::<f32>().unwrap();
            let (ours, banded) =
                (conv_input_grad_direct(&grad, &w, g, c_out), conv_input_grad_bands(&grad, &w, g, c_out));
            assert_eq!(ours.len(), banded.len());
            // Equal values; a zero may differ in sign (the direct path adds exact zeros where
            // col2im skips padding).
            assert!(
                ours.iter().zip(&banded).all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0)),
                "{c}->{c_out} at {hw}, k{k}"
            );
        }
    }

    /// Where the input rows are cut into several bands (Stable Diffusion sizes), the direct
    /// input gradient and the banded one agree to rounding (their sums meet in another order).
    #[test]
    fn direct_input_grad_over_several_bands_agrees() {
        if !crate::conv_direct::available() {
            return;
        }
        let d = Device::Cpu;
        let (c, c_out, hw) = (40, 24, 64);
        let g = Geom { b: 2, c, h: hw, w: hw, k: 3, stride: 1, pad: 1 };
        assert!(band_len::<f32>(g) / hw < hw, "several bands");
        let grad = Tensor::randn(0f32, 1., 2 * c_out * hw * hw, &d).unwrap().to_vec1::<f32>().unwrap();
        let w = Tensor::randn(0f32, 0.1, c_out * c * 9, &d).unwrap().to_vec1::<f32>().unwrap();
        let (ours, banded) = (conv_input_grad_direct(&grad, &w, g, c_out), conv_input_grad_bands(&grad, &w, g, c_out));
        let worst = ours.iter().zip(&banded).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{worst}");
    }

    /// The banded input gradient and forward give the same bits on one thread and on three:
    /// batches of one image with several bands (products split over threads, col2im over
    /// planes) and of several images; stride 1 and 2, and a 1x1 kernel.
    #[test]
    fn banded_paths_do_not_depend_on_the_thread_count() {
        for (b, c, c_out, hw, k, stride, pad) in
            [(1, 1000, 16, 10, 3, 1, 1), (2, 160, 24, 11, 3, 2, 1), (1, 300, 40, 9, 1, 1, 0), (3, 8, 8, 6, 3, 1, 1)]
        {
            let g = Geom { b, c, h: hw, w: hw, k, stride, pad };
            let l = g.out_h() * g.out_w();
            let values = |n: usize, f: f64| (0..n).map(|i| ((i as f64 * f).sin() * 0.5) as f32).collect::<Vec<f32>>();
            let (x, w, grad) =
                (values(b * c * hw * hw, 0.31), values(c_out * g.rows(), 0.17), values(b * c_out * l, 0.23));
            let bias = values(c_out, 0.7);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let dx = conv_input_grad_bands(&grad, &w, g, c_out);
                    let y = conv_forward_bands(&x, &w, Some(&bias), g, c_out);
                    (
                        dx.into_iter().map(f32::to_bits).collect::<Vec<_>>(),
                        y.into_iter().map(f32::to_bits).collect::<Vec<_>>(),
                    )
                })
            };
            assert!(band_len::<f32>(g) < l || b > 1 || k == 1, "several tasks");
            assert_eq!(run(1), run(3), "{g:?}");
        }
    }

    #[test]
    fn equals_candles_conv_and_its_gradients() {
        let d = Device::Cpu;
        // (kernel, padding, stride, size, channels, batch); with 64 channels an image is cut into
        // several bands of output pixels, crossing rows mid-way and ending in a partial band.
        for (k, p, s, hw, c, b) in [
            (3, 1, 1, 9, 3, 2),
            (1, 0, 1, 7, 3, 2),
            (3, 1, 2, 9, 3, 2),
            (3, 0, 2, 8, 3, 2),
            (3, 1, 2, 8, 3, 2),
            (3, 2, 1, 5, 3, 2),
            (5, 2, 1, 4, 3, 2),
            (3, 2, 2, 3, 3, 2),
            (3, 1, 1, 40, 64, 2),
            (3, 1, 2, 63, 64, 2),
            (1, 0, 1, 70, 64, 2),
            (3, 1, 1, 16, 3, 3),
            (1, 0, 1, 10, 3, 7),
            (3, 1, 2, 24, 3, 5),
        ] {
            let g = Geom { b, c, h: hw, w: hw, k, stride: s, pad: p };
            assert!(c < 64 || band_len::<f64>(g) < g.out_h() * g.out_w(), "several bands");
            let x = Var::from_tensor(&Tensor::randn(0f64, 1., (b, c, hw, hw), &d).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f64, 1., (4, c, k, k), &d).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f64, 1., 4, &d).unwrap()).unwrap();
            let ours = conv2d(x.as_tensor(), w.as_tensor(), Some(bias.as_tensor()), p, s).unwrap().unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(w.as_tensor(), p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-12, "k{k} p{p} s{s}");
            let r = Tensor::randn(0f64, 1., theirs.shape(), &d).unwrap();
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &bias] {
                let e = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(e < 1e-10, "k{k} p{p} s{s}: {e}");
            }
            let (fw, fb) = (w.as_tensor().detach(), bias.as_tensor().detach());
            let y = conv2d(x.as_tensor(), &fw, Some(&fb), p, s).unwrap().unwrap();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g.get(&fw).is_none() && g.get(&fb).is_none() && g.get(x.as_tensor()).is_some());
        }
    }
}
