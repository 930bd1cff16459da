//! Multi-head attention without a graph (sampling, evaluation) on the CPU, as one op over the
//! `(B, L, H*D)` projections: per (image, head, block of query rows) a task multiplies Q by Kᵀ
//! into its own buffer, scales each row and takes its softmax, and multiplies by V straight into
//! the head's columns of the `(B, Lq, H*D)` output, reading Q, K and V in place through strides.
//!
//! Why: the graph path ([`crate::nn::attention`]) copies each of Q, K and V into a head-major
//! tensor, allocates and zero-fills a score tensor, a scaled copy, the probabilities and the
//! output (candle's matmul zero-fills its result), transposes the output back, and runs the
//! batch's small products one after another. At toy size that was about a sixth of a sampling
//! step (`perf`). The products, the scaling and the softmax are those of the graph path, so the
//! result has its bits (tested) while a task holds all query rows; a task's buffers hold at most
//! [`TASK_BYTES`] of scores, so memory stays bounded at any sequence length. (Where query rows
//! are cut into blocks and there are over 512 keys, the second product may round differently:
//! the `gemm` crate cuts sums that long by the size of the whole product.)

use crate::fused::{contiguous, gemm_serial, softmax_row_f32, SharedMut};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Scores and probabilities of one task at most (query rows are blocked to fit): whole score
/// matrices up to 2048 x 2048 (Stable Diffusion at 256 px), blocks of 1024 rows at 4096 keys.
const TASK_BYTES: usize = 32 << 20;

/// `softmax(Q Kᵀ / sqrt(D)) V` per head over `(B, L, H*D)` tensors when none of them is part of
/// a graph and they are f32 on the CPU; `None` otherwise (the caller takes the graph path).
pub fn attention_no_grad(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    let usable = q.device().is_cpu()
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32 && !t.track_op())
        && q.rank() == 3
        && q.dim(2)? % heads == 0;
    if !usable {
        return Ok(None);
    }
    Ok(Some(q.apply_op3_no_bwd(k, v, &InferenceAttention { heads })?))
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    d: usize,
}

struct InferenceAttention {
    heads: usize,
}

impl CustomOp3 for InferenceAttention {
    fn name(&self) -> &'static str {
        "ipr-attention-no-grad"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, lq, inner) = ql.shape().dims3()?;
        let (kb, lk, k_inner) = kl.shape().dims3()?;
        if kb != b || k_inner != inner || vl.shape() != kl.shape() {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not match", ql.shape(), kl.shape(), vl.shape());
        }
        let s = Dims { b, lq, lk, heads: self.heads, d: inner / self.heads };
        match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let op = "attention";
                let out = forward(contiguous(q, ql, op)?, contiguous(k, kl, op)?, contiguous(v, vl, op)?, s);
                Ok((CpuStorage::F32(out), ql.shape().clone()))
            }
            _ => Err(candle_core::Error::UnsupportedDTypeForOp(q.dtype(), "attention (no grad)")),
        }
    }
}

crate::fastmath::simd_dispatch! {
/// `scale` times each row of `scores` (`n` wide), then its softmax into `probs`: the graph
/// path's `scores * scale` (candle's affine: the scale rounded to f32) and softmax kernel.
fn scaled_softmax_rows(scores: &mut [f32], probs: &mut [f32], n: usize, scale: f32) -> usize {
    for (x, o) in scores.chunks_mut(n).zip(probs.chunks_mut(n)) {
        for v in x.iter_mut() {
            *v = *v * scale + 0.0;
        }
        softmax_row_f32(x, o);
    }
    scores.len() / n.max(1)
}
}

fn forward(q: &[f32], k: &[f32], v: &[f32], s: Dims) -> Vec<f32> {
    let inner = s.heads * s.d;
    let rows = (TASK_BYTES / (2 * s.lk * std::mem::size_of::<f32>()).max(1)).clamp(1, s.lq.max(1));
    let blocks = s.lq.div_ceil(rows);
    let total = s.b * s.lq * inner;
    let scale = (1.0 / (s.d as f64).sqrt()) as f32;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let dst = SharedMut(out.as_mut_ptr());
    // Whether [`small`]'s kernels take a task, decided once for full blocks of query rows and
    // once for the last (gemm's cache model is not free at every task).
    #[cfg(target_arch = "x86_64")]
    let small = [small_heads(rows, s), small_heads(s.lq - blocks.saturating_sub(1) * rows, s)];
    (0..s.b * s.heads * blocks).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(scores, probs, kt): &mut (Vec<f32>, Vec<f32>, Vec<f32>), task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (b, h) = (bh / s.heads, bh % s.heads);
            let (r0, r1) = (blk * rows, ((blk + 1) * rows).min(s.lq));
            let m = r1 - r0;
            scores.resize(m * s.lk, 0.0);
            probs.resize(m * s.lk, 0.0);
            let q_at = (b * s.lq + r0) * inner + h * s.d;
            let kv_at = b * s.lk * inner + h * s.d;
            #[cfg(target_arch = "x86_64")]
            if small[usize::from(blk + 1 == blocks)] {
                let (q, k, v) = (&q[q_at..], &k[kv_at..], &v[kv_at..]);
                // SAFETY: the checks of `small_heads` passed (AVX-512F present); the task alone
                // writes rows r0..r1 of head h's columns of image b's output.
                unsafe {
                    small::scores(q, k, (m, s.lk, s.d), inner, kt, scores);
                    scaled_softmax_rows(scores, probs, s.lk, scale);
                    small::weighted_sum(probs, v, (m, s.lk, s.d), inner, dst.ptr().add(q_at));
                }
                return;
            }
            // SAFETY: Q's rows r0..r1 of head h (m x d, row stride inner), Kᵀ of head h (d x lk:
            // element (i, j) at j * inner + i), scores m x lk; all inside their slices.
            unsafe {
                gemm_serial(
                    (m, s.lk, s.d),
                    scores.as_mut_ptr(),
                    s.lk,
                    false,
                    (q[q_at..].as_ptr(), inner, 1),
                    (k[kv_at..].as_ptr(), 1, inner),
                )
            };
            scaled_softmax_rows(scores, probs, s.lk, scale);
            // SAFETY: probs m x lk, V of head h (lk x d, row stride inner); the task alone writes
            // rows r0..r1 of head h's columns of image b's output (row stride inner), a write
            // without a read (`read_dst` false) of possibly uninitialised memory.
            unsafe {
                gemm_serial(
                    (m, s.d, s.lk),
                    dst.ptr().add(q_at),
                    inner,
                    false,
                    (probs.as_ptr(), s.lk, 1),
                    (v[kv_at..].as_ptr(), inner, 1),
                )
            };
        },
    );
    // SAFETY: the tasks (every image, head and block of query rows) wrote all elements.
    unsafe { out.set_len(total) };
    out
}

/// Whether a task's two products run through [`small`]'s kernels: AVX-512, heads of 16 to 64
/// channels in whole vectors, at least 3 query rows and keys, more than 256 scores (`gemm`
/// computes at most 16 x 16 outputs with dot products, fewer than 3 rows or columns as
/// matrix-vector products), and sums over keys that `gemm` does not cut (its 512 terms for
/// products of at most 64 x 64, its cache model beyond): so each element is one chain of fused
/// multiply-adds in order from zero, as in `gemm`'s kernel, and has its bits (tested). The
/// toy's attention: 64 queries, 64 or 8 keys, heads of 16.
#[cfg(target_arch = "x86_64")]
fn small_heads(m: usize, s: Dims) -> bool {
    s.d.is_multiple_of(16)
        && (16..=64).contains(&s.d)
        && m >= 3
        && s.lk >= 3
        && m * s.lk > 16 * 16
        && crate::conv_direct::k_block(m, s.lk, s.d) >= s.d
        && crate::conv_direct::k_block(m, s.d, s.lk) >= s.lk
        && crate::conv_direct::available()
}

/// The products of a task whose heads are small ([`small_heads`]): a `gemm` call costs more than
/// the arithmetic there (packing, dispatch; about half of attention's time at toy size).
#[cfg(target_arch = "x86_64")]
mod small {
    use std::arch::x86_64::*;

    /// `scores (m x lk) = Q Kᵀ` for one head: `q` rows and `k` rows `inner` apart, `d` wide.
    /// Kᵀ is copied first into `kt` (`d` rows of the keys rounded up to 16, zero past `lk`).
    ///
    /// # Safety
    /// AVX-512F; `q` holds `m` rows and `k` `lk` rows of `d` at stride `inner`.
    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_op_in_unsafe_fn)]
    pub(super) unsafe fn scores(
        q: &[f32],
        k: &[f32],
        (m, lk, d): (usize, usize, usize),
        inner: usize,
        kt: &mut Vec<f32>,
        scores: &mut [f32],
    ) {
        assert!(q.len() >= (m - 1) * inner + d && k.len() >= (lk - 1) * inner + d && scores.len() >= m * lk);
        let lp = lk.next_multiple_of(16);
        kt.clear();
        kt.resize(d * lp, 0.0);
        for j in 0..lk {
            for (dd, &x) in k[j * inner..][..d].iter().enumerate() {
                kt[dd * lp + j] = x;
            }
        }
        let mut i = 0;
        while i < m {
            i += match m - i {
                6.. => score_rows::<6>(q, kt, i, lk, d, inner, scores),
                4..=5 => score_rows::<4>(q, kt, i, lk, d, inner, scores),
                2..=3 => score_rows::<2>(q, kt, i, lk, d, inner, scores),
                _ => score_rows::<1>(q, kt, i, lk, d, inner, scores),
            };
        }
    }

    /// Rows `i0 .. i0 + R` of the scores, 4 vectors of keys at a time; returns `R`.
    #[inline(always)]
    #[allow(unsafe_op_in_unsafe_fn)]
    unsafe fn score_rows<const R: usize>(
        q: &[f32],
        kt: &[f32],
        i0: usize,
        lk: usize,
        d: usize,
        inner: usize,
        scores: &mut [f32],
    ) -> usize {
        let lp = lk.next_multiple_of(16);
        let mut j0 = 0;
        while j0 < lk {
            let nv = ((lp - j0) / 16).min(4);
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            for dd in 0..d {
                let row = kt.as_ptr().add(dd * lp + j0);
                let kv =
                    [0, 1, 2, 3].map(|v| if v < nv { _mm512_loadu_ps(row.add(16 * v)) } else { _mm512_setzero_ps() });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let qb = _mm512_set1_ps(*q.get_unchecked((i0 + r) * inner + dd));
                    for (a, &kv) in acc.iter_mut().zip(&kv).take(nv) {
                        *a = _mm512_fmadd_ps(qb, kv, *a);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let out = scores.as_mut_ptr().add((i0 + r) * lk + j0);
                for (v, &a) in acc.iter().enumerate().take(nv) {
                    let left = lk - j0 - 16 * v;
                    let mask: __mmask16 = if left >= 16 { 0xffff } else { (1u16 << left) - 1 };
                    _mm512_mask_storeu_ps(out.add(16 * v), mask, a);
                }
            }
            j0 += 16 * nv;
        }
        R
    }

    /// `dst (m x d, rows inner apart) = P V` for one head: `p` is `m x lk`, `v` rows `inner`
    /// apart. Writes `dst` without reading it.
    ///
    /// # Safety
    /// AVX-512F; `v` holds `lk` rows of `d` at stride `inner`; `dst` addresses `m` rows of `d`
    /// at stride `inner` that no other thread reads or writes meanwhile.
    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_op_in_unsafe_fn)]
    pub(super) unsafe fn weighted_sum(
        p: &[f32],
        v: &[f32],
        (m, lk, d): (usize, usize, usize),
        inner: usize,
        dst: *mut f32,
    ) {
        assert!(p.len() >= m * lk && v.len() >= (lk - 1) * inner + d && d % 16 == 0 && d <= 64);
        let mut i = 0;
        while i < m {
            i += match m - i {
                6.. => sum_rows::<6>(p, v, i, (lk, d), inner, dst),
                4..=5 => sum_rows::<4>(p, v, i, (lk, d), inner, dst),
                2..=3 => sum_rows::<2>(p, v, i, (lk, d), inner, dst),
                _ => sum_rows::<1>(p, v, i, (lk, d), inner, dst),
            };
        }
    }

    /// Rows `i0 .. i0 + R` of the weighted sum, all `d / 16` vectors of each; returns `R`.
    #[inline(always)]
    #[allow(unsafe_op_in_unsafe_fn)]
    unsafe fn sum_rows<const R: usize>(
        p: &[f32],
        v: &[f32],
        i0: usize,
        (lk, d): (usize, usize),
        inner: usize,
        dst: *mut f32,
    ) -> usize {
        let nv = d / 16;
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for j in 0..lk {
            let row = v.as_ptr().add(j * inner);
            let vv = [0, 1, 2, 3].map(|t| if t < nv { _mm512_loadu_ps(row.add(16 * t)) } else { _mm512_setzero_ps() });
            for (r, acc) in acc.iter_mut().enumerate() {
                let pb = _mm512_set1_ps(*p.get_unchecked((i0 + r) * lk + j));
                for (a, &vv) in acc.iter_mut().zip(&vv).take(nv) {
                    *a = _mm512_fmadd_ps(pb, vv, *a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (t, &a) in acc.iter().enumerate().take(nv) {
                _mm512_storeu_ps(dst.add((i0 + r) * inner + 16 * t), a);
            }
        }
        R
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The same bits as the graph path on the toy UNet's attention shapes (self-attention over
    /// 8x8 = 64 tokens, cross-attention over 8 text tokens, 4 heads of 16), through the small
    /// heads' kernels on AVX-512 CPUs (also 77 keys, heads of 32 to 64, rows in blocks of 6, 4,
    /// 2 and 1), and others through `gemm` (among them small products that it computes another
    /// way); within 1e-6 where query rows are blocked (3000 keys:
    /// 1398 rows per task).
    #[test]
    fn equals_the_graph_path() {
        let d = Device::Cpu;
        for (b, lq, lk, heads, dh) in [
            (6, 64, 64, 4, 16),
            (5, 64, 8, 4, 16),
            (2, 64, 77, 2, 32),
            (1, 13, 5, 1, 64),
            (1, 13, 20, 1, 64),
            (3, 100, 20, 5, 16),
            (1, 3, 3, 1, 48),
            (1, 3, 86, 1, 16),
            (1, 400, 3000, 2, 8),
            (2, 7, 1, 1, 3),
            (1, 1500, 3000, 1, 8),
        ] {
            #[cfg(target_arch = "x86_64")]
            assert_eq!(
                small_heads(lq, Dims { b, lq, lk, heads, d: dh }),
                dh >= 16 && lq * lk > 256 && crate::conv_direct::available(),
                "{lq} {lk} {dh}"
            );
            let inner = heads * dh;
            let q = Tensor::randn(0f32, 1., (b, lq, inner), &d).unwrap();
            let k = Tensor::randn(0f32, 1., (b, lk, inner), &d).unwrap();
            let v = Tensor::randn(0f32, 1., (b, lk, inner), &d).unwrap();
            let ours = attention_no_grad(&q, &k, &v, heads).unwrap().expect("f32 on the CPU, no graph");
            let graph = crate::nn::attention_graph(&q, &k, &v, heads, None).unwrap();
            let (a, g) = (
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                graph.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a.len(), g.len());
            if lq * lk * 8 <= TASK_BYTES {
                assert!(a.iter().zip(&g).all(|(x, y)| x.to_bits() == y.to_bits()), "{b} {lq} {lk} {heads} {dh}");
            } else {
                assert!(a.iter().zip(&g).all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs())), "{lq} {lk}");
            }
        }
    }

    #[test]
    fn declines_graphs_and_other_dtypes() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 4, 8), &d).unwrap();
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        assert!(attention_no_grad(tracked.as_tensor(), &x, &x, 2).unwrap().is_none());
        let x64 = x.to_dtype(DType::F64).unwrap();
        assert!(attention_no_grad(&x64, &x64, &x64, 2).unwrap().is_none());
    }
}
