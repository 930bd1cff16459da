//! Group normalisation (Wu & He 2018) and layer normalisation (Ba et al. 2016) fused with their
//! affine part and, optionally, the SiLU that follows them in every UNet resnet (Elfwing et al.
//! 2018): one CPU kernel forward, one CPU kernel for the input gradient, and the weight / bias
//! gradients only when those are trained.
//!
//! candle's autograd computes a full-size gradient for every operand of every elementwise op, frozen
//! or not, and allocates a zero tensor per operand first (backprop.rs, `or_insert`): normalise,
//! scale, shift and SiLU cost about a dozen full-size tensors per layer in a LoRA step. Here they
//! cost two. Statistics are accumulated in f64. Checked by finite differences in
//! `tests/gradients.rs` and against the primitive-op path in the unit tests below.
//!
//! On CUDA (feature `cuda`) the same two ops run `norm.cu`'s kernels, beside this file: f32, bf16
//! and f16 storage, f32 statistics; `ipr selftest --device cuda` checks them against this file's
//! f64 kernels.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cuda_kernels::{row_block, Launch, Scalars, Source};
use crate::fastmath::{lane_dot, lane_sum, sigmoid_f32};

/// `x` viewed as `(n, groups, cg, s)`: statistics per `(n, group)` row, parameters per channel
/// `group * cg + c`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub(crate) groups: usize,
    pub(crate) cg: usize,
    pub(crate) s: usize,
    pub(crate) eps: f64,
    pub(crate) silu: bool,
}

fn sigmoid(u: f64) -> f64 {
    1.0 / (1.0 + (-u).exp())
}

fn slice<'a, T>(d: &'a [T], l: &Layout) -> Result<&'a [T]> {
    crate::fused::contiguous(d, l, "norm op")
}

fn stats<T: WithDType>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn forward<T: WithDType>(x: &[T], w: &[T], b: &[T], v: View) -> Vec<T> {
    let row_len = v.cg * v.s;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(row_len).zip(x.par_chunks(row_len)).enumerate().for_each(|(r, (o, xr))| {
        let g = r % v.groups;
        let (mean, inv) = stats(xr, v.eps);
        for c in 0..v.cg {
            let ch = g * v.cg + c;
            let (wc, bc) = (w[ch].to_f64(), b[ch].to_f64());
            for i in c * v.s..(c + 1) * v.s {
                let u = (xr[i].to_f64() - mean) * inv * wc + bc;
                o[i] = T::from_f64(if v.silu { u * sigmoid(u) } else { u });
            }
        }
    });
    out
}

fn backward_x<T: WithDType>(x: &[T], dy: &[T], w: &[T], b: &[T], v: View) -> Vec<T> {
    let row_len = v.cg * v.s;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(row_len).zip(x.par_chunks(row_len).zip(dy.par_chunks(row_len))).enumerate().for_each_init(
        || (vec![0f64; row_len], vec![0f64; row_len]),
        |(xn, dxn), (r, (o, (xr, gr)))| {
            let g = r % v.groups;
            let (mean, inv) = stats(xr, v.eps);
            let (mut s1, mut s2) = (0f64, 0f64);
            for c in 0..v.cg {
                let ch = g * v.cg + c;
                let (wc, bc) = (w[ch].to_f64(), b[ch].to_f64());
                for i in c * v.s..(c + 1) * v.s {
                    let n = (xr[i].to_f64() - mean) * inv;
                    let mut du = gr[i].to_f64();
                    if v.silu {
                        let u = n * wc + bc;
                        let sg = sigmoid(u);
                        du *= sg * (1.0 + u * (1.0 - sg));
                    }
                    xn[i] = n;
                    dxn[i] = du * wc;
                    s1 += dxn[i];
                    s2 += dxn[i] * n;
                }
            }
            let len = row_len as f64;
            let (m1, m2) = (s1 / len, s2 / len);
            for i in 0..row_len {
                o[i] = T::from_f64((dxn[i] - m1 - xn[i] * m2) * inv);
            }
        },
    );
    out
}

#[inline(always)]
fn stats_f32(row: &[f32], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = lane_sum(row, |v| v as f64) / n;
    let var = lane_sum(row, |v| (v as f64 - mean).powi(2)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

crate::fastmath::simd_dispatch! {
/// The f32 forward: statistics in f64, then `x * scale + shift` per channel in f32 (as PyTorch's
/// CPU group norm computes it) and a vectorisable SiLU.
pub(crate) fn forward_f32(x: &[f32], w: &[f32], b: &[f32], v: View) -> Vec<f32> {
    let row_len = v.cg * v.s;
    // Written once, never read first: no zero fill (a tenth of the kernel's time).
    let mut out = Vec::with_capacity(x.len());
    out.spare_capacity_mut()[..x.len()].par_chunks_mut(row_len).zip(x.par_chunks(row_len)).enumerate().for_each(
        |(r, (o, xr))| {
            let g = r % v.groups;
            let (mean, inv) = stats_f32(xr, v.eps);
            if v.s == 1 {
                // Layer norm: one element per channel, so one loop over the row's channels (the
                // same operations per element, vectorised across channels, not one call each).
                let (wg, bg) = (&w[g * v.cg..][..v.cg], &b[g * v.cg..][..v.cg]);
                let terms = o.iter_mut().zip(xr).zip(wg.iter().zip(bg));
                let affine = |x: f32, wc: f32, bc: f32| {
                    let scale = inv * wc as f64;
                    x * scale as f32 + (bc as f64 - mean * scale) as f32
                };
                if v.silu {
                    terms.for_each(|((o, &x), (&wc, &bc))| {
                        let u = affine(x, wc, bc);
                        o.write(u * sigmoid_f32(u));
                    });
                } else {
                    terms.for_each(|((o, &x), (&wc, &bc))| {
                        o.write(affine(x, wc, bc));
                    });
                }
                return;
            }
            for c in 0..v.cg {
                let ch = g * v.cg + c;
                let scale = inv * w[ch] as f64;
                let (scale, shift) = (scale as f32, (b[ch] as f64 - mean * scale) as f32);
                let (o, xc) = (&mut o[c * v.s..(c + 1) * v.s], &xr[c * v.s..(c + 1) * v.s]);
                if v.silu {
                    for (o, &x) in o.iter_mut().zip(xc) {
                        let u = x * scale + shift;
                        o.write(u * sigmoid_f32(u));
                    }
                } else {
                    for (o, &x) in o.iter_mut().zip(xc) {
                        o.write(x * scale + shift);
                    }
                }
            }
        },
    );
    // SAFETY: the rows cover all `x.len()` elements, each written above.
    unsafe { out.set_len(x.len()) };
    out
}
}

crate::fastmath::simd_dispatch! {
/// The f32 input gradient: element terms in f32, the two row reductions in f64.
pub(crate) fn backward_x_f32(x: &[f32], dy: &[f32], w: &[f32], b: &[f32], v: View) -> Vec<f32> {
    let row_len = v.cg * v.s;
    let mut out = Vec::with_capacity(x.len());
    out.spare_capacity_mut()[..x.len()].par_chunks_mut(row_len).zip(x.par_chunks(row_len).zip(dy.par_chunks(row_len))).enumerate().for_each_init(
        || (vec![0f32; row_len], vec![0f32; row_len]),
        |(xn, dxn), (r, (o, (xr, gr)))| {
            let g = r % v.groups;
            let (mean, inv) = stats_f32(xr, v.eps);
            let (inv32, shift) = (inv as f32, (-mean * inv) as f32);
            let term = |n: &mut f32, d: &mut f32, x: f32, dy: f32, wc: f32, bc: f32| {
                *n = x * inv32 + shift;
                let mut du = dy;
                if v.silu {
                    let u = *n * wc + bc;
                    let sg = sigmoid_f32(u);
                    du *= sg * (1.0 + u * (1.0 - sg));
                }
                *d = du * wc;
            };
            if v.s == 1 {
                // Layer norm: one loop over the row's channels (as in the forward).
                let (wg, bg) = (&w[g * v.cg..][..v.cg], &b[g * v.cg..][..v.cg]);
                for (((n, d), (&x, &dy)), (&wc, &bc)) in
                    xn.iter_mut().zip(dxn.iter_mut()).zip(xr.iter().zip(gr)).zip(wg.iter().zip(bg))
                {
                    term(n, d, x, dy, wc, bc);
                }
            } else {
                for c in 0..v.cg {
                    let ch = g * v.cg + c;
                    let (wc, bc) = (w[ch], b[ch]);
                    let span = c * v.s..(c + 1) * v.s;
                    let (xn, dxn) = (&mut xn[span.clone()], &mut dxn[span.clone()]);
                    for (((n, d), &x), &dy) in xn.iter_mut().zip(dxn.iter_mut()).zip(&xr[span.clone()]).zip(&gr[span]) {
                        term(n, d, x, dy, wc, bc);
                    }
                }
            }
            let len = row_len as f64;
            let m1 = (lane_sum(dxn, |d| d as f64) / len) as f32;
            let m2 = (lane_dot(dxn, xn) / len) as f32;
            for ((o, &d), &n) in o.iter_mut().zip(dxn.iter()).zip(xn.iter()) {
                o.write((d - m1 - n * m2) * inv32);
            }
        },
    );
    // SAFETY: the rows cover all `x.len()` elements, each written above.
    unsafe { out.set_len(x.len()) };
    out
}
}

struct NormFwd {
    v: View,
}

impl View {
    /// `norm.cu`'s kernel `kernel` over `x` (laid out as `xl`) and the other inputs: one block
    /// per row.
    fn launch_spec(&self, kernel: &'static str, xl: &Layout) -> Launch {
        let len = self.cg * self.s;
        Launch {
            source: Source::Norm,
            kernel,
            out_shape: xl.shape().clone(),
            scalars: Scalars::Norm {
                groups: self.groups as i32,
                cg: self.cg as i32,
                s: self.s as i32,
                eps: self.eps as f32,
                silu: i32::from(self.silu),
            },
            grid: ((xl.shape().elem_count() / len.max(1)) as u32, 1),
            block: row_block(len),
        }
    }
}

impl CustomOp3 for NormFwd {
    fn name(&self) -> &'static str {
        "ipr-norm-affine"
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
        if crate::cuda_kernels::emulates(x.dtype()) {
            return crate::cuda_kernels::emulate(self.v.launch_spec("norm_fwd", xl), &[(x, xl), (w, wl), (b, bl)]);
        }
        let shape = xl.shape().clone();
        Ok(match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                (CpuStorage::F32(forward_f32(slice(x, xl)?, slice(w, wl)?, slice(b, bl)?, self.v)), shape)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                (CpuStorage::F64(forward(slice(x, xl)?, slice(w, wl)?, slice(b, bl)?, self.v)), shape)
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), "ipr-norm-affine")),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::launch(self.v.launch_spec("norm_fwd", xl), &[(x, xl), (w, wl), (b, bl)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::op_profile::scope("norm.backward", grad.device());
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &NormBwdX { v: self.v, w: w.detach(), b: b.detach() })?)
        } else {
            None
        };
        let (dw, db) = if w.track_op() || b.track_op() {
            // Parameter gradients with tensor ops (full fine-tuning only): du = dy * silu'(u), in
            // f32 for half-precision tensors (candle's reductions sum in the storage type).
            let v = self.v;
            let dtype = x.dtype();
            let acc = if matches!(dtype, DType::BF16 | DType::F16) { DType::F32 } else { dtype };
            let (x, w, b, grad) = (x.to_dtype(acc)?, w.to_dtype(acc)?, b.to_dtype(acc)?, grad.to_dtype(acc)?);
            let n = x.elem_count() / (v.groups * v.cg * v.s);
            let xr = x.detach().reshape((n, v.groups, v.cg * v.s))?;
            let mean = xr.mean_keepdim(2)?;
            let xc = xr.broadcast_sub(&mean)?;
            let inv = (xc.sqr()?.mean_keepdim(2)? + v.eps)?.sqrt()?.recip()?;
            let xn = xc.broadcast_mul(&inv)?.reshape((n, v.groups * v.cg, v.s))?;
            let g = grad.reshape((n, v.groups * v.cg, v.s))?;
            let du = if v.silu {
                let wc = w.detach().reshape((1, v.groups * v.cg, 1))?;
                let bc = b.detach().reshape((1, v.groups * v.cg, 1))?;
                let u = xn.broadcast_mul(&wc)?.broadcast_add(&bc)?;
                let sg = candle_nn::ops::sigmoid(&u)?;
                let d = ((u * (sg.ones_like()? - &sg)?)? + 1.0)?.mul(&sg)?;
                (g * d)?
            } else {
                g
            };
            let dw = (&du * &xn)?.sum(2)?.sum(0)?.reshape(w.shape())?.to_dtype(dtype)?;
            let db = du.sum(2)?.sum(0)?.reshape(b.shape())?.to_dtype(dtype)?;
            (w.track_op().then_some(dw), b.track_op().then_some(db))
        } else {
            (None, None)
        };
        Ok((dx, dw, db))
    }
}

struct NormBwdX {
    v: View,
    w: Tensor,
    b: Tensor,
}

impl CustomOp2 for NormBwdX {
    fn name(&self) -> &'static str {
        "ipr-norm-affine-bwd"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let (bs, bl) = self.b.storage_and_layout();
        let (candle_core::Storage::Cpu(w), candle_core::Storage::Cpu(b)) = (&*ws, &*bs) else {
            return Err(candle_core::Error::Msg("ipr-norm-affine-bwd: parameters not on the CPU".into()));
        };
        if crate::cuda_kernels::emulates(x.dtype()) {
            let spec = self.v.launch_spec("norm_bwd_x", xl);
            return crate::cuda_kernels::emulate(spec, &[(x, xl), (g, gl), (w, wl), (b, bl)]);
        }
        let shape = xl.shape().clone();
        Ok(match (x, g, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(w), CpuStorage::F32(b)) => (
                CpuStorage::F32(backward_x_f32(slice(x, xl)?, slice(g, gl)?, slice(w, wl)?, slice(b, bl)?, self.v)),
                shape,
            ),
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                (CpuStorage::F64(backward_x(slice(x, xl)?, slice(g, gl)?, slice(w, wl)?, slice(b, bl)?, self.v)), shape)
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), "ipr-norm-affine-bwd")),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let (bs, bl) = self.b.storage_and_layout();
        let (candle_core::Storage::Cuda(w), candle_core::Storage::Cuda(b)) = (&*ws, &*bs) else {
            return Err(candle_core::Error::Msg("ipr-norm-affine-bwd: parameters not on the GPU".into()));
        };
        crate::cuda_kernels::launch(self.v.launch_spec("norm_bwd_x", xl), &[(x, xl), (g, gl), (w, wl), (b, bl)])
    }
}

/// Whether the fused ops take `x` with parameters `w`: f32/f64 on the CPU; f32, bf16 and f16 on
/// CUDA with the `cuda` feature (unless `IPR_CUDA_KERNELS=0`); parameters of `x`'s dtype.
fn fused_applies(x: &Tensor, w: &Tensor) -> bool {
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    (cpu || crate::cuda_kernels::applies(x)) && w.dtype() == x.dtype()
}

/// `silu?(group_norm(x) * w + b)` for `(B, C, ...)` inputs; `None` where the fused ops do not
/// apply ([`fused_applies`]).
pub fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Option<Tensor>> {
    if !fused_applies(x, w) {
        return Ok(None);
    }
    let dims = x.dims();
    let c = dims[1];
    let s = x.elem_count() / (dims[0] * c);
    let v = View { groups, cg: c / groups, s, eps, silu };
    Ok(Some(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, NormFwd { v })?))
}

/// `layer_norm(x) * w + b` over the last dimension; `None` where the fused ops do not apply.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !fused_applies(x, w) {
        return Ok(None);
    }
    let d = *x.dims().last().unwrap_or(&1);
    let v = View { groups: 1, cg: d, s: 1, eps, silu: false };
    Ok(Some(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, NormFwd { v })?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, silu: bool) -> Tensor {
        let dims = x.dims().to_vec();
        let xg = x.reshape((dims[0], groups, ())).unwrap();
        let mean = xg.mean_keepdim(D::Minus1).unwrap();
        let xc = xg.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xn = xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().reshape(dims.as_slice()).unwrap();
        let shape = [1, dims[1], 1, 1];
        let u = xn
            .broadcast_mul(&w.reshape(&shape[..dims.len()]).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape(&shape[..dims.len()]).unwrap())
            .unwrap();
        if silu {
            u.silu().unwrap()
        } else {
            u
        }
    }

    #[test]
    fn group_norm_silu_and_gradients_equal_primitive_ops() {
        let d = Device::Cpu;
        for silu in [false, true] {
            let x = Var::from_tensor(&(Tensor::randn(0f64, 2., (2, 6, 3, 4), &d).unwrap() + 0.5).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f64, 0.5, 6, &d).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, 6, &d).unwrap()).unwrap();
            let ours = group_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 3, 1e-5, silu).unwrap().unwrap();
            let theirs = reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 3, silu);
            assert!(max_diff(&ours, &theirs) < 1e-12);
            let r = Tensor::randn(0f64, 1., ours.shape(), &d).unwrap();
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                let e = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(e < 1e-10, "silu {silu}: {e}");
            }
            let (fw, fb) = (w.as_tensor().detach(), b.as_tensor().detach());
            let y = group_norm(x.as_tensor(), &fw, &fb, 3, 1e-5, silu).unwrap().unwrap();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g.get(&fw).is_none() && g.get(x.as_tensor()).is_some());
        }
    }

    #[test]
    fn layer_norm_equals_primitive_ops() {
        let d = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 2., (2, 5, 8), &d).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f64, 0.5, 8, &d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, 8, &d).unwrap()).unwrap();
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap().unwrap();
        let mean = x.as_tensor().mean_keepdim(D::Minus1).unwrap();
        let xc = x.as_tensor().broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let theirs = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-12);
        let r = Tensor::randn(0f64, 1., ours.shape(), &d).unwrap();
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            assert!(max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()) < 1e-10);
        }
    }

    /// The f32 kernels (vectorised, f32 element math) agree with the f64 ones on the same data,
    /// forward and input gradient, for group norm with and without SiLU and for layer norm, on
    /// rows whose length is not a multiple of the 8 accumulation lanes.
    /// The layer-norm rows (one element per channel, one loop over the row) compute each element
    /// as the group-norm form does per channel: the f64 scale and shift rounded to f32, then
    /// `x * scale + shift`; the same bits as that form written out, forward and input gradient.
    #[test]
    fn layer_norm_rows_have_the_per_channel_bits() {
        let (n, d) = (5, 40);
        let x: Vec<f32> = (0..n * d).map(|i| ((i as f64 * 0.37).sin() * 3.0 + 0.5) as f32).collect();
        let dy: Vec<f32> = (0..n * d).map(|i| ((i as f64 * 0.11).cos()) as f32).collect();
        let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..d).map(|i| i as f32 * 0.03 - 0.5).collect();
        for silu in [false, true] {
            let v = View { groups: 1, cg: d, s: 1, eps: 1e-5, silu };
            let (y, dx) = (forward_f32(&x, &w, &b, v), backward_x_f32(&x, &dy, &w, &b, v));
            // The same rows as d channels of one element in a (n, 1, d, 1) view, through the
            // per-channel loops (s > 1 takes them; here the loop body is written out).
            for r in 0..n {
                let xr = &x[r * d..][..d];
                let (mean, inv) = stats_f32(xr, 1e-5);
                for c in 0..d {
                    let scale = inv * w[c] as f64;
                    let u = xr[c] * scale as f32 + (b[c] as f64 - mean * scale) as f32;
                    let e = if silu { u * sigmoid_f32(u) } else { u };
                    assert_eq!(y[r * d + c].to_bits(), e.to_bits(), "forward row {r} channel {c}");
                }
            }
            let v1 = View { groups: n, cg: 1, s: d, eps: 1e-5, silu: false };
            if !silu {
                // With w = 1, b = 0 the layer norm of a row is the group norm of one channel.
                let (ones, zeros) = (vec![1f32; d], vec![0f32; d]);
                let ln = backward_x_f32(&x, &dy, &ones, &zeros, v);
                let gn = backward_x_f32(&x, &dy, &vec![1f32; n], &vec![0f32; n], v1);
                assert_eq!(ln, gn);
            }
            assert!(dx.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn f32_kernels_agree_with_f64() {
        let d = Device::Cpu;
        for (shape, groups, silu) in [((2, 6, 5, 7), 3, true), ((2, 6, 5, 7), 2, false), ((3, 4, 9, 1), 1, false)] {
            let x64 = (Tensor::randn(0f64, 2., shape, &d).unwrap() + 0.7).unwrap();
            let w64 = Tensor::randn(1f64, 0.5, shape.1, &d).unwrap();
            let b64 = Tensor::randn(0f64, 0.5, shape.1, &d).unwrap();
            let r64 = Tensor::randn(0f64, 1., shape, &d).unwrap();
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let x32 = Var::from_tensor(&f32s(&x64)).unwrap();
            let x64 = Var::from_tensor(&f32s(&x64).to_dtype(DType::F64).unwrap()).unwrap();
            let (w32, b32, r32) = (f32s(&w64), f32s(&b64), f32s(&r64));
            let (w64, b64, r64) = [&w32, &b32, &r32].map(|t| t.to_dtype(DType::F64).unwrap()).into();
            let y32 = group_norm(x32.as_tensor(), &w32, &b32, groups, 1e-5, silu).unwrap().unwrap();
            let y64 = group_norm(x64.as_tensor(), &w64, &b64, groups, 1e-5, silu).unwrap().unwrap();
            let e = max_diff(&y32.to_dtype(DType::F64).unwrap(), &y64);
            assert!(e < 2e-6, "{shape:?} silu {silu}: forward differs by {e}");
            let g32 = (y32 * &r32).unwrap().sum_all().unwrap().backward().unwrap();
            let g64 = (y64 * &r64).unwrap().sum_all().unwrap().backward().unwrap();
            let dx32 = g32.get(x32.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
            let e = max_diff(&dx32, g64.get(x64.as_tensor()).unwrap());
            assert!(e < 1e-5, "{shape:?} silu {silu}: input gradient differs by {e}");
        }
    }
}
