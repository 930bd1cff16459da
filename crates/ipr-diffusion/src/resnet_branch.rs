//! The residual branch of a UNet resnet, `conv2(silu(norm2(conv1(silu(norm1(x))) + temb)))`, as
//! one graph op on the CPU when its weights are frozen (LoRA training, sampling), and the skip
//! connection added to it (outside a graph in the op itself: one pass and one tensor fewer).
//!
//! Why: candle's backward allocates a zero tensor and adds into it for every operand of every
//! node (backprop.rs, `or_insert`), and keeps every node's operands alive until the backward ends.
//! As five nodes the branch cost four full-size zero fills and additions and held four
//! intermediate tensors; as one it costs none of the fills and holds one (the second norm's
//! input, which its backward needs). The kernels are those the five nodes ran ([`crate::norm`]'s
//! group norm + SiLU, [`crate::conv`]'s convolution and input gradient), in the same order, so
//! the output and the input gradient have the same bits (tested).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::conv::{conv_forward, conv_input_grad, DirectForward, Geom};
use crate::nn::{Conv2d, GroupNorm};
use crate::norm::{backward_x_f32, forward_f32, View};

/// The layers of the branch; `temb` is the projected time embedding, `(B, C_out, 1, 1)`;
/// `skip` what the branch is added to (`x` or its shortcut convolution).
pub struct ResnetBranch<'a> {
    pub norm1: &'a GroupNorm,
    pub conv1: &'a Conv2d,
    pub temb: Option<&'a Tensor>,
    pub norm2: &'a GroupNorm,
    pub conv2: &'a Conv2d,
    pub skip: &'a Tensor,
}

/// A frozen group norm + SiLU: parameters and the view of its input.
struct Norm {
    w: Tensor,
    b: Tensor,
    v: View,
}

/// A frozen stride-1 convolution with bias.
struct Conv {
    w: Tensor,
    b: Tensor,
    g: Geom,
    c_out: usize,
    /// The direct kernel's prepared weights where it applies (one image at a time reuses them).
    direct: Option<DirectForward>,
}

struct BranchOp {
    norm1: Norm,
    conv1: Conv,
    /// `(B, C_out)` values, added per channel after `conv1`.
    temb: Option<Tensor>,
    norm2: Norm,
    conv2: Conv,
    /// `conv1(..) + temb` (the second norm's input), kept by the forward for the backward.
    saved: Option<Mutex<Option<Vec<f32>>>>,
    /// Added to the output (no backward only: in a graph the sum is its own node).
    skip: Option<Tensor>,
}

/// `f` on the contiguous f32 data of a CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    crate::fused::with_f32(t, "resnet branch", f)
}

impl Norm {
    fn new(n: &GroupNorm, dims: (usize, usize, usize, usize)) -> Option<Self> {
        let (_, c, h, w) = dims;
        if n.num_groups == 0 || c % n.num_groups != 0 || n.weight.dims() != [c] || n.bias.dims() != [c] {
            return None;
        }
        let v = View { groups: n.num_groups, cg: c / n.num_groups, s: h * w, eps: n.eps, silu: true };
        Some(Self { w: n.weight.detach(), b: n.bias.detach(), v })
    }

    fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        with_f32(&self.w, |w| with_f32(&self.b, |b| Ok(forward_f32(x, w, b, self.v))))
    }

    fn input_grad(&self, x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        with_f32(&self.w, |w| with_f32(&self.b, |b| Ok(backward_x_f32(x, dy, w, b, self.v))))
    }
}

impl Conv {
    fn new(c: &Conv2d, (b, ch, h, w): (usize, usize, usize, usize)) -> Option<Self> {
        let (c_out, c_in, kh, kw) = c.weight.dims4().ok()?;
        let bias = c.bias.as_ref()?;
        let fits = c_in == ch && kh == kw && c.stride == 1 && h + 2 * c.padding >= kh && w + 2 * c.padding >= kw;
        if !fits || bias.dims() != [c_out] {
            return None;
        }
        let g = Geom { b, c: ch, h, w, k: kh, stride: 1, pad: c.padding };
        let direct = with_f32(&c.weight, |w| Ok(DirectForward::new(w, g, c_out))).ok()?;
        Some(Self { w: c.weight.detach(), b: bias.detach(), g, c_out, direct })
    }

    /// Output dims for input dims of this geometry.
    fn out_dims(&self) -> (usize, usize, usize, usize) {
        (self.g.b, self.c_out, self.g.out_h(), self.g.out_w())
    }

    /// The convolution of the images of `x`, the whole batch or some of it (the same kernels:
    /// bands and blocks of the sums depend on an image's geometry, not on the batch).
    fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        if let Some(direct) = &self.direct {
            return with_f32(&self.b, |b| Ok(direct.run(x, Some(b))));
        }
        let g = Geom { b: x.len() / (self.g.c * self.g.h * self.g.w), ..self.g };
        with_f32(&self.w, |w| with_f32(&self.b, |b| Ok(conv_forward(x, w, Some(b), g, self.c_out))))
    }

    fn input_grad(&self, dy: &[f32]) -> Result<Vec<f32>> {
        with_f32(&self.w, |w| Ok(conv_input_grad(dy, w, self.g, self.c_out)))
    }
}

impl BranchOp {
    /// The forward on `x`'s data for a backward (no skip: in a graph the sum is its own node);
    /// returns the output and the second norm's input, which the backward needs.
    fn run(&self, x: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n1 = self.norm1.forward(x)?;
        let mut h = self.conv1.forward(&n1)?;
        drop(n1);
        if let Some(t) = &self.temb {
            // candle's broadcast add: one f32 addition per element.
            let plane = self.conv1.g.out_h() * self.conv1.g.out_w();
            with_f32(t, |t| {
                for (hc, &tc) in h.chunks_exact_mut(plane).zip(t) {
                    hc.iter_mut().for_each(|v| *v += tc);
                }
                Ok(())
            })?;
        }
        let n2 = self.norm2.forward(&h)?;
        let out = self.conv2.forward(&n2)?;
        Ok((out, h))
    }
}

impl BranchOp {
    /// [`BranchOp::run`]'s output without the second norm's input (no backward), one image at a
    /// time on every core: an image's intermediate tensors stay in its core's cache instead of
    /// going through memory batch-wide, four passes each (sampling 5% faster). The same kernels
    /// on the same rows, so the same bits (tested).
    fn run_by_image(&self, x: &[f32]) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let g = self.conv1.g;
        let in_len = g.c * g.h * g.w;
        let (_, c_mid, h, w) = self.conv1.out_dims();
        let (_, c_out, ho, wo) = self.conv2.out_dims();
        let out_len = c_out * ho * wo;
        let mut out: Vec<f32> = Vec::with_capacity(g.b * out_len);
        with_opt_f32(self.temb.as_ref(), |temb| {
            with_opt_f32(self.skip.as_ref(), |skip| {
                let images = out.spare_capacity_mut()[..g.b * out_len].par_chunks_mut(out_len).enumerate();
                images.try_for_each(|(i, o)| -> Result<()> {
                    let n1 = self.norm1.forward(&x[i * in_len..][..in_len])?;
                    let mut hid = self.conv1.forward(&n1)?;
                    drop(n1);
                    if let Some(t) = temb {
                        // candle's broadcast add: one f32 addition per element.
                        for (hc, &tc) in hid.chunks_exact_mut(h * w).zip(&t[i * c_mid..][..c_mid]) {
                            hc.iter_mut().for_each(|v| *v += tc);
                        }
                    }
                    let n2 = self.norm2.forward(&hid)?;
                    drop(hid);
                    let y = self.conv2.forward(&n2)?;
                    match skip {
                        // candle's `skip + branch`: one f32 addition per element.
                        Some(s) => o.iter_mut().zip(&y).zip(&s[i * out_len..]).for_each(|((o, &y), &s)| {
                            o.write(y + s);
                        }),
                        None => o.iter_mut().zip(&y).for_each(|(o, &y)| {
                            o.write(y);
                        }),
                    }
                    Ok(())
                })
            })
        })?;
        // SAFETY: every image's chunk was written above (the loop ran for all or returned Err).
        unsafe { out.set_len(g.b * out_len) };
        Ok(out)
    }
}

/// [`with_f32`] of a tensor that may be absent.
fn with_opt_f32<R>(t: Option<&Tensor>, f: impl FnOnce(Option<&[f32]>) -> Result<R>) -> Result<R> {
    match t {
        Some(t) => with_f32(t, |d| f(Some(d))),
        None => f(None),
    }
}

impl CustomOp1 for BranchOp {
    fn name(&self) -> &'static str {
        "ipr-resnet-branch"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), "resnet branch"));
        };
        let x = crate::fused::contiguous(x, l, "resnet branch")?;
        let out = match &self.saved {
            Some(saved) => {
                let (out, h) = self.run(x)?;
                *saved.lock().expect("resnet branch: poisoned lock") = Some(h);
                out
            }
            None => self.run_by_image(x)?,
        };
        Ok((CpuStorage::F32(out), Shape::from(self.conv2.out_dims())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _timed = crate::op_profile::scope("resnet_branch.backward", grad.device());
        let saved = self.saved.as_ref().ok_or_else(|| candle_core::Error::Msg("resnet branch: no backward".into()))?;
        let saved = saved.lock().expect("resnet branch: poisoned lock");
        let h = saved.as_ref().ok_or_else(|| candle_core::Error::Msg("resnet branch: forward not run".into()))?;
        let dx = with_f32(&grad.contiguous()?, |g| {
            let dn2 = self.conv2.input_grad(g)?;
            let dh = self.norm2.input_grad(h, &dn2)?;
            drop(dn2);
            let dn1 = self.conv1.input_grad(&dh)?;
            drop(dh);
            with_f32(&x.contiguous()?, |x| self.norm1.input_grad(x, &dn1))
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `skip + branch(x)` with the branch as one op where it applies: f32 on the CPU, the convolution
/// kernels on ([`crate::fused::fast_conv_backward`]), stride-1 convolutions with bias, and
/// nothing but `x` (and `skip`) needing a gradient. `None` elsewhere (the caller composes the
/// layers).
pub fn resnet_branch(x: &Tensor, r: &ResnetBranch) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || !crate::fused::fast_conv_backward() {
        return Ok(None);
    }
    let Ok(dims) = x.dims4() else { return Ok(None) };
    let params = [&r.norm1.weight, &r.norm1.bias, &r.conv1.weight, &r.norm2.weight, &r.norm2.bias, &r.conv2.weight];
    let biases = [r.conv1.bias.as_ref(), r.conv2.bias.as_ref(), r.temb];
    let all = params.into_iter().chain(biases.into_iter().flatten());
    if all.clone().any(|t| t.track_op() || t.dtype() != DType::F32 || !t.device().is_cpu()) {
        return Ok(None);
    }
    let (Some(norm1), Some(conv1)) = (Norm::new(r.norm1, dims), Conv::new(r.conv1, dims)) else { return Ok(None) };
    let mid = conv1.out_dims();
    let (Some(norm2), Some(conv2)) = (Norm::new(r.norm2, mid), Conv::new(r.conv2, mid)) else { return Ok(None) };
    let temb = match r.temb {
        Some(t) if t.elem_count() != mid.0 * mid.1 || t.dim(0)? != mid.0 => return Ok(None),
        Some(t) => Some(t.contiguous()?),
        None => None,
    };
    r.conv1.count_flops(dims);
    r.conv2.count_flops(mid);
    let _timed = crate::op_profile::scope("resnet_branch", x.device());
    let x = x.contiguous()?;
    let track = x.track_op() || r.skip.track_op();
    let fold_skip = !track && r.skip.dims4()? == conv2.out_dims() && r.skip.dtype() == DType::F32;
    let skip = if fold_skip { Some(r.skip.contiguous()?) } else { None };
    let op = BranchOp { norm1, conv1, temb, norm2, conv2, saved: x.track_op().then(|| Mutex::new(None)), skip };
    if fold_skip {
        return Ok(Some(x.apply_op1_no_bwd(&op)?));
    }
    let h = if x.track_op() { x.apply_op1(op)? } else { x.apply_op1_no_bwd(&op)? };
    Ok(Some((r.skip + h)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in about [-1, 1].
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn tensor(dims: &[usize], seed: u64, scale: f32) -> Tensor {
        let n = dims.iter().product();
        let v: Vec<f32> = values(n, seed).into_iter().map(|v| v * scale).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn norm(c: usize, groups: usize, seed: u64) -> GroupNorm {
        let weight = (tensor(&[c], seed, 0.5) + 1.0).unwrap();
        GroupNorm { weight, bias: tensor(&[c], seed + 1, 0.2), num_groups: groups, eps: 1e-5 }
    }

    fn conv(c_in: usize, c_out: usize, seed: u64) -> Conv2d {
        let scale = 1.0 / (9.0 * c_in as f32).sqrt();
        let weight = tensor(&[c_out, c_in, 3, 3], seed, scale);
        Conv2d { weight, bias: Some(tensor(&[c_out], seed + 1, 0.1)), stride: 1, padding: 1 }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// The op's output and input gradient against the five layers composed as graph nodes,
    /// bit for bit: with the direct convolution kernels (16 channels) and with `gemm` (odd
    /// sizes, more channels than the direct kernels take), with and without a time embedding.
    #[test]
    fn equals_the_composed_layers_bit_for_bit() {
        for (b, c_in, c_out, h, w, groups, with_temb) in
            [(2, 16, 16, 8, 8, 4, true), (3, 24, 136, 5, 7, 8, false), (1, 8, 32, 12, 3, 8, true)]
        {
            let (norm1, conv1) = (norm(c_in, groups, 1), conv(c_in, c_out, 3));
            let (norm2, conv2) = (norm(c_out, groups, 5), conv(c_out, c_out, 7));
            let temb = with_temb.then(|| tensor(&[b, c_out, 1, 1], 9, 1.0));
            let x = Var::from_tensor(&tensor(&[b, c_in, h, w], 11, 2.0)).unwrap();
            let shortcut = conv(c_in, c_out, 15);
            let skip = if c_in == c_out { x.as_tensor().clone() } else { shortcut.forward(x.as_tensor()).unwrap() };
            let layers = ResnetBranch {
                norm1: &norm1,
                conv1: &conv1,
                temb: temb.as_ref(),
                norm2: &norm2,
                conv2: &conv2,
                skip: &skip,
            };
            let r = tensor(&[b, c_out, h, w], 13, 1.0);

            let fused = resnet_branch(x.as_tensor(), &layers).unwrap().expect("the op applies");
            let mut composed = conv1.forward(&norm1.forward_silu(x.as_tensor()).unwrap()).unwrap();
            if let Some(t) = &temb {
                composed = composed.broadcast_add(t).unwrap();
            }
            let composed = (&skip + conv2.forward(&norm2.forward_silu(&composed).unwrap()).unwrap()).unwrap();
            assert_eq!(bits(&fused), bits(&composed), "output, {c_in} -> {c_out} channels");

            let g_fused = (&fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_composed = (&composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, e) = (g_fused.get(x.as_tensor()).unwrap(), g_composed.get(x.as_tensor()).unwrap());
            assert_eq!(bits(a), bits(e), "input gradient, {c_in} -> {c_out} channels");

            // Without a gradient the op still applies (sampling), adds the skip itself, and gives
            // the same output.
            let (xd, skip_d) = (x.as_tensor().detach(), skip.detach());
            let layers = ResnetBranch { skip: &skip_d, ..layers };
            let plain = resnet_branch(&xd, &layers).unwrap().expect("the op applies");
            assert_eq!(bits(&plain), bits(&composed));
        }
    }

    /// A trained parameter needs the composed layers (their own gradients).
    #[test]
    fn declines_when_a_parameter_is_trained() {
        let (norm1, conv2) = (norm(8, 4, 1), conv(8, 8, 7));
        let mut conv1 = conv(8, 8, 3);
        conv1.weight = Var::from_tensor(&conv1.weight).unwrap().as_tensor().clone();
        let x = tensor(&[1, 8, 4, 4], 11, 1.0);
        let layers =
            ResnetBranch { norm1: &norm1, conv1: &conv1, temb: None, norm2: &norm(8, 4, 5), conv2: &conv2, skip: &x };
        assert!(resnet_branch(&x, &layers).unwrap().is_none());
    }
}
