//! UNet outputs against diffusers' `UNet2DConditionModel` of the tiny pipelines, for fixed inputs
//! with two different timesteps in one batch (per-sample timesteps).

mod common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, Reference};
use ipr_diffusion::unet::{AddedCond, UNet2DConditionModel};

fn check(name: &str) {
    let r = Reference::load(name);
    let unet = UNet2DConditionModel::load(&fixtures().join(name).join("unet"), DType::F32, &Device::Cpu).unwrap();
    let added = r
        .has("unet/text_embeds")
        .then(|| AddedCond { text_embeds: r.get("unet/text_embeds"), time_ids: r.get("unet/time_ids") });
    let out = unet
        .forward(&r.get("unet/sample"), &r.get("unet/timesteps"), &r.get("unet/encoder_hidden_states"), added.as_ref())
        .unwrap();
    assert_close(&format!("{name} unet"), &out, &r.get("unet/out"), 1e-4);
}

#[test]
fn sd15_unet_conv_projection_int_heads() {
    check("tiny-sd15");
}

#[test]
fn sd21_unet_linear_projection_head_list() {
    check("tiny-sd21");
}

#[test]
fn sdxl_unet_text_time_and_two_transformer_layers() {
    check("tiny-sdxl");
}

#[test]
fn pixel_unet_three_levels() {
    check("tiny-pixel");
}

/// The UNet in f16 (the dtype CUDA sampling uses) stays within f16 precision of diffusers' f32.
#[test]
fn f16_unet_is_close() {
    for name in ["tiny-sd15", "tiny-sdxl"] {
        let r = Reference::load(name);
        let unet = UNet2DConditionModel::load(&fixtures().join(name).join("unet"), DType::F16, &Device::Cpu).unwrap();
        let h = |k: &str| r.get(k).to_dtype(DType::F16).unwrap();
        let added = r
            .has("unet/text_embeds")
            .then(|| AddedCond { text_embeds: h("unet/text_embeds"), time_ids: r.get("unet/time_ids") });
        let out = unet
            .forward(&h("unet/sample"), &r.get("unet/timesteps"), &h("unet/encoder_hidden_states"), added.as_ref())
            .unwrap();
        assert_close(&format!("{name} f16 unet"), &out, &r.get("unet/out"), 5e-3);
    }
}

/// A config that disagrees with the weights: the error names the weights file and the tensor.
#[test]
fn wrong_shapes_name_the_file_and_tensor() {
    let src = fixtures().join("tiny-sd15").join("unet");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["cross_attention_dim"] = serde_json::json!(48);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let msg = UNet2DConditionModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("attn2.to_k"), "{msg}");
}

/// Latent sizes the UNet's levels do not divide (5x5 with two levels, 13x13 with three): like
/// diffusers, the upsamplers resize to the size of the skip connection they meet.
#[test]
fn odd_latent_sizes() {
    for name in ["tiny-sd15", "tiny-sd21", "tiny-sdxl", "tiny-pixel"] {
        let r = Reference::load(name);
        let unet = UNet2DConditionModel::load(&fixtures().join(name).join("unet"), DType::F32, &Device::Cpu).unwrap();
        let first = |k: &str| r.get(k).narrow(0, 0, 1).unwrap();
        let added = r
            .has("unet/text_embeds")
            .then(|| AddedCond { text_embeds: first("unet/text_embeds"), time_ids: first("unet/time_ids") });
        let out = unet
            .forward(
                &r.get("unet/odd_sample"),
                &first("unet/timesteps"),
                &first("unet/encoder_hidden_states"),
                added.as_ref(),
            )
            .unwrap();
        assert_close(&format!("{name} odd size"), &out, &r.get("unet/odd_out"), 1e-4);
    }
}
