//! VAE decode and encode (latent mean) against diffusers' `AutoencoderKL` of the tiny pipelines.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, Reference};
use ipr_diffusion::vae::AutoencoderKL;

fn check(name: &str) {
    let r = Reference::load(name);
    let vae = AutoencoderKL::load(&fixtures().join(name).join("vae"), DType::F32, &Device::Cpu).unwrap();
    let decoded = vae.decode(&r.get("vae/latents")).unwrap();
    assert_close(&format!("{name} decode"), &decoded, &r.get("vae/decoded"), 1e-4);
    let mean = vae.encode_mean(&r.get("vae/image")).unwrap();
    assert_close(&format!("{name} encode"), &mean, &r.get("vae/encoded_mean"), 1e-4);
}

#[test]
fn sd15_vae() {
    check("tiny-sd15");
}

#[test]
fn sdxl_vae_scaling_factor() {
    check("tiny-sdxl");
    let vae = AutoencoderKL::load(&fixtures().join("tiny-sdxl").join("vae"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.config.scaling_factor, 0.13025);
}
