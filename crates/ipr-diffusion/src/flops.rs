//! A running count of the floating-point operations of the models' matrix products, so that
//! benchmarks can report the FLOP/s they reach against the machine's measured peak
//! ([`peak_gflops`]), not only a ratio to PyTorch.
//!
//! Counted where the products are issued: every convolution (`2 B Co C k² Ho Wo`), every
//! linear layer's `x W^T` (`2 M N K`) and both products of attention (`4 B H Lq Lk d`), in the
//! forward pass. A LoRA step's backward is derived from them in [`train_step_flops`].

use std::sync::atomic::{AtomicU64, Ordering};

static FORWARD_PRODUCTS: AtomicU64 = AtomicU64::new(0);
static FORWARD_ATTENTION: AtomicU64 = AtomicU64::new(0);

/// Adds the FLOPs of a forward convolution or linear product.
pub fn add_product(flops: usize) {
    FORWARD_PRODUCTS.fetch_add(flops as u64, Ordering::Relaxed);
}

/// Adds the FLOPs of a forward attention (scores and weighted sum).
pub fn add_attention(flops: usize) {
    FORWARD_ATTENTION.fetch_add(flops as u64, Ordering::Relaxed);
}

/// FLOPs counted so far: (convolutions and linear layers, attention).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    pub products: u64,
    pub attention: u64,
}

impl Counted {
    pub fn now() -> Self {
        Self {
            products: FORWARD_PRODUCTS.load(Ordering::Relaxed),
            attention: FORWARD_ATTENTION.load(Ordering::Relaxed),
        }
    }

    /// What was counted since `earlier`.
    pub fn since(self, earlier: Counted) -> Counted {
        Counted { products: self.products - earlier.products, attention: self.attention - earlier.attention }
    }

    pub fn forward(self) -> u64 {
        self.products + self.attention
    }

    /// A LoRA step's FLOPs from its forward's: frozen convolutions and linear layers compute
    /// only their input gradient in the backward (one more product each), attention both of its
    /// products' operand gradients (two more each). The adapters' rank-r products are left out.
    pub fn train_step(self) -> u64 {
        2 * self.products + 3 * self.attention
    }
}

/// The machine's measured matrix-product peak in GFLOP/s: the best of several f32 products of
/// two `n x n` matrices through candle (the `gemm` crate's kernels on all of rayon's threads on
/// the CPU), the same kernels the models use; `n` = 1536 on the CPU, 8192 on a GPU.
pub fn peak_gflops(device: &candle_core::Device) -> crate::Result<f64> {
    matmul_gflops(device, if device.is_cpu() { 1536 } else { 8192 }, 6)
}

/// GFLOP/s of the best of `reps` f32 products of two `n x n` matrices through candle (`ipr bench
/// gemm`; its twins are PyTorch's and NumPy's, in `scripts/bench/gemm.py`).
pub fn matmul_gflops(device: &candle_core::Device, n: usize, reps: usize) -> crate::Result<f64> {
    let a = candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let start = std::time::Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_train_step_is_twice_the_frozen_products_and_three_times_attention() {
        let c = Counted { products: 10, attention: 4 };
        assert_eq!((c.forward(), c.train_step()), (14, 32));
    }
}
