//! A LoRA-adapted linear layer, `y = x Wᵀ + s (x Aᵀ) Bᵀ + b` with `W` and `b` frozen, as one
//! graph op on the CPU in f32 (LoRA training).
//!
//! Why: composed, the layer is seven graph nodes (two transposes, two products, the scaling, the
//! sum, the bias), and candle's backward allocates a zero tensor and adds into it for every operand
//! of every node (backprop.rs, `or_insert`), most of them `(tokens, features)` in size. As one op
//! the layer's gradients cost none of those fills. The forward and the backward run the products
//! the composed nodes ran (the same `gemm` calls on the same layouts, the frozen product by
//! [`crate::fused`]'s kernels) and add in the same order, so the bits are the same (tested).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::fused::{frozen_linear_forward, matmul_no_fill, with_f32};
use crate::lora::LoraAdapter;

struct LoraLinearOp {
    /// The op's operands, detached (`x` as the matrix `(rows, in)`): the forward computes from these.
    x: Tensor,
    a: Tensor,
    b: Tensor,
    w: Tensor,
    bias: Option<Tensor>,
    scale: f64,
    /// `x Aᵀ`, kept for `B`'s gradient.
    u: Mutex<Option<Tensor>>,
    /// The input's leading dimensions and the output features.
    out_dims: Vec<usize>,
}

impl LoraLinearOp {
    fn forward(&self) -> Result<Vec<f32>> {
        let mut y = frozen_linear_forward(&self.x, &self.w)?;
        let u = self.x.matmul(&self.a.t()?)?;
        // `d * scale` is candle's `affine(scale, 0)`; `+ d` and `+ bias` one f32 addition each,
        // as the composed `add` and `broadcast_add`.
        let d = u.matmul(&self.b.t()?)?.affine(self.scale, 0.0)?;
        *self.u.lock().expect("lora linear: poisoned lock") = Some(u);
        let n = self.w.dim(0)?;
        with_f32(&d, "lora linear", |d| {
            y.iter_mut().zip(d).for_each(|(y, &d)| *y += d);
            Ok(())
        })?;
        if let Some(bias) = &self.bias {
            with_f32(bias, "lora linear", |bias| {
                y.chunks_exact_mut(n).for_each(|row| row.iter_mut().zip(bias).for_each(|(y, &b)| *y += b));
                Ok(())
            })?;
        }
        Ok(y)
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "ipr-lora-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.forward()?), Shape::from(self.out_dims.clone())))
    }

    /// The composed nodes' backward: `gs = grad * scale`; `B`'s gradient `(uᵀ gs)ᵀ`, `u`'s
    /// `gs B`; `A`'s gradient `(xᵀ du)ᵀ`; `x`'s the frozen product's `grad W` plus `du A`.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::op_profile::scope("linear.backward", grad.device());
        let u = self.u.lock().expect("lora linear: poisoned lock");
        let u = u.as_ref().ok_or_else(|| candle_core::Error::Msg("lora linear: forward not run".into()))?;
        let grad = grad.contiguous()?.reshape((self.x.dim(0)?, self.w.dim(0)?))?;
        let gs = grad.affine(self.scale, 0.0)?;
        let (at, bt) = (self.a.t()?, self.b.t()?);
        let du = gs.matmul(&bt.t()?)?;
        let db = b.track_op().then(|| u.t()?.matmul(&gs)?.t()).transpose()?;
        let da = a.track_op().then(|| self.x.t()?.matmul(&du)?.t()).transpose()?;
        let dx = if x.track_op() {
            let frozen = matmul_no_fill(&grad, &self.w)?;
            Some((frozen + du.matmul(&at.t()?)?)?.reshape(x.dims())?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// `x Wᵀ + s (x Aᵀ) Bᵀ (+ bias)` for `x` of shape `(..., in)` as one op, where it applies: f32
/// on the CPU, `x` contiguous, `W` and the bias frozen, the adapter trained and unmerged, no
/// dropout. (The composed layer read a 2-d view of `x` that no other op read, so its two gradients
/// of `x` were one sum, in either order: the op's sum.) `None` elsewhere (the caller composes the
/// layer).
pub fn lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: &LoraAdapter) -> Result<Option<Tensor>> {
    let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
    let frozen = [Some(w), bias].into_iter().flatten();
    let all = [x, a, b].into_iter().chain(frozen.clone());
    if lora.merged
        || (lora.training && lora.dropout > 0.0)
        || !x.device().is_cpu()
        || x.rank() < 2
        || !x.is_contiguous()
        || x.dims().last() != Some(&w.dim(1)?)
        || all.clone().any(|t| t.dtype() != DType::F32 || !t.device().is_cpu())
        || frozen.clone().any(|t| t.track_op())
        || !(a.track_op() || b.track_op())
    {
        return Ok(None);
    }
    let in_dim = w.dim(1)?;
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = w.dim(0)?;
    }
    let op = LoraLinearOp {
        x: x.detach().reshape((x.elem_count() / in_dim.max(1), in_dim))?,
        a: a.detach(),
        b: b.detach(),
        w: w.detach(),
        bias: bias.map(|b| b.detach()),
        scale: lora.scale,
        u: Mutex::new(None),
        out_dims,
    };
    Ok(Some(x.apply_op3(a, b, op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::{linear_forward_no_grad, linear_no_frozen_grad};
    use candle_core::{Device, Var};

    fn tensor(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f64 * 0.7311 + seed as f64 * 1.37).sin() * 0.9) as f32).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// The layer as `nn::Linear` composes it without the op: the frozen product, the adapter's
    /// delta, their sum, the bias.
    fn composed(x2: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: &LoraAdapter) -> Tensor {
        let y0 = if x2.track_op() {
            linear_no_frozen_grad(x2, w, None).unwrap().unwrap()
        } else {
            linear_forward_no_grad(x2, w, None).unwrap().unwrap()
        };
        let s = (y0 + lora.delta(x2).unwrap()).unwrap();
        match bias {
            Some(b) => s.broadcast_add(b).unwrap(),
            None => s,
        }
    }

    /// Output and the gradients of the input, `A` and `B` bit for bit against the composed
    /// nodes, for a trained and a frozen input (cross-attention's keys read the text states),
    /// with and without a bias, at a token count that takes `gemm`'s large-product path.
    #[test]
    fn equals_the_composed_layer_bit_for_bit() {
        for (batch, tokens, d_in, d_out, rank, with_bias, train_x) in [
            (2, 64, 64, 64, 4, false, true),
            (3, 5, 24, 40, 8, true, false),
            (2, 300, 32, 48, 4, true, true),
            (1, 7, 16, 8, 2, true, true),
        ] {
            let w = tensor(&[d_out, d_in], 1);
            let bias = with_bias.then(|| tensor(&[d_out], 2));
            let lora =
                LoraAdapter::from_tensors(&tensor(&[rank, d_in], 3), &tensor(&[d_out, rank], 4), 0.75, 0.0, 5).unwrap();
            let x3 = Var::from_tensor(&tensor(&[batch, tokens, d_in], 6)).unwrap();
            let x3 = if train_x { x3.as_tensor().clone() } else { x3.as_tensor().detach() };
            let r = tensor(&[batch * tokens, d_out], 7);
            let x2 = x3.reshape((batch * tokens, d_in)).unwrap();

            // Odd cases on the layer's 2-d view of its input, even ones on the 3-d input itself.
            let fused = if tokens % 2 == 1 {
                lora_linear(&x2, &w, bias.as_ref(), &lora).unwrap().expect("the op applies")
            } else {
                let y = lora_linear(&x3, &w, bias.as_ref(), &lora).unwrap().expect("the op applies");
                assert_eq!(y.dims(), [batch, tokens, d_out]);
                y.reshape((batch * tokens, d_out)).unwrap()
            };
            let x2b = x3.reshape((batch * tokens, d_in)).unwrap();
            let reference = composed(&x2b, &w, bias.as_ref(), &lora);
            assert_eq!(bits(&fused), bits(&reference), "output ({batch}x{tokens}, {d_in} -> {d_out})");

            let g1 = (&fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut checked = vec![lora.a.as_tensor(), lora.b.as_tensor()];
            if train_x {
                checked.push(&x3);
            }
            for t in checked {
                assert_eq!(bits(g1.get(t).unwrap()), bits(g2.get(t).unwrap()), "gradient of {:?}", t.dims());
            }
            if !train_x {
                assert!(g1.get(&x3).is_none());
            }
        }
    }

    /// Merged adapters, dropout in training and trained base weights keep the composed layer.
    #[test]
    fn declines_where_the_composed_layer_is_needed() {
        let x = tensor(&[4, 8], 1);
        let mut lora = LoraAdapter::from_tensors(&tensor(&[2, 8], 3), &tensor(&[6, 2], 4), 1.0, 0.0, 5).unwrap();
        let w = tensor(&[6, 8], 2);
        assert!(lora_linear(&x, &w, None, &lora).unwrap().is_some());
        let trained_w = Var::from_tensor(&w).unwrap();
        assert!(lora_linear(&x, trained_w.as_tensor(), None, &lora).unwrap().is_none());
        lora.dropout = 0.1;
        assert!(lora_linear(&x, &w, None, &lora).unwrap().is_none());
        lora.dropout = 0.0;
        lora.merged = true;
        assert!(lora_linear(&x, &w, None, &lora).unwrap().is_none());
    }
}
