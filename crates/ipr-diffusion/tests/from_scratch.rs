//! Building models from scratch (a `VarMap`, torch-like initialisation) and saving them as a
//! diffusers-format folder that this crate (and diffusers) loads back: what training a toy model
//! from scratch needs.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, fixtures};
use ipr_diffusion::clip_text::ClipTextModel;
use ipr_diffusion::config::{write_json, ClipTextConfig, UNetConfig};
use ipr_diffusion::unet::UNet2DConditionModel;

#[test]
fn unet_from_varmap_saves_and_reloads() {
    let src = fixtures().join("tiny-pixel").join("unet").join("config.json");
    let config = UNetConfig::load(&src).unwrap();
    let varmap = VarMap::new();
    let unet =
        UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), config.clone(), &src)
            .unwrap();
    // torch-like init: linears and convs uniform in +-1/sqrt(fan_in), norms at 1 / 0.
    let w = unet.conv_in.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bound = 1.0 / (3.0f32 * 9.0).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound) && w.iter().any(|v| v.abs() > bound / 2.0));
    let norm = unet.conv_norm_out.weight.to_vec1::<f32>().unwrap();
    assert!(norm.iter().all(|&v| v == 1.0));

    let dir = tempfile::tempdir().unwrap();
    write_json(&dir.path().join("config.json"), &config, Some("UNet2DConditionModel")).unwrap();
    varmap.save(dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    let reloaded = UNet2DConditionModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &Device::Cpu).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (2, 7, 32), &Device::Cpu).unwrap();
    let t = Tensor::new(&[3f32, 900.], &Device::Cpu).unwrap();
    let a = unet.forward(&x, &t, &ctx, None).unwrap();
    let b = reloaded.forward(&x, &t, &ctx, None).unwrap();
    assert_close("reloaded unet", &b, &a, 0.0);
}

#[test]
fn text_encoder_from_varmap_saves_and_reloads() {
    let src = fixtures().join("tiny-pixel").join("text_encoder").join("config.json");
    let config = ClipTextConfig::load(&src).unwrap();
    let varmap = VarMap::new();
    let te = ClipTextModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), config.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_json(&dir.path().join("config.json"), &config, None).unwrap();
    varmap.save(dir.path().join("model.safetensors")).unwrap();
    let reloaded = ClipTextModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[571u32, 320, 572, 572]], &Device::Cpu).unwrap();
    let (a, b) = (te.forward(&ids).unwrap(), reloaded.forward(&ids).unwrap());
    assert_close("reloaded text encoder", &b.last_hidden_state, &a.last_hidden_state, 0.0);
}
