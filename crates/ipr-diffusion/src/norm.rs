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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `x` viewed as `(n, groups, cg, s)`: statistics per `(n, group)` row, parameters per channel
/// `group * cg + c`.
#[derive(Debug, Clone, Copy)]
struct View {
    groups: usize,
    cg: usize,
    s: usize,
    eps: f64,
    silu: bool,
}

fn sigmoid(u: f64) -> f64 {
    1.0 / (1.0 + (-u).exp())
}

/// The sigmoid in the element type's precision (f32 `exp` for f32 tensors, as torch computes SiLU;
/// f64 `exp` per element was a visible share of a training step).
fn sigmoid_t<T: WithDType>(u: f64) -> f64 {
    if T::DTYPE == DType::F32 {
        let u = u as f32;
        (1.0 / (1.0 + (-u).exp())) as f64
    } else {
        sigmoid(u)
    }
}

fn slice<'a, T>(d: &'a [T], l: &Layout) -> Result<&'a [T]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("norm op needs contiguous input".into()))?;
    Ok(&d[a..b])
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
                o[i] = T::from_f64(if v.silu { u * sigmoid_t::<T>(u) } else { u });
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
                        let sg = sigmoid_t::<T>(u);
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

struct NormFwd {
    v: View,
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
        let shape = xl.shape().clone();
        Ok(match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                (CpuStorage::F32(forward(slice(x, xl)?, slice(w, wl)?, slice(b, bl)?, self.v)), shape)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                (CpuStorage::F64(forward(slice(x, xl)?, slice(w, wl)?, slice(b, bl)?, self.v)), shape)
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), "ipr-norm-affine")),
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
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &NormBwdX { v: self.v, w: w.detach(), b: b.detach() })?)
        } else {
            None
        };
        let (dw, db) = if w.track_op() || b.track_op() {
            // Parameter gradients with tensor ops (full fine-tuning only): du = dy * silu'(u).
            let v = self.v;
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
            let dw = (&du * &xn)?.sum(2)?.sum(0)?.reshape(w.shape())?;
            let db = du.sum(2)?.sum(0)?.reshape(b.shape())?;
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
        let shape = xl.shape().clone();
        Ok(match (x, g, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                (CpuStorage::F32(backward_x(slice(x, xl)?, slice(g, gl)?, slice(w, wl)?, slice(b, bl)?, self.v)), shape)
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                (CpuStorage::F64(backward_x(slice(x, xl)?, slice(g, gl)?, slice(w, wl)?, slice(b, bl)?, self.v)), shape)
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), "ipr-norm-affine-bwd")),
        })
    }
}

/// `silu?(group_norm(x) * w + b)` for `(B, C, ...)` inputs; `None` off the CPU or for half types.
pub fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) || w.dtype() != x.dtype() {
        return Ok(None);
    }
    let dims = x.dims();
    let c = dims[1];
    let s = x.elem_count() / (dims[0] * c);
    let v = View { groups, cg: c / groups, s, eps, silu };
    Ok(Some(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, NormFwd { v })?))
}

/// `layer_norm(x) * w + b` over the last dimension; `None` off the CPU or for half types.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) || w.dtype() != x.dtype() {
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
}
