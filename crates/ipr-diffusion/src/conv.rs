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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Geometry of a square-kernel convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Geom {
    fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    fn out_w(&self) -> usize {
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

/// `(B, C, H, W)` -> `(C k k, B Ho Wo)`.
fn im2col<T: WithDType>(x: &[T], g: Geom) -> Vec<T> {
    let (ho, wo) = (g.out_h(), g.out_w());
    let l = ho * wo;
    let n = g.cols();
    let mut out = vec![T::zero(); g.rows() * n];
    out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        let c = r / (g.k * g.k);
        let kh = (r / g.k) % g.k;
        let kw = r % g.k;
        for b in 0..g.b {
            let plane = &x[(b * g.c + c) * g.h * g.w..][..g.h * g.w];
            let dst = &mut row[b * l..][..l];
            for oy in 0..ho {
                let iy = (oy * g.stride + kh) as isize - g.pad as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let src = &plane[iy as usize * g.w..][..g.w];
                let drow = &mut dst[oy * wo..][..wo];
                if g.stride == 1 {
                    // ix = ox + kw - pad: one contiguous copy of the valid range.
                    let lo = g.pad.saturating_sub(kw);
                    let hi = (g.w + g.pad - kw).min(wo);
                    if lo < hi {
                        drow[lo..hi].copy_from_slice(&src[lo + kw - g.pad..hi + kw - g.pad]);
                    }
                } else {
                    for (ox, d) in drow.iter_mut().enumerate() {
                        let ix = (ox * g.stride + kw) as isize - g.pad as isize;
                        if ix >= 0 && ix < g.w as isize {
                            *d = src[ix as usize];
                        }
                    }
                }
            }
        }
    });
    out
}

/// The adjoint of [`im2col`]: `(C k k, B Ho Wo)` -> `(B, C, H, W)`, summing overlaps.
fn col2im<T: WithDType>(cols: &[T], g: Geom) -> Vec<T> {
    let (ho, wo) = (g.out_h(), g.out_w());
    let l = ho * wo;
    let n = g.cols();
    let mut out = vec![T::zero(); g.b * g.c * g.h * g.w];
    out.par_chunks_mut(g.h * g.w).enumerate().for_each(|(bc, plane)| {
        let (b, c) = (bc / g.c, bc % g.c);
        for kh in 0..g.k {
            for kw in 0..g.k {
                let r = (c * g.k + kh) * g.k + kw;
                let src = &cols[r * n + b * l..][..l];
                for oy in 0..ho {
                    let iy = (oy * g.stride + kh) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let drow = &mut plane[iy as usize * g.w..][..g.w];
                    let srow = &src[oy * wo..][..wo];
                    if g.stride == 1 {
                        // ix = ox + kw - pad over the valid range: a contiguous add.
                        let lo = g.pad.saturating_sub(kw);
                        let hi = (g.w + g.pad - kw).min(wo);
                        if lo < hi {
                            let d = &mut drow[lo + kw - g.pad..hi + kw - g.pad];
                            for (a, &b) in d.iter_mut().zip(&srow[lo..hi]) {
                                *a += b;
                            }
                        }
                        continue;
                    }
                    for (ox, &v) in srow.iter().enumerate() {
                        let ix = (ox * g.stride + kw) as isize - g.pad as isize;
                        if ix >= 0 && ix < g.w as isize {
                            drow[ix as usize] += v;
                        }
                    }
                }
            }
        }
    });
    out
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

struct Col2Im(Geom);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "ipr-col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let shape = Shape::from((g.b, g.c, g.h, g.w));
        Ok(match s {
            CpuStorage::F32(d) => (CpuStorage::F32(col2im(contiguous(d, l)?, g)), shape),
            CpuStorage::F64(d) => (CpuStorage::F64(col2im(contiguous(d, l)?, g)), shape),
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), "col2im")),
        })
    }
}

/// The convolution node: forward result computed (detached) before, handed over as `y` and
/// released once copied out, so the graph does not keep a second copy of every conv output.
struct Conv2dOp {
    g: Geom,
    y: crate::fused::Stash,
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ipr-conv2d"
    }

    crate::fused::stashed_forward3!(y);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.g;
        let c_out = w.dim(0)?;
        // (B, Co, Ho, Wo) -> (Co, B Ho Wo)
        let g2 = grad.transpose(0, 1)?.contiguous()?.reshape((c_out, g.cols()))?;
        let w2 = w.reshape((c_out, g.rows()))?;
        let dx = if x.track_op() {
            let dcols = w2.t()?.matmul(&g2)?;
            Some(dcols.apply_op1_no_bwd(&Col2Im(g))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let cols = x.contiguous()?.apply_op1_no_bwd(&Im2Col(g))?;
            Some(g2.matmul(&cols.t()?)?.reshape(w.shape())?)
        } else {
            None
        };
        let db = if b.track_op() { Some(g2.sum(1)?) } else { None };
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
    let (ho, wo) = (g.out_h(), g.out_w());
    let cols = x.detach().contiguous()?.apply_op1_no_bwd(&Im2Col(g))?;
    let mut y = w.detach().reshape((c_out, g.rows()))?.matmul(&cols)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.detach().reshape((c_out, 1))?)?;
    }
    let y = y.reshape((c_out, b, ho, wo))?.transpose(0, 1)?.contiguous()?;
    if !(x.track_op() || w.track_op() || bias.is_some_and(|b| b.track_op())) {
        return Ok(Some(y));
    }
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(c_out, x.dtype(), x.device())?;
            &zeros
        }
    };
    Ok(Some(x.apply_op3(w, bias, Conv2dOp { g, y: crate::fused::Stash::new(y) })?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn equals_candles_conv_and_its_gradients() {
        let d = Device::Cpu;
        for (k, p, s, hw) in [
            (3, 1, 1, 9),
            (1, 0, 1, 7),
            (3, 1, 2, 9),
            (3, 0, 2, 8),
            (3, 1, 2, 8),
            (3, 2, 1, 5),
            (5, 2, 1, 4),
            (3, 2, 2, 3),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1., (2, 3, hw, hw), &d).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f64, 1., (4, 3, k, k), &d).unwrap()).unwrap();
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
