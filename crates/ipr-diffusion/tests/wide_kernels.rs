//! The AVX-512, AVX2 + FMA and portable versions of the CPU kernels (`fastmath::simd_dispatch`)
//! return the same bits: group norm + SiLU (forward and input gradient), softmax and GEGLU
//! (forward and backward). Where the CPU lacks a width, that run takes the next narrower one.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;

fn randn(seed: u64, shape: impl Into<Shape>, std: f64) -> Tensor {
    (ipr_diffusion::noise::randn(seed, shape, DType::F32, &Device::Cpu).unwrap() * std).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

/// Outputs and input gradients of the kernels on seeded random inputs.
fn run() -> Vec<Vec<u32>> {
    let d = Device::Cpu;
    let x = Var::from_tensor(&randn(1, (2, 16, 9, 7), 3.0)).unwrap();
    let h = Var::from_tensor(&randn(2, (3, 5, 38), 2.0)).unwrap();
    let weights = [("weight".to_string(), (randn(3, 16, 0.5) + 1.0).unwrap()), ("bias".to_string(), randn(4, 16, 0.5))];
    let norm =
        ipr_diffusion::nn::GroupNorm::load(VarBuilder::from_tensors(weights.into(), DType::F32, &d), 4, 16, 1e-5)
            .unwrap();
    let n = norm.forward_silu(x.as_tensor()).unwrap();
    let s = ipr_diffusion::nn::softmax(&(x.as_tensor() * 4.0).unwrap()).unwrap();
    let g = ipr_diffusion::geglu::geglu(h.as_tensor()).unwrap().unwrap();
    let dot = |t: &Tensor, seed: u64| (t * randn(seed, t.shape(), 1.0)).unwrap().sum_all().unwrap();
    let loss = ((dot(&n, 5) + dot(&s, 6)).unwrap() + dot(&g, 7)).unwrap();
    let grads = loss.backward().unwrap();
    vec![bits(&n), bits(&s), bits(&g), bits(grads.get(x.as_tensor()).unwrap()), bits(grads.get(h.as_tensor()).unwrap())]
}

#[test]
fn wide_and_portable_kernels_agree_bit_for_bit() {
    let widest = run();
    let mut runs = Vec::new();
    for lanes in [8, 4] {
        ipr_diffusion::fastmath::set_lane_limit(lanes);
        runs.push((lanes, run()));
    }
    ipr_diffusion::fastmath::set_portable_only(false);
    for (lanes, other) in runs {
        assert_eq!(widest.len(), other.len());
        for (i, (a, b)) in widest.iter().zip(&other).enumerate() {
            assert!(a == b, "output {i}: the widest version and the {lanes}-lane one differ");
        }
    }
}
