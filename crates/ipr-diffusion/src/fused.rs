//! Fused CPU kernels with a backward: softmax over the last dimension and normalisation over the
//! last dimension (the statistics part of layer norm and group norm, Ba et al. 2016, Wu & He 2018).
//!
//! candle 0.11's own fused `softmax_last_dim` and `layer_norm` have no backward, and the same ops
//! built from primitive tensor ops are correct but 4-60x slower than torch on the CPU (measured:
//! group norm of 16x64x32x32 7.8 ms vs 0.13 ms). These are [`CustomOp1`]s with one-pass row
//! kernels (statistics accumulated in f64) and backward passes written with tensor ops, so
//! autograd stays exact; the finite-difference test in `tests/gradients.rs` covers them. On
//! other devices [`crate::nn`] keeps the primitive-op path.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType, D};

/// The elements a contiguous `layout` covers in `data`; an error naming `op` otherwise. Every CPU
/// kernel of the crate (here, `conv`, `norm`, `geglu`) reads its inputs through this.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op} needs a contiguous input")))?;
    Ok(&data[start..end])
}

/// `f` on the contiguous f32 data of a CPU tensor (held, not copied); an error naming `op`
/// otherwise. For kernels that read tensors they hold rather than the storages of a `cpu_fwd`.
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(CpuStorage::F32(d)) => f(contiguous(d, l, op)?),
        _ => Err(candle_core::Error::Msg(format!("{op}: expected an f32 CPU tensor"))),
    }
}

fn rows<'a, T: WithDType>(data: &'a [T], layout: &Layout) -> Result<(&'a [T], usize)> {
    let n = *layout.dims().last().unwrap_or(&1);
    Ok((contiguous(data, layout, "fused op")?, n.max(1)))
}

fn map_rows(s: &CpuStorage, l: &Layout, f: &(dyn Fn(&[f64], &mut [f64]) + Sync)) -> Result<(CpuStorage, Shape)> {
    fn run<T: WithDType>(data: &[T], l: &Layout, f: &(dyn Fn(&[f64], &mut [f64]) + Sync)) -> Result<Vec<T>> {
        use rayon::prelude::*;
        let (data, n) = rows(data, l)?;
        let mut out = vec![T::zero(); data.len()];
        out.par_chunks_mut(n).zip(data.par_chunks(n)).for_each_init(
            || (vec![0f64; n], vec![0f64; n]),
            |(row_in, row_out), (o, chunk)| {
                for (a, b) in row_in.iter_mut().zip(chunk) {
                    *a = b.to_f64();
                }
                f(row_in, row_out);
                for (a, &b) in o.iter_mut().zip(row_out.iter()) {
                    *a = T::from_f64(b);
                }
            },
        );
        Ok(out)
    }
    let storage = match s {
        CpuStorage::F32(d) => CpuStorage::F32(run(d, l, f)?),
        CpuStorage::F64(d) => CpuStorage::F64(run(d, l, f)?),
        CpuStorage::F16(d) => CpuStorage::F16(run(d, l, f)?),
        CpuStorage::BF16(d) => CpuStorage::BF16(run(d, l, f)?),
        other => {
            return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), "fused row op"));
        }
    };
    Ok((storage, l.shape().clone()))
}

/// A raw pointer the parallel tasks of one kernel share; each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: only used by kernels whose tasks write pairwise disjoint elements.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not its field).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

/// `dst (m x n, row stride dst_rs) [+]= lhs (m x k) x rhs (k x n)` on one thread, the operands
/// given as (pointer, row stride, column stride); without `accumulate` `dst` is written, not
/// read (`gemm` then takes alpha as 0, as candle's matmul passes it, so the sums are the same).
///
/// # Safety
/// The pointers must address matrices of these shapes and strides, `dst` not aliasing the others.
pub(crate) unsafe fn gemm_serial<T: WithDType>(
    mnk: (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
) {
    gemm_threads(1, mnk, dst, dst_rs, accumulate, lhs, rhs)
}

/// [`gemm_serial`] on `threads` rayon threads: `gemm` splits the output among them and cuts
/// each element's sum over `K` as on one thread (its blocks depend on the sizes alone), so the
/// bits are those of [`gemm_serial`] (tested). For products too few to keep every core busy
/// one per thread (a batch of one image).
///
/// # Safety
/// As [`gemm_serial`].
pub(crate) unsafe fn gemm_threads<T: WithDType>(
    threads: usize,
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const T, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const T, usize, usize),
) {
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        parallelism,
    )
}

/// The threads each of `tasks` independent products should take: all of them when there are too
/// few tasks to share out evenly (fewer than two per thread), else one.
pub(crate) fn threads_per_product(tasks: usize) -> usize {
    let threads = rayon::current_num_threads();
    if tasks < 2 * threads {
        threads
    } else {
        1
    }
}

struct SoftmaxLastDim;

crate::fastmath::simd_dispatch! {
    /// Softmax of each row of `n` f32 values.
    fn softmax_rows_f32(data: &[f32], n: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0f32; data.len()];
        out.par_chunks_mut(n).zip(data.par_chunks(n)).for_each(|(o, x)| softmax_row_f32(x, o));
        out
    }
}

/// The softmax of one f32 row `x` into `o` (of equal length): `exp` after subtracting the row's
/// maximum, the sum in f64. Inlined into its callers' AVX2 versions.
#[inline(always)]
pub(crate) fn softmax_row_f32(x: &[f32], o: &mut [f32]) {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    for (o, &v) in o.iter_mut().zip(x) {
        *o = crate::fastmath::exp_f32(v - max);
    }
    let inv = (1.0 / crate::fastmath::lane_sum(o, |v| v as f64)) as f32;
    for o in o.iter_mut() {
        *o *= inv;
    }
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "ipr-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // f32 rows in f32 (as torch's kernel; f64 `exp` was ~6% of a LoRA training step) with
        // the vectorisable exp, the sum accumulated in f64.
        if let CpuStorage::F32(d) = s {
            let (data, n) = rows(d, l)?;
            return Ok((CpuStorage::F32(softmax_rows_f32(data, n)), l.shape().clone()));
        }
        map_rows(s, l, &|x, y| {
            let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for (o, &v) in y.iter_mut().zip(x) {
                *o = (v - max).exp();
                sum += *o;
            }
            for o in y.iter_mut() {
                *o /= sum;
            }
        })
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx = y * (g - sum(g * y))
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((res * grad.broadcast_sub(&dot)?)?))
    }
}

struct NormalizeLastDim {
    eps: f64,
}

impl CustomOp1 for NormalizeLastDim {
    fn name(&self) -> &'static str {
        "ipr-normalize-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let eps = self.eps;
        map_rows(s, l, &move |x, y| {
            let n = x.len() as f64;
            let mean = x.iter().sum::<f64>() / n;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for (o, &v) in y.iter_mut().zip(x) {
                *o = (v - mean) * inv;
            }
        })
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // y = (x - mean) / s with s = sqrt(var + eps):
        // dx = (g - mean(g) - y * mean(g * y)) / s
        let x = arg;
        let mean = x.mean_keepdim(D::Minus1)?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
        let s = (var + self.eps)?.sqrt()?;
        let g_mean = grad.mean_keepdim(D::Minus1)?;
        let gy_mean = (grad * res)?.mean_keepdim(D::Minus1)?;
        let dx = grad.broadcast_sub(&g_mean)?.sub(&res.broadcast_mul(&gy_mean)?)?.broadcast_div(&s)?;
        Ok(Some(dx))
    }
}

fn cpu_float(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}

/// Softmax over the last dimension, fused on the CPU; `None` where the caller must use its
/// primitive-op path (other devices).
pub fn softmax_last_dim(x: &Tensor) -> Result<Option<Tensor>> {
    if !cpu_float(x) {
        return Ok(None);
    }
    in_f32(x, |x| x.contiguous()?.apply_op1(SoftmaxLastDim)).map(Some)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension, fused on the CPU; `None` elsewhere.
pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !cpu_float(x) {
        return Ok(None);
    }
    in_f32(x, |x| x.contiguous()?.apply_op1(NormalizeLastDim { eps })).map(Some)
}

/// `f(x)` computed in f32 for half inputs (the ops' backward reduces over rows, which in a half
/// type lose the gradient: a group norm's input gradient came out twice too large in bf16),
/// as the other devices' primitive paths do; f32 and f64 as they are.
fn in_f32(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
        _ => f(x),
    }
}

/// A forward result computed (detached) before its op is applied, handed to the op's forward
/// once and then released: the graph holds only the op's result, not also the operand a
/// pass-through op would need (which doubled the memory of every such node).
pub(crate) struct Stash(std::sync::Mutex<Option<Tensor>>);

impl Stash {
    pub(crate) fn new(result: Tensor) -> Self {
        Self(std::sync::Mutex::new(Some(result)))
    }

    fn take(&self, op: &str) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned lock")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: forward applied twice")))
    }

    /// The result's storage, for a `cpu_fwd`.
    pub(crate) fn cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        self.storage(op, "the CPU", |s| match s {
            candle_core::Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    /// The result's storage, for a `cuda_fwd`.
    pub(crate) fn cuda(&self, op: &str) -> Result<(candle_core::CudaStorage, Shape)> {
        self.storage(op, "a CUDA device", |s| match s {
            candle_core::Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn storage<S: BackendStorage>(
        &self,
        op: &str,
        device: &str,
        pick: impl FnOnce(&candle_core::Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let t = self.take(op)?;
        let (storage, layout) = t.storage_and_layout();
        let s = pick(&storage).ok_or_else(|| candle_core::Error::Msg(format!("{op}: result not on {device}")))?;
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }
}

/// The `cpu_fwd` and `cuda_fwd` of a `CustomOp3` whose result waits in the [`Stash`] field
/// `$field`: both hand it over, whatever the operands.
macro_rules! stashed_forward3 {
    ($field:ident) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.$field.cpu(self.name())
        }

        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.$field.cuda(self.name())
        }
    };
}
pub(crate) use stashed_forward3;

/// A 2-d convolution whose forward is candle's (computed detached and handed over through a
/// [`Stash`]) and whose input gradient is a forward convolution with the flipped, transposed
/// kernel (for stride `s > 1`, of the output gradient with `s - 1` zeros between its pixels)
/// instead of candle's `conv_transpose2d`: a direct loop on the CPU (~4x slower: the measurement
/// is in docs/stack-notes.md) and a naive kernel, one thread per output with no tiling, on CUDA,
/// where the forward convolution is im2col + cuBLAS (or cuDNN). Gradients are only computed for
/// operands that track them, so a frozen kernel (LoRA training) costs no weight gradient.
/// The bias is an operand (zeros when `has_bias` is false), so its gradient is summed in f32
/// ([`sum_f32`]) where candle's broadcast add would sum it in the storage type.
struct Conv2dFastBackward {
    padding: usize,
    stride: usize,
    has_bias: bool,
    y: Stash,
}

impl candle_core::CustomOp3 for Conv2dFastBackward {
    fn name(&self) -> &'static str {
        "ipr-conv2d-fast-backward"
    }

    stashed_forward3!(y);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::op_profile::scope("conv.backward", grad.device());
        let (p, s) = (self.padding, self.stride);
        let (_, _, kh, kw) = w.dims4()?;
        let dx = if x.track_op() {
            let (h, wd) = (x.dim(2)?, x.dim(3)?);
            Some(if kh == kw && p < kh {
                conv_input_grad_by_forward(grad, w, p, s, (h, wd))?
            } else {
                // candle's own rule (backprop.rs).
                let out = (grad.dim(2)? - 1) * s + (kh - 1) + 1 - 2 * p;
                grad.conv_transpose2d(w, p, h - out, s, 1)?
            })
        } else {
            None
        };
        let dw = if w.track_op() {
            // Correlate the input with the output gradient: the conv's stride becomes the dilation.
            // The gradient as a contiguous kernel (cuDNN takes no other; candle's fallback for a
            // strided kernel on CUDA is a naive loop).
            let g = x.transpose(0, 1)?.conv2d(&grad.transpose(0, 1)?.contiguous()?, p, 1, s, 1)?.transpose(0, 1)?;
            let (_, _, g0, g1) = g.dims4()?;
            Some(if g0 != kh || g1 != kw { g.narrow(2, 0, kh)?.narrow(3, 0, kw)? } else { g })
        } else {
            None
        };
        let db = if self.has_bias && b.track_op() { Some(sum_f32(grad, (0, 2, 3))?) } else { None };
        Ok((dx, dw, db))
    }
}

/// `t.sum(dims)`, summed in f32 when `t` is bf16 or f16 (candle sums in the storage type: bf16
/// keeps 8 bits, so a sum over a batch's pixels loses most of them), in `t`'s dtype. For the
/// parameter gradients of full fine-tuning; LoRA trains no bias.
pub(crate) fn sum_f32<D: candle_core::shape::Dims>(t: &Tensor, dims: D) -> Result<Tensor> {
    match t.dtype() {
        DType::BF16 | DType::F16 => t.to_dtype(DType::F32)?.sum(dims)?.to_dtype(t.dtype()),
        _ => t.sum(dims),
    }
}

/// The input gradient of `x.conv2d(w, p, s)` (square kernel `k > p`, input `(h, w)`) as a forward
/// convolution: `dx[i] = sum_k w[k] g[(i + p - k) / s]` over the terms where `s` divides
/// `i + p - k`, which is the stride-1 correlation of the flipped kernel with the output gradient
/// spread out by `s` (zeros between its pixels), padded by `k - 1 - p` (and on the bottom and
/// right by the rows and columns the forward's stride left over).
fn conv_input_grad_by_forward(
    grad: &Tensor,
    w: &Tensor,
    p: usize,
    s: usize,
    (h, wd): (usize, usize),
) -> Result<Tensor> {
    let k = w.dim(2)?;
    let w_t = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    if s == 1 {
        return grad.conv2d(&w_t, k - 1 - p, 1, 1, 1);
    }
    let g = spread(&spread(grad, 2, s)?, 3, s)?;
    let (extra_h, extra_w) = ((h + 2 * p - k) % s, (wd + 2 * p - k) % s);
    let g = g.pad_with_zeros(2, 0, extra_h)?.pad_with_zeros(3, 0, extra_w)?;
    g.conv2d(&w_t, k - 1 - p, 1, 1, 1)
}

/// `t` with `s - 1` zeros between consecutive entries along `dim` (length `n` -> `(n - 1) s + 1`).
fn spread(t: &Tensor, dim: usize, s: usize) -> Result<Tensor> {
    let n = t.dim(dim)?;
    let mut dims = t.dims().to_vec();
    let x = t.unsqueeze(dim + 1)?;
    dims.insert(dim + 1, s - 1);
    let zeros = Tensor::zeros(dims.as_slice(), t.dtype(), t.device())?;
    let mut out = t.dims().to_vec();
    out[dim] = n * s;
    Tensor::cat(&[&x, &zeros], dim + 1)?.reshape(out.as_slice())?.narrow(dim, 0, (n - 1) * s + 1)
}

static FAST_CONV_BACKWARD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Switches [`conv2d_fast_backward`] on (the default) or off, process-wide (for benchmarks and
/// for comparing against candle's own backward).
pub fn set_fast_conv_backward(on: bool) {
    FAST_CONV_BACKWARD.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the fast convolution paths ([`crate::conv`] and the op below) are on.
pub fn fast_conv_backward() -> bool {
    FAST_CONV_BACKWARD.load(std::sync::atomic::Ordering::Relaxed)
}

/// `x.conv2d(w, padding, stride) + bias` (bias `(C_out,)`) with the faster backward described
/// above when a gradient is needed on the CPU or CUDA; `None` where the caller should use candle's
/// conv directly.
pub fn conv2d_fast_backward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    let on = FAST_CONV_BACKWARD.load(std::sync::atomic::Ordering::Relaxed);
    let device_ok = x.device().is_cpu() || x.device().is_cuda();
    if !on || !device_ok || !(x.track_op() || w.track_op() || bias.is_some_and(|b| b.track_op())) {
        return Ok(None);
    }
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    let (y, b) = match bias {
        Some(b) => (y.broadcast_add(&b.detach().reshape((1, b.dim(0)?, 1, 1))?)?, b.clone()),
        None => (y, Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?),
    };
    let op = Conv2dFastBackward { padding, stride, has_bias: bias.is_some(), y: Stash::new(y) };
    Ok(Some(x.apply_op3(w, &b, op)?))
}

/// `x W^T (+ b)` (x `(..., in)`, W `(out, in)`) whose backward computes only the gradients of the
/// operands that track them: candle's matmul backward always computes both operands' gradients,
/// so a frozen weight (LoRA training) would cost a weight-gradient matmul and its storage per
/// layer and step (docs/stack-notes.md). On the CPU in f32 the forward is [`LinearForward`] on
/// the operands' storages; elsewhere candle's, computed detached and handed over through a
/// [`Stash`]. The bias is part of the op (one node instead of two).
struct LinearSkipFrozen {
    /// The forward computed before (CUDA, f64), or `None`: [`LinearForward`] on the storages.
    y: Option<Stash>,
    has_bias: bool,
}

impl candle_core::CustomOp3 for LinearSkipFrozen {
    fn name(&self) -> &'static str {
        "ipr-linear-skip-frozen"
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
        match &self.y {
            Some(y) => y.cpu(self.name()),
            None => LinearForward::run(x, xl, w, wl, self.has_bias.then_some((b, bl))),
        }
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.y.as_ref().ok_or_else(|| candle_core::Error::Msg(format!("{}: no forward", self.name())))?;
        y.cuda(self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::op_profile::scope("linear.backward", grad.device());
        // `x` of any rank as the matrix `(rows, in)` (a view: no node of the graph).
        let (rows, n) = (grad.elem_count() / w.dim(0)?.max(1), w.dim(0)?);
        let grad = grad.reshape((rows, n))?;
        let dx = if x.track_op() { Some(matmul_no_fill(&grad, &w.detach())?.reshape(x.dims())?) } else { None };
        let dw = if w.track_op() { Some(grad.t()?.matmul(&x.detach().reshape((rows, w.dim(1)?))?)?) } else { None };
        let db = if b.track_op() { Some(sum_f32(&grad, 0)?) } else { None };
        Ok((dx, dw, db))
    }
}

/// `x (m x k) x wᵀ (+ bias)` on the CPU in f32, computed as candle computes `x.matmul(&w.t())`
/// and `broadcast_add` (the same `gemm` call, then one f32 add per element), so with the same
/// bits, but written into memory that is not zero-filled first and with the bias added in place
/// (candle's matmul zero-fills its result, and the bias is a second pass and tensor).
struct LinearForward;

impl LinearForward {
    fn run(
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        // `x` of any rank as the matrix `(m, k)`; the result keeps its leading dimensions.
        let (dims, n) = (xl.shape().dims(), wl.shape().dims2()?.0);
        let k = *dims.last().unwrap_or(&1);
        let m = xl.shape().elem_count() / k.max(1);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (x, w) else {
            return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), "linear forward"));
        };
        let (x, w) = (contiguous(x, xl, "linear forward")?, contiguous(w, wl, "linear forward")?);
        // wᵀ: element (i, j) at j * k + i.
        let mut y = product_into_new((m, n, k), x, (w, 1, k));
        if let Some((b, bl)) = bias {
            let CpuStorage::F32(b) = b else {
                return Err(candle_core::Error::UnsupportedDTypeForOp(b.dtype(), "linear forward"));
            };
            let b = contiguous(b, bl, "linear forward")?;
            use rayon::prelude::*;
            y.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(v, &b)| *v += b));
        }
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

/// `lhs (m x k, row-major) x rhs (k x n; strides (row, column))` as candle's CPU matmul calls
/// `gemm` for it (read_dst false, alpha 0, beta 1, candle's thread count), so with its bits,
/// into a new vector that is not zero-filled first (`gemm` writes every element unread).
fn product_into_new(
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
) -> Vec<f32> {
    assert!(lhs.len() >= m * k && (m == 0 || n == 0 || k == 0 || (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len()));
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the operands have these shapes and strides inside their slices (asserted); y has
    // room for m x n, which the product writes without reading (`read_dst` false).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0f32,
            1f32,
            false,
            false,
            false,
            parallelism,
        );
        y.set_len(m * n);
    }
    y
}

/// `a (m x k) x b (k x n)` of contiguous 2-d f32 tensors on the CPU by [`product_into_new`]:
/// candle's matmul without its zero-filled result (the input gradient of the frozen-weight
/// linear op).
struct MatMulNoFill;

impl candle_core::CustomOp2 for MatMulNoFill {
    fn name(&self) -> &'static str {
        "ipr-matmul-no-fill"
    }
    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((m, k), (_, n)) = (al.shape().dims2()?, bl.shape().dims2()?);
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (a, b) else {
            return Err(candle_core::Error::UnsupportedDTypeForOp(a.dtype(), "matmul"));
        };
        let (a, b) = (contiguous(a, al, "matmul")?, contiguous(b, bl, "matmul")?);
        Ok((CpuStorage::F32(product_into_new((m, n, k), a, (b, n, 1))), Shape::from((m, n))))
    }
}

/// `a.matmul(b)` for 2-d tensors: [`MatMulNoFill`] for contiguous f32 on the CPU, candle's
/// matmul elsewhere. Not part of a graph.
pub(crate) fn matmul_no_fill(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let usable = a.device().is_cpu()
        && a.rank() == 2
        && b.rank() == 2
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.is_contiguous()
        && b.is_contiguous()
        && a.dims()[1] == b.dims()[0];
    if usable {
        a.apply_op2_no_bwd(b, &MatMulNoFill)
    } else {
        a.matmul(b)
    }
}

impl candle_core::CustomOp2 for LinearForward {
    fn name(&self) -> &'static str {
        "ipr-linear-forward"
    }
    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        Self::run(x, xl, w, wl, None)
    }
}

impl candle_core::CustomOp3 for LinearForward {
    fn name(&self) -> &'static str {
        "ipr-linear-forward"
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
        Self::run(x, xl, w, wl, Some((b, bl)))
    }
}

/// `x.matmul(w.t())` of contiguous 2-d f32 CPU tensors by [`LinearForward`], as a vector (for
/// ops that add to it in place).
pub(crate) fn frozen_linear_forward(x: &Tensor, w: &Tensor) -> Result<Vec<f32>> {
    let ((xs, xl), (ws, wl)) = (x.storage_and_layout(), w.storage_and_layout());
    let (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(ws)) = (&*xs, &*ws) else {
        return Err(candle_core::Error::Msg("linear forward: operands not on the CPU".into()));
    };
    match LinearForward::run(xs, xl, ws, wl, None)?.0 {
        CpuStorage::F32(y) => Ok(y),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), "linear forward")),
    }
}

/// `x.matmul(w.t())` `+ bias` of 2-d f32 tensors on the CPU, outside any graph, by
/// [`LinearForward`]; `None` elsewhere (the caller uses candle's ops).
pub fn linear_forward_no_grad(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let tracks = [Some(x), Some(w), bias].into_iter().flatten().any(|t| t.track_op());
    if tracks || !linear_forward_applies(x, w, bias) {
        return Ok(None);
    }
    Ok(Some(match bias {
        Some(b) => x.apply_op3_no_bwd(w, b, &LinearForward)?,
        None => x.apply_op2_no_bwd(w, &LinearForward)?,
    }))
}

/// Whether [`LinearForward`] computes this product: f32 tensors on the CPU of matching sizes, `x`
/// of rank 2 or more (`(..., in)`, contiguous beyond rank 2).
pub(crate) fn linear_forward_applies(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    x.device().is_cpu()
        && (x.rank() == 2 || (x.rank() > 2 && x.is_contiguous()))
        && w.rank() == 2
        && [Some(x), Some(w), bias].into_iter().flatten().all(|t| t.dtype() == DType::F32)
        && x.dims().last() == Some(&w.dims()[1])
        && bias.is_none_or(|b| b.dims() == [w.dims()[0]])
}

/// `x.matmul(w.t())` (`+ bias`) for a 2-d `x` (of any rank `(..., in)` on the CPU in f32: no
/// reshape nodes around it), with the backward above when a gradient is needed (CPU and CUDA);
/// `None` where the caller should use candle's matmul (no gradient needed, or another device).
pub fn linear_no_frozen_grad(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let device_ok = x.device().is_cpu() || x.device().is_cuda();
    let tracks = x.track_op() || w.track_op() || bias.is_some_and(|b| b.track_op());
    if !device_ok || !tracks || (x.rank() != 2 && !linear_forward_applies(x, w, bias)) {
        return Ok(None);
    }
    // On the CPU in f32 the op computes its forward itself; elsewhere candle computes it here.
    let y = if linear_forward_applies(x, w, bias) {
        None
    } else {
        let y = x.detach().matmul(&w.detach().t()?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(&b.detach())?,
            None => y,
        };
        Some(Stash::new(y.contiguous()?))
    };
    let has_bias = bias.is_some();
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?;
            &zeros
        }
    };
    Ok(Some(x.apply_op3(w, bias, LinearSkipFrozen { y, has_bias })?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    /// The frozen-weight linear on an input of rank 3 gives the bits of the same op on its 2-d
    /// view, output and gradients (of the input, and of a trained weight and bias).
    #[test]
    fn linear_op_on_any_rank_has_the_2d_bits() {
        let d = Device::Cpu;
        let t = |dims: &[usize], f: f64| {
            let n: usize = dims.iter().product();
            Tensor::from_vec((0..n).map(|i| ((i as f64 * f).sin() * 0.7) as f32).collect::<Vec<_>>(), dims, &d).unwrap()
        };
        for train_w in [false, true] {
            let x = Var::from_tensor(&t(&[3, 70, 48], 0.37)).unwrap();
            let w = Var::from_tensor(&t(&[40, 48], 0.11)).unwrap();
            let b = Var::from_tensor(&t(&[40], 0.5)).unwrap();
            let (w, b) = if train_w {
                (w.as_tensor().clone(), b.as_tensor().clone())
            } else {
                (w.as_tensor().detach(), b.as_tensor().detach())
            };
            let r = t(&[3, 70, 40], 0.23);
            let nd = linear_no_frozen_grad(x.as_tensor(), &w, Some(&b)).unwrap().unwrap();
            let flat =
                linear_no_frozen_grad(&x.as_tensor().reshape((210, 48)).unwrap(), &w, Some(&b)).unwrap().unwrap();
            let flat = flat.reshape((3, 70, 40)).unwrap();
            let bits = |t: &Tensor| {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>()
            };
            assert_eq!(bits(&nd), bits(&flat));
            let g1 = (&nd * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&flat * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert_eq!(bits(g1.get(x.as_tensor()).unwrap()), bits(g2.get(x.as_tensor()).unwrap()));
            if train_w {
                assert_eq!(bits(g1.get(&w).unwrap()), bits(g2.get(&w).unwrap()));
                assert_eq!(bits(g1.get(&b).unwrap()), bits(g2.get(&b).unwrap()));
            }
        }
    }

    /// A product on several threads has the bits of the one-thread product (gemm splits the
    /// output, not the sums), large enough for gemm to use the threads.
    #[test]
    fn threaded_gemm_has_the_serial_bits() {
        for (m, n, k, accumulate) in [(320, 96, 2880, false), (640, 64, 1500, true), (37, 300, 700, false)] {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i as f64 * 0.618).sin() * 0.5) as f32).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| ((i as f64 * 0.377).cos() * 0.5) as f32).collect();
            let start: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 * 0.25).collect();
            let run = |threads: usize| {
                let mut dst = start.clone();
                let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
                // SAFETY: lhs m x k, rhs k x n, dst m x n, row-major.
                pool.install(|| unsafe {
                    gemm_threads(
                        threads,
                        (m, n, k),
                        dst.as_mut_ptr(),
                        n,
                        accumulate,
                        (lhs.as_ptr(), k, 1),
                        (rhs.as_ptr(), n, 1),
                    )
                });
                dst.into_iter().map(f32::to_bits).collect::<Vec<_>>()
            };
            assert_eq!(run(1), run(3), "{m}x{n}x{k}");
        }
    }

    /// The f32 linear forward has the bits of candle's `matmul` + `broadcast_add`, with and
    /// without a bias, on small (gemm's small-product path) and larger products; so has the
    /// plain product of its backward.
    #[test]
    fn linear_forward_has_candles_bits() {
        let d = Device::Cpu;
        for (m, k, n, bias) in [(5, 16, 64, true), (1024, 64, 512, true), (300, 256, 64, false), (3, 600, 7, true)] {
            let x = Tensor::randn(0f32, 1., (m, k), &d).unwrap();
            let w = Tensor::randn(0f32, 0.1, (n, k), &d).unwrap();
            let b = Tensor::randn(0f32, 1., n, &d).unwrap();
            let b = bias.then_some(&b);
            let ours = linear_forward_no_grad(&x, &w, b).unwrap().expect("f32 on the CPU, no graph");
            let mut theirs = x.matmul(&w.t().unwrap()).unwrap();
            if let Some(b) = b {
                theirs = theirs.broadcast_add(b).unwrap();
            }
            let bits = |t: &Tensor| {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(bits(&ours), bits(&theirs), "{m} x {k} x {n}");
        }
        // The input gradient's product without a zero-filled result: candle's bits too.
        for (m, k, n) in [(5, 16, 64), (1024, 512, 64), (3, 7, 600)] {
            let a = Tensor::randn(0f32, 1., (m, k), &d).unwrap();
            let b = Tensor::randn(0f32, 1., (k, n), &d).unwrap();
            let bits = |t: &Tensor| {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(bits(&matmul_no_fill(&a, &b).unwrap()), bits(&a.matmul(&b).unwrap()), "{m} x {k} x {n}");
        }
        let tracked = Var::from_tensor(&Tensor::ones((2, 3), DType::F32, &d).unwrap()).unwrap();
        assert!(linear_forward_no_grad(tracked.as_tensor(), &Tensor::ones((4, 3), DType::F32, &d).unwrap(), None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn conv_backward_equals_candles_and_skips_frozen_kernels() {
        let d = Device::Cpu;
        // Odd and even sizes: a stride-2 forward over an even size leaves a row and a column over.
        for (k, p, s, n) in [(3, 1, 1, 9), (1, 0, 1, 9), (3, 1, 2, 9), (3, 0, 2, 9), (3, 1, 2, 10), (3, 0, 2, 10)]
            .into_iter()
            .chain([(1, 0, 2, 9), (3, 2, 3, 11), (5, 2, 2, 10), (2, 0, 2, 9)])
        {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1., (2, 3, n, n), &d).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f64, 1., (4, 3, k, k), &d).unwrap()).unwrap();
            let o = (n + 2 * p - k) / s + 1;
            let r = Tensor::randn(0f64, 1., (2, 4, o, o), &d).unwrap();
            let ours = conv2d_fast_backward(x.as_tensor(), w.as_tensor(), None, p, s).unwrap().unwrap();
            let theirs = x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1).unwrap();
            assert!(max_diff(&ours, &theirs) == 0.0);
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let e = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(e < 1e-10, "k{k} p{p} s{s} n{n}: {e}");
            }
            let frozen = w.as_tensor().detach();
            let y = conv2d_fast_backward(x.as_tensor(), &frozen, None, p, s).unwrap().unwrap();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g.get(&frozen).is_none() && g.get(x.as_tensor()).is_some());
        }
    }

    #[test]
    fn linear_backward_equals_candles_and_skips_frozen_weights() {
        let d = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (5, 3), &d).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1., (4, 3), &d).unwrap()).unwrap();
        let r = Tensor::randn(0f64, 1., (5, 4), &d).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1., 4, &d).unwrap()).unwrap();
        let ours = linear_no_frozen_grad(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap().unwrap();
        let theirs = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap();
        assert!(max_diff(&ours, &theirs) == 0.0);
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            assert!(max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()) < 1e-12);
        }
        let (frozen, frozen_b) = (w.as_tensor().detach(), b.as_tensor().detach());
        for bias in [None, Some(&frozen_b)] {
            let y = linear_no_frozen_grad(x.as_tensor(), &frozen, bias).unwrap().unwrap();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g.get(&frozen).is_none() && g.get(&frozen_b).is_none() && g.get(x.as_tensor()).is_some());
        }
        assert!(linear_no_frozen_grad(&x.as_tensor().detach(), &frozen, Some(&frozen_b)).unwrap().is_none());
    }
}
