//! Multi-head attention in a graph on the CPU (training) as one op on `(q, k, v)`.
//!
//! Why: composed, plain attention is about sixteen graph nodes (per operand a reshape, a
//! transpose and a head-major copy; `Q Kᵀ`, the scale, the softmax, `P V`, the transpose and
//! copy back), and candle's backward allocates a zero tensor and adds into it for every operand
//! of every node (backprop.rs, `or_insert`). As one op it runs the composed nodes' forward and
//! their backward's tensor operations (the same products on the same layouts, the softmax's
//! backward) in the same order, without the fills: the same bits (tested).

use std::sync::Mutex;

use candle_core::{CustomOp3, DType, Result, Tensor, D};

use crate::fused::Stash;

struct AttentionOp {
    heads: usize,
    scale: f64,
    /// The output, computed before the op is applied.
    y: Stash,
    /// Head-major `q`, `k`, `v` `(B, heads, L, d)` and the probabilities, for the backward.
    saved: Mutex<Option<[Tensor; 4]>>,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ipr-graph-attention"
    }

    crate::fused::stashed_forward3!(y);

    /// The composed nodes' backward, node by node: the copy back (a transpose of the gradient),
    /// `P V`, the softmax (`p (g - sum(g p))`), the scale, `Q Kᵀ`, and each operand's head-major
    /// copy (a transpose back).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::op_profile::scope("attention.backward", grad.device());
        let saved = self.saved.lock().expect("graph attention: poisoned lock");
        let [qh, kh, vh, probs] =
            saved.as_ref().ok_or_else(|| candle_core::Error::Msg("graph attention: forward not run".into()))?;
        let (b, lq, inner) = q.dims3()?;
        let d = inner / self.heads;
        let g_out = grad.reshape((b, lq, self.heads, d))?.contiguous()?.transpose(1, 2)?.contiguous()?;
        let g_probs = g_out.matmul(&vh.t()?)?;
        let g_v = v.track_op().then(|| probs.t()?.matmul(&g_out)).transpose()?;
        let dot = (&g_probs * probs)?.sum_keepdim(D::Minus1)?;
        let g_scores = (probs * g_probs.broadcast_sub(&dot)?)?.affine(self.scale, 0.0)?;
        let kt = kh.t()?;
        let g_q = q.track_op().then(|| g_scores.matmul(&kt.t()?)).transpose()?;
        let g_k = k.track_op().then(|| -> Result<Tensor> { qh.t()?.matmul(&g_scores)?.t() }).transpose()?;
        let back = |g: Option<Tensor>, t: &Tensor| -> Result<Option<Tensor>> {
            g.map(|g| g.contiguous()?.transpose(1, 2)?.contiguous()?.reshape(t.dims())).transpose()
        };
        Ok((back(g_q, q)?, back(g_k, k)?, back(g_v, v)?))
    }
}

/// Plain scaled dot-product attention of `(B, L, heads d)` operands as one graph op, where it
/// applies: f32 on the CPU, contiguous operands, one of them needing a gradient. `None`
/// elsewhere (the caller composes the nodes).
pub fn graph_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    let ops = [q, k, v];
    if !q.device().is_cpu()
        || ops.iter().any(|t| t.dtype() != DType::F32 || t.rank() != 3 || !t.is_contiguous())
        || !ops.iter().any(|t| t.track_op())
    {
        return Ok(None);
    }
    let (b, lq, inner) = q.dims3()?;
    let lk = k.dim(1)?;
    if heads == 0 || inner % heads != 0 || v.dims3()? != (b, lk, inner) || k.dims3()? != (b, lk, inner) {
        return Ok(None);
    }
    let d = inner / heads;
    // The composed nodes' forward, detached.
    let split = |t: &Tensor, l: usize| -> Result<Tensor> {
        t.detach().reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let (qh, kh, vh) = (split(q, lq)?, split(k, lk)?, split(v, lk)?);
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (qh.matmul(&kh.t()?)? * scale)?;
    let probs = crate::fused::softmax_last_dim(&scores)?
        .ok_or_else(|| candle_core::Error::Msg("graph attention: softmax off the CPU".into()))?;
    let y = probs.matmul(&vh)?.transpose(1, 2)?.reshape((b, lq, inner))?;
    let op = AttentionOp { heads, scale, y: Stash::new(y), saved: Mutex::new(Some([qh, kh, vh, probs])) };
    Ok(Some(q.apply_op3(k, v, op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn tensor(dims: &[usize], f: f64) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f64 * f).sin() * 1.5) as f32).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// The nodes `nn::attention_graph` composes without the op.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
        let (b, lq, inner) = q.dims3().unwrap();
        let (lk, d) = (k.dim(1).unwrap(), inner / heads);
        let split =
            |t: &Tensor, l: usize| t.reshape((b, l, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let (q, k, v) = (split(q, lq), split(k, lk), split(v, lk));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
        let probs = crate::nn::softmax(&scores).unwrap();
        probs.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, lq, inner)).unwrap()
    }

    /// Output and every operand's gradient bit for bit against the composed nodes: self-attention
    /// (all three trained) and cross-attention shapes (keys and values of another length), and
    /// with only some operands trained.
    #[test]
    fn equals_the_composed_nodes_bit_for_bit() {
        for (b, lq, lk, inner, heads, trained) in [
            (2, 64, 64, 64, 4, [true, true, true]),
            (3, 16, 8, 32, 2, [true, true, false]),
            (1, 9, 77, 40, 5, [false, true, true]),
        ] {
            let vars: Vec<Var> = [(lq, 0.31), (lk, 0.17), (lk, 0.23)]
                .iter()
                .map(|&(l, f)| Var::from_tensor(&tensor(&[b, l, inner], f)).unwrap())
                .collect();
            let ops: Vec<Tensor> = vars
                .iter()
                .zip(trained)
                .map(|(v, t)| if t { v.as_tensor().clone() } else { v.as_tensor().detach() })
                .collect();
            let r = tensor(&[b, lq, inner], 0.41);
            let fused = graph_attention(&ops[0], &ops[1], &ops[2], heads).unwrap().expect("the op applies");
            let reference = composed(&ops[0], &ops[1], &ops[2], heads);
            assert_eq!(bits(&fused), bits(&reference), "output {b}x{lq}x{lk}");
            let g1 = (&fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (i, t) in ops.iter().enumerate() {
                match (g1.get(t), g2.get(t)) {
                    (Some(a), Some(e)) => assert_eq!(bits(a), bits(e), "gradient of operand {i}"),
                    (None, None) => assert!(!trained[i]),
                    _ => panic!("operand {i}: a gradient on one side only"),
                }
            }
        }
    }
}
