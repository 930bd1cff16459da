//! The AVX2 + FMA versions of the CPU kernels (`fastmath::avx2_dispatch`) return the same bits as
//! their portable versions: group norm + SiLU (forward and input gradient), softmax and GEGLU
//! (forward and backward). On a CPU without AVX2 both runs take the portable version.

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
    let wide = run();
    ipr_diffusion::fastmath::set_portable_only(true);
    let portable = run();
    ipr_diffusion::fastmath::set_portable_only(false);
    assert_eq!(wide.len(), portable.len());
    for (i, (a, b)) in wide.iter().zip(&portable).enumerate() {
        assert!(a == b, "output {i}: the two versions differ");
    }
}
