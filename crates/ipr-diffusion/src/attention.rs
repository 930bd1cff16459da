//! Memory-efficient attention: the scores of a block of query rows at a time, never the whole
//! `(B*H, Lq, Lk)` matrix, in the forward and in a backward that recomputes them (the
//! recomputation of Rabe & Staats 2021 and FlashAttention, Dao et al. 2022, written with tensor
//! ops, so it runs on every device candle supports).
//!
//! Plain attention under autograd keeps the scores and the probabilities of every layer for the
//! backward: at SD 2.1's 96x96 latents that is 1.7 GB per matrix and layer in bf16, and the LoRA
//! training step ran out of memory on a 141 GB GPU (README, CUDA). Here the graph keeps only q, k,
//! v and the output; the backward walks the query blocks again:
//! `P = softmax(q k^T s)`, `dV += P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dO O))`,
//! `dQ = dS K s`, `dK += dS^T Q s`.
//!
//! [`crate::nn::attention`] takes this path when the whole score matrix would exceed
//! [`block_bytes`] (and no mask is given); smaller attentions (the toy, CLIP) keep the plain path.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{CustomOp3, DType, Result, Tensor, D};

use crate::cuda_kernels::{elementwise_grid, row_block, KernelOp, Launch, Scalars, Source, ELEMENTWISE_BLOCK};

/// The default budget for one block's scores: large enough that GPU kernels stay busy, small
/// enough that SD-size training fits (SD 2.1, 96x96 latents, batch 2: 13 blocks per layer).
pub const DEFAULT_BLOCK_BYTES: usize = 256 << 20;

static BLOCK_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_BLOCK_BYTES);

/// Sets, process-wide, the most bytes the scores of one query block may take (as f32); attention
/// whose whole score matrix fits stays unblocked. For memory/speed trade-offs and for tests.
pub fn set_block_bytes(bytes: usize) {
    BLOCK_BYTES.store(bytes.max(1), Ordering::Relaxed);
}

/// The current block budget ([`set_block_bytes`]).
pub fn block_bytes() -> usize {
    BLOCK_BYTES.load(Ordering::Relaxed)
}

/// Query rows per block for `bh` batch-heads over `lk` keys, or `None` when the whole `lq`-row
/// score matrix fits the budget (no blocking needed).
pub fn block_rows(bh: usize, lq: usize, lk: usize) -> Option<usize> {
    let row_bytes = bh * lk * std::mem::size_of::<f32>();
    let budget = block_bytes();
    (row_bytes * lq > budget).then(|| (budget / row_bytes.max(1)).clamp(1, lq))
}

/// Scaled dot-product attention over `(BH, L, D)` tensors, `rows` query rows at a time; gradients
/// flow to whichever of `q`, `k`, `v` track them, through the recomputing backward.
pub fn blockwise_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, rows: usize) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    // The forward needs no graph: the flash kernel where it applies (CUDA, half precision).
    let out = match flash_attention(&q.detach(), &k.detach(), &v.detach(), scale)? {
        Some(out) => out,
        None => forward(&q.detach(), &k.detach(), &v.detach(), scale, rows)?,
    };
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(&k, &v, BlockwiseAttention { scale, rows, out: crate::fused::Stash::new(out) })
}

/// The softmax of a score block, without a graph (fused kernels on every device).
fn softmax(x: &Tensor) -> Result<Tensor> {
    crate::nn::softmax(&x.detach()).map_err(|e| candle_core::Error::Msg(format!("attention softmax: {e}")))
}

/// `softmax(scale * scores)` over the last dimension, without a graph: on CUDA (feature `cuda`)
/// one kernel (`attention.cu`) in the scores' dtype with f32 arithmetic; elsewhere the scale and
/// [`softmax`] as before (the same bits on the CPU).
pub fn scaled_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if crate::cuda_kernels::applies(scores) && scores.rank() >= 1 {
        return scores.detach().contiguous()?.apply_op1_no_bwd(&ScaledSoftmax { scale });
    }
    softmax(&(scores * scale)?)
}

/// The head dimensions the flash kernel is built for (`attention.cu`): a head of `d` channels runs
/// the smallest that holds it (zero-padded), with the kernel's warps per block and its name.
const FLASH_DIMS: [(usize, u32, &str); 8] = [
    (16, 4, "flash_fwd_d16"),
    (32, 4, "flash_fwd_d32"),
    (48, 4, "flash_fwd_d48"),
    (64, 4, "flash_fwd_d64"),
    (80, 2, "flash_fwd_d80"),
    (96, 2, "flash_fwd_d96"),
    (128, 2, "flash_fwd_d128"),
    (160, 1, "flash_fwd_d160"),
];

/// `softmax(scale q kᵀ) v` for `(BH, L, d)` tensors without a graph, by the flash kernel of
/// `attention.cu` (the scores never written): `Some` on CUDA (feature `cuda`, unless
/// `IPR_CUDA_KERNELS=0`) for bf16 / f16 heads of at most 160 channels that need no gradient;
/// `None` elsewhere (the caller takes the tensor-op paths).
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let usable = crate::cuda_kernels::applies(q)
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && q.rank() == 3
        && k.rank() == 3
        && k.dims() == v.dims()
        && k.dim(2)? == q.dim(2)?
        && k.dim(0)? == q.dim(0)?
        && !(q.track_op() || k.track_op() || v.track_op())
        && q.dim(2)? <= FLASH_DIMS[FLASH_DIMS.len() - 1].0;
    if !usable {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(Some(q.apply_op3_no_bwd(&k, &v, &FlashForward { scale })?))
}

/// `p * (dp - delta)` (the softmax's backward; `delta` per row, f32) by `attention.cu`'s kernel on
/// CUDA for half-precision `p`, `dp`; `None` elsewhere (the caller's tensor ops).
fn softmax_grad_kernel(p: &Tensor, dp: &Tensor, delta: &Tensor) -> Result<Option<Tensor>> {
    let usable = crate::cuda_kernels::applies(p)
        && matches!(p.dtype(), DType::BF16 | DType::F16)
        && dp.dtype() == p.dtype()
        && delta.dtype() == DType::F32
        && dp.dims() == p.dims();
    if !usable {
        return Ok(None);
    }
    let (p, dp, delta) = (p.contiguous()?, dp.contiguous()?, delta.contiguous()?);
    Ok(Some(p.apply_op3_no_bwd(&dp, &delta, &SoftmaxGrad)?))
}

/// The flash forward's kernel as an op (CUDA, or the emulator).
struct FlashForward {
    scale: f64,
}

impl KernelOp for FlashForward {
    fn launch_spec(&self, layouts: &[&candle_core::Layout]) -> Result<Launch> {
        let (bh, lq, d) = layouts[0].shape().dims3()?;
        let lk = layouts[1].shape().dims()[1];
        let &(_, warps, kernel) = FLASH_DIMS
            .iter()
            .find(|&&(dim, _, _)| d <= dim)
            .ok_or_else(|| candle_core::Error::Msg(format!("flash attention: head dimension {d} > 160")))?;
        Ok(Launch {
            source: Source::Attention,
            kernel,
            out_shape: layouts[0].shape().clone(),
            scalars: Scalars::Flash { lq: lq as i32, lk: lk as i32, dh: d as i32, scale: self.scale as f32 },
            grid: (lq.div_ceil(16 * warps as usize) as u32, bh as u32),
            block: 32 * warps,
        })
    }
}

impl CustomOp3 for FlashForward {
    fn name(&self) -> &'static str {
        "ipr-flash-attention-forward"
    }

    crate::cuda_kernels::kernel_op_fwd!(3);
}

/// [`softmax_grad_kernel`]'s kernel as an op (CUDA, or the emulator).
struct SoftmaxGrad;

impl KernelOp for SoftmaxGrad {
    fn launch_spec(&self, layouts: &[&candle_core::Layout]) -> Result<Launch> {
        let (pl, dl) = (layouts[0], layouts[2]);
        let n = pl.shape().elem_count();
        let cols = pl.dims().last().copied().unwrap_or(1).max(1);
        if dl.shape().elem_count() * cols != n {
            candle_core::bail!("ipr-softmax-grad: {} row statistics for {} rows", dl.shape().elem_count(), n / cols);
        }
        Ok(Launch {
            source: Source::Attention,
            kernel: "softmax_grad",
            out_shape: pl.shape().clone(),
            scalars: Scalars::Rows { rows: (n / cols) as i64, cols: cols as i64 },
            grid: elementwise_grid(n),
            block: ELEMENTWISE_BLOCK,
        })
    }
}

impl CustomOp3 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "ipr-softmax-grad"
    }

    crate::cuda_kernels::kernel_op_fwd!(3);
}

/// [`scaled_softmax`]'s kernel as an op (CUDA, or the emulator: on the CPU the scale and the fused
/// softmax are applied as before, and `ipr selftest` compares the two).
struct ScaledSoftmax {
    scale: f64,
}

impl KernelOp for ScaledSoftmax {
    fn launch_spec(&self, layouts: &[&candle_core::Layout]) -> Result<Launch> {
        let l = layouts[0];
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        Ok(Launch {
            source: Source::Attention,
            kernel: "softmax_scaled",
            out_shape: l.shape().clone(),
            scalars: Scalars::Softmax { cols: cols as i64, scale: self.scale as f32 },
            grid: ((l.shape().elem_count() / cols) as u32, 1),
            block: row_block(cols),
        })
    }
}

impl candle_core::CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "ipr-scaled-softmax"
    }

    crate::cuda_kernels::kernel_op_fwd!(1);
}

fn query_blocks(lq: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..lq).step_by(rows.max(1)).map(move |start| (start, rows.max(1).min(lq - start)))
}

fn forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, rows: usize) -> Result<Tensor> {
    let k_t = k.t()?;
    let blocks = query_blocks(q.dim(1)?, rows)
        .map(|(start, n)| scaled_softmax(&q.narrow(1, start, n)?.matmul(&k_t)?, scale)?.matmul(v))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&blocks, 1)
}

struct BlockwiseAttention {
    scale: f64,
    rows: usize,
    out: crate::fused::Stash,
}

impl CustomOp3 for BlockwiseAttention {
    fn name(&self) -> &'static str {
        "ipr-blockwise-attention"
    }

    crate::fused::stashed_forward3!(out);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::op_profile::scope("attention.backward", grad.device());
        let dtype = q.dtype();
        // Elementwise parts and the dK/dV sums in f32 for half inputs; products in the input dtype.
        let acc = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
        let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
        let (grad, out) = (grad.detach().contiguous()?, out.detach());
        let k_t = kd.t()?;
        let v_t = vd.t()?;
        // rowsum(dO * O): the softmax backward's correction term, per query row.
        let delta = (grad.to_dtype(acc)? * out.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?;
        let (mut dq_blocks, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        for (start, n) in query_blocks(qd.dim(1)?, self.rows) {
            let q_c = qd.narrow(1, start, n)?;
            let g_c = grad.narrow(1, start, n)?;
            let p = scaled_softmax(&q_c.matmul(&k_t)?, self.scale)?;
            let dp = g_c.matmul(&v_t)?;
            let delta_c = delta.narrow(1, start, n)?;
            let ds = match softmax_grad_kernel(&p, &dp, &delta_c)? {
                Some(ds) => ds,
                None => (p.to_dtype(acc)? * dp.to_dtype(acc)?.broadcast_sub(&delta_c)?)?.to_dtype(dtype)?,
            };
            if v.track_op() {
                accumulate(&mut dv, p.t()?.matmul(&g_c)?.to_dtype(acc)?)?;
            }
            if k.track_op() {
                accumulate(&mut dk, (ds.t()?.matmul(&q_c)? * self.scale)?.to_dtype(acc)?)?;
            }
            if q.track_op() {
                dq_blocks.push((ds.matmul(&kd)? * self.scale)?);
            }
        }
        let dq = if q.track_op() { Some(Tensor::cat(&dq_blocks, 1)?) } else { None };
        Ok((dq, dk.map(|t| t.to_dtype(dtype)).transpose()?, dv.map(|t| t.to_dtype(dtype)).transpose()?))
    }
}

/// `sum += part` for the dK / dV sums over query blocks.
fn accumulate(sum: &mut Option<Tensor>, part: Tensor) -> Result<()> {
    *sum = Some(match sum.take() {
        Some(s) => (s + part)?,
        None => part,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        candle_nn::ops::softmax(&(q.matmul(&k.t()?)? * scale)?, D::Minus1)?.matmul(v)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    fn inputs(seed: u64, bh: usize, lq: usize, lk: usize, d: usize) -> (Var, Var, Var) {
        let dev = Device::Cpu;
        let r = |s: u64, l: usize| Var::from_tensor(&crate::noise::randn(s, (bh, l, d), DType::F64, &dev).unwrap());
        (r(seed, lq).unwrap(), r(seed + 1, lk).unwrap(), r(seed + 2, lk).unwrap())
    }

    #[test]
    fn blocks_of_any_size_give_plain_attention_and_its_gradients() {
        let (q, k, v) = inputs(3, 3, 10, 7, 4);
        let scale = 0.5;
        let weight = crate::noise::randn(9, (3, 10, 4), DType::F64, &Device::Cpu).unwrap();
        let reference = plain(&q, &k, &v, scale).unwrap();
        let ref_grads = (&reference * &weight).unwrap().sum_all().unwrap().backward().unwrap();
        for rows in [1, 3, 4, 10, 64] {
            let y = blockwise_attention(&q, &k, &v, scale, rows).unwrap();
            assert!(max_diff(&y, &reference) < 1e-12, "forward, rows {rows}");
            let grads = (&y * &weight).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (grads.get(var).unwrap(), ref_grads.get(var).unwrap());
                assert!(max_diff(a, b) < 1e-12, "d{name}, rows {rows}: {}", max_diff(a, b));
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (q, k, v) = inputs(11, 2, 5, 6, 3);
        let weight = crate::noise::randn(12, (2, 5, 3), DType::F64, &Device::Cpu).unwrap();
        let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
            let y = blockwise_attention(q, k, v, 0.7, 2).unwrap();
            (y * &weight).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let y = blockwise_attention(&q, &k, &v, 0.7, 2).unwrap();
        let grads = (&y * &weight).unwrap().sum_all().unwrap().backward().unwrap();
        let eps = 1e-6;
        for which in 0..3 {
            let var = [&q, &k, &v][which];
            let analytic: Vec<f64> = grads.get(var).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for i in (0..base.len()).step_by(5) {
                let shifted = |delta: f64| {
                    let mut x = base.clone();
                    x[i] += delta;
                    let t = Tensor::from_vec(x, var.shape(), &Device::Cpu).unwrap();
                    let mut args = [q.as_tensor().clone(), k.as_tensor().clone(), v.as_tensor().clone()];
                    args[which] = t;
                    loss(&args[0], &args[1], &args[2])
                };
                let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
                assert!((numeric - analytic[i]).abs() < 1e-7, "arg {which} elem {i}: {numeric} vs {}", analytic[i]);
            }
        }
    }

    #[test]
    fn frozen_operands_get_no_gradient_and_half_precision_stays_close() {
        let (q, k, v) = inputs(21, 2, 9, 9, 8);
        // Only q trainable: k and v are plain tensors.
        let (kt, vt) = (k.as_tensor().detach(), v.as_tensor().detach());
        let y = blockwise_attention(&q, &kt, &vt, 0.35, 4).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&kt).is_none() && grads.get(&vt).is_none() && grads.get(&q).is_some());

        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let half = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let reference = plain(&f32s(&q), &f32s(&kt), &f32s(&vt), 0.35).unwrap();
        let y = blockwise_attention(&half(&q), &half(&kt), &half(&vt), 0.35, 4).unwrap();
        assert!(max_diff(&f32s(&y).to_dtype(DType::F64).unwrap(), &reference.to_dtype(DType::F64).unwrap()) < 0.05);
        // The bf16 backward (f32 elementwise parts) against the f64 one.
        let g_half = y.sum_all().unwrap().backward().unwrap();
        let g_ref = plain(&q, &kt, &vt, 0.35).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g_half.get(&q).unwrap(), g_ref.get(&q).unwrap());
        let scale = b.abs().unwrap().max_keepdim(0).unwrap().flatten_all().unwrap().max(0).unwrap();
        let err = max_diff(a, b) / scale.to_scalar::<f64>().unwrap();
        assert!(err < 0.03, "bf16 dq relative error {err}");
    }

    #[test]
    fn blocks_only_when_the_scores_exceed_the_budget() {
        assert_eq!(block_rows(16, 64, 64), None);
        // SD 2.1 at 96x96 latents, batch 2, 5 heads: 9216 keys.
        let rows = block_rows(10, 9216, 9216).unwrap();
        assert!(rows * 10 * 9216 * 4 <= DEFAULT_BLOCK_BYTES && rows > 500, "{rows}");
    }
}
