//! Nearest-neighbour upsampling by whole factors outside a graph (sampling), as plain copies:
//! candle's CPU `upsample_nearest2d` computes a source index per element through floating point
//! and was about 1.5% of a toy sampling step (`perf`). Copies, so the values are those of
//! candle's (tested).

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// `x.upsample_nearest2d(h * f, w * f)` for an f32 `(B, C, H, W)` CPU tensor outside a graph
/// and a whole factor `f`; `None` elsewhere (the caller uses candle's).
pub fn upsample_nearest(x: &Tensor, target: (usize, usize)) -> Result<Option<Tensor>> {
    let Ok((b, c, h, w)) = x.dims4() else { return Ok(None) };
    let (th, tw) = target;
    if x.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 || h == 0 || w == 0 {
        return Ok(None);
    }
    if th % h != 0 || tw % w != 0 || th / h != tw / w {
        return Ok(None);
    }
    let f = th / h;
    let x = x.contiguous()?;
    let mut out = vec![0f32; b * c * th * tw];
    crate::fused::with_f32(&x, "upsample", |src| {
        out.par_chunks_mut(th * tw).zip(src.par_chunks(h * w)).for_each(|(dst, plane)| {
            for (y, row) in plane.chunks_exact(w).enumerate() {
                let first = &mut dst[y * f * tw..][..tw];
                for (o, &v) in first.chunks_exact_mut(f).zip(row) {
                    o.fill(v);
                }
                for r in 1..f {
                    let (done, rest) = dst[y * f * tw..].split_at_mut(r * tw);
                    rest[..tw].copy_from_slice(&done[..tw]);
                }
            }
        });
        Ok(())
    })?;
    Ok(Some(Tensor::from_vec(out, (b, c, th, tw), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_candles_upsample() {
        for (b, c, h, w, f) in [(2, 3, 4, 5, 2), (1, 2, 3, 3, 3), (1, 1, 1, 1, 2)] {
            let n = b * c * h * w;
            let x =
                Tensor::from_vec((0..n).map(|i| i as f32 * 0.5 - 3.0).collect::<Vec<_>>(), (b, c, h, w), &Device::Cpu)
                    .unwrap();
            let ours = upsample_nearest(&x, (h * f, w * f)).unwrap().expect("applies");
            let theirs = x.upsample_nearest2d(h * f, w * f).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let (a, e) = (
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a, e, "{b}x{c}x{h}x{w} by {f}");
        }
        let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(upsample_nearest(&x, (6, 6)).unwrap().is_none(), "not a whole factor");
        let v = Var::from_tensor(&x).unwrap();
        assert!(upsample_nearest(v.as_tensor(), (8, 8)).unwrap().is_none(), "in a graph");
    }
}
