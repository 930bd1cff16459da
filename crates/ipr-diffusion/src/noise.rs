//! Seeded Gaussian noise that is the same on every machine and device.
//!
//! The generator is SplitMix64 (Steele, Lea & Flood 2014) feeding the Box-Muller transform, in
//! f64, computed on the CPU and then moved to the device: a seed names the same initial latents
//! everywhere, independent of candle's or `rand`'s generator versions. It does not reproduce
//! torch's `randn`; to start from diffusers' noise, pass its latents instead.

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::Result;

/// SplitMix64.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1], 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller; both values of a pair are used).
    pub fn normals(&mut self, n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let (u1, u2) = (self.next_f64(), self.next_f64());
            let r = (-2.0 * u1.ln()).sqrt();
            let a = 2.0 * std::f64::consts::PI * u2;
            out.push(r * a.cos());
            out.push(r * a.sin());
        }
        out.truncate(n);
        out
    }
}

/// A standard-normal tensor of `shape` from `seed`.
pub fn randn(seed: u64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let values = SplitMix64::new(seed).normals(shape.elem_count());
    let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(DType::F32)?;
    Ok(t.to_device(device)?.to_dtype(dtype)?)
}

/// A batch whose sample `i` is `randn(seeds[i], sample_shape)`: each image of a batch is
/// reproducible alone from its own seed, whatever batch it was drawn in.
pub fn randn_per_sample(seeds: &[u64], sample_shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    let samples =
        seeds.iter().map(|&s| randn(s, sample_shape, DType::F32, &Device::Cpu)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&samples, 0)?.to_device(device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_standard_moments() {
        let a = SplitMix64::new(7).normals(20_001);
        assert_eq!(a, SplitMix64::new(7).normals(20_001));
        assert_ne!(a[..10], SplitMix64::new(8).normals(10)[..]);
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.03, "mean {mean} var {var}");
    }

    #[test]
    fn per_sample_seeds_do_not_depend_on_the_batch() {
        let batch = randn_per_sample(&[3, 9], &[2, 4, 4], DType::F32, &Device::Cpu).unwrap();
        let alone = randn(9, (2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let diff: f32 = (batch.get(1).unwrap() - alone).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(diff, 0.0);
    }
}
