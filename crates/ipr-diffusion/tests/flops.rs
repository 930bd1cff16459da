//! The FLOP counter counts exactly the products the layers issue (its own process: the counter
//! is global, so no other test may run beside this one).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ipr_diffusion::flops::Counted;

#[test]
fn convolution_linear_and_attention_count_their_products() {
    let d = Device::Cpu;
    let vb = VarBuilder::zeros(DType::F32, &d);
    let before = Counted::now();
    // 3 -> 4 channels, 3x3, stride 2, padding 1: 8x8 -> 4x4, 2 images.
    let conv = ipr_diffusion::nn::Conv2d::load(vb.pp("c"), 3, 4, 3, 2, 1).unwrap();
    let y = conv.forward(&Tensor::zeros((2, 3, 8, 8), DType::F32, &d).unwrap()).unwrap();
    assert_eq!(y.dims4().unwrap(), (2, 4, 4, 4));
    let conv_flops = 2 * (2 * 4 * 4 * 4) * 27;
    assert_eq!(Counted::now().since(before), Counted { products: conv_flops, attention: 0 });

    // (2, 5, 6) x W^T, W: 7 x 6.
    let lin = ipr_diffusion::nn::Linear::load(vb.pp("l"), 6, 7, true).unwrap();
    lin.forward(&Tensor::zeros((2, 5, 6), DType::F32, &d).unwrap()).unwrap();
    let lin_flops = 2 * 10 * 7 * 6;
    assert_eq!(Counted::now().since(before), Counted { products: conv_flops + lin_flops, attention: 0 });

    // 2 heads of width 3, 5 queries, 4 keys, batch 2.
    let q = Tensor::zeros((2, 5, 6), DType::F32, &d).unwrap();
    let kv = Tensor::zeros((2, 4, 6), DType::F32, &d).unwrap();
    ipr_diffusion::nn::attention(&q, &kv, &kv, 2, None).unwrap();
    let att = 4 * 2 * 2 * 5 * 4 * 3;
    let c = Counted::now().since(before);
    assert_eq!(c, Counted { products: conv_flops + lin_flops, attention: att });
    assert_eq!(c.train_step(), 2 * (conv_flops + lin_flops) + 3 * att);
}

#[test]
fn the_measured_peak_is_a_rate() {
    let p = ipr_diffusion::flops::peak_gflops(&Device::Cpu).unwrap();
    assert!(p.is_finite() && p > 0.1, "{p}");
}
