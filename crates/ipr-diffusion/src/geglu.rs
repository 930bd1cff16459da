//! GEGLU (Shazeer 2020), the activation of diffusers' `FeedForward`: `a * gelu(gate)` where
//! `[a, gate]` are the two halves of the last dimension, GELU the exact (erf) one.
//!
//! As tensor ops this is two narrows, a GELU and a product, and in a backward pass candle's
//! autograd then makes a full-size gradient (and a zero tensor) per operand of each. Here it is one
//! CPU kernel forward and one kernel for the input gradient. f32 uses the vectorisable
//! [`crate::fastmath`] functions (libm's `erff` was ~3% of a toy LoRA training step), f64 the exact
//! erf; the unit tests compare both with the tensor-op definition. On CUDA (feature `cuda`) the
//! two ops run `geglu.cu`'s kernels, beside this file (f32, bf16, f16 storage; f32 arithmetic).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cuda_kernels::{elementwise_grid, Launch, Scalars, Source, ELEMENTWISE_BLOCK};
use crate::fastmath::{erf_f32, exp_f32};

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
}

fn gelu_grad_f64(x: f64) -> f64 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
        + x * (-0.5 * x * x).exp() * FRAC_1_SQRT_2PI
}

#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_grad_f32(x: f32) -> f32 {
    0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)) + x * exp_f32(-0.5 * x * x) * FRAC_1_SQRT_2PI as f32
}

fn contiguous<'a, T>(d: &'a [T], l: &Layout) -> Result<&'a [T]> {
    crate::fused::contiguous(d, l, "geglu")
}

/// One row: `out = f(a, gate)` for the halves `[a, gate]` of `row`.
#[inline(always)]
fn forward_row<T: Copy>(o: &mut [std::mem::MaybeUninit<T>], row: &[T], n: usize, f: impl Fn(T, T) -> T) {
    let (a, gate) = row.split_at(n);
    for ((o, &a), &g) in o.iter_mut().zip(a).zip(gate) {
        o.write(f(a, g));
    }
}

/// `rows` of `n` outputs, each written once by `row` (no zero fill first: it cost a quarter as
/// much as the GELUs).
fn rows_out<T: Send>(len: usize, n: usize, row: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(n).enumerate().for_each(|(i, o)| row(i, o));
    // SAFETY: the chunks cover all `len` elements, each written by `row` (`forward_row`).
    unsafe { out.set_len(len) };
    out
}

/// One row: `[dy * gelu(gate), dy * a * gelu'(gate)]` through `f(a, gate, dy)`.
#[inline(always)]
fn backward_row<T: Copy>(o: &mut [T], row: &[T], g: &[T], n: usize, f: impl Fn(T, T, T) -> (T, T)) {
    let (a, gate) = row.split_at(n);
    let (da, dgate) = o.split_at_mut(n);
    for ((((da, dgate), &a), &gt), &g) in da.iter_mut().zip(dgate.iter_mut()).zip(a).zip(gate).zip(g) {
        (*da, *dgate) = f(a, gt, g);
    }
}

crate::fastmath::simd_dispatch! {
    /// Rows of `2n` in, rows of `n` out, f32.
    fn forward_f32(h: &[f32], n: usize) -> Vec<f32> {
        rows_out(h.len() / 2, n, |i, o| forward_row(o, &h[i * 2 * n..][..2 * n], n, |a, g| a * gelu_f32(g)))
    }
}

crate::fastmath::simd_dispatch! {
    /// Rows of `2n` (input) and `n` (output gradient) in, rows of `2n` out, f32.
    fn backward_f32(h: &[f32], dy: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; h.len()];
        out.par_chunks_mut(2 * n).zip(h.par_chunks(2 * n).zip(dy.par_chunks(n))).for_each(|(o, (row, g))| {
            backward_row(o, row, g, n, |a, x, dy| (dy * gelu_f32(x), dy * a * gelu_grad_f32(x)))
        });
        out
    }
}

/// The f64 forward (the reference precision).
fn forward_f64(h: &[f64], n: usize) -> Vec<f64> {
    rows_out(h.len() / 2, n, |i, o| forward_row(o, &h[i * 2 * n..][..2 * n], n, |a, g| a * gelu_f64(g)))
}

/// The f64 backward.
fn backward_f64(h: &[f64], dy: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0f64; h.len()];
    out.par_chunks_mut(2 * n)
        .zip(h.par_chunks(2 * n).zip(dy.par_chunks(n)))
        .for_each(|(o, (row, g))| backward_row(o, row, g, n, |a, x, dy| (dy * gelu_f64(x), dy * a * gelu_grad_f64(x))));
    out
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "ipr-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if crate::cuda_kernels::emulates(s.dtype()) {
            return crate::cuda_kernels::emulate(launch_spec(l, false), &[(s, l)]);
        }
        let mut dims = l.dims().to_vec();
        let n = dims.last().copied().unwrap_or(0) / 2;
        *dims.last_mut().expect("geglu input has a last dimension") = n;
        let out = match s {
            CpuStorage::F32(d) => CpuStorage::F32(forward_f32(contiguous(d, l)?, n)),
            CpuStorage::F64(d) => CpuStorage::F64(forward_f64(contiguous(d, l)?, n)),
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), "ipr-geglu")),
        };
        Ok((out, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::launch(launch_spec(l, false), &[(s, l)])
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _timed = crate::op_profile::scope("geglu.backward", grad.device());
        Ok(Some(arg.detach().apply_op2_no_bwd(&grad.contiguous()?, &GegluBwd)?))
    }
}

struct GegluBwd;

impl CustomOp2 for GegluBwd {
    fn name(&self) -> &'static str {
        "ipr-geglu-bwd"
    }

    fn cpu_fwd(&self, h: &CpuStorage, hl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        if crate::cuda_kernels::emulates(h.dtype()) {
            return crate::cuda_kernels::emulate(launch_spec(hl, true), &[(h, hl), (g, gl)]);
        }
        let n = hl.dims().last().copied().unwrap_or(0) / 2;
        let out = match (h, g) {
            (CpuStorage::F32(h), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward_f32(contiguous(h, hl)?, contiguous(g, gl)?, n))
            }
            (CpuStorage::F64(h), CpuStorage::F64(g)) => {
                CpuStorage::F64(backward_f64(contiguous(h, hl)?, contiguous(g, gl)?, n))
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(h.dtype(), "ipr-geglu-bwd")),
        };
        Ok((out, hl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        hl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::launch(launch_spec(hl, true), &[(h, hl), (g, gl)])
    }
}

/// `geglu.cu`'s forward (out: `(rows, n)`) or `backward` (out: `dh`, `h`'s shape) on `h` laid
/// out as `hl` (`(rows, 2n)`): `rows * n` items, one per thread and loop step.
fn launch_spec(hl: &Layout, backward: bool) -> Launch {
    let n = hl.dims().last().copied().unwrap_or(0) / 2;
    let rows = hl.shape().elem_count() / (2 * n).max(1);
    let mut out_dims = hl.dims().to_vec();
    if !backward {
        *out_dims.last_mut().expect("geglu input has a last dimension") = n;
    }
    Launch {
        source: Source::Geglu,
        kernel: if backward { "geglu_bwd" } else { "geglu_fwd" },
        out_shape: Shape::from(out_dims),
        scalars: Scalars::Rows { rows: rows as i64, cols: n as i64 },
        grid: elementwise_grid(rows * n),
        block: ELEMENTWISE_BLOCK,
    }
}

/// `a * gelu(gate)` for `[a, gate]` the halves of `h`'s last dimension; `None` where no fused
/// kernel applies (the caller then uses tensor ops): f32/f64 on the CPU; f32, bf16, f16 on CUDA
/// with the `cuda` feature (unless `IPR_CUDA_KERNELS=0`).
pub fn geglu(h: &Tensor) -> Result<Option<Tensor>> {
    let cpu = h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64);
    if !(cpu || crate::cuda_kernels::applies(h)) || h.dim(candle_core::D::Minus1)? % 2 != 0 {
        return Ok(None);
    }
    Ok(Some(h.contiguous()?.apply_op1(Geglu)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn reference(h: &Tensor) -> Tensor {
        let n = h.dim(D::Minus1).unwrap() / 2;
        (h.narrow(D::Minus1, 0, n).unwrap() * h.narrow(D::Minus1, n, n).unwrap().gelu_erf().unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The gradient by tensor ops with the exact derivative (candle's own `gelu_erf` backward
    /// rounds 1/sqrt(2 pi) to 0.398942, a 1e-6 error).
    fn reference_grad(h: &Tensor, r: &Tensor) -> Tensor {
        let n = h.dim(D::Minus1).unwrap() / 2;
        let (a, x) = (h.narrow(D::Minus1, 0, n).unwrap(), h.narrow(D::Minus1, n, n).unwrap());
        let cdf = (((&x * std::f64::consts::FRAC_1_SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5).unwrap();
        let pdf = ((x.sqr().unwrap() * -0.5).unwrap().exp().unwrap() * FRAC_1_SQRT_2PI).unwrap();
        let dgelu = (&cdf + (&x * pdf).unwrap()).unwrap();
        let da = (r * x.gelu_erf().unwrap()).unwrap();
        let dx = ((r * a).unwrap() * dgelu).unwrap();
        Tensor::cat(&[da, dx], D::Minus1).unwrap()
    }

    #[test]
    fn equals_tensor_ops_forward_and_gradient() {
        let d = Device::Cpu;
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
            let h64 = Tensor::randn(0f64, 2.5, (2, 3, 10), &d).unwrap();
            let r64 = Tensor::randn(0f64, 1., (2, 3, 5), &d).unwrap();
            let h = Var::from_tensor(&h64.to_dtype(dtype).unwrap()).unwrap();
            let r = r64.to_dtype(dtype).unwrap();
            let ours = geglu(h.as_tensor()).unwrap().unwrap();
            let theirs = reference(h.as_tensor());
            assert!(max_diff(&ours, &theirs) < tol, "{dtype:?} forward: {}", max_diff(&ours, &theirs));
            let g = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (h64, r64) = (h.as_tensor().to_dtype(DType::F64).unwrap(), r.to_dtype(DType::F64).unwrap());
            let e = max_diff(g.get(h.as_tensor()).unwrap(), &reference_grad(&h64, &r64));
            assert!(e < 10.0 * tol, "{dtype:?} gradient: {e}");
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let d = Device::Cpu;
        assert!(geglu(&Tensor::zeros((2, 3), DType::F32, &d).unwrap()).unwrap().is_none());
        assert!(geglu(&Tensor::zeros((2, 4), DType::BF16, &d).unwrap()).unwrap().is_none());
    }
}
