//! Denoising steps per second of the UNet on the CPU (a benchmark, not a test).
//!
//! ```text
//! cargo run --release -p ipr-diffusion --example bench_unet            # this crate
//! python crates/ipr-diffusion/examples/bench_unet.py                    # diffusers, same configs
//! ```
//!
//! One step is one UNet forward on `2 x images` samples (classifier-free guidance) with a
//! 77-token context, plus a DDIM update. Configs: `tiny` is the SD 1.5-like test fixture
//! (8x8 latents), `toy` is `examples/toy_unet_config.json` (the toy world's size: 32x32 pixels,
//! 32/64/64 channels, 1.69 M parameters). Weights are zeros: the speed does not depend on them.
//! Threads: candle uses all cores unless `RAYON_NUM_THREADS` is set.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ipr_diffusion::config::{read_json, SchedulerConfig, UNetConfig};
use ipr_diffusion::scheduler::{Sampler, SamplerKind};
use ipr_diffusion::unet::UNet2DConditionModel;

fn main() -> ipr_diffusion::Result<()> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let configs = [
        ("tiny", here.join("tests/fixtures/tiny-sd15/unet/config.json")),
        ("toy", here.join("examples/toy_unet_config.json")),
    ];
    let device = Device::Cpu;
    let sched: SchedulerConfig =
        serde_json::from_str(r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#)
            .expect("static config");
    println!("{:<6} {:>7} {:>10} {:>12}", "config", "images", "steps/s", "ms/step");
    for (name, path) in configs {
        let config: UNetConfig = read_json(&path)?;
        let unet = UNet2DConditionModel::new(VarBuilder::zeros(DType::F32, &device), config.clone(), &path)?;
        let s = config.sample_size.unwrap_or(64);
        for images in [1usize, 8] {
            let b = 2 * images;
            let x = Tensor::randn(0f32, 1.0, (images, config.in_channels, s, s), &device)?;
            let ctx = Tensor::randn(0f32, 1.0, (b, 77, config.cross_attention_dim), &device)?;
            let mut sampler = Sampler::from_config(SamplerKind::Ddim, &sched, &path, 50)?;
            let mut step = |i: usize, x: &Tensor| -> ipr_diffusion::Result<Tensor> {
                let t = Tensor::new(&[sampler.timesteps()[i] as f32], &device)?;
                let out = unet.forward(&Tensor::cat(&[x, x], 0)?, &t, &ctx, None)?;
                let (u, c) = (out.narrow(0, 0, images)?, out.narrow(0, images, images)?);
                let pred = (&u + ((c - &u)? * 5.0)?)?;
                sampler.step(&pred, i, x)
            };
            let mut x = step(0, &x)?;
            let start = Instant::now();
            let mut n = 0;
            while start.elapsed().as_secs_f64() < 3.0 && n < 49 {
                x = step(n + 1, &x)?;
                n += 1;
            }
            let per = start.elapsed().as_secs_f64() / n as f64;
            println!("{name:<6} {images:>7} {:>10.2} {:>12.1}", 1.0 / per, per * 1e3);
        }
    }
    train_steps(&device)?;
    Ok(())
}

/// Training step (forward and backward through every parameter, toy config, 8 samples):
/// candle's own conv backward vs the fused one (`ipr_diffusion::fused`).
fn train_steps(device: &Device) -> ipr_diffusion::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/toy_unet_config.json");
    let config: UNetConfig = read_json(&path)?;
    let varmap = candle_nn::VarMap::new();
    let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, device), config.clone(), &path)?;
    let s = config.sample_size.unwrap_or(32);
    let x = Tensor::randn(0f32, 1.0, (8, config.in_channels, s, s), device)?;
    let ctx = Tensor::randn(0f32, 1.0, (8, 77, config.cross_attention_dim), device)?;
    let t = Tensor::new(&[10f32, 100., 200., 300., 400., 500., 600., 700.], device)?;
    println!("\ntraining step, toy config, batch 8 (all parameters trainable)");
    for fast in [false, true] {
        ipr_diffusion::fused::set_fast_conv_backward(fast);
        let step = || -> ipr_diffusion::Result<()> {
            let loss = unet.forward(&x, &t, &ctx, None)?.sqr()?.mean_all()?;
            let _grads = loss.backward()?;
            Ok(())
        };
        step()?;
        let start = Instant::now();
        let n = 3;
        for _ in 0..n {
            step()?;
        }
        let per = start.elapsed().as_secs_f64() / n as f64;
        let which = if fast { "fused conv backward" } else { "candle conv backward" };
        println!("{which:<22} {:>8.0} ms/step", per * 1e3);
    }
    Ok(())
}
